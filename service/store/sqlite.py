"""The SQLite store: WAL mode, every call in a worker thread, writes serialised.

This module is its engine (connections, migrations, transactions, WAL upkeep); its queries are
in :mod:`.sqlite_queries`, group commit in :mod:`.group_commit`, run ownership in
:mod:`.ownership`.

Concurrency model:

* Inside the process, writes are serialised by a ``trio.Lock`` around one writer connection;
  reads use a second connection under their own lock (WAL lets them run beside a write).
* Across processes (several hypercorn workers on one file), SQLite's own locking serialises
  writers: every write transaction starts with ``BEGIN IMMEDIATE`` and waits up to
  ``busy_timeout`` for the file lock.
* Every sqlite3 call runs in ``trio.to_thread.run_sync`` without ``abandon_on_cancel``: once a
  write has entered its thread it runs to ``COMMIT`` (or ``ROLLBACK`` on error) even if the
  calling task is cancelled, and the cancellation is delivered afterwards. A write cancelled while
  it still waits for the lock never starts. So a cancelled write lands whole or not at all.

Durability: a write is acknowledged when ``COMMIT`` has returned. In WAL mode that means the
transaction is in the WAL file; with ``synchronous=NORMAL`` (the default here) it survives the
process being killed (``kill -9``) but may be lost on power failure or an OS crash. Set
``SERVICE_DB_SYNCHRONOUS=FULL`` to fsync every commit and survive those too, at a cost in
append latency (see README's figures).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import trio

from ..errors import StoreError, StoreUnavailable
from ..metrics import METRICS, Metrics
from .faults import InjectedFault, StoreFaults
from .group_commit import GroupCommit, PendingWrite
from .ownership import process_tag
from .records import unreadable
from .schema import MIGRATIONS
from .sqlite_queries import SQLiteQueries

__all__ = ["SQLiteStore", "open_sqlite_store"]

T = TypeVar("T")


def _connect(path: Path, synchronous: str, busy_timeout: float) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves (BEGIN IMMEDIATE for writers).
    conn = sqlite3.connect(
        str(path), timeout=busy_timeout, isolation_level=None, check_same_thread=False
    )
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    return conn


WAL_SIZE_LIMIT = 64 * 1024 * 1024  # bytes the WAL is cut back to once reset (journal_size_limit)

_TIGHT_FOR = 300.0  # seconds writes keep the WAL short after the volume was last full


class SQLiteStore(SQLiteQueries):
    """Conversations, messages, runs, run events and LLM calls in one SQLite file: the write
    engine (connections, group commit, transactions, WAL upkeep) under the queries of
    :class:`~service.store.sqlite_queries.SQLiteQueries`."""

    leases_decide = False  # ``Store``: on one host a run's owner is judged by its PID

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "NORMAL",
        busy_timeout: float = 10.0,
        metrics: Metrics | None = None,
        threaded: bool = True,
        wal_size_limit: int = WAL_SIZE_LIMIT,
        process_id: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.wal_size_limit = wal_size_limit
        # threaded=False runs sqlite3 inline on the trio thread: for tests under trio's
        # autojump_clock, which would jump virtual time while a worker thread runs.
        # Its own thread limiter (writer, reader, checkpointer: at most 3 at once): threads
        # taken elsewhere (an abandoned sync tool holds one until it returns) never stall it.
        self._run_sync: Callable[..., Awaitable[Any]] = (
            partial(trio.to_thread.run_sync, limiter=trio.CapacityLimiter(4)) if threaded
            else _run_inline
        )
        self._synchronous = synchronous
        self._busy_timeout = busy_timeout
        self._metrics = metrics or METRICS
        self._commits: GroupCommit[sqlite3.Connection] = GroupCommit(self._run_batch)
        self._write_lock = self._commits.lock  # held by a batch in its thread, and by aclose
        self._checkpoint_lock = trio.Lock()
        self._checkpointer: sqlite3.Connection | None = None
        self._read_lock = trio.Lock()
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        # Runs are tagged with this, so a later start can tell runs whose process died
        # (``ownership``); given: an instance id of the caller's choosing (tests use one of
        # another host's, whose liveness only its lease tells).
        self.process_id = process_id or process_tag(os.getpid())
        self.faults = StoreFaults(self._commits)  # tests, fault drills
        self.corrupt: str | None = None  # what SQLite said when it found the file damaged
        # Why the latest write transaction failed (None once one has committed since): the
        # store cannot write now (``/readyz``). Set and cleared by the writer thread's batches.
        self.write_error: str | None = None
        # The volume filled up: until this time (monotonic) every write first folds the WAL
        # back into the database file and truncates it (see ``_transaction``).
        self._tight_until = 0.0
        self._identity: tuple[int, int] | None = None  # the file opened: (device, inode)

    @property
    def _queue(self) -> list[Any]:
        """The writes waiting for the next batch (tests look at it)."""
        return self._commits.queue

    def __repr__(self) -> str:
        state = "open" if self._writer is not None else "closed"
        busy = "writing" if self._write_lock.locked() else "idle"
        return f"<SQLiteStore {self.path} [{state}, {busy}]>"

    # -- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        await self._run_sync(self._open_sync)

    def _open_sync(self) -> None:
        if str(self.path) != ":memory:":
            # The file itself, whatever the directory is later (a chdir) or a symlink on the
            # way: what every later connection opens, what ``file_gone`` looks at, and the
            # name /proc shows for it once deleted.
            self.path = Path(os.path.realpath(self.path))
        try:
            if str(self.path) != ":memory:":
                # Conversations are private: a directory made here, and a file made here (its
                # -wal and -shm files take its mode), are the service user's only (as
                # PostgreSQL keeps its data directory), not readable by every user of the host.
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            writer = _connect(self.path, self._synchronous, self._busy_timeout)
        except (sqlite3.Error, OSError) as exc:  # OSError: its directory cannot be made
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc
        try:
            # A newer schema is refused before anything is written to the file.
            version = writer.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"database schema version {version} is newer than this code "
                    f"({len(MIGRATIONS)}); refusing to open")
            if version == 0 and (other := writer.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE "
                    "'sqlite_%' ORDER BY name LIMIT 3").fetchall()):
                # Another program's file (a path mistyped): our tables are not added to it,
                # nor is it switched to WAL (for good) before it is refused.
                raise StoreError(
                    f"{self.path} is another program's database (tables "
                    f"{', '.join(repr(r[0]) for r in other)}, no schema of this service); "
                    "refusing to add to it")
            # Checkpoints run beside the writes (``maintain``), not inside a commit, where
            # they stall every write queued behind it (seen as token-latency spikes).
            writer.execute("PRAGMA wal_autocheckpoint = 0")
            # A WAL grown large (a long reader in another process held checkpoints back) is
            # cut back to this when it is next reset, rather than keeping its peak size.
            writer.execute(f"PRAGMA journal_size_limit = {int(self.wal_size_limit)}")
            mode = writer.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal" and str(self.path) != ":memory:":
                raise StoreError(f"could not switch {self.path} to WAL (got {mode})")
            self._migrate(writer)
            reader = _connect(self.path, self._synchronous, self._busy_timeout)
            st = os.stat(self.path)
            self._identity = (st.st_dev, st.st_ino)
        except (sqlite3.Error, OSError, StoreError) as exc:
            writer.close()  # nothing left open on a failed start
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc
        self._writer, self._reader = writer, reader

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        # BEGIN IMMEDIATE so that two processes starting at once do not both migrate.
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"database schema version {version} is newer than this code "
                    f"({len(MIGRATIONS)}); refusing to open"
                )
            for number in range(version, len(MIGRATIONS)):
                for statement in MIGRATIONS[number]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def aclose(self) -> None:
        # Wait for writes in flight, then close; shielded so a shutdown cannot leave it half done.
        with trio.CancelScope(shield=True):
            async with self._write_lock, self._read_lock, self._checkpoint_lock:
                writer, reader, ckpt = self._writer, self._reader, self._checkpointer
                self._writer = self._reader = self._checkpointer = None
                if writer is not None or reader is not None:
                    # Closing the last connection checkpoints the WAL into the file.
                    await self._run_sync(_close_all, ckpt, reader, writer)

    async def __aenter__(self) -> SQLiteStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- plumbing -------------------------------------------------------------------------------

    async def _write(self, op: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in an IMMEDIATE transaction on the writer connection, in a thread.

        Group commit: writes that queue up while another is in its thread go together, in one
        transaction and one thread hop, each under its own SAVEPOINT (one failing write does not
        undo the others). The first waiter to get the lock takes the whole queue; the others
        find their write done. A write still queued when its caller is cancelled is removed and
        never runs; one already taken lands whole. Writes land in the order they were called:
        a call joins the queue before its first checkpoint, and the queue is taken whole and in
        order (``Supervisor._start_new`` relies on it).
        """
        start = time.perf_counter()
        item = await self._commits.submit(fn, op)
        self._metrics.store_latency.labels(op).observe(time.perf_counter() - start)
        if item.error is not None:
            raise item.error
        return item.result  # type: ignore[no-any-return]

    async def _run_batch(self, batch: list[PendingWrite[sqlite3.Connection]]) -> None:
        conn = self._writer
        if conn is None:
            for it in batch:
                it.error = StoreError("store is closed")
        else:
            if self.faults.before_batch is not None:
                await self.faults.before_batch()
            await self._run_sync(self._transaction, conn, batch)

    def _transaction(
        self, conn: sqlite3.Connection, batch: list[PendingWrite[sqlite3.Connection]]
    ) -> None:
        single = len(batch) == 1
        try:
            if (gone := self.file_gone()) is not None:
                raise sqlite3.OperationalError(gone)
            if time.monotonic() < self._tight_until:
                # After a full volume, space freed must go to a checkpoint first: writes
                # retried straight away grow the WAL into it (between two periodic
                # checkpoints a busy WAL grows by megabytes), the checkpoint, which needs room
                # in the database file, never completes, the WAL is never reset, and the store
                # stays unwritable for good (seen on a 2 MB tmpfs). So for a while every write
                # starts with a TRUNCATE checkpoint: the WAL is copied in and cut to zero
                # bytes, and holds one transaction at a time.
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            conn.execute("BEGIN IMMEDIATE")
            try:
                for it in batch:
                    if single:
                        it.result = it.fn(conn)
                        continue
                    conn.execute("SAVEPOINT w")
                    try:
                        it.result = it.fn(conn)
                    except Exception as exc:
                        conn.execute("ROLLBACK TO w")
                        self._note_corrupt(exc)
                        it.error = _store_error(exc)
                    conn.execute("RELEASE w")
                if self.faults.before_commit is not None:
                    self.faults.committing = tuple(it.op for it in batch)
                    self.faults.before_commit()
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self.write_error = None
        except BaseException as exc:  # noqa: ASYNC103 (a worker thread: no trio.Cancelled here)
            error = _store_error(exc)
            self._note_corrupt(exc)
            self.write_error = str(exc) or type(exc).__name__
            if _is_full(exc):
                self._tight_until = time.monotonic() + _TIGHT_FOR
            for it in batch:
                it.error = error
            if not isinstance(exc, Exception):
                raise

    async def _read(self, op: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        start = time.perf_counter()
        if self.faults.before_read is not None:
            self.faults.before_read(op)
        async with self._read_lock:
            conn = self._reader
            if conn is None:
                raise StoreError("store is closed")
            try:
                # Reads have no side effects; still not abandoned, so the connection is never
                # used by two threads at once.
                result = await self._run_sync(fn, conn)
            except sqlite3.Error as exc:
                self._note_corrupt(exc)
                raise _store_error(exc, "store read failed") from exc
            except ValueError as exc:
                # A stored value that does not decode (an event's or a run's JSON, a rotted
                # byte: SQLite keeps no checksum): this read fails, as a StoreError.
                raise StoreError(f"store read failed: a stored value does not decode "
                                 f"({type(exc).__name__}: {exc})") from exc
            finally:  # a failed read too, as a failed write
                self._metrics.store_latency.labels(op).observe(time.perf_counter() - start)
        return result

    def file_gone(self) -> str | None:
        """Why the database file at ``path`` is no longer the one opened (deleted, or replaced:
        an ``rm``, a clean-up of a temporary directory, a restore over it while it ran), else
        None. Writes would go on into the unlinked file and be lost at the next start (which
        makes an empty one): they are refused, and ``/readyz`` says so."""
        if self._identity is None:
            return None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            what = "deleted"
        else:
            if (st.st_dev, st.st_ino) == self._identity:
                return None
            what = "replaced by another file"
        held = _open_copy(self.path)
        return (f"the database file {self.path} was {what} while the service ran; writes are "
                f"refused (they would be lost at the next start). Restore it"
                + (f" (the open one can be copied from {held})" if held else "")
                + ", then restart the service")

    def _note_corrupt(self, exc: BaseException) -> None:
        """SQLite found the file damaged (a page that does not parse): every read or write
        touching it will fail until the file is repaired, so the store is not ready (``ping``
        says so; a write elsewhere in the file that commits does not clear it)."""
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            self.corrupt = str(exc)

    async def maintain(self) -> None:
        """Copy the WAL into the database file without blocking writers (a PASSIVE checkpoint,
        on its own connection, in a thread). The run supervisor calls it every few seconds."""
        def run() -> None:
            if (gone := self.file_gone()) is not None:  # (a connection made now would
                raise sqlite3.OperationalError(gone)  # make a new, empty file there)
            conn = self._checkpointer
            if conn is None:
                conn = self._checkpointer = _connect(
                    self.path, self._synchronous, self._busy_timeout
                )
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

        async with self._checkpoint_lock:
            if self._writer is None:
                return
            try:
                await self._run_sync(run)
            except sqlite3.Error as exc:
                raise StoreError(f"checkpoint failed: {exc}") from exc

    async def listen(self, wake: Callable[[str], None]) -> None:
        """Other processes' commits are not announced here (readers of their runs read the
        file every 0.1-1 s): nothing to listen to."""
        await trio.sleep_forever()

    async def ping(self) -> None:
        """Raise StoreError unless the store answers a trivial query (and has not found its
        file damaged: ``_note_corrupt``)."""
        if self.corrupt is not None:
            raise StoreError(f"the database file is damaged ({self.corrupt}): restore it from "
                             "a backup, or recover it with sqlite3's .recover")
        def ping(conn: sqlite3.Connection) -> None:
            if (gone := self.file_gone()) is not None:  # (a stat: in the reader's thread)
                raise sqlite3.OperationalError(gone)
            conn.execute("SELECT 1").fetchone()

        await self._read("ping", ping)

    async def probe_write(self) -> None:
        """Raise StoreError unless the store can commit a write now (a page of its own: a
        write that changes nothing would commit even on a full volume)."""
        now = time.time()
        await self._write("probe_write", lambda c: c.execute(
            "INSERT OR REPLACE INTO heartbeat (id, at) VALUES (1, ?)", (now,)))


def _open_copy(path: Path) -> str | None:
    """Where this process still holds ``path`` open once it was deleted (Linux: a
    ``/proc/self/fd`` link "PATH (deleted)"), as ``/proc/PID/fd/N``, which can be copied."""
    target = f"{path} (deleted)"  # (``path`` resolved at open)
    try:
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}") == target:
                    return f"/proc/{os.getpid()}/fd/{fd}"
    except OSError:
        pass
    return None


def _store_error(exc: BaseException, what: str = "store write failed") -> BaseException:
    """The service's error for a sqlite3 one: ``StoreUnavailable`` (503, worth a retry) for
    what passes (a full volume, a lock held too long, an I/O error), ``StoreError`` else (a
    stored row that does not decode too: ``unreadable``)."""
    if isinstance(exc, sqlite3.Error | InjectedFault):
        kind = (StoreUnavailable if isinstance(exc, sqlite3.OperationalError | InjectedFault)
                else StoreError)
        error = kind(f"{what}: {exc}")
        error.__cause__ = exc
        return error
    return unreadable(exc, what)


def _is_full(exc: BaseException) -> bool:
    """Whether a write failed because the volume (or the database's size limit) is full."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or "disk is full" in str(exc)


async def _run_inline(fn: Callable[..., T], *args: Any) -> T:
    await trio.lowlevel.checkpoint_if_cancelled()
    return fn(*args)


def _close_all(*conns: sqlite3.Connection | None) -> None:
    for conn in conns:
        if conn is not None:
            conn.close()


@asynccontextmanager
async def open_sqlite_store(path: Path, **kwargs: Any) -> AsyncIterator[SQLiteStore]:
    """``async with open_sqlite_store(path) as store:`` opens (and migrates) it, closes it after."""
    store = SQLiteStore(path, **kwargs)
    await store.open()
    try:
        yield store
    finally:
        await store.aclose()
