"""The processes under test: the simulator and the service, each its own process, and /proc.

CPU time comes from ``/proc/<pid>/stat`` (utime + stime, all threads: the store's worker threads
count) and RSS from ``/proc/<pid>/status``; no psutil. A process's CPU is that of its whole tree:
with ``--workers N`` the service's workers are children of the process started here, and a
PostgreSQL server's backends are children of its postmaster; children that ended count through
their parent's cutime/cstime once reaped.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .client import get_json

__all__ = ["HYPERCORN_TOML", "Proc", "ProcStats", "free_port", "machine_busy", "raise_fd_limit",
           "start_service", "start_simulator", "started", "tree_cpu", "tree_pids", "wait_http"]

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


def _stat_cpu(pid: int) -> float:
    """utime + stime + cutime + cstime (reaped children's too), in seconds; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return sum(int(x) for x in fields[11:15]) / _TICK


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


def tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of ``pid`` and each live descendant (each with its reaped children's)."""
    return {p: _stat_cpu(p) for p in tree_pids(pid)}


def machine_busy() -> tuple[float, float]:
    """The machine's busy and total CPU seconds since boot, over every core (``/proc/stat``)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks) - idle) / _TICK, sum(ticks) / _TICK


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
    per_pid: dict[int, float] = field(default_factory=dict)  # the tree's processes, each


class Proc:
    """A process under test (and its descendants: :func:`tree_cpu`)."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes] | None, port: int, log: Path,
                 *, pid: int | None = None) -> None:
        self.name = name
        self.popen = popen
        self.pid = popen.pid if popen is not None else int(pid or 0)
        self.port = port
        self.log = log
        self.workers = 1
        self._cpu0: dict[int, float] = {}
        self._t0 = 0.0

    def __repr__(self) -> str:
        return f"<Proc {self.name} pid={self.pid} port={self.port}>"

    def cpu(self) -> float:
        return sum(tree_cpu(self.pid).values())

    def rss(self) -> int:
        return sum(rss_bytes(p) for p in tree_pids(self.pid))

    def mark(self) -> None:
        self._cpu0, self._t0 = tree_cpu(self.pid), time.perf_counter()

    def since_mark(self) -> ProcStats:
        now = tree_cpu(self.pid)
        per = {p: now[p] - self._cpu0.get(p, 0.0) for p in now}
        return ProcStats(sum(now.values()) - sum(self._cpu0.values()),
                         time.perf_counter() - self._t0, per)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)

    def check_alive(self) -> None:
        if self.popen is not None and self.popen.poll() is not None:
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
    return await started(Proc("simulator", popen, port, log))


async def started(proc: Proc, *, within: float = 20.0) -> Proc:
    """``proc`` once its ``/health`` answers (within ``within`` seconds). Too slow, or
    interrupted meanwhile (Ctrl-C), it is stopped: not left running."""
    try:
        with trio.fail_after(within):
            await wait_http(proc, "/health")
    except BaseException:
        proc.stop()
        raise
    return proc


async def start_service(workdir: Path, sim_port: int, *, db: str | None = None,
                        name: str = "service", workers: int = 1,
                        prefix: Sequence[str] = ()) -> Proc:
    """The service on the simulator; ``db``: its store (default: a SQLite file in
    ``workdir``), ``name``: its log's and process's name (several may share a store),
    ``workers``: ``python -m service --workers N`` (the parent's tree counts as the service),
    ``prefix``: a command it runs under (``unshare ...``)."""
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
        [*prefix, sys.executable, "-m", "service", "--config", str(toml),
         "--bind", f"127.0.0.1:{port}", "--workers", str(workers)],
        cwd=_REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    proc = Proc(name, popen, port, log)
    proc.workers = workers
    seen: list[str] = []  # the settling's windows, for the error
    with trio.move_on_after(_START_WITHIN) as waited:
        try:
            await wait_http(proc, "/healthz")
            if workers > 1:
                await _wait_workers_settled(proc, workers, seen)
        except BaseException:
            proc.stop()
            raise
    if waited.cancelled_caught:
        proc.stop()
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(
            f"{name} did not {'settle' if seen else 'answer /healthz'} within "
            f"{_START_WITHIN:.0f} s; its last windows (CPU per process, % of a core): "
            f"{seen[-5:]}; its log's end:\n{tail}")
    return proc


_START_WITHIN = 60.0  # seconds for the service to answer and, with workers, to settle
_SETTLE_WINDOW = 0.5  # seconds of each look at the workers' CPU
_SETTLE_BUSY = 0.25  # a process above this share of a core in a window is still starting


def _worker_pids(pid: int) -> list[int]:
    """The spawned workers among ``pid``'s children (not multiprocessing's resource tracker)."""
    out = []
    for child in children(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    out.append(child)
        except OSError:
            pass
    return out


async def _wait_workers_settled(proc: Proc, workers: int, seen: list[str]) -> None:
    """Until all ``workers`` exist and none is still starting (started one after another, each
    busy importing and opening the store, most of a core, until it listens; the parent logs
    readiness only at INFO). Judged per process, not on the tree's sum: idle workers' upkeep
    (1-2 % of a core each) adds up with their number, and on a slow host passed the old bound
    (10 % of a core for the whole tree), which then waited forever. ``seen``: each window."""
    while True:
        proc.check_alive()
        if len(_worker_pids(proc.pid)) >= workers:
            proc.mark()
            await trio.sleep(_SETTLE_WINDOW)
            stats = proc.since_mark()
            shares = {pid: cpu / stats.wall for pid, cpu in stats.per_pid.items()}
            seen.append(" ".join(f"{pid}:{share:.0%}" for pid, share in shares.items()))
            if max(shares.values(), default=0.0) < _SETTLE_BUSY:
                return
        else:
            await trio.sleep(0.1)
