"""The PostgreSQL store (``SERVICE_DB=postgresql://user:pass@host:port/db``), on psycopg 3.

The same promises as the SQLite store (see :mod:`.base`), kept the same way:

* psycopg has no trio support, so every query runs in ``trio.to_thread.run_sync`` behind the
  store's own ``trio.CapacityLimiter`` (as many threads as the pool has connections: a thread
  never waits for a connection while one is free). Every connection has ``statement_timeout``
  set, so a stuck query cannot hold a thread for ever; threads are never abandoned.
* **Group commit**: writes queue up; the first caller to get the write lock takes the whole
  queue into one transaction on one pooled connection, each write under its own SAVEPOINT (one
  failing write does not undo the others). Writes land in the order they were called.
* **Errors**: a connection lost or refused, the server shutting down, a statement or pool
  timeout, a serialisation failure (psycopg's ``OperationalError`` family) are
  ``StoreUnavailable`` (503, worth a retry); other database errors are ``StoreError``. The pool
  replaces broken connections by itself (each is checked before it is handed out), so the store
  comes back after a database restart without being reopened.
* **The schema** is created and migrated at :meth:`open` under an advisory lock (two processes
  starting at once do not both migrate), its version kept in ``schema_version``; a newer
  version is refused before anything is written.
* Passwords are never shown: the store names its database as ``postgresql://user@host:port/db``
  and scrubs the password out of every error message it makes.

A ``COMMIT`` whose connection is lost while it is under way may have landed or not; the writer
is told ``StoreUnavailable``. The supervisor writes event batches again with ``retry=True``
(``ON CONFLICT DO NOTHING``), and a final state's events likewise, so such a retry is harmless.

Run ownership is still single-host (``runs.process``, a PID tag; see :mod:`.ownership`): several
processes on one host can share a database, several hosts cannot yet. A run coordinator with
leases (issue 14, item 3) replaces it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, ClassVar, Literal, TypeVar

import psycopg
import psycopg_pool
import trio
from psycopg.conninfo import conninfo_to_dict

from ..errors import NotFound, ServiceError, StoreError, StoreUnavailable
from ..metrics import METRICS, Metrics
from ..settings import _redact
from ..text import clean_text
from .group_commit import GroupCommit, PendingWrite
from .ownership import alive, process_tag
from .records import (
    BegunRun,
    Conversation,
    LLMCallOutcome,
    LLMCallRecord,
    Message,
    MessageStatus,
    RunEventRecord,
    RunRecord,
    begun_run,
    decode_cursor,
    encode_cursor,
    new_id,
)
from .schema import PG_MIGRATIONS

__all__ = ["PostgresStore", "describe_url"]

T = TypeVar("T")
Conn = psycopg.Connection[Any]

_ACQUIRE_STEP = 0.25  # seconds between looks at the caller's cancellation, waiting for the pool
_MIGRATION_LOCK = 0x5E7F1CE  # pg_advisory_xact_lock key: one process migrates at a time

_CONV_COLS = "id, title, system, model, agent, owner, created_at, updated_at"
_MSG_COLS = "id, conversation_id, role, content, status, run_id, error, created_at, updated_at"
_RUN_COLS = (
    "id, conversation_id, owner, agent, model, status, created_at, started_at, finished_at, "
    "error, usage"
)
_CALL_COLS = (
    "id, backend, model, outcome, started_at, run_id, queue_wait, ttft, duration, "
    "prompt_tokens, completion_tokens, tokens_estimated, error"
)
_CALL_COLS_QUALIFIED = ", ".join(f"l.{c.strip()}" for c in _CALL_COLS.split(","))
_MSG_INSERT = f"INSERT INTO messages ({_MSG_COLS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
_CONV_INSERT = f"INSERT INTO conversations ({_CONV_COLS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"


def describe_url(url: str) -> str:
    """``url`` as it may be shown: ``postgresql://user@host:port/db``, never its password."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        return _redact(url.split("?", 1)[0])
    user = f"{params['user']}@" if params.get("user") else ""
    host = str(params.get("host") or "")
    port = f":{params['port']}" if params.get("port") else ""
    return f"postgresql://{user}{host}{port}/{params.get('dbname') or ''}"


def _events_sql(ignore: bool) -> str:
    # One statement for a whole batch, however long (arrays, not a VALUES list per size).
    # An event of a run that is gone (its conversation deleted meanwhile) is dropped.
    return (
        "INSERT INTO run_events (run_id, seq, type, data, created_at) "
        "SELECT v.run_id, v.seq, v.type, v.data, v.created_at FROM unnest("
        "%s::text[], %s::int[], %s::text[], %s::text[], %s::float8[]) "
        "AS v(run_id, seq, type, data, created_at) "
        "WHERE EXISTS (SELECT 1 FROM runs WHERE id = v.run_id)"
        + (" ON CONFLICT DO NOTHING" if ignore else "")
    )


_INSERT_EVENTS = _events_sql(False)
_INSERT_EVENTS_IGNORE = _events_sql(True)


def _insert_events(c: Conn, events: Sequence[RunEventRecord], *, ignore: bool = False) -> None:
    cols: tuple[list[Any], ...] = ([], [], [], [], [])
    for e in events:
        raw = e.raw if e.raw is not None else json.dumps(e.data, separators=(",", ":"))
        for col, value in zip(cols, (e.run_id, e.seq, e.type, raw, e.created_at), strict=True):
            col.append(value)
    c.execute(_INSERT_EVENTS_IGNORE if ignore else _INSERT_EVENTS, cols)


def _owner_is(owner: str | None) -> tuple[str, tuple[Any, ...]]:
    """SQLite's ``owner IS ?``, written so PostgreSQL can use its index."""
    return ("owner IS NULL", ()) if owner is None else ("owner = %s", (owner,))


def _conversation(row: Sequence[Any]) -> Conversation:
    return Conversation(*row)


def _message(row: Sequence[Any]) -> Message:
    m = list(row)
    m[4] = MessageStatus(m[4])
    return Message(*m)


def _run(row: Sequence[Any]) -> RunRecord:
    r = list(row)
    r[10] = json.loads(r[10]) if r[10] else {}
    return RunRecord(*r)


def _call(row: Sequence[Any]) -> LLMCallRecord:
    c = list(row)
    c[3] = LLMCallOutcome(c[3])
    c[11] = bool(c[11])
    return LLMCallRecord(*c)


class PostgresStore:
    """Conversations, messages, runs, run events and LLM calls in a PostgreSQL database."""

    # The keyword arguments it takes (``make_store`` passes only these on).
    OPTIONS: ClassVar[frozenset[str]] = frozenset({
        "metrics", "pool_size", "statement_timeout", "connect_timeout", "acquire_timeout",
    })

    def __init__(
        self,
        url: str,
        *,
        metrics: Metrics | None = None,
        pool_size: int = 4,
        statement_timeout: float = 30.0,
        connect_timeout: float = 5.0,
        acquire_timeout: float = 5.0,
    ) -> None:
        self._url = url
        self.url = describe_url(url)  # as it may be shown
        self._password = str(_conninfo(url).get("password") or "")
        self._metrics = metrics or METRICS
        self._pool_size = pool_size
        self._statement_timeout = statement_timeout
        self._connect_timeout = connect_timeout
        # Seconds a query waits for a pooled connection (the database away: the pool is
        # reconnecting) before it fails StoreUnavailable.
        self._acquire_timeout = acquire_timeout
        self._limiter = trio.CapacityLimiter(pool_size)
        self._run_sync = partial(trio.to_thread.run_sync, limiter=self._limiter)
        self._pool: psycopg_pool.ConnectionPool[Conn] | None = None
        self._commits: GroupCommit[Conn] = GroupCommit(self._run_batch)
        self._write_lock = self._commits.lock  # held by a batch in its thread, and by aclose
        self.process_id = process_tag(os.getpid())
        self.write_error: str | None = None
        # Test hook: called inside the writer thread, inside the transaction, before COMMIT.
        self._before_commit: Callable[[], None] | None = None

    @property
    def _queue(self) -> list[Any]:
        """The writes waiting for the next batch (tests look at it)."""
        return self._commits.queue

    def __repr__(self) -> str:
        state = "open" if self._pool is not None else "closed"
        busy = "writing" if self._write_lock.locked() else "idle"
        return f"<PostgresStore {self.url} [{state}, {busy}, {len(self._queue)} queued]>"

    # -- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        await self._run_sync(self._open_sync)

    def _connect_kwargs(self) -> dict[str, Any]:
        return {
            "autocommit": True,  # transactions are explicit: BEGIN ... COMMIT per batch
            "connect_timeout": max(1, round(self._connect_timeout)),
            "options": f"-c statement_timeout={int(self._statement_timeout * 1000)}",
            "application_name": "service",
        }

    def _open_sync(self) -> None:
        # One direct connection first: its errors say why (refused, password, no database),
        # where a pool would only time out.
        try:
            with psycopg.connect(self._url, **self._connect_kwargs()) as conn:
                self._migrate(conn)
        except psycopg.Error as exc:
            raise StoreError(f"cannot open store {self.url}: {self._scrub(exc)}") from None
        pool: psycopg_pool.ConnectionPool[Conn] = psycopg_pool.ConnectionPool(
            self._url, min_size=1, max_size=self._pool_size, open=False,
            kwargs=self._connect_kwargs(), name="service-store",
            # A connection is checked before it is handed out: after a database restart the
            # stale ones are replaced, not failed on.
            check=psycopg_pool.ConnectionPool.check_connection,
            timeout=self._acquire_timeout,
            # A database away: its reconnection backs off (1, 2, 4 s...) and gives up after
            # this; the next query then starts a fresh attempt at once.
            reconnect_timeout=10.0,
        )
        try:
            pool.open(wait=True, timeout=self._connect_timeout)
        except psycopg.Error as exc:
            pool.close()
            raise StoreError(f"cannot open store {self.url}: {self._scrub(exc)}") from None
        self._pool = pool

    @staticmethod
    def _migrate(conn: Conn) -> None:
        def version() -> int:
            # pg_tables, not to_regclass(): a plain query sees what another process committed
            # while this one waited for the advisory lock (the relation cache may not).
            if not conn.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_tables WHERE tablename = "
                "'schema_version' AND schemaname = current_schema())"
            ).fetchone()[0]:  # type: ignore[index]
                return 0
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            return int(row[0]) if row else 0

        def refuse_newer(found: int) -> None:
            if found > len(PG_MIGRATIONS):
                raise StoreError(
                    f"database schema version {found} is newer than this code "
                    f"({len(PG_MIGRATIONS)}); refusing to open")

        refuse_newer(version())  # before anything is written
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            found = version()  # again, under the lock: another process may have migrated
            refuse_newer(found)
            if found == 0:
                conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                conn.execute("DELETE FROM schema_version")
                conn.execute("INSERT INTO schema_version VALUES (0)")
            for number in range(found, len(PG_MIGRATIONS)):
                for statement in PG_MIGRATIONS[number]:
                    conn.execute(statement)  # type: ignore[call-overload]
                conn.execute("UPDATE schema_version SET version = %s", (number + 1,))

    async def aclose(self) -> None:
        # Wait for writes in flight, then close; shielded so a shutdown cannot leave it half done.
        with trio.CancelScope(shield=True):
            async with self._write_lock:
                pool, self._pool = self._pool, None
                if pool is not None:
                    await self._run_sync(partial(pool.close, timeout=5.0))

    async def __aenter__(self) -> PostgresStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- plumbing -------------------------------------------------------------------------------

    def _scrub(self, exc: BaseException | str) -> str:
        """An error's text on one line, without the password (whatever libpq chose to echo)."""
        text = " ".join(str(exc).split()) or type(exc).__name__
        if self._password:
            text = text.replace(self._password, "***")
        return _redact(text.replace(self._url, self.url))

    def _error(self, exc: BaseException, what: str) -> BaseException:
        """The service's error for a psycopg one (see the module docstring)."""
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            kind: type[StoreError] = StoreUnavailable
        elif isinstance(exc, psycopg.Error):
            kind = StoreError
        else:
            return exc
        error = kind(f"{what}: {self._scrub(exc)}")
        error.__cause__ = exc
        return error

    @contextmanager
    def _connection(self, pool: psycopg_pool.ConnectionPool[Conn]) -> Iterator[Conn]:
        """A pooled connection, in a worker thread (``pool.connection()``, but its wait can be
        cancelled). While the database is away the pool has none to give for up to
        ``acquire_timeout``; the wait goes in short steps and ends early if the calling task
        was cancelled (nothing has been sent yet: a read's caller, e.g. ``/readyz`` with its
        2 s deadline, is not held for the whole timeout). A batch of writes runs shielded,
        so its wait is not cut."""
        deadline = time.monotonic() + self._acquire_timeout
        while True:
            try:
                conn = pool.getconn(timeout=min(_ACQUIRE_STEP, self._acquire_timeout))
                break
            except psycopg_pool.PoolTimeout as exc:
                if time.monotonic() >= deadline:
                    raise psycopg_pool.PoolTimeout(
                        f"no connection to the database within {self._acquire_timeout:g} s"
                    ) from exc
                trio.from_thread.check_cancelled()
        try:
            with conn:  # commit or roll back as pool.connection() does; a pooled one stays open
                yield conn
        finally:
            pool.putconn(conn)

    async def _write(self, op: str, fn: Callable[[Conn], T]) -> T:
        """Run ``fn`` in a transaction, grouped with the writes queued beside it (see the
        module docstring; the same queue and the same cancellation rules as SQLite's)."""
        start = time.perf_counter()
        item = await self._commits.submit(fn)
        self._metrics.store_latency.labels(op).observe(time.perf_counter() - start)
        if item.error is not None:
            raise item.error
        return item.result  # type: ignore[no-any-return]

    async def _run_batch(self, batch: list[PendingWrite[Conn]]) -> None:
        pool = self._pool
        if pool is None:
            for it in batch:
                it.error = StoreError("store is closed")
        else:
            await self._run_sync(self._transaction, pool, batch)  # statement_timeout bounds it

    def _transaction(self, pool: psycopg_pool.ConnectionPool[Conn],
                     batch: list[PendingWrite[Conn]]) -> None:
        single = len(batch) == 1
        try:
            with self._connection(pool) as conn:
                # Savepoint commands go with the next one, in one round trip each (a query
                # without parameters may hold several statements): a write costs one round trip
                # more than its own statements, not two.
                conn.execute("BEGIN" if single else "BEGIN; SAVEPOINT w")
                try:
                    for n, it in enumerate(batch):
                        if single:
                            it.result = it.fn(conn)
                            continue
                        if n:
                            conn.execute("RELEASE SAVEPOINT w; SAVEPOINT w")
                        try:
                            it.result = it.fn(conn)
                        except Exception as exc:
                            if conn.broken:
                                raise  # the connection is gone: so is the whole batch
                            conn.execute("ROLLBACK TO SAVEPOINT w")
                            it.error = self._error(exc, "store write failed")
                    if self._before_commit is not None:
                        self._before_commit()
                    conn.execute("COMMIT")
                except BaseException:
                    if not conn.broken and conn.info.transaction_status != _IDLE:
                        conn.execute("ROLLBACK")
                    raise
            self.write_error = None
        except BaseException as exc:  # noqa: ASYNC103 (a worker thread: no trio.Cancelled here)
            error = self._error(exc, "store write failed")
            if not isinstance(exc, ServiceError):  # a NotFound is the caller's, not the store's
                self.write_error = self._scrub(exc)
            for it in batch:
                it.error = error
            if not isinstance(exc, Exception):
                raise

    async def _read(self, op: str, fn: Callable[[Conn], T]) -> T:
        start = time.perf_counter()
        pool = self._pool
        if pool is None:
            raise StoreError("store is closed")

        def run() -> T:
            with self._connection(pool) as conn:
                return fn(conn)

        try:
            # Not abandoned on cancel: statement_timeout bounds it, and the connection goes
            # back to the pool only once its query is over.
            result = await self._run_sync(run)
        except psycopg.Error as exc:
            raise self._error(exc, "store read failed") from exc
        self._metrics.store_latency.labels(op).observe(time.perf_counter() - start)
        return result

    async def maintain(self) -> None:
        """Nothing to do: PostgreSQL checkpoints and vacuums by itself."""
        await trio.lowlevel.checkpoint()

    async def ping(self) -> None:
        await self._read("ping", lambda c: c.execute("SELECT 1").fetchone())

    async def probe_write(self) -> None:
        now = time.time()
        await self._write("probe_write", lambda c: c.execute(
            "INSERT INTO heartbeat (id, at) VALUES (1, %s) "
            "ON CONFLICT (id) DO UPDATE SET at = EXCLUDED.at", (now,)))

    # -- conversations --------------------------------------------------------------------------

    async def create_conversation(
        self, *, title: str | None = None, system: str | None = None, model: str | None = None,
        agent: str | None = None, owner: str | None = None,
    ) -> Conversation:
        now = time.time()
        conv = Conversation(new_id("conv"), title, system, model, agent, owner, now, now)

        def fn(c: Conn) -> None:
            c.execute(_CONV_INSERT, (conv.id, title, system, model, agent, owner, now, now))

        await self._write("create_conversation", fn)
        return conv

    async def get_conversation(
        self, conversation_id: str, *, owner: str | None = None
    ) -> Conversation:
        who, args = _owner_is(owner)

        def fn(c: Conn) -> Conversation | None:
            row = c.execute(f"SELECT {_CONV_COLS} FROM conversations WHERE id = %s AND {who}",
                            (conversation_id, *args)).fetchone()
            return _conversation(row) if row else None

        conv = await self._read("get_conversation", fn)
        if conv is None:
            raise NotFound(f"no conversation {conversation_id!r}", id=conversation_id)
        return conv

    async def list_conversations(
        self, *, owner: str | None = None, limit: int = 20, before: str | None = None
    ) -> tuple[list[Conversation], str | None]:
        before_seq = decode_cursor(before) if before else None
        who, owner_args = _owner_is(owner)

        def fn(c: Conn) -> tuple[list[Conversation], str | None]:
            sql = f"SELECT seq, {_CONV_COLS} FROM conversations WHERE {who}"
            args: list[Any] = [*owner_args]
            if before_seq is not None:
                sql += " AND seq < %s"
                args.append(before_seq)
            sql += " ORDER BY seq DESC LIMIT %s"
            args.append(limit + 1)
            rows = c.execute(sql, args).fetchall()  # type: ignore[call-overload]
            page = rows[:limit]
            nxt = encode_cursor(page[-1][0]) if len(rows) > limit else None
            return [_conversation(r[1:]) for r in page], nxt

        return await self._read("list_conversations", fn)

    async def delete_conversation(
        self, conversation_id: str, *, owner: str | None = None
    ) -> None:
        who, args = _owner_is(owner)

        def fn(c: Conn) -> int:
            return c.execute(f"DELETE FROM conversations WHERE id = %s AND {who}",
                             (conversation_id, *args)).rowcount

        if not await self._write("delete_conversation", fn):
            raise NotFound(f"no conversation {conversation_id!r}", id=conversation_id)

    # -- messages -------------------------------------------------------------------------------

    async def append_message(
        self, conversation_id: str, *, role: str, content: str,
        status: MessageStatus = MessageStatus.complete, run_id: str | None = None,
    ) -> Message:
        return (await self.append_messages(conversation_id, [(role, content, status, run_id)]))[0]

    async def append_messages(
        self, conversation_id: str,
        items: Iterable[tuple[str, str, MessageStatus, str | None]],
    ) -> list[Message]:
        now = time.time()
        msgs = [
            Message(new_id("msg"), conversation_id, role, content, status, run_id, None, now, now)
            for role, content, status, run_id in items
        ]

        def fn(c: Conn) -> None:
            cur = c.execute("UPDATE conversations SET updated_at = %s WHERE id = %s",
                            (now, conversation_id))
            if cur.rowcount == 0:
                raise NotFound(f"no conversation {conversation_id!r}", id=conversation_id)
            _insert_messages(c, msgs)

        await self._write("append_message", fn)
        return msgs

    async def update_message(
        self, message_id: str, *, content: str, status: MessageStatus, error: str | None = None,
    ) -> None:
        now = time.time()

        def fn(c: Conn) -> int:
            return c.execute(
                "UPDATE messages SET content = %s, status = %s, error = %s, updated_at = %s "
                "WHERE id = %s", (content, status.value, error, now, message_id)).rowcount

        if not await self._write("update_message", fn):
            raise NotFound(f"no message {message_id!r}", id=message_id)

    async def get_messages(self, conversation_id: str) -> list[Message]:
        def fn(c: Conn) -> list[Message]:
            rows = c.execute(
                f"SELECT {_MSG_COLS} FROM messages WHERE conversation_id = %s ORDER BY seq",
                (conversation_id,)).fetchall()
            return [_message(r) for r in rows]

        return await self._read("get_messages", fn)

    # -- runs and their events ------------------------------------------------------------------

    async def create_run(
        self, conversation_id: str, *, agent: str, model: str | None,
        owner: str | None = None, run_id: str | None = None,
    ) -> RunRecord:
        now = time.time()
        run = RunRecord(run_id or new_id("run"), conversation_id, owner, agent, model, "queued",
                        now, None, None, None, {})

        def fn(c: Conn) -> None:
            c.execute(
                f"INSERT INTO runs ({_RUN_COLS}, process) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (run.id, conversation_id, owner, agent, model, "queued", now, None, None, None,
                 "{}", self.process_id))

        await self._write("create_run", fn)
        return run

    async def begin_run(
        self, conversation_id: str, *, content: str, agent: str | None, model: str | None,
        owner: str | None = None, default_model: str | None = None, run_id: str | None = None,
    ) -> BegunRun:
        now = time.time()
        run_id = run_id or new_id("run")
        user_id, reply_id = new_id("msg"), new_id("msg")
        who, args = _owner_is(owner)

        def fn(c: Conn) -> BegunRun:
            row = c.execute(f"SELECT {_CONV_COLS} FROM conversations WHERE id = %s AND {who}",
                            (conversation_id, *args)).fetchone()
            if row is None:
                raise NotFound(f"no conversation {conversation_id!r}", id=conversation_id)
            conv = _conversation(row)
            c.execute("UPDATE conversations SET updated_at = %s WHERE id = %s", (now, conv.id))
            history = [_message(r) for r in c.execute(
                f"SELECT {_MSG_COLS} FROM messages WHERE conversation_id = %s ORDER BY seq",
                (conv.id,)).fetchall()]
            begun = begun_run(run_id, user_id, reply_id, conv, history, content, agent, model,
                              owner, default_model, now)
            self._insert_run(c, begun)
            return begun

        return await self._write("begin_run", fn)

    def plan_run(
        self, *, content: str, agent: str | None, model: str | None, owner: str | None = None,
        new_conversation: dict[str, str | None] | None = None,
        default_model: str | None = None,
    ) -> BegunRun:
        now = time.time()
        f = new_conversation or {}
        conv = Conversation(new_id("conv"), f.get("title"), f.get("system"), f.get("model"),
                            f.get("agent"), owner, now, now)
        return begun_run(new_id("run"), new_id("msg"), new_id("msg"), conv, [], content, agent,
                         model, owner, default_model, now)

    async def write_run(self, begun: BegunRun) -> None:
        conv = begun.conversation

        def fn(c: Conn) -> None:
            c.execute(_CONV_INSERT, (conv.id, conv.title, conv.system, conv.model, conv.agent,
                                     conv.owner, conv.created_at, conv.updated_at))
            self._insert_run(c, begun)

        await self._write("begin_run", fn)

    def _insert_run(self, c: Conn, begun: BegunRun) -> None:
        run, now = begun.run, begun.run.created_at
        # Stored as running, from now (as SQLite's: its task starts as this write lands).
        c.execute(
            f"INSERT INTO runs ({_RUN_COLS}, process) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (run.id, run.conversation_id, run.owner, run.agent, run.model, "running", now, now,
             None, None, "{}", self.process_id))
        _insert_messages(c, [begun.user, begun.reply])
        _insert_events(c, [begun.started])

    async def finish_run(
        self, run_id: str, *, status: str, message_id: str, content: str,
        message_status: MessageStatus, error: str | None, usage: dict[str, Any],
        events: Sequence[RunEventRecord] = (),
    ) -> None:
        now = time.time()
        content, error = clean_text(content), error and clean_text(error)

        def fn(c: Conn) -> None:
            c.execute(
                "UPDATE runs SET status = %s, finished_at = %s, error = %s, usage = %s, "
                "started_at = COALESCE(started_at, %s) WHERE id = %s",
                (status, now, error, json.dumps(usage), now, run_id))
            c.execute(
                "UPDATE messages SET content = %s, status = %s, error = %s, updated_at = %s "
                "WHERE id = %s", (content, message_status.value, error, now, message_id))
            if events:
                _insert_events(c, events, ignore=True)

        await self._write("finish_run", fn)

    async def recover_interrupted(self, run_id: str | None = None) -> list[str]:
        """Close runs left in progress by a process that is gone (see SQLiteStore's)."""
        now = time.time()
        reason = "interrupted: the service stopped before the run finished"

        def find(c: Conn) -> list[str]:
            sql = "SELECT id, process FROM runs WHERE status IN ('queued', 'running')"
            rows = (c.execute(sql + " AND id = %s", (run_id,)) if run_id is not None
                    else c.execute(sql)).fetchall()
            return [rid for rid, proc in rows
                    if proc != self.process_id and not alive(proc, self.process_id)]

        candidates = await self._read("find_interrupted", find)
        if not candidates:
            return []

        def fn(c: Conn) -> list[str]:
            dead = []
            for rid in candidates:
                if not c.execute(
                    "UPDATE runs SET status = 'failed', error = %s, finished_at = %s "
                    "WHERE id = %s AND status IN ('queued', 'running')", (reason, now, rid),
                ).rowcount:
                    continue  # closed meanwhile (by another worker, or it finished)
                dead.append(rid)
                why = reason
                ended = c.execute(
                    "SELECT data FROM run_events WHERE run_id = %s AND type = 'run.finished'",
                    (rid,)).fetchone()
                if ended is not None:
                    # Its end is stored already: the store agrees with what clients were told.
                    told = json.loads(ended[0])
                    status = told.get("status", "failed")
                    c.execute("UPDATE runs SET status = %s, error = %s WHERE id = %s",
                              (status, told.get("error"), rid))
                    reply = c.execute(
                        "SELECT data FROM run_events WHERE run_id = %s AND type = 'message'",
                        (rid,)).fetchone()
                    if status == "succeeded" and reply is not None:
                        c.execute(
                            "UPDATE messages SET status = 'complete', content = %s, "
                            "updated_at = %s WHERE run_id = %s AND status = 'pending'",
                            (json.loads(reply[0]).get("content", ""), now, rid))
                        continue
                    why = told.get("error") or reason
                # The reply's text so far is in its token events: keep it.
                partial_text = "".join(
                    json.loads(data).get("text", "") for (data,) in c.execute(
                        "SELECT data FROM run_events WHERE run_id = %s AND type = 'token' "
                        "ORDER BY seq", (rid,)).fetchall())
                c.execute(
                    "UPDATE messages SET status = 'error', error = %s, content = %s, "
                    "updated_at = %s WHERE run_id = %s AND status = 'pending'",
                    (why, partial_text, now, rid))
                if ended is not None:
                    continue
                c.execute(
                    "INSERT INTO run_events (run_id, seq, type, data, created_at) "
                    "SELECT %s, COALESCE(MAX(seq), 0) + 1, 'run.finished', %s, %s "
                    "FROM run_events WHERE run_id = %s",
                    (rid, json.dumps({"status": "failed", "usage": {}, "error": reason}), now,
                     rid))
            return dead

        return await self._write("recover_interrupted", fn)

    async def update_run(
        self, run_id: str, *, status: str, started_at: float | None = None,
        finished_at: float | None = None, error: str | None = None,
        usage: dict[str, Any] | None = None,
    ) -> None:
        def fn(c: Conn) -> int:
            return c.execute(
                "UPDATE runs SET status = %s, started_at = COALESCE(%s, started_at), "
                "finished_at = COALESCE(%s, finished_at), error = COALESCE(%s, error), "
                "usage = COALESCE(%s, usage) WHERE id = %s",
                (status, started_at, finished_at, error,
                 json.dumps(usage) if usage is not None else None, run_id)).rowcount

        if not await self._write("update_run", fn):
            raise NotFound(f"no run {run_id!r}", id=run_id)

    async def get_run(self, run_id: str, *, owner: str | None = None) -> RunRecord:
        who, args = _owner_is(owner)

        def fn(c: Conn) -> RunRecord | None:
            row = c.execute(f"SELECT {_RUN_COLS} FROM runs WHERE id = %s AND {who}",
                            (run_id, *args)).fetchone()
            return _run(row) if row else None

        run = await self._read("get_run", fn)
        if run is None:
            raise NotFound(f"no run {run_id!r}", id=run_id)
        return run

    async def run_in_progress(self, run_id: str) -> Literal["here", "elsewhere"] | None:
        def fn(c: Conn) -> Literal["here", "elsewhere"] | None:
            row = c.execute(
                "SELECT process FROM runs WHERE id = %s AND status IN ('queued', 'running')",
                (run_id,)).fetchone()
            if row is None:
                return None
            if row[0] == self.process_id:
                return "here"
            return "elsewhere" if alive(row[0], self.process_id) else None

        return await self._read("run_in_progress", fn)

    async def prune_events(self, finished_before: float, rows: int = 5000) -> int:
        def fn(c: Conn) -> int:
            budget, done = rows, 0
            for (run_id,) in c.execute(
                "SELECT id FROM runs WHERE events_pruned = 0 AND finished_at IS NOT NULL "
                "AND finished_at < %s ORDER BY finished_at LIMIT 100", (finished_before,),
            ).fetchall():
                deleted = c.execute(
                    "DELETE FROM run_events WHERE run_id = %s AND seq IN (SELECT seq FROM "
                    "run_events WHERE run_id = %s AND type NOT IN ('run.started', "
                    "'run.finished') LIMIT %s)", (run_id, run_id, budget)).rowcount
                budget -= deleted
                done += deleted
                if budget <= 0:
                    break  # maybe more of this run: the next call goes on with it
                c.execute("UPDATE runs SET events_pruned = 1 WHERE id = %s", (run_id,))
                done += 1
            return done

        return await self._write("prune_events", fn)

    async def runs_in_progress(self, conversation_id: str) -> list[str]:
        def fn(c: Conn) -> list[str]:
            return [r[0] for r in c.execute(
                "SELECT id FROM runs WHERE conversation_id = %s AND status IN "
                "('queued', 'running')", (conversation_id,)).fetchall()]

        return await self._read("runs_in_progress", fn)

    async def request_cancel(self, run_id: str, reason: str) -> bool:
        def fn(c: Conn) -> bool:
            return c.execute(
                "UPDATE runs SET cancel_requested = COALESCE(cancel_requested, %s) "
                "WHERE id = %s AND status IN ('queued', 'running')", (reason, run_id),
            ).rowcount > 0

        return await self._write("request_cancel", fn)

    async def cancel_requests(self) -> list[tuple[str, str]]:
        def fn(c: Conn) -> list[tuple[str, str]]:
            return [(r[0], r[1]) for r in c.execute(
                "SELECT id, cancel_requested FROM runs WHERE status IN ('queued', 'running') "
                "AND process = %s AND cancel_requested IS NOT NULL", (self.process_id,),
            ).fetchall()]

        return await self._read("cancel_requests", fn)

    async def append_run_events(
        self, events: Sequence[RunEventRecord], *, retry: bool = False
    ) -> None:
        if not events:
            return

        def fn(c: Conn) -> None:
            _insert_events(c, events, ignore=retry)

        await self._write("append_run_events", fn)

    async def list_run_events(
        self, run_id: str, *, after: int = 0, limit: int = 10_000
    ) -> list[RunEventRecord]:
        def fn(c: Conn) -> list[RunEventRecord]:
            rows = c.execute(
                "SELECT run_id, seq, type, data, created_at FROM run_events "
                "WHERE run_id = %s AND seq > %s ORDER BY seq LIMIT %s",
                (run_id, after, limit)).fetchall()
            return [RunEventRecord(r[0], r[1], r[2], json.loads(r[3]), r[4], r[3]) for r in rows]

        return await self._read("list_run_events", fn)

    # -- LLM calls ------------------------------------------------------------------------------

    async def record_llm_call(self, rec: LLMCallRecord) -> None:
        def fn(c: Conn) -> None:
            c.execute(
                f"INSERT INTO llm_calls ({_CALL_COLS}) VALUES "
                "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (rec.id, rec.backend, rec.model, rec.outcome.value, rec.started_at, rec.run_id,
                 rec.queue_wait, rec.ttft, rec.duration, rec.prompt_tokens,
                 rec.completion_tokens, int(rec.tokens_estimated), rec.error))

        await self._write("record_llm_call", fn)

    async def list_llm_calls(
        self, *, run_id: str | None = None, limit: int = 50, owner: str | None = None
    ) -> list[LLMCallRecord]:
        sql = f"SELECT {_CALL_COLS_QUALIFIED} FROM llm_calls AS l"
        where: list[str] = []
        args: list[Any] = []
        if owner is not None:
            sql += " JOIN runs AS r ON r.id = l.run_id"
            where.append("r.owner = %s")
            args.append(owner)
        if run_id is not None:
            where.append("l.run_id = %s")
            args.append(run_id)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY l.seq DESC LIMIT %s"
        args.append(limit)

        def fn(c: Conn) -> list[LLMCallRecord]:
            return [_call(r) for r in c.execute(sql, args).fetchall()]  # type: ignore[call-overload]

        return await self._read("list_llm_calls", fn)


_IDLE = psycopg.pq.TransactionStatus.IDLE


def _conninfo(url: str) -> dict[str, Any]:
    try:
        return conninfo_to_dict(url)
    except psycopg.Error:
        return {}


def _insert_messages(c: Conn, msgs: Sequence[Message]) -> None:
    rows = [(m.id, m.conversation_id, m.role, m.content, m.status.value, m.run_id, None,
             m.created_at, m.updated_at) for m in msgs]
    if len(rows) == 1:
        c.execute(_MSG_INSERT, rows[0])  # one round trip; executemany enters pipeline mode
        return
    with c.cursor() as cur:
        cur.executemany(_MSG_INSERT, rows)


