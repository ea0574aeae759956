"""PostgreSQL: the retention's prune and the reads' waits, against a real PostgreSQL
(tests/pg.py, ``pg_url``: a fresh database per test). Two stores opened on one database stand
for two instances."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
import trio

from service.store import MessageStatus, RunEvent, open_store

GUARD = 30  # seconds any wait may take before the test fails


async def _finished_runs(store: object, n: int, events: int) -> list[str]:
    """``n`` finished runs with ``events`` tokens each (old enough to be pruned)."""
    ids = []
    conv = await store.create_conversation(title="t")  # type: ignore[attr-defined]
    for _ in range(n):
        begun = await store.begin_run(conv.id, content="hi", agent=None,  # type: ignore[attr-defined]
                                      model=None)
        run_id = begun.run.id
        await store.append_run_events([  # type: ignore[attr-defined]
            RunEvent(run_id, seq, "token", {"text": "x"}, time.time())
            for seq in range(2, events + 2)])
        await store.finish_run(  # type: ignore[attr-defined]
            run_id, status="succeeded", message_id=begun.reply.id, content="x" * events,
            message_status=MessageStatus.complete, error=None, usage={},
            finished_at=time.time() - 10)
        ids.append(run_id)
    return ids


def _lock_waits(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        return int(conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'").fetchone()[0])  # type: ignore[index]


async def test_two_instances_pruning_at_once_never_wait_on_each_other(pg_url: str) -> None:
    """Instance A's prune has deleted a run's events and not committed yet (its batch still
    in its transaction) when instance B's prune starts. B must not wait on A's locks: its
    prune runs in B's group commit, so every event write queued behind it would wait too, and
    the two deleting the same rows in different orders deadlock (the database then aborts
    one). B leaves A's runs to A (``FOR UPDATE SKIP LOCKED``) and prunes the others."""
    async with open_store(pg_url) as a, open_store(pg_url) as b:
        await _finished_runs(a, 3, 20)
        inside, release = threading.Event(), threading.Event()

        def hold() -> None:  # A's prune, written and not yet committed
            inside.set()
            release.wait(GUARD)

        a.faults.before_commit = hold
        outcome: dict[str, object] = {}

        async def prune_a() -> None:
            # (The first run, and part of the second: both claimed.)
            outcome["a"] = await a.prune_events(time.time(), rows=25)

        async def prune_b() -> None:
            outcome["b"] = await b.prune_events(time.time())
            release.set()

        async def watch() -> None:  # B waiting on a lock: the defect
            while "b" not in outcome:
                if await trio.to_thread.run_sync(_lock_waits, pg_url):
                    outcome["waited"] = True
                    release.set()
                    return
                await trio.sleep(0.02)

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(prune_a)
                await trio.to_thread.run_sync(inside.wait, GUARD)
                a.faults.before_commit = None
                nursery.start_soon(prune_b)
                nursery.start_soon(watch)
        assert "waited" not in outcome, "B's prune waited on A's uncommitted prune"
        assert outcome["a"] == 20 + 1 + 5, outcome  # run 1 whole (and marked), 5 of run 2
        assert outcome["b"] == 20 + 1, outcome  # run 3, the one A had not claimed
        # Everything pruned once between them: each run's tokens gone, its kept events left.
        while await b.prune_events(time.time()):
            pass
        with psycopg.connect(pg_url) as conn:
            left = conn.execute("SELECT count(*) FROM run_events WHERE type = 'token'"
                                ).fetchone()[0]  # type: ignore[index]
            unpruned = conn.execute("SELECT count(*) FROM runs WHERE events_pruned = 0"
                                    ).fetchone()[0]  # type: ignore[index]
        assert (left, unpruned) == (0, 0)


async def test_a_read_waits_for_a_thread_no_longer_than_acquire_timeout(pg_url: str) -> None:
    """Every thread of the store's pool is busy (here its one, a write stuck in its
    transaction: a lock, a stalled server) and a read comes: it waits at most
    ``acquire_timeout`` for one, as it would for a pooled connection, and fails
    ``StoreUnavailable`` (a 503 to retry; ``/readyz`` answers). It waited at the thread limiter
    with no bound: a request held as long as the stuck write, up to ``statement_timeout`` and
    more."""
    from service.errors import StoreUnavailable

    async with open_store(pg_url, pool_size=1, acquire_timeout=0.5) as store:
        conv = await store.create_conversation(title="t")
        inside, release = threading.Event(), threading.Event()

        def hold() -> None:
            inside.set()
            release.wait(GUARD)

        store.faults.before_commit = hold
        outcome: dict[str, object] = {}

        async def write() -> None:
            await store.create_conversation(title="held")
            outcome["written"] = True

        async def read() -> None:
            try:
                await store.get_conversation(conv.id)
                outcome["read"] = "answered"
            except StoreUnavailable as exc:
                outcome["read"] = exc
            outcome["write held at the read's answer"] = not release.is_set()

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(write)
                await trio.to_thread.run_sync(inside.wait, GUARD)
                store.faults.before_commit = None
                # (Its bound is 0.5 s; this guard stays under the server's 5 s
                # idle_in_transaction_session_timeout, which would end the held write.)
                with trio.move_on_after(3):
                    await read()
                release.set()
        assert "read" in outcome, "the read waited for the write, unbounded"
        assert outcome["write held at the read's answer"], "the read waited for the write"
        assert isinstance(outcome["read"], StoreUnavailable), outcome
        assert outcome["written"]


async def test_a_delete_waits_its_turn_for_a_run_another_instances_prune_holds(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A conversation's delete prunes its runs' events in bounded writes first, skipping a
    run another instance's prune holds (``SKIP LOCKED``). That run's events went in the
    delete's last write, unbounded; now the delete takes the run's turn once that batch ends
    (within a statement's bound), so its last write has no step event left to delete."""
    monkeypatch.setattr("service.store.postgres_queries.PRUNE_ROWS", 10)
    async with open_store(pg_url) as a, open_store(pg_url) as b:
        runs = await _finished_runs(a, 3, 30)
        conv = (await a.get_run(runs[0])).conversation_id
        inside, release = threading.Event(), threading.Event()

        def hold() -> None:  # A's prune of part of run 1, written and not yet committed
            inside.set()
            release.wait(GUARD)

        tokens: list[int] = []  # token events stored, at each of B's commits

        def look() -> None:
            with psycopg.connect(pg_url) as conn:
                tokens.append(int(conn.execute(
                    "SELECT count(*) FROM run_events WHERE type = 'token'"
                ).fetchone()[0]))  # type: ignore[index]

        a.faults.before_commit = hold
        b.faults.before_commit = look
        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.prune_events, time.time(), 15)
                await trio.to_thread.run_sync(inside.wait, GUARD)
                a.faults.before_commit = None

                async def let_go() -> None:
                    await trio.sleep(1.0)
                    release.set()

                nursery.start_soon(let_go)
                await b.delete_conversation(conv)
        assert tokens[-1] == 0, f"the delete's last write took {tokens[-1]} events: {tokens}"
        for run in runs:
            assert await b.list_run_events(run) == []
