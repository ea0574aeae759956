"""Review (helper dec07q): the upgrade path. Data and schemas left by older versions meeting
this session's code: the delete's pruning, the list's cut ``system``, message paging, and the
migrations (llm_calls' owner, the PostgreSQL migration lock).

Tests taking ``db`` run on both stores. Defects found are marked "Fixed (was: DEFECT)": fixed
the same session.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from service.api.models import LISTED_SYSTEM_CHARS, ConversationListItem
from service.store import (
    LLMCallOutcome,
    LLMCallRecord,
    MessageStatus,
    RunEvent,
    new_id,
    open_store,
)
from service.store.pg_migrate import MIGRATION_LOCK as _MIGRATION_LOCK
from service.store.records import (
    MESSAGES,
    PRUNE_ROWS,
    Conversation,
    decode_cursor,
    encode_cursor,
)
from service.store.schema import MIGRATIONS


class _Raw:
    """SQL straight to either store's database (``?`` placeholders), bypassing the store."""

    def __init__(self, db: Path | str) -> None:
        self._pg = isinstance(db, str)
        self._conn: Any = (psycopg.connect(db, autocommit=True) if isinstance(db, str)
                           else sqlite3.connect(db, isolation_level=None))

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        return self._conn.execute(sql.replace("?", "%s") if self._pg else sql, params)

    def scalar(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        return self.execute(sql, params).fetchone()[0]

    def close(self) -> None:
        self._conn.close()


# -- llm_calls.owner (SQLite 9, PostgreSQL 5) and old instances still serving ------------------


async def test_a_call_an_old_instance_records_after_the_migration_is_listed_by_owner(
        db: Path | str) -> None:
    """Fixed (was: DEFECT): docs/deploy.md ("Upgrades") says running old instances keep serving
    after the first new one migrated ("a migration only adds"). An old instance records its LLM
    calls with its own INSERT, which has no ``owner`` column (the column is new): the call's
    ``owner`` stays NULL. The new ``list_llm_calls(owner=...)`` filters on ``l.owner = ?`` only
    (old code joined the call's run), so every call an old instance makes during a rolling
    upgrade is missing from its key's ``GET /api/llm-calls`` for good (the migration's backfill
    ran once, before those calls).

    Code: service/store/sqlite_queries.py ``list_llm_calls`` (``l.owner = ?``),
    service/store/postgres_queries.py ``list_llm_calls`` alike; schema.py migration 9 / PG 5.
    Fix: have the database fill it (a trigger AFTER INSERT ON llm_calls WHEN NEW.owner IS NULL
    AND NEW.run_id IS NOT NULL setting it from runs, both stores, added in a new migration),
    or list ``l.owner = ? OR (l.owner IS NULL AND l.run_id IN (SELECT id FROM runs WHERE
    owner = ?))``; or say in docs/deploy.md that calls made by old instances after the
    migration are not listed per key."""
    async with open_store(db) as store:
        conv = await store.create_conversation(owner="alice")
        run = (await store.begin_run(conv.id, content="q", agent="chat", model=None,
                                     owner="alice")).run
        new_call = new_id("call")
        await store.record_llm_call(LLMCallRecord(new_call, "sim", "m", LLMCallOutcome.ok,
                                                  time.time(), run_id=run.id))
        # An old instance on the migrated database: its INSERT names no owner.
        old_call = new_id("call")
        raw = _Raw(db)
        try:
            raw.execute(
                "INSERT INTO llm_calls (id, backend, model, outcome, started_at, run_id, "
                "tokens_estimated) VALUES (?, 'sim', 'm', 'ok', ?, ?, 0)",
                (old_call, time.time(), run.id))
        finally:
            raw.close()
        assert {c.id for c in await store.list_llm_calls()} == {new_call, old_call}
        listed = {c.id for c in await store.list_llm_calls(owner="alice")}
        assert listed == {new_call, old_call}, (
            f"alice's call recorded by an old instance is missing: {listed}")


# -- PostgreSQL: two instances starting at once on a database that takes long to migrate -----


async def test_an_instance_waiting_for_anothers_long_migration_starts(pg_url: str) -> None:
    """Fixed (was: DEFECT): the PostgreSQL migration runs under ``pg_advisory_xact_lock`` on a
    connection whose ``statement_timeout`` is SERVICE_DB_TIMEOUT (30 s). A second instance
    starting while the first migrates a big database (docs/deploy.md: version 4's index over
    every message, version 5's UPDATE of every LLM call) waits on the lock *as a statement*:
    past the timeout it is cancelled and that instance fails to start ("cannot open store ...
    canceling statement due to statement timeout"). The migrating instance's own statements are
    bound alike: a CREATE INDEX or the owner backfill over 30 s fails the migration, and every
    restart then fails the same way until the timeout is raised; docs/deploy.md's upgrade notes
    say "upgrade a big database in a quiet hour" but not this.

    Here the first instance's migration is a connection holding the lock 3 s, the second a
    store with ``statement_timeout=1``.

    Code: service/store/postgres.py ``_migrate`` (the lock and every migration statement run
    under the connection's statement_timeout). Fix: ``SET LOCAL statement_timeout = 0`` (and
    a ``lock_timeout`` generous enough, or a loop with ``pg_try_advisory_xact_lock``) inside the
    migration's transaction; document in docs/deploy.md how long a migration may take."""
    async with open_store(pg_url):
        pass  # the schema exists and is current: the second open only takes the lock
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with psycopg.connect(pg_url) as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert held.wait(10)

    async def let_go() -> None:
        await trio.sleep(3.0)
        release.set()

    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(let_go)
        try:
            async with open_store(pg_url, statement_timeout=1.0):
                pass
        except Exception as exc:
            error = exc
    await trio.to_thread.run_sync(holder.join, 10)
    assert error is None, f"a second instance failed to start behind a migration: {error}"


# -- message paging over old data -------------------------------------------------------------


def _schema_7_file(path: Path, messages: int) -> str:
    """A SQLite file as version 7 left it (no messages_changed index, no llm_calls.owner):
    one conversation with ``messages`` messages, written the old way."""
    conn = sqlite3.connect(path)
    for migration in MIGRATIONS[:7]:
        for statement in migration:
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 7")
    now = time.time() - 86_400 * 90
    conv = "conv_old"
    conn.execute("INSERT INTO conversations (id, owner, title, system, model, agent, "
                 "created_at, updated_at) VALUES (?, NULL, NULL, NULL, NULL, NULL, ?, ?)",
                 (conv, now, now))
    conn.executemany(
        "INSERT INTO messages (id, conversation_id, role, content, status, run_id, error, "
        "created_at, updated_at) VALUES (?, ?, ?, ?, 'complete', NULL, NULL, ?, ?)",
        [(f"msg_old{i:04d}", conv, "user" if i % 2 == 0 else "assistant", f"m{i}",
          now + i, now + i) for i in range(messages)])
    conn.commit()
    conn.close()
    return conv


async def test_paging_messages_written_before_the_migration(tmp_path: Path) -> None:
    """Pinned (passes): messages written at schema 7 (before the messages_changed index) page
    newest-first by ``seq`` once migrated: every message once, in order, and a cursor taken
    before new messages are written still leads to the older ones only."""
    path = tmp_path / "s.db"
    conv = _schema_7_file(path, 250)
    async with open_store(path) as store:
        page, nxt = await store.message_page(conv, limit=100)
        assert [m.content for m in page] == [f"m{i}" for i in range(150, 250)]
        assert nxt is not None
        await store.append_message(conv, role="user", content="new")
        seen = [m.content for m in page]
        while nxt is not None:
            page, nxt = await store.message_page(conv, limit=100, before=nxt)
            seen = [m.content for m in page] + seen
        assert seen == [f"m{i}" for i in range(250)]
        newest, _ = await store.message_page(conv, limit=2)
        assert [m.content for m in newest] == ["m249", "new"]


def test_a_message_cursor_is_refused_as_a_cursor_of_the_conversation_list() -> None:
    """Half fixed (was: the list's cursor and a conversation's ``messages_next`` were one
    format, ``s<seq>``, so one passed for the other was taken as a position in the wrong
    table). A message cursor is ``s0<seq>`` now, which the list refuses; an older instance (a
    rolling upgrade) still reads it as the same position. A list's cursor passed to a message
    page cannot be told from a message cursor handed out before, and is read as before."""
    assert decode_cursor(encode_cursor(42)) == 42
    assert decode_cursor(encode_cursor(42, MESSAGES), MESSAGES) == 42
    assert decode_cursor(encode_cursor(42), MESSAGES) == 42  # one from before the kinds
    with pytest.raises(ValueError, match="not of this list"):
        decode_cursor(encode_cursor(42, MESSAGES))


# -- the list's cut system on old conversations -----------------------------------------------


def test_list_items_of_old_conversations() -> None:
    """Pinned (passes): an old conversation with no system (NULL), one of exactly the limit,
    and one huge (a /v1 client's) are listed as they should be."""
    def conv(system: str | None) -> Conversation:
        return Conversation("conv_x", None, system, None, None, None, 1.0, 1.0)

    assert ConversationListItem.listed(conv(None)).system is None
    exact = ConversationListItem.listed(conv("x" * LISTED_SYSTEM_CHARS))
    assert (len(exact.system or ""), exact.system_truncated) == (LISTED_SYSTEM_CHARS, False)
    huge = ConversationListItem.listed(conv("y" * 2_000_000))
    assert (len(huge.system or ""), huge.system_truncated) == (LISTED_SYSTEM_CHARS, True)


# -- a delete of a conversation whose runs were never pruned ----------------------------------


async def test_deleting_a_conversation_of_never_pruned_old_runs_is_bounded(
        db: Path | str) -> None:
    """Pinned (passes): runs finished long ago and never pruned (``events_pruned`` 0, as a
    database from before retention has them all) are pruned by the delete in writes of at most
    PRUNE_ROWS events each, and the conversation is gone after."""
    async with open_store(db) as store:
        conv = await store.create_conversation()
        for _ in range(2):
            begun = await store.begin_run(conv.id, content="q", agent="chat", model=None)
            run_id = begun.run.id
            n = 7000
            assert not await store.append_run_events([
                RunEvent.make(run_id, seq, "token", {"text": "t "}, time.time())
                for seq in range(2, n + 2)])
            assert await store.finish_run(
                run_id, status="succeeded", message_id=begun.reply.id, content="done",
                message_status=MessageStatus.complete, error=None, usage={},
                events=[RunEvent.make(run_id, n + 2, "run.finished", {}, time.time())],
                finished_at=time.time() - 86_400 * 200)
        raw = _Raw(db)
        deltas: list[int] = []
        write = store._write

        async def counting(op: str, fn: Any) -> Any:
            before = raw.scalar("SELECT count(*) FROM run_events")
            result = await write(op, fn)
            deltas.append(before - raw.scalar("SELECT count(*) FROM run_events"))
            return result

        store._write = counting
        try:
            await store.delete_conversation(conv.id)
        finally:
            store._write = write
        try:
            assert raw.scalar("SELECT count(*) FROM runs") == 0
            assert raw.scalar("SELECT count(*) FROM run_events") == 0
        finally:
            raw.close()
        assert max(deltas) <= PRUNE_ROWS, deltas
