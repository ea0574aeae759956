"""Review of multi-instance behaviour on PostgreSQL (2026-12-06, e).

Against the session's real PostgreSQL (tests/pg.py, ``pg_url``: a fresh database per test); two
stores opened on one database stand for two instances (each its own ``process_id``, its own
pool, group commit and lease), as in tests/store/test_review_postgres_dec06.py. Each test fails
on the code it was written against, for the reason its docstring gives.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import trio

from service.errors import StoreError
from service.store import RunEvent, open_store

from ..pg import slow_token_trigger

GUARD = 30  # seconds: hang guards only


def _pg(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql, args or None)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


# A token event's insert takes 0.5 s (a slow disk, a large batch): the moment two instances'
# batches overlap is then certain instead of a matter of milliseconds. Only events whose text
# is "slow" are slowed; the rest of the store is untouched.
_SLOW_TOKEN = slow_token_trigger(0.5)


async def _one_batch(store: Any, *writes: Any) -> list[object]:
    """Run ``writes`` (async callables) as one group-commit batch of ``store``, in this order
    (as a busy instance's committer and a cancel request arriving meanwhile are); each one's
    result, or the exception it raised."""
    out: list[object] = [None] * len(writes)

    async def one(i: int) -> None:
        try:
            out[i] = await writes[i]()
        except StoreError as exc:
            out[i] = exc

    done = [False] * len(writes)

    async def one_done(i: int) -> None:
        await one(i)
        done[i] = True

    async with trio.open_nursery() as nursery, store.faults.writes_held():
        for i in range(len(writes)):
            queued = store.faults.queued_writes
            nursery.start_soon(one_done, i)
            with trio.fail_after(GUARD):
                # Queued in the batch, or (a write the store runs on its own, outside the
                # group commit) already done.
                while store.faults.queued_writes == queued and not done[i]:  # noqa: ASYNC110
                    await trio.sleep(0.005)
    return out


async def test_two_instances_cancelling_each_others_runs_while_streaming_do_not_deadlock(
    pg_url: str,
) -> None:
    """Two instances behind a load balancer, each streaming a run, each asked (by a client
    the balancer sent there) to cancel the other's run: A's batch writes its run X's events
    and the cancel of B's run Y; B's batch writes Y's events and the cancel of X, at the same
    time. Both cancels must be taken (API.md: POST /api/runs/{id}/cancel -> 202) and both
    batches land.

    On the code reviewed they deadlock: an event batch locks its runs' rows FOR SHARE (the
    fence, ``postgres_events._events_sql``) for its whole transaction, and ``request_cancel``
    is an UPDATE of the other instance's run row in the same group-commit transaction. A holds
    X (share) and waits for Y; B holds Y and waits for X. PostgreSQL breaks the cycle after
    ``deadlock_timeout`` (1 s, during which every write of both instances waits) by failing
    one statement: that instance's client is answered 503 ``store_unavailable`` for a cancel
    of a healthy run in a healthy database."""
    async with open_store(pg_url) as a, open_store(pg_url) as b:
        ca, cb = await a.create_conversation(), await b.create_conversation()
        x = (await a.begin_run(ca.id, content="q", agent=None, model=None)).run.id
        y = (await b.begin_run(cb.id, content="q", agent=None, model=None)).run.id
        await trio.to_thread.run_sync(_pg, pg_url, _SLOW_TOKEN)
        now = time.time()
        x_token = RunEvent(x, 2, "token", {"text": "slow"}, now)
        y_token = RunEvent(y, 2, "token", {"text": "slow"}, now)
        got: dict[str, list[object]] = {}

        async def on(name: str, store: Any, token: RunEvent, other: str) -> None:
            got[name] = await _one_batch(
                store,
                lambda: store.append_run_events([token]),
                lambda: store.request_cancel(other, "cancelled by request"))

        start = trio.current_time()
        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(on, "a", a, x_token, y)
                nursery.start_soon(on, "b", b, y_token, x)
        took = trio.current_time() - start
        errors = [r for r in got["a"] + got["b"] if isinstance(r, Exception)]
        assert not errors, (
            f"a write of one instance failed against the other's batch ({took:.2f} s): "
            + "; ".join(f"{type(e).__name__}: {e}" for e in errors))
        assert got["a"] == [set(), True]
        assert got["b"] == [set(), True]


async def _a_statement_waits_on_a_lock(url: str) -> None:
    """Until a session of this database waits on a row lock (another's uncommitted write)."""
    def waiting() -> bool:
        return bool(_pg(url, "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                        "current_database() AND wait_event_type = 'Lock'")[0][0])

    with trio.fail_after(GUARD):
        while not await trio.to_thread.run_sync(waiting):  # noqa: ASYNC110 (polls the db)
            await trio.sleep(0.02)


async def test_a_cancel_of_a_run_whose_owner_is_mid_batch_does_not_hold_the_askers_own_runs(
    pg_url: str,
) -> None:
    """Instance A is stalled inside an event batch of its run X (a GC pause, a VM migrated, a
    slow statement: its transaction holds X's row FOR SHARE, the fence). A client asks
    instance B to cancel X. B's own run Y keeps streaming meanwhile: its events must land
    (and be shown) as usual; B's writes must not wait for A's transaction to end.

    On the code reviewed ``request_cancel`` is an UPDATE of X's row inside B's group-commit
    transaction: it waits for A's fence, and every write queued on B (Y's events, its final
    states, the /readyz write probe) waits behind it, for as long as A stays stalled: up to
    idle_in_transaction_session_timeout (5 s) for a stopped process, statement_timeout (30 s)
    for a slow statement. The recovery's claim avoids exactly this with SKIP LOCKED
    ("waiting on it would hold this whole batch", postgres_ownership._CLAIM); the cancel
    does not. Here A is held 2 s (well under the server's 5 s)."""
    async with open_store(pg_url) as a, open_store(pg_url) as b:
        ca, cb = await a.create_conversation(), await b.create_conversation()
        x = (await a.begin_run(ca.id, content="q", agent=None, model=None)).run.id
        y = (await b.begin_run(cb.id, content="q", agent=None, model=None)).run.id
        inside, release = threading.Event(), threading.Event()

        def hold() -> None:  # A's batch, written, not yet committed: A stalled
            inside.set()
            release.wait(GUARD)

        a.faults.before_commit = hold
        cancelled: list[object] = []
        landed: list[float] = []

        async def cancel_on_b() -> None:
            cancelled.append(await b.request_cancel(x, "cancelled by request"))

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.append_run_events, [RunEvent(x, 2, "token", {"text": "a"},
                                                                  time.time())])
                await trio.to_thread.run_sync(inside.wait, GUARD)
                a.faults.before_commit = None
                nursery.start_soon(cancel_on_b)
                try:
                    await _a_statement_waits_on_a_lock(pg_url)  # B's cancel waits on A
                    start = trio.current_time()
                    with trio.move_on_after(2.0):
                        await b.append_run_events([RunEvent(y, 2, "token", {"text": "b"},
                                                            time.time())])
                        landed.append(trio.current_time() - start)
                finally:
                    release.set()
        assert cancelled == [True]  # (the cancel itself lands once A goes on)
        assert landed, ("B's own run's events did not land in 2 s: they waited behind a "
                        "cancel of another instance's run, for that instance's batch")
