"""A PostgreSQL server that stops answering: frozen with a real SIGSTOP (a paused host, hung
storage), so its sockets stay open and the kernel still acknowledges every byte. The server
enforces ``statement_timeout`` only while it runs; before the store's watchdog, a query sent to
it waited for ever in a thread trio cannot cancel (a ``ping`` under ``move_on_after(20)`` was
still waiting two minutes later), and ``/readyz``, commits and the shutdown with it."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
        assert store.watchdog.cut >= 1
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
        assert waited < 8.0  # the caller's 1 s, not the watchdog's 10 s
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
                await store.aclose()  # waits for the batch in flight: the watchdog ends it
    finally:
        freeze.__exit__(None, None, None)
