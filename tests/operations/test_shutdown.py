"""SIGTERM with 50 streams in flight: a clean end for every client, every run stored, exit 0."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from service.sim import Reply, Simulator, open_simulator

from ..servers import ROOT
from ..streams import parse_sse

STREAMS = 50


async def _start_service(tmp_path: Path, sim_url: str) -> tuple[trio.Process, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    env.update({
        "SERVICE_DB": str(tmp_path / "s.db"), "SERVICE_BACKEND": "llamacpp",
        "SERVICE_LLAMACPP_URL": sim_url, "SERVICE_SHUTDOWN_DRAIN": "1",
    })
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "service", "--bind", "127.0.0.1:0", "--config",
         str(ROOT / "hypercorn.toml")],
        cwd=tmp_path, env=env, stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    log = b""
    with trio.fail_after(60):
        while True:
            chunk = await proc.stderr.receive_some(65536)
            assert chunk, log.decode()
            log += chunk
            m = re.search(rb"Running on (http://127\.0\.0\.1:\d+)", log)
            if m:
                return proc, m.group(1).decode()


@pytest.mark.slow
async def test_sigterm_with_50_streams_in_flight(tmp_path: Path) -> None:
    # Long, paced answers: none can finish within the drain, so all are cut by the shutdown.
    sim = Simulator(("sim-model",), default=Reply(tokens=2000, interval=0.05),
                    strict_models=False)
    async with open_simulator(sim) as running:
        proc, url = await _start_service(tmp_path, running.url)
        frames: list[list[dict[str, Any]]] = [[] for _ in range(STREAMS)]
        started = trio.Semaphore(0)  # one release per stream that has seen a token

        async def client(i: int, http: httpx.AsyncClient, conv: str) -> None:
            body = {"content": f"question {i}", "stream": True, "on_disconnect": "continue"}
            async with http.stream("POST", f"/api/conversations/{conv}/messages",
                                   json=body) as r:
                assert r.status_code == 200
                text = ""
                released = False
                async for chunk in r.aiter_text():
                    text += chunk
                    if not released and "event: token" in text:
                        released = True
                        started.release()
                frames[i] = parse_sse(text)

        limits = httpx.Limits(max_connections=STREAMS + 5)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
            convs = [(await http.post("/api/conversations", json={})).json()["id"]
                     for _ in range(STREAMS)]
            # Guards only (a loaded CI machine is slow); nothing here asserts speed.
            with trio.fail_after(180):
                async with trio.open_nursery() as nursery:
                    for i in range(STREAMS):
                        nursery.start_soon(client, i, http, convs[i])
                    for _ in range(STREAMS):
                        await started.acquire()
                    proc.send_signal(signal.SIGTERM)
            with trio.fail_after(60):
                rc = await proc.wait()
        assert rc == 0
        # Every client got a clean end: its stream's last event is run.finished.
        for f in frames:
            assert f, "a client got nothing"
            assert f[-1]["event"] == "run.finished"
            assert f[-1]["data"]["status"] == "cancelled"
            assert [int(x["id"]) for x in f] == list(range(1, len(f) + 1))
            assert any(x["event"] == "shutdown" for x in f)
        # Every upstream generation was closed.
        assert all(s.closed.is_set() for s in running.streams)

    conn = sqlite3.connect(tmp_path / "s.db")
    runs = conn.execute("SELECT status FROM runs").fetchall()
    assert len(runs) == STREAMS
    assert {r[0] for r in runs} == {"cancelled"}
    replies = conn.execute(
        "SELECT status, content FROM messages WHERE role = 'assistant'").fetchall()
    assert len(replies) == STREAMS
    assert all(status == "cancelled" and content.startswith("tok0") for status, content in replies)
    finished = conn.execute(
        "SELECT COUNT(*) FROM run_events WHERE type = 'run.finished'").fetchone()[0]
    assert finished == STREAMS
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


@pytest.mark.slow
async def test_a_second_sigterm_during_the_drain_changes_nothing(tmp_path: Path) -> None:
    # Found in review: the signal receiver was closed after the first SIGTERM, and trio
    # re-delivered a second one to the default handler: the process died (-15) in the middle
    # of its graceful close, every stream cut without its run.finished.
    sim = Simulator(("sim-model",), default=Reply(tokens=2000, interval=0.05),
                    strict_models=False)
    async with open_simulator(sim) as running:
        proc, url = await _start_service(tmp_path, running.url)  # a 1 s drain
        seen, signalled = "", False
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            conv = (await http.post("/api/conversations", json={})).json()["id"]
            with trio.fail_after(60):
                async with http.stream("POST", f"/api/conversations/{conv}/messages",
                                       json={"content": "go", "stream": True}) as r:
                    async for chunk in r.aiter_text():
                        seen += chunk
                        if "event: token" in seen and not signalled:
                            signalled = True
                            proc.send_signal(signal.SIGTERM)
                            await trio.sleep(0.2)  # inside the 1 s drain
                            proc.send_signal(signal.SIGTERM)
                            proc.send_signal(signal.SIGINT)
            with trio.fail_after(60):
                rc = await proc.wait()
    frames = parse_sse(seen)
    assert frames[-1]["event"] == "run.finished"
    assert frames[-1]["data"]["status"] == "cancelled"
    assert rc == 0
    conn = sqlite3.connect(tmp_path / "s.db")
    assert conn.execute("SELECT status FROM runs").fetchall() == [("cancelled",)]
    conn.close()


@pytest.mark.slow
async def test_kill_9_mid_run_loses_nothing_a_client_saw(tmp_path: Path) -> None:
    sim = Simulator(("sim-model",), default=Reply(tokens=2000, interval=0.01),
                    strict_models=False)
    async with open_simulator(sim) as running:
        proc, url = await _start_service(tmp_path, running.url)
        seen = ""
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            conv = (await http.post("/api/conversations", json={})).json()["id"]
            with trio.fail_after(60):
                async with http.stream("POST", f"/api/conversations/{conv}/messages",
                                       json={"content": "go", "stream": True}) as r:
                    run_id = None
                    async for chunk in r.aiter_text():
                        seen += chunk
                        frames = parse_sse(seen.rsplit("\n\n", 1)[0] + "\n\n")
                        run_id = run_id or frames[0]["data"]["run_id"]
                        if sum(f["event"] == "token" for f in frames) >= 20:
                            proc.kill()  # SIGKILL: no finally, no drain
                            break
            await proc.wait()
        tokens = "".join(f["data"]["text"] for f in parse_sse(seen.rsplit("\n\n", 1)[0] + "\n\n")
                         if f["event"] == "token")
        assert tokens.startswith("tok0 tok1")

        # A restart closes the interrupted run and keeps every token the client had seen.
        proc, url = await _start_service(tmp_path, running.url)
        try:
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                run = (await http.get(f"/api/runs/{run_id}")).json()
                assert run["status"] == "failed"
                assert run["error"].startswith("interrupted")
                msgs = (await http.get(f"/api/conversations/{conv}")).json()["messages"]
                assert msgs[1]["status"] == "error"
                assert msgs[1]["content"].startswith(tokens)
                r = await http.get(f"/api/runs/{run_id}/events")
                frames = parse_sse(r.text)
                assert frames[-1]["event"] == "run.finished"
                assert [int(f["id"]) for f in frames] == list(range(1, len(frames) + 1))
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = None
            with trio.move_on_after(60, shield=True):
                rc = await proc.wait()
            assert rc == 0
