"""A review of the ends of a run that are not a normal finish (explicit cancels, deadlines, clients
leaving, shutdowns, deletes): defects where a client's leaving or its cancel does not stop the
run and its upstream generation promptly. Each test fails on the code it was written against.

Real servers on 127.0.0.1 (the app under hypercorn on port 0) with the real simulator upstream
the lifespan builds from the settings (tests/e2e.py); the simulator says when the service closed
its upstream connection. Store faults only through ``store.faults``. Every test runs on SQLite
and on PostgreSQL.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

from service.errors import StoreUnavailable
from service.settings import Settings
from service.sim import Reply as SimReply
from service.store.faults import InjectedFault

from .e2e import EventStream, after_tokens, e2e
from .servers import commits_of

pytestmark = pytest.mark.both_stores

GUARD = 30  # seconds any wait may take before the test fails
PROMPT = 1.0  # seconds within which a run whose client has gone must have stopped upstream
LONG = SimReply(tokens=2000, interval=0.02)  # a 40 s answer: it is still streaming throughout


def _slow_commit(
    only: Callable[[], bool] | None = None,
) -> tuple[Callable[[], None], threading.Event, threading.Event]:
    """A ``before_commit`` fault: the next commit blocks (a slow disk, a lock wait) until
    ``release`` is set (at most 20 s); ``entered`` says it has begun. ``only``: the commits
    it holds (``servers.commits_of``), others land as usual."""
    entered, release = threading.Event(), threading.Event()

    def hook() -> None:
        if only is not None and not only():
            return
        entered.set()
        release.wait(20)

    return hook, entered, release


async def _until(flag: threading.Event) -> None:
    while not flag.is_set():  # noqa: ASYNC110 (a thread's flag)
        await trio.sleep(0.01)


async def test_a_ws_client_that_leaves_stops_its_streaming_run_at_once_whatever_else_waits(
    settings: Settings,
) -> None:
    """A WebSocket client has run A streaming (its upstream generation going) and sends a
    second message, B, whose first store write is taken into a commit that is slow (a slow
    disk, a lock wait: seconds). The client then disconnects.

    Wrong: run A goes on, with its upstream generation, for as long as B's commit takes (up
    to ``BATCH_WAIT`` = 60 s): 2 s after the disconnect A has not been told to stop
    (``cancel_reason`` None) and the simulator is still streaming to it; A's upstream is closed
    within milliseconds of the commit's release. A's cancel needs no store at all (it is in
    memory), and an SSE client leaving stops its run at once in the same store state.

    Right (the product promise, API.md ``on_disconnect: cancel``): the client's runs are
    cancelled, their upstream calls closed, promptly, whatever other work of the socket waits.

    Root cause: service/api/ws.py ``ws`` (lines 346-365): ``session.abandon`` is called only in
    the handler's ``finally``, after the socket's nursery has exited, and that nursery waits for
    every task in it, here ``start_run`` (B) in ``RunSupervisor.start`` ->
    ``Store.begin_run`` -> ``GroupCommit.submit``, which waits shielded for a write already
    taken into a batch (service/store/group_commit.py:98-103). The ``NotReading`` branch
    already abandons at once for this reason ("the runs must not wait"); a disconnect does not.
    Fix: abandon the socket's ``cancel`` runs as soon as the receive loop is cancelled (e.g.
    ``try: await session.receive_loop() finally: session.abandon(reason)`` inside the nursery).
    """
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(LONG, LONG)
        conv = await env.conversation()
        store: Any = env.server.services.require_store()
        sup = env.server.services.require_supervisor()
        url = env.server.url.replace("http://", "ws://") + "/api/ws"
        # B's first write's commit only (not a lease renewal queued while writes are held).
        hook, entered, release = _slow_commit(commits_of(store, "begin_run"))
        try:
            with trio.fail_after(GUARD):
                async with open_websocket_url(url) as ws:
                    await ws.send_message(json.dumps(
                        {"type": "message", "conversation_id": conv, "content": "first"}))
                    got: list[dict[str, Any]] = []
                    while sum(g.get("type") == "token" for g in got) < 3:
                        got.append(json.loads(await ws.get_message()))
                    run_a = got[0]["run_id"]
                    (upstream_a,) = await env.sim.wait_streams(1)
                    # B's first write joins the queue while it is held, then goes into a batch
                    # whose commit is slow.
                    await store.faults.hold_writes()
                    try:
                        await ws.send_message(json.dumps(
                            {"type": "message", "conversation_id": conv, "content": "second"}))
                        while not sup.starting_count:  # noqa: ASYNC110 (B's write is queued)
                            await trio.sleep(0.01)
                        store.faults.before_commit = hook
                    finally:
                        store.faults.release_writes()
                    await _until(entered)
                    await ws.aclose()  # the client leaves
                with trio.move_on_after(PROMPT):
                    await upstream_a.closed.wait()
                handle = sup.get(run_a)
                told_to_stop = handle is None or handle.cancel_reason is not None
                stopped = upstream_a.client_gone
        finally:
            store.faults.before_commit = None
            release.set()
    assert (told_to_stop, stopped) == (True, True), (
        f"{PROMPT:g} s after its WebSocket client left, run A still runs (cancel asked: "
        f"{told_to_stop}) and its upstream still streams (closed: {stopped}), behind another "
        "run's slow first write")


async def test_a_v1_client_that_leaves_during_a_slow_first_write_stops_the_upstream_at_once(
    settings: Settings,
) -> None:
    """``POST /v1/chat/completions`` (stream): the run's upstream request goes out while its
    first store write commits (``RunSupervisor._start_new``). That commit is slow (a slow
    disk, a lock wait) and the client disconnects meanwhile.

    Wrong: the upstream generation goes on, unread, for as long as the commit takes (2 s after
    the client left the simulator is still streaming, ~100 chunks more); it is closed within
    milliseconds of the commit's release. A client that leaves ``/v1`` a moment later (once the
    write has landed) stops it at once.

    Right (API.md: "A client that disconnects cancels the upstream generation"): cancelled
    promptly; the write lands whole all the same, and the run's final state after it.

    Root cause: service/runs/supervisor.py ``_start_new`` (lines 317-330): the caller awaits
    ``Store.write_run``, which waits shielded for a write already taken into a batch
    (service/store/group_commit.py:98-103, up to ``BATCH_WAIT`` = 60 s), and the run is
    cancelled only after that (``CancelOwnedRuns``, or the except branch, which a taken write
    never reaches). The agent's task is already streaming all that time. Fix: wait for the
    write without a shield in the caller (e.g. the write in a supervisor task, the caller
    waiting on its event) and cancel the handle ("client disconnected") as soon as the caller
    is cancelled; the final state still lands after the first write (call order).
    """
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(LONG)
        store: Any = env.server.services.require_store()
        # The run's first write's commit only: one of the instance's own (its lease's
        # renewal, every 5 s) held instead left that write queued, not committing.
        hook, entered, release = _slow_commit(commits_of(store, "begin_run"))
        store.faults.before_commit = hook
        try:
            with trio.fail_after(GUARD):
                async with trio.open_nursery() as nursery:
                    client = trio.CancelScope()

                    async def ask() -> None:
                        with client:
                            await env.client.post("/v1/chat/completions", json={
                                "messages": [{"role": "user", "content": "hi"}],
                                "stream": True})

                    nursery.start_soon(ask)
                    (upstream,) = await env.sim.wait_streams(1)  # the generation has begun
                    await _until(entered)  # ... and the run's first write is committing
                    client.cancel()  # the client leaves (httpx closes its connection)
                with trio.move_on_after(PROMPT):
                    await upstream.closed.wait()
                stopped, chunks = upstream.client_gone, upstream.chunks_sent
        finally:
            store.faults.before_commit = None
            release.set()
    assert stopped, (f"{PROMPT:g} s after the /v1 client left, its upstream generation still "
                     f"streams ({chunks} chunks sent), behind the run's slow first write")


async def test_an_http_cancel_stops_a_live_run_while_the_store_is_away(
    settings: Settings,
) -> None:
    """A run streams; the store goes away (reads and writes fail: a database restarting, a
    volume gone). The user presses Stop: ``POST /api/runs/{id}/cancel`` (what the chat page
    and the terminal client send).

    Wrong: 503 ``store_unavailable`` and the run goes on with its upstream generation (1.5 s
    later the simulator still streams to it); nothing of the cancel is kept, so the run
    ends however the store's outage ends it (``failed`` by the lease loop after half a lease,
    or ``succeeded`` if the store comes back first), never ``cancelled``. The WebSocket's
    ``cancel`` message stops the same run at once: it is in memory ("Stop works while the
    store is away", service/api/ws.py ``_Session.cancel``).

    Right (API.md: "202; the run ends ``cancelled`` promptly"): a live run of this process is
    cancelled in memory (202), its owner checked on the handle, its final state stored once
    the store takes it (the committer retries it).

    Root cause: service/api/runs.py ``cancel_run`` (line 358): it reads the run from the store
    (``get_run``, for the owner check) before it looks at the live handle, so a store that
    cannot be read makes the cancel fail. Fix: check ``supervisor.get(run_id)`` first and its
    ``owner`` against ``current_owner()`` in memory (404 if not the caller's), as the WebSocket
    does; go to the store only for a run not live here.
    """
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(LONG)
        conv = await env.conversation()
        store: Any = env.server.services.require_store()

        def read_fails(op: str) -> None:
            raise StoreUnavailable("could not connect to the database")

        def write_fails() -> None:
            raise InjectedFault("disk I/O error")

        with trio.fail_after(GUARD):
            async with env.post_stream(conv) as resp:
                seen = await EventStream(resp).read(after_tokens(3))
                run_id = seen[0].data["run_id"]
                (upstream,) = await env.sim.wait_streams(1)
                store.faults.before_read = read_fails
                store.faults.before_commit = write_fails
                try:
                    r = await env.client.post(f"/api/runs/{run_id}/cancel")
                    with trio.move_on_after(1.5):
                        await upstream.closed.wait()
                    stopped = upstream.client_gone
                finally:
                    store.faults.clear()
    assert (r.status_code, stopped) == (202, True), (
        f"Stop while the store is away: {r.status_code} {r.text}; the run's upstream "
        f"generation stopped: {stopped}")
