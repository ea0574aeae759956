"""What clients are told versus what the store has, under faults found by a review (each
test failed before its fix).

Real server on 127.0.0.1, real simulator upstream, faults injected only through
``store.faults``; on both stores.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from service.runs.upkeep import RECOVER_EVERY
from service.settings import Settings
from service.sim import Reply
from service.store.faults import InjectedFault

from ..e2e import GUARD, EventStream, after_tokens, e2e, read_events, tokens
from ..servers import commits_of, start_service

pytestmark = pytest.mark.both_stores


async def _wait(predicate: Any, what: str, guard: float = 3 * GUARD) -> None:
    with trio.fail_after(guard):
        while not await predicate():  # noqa: ASYNC110 (polling the store's answer)
            await trio.sleep(0.05)


async def test_rejoin_on_another_instance_gets_every_token_the_store_has(
    settings: Settings, tmp_path: Path
) -> None:
    # Instance A runs the run; instance B (another process on the same store) serves a re-join.
    # A batch of the run's tokens is refused once while in flight, and the run's final state,
    # queued behind it, lands: the store has the run's end with a hole in its events, which
    # A writes again a moment later. A client re-joining on B must still get every token the
    # store has (and will have): the stored reply is the concatenation of the tokens.
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(tokens=30, interval=0.03))
        store = env.server.services.require_store()
        sup = env.server.services.require_supervisor()
        proc, b_url = await start_service(settings.db, env.sim.url, tmp_path, name="b")
        try:
            conv = await env.conversation()
            armed = threading.Event()
            release = threading.Event()
            tick = threading.Event()  # never set: a pause in the writer thread
            calls = [0]
            handles: list[Any] = []

            # The first commit held is one of the run's tokens: not one of A's own (its
            # lease's renewal, every 5 s), which held and refused instead left no hole.
            tokens_batch = commits_of(store, "append_run_events")

            def before_commit() -> None:  # in A's writer thread, before COMMIT
                if not armed.is_set() or not (calls[0] or tokens_batch()):
                    return
                calls[0] += 1
                if calls[0] == 1:
                    # The batch in flight (tokens): held until the run has ended and its
                    # final state is on its way (before the fix: queued behind this batch,
                    # then landing without it), then refused (an I/O error).
                    deadline = time.monotonic() + 2 * GUARD
                    while not handles[0].closed:
                        assert time.monotonic() < deadline
                        tick.wait(0.005)
                    tick.wait(0.3)
                    raise InjectedFault("disk I/O error")
                if not handles[0].final_stored:
                    return  # the final state (and what goes before it) lands
                release.wait(2 * GUARD)  # then nothing more (a refused batch's retry) for now

            store.faults.before_commit = before_commit
            async with env.post_stream(conv, "go", on_disconnect="continue") as r:
                stream = EventStream(r)
                with trio.fail_after(GUARD):
                    seen = await stream.read(after_tokens(5))
                run_id = seen[0].data["run_id"]
                handles.append(sup.get(run_id))
                armed.set()
                async with httpx.AsyncClient(base_url=b_url, timeout=GUARD) as b:

                    async def stored_end() -> bool:
                        run = (await b.get(f"/api/runs/{run_id}")).json()
                        return bool(run["status"] == "succeeded")

                    await _wait(stored_end, "the run's end in the store")
                    with trio.fail_after(GUARD):
                        async with b.stream("GET", f"/api/runs/{run_id}/events") as rb:
                            rejoined = await read_events(rb)
                release.set()
                with trio.fail_after(GUARD):
                    seen += await stream.read()
            store.faults.before_commit = None
        finally:
            release.set()
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(GUARD, shield=True):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
        reply = await env.reply_of(conv, run_id)
        assert reply["status"] == "complete"
        assert "".join(tokens(seen)) == reply["content"]  # the owner's client: all of it
        assert rejoined[-1].type == "run.finished"
        # The re-join on B: every token the store has, in order, no hole.
        assert [e.id for e in rejoined] == list(range(1, len(rejoined) + 1))
        assert "".join(tokens(rejoined)) == reply["content"]


async def test_a_run_start_answered_503_leaves_no_run_running_in_the_store(
    settings: Settings, store_kind: str, request: pytest.FixtureRequest
) -> None:
    # PostgreSQL only: a COMMIT whose connection is lost while under way may have landed
    # (the store's own docstring). Here the database is restarted-like (its backend terminated)
    # while the COMMIT of a native run's first write waits: the transaction has committed
    # locally, the service is told StoreUnavailable and answers 503. The store must not then
    # keep a run "running" (and a "pending" reply) that nothing will ever end.
    if store_kind != "postgres":
        pytest.skip("an ambiguous COMMIT is PostgreSQL's")
    import psycopg

    postgres = request.getfixturevalue("postgres")
    admin = postgres.url()
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(tokens=5, interval=0.01))
        store = env.server.services.require_store()
        conv = await env.conversation()
        dbname = str(settings.db).rsplit("/", 1)[1]
        armed = threading.Event()

        def before_commit() -> None:  # in the writer thread, before the COMMIT of begin_run
            if not armed.is_set():
                return
            armed.clear()
            # The COMMIT now waits for a (missing) synchronous standby: it has committed
            # locally, and the connection is lost before the answer comes (as in a restart).
            with psycopg.connect(admin, autocommit=True) as c:
                c.execute("ALTER SYSTEM SET synchronous_standby_names = 'nosuch'")
                c.execute("SELECT pg_reload_conf()")
            deadline = time.monotonic() + GUARD
            while time.monotonic() < deadline:  # until the server has reloaded it
                with psycopg.connect(admin, autocommit=True) as c:
                    row = c.execute("SHOW synchronous_standby_names").fetchone()
                if row is not None and row[0] == "nosuch":
                    break

        def terminate_waiting_commit() -> bool:
            with psycopg.connect(admin, autocommit=True) as c:
                rows = c.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = %s "
                    "AND wait_event = 'SyncRep'", (dbname,)).fetchall()
                for (pid,) in rows:
                    c.execute("SELECT pg_terminate_backend(%s)", (pid,))
                if rows:
                    c.execute("ALTER SYSTEM RESET synchronous_standby_names")
                    c.execute("SELECT pg_reload_conf()")
                return bool(rows)

        def reset() -> None:
            with psycopg.connect(admin, autocommit=True) as c:
                c.execute("ALTER SYSTEM RESET synchronous_standby_names")
                c.execute("SELECT pg_reload_conf()")

        store.faults.before_commit = before_commit
        responses: list[httpx.Response] = []
        try:
            armed.set()
            with trio.fail_after(GUARD):
                async with trio.open_nursery() as nursery:
                    async def post() -> None:
                        responses.append(await env.client.post(
                            f"/api/conversations/{conv}/messages", json={"content": "go"}))
                    nursery.start_soon(post)
                    while not await trio.to_thread.run_sync(  # noqa: ASYNC110
                            terminate_waiting_commit):
                        await trio.sleep(0.05)
        finally:
            store.faults.before_commit = None
            with trio.move_on_after(GUARD, shield=True):
                await trio.to_thread.run_sync(reset)
        (r,) = responses
        assert r.status_code == 503, r.text  # the client is told no run was started
        assert r.json()["error"]["type"] == "store_unavailable"

        async def left_running() -> list[tuple[str, str]]:
            messages = (await env.client.get(f"/api/conversations/{conv}")).json()["messages"]
            replies = [m for m in messages if m["role"] == "assistant"]
            runs = [(await env.client.get(f"/api/runs/{m['run_id']}")).json() for m in replies]
            return [(m["status"], run["status"]) for m, run in zip(replies, runs, strict=True)
                    if run["status"] in ("queued", "running")]

        # Closed by the upkeep (it looks every RECOVER_EVERY seconds), if its write landed.
        with trio.move_on_after(3 * RECOVER_EVERY):
            while await left_running():  # noqa: ASYNC110 (the store's answer)
                await trio.sleep(0.2)
        assert await left_running() == [], (
            "told 503, but the store keeps a run running that nothing will end")


@pytest.mark.slow  # a real 6 s stall
async def test_a_store_stall_under_the_final_budget_keeps_the_llm_call_record(
    settings: Settings,
) -> None:
    # The store stalls for 6 s as the run's only LLM call ends (a slow volume, a database
    # failing over): under the 15 s the run's end is given, so the run is stored succeeded,
    # with usage saying it made one LLM call. The interceptor's record of that call must be
    # in the store too: /api/llm-calls?run_id= is the only account of it.
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(tokens=6, interval=0.05))
        store = env.server.services.require_store()
        conv = await env.conversation()
        async with env.post_stream(conv, "go", on_disconnect="continue") as r:
            stream = EventStream(r)
            with trio.fail_after(GUARD):
                seen = await stream.read(after_tokens(2))
            await store.faults.hold_writes()  # a batch in progress: writes queue behind it
            try:
                await trio.sleep(6.0)
            finally:
                store.faults.release_writes()
            with trio.fail_after(GUARD):
                seen += await stream.read()
        run_id = seen[0].data["run_id"]
        assert seen[-1].type == "run.finished"
        assert seen[-1].data["status"] == "succeeded"
        run = (await env.client.get(f"/api/runs/{run_id}")).json()
        assert (run["status"], run["usage"]["llm_calls"]) == ("succeeded", 1)
        calls = await env.llm_calls(run_id)
        assert len(calls) == 1, f"run stored with 1 LLM call; /api/llm-calls has {calls}"
        assert calls[0]["outcome"] == "ok"
