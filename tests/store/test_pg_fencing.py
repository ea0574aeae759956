"""PostgreSQL: the fence on event batches against a survivor's recovery running at the same
moment (found by a review; each test failed before the fix). The fence was a plain read of the
run's owner in the insert's snapshot: a recovery committing mid-statement let the owner's
batch land events after the run's end, or commit a token the survivor's stored reply lacks
while the owner was told it still held the run. Now the owner's batch locks the runs it holds
(FOR SHARE) for its transaction."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import trio

from service.store import RunEvent, open_store

ELSEWHERE = "999999999:1:another-boot-id:12345:4026531836"  # lease decides, not PID


async def _wait_for_lock_waiter(url: str) -> None:
    conn = psycopg.connect(url, autocommit=True)
    try:
        for _ in range(200):
            n = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = "
                             "'Lock' AND datname = current_database()").fetchone()[0]
            if n:
                return
            await trio.sleep(0.02)
        raise AssertionError("the owner's insert never waited on the survivor's row")
    finally:
        conn.close()


async def _a_run_whose_owner_lapsed(a: Any) -> tuple[Any, Any]:
    """A run of A's with one token stored ("kept"), then A's lease lapses."""
    await a.renew_lease(15)
    conv = await a.create_conversation()
    run, *_ = await a.begin_run(conv.id, content="q", agent="chat", model=None)
    assert await a.append_run_events(
        [RunEvent(run.id, 2, "token", {"text": "kept"}, 0.0)]) == set()
    await a.renew_lease(-1)
    return conv, run


async def test_owner_retry_batch_lands_after_survivors_run_finished(pg_url: str) -> None:
    # A (owner) lost its lease while its store was away; its last batch (seq 3, 4) was refused
    # and is retried (retry=True) just as B closes the run (run.finished at seq 3).
    async with open_store(pg_url, process_id=ELSEWHERE) as a, open_store(pg_url) as b:
        _, run = await _a_run_whose_owner_lapsed(a)

        entered, release = threading.Event(), threading.Event()

        def hold() -> None:  # B's recovery transaction, before its COMMIT
            entered.set()
            release.wait(10)

        b.faults.before_commit = hold
        result: dict[str, object] = {}

        async def recover() -> None:
            result["closed"] = await b.recover_interrupted()

        async def append() -> None:
            batch = [RunEvent(run.id, 3, "token", {"text": "late"}, 0.0),
                     RunEvent(run.id, 4, "token", {"text": "later"}, 0.0)]
            result["not_held"] = await a.append_run_events(batch, retry=True)

        async with trio.open_nursery() as n:
            n.start_soon(recover)
            await trio.to_thread.run_sync(entered.wait, 10)
            b.faults.before_commit = None
            n.start_soon(append)
            await _wait_for_lock_waiter(pg_url)  # A's statement began before B's COMMIT
            release.set()

        assert result["closed"] == [run.id]
        assert result["not_held"] == {run.id}  # A is told the run is no longer its own ...
        stored = await b.list_run_events(run.id)
        # ... and nothing of A's lands after B closed the run: run.finished is the last event.
        assert [(e.seq, e.type) for e in stored] == [
            (1, "run.started"), (2, "token"), (3, "run.finished")], stored


async def test_owner_batch_committed_during_recovery_is_missing_from_the_stored_reply(
    pg_url: str,
) -> None:
    # B's recovery has read the run's tokens and is slow to finish its transaction (held here
    # by an advisory lock taken in a trigger on messages: a slow statement); A, whose lease
    # lapsed a moment ago, commits a batch meanwhile. A is told it still holds the run and
    # publishes the tokens; B then closes the run with a reply that lacks them.
    async with open_store(pg_url, process_id=ELSEWHERE) as a, open_store(pg_url) as b:
        conv, run = await _a_run_whose_owner_lapsed(a)

        gate = psycopg.connect(pg_url, autocommit=True)
        gate.execute("""
            CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_advisory_xact_lock(4242); RETURN NEW; END $$""")
        gate.execute("CREATE TRIGGER slow BEFORE UPDATE ON messages FOR EACH ROW "
                     "EXECUTE FUNCTION slow()")
        gate.execute("SELECT pg_advisory_lock(4242)")
        result: dict[str, object] = {}

        async def recover() -> None:
            result["closed"] = await b.recover_interrupted()

        async with trio.open_nursery() as n:
            n.start_soon(recover)
            await _wait_for_lock_waiter(pg_url)  # B is past its token read, in UPDATE messages
            shown = [RunEvent(run.id, 3, "token", {"text": " late"}, 0.0)]
            done = trio.Event()

            async def append() -> None:
                result["not_held"] = await a.append_run_events(shown)
                done.set()

            n.start_soon(append)
            with trio.move_on_after(2):  # A commits at once (or, fenced, waits for B)
                await done.wait()
            gate.execute("SELECT pg_advisory_unlock(4242)")
        gate.execute("DROP TRIGGER slow ON messages")
        gate.close()

        assert result["closed"] == [run.id]
        if result["not_held"] == set():  # A was told it holds the run: it publishes " late"
            (_, stored_reply) = await b.get_messages(conv.id)
            # ... so the stored reply must hold what its clients were shown.
            assert stored_reply.content == "kept late", stored_reply
