"""The processes under test: the simulator and the service, each its own process, and /proc.

CPU time comes from ``/proc/<pid>/stat`` (utime + stime, all threads: the store's worker threads
count) and RSS from ``/proc/<pid>/status``; no psutil.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from .client import get_json

__all__ = ["HYPERCORN_TOML", "Proc", "ProcStats", "free_port", "raise_fd_limit", "start_service",
           "start_simulator", "wait_http"]

_TICK = os.sysconf("SC_CLK_TCK")
_REPO = Path(__file__).resolve().parents[2]

HYPERCORN_TOML = """\
worker_class = "trio"
workers = 1
graceful_timeout = 1
keep_alive_timeout = 75
backlog = 4096
"""


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (this one if ``pid`` is None)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14 and 15)


def rss_bytes(pid: int | None = None) -> int:
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class ProcStats:
    """CPU seconds used between :meth:`Proc.mark` and now."""

    cpu: float
    wall: float


class Proc:
    def __init__(self, name: str, popen: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.name = name
        self.popen = popen
        self.pid = popen.pid
        self.port = port
        self.log = log
        self._cpu0 = 0.0
        self._t0 = 0.0

    def __repr__(self) -> str:
        return f"<Proc {self.name} pid={self.pid} port={self.port}>"

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def mark(self) -> None:
        self._cpu0, self._t0 = self.cpu(), time.perf_counter()

    def since_mark(self) -> ProcStats:
        return ProcStats(self.cpu() - self._cpu0, time.perf_counter() - self._t0)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_http(proc: Proc, path: str) -> None:
    while True:
        proc.check_alive()
        try:
            status, _ = await get_json("127.0.0.1", proc.port, path)
            if status == 200:
                return
        except (OSError, ValueError):
            pass
        await trio.sleep(0.05)


async def start_simulator(workdir: Path) -> Proc:
    log = workdir / "sim.log"
    port = free_port()
    popen = subprocess.Popen(  # noqa: ASYNC220 (a child that lives for the whole benchmark)
        [sys.executable, "-m", "service.bench.simproc", "--port", str(port)],
        cwd=_REPO, stdout=subprocess.DEVNULL, stderr=log.open("wb"),
    )
    proc = Proc("simulator", popen, port, log)
    with trio.fail_after(20):
        await wait_http(proc, "/health")
    return proc


async def start_service(workdir: Path, sim_port: int, *, db: str | None = None,
                        name: str = "service") -> Proc:
    """The service on the simulator; ``db``: its store (default: a SQLite file in
    ``workdir``), ``name``: its log's and process's name (several may share a store)."""
    log = workdir / f"{name}.log"
    toml = workdir / "hypercorn.toml"
    toml.write_text(HYPERCORN_TOML)
    port = free_port()
    env = {
        **os.environ,
        "SERVICE_BACKEND": "llamacpp",
        "SERVICE_LLAMACPP_URL": f"http://127.0.0.1:{sim_port}",
        "SERVICE_DEFAULT_MODEL": "bench",
        "SERVICE_DB": db or str(workdir / "service.db"),
        "SERVICE_LOG_LEVEL": "WARNING",
        "SERVICE_MAX_RUNS": "100000",
        "SERVICE_BACKEND_CONCURRENCY": "20000",
        "SERVICE_HEALTH_TTL": "60",
    }
    popen = subprocess.Popen(  # noqa: ASYNC220 (a child that lives for the whole benchmark)
        [sys.executable, "-m", "service", "--config", str(toml),
         "--bind", f"127.0.0.1:{port}"],
        cwd=_REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    proc = Proc(name, popen, port, log)
    with trio.fail_after(30):
        await wait_http(proc, "/healthz")
    return proc
