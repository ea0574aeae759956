"""PostgreSQL: two instances beginning a run with one ``Idempotency-Key`` at once (a client's
retry landing on another instance while its first request's write is still in flight): one
run, the other told which. Two stores opened on one database stand for the two instances."""

from __future__ import annotations

import threading

import psycopg
import pytest
import trio

from service.errors import AlreadyBegun
from service.store import open_store

GUARD = 30  # seconds any wait may take before the test fails


def _lock_waits(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        return int(conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'").fetchone()[0])  # type: ignore[index]


async def test_two_instances_beginning_with_one_key_begin_one_run(pg_url: str) -> None:
    async with open_store(pg_url) as a, open_store(pg_url) as b:
        conv = (await a.create_conversation()).id
        inside, release = threading.Event(), threading.Event()

        def hold() -> None:  # A's begin, written and not yet committed
            inside.set()
            release.wait(GUARD)

        a.faults.before_commit = hold
        outcome: dict[str, object] = {}

        async def begin_a() -> None:
            outcome["a"] = (await a.begin_run(conv, content="q", agent="chat", model=None,
                                              idempotency_key="k")).run.id

        async def begin_b() -> None:
            try:
                await b.begin_run(conv, content="q", agent="chat", model=None,
                                  idempotency_key="k")
            except AlreadyBegun as exc:
                outcome["b"] = exc

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(begin_a)
                await trio.to_thread.run_sync(inside.wait, GUARD)
                a.faults.before_commit = None
                nursery.start_soon(begin_b)
                while True:  # until B's write waits on the conversation's row
                    if await trio.to_thread.run_sync(_lock_waits, pg_url):
                        break
                    await trio.sleep(0.02)
                release.set()
        told = outcome["b"]
        assert isinstance(told, AlreadyBegun), outcome
        assert (told.run_id, told.content) == (outcome["a"], "q")
        with psycopg.connect(pg_url) as conn:
            runs = conn.execute("SELECT count(*) FROM runs").fetchone()
            messages = conn.execute("SELECT count(*) FROM messages").fetchone()
        assert (runs, messages) == ((1,), (2,))


async def test_the_key_is_refused_by_the_database_itself_if_written_twice(pg_url: str) -> None:
    # The unique index under the check: an older instance's code, or a bug, cannot give one
    # conversation two runs with one key.
    async with open_store(pg_url) as store:
        conv = (await store.create_conversation()).id
        await store.begin_run(conv, content="q", agent="chat", model=None, idempotency_key="k")
        other = await store.begin_run(conv, content="q", agent="chat", model=None)
    with psycopg.connect(pg_url) as conn, pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("UPDATE runs SET idempotency_key = 'k' WHERE id = %s", (other.run.id,))
