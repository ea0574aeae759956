"""Review (dec06k) of 4d4d1f0 (one ``acquire_timeout`` bound, ``ACQUIRE_BY``, on a PostgreSQL
store operation's waits for a worker thread and a pooled connection) and 0da359b (the embedded
server's slots from its context, ``slots_for``). Each test fails on the reviewed code because of
the defect its docstring names. The PostgreSQL one uses a real server (tests/pg.py); the time
a wait takes is stood in for by a clock the store reads (no real sleeps)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import trio
import trio.testing

import service.store.pg_conn as pg_conn_module
import service.store.postgres as postgres_module
from service.store import open_store
from service.store.postgres import PostgresStore


class _Clock:
    """``time`` as the store's modules see it, ``skew`` seconds ahead in ``monotonic``: the
    seconds an operation spent waiting for its thread, without waiting them."""

    def __init__(self) -> None:
        self.skew = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.skew

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


async def test_a_read_that_got_its_thread_as_the_bound_ran_out_is_not_refused_an_idle_connection(
    pg_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every worker thread of the store busy (a slow query, a busy instance), a read waits for
    one; the query holding it ends just as the read's ``acquire_timeout`` runs out (the thread
    is freed in the scheduler tick where the bound passes, or ~1 ms before it while the new
    thread takes that long to start). The read has its thread, and the connection that query
    gave back is idle in the pool: nothing is left to wait for.

    What a user sees: the read fails ``StoreUnavailable`` "no connection to the database within
    5 s" (a 503 on a GET, a run's events unread; a batch of writes the same: every write in it
    refused) while the pool holds an idle connection. Before 4d4d1f0 it got that connection.

    Right: a connection that is ready is handed out whatever is left of the bound; only a
    *wait* for one is cut by it.

    Root cause: ``PostgresStore._connection`` now asks ``pool.getconn(timeout=max(0.0,
    deadline - now))``, 0 once the operation's ``ACQUIRE_BY`` is spent, and psycopg_pool's
    ``_get_ready_connection`` raises ``PoolTimeout`` for a timeout <= 0 before it looks at its
    idle connections (a tiny positive one is spent the same way by getconn's own bookkeeping).
    """
    clock = _Clock()
    monkeypatch.setattr(postgres_module, "time", clock)
    monkeypatch.setattr(pg_conn_module, "time", clock)
    bound = 2.0
    async with open_store(pg_url, pool_size=1, acquire_timeout=bound) as store:
        assert isinstance(store, PostgresStore)
        conv = await store.create_conversation(title="t")
        token = trio.lowlevel.current_trio_token()
        entered = trio.Event()
        release = threading.Event()

        def slow(conn: Any) -> None:  # the query holding the store's one thread
            token.run_sync_soon(entered.set)
            release.wait(30)
            conn.execute("SELECT 1")

        answered: list[object] = []

        async def read() -> None:
            answered.append(await store.get_messages(conv.id))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store._read, "slow", slow)
                await entered.wait()
                nursery.start_soon(read)  # waits for the thread
                await trio.testing.wait_all_tasks_blocked()
                # The read has waited its whole bound for the thread; the slow query ends
                # now and gives back its thread and its connection.
                clock.skew = bound
                release.set()
    assert answered == [[]]
