"""Several real service processes sharing one PostgreSQL database (issue 14): any instance
serves any run: a re-join on another instance, a cancel sent to another instance, an owner
killed with SIGKILL, the database restarted mid-stream or frozen (SIGSTOP) under a stream."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from service.sim import Reply, Simulator, open_simulator

from ..pg import PostgresServer, pg_url, postgres  # noqa: F401 (fixtures)
from ..servers import start_service
from ..store.test_pg_frozen import frozen
from ..streams import parse_sse

GUARD = 60


@asynccontextmanager
async def instance(url: str, sim_url: str, cwd: Path, name: str, **env: str,
                   ) -> AsyncIterator[tuple[trio.Process, httpx.AsyncClient]]:
    proc, base = await start_service(url, sim_url, cwd, name=name,
                                     env_extra={"SERVICE_SHUTDOWN_DRAIN": "1", **env})
    try:
        async with httpx.AsyncClient(base_url=base, timeout=GUARD) as http:
            yield proc, http
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(GUARD, shield=True):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()


async def _start_stream(http: httpx.AsyncClient, into: list[dict[str, Any]],
                        tokens: trio.Event) -> None:
    """A native run streamed on ``http`` (on_disconnect: continue); frames into ``into``."""
    conv = (await http.post("/api/conversations", json={})).json()["id"]
    buf = ""
    try:
        async with http.stream("POST", f"/api/conversations/{conv}/messages",
                               json={"content": "go", "stream": True,
                                     "on_disconnect": "continue"}) as r:
            async for chunk in r.aiter_text():
                buf += chunk
                if buf.count("event: token") >= 3:
                    tokens.set()
    except httpx.HTTPError:
        pass  # its instance was killed
    whole = buf[: buf.rfind("\n\n") + 2] if "\n\n" in buf else ""
    into.extend(f for f in parse_sse(whole) if "id" in f)


async def _pending_run(http: httpx.AsyncClient) -> str:
    """The id of the run whose reply is still pending, as any instance lists it."""
    for c in (await http.get("/api/conversations")).json()["data"]:
        for m in (await http.get(f"/api/conversations/{c['id']}")).json()["messages"]:
            if m["role"] == "assistant" and m["status"] == "pending":
                return str(m["run_id"])
    raise AssertionError("no pending run")


def _ids(frames: list[dict[str, Any]]) -> list[int]:
    return [int(f["id"]) for f in frames]


async def _stream_across(http: httpx.AsyncClient, fault: Callable[[], Awaitable[None]]
                         ) -> list[dict[str, Any]]:
    """A native run streamed on ``http``, ``fault`` run once it has shown tokens; its frames."""
    frames: list[dict[str, Any]] = []
    tokens = trio.Event()
    with trio.fail_after(2 * GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_start_stream, http, frames, tokens)
            await tokens.wait()
            await fault()
    return frames


async def _ready(http: httpx.AsyncClient, status: int) -> None:
    with trio.fail_after(GUARD):
        while (await http.get("/readyz")).status_code != status:  # noqa: ASYNC110
            await trio.sleep(0.1)


async def _succeeded_as_stored(http: httpx.AsyncClient, frames: list[dict[str, Any]]) -> None:
    """The stream ended ``succeeded``, each frame once and in order, and the store holds
    every one of them as shown."""
    assert _ids(frames) == list(range(1, len(frames) + 1))
    assert frames[-1]["event"] == "run.finished"
    assert frames[-1]["data"]["status"] == "succeeded"
    r = await http.get(f"/api/runs/{frames[0]['data']['run_id']}/events")
    stored = [f for f in parse_sse(r.text) if "id" in f]
    assert [(f["id"], f["event"]) for f in stored] == [(f["id"], f["event"]) for f in frames]


@pytest.mark.slow
async def test_a_run_on_one_instance_is_followed_and_cancelled_from_another(
    tmp_path: Path, pg_url: str,  # noqa: F811 (fixture)
) -> None:
    sim = Simulator(("sim-model",), default=Reply(tokens=60, interval=0.05),
                    strict_models=False)
    async with (open_simulator(sim) as running,
                instance(pg_url, running.url, tmp_path, "a") as (_, a),
                instance(pg_url, running.url, tmp_path, "b") as (_, b)):
        # Re-join on B a run A serves: the backlog from the store, then live, to its end.
        on_a: list[dict[str, Any]] = []
        tokens = trio.Event()
        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_start_stream, a, on_a, tokens)
                await tokens.wait()
                convs = (await b.get("/api/conversations")).json()["data"]
                conv = (await b.get(f"/api/conversations/{convs[0]['id']}")).json()
                run_id = conv["messages"][-1]["run_id"]
                r = await b.get(f"/api/runs/{run_id}/events")
        on_b = [f for f in parse_sse(r.text) if "id" in f]
        assert _ids(on_b) == list(range(1, len(on_b) + 1))  # no gap, no duplicate
        assert on_b[-1]["event"] == "run.finished"
        assert on_b[-1]["data"]["status"] == "succeeded"
        assert [(f["id"], f["event"], f["data"]) for f in on_b] == [
            (f["id"], f["event"], f["data"]) for f in on_a]

        # Cancel on B a run A serves: it ends cancelled there, its upstream closed.
        on_a2: list[dict[str, Any]] = []
        tokens = trio.Event()
        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_start_stream, a, on_a2, tokens)
                await tokens.wait()
                run_id = await _pending_run(b)
                r = await b.post(f"/api/runs/{run_id}/cancel")
                assert r.status_code == 202
        assert on_a2[-1]["event"] == "run.finished"
        assert on_a2[-1]["data"]["status"] == "cancelled"
        assert (await b.get(f"/api/runs/{run_id}")).json()["status"] == "cancelled"
        stream = running.streams[-1]
        with trio.fail_after(GUARD):
            await stream.closed.wait()
        assert stream.client_gone


@pytest.mark.slow
async def test_a_killed_owners_run_is_closed_by_another_instance_with_all_it_showed(
    tmp_path: Path, pg_url: str,  # noqa: F811 (fixture)
) -> None:
    sim = Simulator(("sim-model",), default=Reply(tokens=400, interval=0.05),
                    strict_models=False)
    async with (open_simulator(sim) as running,
                instance(pg_url, running.url, tmp_path, "b") as (_, b)):
        async with instance(pg_url, running.url, tmp_path, "a") as (proc_a, a):
            on_a: list[dict[str, Any]] = []
            tokens = trio.Event()
            with trio.fail_after(GUARD):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_start_stream, a, on_a, tokens)
                    await tokens.wait()
                    await trio.sleep(0.3)
                    proc_a.kill()
        shown = "".join(f["data"]["text"] for f in on_a if f["event"] == "token")
        assert shown
        convs = (await b.get("/api/conversations")).json()["data"]
        conv = (await b.get(f"/api/conversations/{convs[0]['id']}")).json()
        run_id = conv["messages"][-1]["run_id"]
        # A cancel asked of B: its owner is gone, so B closes it at once.
        r = await b.post(f"/api/runs/{run_id}/cancel")
        assert r.status_code == 202
        assert r.json()["status"] == "failed"
        # A re-join on B gets the run's end.
        with trio.fail_after(GUARD):
            r = await b.get(f"/api/runs/{run_id}/events")
        frames = [f for f in parse_sse(r.text) if "id" in f]
        assert frames[-1]["event"] == "run.finished"
        assert frames[-1]["data"]["status"] == "failed"
        run = (await b.get(f"/api/runs/{run_id}")).json()
        assert run["status"] == "failed"
        conv = (await b.get(f"/api/conversations/{convs[0]['id']}")).json()
        assert conv["messages"][-1]["content"].startswith(shown)  # every token shown is kept


@pytest.mark.slow
async def test_a_database_restart_mid_stream_loses_nothing(
    tmp_path: Path, pg_url: str, postgres: PostgresServer,  # noqa: F811 (fixture)
) -> None:
    sim = Simulator(("sim-model",), default=Reply(tokens=80, interval=0.05),
                    strict_models=False)
    async with (open_simulator(sim) as running,
                instance(pg_url, running.url, tmp_path, "a") as (_, a)):
        async def restart() -> None:
            await trio.to_thread.run_sync(postgres.stop, "fast")
            await _ready(a, 503)
            await trio.to_thread.run_sync(postgres.start)

        frames = await _stream_across(a, restart)
        await _ready(a, 200)
        await _succeeded_as_stored(a, frames)


@pytest.mark.slow
async def test_a_database_that_stops_answering_mid_stream_is_waited_out_and_loses_nothing(
    tmp_path: Path, pg_url: str, postgres: PostgresServer,  # noqa: F811 (fixture)
) -> None:
    # Frozen (SIGSTOP: its sockets open, every byte acknowledged, nothing answered), not
    # stopped: the service cuts what it sent after SERVICE_DB_TIMEOUT + 5 s, says not ready
    # meanwhile, and holds the run's events until the database answers again.
    sim = Simulator(("sim-model",), default=Reply(tokens=80, interval=0.05),
                    strict_models=False)
    async with (open_simulator(sim) as running,
                instance(pg_url, running.url, tmp_path, "a", SERVICE_DB_TIMEOUT="1") as (_, a)):
        async def freeze() -> None:
            with frozen(postgres):
                for _ in range(3):  # each answered by /readyz's own deadline
                    with trio.fail_after(GUARD):
                        r = await a.get("/readyz")
                    assert r.status_code == 503, r.text
                    assert r.json()["down"] == ["store"]
                await trio.sleep(8)  # past the cut: the run's writes are held, retried

        frames = await _stream_across(a, freeze)
        await _ready(a, 200)
        await _succeeded_as_stored(a, frames)


@pytest.mark.slow
async def test_a_shutdown_while_the_database_is_frozen_ends_and_another_instance_closes_the_run(
    tmp_path: Path, pg_url: str, postgres: PostgresServer,  # noqa: F811 (fixture)
) -> None:
    # The drain's budget for writes the store does not take (45 s) is not waited past, the
    # exit says what was left (1), and every token shown is in the store, the run closed by
    # the next instance once the database answers.
    sim = Simulator(("sim-model",), default=Reply(tokens=200, interval=0.05),
                    strict_models=False)
    async with open_simulator(sim) as running:
        async with instance(pg_url, running.url, tmp_path, "a", SERVICE_DB_TIMEOUT="1") as (
                proc, a):
            async def stop_frozen() -> None:
                with frozen(postgres):
                    proc.send_signal(signal.SIGTERM)
                    await proc.wait()

            frames = await _stream_across(a, stop_frozen)
        assert proc.returncode == 1  # "shut down with 1 run(s) whose final state ..."
        async with instance(pg_url, running.url, tmp_path, "b") as (_, b):
            run_id = frames[0]["data"]["run_id"]
            with trio.fail_after(GUARD):
                while (await b.get(f"/api/runs/{run_id}")).json()["status"] == "running":  # noqa: ASYNC110
                    await trio.sleep(0.1)
            r = await b.get(f"/api/runs/{run_id}/events")
            stored = [(f["id"], f["event"]) for f in parse_sse(r.text) if "id" in f]
            shown = [(f["id"], f["event"]) for f in frames]
            assert stored[: len(shown)] == shown


@pytest.mark.slow
async def test_a_follower_on_another_instance_is_told_within_its_window_when_the_database_goes(
    tmp_path: Path, pg_url: str, postgres: PostgresServer,  # noqa: F811 (fixture)
) -> None:
    # B follows a run A serves; the database stops. B's reader tries the store again for two
    # keep-alive intervals, then ends the stream with one store_unavailable frame (re-join
    # later). Its first try used to wait the pool's acquire_timeout (5 s) for a connection:
    # at SERVICE_SSE_KEEPALIVE=0.25, twenty intervals without a word, past every client's
    # watchdog. What B showed before is what the store holds; a re-join gets the rest.
    sim = Simulator(("sim-model",), default=Reply(tokens=300, interval=0.05),
                    strict_models=False)
    async with (open_simulator(sim) as running,
                instance(pg_url, running.url, tmp_path, "a") as (_, a),
                instance(pg_url, running.url, tmp_path, "b",
                         SERVICE_SSE_KEEPALIVE="0.25") as (_, b)):
        on_a: list[dict[str, Any]] = []
        tokens = trio.Event()
        heard: list[float] = []  # when B's stream said anything (a frame, a keep-alive)
        body = ""
        stopped_at = 0.0
        try:
            with trio.fail_after(GUARD):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_start_stream, a, on_a, tokens)
                    await tokens.wait()
                    run_id = await _pending_run(b)
                    async with b.stream("GET", f"/api/runs/{run_id}/events") as r:
                        assert r.status_code == 200
                        async for chunk in r.aiter_text():
                            heard.append(trio.current_time())
                            body += chunk
                            if not stopped_at and body.count("event: token") >= 3:
                                await trio.to_thread.run_sync(postgres.stop, "fast")
                                stopped_at = trio.current_time()
                    nursery.cancel_scope.cancel()  # A's own stream: not this test's
        finally:
            with trio.move_on_after(GUARD, shield=True):
                await trio.to_thread.run_sync(postgres.start)
        assert stopped_at
        frames = [f for f in parse_sse(body) if "event" in f]
        assert frames[-1]["event"] == "error", frames[-3:]
        assert frames[-1]["data"]["type"] == "store_unavailable"
        after = [t for t in heard if t >= stopped_at]
        gaps = [t1 - t0 for t0, t1 in zip([stopped_at, *after], after, strict=False)]
        assert max(gaps) < 2.5, gaps  # a try bounded by the window (0.5 s), not the pool's 5 s

        # Nothing B showed is contradicted by the store; a re-join gets the rest, to the end.
        shown = [f for f in frames if "id" in f]
        await _ready(b, 200)
        with trio.fail_after(2 * GUARD):
            r = await b.get(f"/api/runs/{run_id}/events")
        whole = [f for f in parse_sse(r.text) if "id" in f]
        assert [(f["id"], f["event"], f["data"]) for f in whole[:len(shown)]] == [
            (f["id"], f["event"], f["data"]) for f in shown]
        assert _ids(whole) == list(range(1, len(whole) + 1))
        assert whole[-1]["event"] == "run.finished"
