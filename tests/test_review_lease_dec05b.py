"""Review of 237da12 and 36d2482 (PostgreSQL: this instance's lease on a connection of its own;
the lease loop's watchdog, ``_stop_runs_when_lapsing``; ``/readyz``'s probe row and
``end_lease``'s data-modifying CTE). A real server on loopback (``pg_url``); the locks are real
transactions of other connections; real time (the store's work runs in threads)."""

from __future__ import annotations

import time

import psycopg
import trio

from service.errors import StoreError
from service.runs.handle import RunHandle
from service.runs.upkeep import lease_loop
from service.store import open_store
from service.store.ownership import LEASE

from .test_review_lease_dec05 import _probe_batch_held

GUARD = 30  # seconds any wait may take before the test fails


def _handle(run_id: str) -> RunHandle:
    return RunHandle(run_id=run_id, conversation_id="conv", agent="a", model=None,
                     owner=None, message_id="msg", sink=lambda event: None)


def _lease(url: str, process_id: str) -> tuple[float, float]:
    """(lease_until, the database's clock now), epoch seconds."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT lease_until, extract(epoch FROM clock_timestamp()) "
                           "FROM instances WHERE id = %s", (process_id,)).fetchone()
    assert row is not None
    return float(row[0]), float(row[1])


def _hold_lease_row(url: str, process_id: str, seconds: float) -> None:
    """Another transaction holds this instance's lease row locked (FOR UPDATE) for
    ``seconds``: the renewal (INSERT ... ON CONFLICT DO UPDATE) waits on it; plain reads of the
    row (a survivor judging the lease) do not."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT 1 FROM instances WHERE id = %s FOR UPDATE",
                           (process_id,)).fetchone()
        assert row is not None
        time.sleep(seconds)
        conn.rollback()


def _hold_table(url: str, sql: str, held: trio.Event, release: trio.Event,
                token: trio.lowlevel.TrioToken) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(sql)  # type: ignore[arg-type]
        trio.from_thread.run_sync(held.set, trio_token=token)
        trio.from_thread.run(release.wait, trio_token=token)
        conn.rollback()


async def _lock_row_between(url: str, process_id: str, start: float, end: float) -> None:
    await trio.sleep_until(start)
    await trio.to_thread.run_sync(_hold_lease_row, url, process_id, end - trio.current_time())


async def test_the_watchdog_stops_runs_though_a_renewal_landed_within_half_a_lease(
    pg_url: str,
) -> None:
    """Defect: the watchdog stops every run of a live instance although renewals keep landing
    and its lease never comes near lapsing. It measures half a lease from the *send* time of
    the last renewal that landed (``_Lease.sent``), but the loop sends the next renewal a
    third of a lease after the previous one *returned*. The slack between the two is only
    LEASE/2 - LEASE/3 = 2.5 s, shared by two renewals' latencies, though each renewal is
    allowed LEASE_WRITE_BOUND = 5 s. Here one renewal takes ~2 s and the next ~1 s (both
    land): the watchdog fires half a second after the second one was sent, 5.5 s after the
    first one landed. (With a steady 1.3 s per renewal it fires every cycle: every run of
    the instance is stopped within 7.5 s, for ever.)

    Consequence: runs of a healthy instance end ``failed``/``store_unavailable`` ("the store
    cannot be reached; the run was stopped", logged "no renewal of its lease landed for half
    a lease") while the store is reachable and holds a lease with half a lease (7.5 s) still
    to run, renewed 5.5 s earlier: the client is told the store is unreachable, the store
    says this instance is alive.

    Root cause: service/runs/upkeep.py:102-106 (the loop sleeps LEASE/3 *after*
    ``renew_lease`` returns and records ``sent`` only then) against
    service/runs/upkeep.py:137-147 (``_stop_runs_when_lapsing`` sleeps until
    ``lease.sent + LEASE / 2``); service/store/postgres.py:82 bounds a renewal to LEASE/3,
    more than the 2.5 s the watchdog actually leaves it."""
    async with open_store(pg_url) as store:
        handle = _handle("run-healthy")
        runs = {handle.id: handle}
        stopped_with_left: float | None = None
        async with trio.open_nursery() as nursery:
            await nursery.start(lease_loop, store, lambda: runs)  # first renewal landed
            t0 = trio.current_time()
            # Renewal 1 (sent at ~t0+5) waits ~2 s and lands; renewal 2 (sent ~5 s after
            # renewal 1 returned, at ~t0+12) waits ~1 s and lands.
            nursery.start_soon(_lock_row_between, pg_url, store.process_id, t0 + 4, t0 + 7)
            nursery.start_soon(_lock_row_between, pg_url, store.process_id, t0 + 11, t0 + 13)
            with trio.move_on_after(15):
                while handle.cancel_reason is None:  # noqa: ASYNC110 (set by a sync call)
                    await trio.sleep(0.01)
                until, now = await trio.to_thread.run_sync(_lease, pg_url, store.process_id)
                stopped_with_left = until - now
            await trio.sleep_until(t0 + 14)
            until, now = await trio.to_thread.run_sync(_lease, pg_url, store.process_id)
            nursery.cancel_scope.cancel()
    assert until - now > LEASE - 3  # the renewals did land: the store holds a live lease
    assert stopped_with_left is None, (
        f"the run was stopped ({handle.cancel_reason!r}) while this instance's lease still "
        f"had {stopped_with_left:.1f} s to run and renewals were landing")


async def test_a_run_started_after_the_watchdog_fired_outlives_the_lease(pg_url: str) -> None:
    """Defect: the watchdog stops the runs once per lapse and then only waits for a renewal to
    land; a run started after that stop (the supervisor goes on accepting runs) is left to
    "the next renewal that fails". When renewals fail at their bound (the lease row locked,
    a server slow to answer) that is a third of a lease (sleep) plus a third (bound) after
    the previous failure: past the lease's end. The "fast failure then slow one" that
    36d2482 added the watchdog for is back for every run started after its first stop.

    Consequence: the run goes on ~5 s after this instance's lease has lapsed in the
    database, with no renewal landed for more than a whole lease; a survivor reading the
    lease (plain reads are not blocked by the row lock) takes the instance for dead and
    closes the run (``failed``, "interrupted") while this instance still serves it and its
    tools still act: two instances finish one run, which the lease loop's docstring says
    must never happen.

    Root cause: service/runs/upkeep.py:137-147 (``_stop_runs_when_lapsing``: after one
    ``_stop_runs`` it blocks on ``lease.landed.wait()``), leaving new runs to
    service/runs/upkeep.py:107-111 (the failure branch, reached only when a renewal has
    failed, LEASE/3 + LEASE_WRITE_BOUND after the previous one)."""
    async with open_store(pg_url) as store:
        first, second = _handle("run-before"), _handle("run-after")
        runs = {first.id: first}
        cancelled_at: float | None = None
        async with trio.open_nursery() as nursery:
            await nursery.start(lease_loop, store, lambda: runs)  # its first renewal landed
            t0 = trio.current_time()
            until, _ = await trio.to_thread.run_sync(_lease, pg_url, store.process_id)
            # Every renewal from now on waits on the lock and fails at its 5 s bound.
            nursery.start_soon(_lock_row_between, pg_url, store.process_id, t0 + 1, t0 + 26)
            with trio.fail_after(GUARD):
                while first.cancel_reason is None:  # noqa: ASYNC110 (set by a sync call)
                    await trio.sleep(0.01)
            # The first renewal has failed too (~t0+10) and the loop stopped what it held.
            await trio.sleep_until(t0 + 11)
            runs[second.id] = second  # a run started now (the lease still had ~4 s)
            with trio.move_on_after(14):
                while second.cancel_reason is None:  # noqa: ASYNC110 (set by a sync call)
                    await trio.sleep(0.01)
                cancelled_at = time.time()
            nursery.cancel_scope.cancel()
    assert cancelled_at is not None, "the run started after the watchdog's stop never stopped"
    assert cancelled_at < until, (
        f"the run started after the watchdog's stop was stopped {cancelled_at - until:.2f} s "
        "after this instance's lease had lapsed in the database")


async def test_end_lease_waits_on_this_instances_own_probe_batch_and_fails(pg_url: str) -> None:
    """Defect: ``end_lease`` now deletes this instance's ``probes`` row in the same statement
    as its lease (a data-modifying CTE), on the lease's own connection, while that row is
    written by ``/readyz``'s probe inside group-commit batches. A probe batched before a
    slow write (one waiting on a lock: up to statement_timeout, 30 s) holds the probe row
    locked until its batch commits; ``end_lease`` waits on it, hits the lease connection's
    5 s statement timeout, and the whole statement, the lease's DELETE included, fails. The
    very lock-wait that 36d2482 moved the probe off the lease row to avoid is back, at
    shutdown.

    Consequence: at shutdown (lifespan.py ``_stop_services`` ends the lease before
    ``aclose``, while a load balancer's ``/readyz`` still probes during the drain) the
    process logs "could not end this instance's lease" after 5 s of its 10 s close budget,
    and its lease stays in the store: survivors close what it left only once the lease
    lapses (up to 15 s), not "at once" as ``end_lease`` promises.

    Root cause: service/store/postgres_queries.py:455-463 (``end_lease``: ``WITH probed AS
    (DELETE FROM probes WHERE id = %s ...)``) run by service/store/postgres.py:414-434
    (``_lease_write``, a separate connection) against service/store/postgres.py:556-565
    (``probe_write``, a write of the group commit's batches)."""
    async with open_store(pg_url, pool_size=2, statement_timeout=60) as store:
        await store.renew_lease(LEASE)
        await store.probe_write()  # /readyz has probed before: the row exists
        error: StoreError | None = None
        token = trio.lowlevel.current_trio_token()
        held, release = trio.Event(), trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_in_thread, _hold_table, pg_url,
                               "LOCK TABLE conversations IN ACCESS EXCLUSIVE MODE", held,
                               release, token)
            with trio.fail_after(GUARD):
                await held.wait()
            await _probe_batch_held(store, nursery)
            with trio.fail_after(GUARD):
                try:
                    await store.end_lease()
                except StoreError as exc:
                    error = exc

            def leases() -> int:
                with psycopg.connect(pg_url, autocommit=True) as conn:
                    return int(conn.execute("SELECT count(*) FROM instances WHERE id = %s",
                                            (store.process_id,)).fetchone()[0])  # type: ignore[index]

            left = await trio.to_thread.run_sync(leases)
            release.set()  # the lock released: the batch commits
    assert error is None, f"end_lease failed behind this instance's own probe batch: {error}"
    assert left == 0, "this instance's lease is still in the store after end_lease"


async def _in_thread(fn: object, *args: object) -> None:
    await trio.to_thread.run_sync(fn, *args)  # type: ignore[arg-type]
