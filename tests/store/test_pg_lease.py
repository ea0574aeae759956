"""PostgreSQL: this instance's lease is written on a connection of its own, outside the write
queue and the pool, each write bounded to a third of a lease. A renewal queued behind a slow
batch (a lock, an index build: up to statement_timeout) let a live instance's lease lapse, and a
survivor closed the runs it was serving (``tests/test_review_pg_restart.py`` has that end to
end). A real server on loopback; the locks are real transactions of another connection."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
import trio

from service.errors import StoreUnavailable
from service.store import open_store
from service.store.ownership import LEASE

GUARD = 30  # seconds any wait may take before the test fails


def _lease_left(url: str, process_id: str) -> float:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT lease_until - extract(epoch FROM clock_timestamp()) "
                           "FROM instances WHERE id = %s", (process_id,)).fetchone()
    assert row is not None
    return float(row[0])


def _hold(url: str, sql: str, held: threading.Event, release: threading.Event) -> None:
    """A transaction of another connection that holds a lock until ``release``."""
    with psycopg.connect(url) as conn:
        conn.execute(sql)  # type: ignore[arg-type]
        held.set()
        release.wait(2 * GUARD)
        conn.rollback()


@contextmanager
def _locked(url: str, sql: str) -> Iterator[None]:
    held, release = threading.Event(), threading.Event()
    thread = threading.Thread(target=_hold, args=(url, sql, held, release), daemon=True)
    thread.start()
    try:
        assert held.wait(GUARD)
        yield
    finally:
        release.set()
        thread.join(GUARD)


async def test_a_renewal_lands_while_every_write_and_pooled_connection_waits(
    pg_url: str,
) -> None:
    # Every pooled connection busy with a read that waits on a lock, and a batch of writes
    # queued behind them: the renewal neither queues with the writes nor waits for a
    # connection of the pool.
    async with open_store(pg_url, pool_size=2, statement_timeout=60) as store:
        await store.renew_lease(1)
        conv = await store.create_conversation()
        written = trio.Event()

        async def write() -> None:
            await store.create_conversation()
            written.set()

        async with trio.open_nursery() as nursery:
            with _locked(pg_url, "LOCK TABLE conversations IN ACCESS EXCLUSIVE MODE"):
                for _ in range(2):  # the pool's two connections, each waiting on the lock
                    nursery.start_soon(store.get_conversation, conv.id)
                nursery.start_soon(write)  # a write, waiting behind them
                await trio.sleep(0.5)
                with trio.fail_after(GUARD):
                    await store.renew_lease(LEASE)
                left = await trio.to_thread.run_sync(_lease_left, pg_url, store.process_id)
                overtaken = not written.is_set()
            # The lock released: the reads and the write go through.
    assert LEASE - 5 < left <= LEASE
    assert overtaken  # the write was still waiting: the renewal did not go behind it


async def test_a_renewal_that_cannot_land_fails_within_a_third_of_a_lease(
    pg_url: str,
) -> None:
    # The instances table locked (an operator's ALTER TABLE, say): the renewal fails, well
    # before the store's own statement_timeout (120 s here) and while the lease still runs,
    # so the lease loop stops this instance's runs before a survivor takes it for dead.
    async with open_store(pg_url, statement_timeout=120) as store:
        await store.renew_lease(LEASE)
        with _locked(pg_url, "LOCK TABLE instances IN ACCESS EXCLUSIVE MODE"):
            started = trio.current_time()
            with pytest.raises(StoreUnavailable):
                await store.renew_lease(LEASE)
            failed_after = trio.current_time() - started
        await store.renew_lease(LEASE)  # the lock gone: it lands again
        left = await trio.to_thread.run_sync(_lease_left, pg_url, store.process_id)
    assert LEASE / 3 - 1 <= failed_after < LEASE  # it waited for the lock, up to its bound
    assert LEASE - 5 < left <= LEASE


async def test_a_renewal_after_its_connection_was_cut_lands_on_a_new_one(pg_url: str) -> None:
    # The lease's connection, kept between renewals, cut (a database restart, a proxy's idle
    # timeout): the next renewal lands all the same, on a new connection, not a failed one.
    async with open_store(pg_url) as store:
        await store.renew_lease(1)

        def cut() -> int:
            with psycopg.connect(pg_url, autocommit=True) as conn:
                return int(conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE "
                    "query LIKE 'INSERT INTO instances%%' AND pid <> pg_backend_pid()",
                ).fetchone()[0])  # type: ignore[index]

        assert await trio.to_thread.run_sync(cut) == 1
        await trio.sleep(0.2)
        await store.renew_lease(LEASE)
        left = await trio.to_thread.run_sync(_lease_left, pg_url, store.process_id)
        await store.end_lease()

        def leases() -> list[Any]:
            with psycopg.connect(pg_url, autocommit=True) as conn:
                return conn.execute("SELECT id FROM instances WHERE id = %s",
                                    (store.process_id,)).fetchall()

        gone = await trio.to_thread.run_sync(leases)
    assert LEASE - 5 < left <= LEASE
    assert gone == []
