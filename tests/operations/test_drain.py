"""A run whose first write is in flight when the drain begins is drained with the others."""

from __future__ import annotations

import contextlib
import sqlite3
import threading

import httpx
import trio

from service.lifespan import begin_shutdown
from service.settings import Settings

from ..fakes import Reply, ScriptedBackend
from ..servers import commits_of, running_server


async def test_a_run_whose_first_write_lands_during_the_drain_ends_stored(
    settings: Settings,
) -> None:
    # Found in review: drain() saw only registered runs; one still in its first write was
    # launched after the drain, escaped it, and was left "queued" with a "pending" reply.
    s = settings.model_copy(update={"shutdown_drain": 0.5})
    backend = ScriptedBackend(lambda req: Reply("a b c d e f g h", gap=1.0))
    entered, proceed = threading.Event(), threading.Event()
    async with running_server(s, backend, graceful_timeout=1) as srv:
        svc = srv.services
        store = svc.require_store()
        supervisor = svc.require_supervisor()
        async with srv.client() as c:
            conv = (await c.post("/api/conversations", json={})).json()["id"]

        # The run's first write only: a commit of the instance's own (its lease's renewal,
        # every 5 s) held instead let the drain begin before the run had asked to start.
        runs_first_write = commits_of(store, "begin_run")

        def hold() -> None:  # in the writer thread, before COMMIT of the run's first write
            if not runs_first_write():
                return
            store.faults.before_commit = None
            entered.set()
            proceed.wait(30)

        store.faults.before_commit = hold

        async def post() -> None:
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c2:
                with contextlib.suppress(httpx.HTTPError):
                    await c2.post(f"/api/conversations/{conv}/messages",
                                  json={"content": "q", "on_disconnect": "continue"})

        with trio.fail_after(30):
            async with trio.open_nursery() as n:
                n.start_soon(post)
                await trio.to_thread.run_sync(entered.wait, 10)
                # SIGTERM arrives now: the drain begins while the write is held ...
                n.start_soon(begin_shutdown, svc)
                while not supervisor.draining:  # noqa: ASYNC110 (no event for it)
                    await trio.sleep(0.01)
                proceed.set()  # ... and the run's first write lands during it
                while supervisor.in_flight or supervisor.starting_count:  # noqa: ASYNC110
                    await trio.sleep(0.01)
                n.cancel_scope.cancel()
    conn = sqlite3.connect(settings.db)
    runs = conn.execute("SELECT status, error FROM runs").fetchall()
    replies = conn.execute("SELECT status FROM messages WHERE role = 'assistant'").fetchall()
    conn.close()
    assert runs == [("cancelled", "shutdown")]
    assert replies == [("cancelled",)]
