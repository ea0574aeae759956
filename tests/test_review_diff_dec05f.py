"""Review of the diff c1fe865..HEAD (service/): defects it introduced or left.

Real PostgreSQL (tests/pg.py's ``pg_url``: a fresh database on a real server), several
``PostgresStore``s on it as several instances of the service would be (each its own pool, its
own group commit, its own ``process_id``). A plain psycopg connection (the "gate") holds one
row for a moment, only to line the instances' transactions up the way two instances' batches
meet by chance in production (there each statement is a round trip, a batch several of them).
No part of the store is mocked.
"""

from __future__ import annotations

from typing import Any

import psycopg
import trio

from service.store import MessageStatus, open_store

ELSEWHERE = "999999999:1:another-boot-id:12345:4026531836"  # a dead instance (lease lapsed)
LIVE_1 = "999999998:1:boot-one:12345:4026531836"
LIVE_2 = "999999997:1:boot-two:12345:4026531836"
GUARD = 20  # seconds any wait here may take


async def _lock_waiters(url: str, n: int, within: float, query: str = "") -> int:
    """Wait (up to ``within`` s) until ``n`` sessions of the database wait on a lock (in a
    statement that starts with ``query``); the count seen last."""
    conn = psycopg.connect(url, autocommit=True)
    try:
        seen = 0
        with trio.move_on_after(within):
            while True:
                seen = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database() AND query LIKE %s",
                    (query + "%",)).fetchone()[0]
                if seen >= n:
                    break
                await trio.sleep(0.02)
        return seen
    finally:
        conn.close()


async def _outcome(results: dict[str, Any], name: str, call: Any) -> None:
    try:
        results[name] = await call()
    except Exception as exc:  # the store's error: kept for the assertion
        results[name] = exc


async def test_pg_a_conversations_delete_and_a_survivors_recovery_do_not_deadlock(
    pg_url: str,
) -> None:
    """Defect (introduced: ``close_interrupted`` now runs ``TOUCH_CONVERSATION``,
    service/store/ownership.py:163). A survivor's recovery takes a dead instance's run (the
    claim locks the run's row) and only then updates its conversation's row. A conversation's
    delete (``delete_conversation``) takes them the other way round: the conversation's row
    first (``SELECT ... FOR UPDATE``), then its runs (the cascade). records.py's own comment
    says the conversation must be locked before the run, "in the order a conversation's delete
    takes them" -- ``finish_run`` does, the recovery path does not.

    So a user deleting the conversation of a run whose instance died, while another instance
    closes that run, deadlocks the two transactions: PostgreSQL kills one after
    ``deadlock_timeout``, and either the DELETE is answered 503 ``store_unavailable`` or the
    recovery fails. Before the diff the recovery never locked a conversation: the delete
    simply waited for it.

    Expected: both land (the recovery closes the run, the delete then removes the
    conversation), as before: the conversation's row taken before the run's in the recovery
    too (or its touch not waiting on a row another transaction holds)."""
    async with (
        open_store(pg_url, process_id=ELSEWHERE) as dead,
        open_store(pg_url) as survivor,
        open_store(pg_url, process_id=LIVE_1) as other,
    ):
        await dead.renew_lease(15)
        conv = await dead.create_conversation()
        begun = await dead.begin_run(conv.id, content="q", agent="chat", model=None)
        await dead.renew_lease(-1)  # the instance is gone: its run is a survivor's to close

        gate = psycopg.connect(pg_url)  # an open transaction holding the conversation's row
        gate.execute("UPDATE conversations SET title = title WHERE id = %s", (conv.id,))
        results: dict[str, Any] = {}
        try:
            async with trio.open_nursery() as nursery:
                # A user deletes the conversation (another instance serves the request) ...
                nursery.start_soon(_outcome, results, "delete",
                                   lambda: other.delete_conversation(conv.id))
                assert await _lock_waiters(pg_url, 1, GUARD) >= 1
                # ... as the survivor closes the dead instance's run.
                nursery.start_soon(_outcome, results, "recover", survivor.recover_interrupted)
                await _lock_waiters(pg_url, 2, 2.0)  # (before the diff: it never waits)
                gate.commit()
        finally:
            gate.close()
        assert not isinstance(results["delete"], Exception), (
            f"the DELETE failed: {results['delete']!r} (recovery: {results['recover']!r})")
        assert not isinstance(results["recover"], Exception), (
            f"the recovery failed: {results['recover']!r}")
        assert results["recover"] == [begun.run.id]


async def test_pg_two_instances_run_ends_and_next_questions_do_not_deadlock(
    pg_url: str,
) -> None:
    """Defect (introduced: ``finish_run`` now starts with ``TOUCH_CONVERSATION``,
    postgres_queries.py:313). A run's end now locks its conversation's row, held until its
    batch commits; so do a question's ``begin_run`` and ``append_message``. Two instances
    whose batches meet with those in opposite orders deadlock: instance 1's batch ends run A
    (conversation X locked) and begins a run on Y; instance 2's batch ends run B (Y locked)
    and begins a run on X -- users whose next question lands on another instance than the
    one that answered the last. PostgreSQL kills one after ``deadlock_timeout`` (1 s, every
    write of both batches held meanwhile), and its write fails ``store_unavailable``: a
    user's question answered 503, or a run's final state refused. Before the diff a run's
    end took no conversation row: both batches landed.

    Expected: all four writes land (e.g. the conversation touched by a statement that takes
    no lock another instance's batch waits on, or batches that take conversations' rows in
    one order)."""
    async with (
        open_store(pg_url, process_id=LIVE_1) as one,
        open_store(pg_url, process_id=LIVE_2) as two,
    ):
        x = await one.create_conversation()
        y = await one.create_conversation()
        z = await one.create_conversation()
        a = await one.begin_run(x.id, content="q", agent="chat", model=None)
        b = await two.begin_run(y.id, content="q", agent="chat", model=None)

        # Two gates: the first holds each instance's write queue (a batch of its own waits on
        # conversation Z), so that each instance's next two writes go in one batch, in the
        # order they are called; the second lines those batches up past their first write.
        first = psycopg.connect(pg_url)
        first.execute("UPDATE conversations SET title = title WHERE id = %s", (z.id,))
        second = psycopg.connect(pg_url)
        second.execute("SELECT 1 FROM runs WHERE id = ANY(%s) FOR UPDATE",
                       ([a.run.id, b.run.id],))
        results: dict[str, Any] = {}

        def end(store: Any, begun: Any) -> Any:
            return lambda: store.finish_run(
                begun.run.id, status="succeeded", message_id=begun.reply.id, content="a",
                message_status=MessageStatus.complete, error=None, usage={})

        def ask(store: Any, conv: Any) -> Any:
            return lambda: store.begin_run(conv.id, content="next", agent="chat", model=None)

        def note(store: Any) -> Any:
            return lambda: store.append_message(z.id, role="user", content="n")

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_outcome, results, "note 1", note(one))
                nursery.start_soon(_outcome, results, "note 2", note(two))
                assert await _lock_waiters(pg_url, 2, GUARD) >= 2
                for name, call in (("end A", end(one, a)), ("ask Y", ask(one, y)),
                                   ("end B", end(two, b)), ("ask X", ask(two, x))):
                    nursery.start_soon(_outcome, results, name, call)
                    await trio.sleep(0.05)  # queued, in this order
                first.commit()
                assert await _lock_waiters(pg_url, 2, GUARD, "UPDATE runs") >= 2
                second.commit()
        finally:
            first.close()
            second.close()
        failed = {k: v for k, v in results.items() if isinstance(v, Exception)}
        assert not failed, f"writes failed: {failed!r}"
        assert results["end A"] is True
        assert results["end B"] is True


async def test_pg_an_owners_run_end_and_a_survivors_close_of_it_do_not_deadlock(
    pg_url: str,
) -> None:
    """Defect (introduced: the two new touches take their rows in opposite orders). An
    instance whose lease lapsed (a pause, a slow network: the case ``finish_run``'s holder
    check and the fenced event batches exist for) ends its run just as a survivor closes it.
    ``finish_run`` now locks the conversation's row first (its touch reads the run as still
    its own), then waits on the run's row, which the survivor's claim holds; the survivor,
    past its claim, waits on the conversation's row for its own touch. PostgreSQL kills one
    after ``deadlock_timeout``: the owner's final state, or the survivor's whole recovery
    batch, fails ``store_unavailable``. Before the diff the owner's end simply waited for the
    survivor's commit and was told the run was no longer its own (or landed first).

    Expected: no error; exactly one of them ends the run (the owner's ``finish_run`` True and
    nothing to recover, or False and the survivor closing it)."""
    async with (
        open_store(pg_url, process_id=ELSEWHERE) as owner,
        open_store(pg_url) as survivor,
    ):
        await owner.renew_lease(15)
        conv = await owner.create_conversation()
        begun = await owner.begin_run(conv.id, content="q", agent="chat", model=None)
        await owner.renew_lease(-1)  # its lease lapsed: the survivor takes it for gone

        gate = psycopg.connect(pg_url)  # holds the conversation's row for a moment
        gate.execute("UPDATE conversations SET title = title WHERE id = %s", (conv.id,))
        results: dict[str, Any] = {}
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_outcome, results, "finish", lambda: owner.finish_run(
                    begun.run.id, status="succeeded", message_id=begun.reply.id,
                    content="answer", message_status=MessageStatus.complete, error=None,
                    usage={}))
                await _lock_waiters(pg_url, 1, 2.0)  # (before the diff: it never waits)
                nursery.start_soon(_outcome, results, "recover", survivor.recover_interrupted)
                await _lock_waiters(pg_url, 2, 2.0)
                gate.commit()
        finally:
            gate.close()
        failed = {k: v for k, v in results.items() if isinstance(v, Exception)}
        assert not failed, f"failed: {failed!r}"
        assert (results["finish"], results["recover"]) in (
            (True, []), (False, [begun.run.id])), results
