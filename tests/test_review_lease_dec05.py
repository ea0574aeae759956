"""Review of 237da12 (PostgreSQL: this instance's lease written on a connection of its own,
outside the group commit and the pool, bounded to a third of a lease). A real server on
loopback (``pg_url``); the locks are real transactions of other connections."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import trio

from service.errors import StoreError
from service.metrics import Metrics
from service.runs.handle import RunHandle
from service.runs.upkeep import lease_loop
from service.store import open_store
from service.store.ownership import LEASE

from .store.test_pg_lease import _locked

GUARD = 30  # seconds any wait may take before the test fails


def _lease(url: str, process_id: str) -> tuple[float, float]:
    """(lease_until, the database's clock now), epoch seconds."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT lease_until, extract(epoch FROM clock_timestamp()) "
                           "FROM instances WHERE id = %s", (process_id,)).fetchone()
    assert row is not None
    return float(row[0]), float(row[1])


def _execute(url: str, sql: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[arg-type]



async def _probe_batch_held(store: Any, nursery: trio.Nursery) -> None:
    """One batch: ``/readyz``'s write probe first, then a write that waits on a lock held
    elsewhere (``conversations``), so the batch holds what the probe wrote until it lands."""
    await store.faults.hold_writes()
    nursery.start_soon(store.probe_write)
    await trio.sleep(0.1)
    nursery.start_soon(store.create_conversation)
    await trio.sleep(0.1)
    assert store.faults.queued_writes == 2
    store.faults.release_writes()
    await trio.sleep(0.5)  # the probe's write done, the insert waiting

async def test_a_write_probe_batched_before_a_slow_write_holds_up_this_instances_renewal(
    pg_url: str,
) -> None:
    """Defect: the renewal, now on its own connection, waits for a row lock that this very
    instance's own group-commit batch holds: ``/readyz``'s write probe (``probe_write``,
    ``UPDATE instances SET lease_until = lease_until WHERE id = <this process>``) is a write of
    the queue, so it locks this instance's lease row until its batch commits. A batch in
    which the probe came before a slow write (one waiting on a lock, an index build: up to
    statement_timeout, 30 s) keeps the lease row locked all that time.

    Consequence: exactly the case the commit set out to fix still happens, whenever a probe
    (``/readyz`` probes a write at most once a second, in whatever batch forms) is batched
    ahead of the slow write: every renewal fails after its 5 s bound (statement timeout
    "while updating tuple ... in relation instances"), and past half a lease the lease loop
    stops every run of this live instance ``failed``/``store_unavailable`` because of an
    unrelated slow statement. Before the commit the renewal was a write of the same queue
    and never waited on its own batch's lock.

    Root cause: service/store/postgres.py:412-430 (``_lease_write``) writes the lease row on a
    separate connection while service/store/postgres.py:552-559 (``probe_write``) still
    writes the same row inside group-commit batches (service/store/group_commit.py:63-90);
    the INSERT ... ON CONFLICT DO UPDATE of service/store/postgres_queries.py:443-453 then
    blocks on the batch's row lock (FOR NO KEY UPDATE) until LEASE_WRITE_BOUND."""
    async with open_store(pg_url, pool_size=2, statement_timeout=60) as store:
        await store.renew_lease(LEASE)
        error: StoreError | None = None
        async with trio.open_nursery() as nursery:
            with _locked(pg_url, "LOCK TABLE conversations IN ACCESS EXCLUSIVE MODE"):
                await _probe_batch_held(store, nursery)
                with trio.fail_after(GUARD):
                    try:
                        await store.renew_lease(LEASE)
                    except StoreError as exc:
                        error = exc
                until, now = await trio.to_thread.run_sync(_lease, pg_url, store.process_id)
            # The lock released: the batch commits.
    assert error is None, f"the renewal failed behind this instance's own batch: {error}"
    assert LEASE - 5 < until - now <= LEASE


async def test_the_lease_loop_stops_its_runs_only_after_its_lease_has_lapsed(
    pg_url: str,
) -> None:
    """Defect: a renewal bounded to a third of a lease does not make the lease loop stop this
    instance's runs while its lease still runs. The loop decides only when a renewal
    returns, and after a failure it sleeps a third of a lease before the next try: one
    renewal that fails at once (the database restarting and refusing connections, a
    constraint, a role's rights) followed by one that takes its whole bound (a lock, a
    server slow to answer) puts the decision at last landed + LEASE/3 + LEASE/3 + LEASE/3 =
    the lease's own end, or later.

    Consequence: a survivor may take this live instance for dead (its lease lapsed) and
    close its runs while this instance is still serving them: two instances finish one
    run, which the lease loop's docstring ("more than half a lease ... stops its runs") and
    the commit's LEASE_WRITE_BOUND comment ("fails while the lease still runs") say cannot
    happen. Here the run is stopped after the lease in the database has already ended.

    Root cause: service/runs/upkeep.py:98-116 (``lease_loop``) acts only on a renewal that
    has failed, never on one that has not landed by half a lease (the fix the earlier
    strict xfail of tests/test_review_pg_restart.py asked for beside the separate
    connection, which 237da12 left out); service/store/postgres.py:80-82 bounds each
    renewal to LEASE/3, which with the loop's LEASE/3 sleeps adds up to a whole lease."""
    async with open_store(pg_url) as store:
        handle = RunHandle(run_id="run-lease", conversation_id="conv", agent="a", model=None,
                           owner=None, message_id="msg", sink=lambda event: None)
        runs = {handle.id: handle}
        cancelled_at: float | None = None
        async with trio.open_nursery() as nursery:
            await nursery.start(lease_loop, store, lambda: runs)  # its first renewal landed
            until, _ = await trio.to_thread.run_sync(_lease, pg_url, store.process_id)
            # The next renewal (a third of a lease on) fails at once...
            await trio.to_thread.run_sync(
                _execute, pg_url, "ALTER TABLE instances ADD CONSTRAINT review_no_renewal "
                "CHECK (lease_until < 0) NOT VALID")
            await trio.sleep(LEASE / 3 + 2)
            assert handle.cancel_reason is None  # one fast failure: not half a lease yet
            # ... and the one after waits for a lock, failing after its bound.
            with _locked(pg_url, "ALTER TABLE instances DROP CONSTRAINT review_no_renewal"):
                with trio.move_on_after(LEASE):
                    while handle.cancel_reason is None:  # noqa: ASYNC110 (set by a sync call)
                        await trio.sleep(0.005)
                    cancelled_at = time.time()
            nursery.cancel_scope.cancel()
    assert cancelled_at is not None, "the lease loop never stopped the run"
    assert cancelled_at < until, (
        f"the run was stopped {cancelled_at - until:.3f} s after this instance's lease "
        "had lapsed in the database")


async def test_a_renewal_that_fails_at_its_bound_is_missing_from_the_store_latency_metric(
    pg_url: str,
) -> None:
    """Defect: on PostgreSQL a lease write that fails is no longer counted in
    ``service_store_seconds{op="renew_lease"}`` (nor ``end_lease``): only those that landed
    are. Before 237da12 the renewal was a ``_write``, which observes its latency whether or
    not the write failed (service/store/postgres.py:347-352), as SQLite's store still does
    for the same op (service/store/sqlite.py:224-226).

    Consequence: the renewals that matter most to an operator, the ones that ran into their
    5 s bound and failed (the lease about to lapse, runs about to be stopped), vanish from
    the histogram: its count and sum show only the fast, successful ones, and a dashboard or
    alert on renewal latency never fires.

    Root cause: service/store/postgres.py:421-430 (``_lease_write``) observes
    ``store_latency`` only after the thread returned normally; the ``raise
    self._error(...)`` inside the lock skips it."""
    metrics = Metrics()

    def renewals() -> tuple[float, float]:
        count = total = 0.0
        for metric in metrics.store_latency.collect():
            for s in metric.samples:
                if s.labels.get("op") == "renew_lease":
                    if s.name.endswith("_count"):
                        count += s.value
                    elif s.name.endswith("_sum"):
                        total += s.value
        return count, total

    async with open_store(pg_url, metrics=metrics) as store:
        await store.renew_lease(LEASE)
        before = renewals()
        with _locked(pg_url, "LOCK TABLE instances IN ACCESS EXCLUSIVE MODE"):
            with trio.fail_after(GUARD):
                try:
                    await store.renew_lease(LEASE)
                except StoreError:
                    pass
                else:
                    raise AssertionError("the renewal landed through the lock")
        after = renewals()
    assert after[0] == before[0] + 1, "the failed renewal was not counted"
    assert after[1] - before[1] >= LEASE / 3 - 1  # the ~5 s it took
