"""A PostgreSQL server that stops answering: frozen with a real SIGSTOP (a paused host, hung
storage), so its sockets stay open and the kernel still acknowledges every byte. The server
enforces ``statement_timeout`` only while it runs; before each wait for its answer was bounded
(``service/store/pg_conn.py``), a query sent to it waited for ever in a thread trio cannot
cancel (a ``ping`` under ``move_on_after(20)`` was still waiting two minutes later), and
``/readyz``, commits and the shutdown with it.

And the other side of that bound: a server that answers slowly, each statement within
``statement_timeout``, is never cut, however long its transactions are in all (the first
version bounded a whole use of a connection: a slow migration, recovery or COMMIT was cut,
and a COMMIT cut so landed while its writer was told it failed)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import trio

from service.errors import StoreUnavailable
from service.store.postgres import PostgresStore

from ..pg import PostgresServer

GUARD = 60  # seconds: a hang fails the test instead of holding the suite


@contextmanager
def frozen(server: PostgresServer) -> Iterator[None]:
    """Every process of ``server`` stopped (SIGSTOP) while the block runs, then continued."""
    root = server.pid()
    assert root is not None
    pids = [root, *_children(root)]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (PostgreSQL's backends are all the postmaster's)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _store(url: str, *, connect_timeout: float = 5.0, stall_timeout: float = 2.0
           ) -> PostgresStore:
    return PostgresStore(url, statement_timeout=0.5, connect_timeout=connect_timeout,
                         stall_timeout=stall_timeout)


@pytest.mark.slow
async def test_a_commit_the_frozen_server_never_answers_fails_and_the_store_comes_back(
    pg_url: str,
    postgres: PostgresServer,
) -> None:
    async with _store(pg_url) as store:
        conv = await store.create_conversation(title="before")
        freeze = frozen(postgres)
        # Frozen between the batch's statements and its COMMIT: the COMMIT is sent, and
        # nothing comes back.
        store.faults.before_commit = freeze.__enter__
        try:
            with trio.fail_after(GUARD), pytest.raises(StoreUnavailable):
                await store.append_message(conv.id, role="user", content="during")
        finally:
            store.faults.before_commit = None
            freeze.__exit__(None, None, None)
        # The pool replaced the cut connection: the store works again, and nothing before the
        # freeze is lost.
        with trio.fail_after(GUARD):
            await store.append_message(conv.id, role="user", content="after")
            texts = [m.content for m in await store.get_messages(conv.id)]
        assert texts[-1] == "after"
        assert set(texts) <= {"during", "after"}  # the cut COMMIT may have landed: never twice
        assert texts.count("during") <= 1
        assert (await store.get_conversation(conv.id)).title == "before"


@pytest.mark.slow
async def test_a_ping_ends_at_its_callers_deadline_while_the_server_is_frozen(
    pg_url: str,
    postgres: PostgresServer,
) -> None:
    # The pool's check and the ping's query are each cut only after 10-20 s; /readyz gives up
    # after its own deadline, and must be able to.
    async with _store(pg_url, connect_timeout=10.0, stall_timeout=20.0) as store:
        await store.ping()
        with frozen(postgres):
            start = time.monotonic()
            with trio.fail_after(GUARD), trio.move_on_after(1.0) as deadline:
                await store.ping()
            waited = time.monotonic() - start
        assert deadline.cancelled_caught
        assert waited < 8.0  # the caller's 1 s, not the pool's check's 10 s
        with trio.fail_after(GUARD):
            await store.ping()  # the abandoned ping's thread ended; the store works


@pytest.mark.slow
async def test_the_listener_notices_a_frozen_server_and_listens_again_after(
    pg_url: str,
    postgres: PostgresServer,
) -> None:
    heard: list[str] = []

    async def until(payload: str, after: int) -> None:
        with trio.fail_after(GUARD):
            while payload not in heard[after:]:  # noqa: ASYNC110 (filled by another thread)
                await trio.sleep(0.05)

    async with _store(pg_url, connect_timeout=1.0) as store, trio.open_nursery() as nursery:
        nursery.start_soon(store.listen, heard.append)
        await until("*", 0)
        with frozen(postgres):
            # Quiet for 5 s, then asked to answer: it does not, so the listener says it is
            # lost (readers poll meanwhile) instead of waiting for ever.
            await until("!", 0)
        mark = len(heard)
        await until("*", mark)  # listening again
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_closing_the_store_ends_while_a_commit_waits_on_a_frozen_server(
    pg_url: str,
    postgres: PostgresServer,
) -> None:
    store = _store(pg_url)
    await store.open()
    conv = await store.create_conversation(title="t")
    freeze = frozen(postgres)
    committing = threading.Event()

    def before_commit() -> None:
        freeze.__enter__()
        committing.set()

    store.faults.before_commit = before_commit
    try:
        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:

                async def write() -> None:
                    with pytest.raises(StoreUnavailable):
                        await store.append_message(conv.id, role="user", content="x")

                nursery.start_soon(write)
                await trio.to_thread.run_sync(committing.wait)
                await store.aclose()  # waits for the batch in flight, which its bound ends
    finally:
        freeze.__exit__(None, None, None)


# -- a server that answers slowly is never cut --------------------------------------------------


def _sql(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)  # type: ignore[call-overload]


def _count(url: str, query: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(query).fetchone()  # type: ignore[call-overload]
    assert row is not None
    return int(row[0])


@pytest.mark.slow
async def test_a_migration_of_slow_statements_opens(pg_url: str) -> None:
    # Each DDL statement takes 0.2 s (a busy server), within the 1 s statement_timeout; the
    # migration's 15 or so take 3 s in all, past the 1.5 s bound on one answer.
    _sql(pg_url,
         "CREATE FUNCTION slow_ddl() RETURNS event_trigger LANGUAGE plpgsql AS "
         "$$ BEGIN PERFORM pg_sleep(0.2); END $$",
         "CREATE EVENT TRIGGER slow_ddl ON ddl_command_end EXECUTE FUNCTION slow_ddl()")
    store = PostgresStore(pg_url, statement_timeout=1.0, stall_timeout=1.5)
    with trio.fail_after(GUARD):
        await store.open()
    try:
        await store.ping()
    finally:
        await store.aclose()


@pytest.mark.slow
async def test_recovering_runs_one_slow_statement_each_succeeds(pg_url: str) -> None:
    async with PostgresStore(pg_url, statement_timeout=1.0, stall_timeout=1.5) as store:
        conv = await store.create_conversation(title="t")
        # Ten runs of a process that is gone; each run's UPDATE takes 0.3 s: within
        # statement_timeout, 3 s for the whole recovery (one write; the service's start).
        _sql(pg_url,
             "INSERT INTO runs (id, conversation_id, agent, status, created_at, process) "
             f"SELECT 'r' || g, '{conv.id}', 'chat', 'running', 0, '999999999:1' "
             "FROM generate_series(1, 10) g",
             "CREATE FUNCTION slow_row() RETURNS trigger LANGUAGE plpgsql AS "
             "$$ BEGIN PERFORM pg_sleep(0.3); RETURN NEW; END $$",
             "CREATE TRIGGER slow_row BEFORE UPDATE ON runs FOR EACH ROW "
             "WHEN (OLD.status <> NEW.status) EXECUTE FUNCTION slow_row()")
        with trio.fail_after(GUARD):
            closed = await store.recover_interrupted()
        assert len(closed) == 10


@pytest.mark.slow
async def test_a_write_whose_statements_and_commit_are_each_slow_is_not_told_it_failed(
    pg_url: str,
) -> None:
    # The message's write takes 1.2 s, its COMMIT (a deferred trigger) 1.2 s: each within the
    # 2 s statement_timeout and the 2 s bound on one answer, 2.4 s in all. Cut, the COMMIT
    # would land all the same with its writer told it failed (and a client's retry would
    # store the message twice).
    async with PostgresStore(pg_url, statement_timeout=2.0, stall_timeout=2.0) as store:
        conv = await store.create_conversation(title="t")
        _sql(pg_url,
             "CREATE FUNCTION slow_insert() RETURNS trigger LANGUAGE plpgsql AS "
             "$$ BEGIN PERFORM pg_sleep(1.2); RETURN NEW; END $$",
             "CREATE TRIGGER slow_insert BEFORE INSERT ON messages FOR EACH ROW "
             "EXECUTE FUNCTION slow_insert()",
             "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
             "$$ BEGIN PERFORM pg_sleep(1.2); RETURN NULL; END $$",
             "CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON messages "
             "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()")
        with trio.fail_after(GUARD):
            await store.append_message(conv.id, role="user", content="hello")
        assert _count(pg_url, "SELECT count(*) FROM messages WHERE content = 'hello'") == 1
