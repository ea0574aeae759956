"""``python -m service --workers N``: several real processes on one port and one store."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio

from service.sim import Reply, Simulator, open_simulator

from ..servers import ROOT

GUARD = 60


def _children(pid: int) -> set[int]:
    """The live worker processes of ``pid`` (from /proc): those multiprocessing spawned, not
    its resource tracker, nor the ``ldconfig -p`` that importing trio runs (a SIGTERM sent on
    seeing that one reached the parent before it could take one: it died of it, -15)."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if (int(fields[1]) == pid and fields[0] not in (b"Z", b"X")
                and b"--multiprocessing-fork" in cmdline):
            out.add(int(entry))
    return out


async def _start(tmp_path: Path, sim_url: str, workers: int, *, backend: str = "llamacpp",
                 ) -> tuple[trio.Process, str, Path]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    env.update({"SERVICE_DB": str(tmp_path / "s.db"), "SERVICE_BACKEND": backend,
                "SERVICE_LLAMACPP_URL": sim_url, "SERVICE_SHUTDOWN_DRAIN": "1",
                # (auto: a fleet, Ollama's server first and refused, llama.cpp's answering)
                "SERVICE_OLLAMA_URL": "http://127.0.0.1:9"})
    log = tmp_path / "service.log"
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "service", "--bind", "127.0.0.1:0", "--workers",
             str(workers), "--config", str(ROOT / "hypercorn.toml")],
            cwd=tmp_path, env=env, stderr=out,
        )
    finally:
        os.close(out)
    with trio.fail_after(GUARD):
        while True:
            text = await trio.Path(log).read_text()
            m = re.search(r"Running on (http://127\.0\.0\.1:\d+) with", text)
            if m:
                return proc, m.group(1), log
            assert proc.returncode is None, text
            await trio.sleep(0.05)


async def _stop(proc: trio.Process) -> int:
    proc.send_signal(signal.SIGTERM)
    with trio.move_on_after(GUARD, shield=True):
        await proc.wait()
    if proc.returncode is None:
        proc.kill()
    assert proc.returncode is not None
    return proc.returncode


async def _run(http: httpx.AsyncClient) -> str:
    conv = (await http.post("/api/conversations", json={})).json()["id"]
    r = await http.post(f"/api/conversations/{conv}/messages", json={"content": "hi"})
    assert r.status_code == 200, r.text
    return str(r.json()["run"]["id"])


@pytest.mark.slow
async def test_two_workers_share_the_port_and_the_store_and_stop_together(
    tmp_path: Path,
) -> None:
    sim = Simulator(("sim-model",), default=Reply(tokens=5), strict_models=False)
    async with open_simulator(sim) as running:
        # The default backend (auto: a fleet, its model lists refreshed in the background
        # beside the gauges' loop of each worker: a lifespan once failed at that).
        proc, url, log = await _start(tmp_path, running.url, 2, backend="auto")
        try:
            workers = _children(proc.pid)
            assert len(workers) == 2, workers
            runs = []
            for _ in range(40):  # a new connection each: the kernel spreads them
                async with httpx.AsyncClient(base_url=url, timeout=GUARD) as http:
                    runs.append(await _run(http))
            async with httpx.AsyncClient(base_url=url, timeout=GUARD) as http:
                metrics = (await http.get("/metrics")).text
            # /metrics covers every worker: the runs of both are counted wherever it is asked.
            m = re.search(r'service_runs_total\{status="succeeded"\} (\d+)', metrics)
            assert m is not None, metrics
            assert int(m.group(1)) == 40
        finally:
            code = -1
            with trio.move_on_after(2 * GUARD, shield=True):
                code = await _stop(proc)
        assert code == 0, (await trio.Path(log).read_text())[-3000:]
        assert not _children(proc.pid) - {proc.pid}  # no worker left behind
        # One stream for every process: each line names its own (the workers' access lines,
        # the parent's start and stop).
        lines = [json.loads(x) for x in (await trio.Path(log).read_text()).splitlines()
                 if x.startswith("{")]
        assert lines
        assert all("pid" in x for x in lines), [x for x in lines if "pid" not in x][:3]
        assert {x["pid"] for x in lines} == {proc.pid, *workers}
    conn = sqlite3.connect(tmp_path / "s.db")
    try:
        rows = conn.execute("SELECT status, process FROM runs").fetchall()
    finally:
        conn.close()
    assert {status for status, _ in rows} == {"succeeded"}
    assert len({process.split(":")[0] for _, process in rows}) == 2  # both workers served


@pytest.mark.slow
async def test_a_worker_that_dies_is_replaced_and_its_runs_are_closed(tmp_path: Path) -> None:
    sim = Simulator(("sim-model",), default=Reply(tokens=5), strict_models=False)
    async with open_simulator(sim) as running:
        proc, url, log = await _start(tmp_path, running.url, 2)
        try:
            before = _children(proc.pid)
            victim = min(before)
            os.kill(victim, signal.SIGKILL)
            with trio.fail_after(GUARD):
                while len(after := _children(proc.pid)) < 2 or victim in after:  # noqa: ASYNC110 (another process)
                    await trio.sleep(0.1)
                while "worker 0 up" not in (text := await trio.Path(log).read_text()) or (  # noqa: ASYNC110
                        text.count(" up (pid") < 3):
                    await trio.sleep(0.1)
            assert "died (exit -9); starting another" in text
            async with httpx.AsyncClient(base_url=url, timeout=GUARD) as http:
                for _ in range(6):
                    await _run(http)
        finally:
            code = -1
            with trio.move_on_after(2 * GUARD, shield=True):
                code = await _stop(proc)
        assert code == 0


@pytest.mark.slow
async def test_a_worker_that_cannot_start_stops_the_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    env.update({"SERVICE_DB": str(tmp_path / "s.db"), "SERVICE_BACKEND": "llamacpp",
                "SERVICE_TOOLS": "no_such_tool_module"})
    with trio.fail_after(GUARD):
        done = await trio.run_process(
            [sys.executable, "-m", "service", "--bind", "127.0.0.1:0", "--workers", "2",
             "--config", str(ROOT / "hypercorn.toml")],
            cwd=tmp_path, env=env, capture_stderr=True, check=False,
        )
    assert done.returncode == 1
    assert "SERVICE_TOOLS" in done.stderr.decode()
    assert "Traceback" not in done.stderr.decode()


@pytest.mark.slow
async def test_sigterm_during_a_restart_pause_stops_promptly_and_exits_0(tmp_path: Path) -> None:
    # Found by a review: after a worker that died soon after its start, the slot slept, then
    # started another without looking whether the pool was stopping: a SIGTERM during that
    # pause left a fresh worker nobody stopped (the parent waited 60 s, killed it, exit 1).
    sim = Simulator(("sim-model",), default=Reply(tokens=5), strict_models=False)
    async with open_simulator(sim) as running:
        proc, _, log = await _start(tmp_path, running.url, 2)
        victim = min(_children(proc.pid))
        os.kill(victim, signal.SIGKILL)  # dies within _RESTART_SOON of its start
        with trio.fail_after(10):
            while "died (exit -9)" not in await trio.Path(log).read_text():  # noqa: ASYNC110
                await trio.sleep(0.02)
        proc.send_signal(signal.SIGTERM)  # inside the 0.5 s restart pause
        began = time.monotonic()
        with trio.move_on_after(90, shield=True):
            await proc.wait()
        took = time.monotonic() - began
        if proc.returncode is None:
            proc.kill()
        text = await trio.Path(log).read_text()
        leftover = _children(proc.pid)
        for pid in leftover:
            os.kill(pid, signal.SIGKILL)
        assert not leftover
        assert took < 30, f"parent took {took:.1f}s to stop\n{text[-2000:]}"
        assert proc.returncode == 0, text[-2000:]
