"""The PostgreSQL store (``SERVICE_DB=postgresql://user:pass@host:port/db``), on psycopg 3.

This module is its engine (the pool, migrations, transactions, error mapping); its queries are
in :mod:`.postgres_queries`, group commit in :mod:`.group_commit`.

The same promises as the SQLite store (see :mod:`.base`), kept the same way:

* psycopg has no trio support, so every query runs in ``trio.to_thread.run_sync`` behind the
  store's own ``trio.CapacityLimiter`` (as many threads as the pool has connections: a thread
  never waits for a connection while one is free). Every connection has ``statement_timeout``
  set, so a slow query cannot hold a thread for ever; and every wait for the server's answer is
  bounded (:mod:`.pg_conn`), so neither can a server that stopped answering (frozen, or behind
  a network that drops packets): past ``stall_timeout`` the connection is closed and the wait
  fails ``StoreUnavailable``. Threads are never abandoned, but for ``ping`` (``/readyz``
  answers within its own deadline; the ping's thread ends by that bound).
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

Run ownership (:mod:`.ownership`): a run records its process; a process on another host (or in
another container) lives while its lease in ``instances`` does, measured in the database's time.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import Token
from functools import partial
from typing import Any, ClassVar, TypeVar, cast

import psycopg
import psycopg_pool
import trio

from ..errors import ServiceError, StoreError, StoreUnavailable
from ..logs import get_logger
from ..metrics import METRICS, Metrics
from ..settings import _redact
from .faults import InjectedFault, StoreFaults
from .group_commit import GroupCommit, PendingWrite
from .ownership import LEASE, process_tag
from .pg_conn import ACQUIRE_BY, BoundedConnection, BoundedWait
from .pg_migrate import migrate
from .pg_notify import announcing, listen_until, send_notifications
from .pg_url import conninfo, describe_url, url_secrets
from .postgres_queries import Conn, PostgresQueries
from .records import unreadable

__all__ = ["PostgresStore", "describe_url"]

log = get_logger("service.store")

T = TypeVar("T")

_ACQUIRE_STEP = 0.25  # seconds between looks at the caller's cancellation, waiting for the pool
_STALL_MARGIN = 5.0  # seconds past statement_timeout before a silent server's use is cut
_CLOSE_WAIT = 5.0  # seconds the pool's close waits for its workers
# Seconds a write of this instance's lease may take, on its own connection: a third of a lease,
# so a renewal that cannot land fails while the lease still runs (``lease_loop``).
LEASE_WRITE_BOUND = LEASE / 3 - 0.5  # (the loop's watchdog counts from a little earlier)


class PostgresStore(PostgresQueries):
    """Conversations, messages, runs, run events and LLM calls in a PostgreSQL database."""

    leases_decide = True  # ``Store``: instances on other hosts judge this one by its lease

    # The keyword arguments it takes (``make_store`` passes only these on).
    OPTIONS: ClassVar[frozenset[str]] = frozenset({
        "metrics", "pool_size", "statement_timeout", "connect_timeout", "acquire_timeout",
        "process_id", "stall_timeout",
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
        process_id: str | None = None,
        stall_timeout: float | None = None,
    ) -> None:
        self._url = url
        self.url = describe_url(url)  # as it may be shown
        self._secrets = url_secrets(url)
        self._metrics = metrics or METRICS
        self._pool_size = pool_size
        self._statement_timeout = statement_timeout
        self._connect_timeout = connect_timeout
        # Seconds a query waits for a pooled connection (the database away: the pool is
        # reconnecting) before it fails StoreUnavailable.
        self._acquire_timeout = acquire_timeout
        # Seconds one wait for the server's answer (one statement, a COMMIT) may take before
        # the connection is closed: the server enforces statement_timeout only while it runs.
        self._stall_timeout = (statement_timeout + _STALL_MARGIN if stall_timeout is None
                               else stall_timeout)
        self._limiter = BoundedWait(trio.CapacityLimiter(pool_size), acquire_timeout)
        # (A "CapacityLimiter-like object", as trio's docs allow; typed as the class.)
        self._run_sync = partial(trio.to_thread.run_sync,
                                 limiter=cast(trio.CapacityLimiter, self._limiter))
        # Writes on their own (``_write_alone``) take at most half the threads: each may wait
        # for another instance's lock, and reads and batches need threads meanwhile. One waits
        # for its turn as long as one may wait for a lock (a statement's bound).
        self._alone = BoundedWait(trio.CapacityLimiter(max(1, pool_size // 2)),
                                  statement_timeout)
        self._pool: psycopg_pool.ConnectionPool[Conn] | None = None
        self._commits: GroupCommit[Conn] = GroupCommit(self._run_batch)
        # This instance's lease is written on a connection of its own (``_lease_write``).
        self._lease_conn: BoundedConnection | None = None
        self._lease_lock = trio.Lock()
        self._write_lock = self._commits.lock  # held by a batch in its thread, and by aclose
        self.process_id = process_id or process_tag(os.getpid())  # see SQLiteStore
        self.write_error: str | None = None
        self.faults = StoreFaults(self._commits)  # tests, fault drills

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
        """The connection's settings: keyword arguments win over the URL's, so the URL's own
        ``options`` (a ``search_path``, say) are kept beside the statement timeout, and its
        ``connect_timeout`` and ``application_name`` are left as it says."""
        given = conninfo(self._url)
        # Whole milliseconds, at least 1: 0 would be no timeout at all.
        options = f"-c statement_timeout={max(1, math.ceil(self._statement_timeout * 1000))}"
        # A transaction whose process stops sending (stopped, a host frozen mid-batch) is
        # ended by the server well before its lease lapses: it holds its runs' rows (the
        # batch's FOR SHARE fence) and its uncommitted events, which a survivor closing those
        # runs would wait on for as long as the process stays stopped.
        options += f" -c idle_in_transaction_session_timeout={_IDLE_IN_TRANSACTION_MS}"
        kwargs: dict[str, Any] = {
            "autocommit": True,  # transactions are explicit: BEGIN ... COMMIT per batch
            "options": f"{given['options']} {options}" if given.get("options") else options,
        }
        if not given.get("connect_timeout"):
            kwargs["connect_timeout"] = max(1, round(self._connect_timeout))
        if not given.get("application_name"):
            kwargs["application_name"] = "service"
        return kwargs

    def _open_sync(self) -> None:
        # One direct connection first: its errors say why (refused, password, no database),
        # where a pool would only time out.
        try:
            with self._connect() as conn:
                migrate(conn, trio.from_thread.check_cancelled)
        except psycopg.Error as exc:
            raise StoreError(f"cannot open store {self.url}: {self._scrub(exc)}") from None
        pool: psycopg_pool.ConnectionPool[Conn] = psycopg_pool.ConnectionPool(
            self._url, min_size=1, max_size=self._pool_size, open=False,
            kwargs=self._connect_kwargs(), name="service-store",
            connection_class=BoundedConnection, configure=self._configure,
            # A connection is checked before it is handed out: after a database restart the
            # stale ones are replaced, not failed on.
            check=self._check_connection,
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

    def _connect(self) -> BoundedConnection:
        """A direct connection (not the pool's), its waits bounded as the pool's are."""
        conn = BoundedConnection.connect(self._url, **self._connect_kwargs())
        self._configure(conn)
        return conn

    def _configure(self, conn: Conn) -> None:
        """Every connection's waits bounded (the pool calls it on each new one), and not cut
        for being idle by the server's ``idle_session_timeout``: the pool checks its own, and
        the listening connection waits for notifications, which the server counts as idle (a
        timeout under 5 s cut it over and over, its wake-ups lost meanwhile)."""
        if isinstance(conn, BoundedConnection):
            conn.answer_within = self._stall_timeout
        _not_cut_when_idle(conn)

    def _check_connection(self, conn: Conn) -> None:
        """The pool's check of a connection before it hands it out: an empty query, given
        ``connect_timeout`` to answer (a frozen server would hold the caller's thread)."""
        if not isinstance(conn, BoundedConnection):
            psycopg_pool.ConnectionPool.check_connection(conn)
            return
        conn.answer_within = self._connect_timeout
        try:
            psycopg_pool.ConnectionPool.check_connection(conn)
        finally:
            conn.answer_within = self._stall_timeout

    async def aclose(self) -> None:
        # Wait for writes in flight, then close; shielded so a shutdown cannot leave it half done.
        with trio.CancelScope(shield=True):
            async with self._write_lock:
                pool, self._pool = self._pool, None
                if pool is not None:
                    # Not behind the limiter: an abandoned ping may hold a token until the
                    # server answers or its bound passes.
                    await trio.to_thread.run_sync(partial(pool.close, timeout=_CLOSE_WAIT))
            async with self._lease_lock:  # a lease write in flight ends within its bound
                conn, self._lease_conn = self._lease_conn, None
                if conn is not None:
                    await trio.to_thread.run_sync(conn.close)

    async def __aenter__(self) -> PostgresStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- plumbing -------------------------------------------------------------------------------

    def _scrub(self, exc: BaseException | str) -> str:
        """An error's text on one line, without the password (whatever libpq chose to echo)."""
        text = str(exc).replace(self._url, self.url)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return _redact(" ".join(text.split()) or type(exc).__name__)

    def _error(self, exc: BaseException, what: str) -> BaseException:
        """The service's error for a psycopg one (see the module docstring)."""
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError | InjectedFault
                      | psycopg.errors.ReadOnlySqlTransaction):  # a standby, for now
            kind: type[StoreError] = StoreUnavailable
        elif isinstance(exc, psycopg.Error):
            kind = StoreError
        else:
            return unreadable(exc, what)
        error = kind(f"{what}: {self._scrub(exc)}")
        error.__cause__ = exc
        return error

    def _acquiring(self) -> Token[float | None]:
        """Start the operation's one bound on its waits for a thread and a connection
        (``ACQUIRE_BY``); the caller resets it with the token."""
        return ACQUIRE_BY.set(time.monotonic() + self._acquire_timeout)

    @contextmanager
    def _connection(self, pool: psycopg_pool.ConnectionPool[Conn]) -> Iterator[Conn]:
        """A pooled connection, in a worker thread (``pool.connection()``, but its wait can be
        cancelled). While the database is away the pool has none to give for up to
        ``acquire_timeout``; the wait goes in short steps and ends early if the calling task
        was cancelled (nothing has been sent yet: a read's caller, e.g. ``/readyz`` with its
        2 s deadline, is not held for the whole timeout). A batch of writes runs shielded,
        so its wait is not cut."""
        deadline = ACQUIRE_BY.get() or time.monotonic() + self._acquire_timeout
        # The first look is a full step whatever is left of the bound: a connection lying idle
        # is taken (psycopg_pool refuses a timeout of 0 before it looks at its idle ones, and a
        # thread got just as the bound ran out was refused the connection its last user left).
        step = min(_ACQUIRE_STEP, self._acquire_timeout)
        while True:
            try:
                conn = pool.getconn(timeout=step)
                break
            except psycopg_pool.PoolTimeout as exc:
                if time.monotonic() >= deadline:
                    raise psycopg_pool.PoolTimeout(
                        f"no connection to the database within {self._acquire_timeout:g} s"
                    ) from exc
                trio.from_thread.check_cancelled()
                step = min(_ACQUIRE_STEP, deadline - time.monotonic())
        try:
            with conn:  # commit or roll back as pool.connection() does; a pooled one stays open
                yield conn
        except psycopg.errors.ReadOnlySqlTransaction:
            # A session opened on a standby (a failover under way) or while the database was
            # read-only stays so: closed, it is replaced by one opened now (libpq then picks a
            # writable host of the URL's, with target_session_attrs=read-write).
            conn.close()
            raise
        finally:
            pool.putconn(conn)

    async def _write(self, op: str, fn: Callable[[Conn], T]) -> T:
        """Run ``fn`` in a transaction, grouped with the writes queued beside it (see the
        module docstring; the same queue and the same cancellation rules as SQLite's)."""
        start = time.perf_counter()
        item = await self._commits.submit(fn, op)
        self._metrics.store_latency.labels(op).observe(time.perf_counter() - start)
        if item.error is not None:
            raise item.error
        return item.result  # type: ignore[no-any-return]

    async def _write_alone(self, op: str, fn: Callable[[Conn], T]) -> T:
        """Run ``fn`` in a transaction of its own, outside the group commit: a cancel of
        another instance's run, whose event batch holds the run's row until it commits. In the
        shared batch that wait held every write queued behind it, and two instances cancelling
        each other's runs deadlocked. It holds no other lock, and waits for one as long as the
        owner's batch may take (``statement_timeout``; a stalled owner's transaction is ended
        within 5 s): a thread and a pooled connection are held meanwhile, so such writes take
        at most half of them. (Hooked by the
        write faults, counted in ``write_error`` and the latency metric, as a batch.)"""
        start = time.perf_counter()
        pool = self._pool
        if pool is None:
            raise StoreError("store is closed")
        if self.faults.before_batch is not None:
            await self.faults.before_batch()

        def run() -> T:
            with (self._connection(pool) as conn,
                  _explicit(conn, "BEGIN")):
                result = fn(conn)  # its notifications are sent with it (not in a batch)
                if self.faults.before_commit is not None:
                    self.faults.committing = (op,)
                    self.faults.before_commit()
                return result

        turn = object()
        try:
            await self._alone.acquire_on_behalf_of(turn)  # (its own bound: a lock's)
            acquiring = self._acquiring()
            try:
                result = await self._run_sync(run)
            finally:
                ACQUIRE_BY.reset(acquiring)
                self._alone.release_on_behalf_of(turn)
        except (psycopg.Error, InjectedFault) as exc:
            self.write_error = self._scrub(exc)
            raise self._error(exc, "store write failed") from exc
        finally:
            self._metrics.store_latency.labels(op).observe(time.perf_counter() - start)
        self.write_error = None
        return result

    async def _run_batch(self, batch: list[PendingWrite[Conn]]) -> None:
        pool = self._pool
        if pool is None:
            for it in batch:
                it.error = StoreError("store is closed")
        else:
            if self.faults.before_batch is not None:
                await self.faults.before_batch()
            acquiring = self._acquiring()
            try:
                await self._run_sync(self._transaction, pool, batch)  # statement_timeout too
            finally:
                ACQUIRE_BY.reset(acquiring)

    def _transaction(self, pool: psycopg_pool.ConnectionPool[Conn],
                     batch: list[PendingWrite[Conn]]) -> None:
        single = len(batch) == 1
        try:
            # Savepoint commands go with the next one, in one round trip each (a query without
            # parameters may hold several statements): a write costs one round trip more than
            # its own statements, not two.
            with (self._connection(pool) as conn,
                  _explicit(conn, "BEGIN" if single else "BEGIN; SAVEPOINT w")):
                with announcing() as announced:
                    for n, it in enumerate(batch):
                        if single:
                            it.result = it.fn(conn)
                            continue
                        if n:
                            conn.execute("RELEASE SAVEPOINT w; SAVEPOINT w")
                        kept = len(announced)
                        try:
                            it.result = it.fn(conn)
                        except Exception as exc:
                            if conn.broken or isinstance(
                                    exc, psycopg.errors.ReadOnlySqlTransaction):
                                raise  # the connection is gone or read-only: the whole batch
                            conn.execute("ROLLBACK TO SAVEPOINT w")
                            del announced[kept:]
                            it.error = self._error(exc, "store write failed")
                # One notification for the whole batch (delivered at its COMMIT).
                send_notifications(conn, announced)
                if self.faults.before_commit is not None:
                    self.faults.committing = tuple(it.op for it in batch)
                    self.faults.before_commit()
            self.write_error = None
        except BaseException as exc:  # noqa: ASYNC103 (a worker thread: no trio.Cancelled here)
            error = self._error(exc, "store write failed")
            if not isinstance(exc, ServiceError):  # a NotFound is the caller's, not the store's
                self.write_error = self._scrub(exc)
            for it in batch:
                it.error = error
            if not isinstance(exc, Exception):
                raise

    async def _lease_write(self, op: str, query: str, params: tuple[Any, ...]) -> None:
        """One statement about this instance's lease (``instances``), on a direct connection
        kept for it: not in the group commit's queue, not behind the pool's limiter. A batch
        held by a slow statement (a lock, an index build: up to ``statement_timeout``, 30 s)
        or every pooled connection busy must not hold a renewal up past the lease (15 s):
        another instance would take this one for dead and close the runs it is serving.
        Bounded by ``LEASE_WRITE_BOUND`` (connect, statement and every wait for the server),
        so one that cannot land fails while the lease still runs. A connection that failed
        is closed; the next write makes a new one."""
        start = time.perf_counter()
        try:
            async with self._lease_lock:
                if self._pool is None:
                    raise StoreError("store is closed")
                try:
                    # Not abandoned on cancel: every wait in it is bounded.
                    await trio.to_thread.run_sync(self._lease_sync, query, params)
                except psycopg.Error as exc:
                    raise self._error(exc, "store write failed") from exc
        finally:  # a failed one too (those matter most), as ``_write``'s
            self._metrics.store_latency.labels(op).observe(time.perf_counter() - start)

    def _lease_sync(self, query: str, params: tuple[Any, ...]) -> None:
        # One deadline for it all: each wait for the server is given what is left of it.
        deadline = time.monotonic() + LEASE_WRITE_BOUND
        conn = self._lease_conn
        if conn is not None and not conn.closed:
            try:
                self._lease_execute(conn, deadline, query, params)
                return
            except psycopg.OperationalError:
                # Kept from an earlier write: the database may have restarted since, or an
                # idle connection been cut. Once more on a new one, within the same bound.
                broken = conn.broken  # (False once closed)
                self._lease_conn = None
                conn.close()
                if not broken or deadline - time.monotonic() < 3.0:
                    raise
        # libpq's connect_timeout is whole seconds (2 at least).
        kwargs = self._connect_kwargs()
        kwargs["connect_timeout"] = max(2, min(math.floor(deadline - time.monotonic()),
                                               math.floor(LEASE_WRITE_BOUND / 2)))
        conn = BoundedConnection.connect(self._url, **kwargs)
        try:
            conn.answer_within = max(0.5, deadline - time.monotonic())
            conn.execute("SELECT set_config('statement_timeout', %s, false)",
                         (str(math.ceil(LEASE_WRITE_BOUND * 1000)),))
            _not_cut_when_idle(conn)
            self._lease_execute(conn, deadline, query, params)
        except BaseException:
            conn.close()
            raise
        self._lease_conn = conn

    def _lease_execute(self, conn: BoundedConnection, deadline: float, query: str,
                       params: tuple[Any, ...]) -> None:
        conn.answer_within = max(0.5, deadline - time.monotonic())
        conn.execute(query, params)  # type: ignore[arg-type]  # autocommit: one statement

    async def _read(self, op: str, fn: Callable[[Conn], T], *, abandon: bool = False) -> T:
        start = time.perf_counter()
        if self.faults.before_read is not None:
            self.faults.before_read(op)
        pool = self._pool
        if pool is None:
            raise StoreError("store is closed")

        def run() -> T:
            with self._connection(pool) as conn:
                return fn(conn)

        acquiring = self._acquiring()
        try:
            # Not abandoned on cancel (but with ``abandon``): each wait for the server is
            # bounded, and the connection goes back to the pool only once its query is over.
            result = await self._run_sync(run, abandon_on_cancel=abandon)
        except psycopg.Error as exc:
            raise self._error(exc, "store read failed") from exc
        except ValueError as exc:  # a stored value that does not decode (as SQLite's)
            raise StoreError(f"store read failed: a stored value does not decode "
                             f"({type(exc).__name__}: {exc})") from exc
        finally:
            ACQUIRE_BY.reset(acquiring)
            # A failed read too (a statement or pool timeout is what the histogram is for).
            self._metrics.store_latency.labels(op).observe(time.perf_counter() - start)
        return result

    async def maintain(self) -> None:
        """Nothing to do: PostgreSQL checkpoints and vacuums by itself."""
        await trio.lowlevel.checkpoint()

    async def listen(self, wake: Callable[[str], None]) -> None:
        """Until cancelled: call ``wake(payload)`` for every notification other instances'
        commits send (``CHANNEL``: run ids, ``cancel:<run id>``), and ``wake("*")`` whenever
        the listening connection is (re)established, since notifications sent while it was
        away are lost: every reader then reads the store again; ``wake("!")`` when it is lost.

        One direct connection (not from the pool), in a thread that looks for a stop every
        half second and, after 5 s without a notification, asks the server to answer (a
        connection whose server does not is closed); lost, it is made again after a pause."""
        stop = threading.Event()
        token = trio.lowlevel.current_trio_token()

        def deliver(payload: str) -> None:  # in the trio thread: must not raise
            try:
                wake(payload)
            except Exception:
                log.exception("a wake-up could not be delivered: %.80r", payload)

        def tell(payload: str) -> None:
            # Queued for the trio thread without waiting for it to run: a busy event loop
            # must not hold the listener (and the notifications behind this one) up.
            try:
                token.run_sync_soon(deliver, payload)
            except trio.RunFinishedError:
                stop.set()

        try:
            await trio.to_thread.run_sync(
                partial(listen_until, self._connect, tell, stop, self._scrub),
                abandon_on_cancel=True)
        finally:
            stop.set()  # the thread sees it within half a second and closes its connection

    async def ping(self) -> None:
        # Abandoned if its caller gives up (``/readyz``'s deadline): it reads nothing that
        # matters, and its thread ends by the bound on its waits.
        await self._read("ping", lambda c: c.execute("SELECT 1").fetchone(), abandon=True)

    async def probe_write(self) -> None:
        """Raise StoreError unless the store can commit a write now: this process's own row of
        ``probes``. Not a row every instance's probe wrote (``heartbeat``, id 1): in
        group-committed batches that take other rows' locks too, two instances' batches could
        deadlock (``/readyz`` probes once a second). Not this process's lease row either: a
        batch that waits on a slow statement would hold it locked, and the lease's renewal,
        on its own connection (``_lease_write``), would wait on its own probe."""
        await self._write("probe_write", lambda c: c.execute(
            "INSERT INTO probes (id, at) VALUES (%s, extract(epoch FROM clock_timestamp())) "
            "ON CONFLICT (id) DO UPDATE SET at = EXCLUDED.at", (self.process_id,)))


_IDLE = psycopg.pq.TransactionStatus.IDLE


@contextmanager
def _explicit(conn: Conn, begin: str) -> Iterator[None]:
    """``begin``, the body, ``COMMIT`` (``ROLLBACK`` if it raises) on an autocommit one."""
    conn.execute(begin)  # type: ignore[arg-type]  # (a constant's text)
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if not conn.broken and conn.info.transaction_status != _IDLE:
            conn.execute("ROLLBACK")
        raise

# A batch sends its statements back to back: a third of a lease without one is a stalled owner.
_IDLE_IN_TRANSACTION_MS = round(LEASE / 3 * 1000)


def _not_cut_when_idle(conn: Conn) -> None:
    """Keep the server's ``idle_session_timeout`` (PostgreSQL 14 on; 13 would refuse the
    connection with an unknown setting in ``options``) off this connection."""
    if conn.info.server_version >= 140000:
        conn.execute("SET idle_session_timeout = 0")
