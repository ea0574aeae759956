"""The PostgreSQL schema, created or migrated at start (``schema.PG_MIGRATIONS``): one instance
at a time (an advisory lock), the version read again under it, a newer schema refused."""

from __future__ import annotations

import time
from collections.abc import Callable

from ..errors import StoreError
from ..logs import get_logger
from .pg_conn import BoundedConnection
from .postgres_ownership import Conn
from .schema import PG_MIGRATIONS

__all__ = ["MIGRATION_LOCK", "migrate"]

log = get_logger("service.store")

MIGRATION_LOCK = 0x5E7F1CE  # pg_advisory_xact_lock key: one process migrates at a time
_POLL = 0.25  # seconds between two tries for the lock while another instance holds it
_REPORT_EVERY = 30.0  # seconds between two log lines saying so


def _holder(conn: Conn) -> str:
    """Who holds the migration's lock, as the server sees it (or "another instance")."""
    row = conn.execute(
        "SELECT a.pid, a.application_name, host(a.client_addr), "
        "extract(epoch FROM clock_timestamp() - a.xact_start)::float8 "
        "FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.classid::bigint = 0 "
        "AND l.objid::bigint = %s AND l.objsubid = 1 AND l.database = "
        "(SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())",
        (MIGRATION_LOCK,)).fetchone()
    if row is None:
        return "another instance"
    pid, app, addr, age = row
    where = f" from {addr}" if addr else ""
    since = f", in its transaction for {age:.0f} s" if age is not None else ""
    return f"server process {pid} ({app or 'no application_name'}{where}{since})"


def _take_lock(conn: Conn, check: Callable[[], None] | None) -> None:
    """The migration's lock, waited for as long as another instance holds it, said in the log
    every 30 s with who holds it. ``check`` raises to stop the wait (the start cancelled:
    ``trio.from_thread.check_cancelled``), which the lock's own wait would not."""
    def taken() -> bool:
        return bool(conn.execute("SELECT pg_try_advisory_xact_lock(%s)",
                                 (MIGRATION_LOCK,)).fetchone()[0])  # type: ignore[index]

    if taken():
        return
    began = time.monotonic()
    report = began
    while not taken():
        if time.monotonic() >= report:
            log.info("waiting for another instance's schema migration of this database "
                     "(its lock is held by %s; waited %.0f s)", _holder(conn),
                     time.monotonic() - began)
            report += _REPORT_EVERY
        if check is not None:
            check()
        time.sleep(_POLL)


def migrate(conn: Conn, check: Callable[[], None] | None = None) -> None:
    """Create or migrate the schema. ``check``, called while another instance's migration is
    waited for, raises to stop the wait."""
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
    # Neither the server's statement_timeout (SERVICE_DB_TIMEOUT) nor this connection's own
    # bound on a wait for the server: an instance starting while another migrates waits for
    # it, and an index or a backfill over a big table takes what it takes (bound, every start
    # failed the same way). The wait is said in the log, and ends if the start is cancelled.
    bound = conn.answer_within if isinstance(conn, BoundedConnection) else None
    if isinstance(conn, BoundedConnection):
        conn.answer_within = None
    try:
        with conn.transaction():
            conn.execute("SET LOCAL statement_timeout = 0")
            _take_lock(conn, check)
            found = version()  # again, under the lock: another process may have migrated
            refuse_newer(found)
            if found == 0:
                conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                conn.execute("DELETE FROM schema_version")
                conn.execute("INSERT INTO schema_version VALUES (0)")
            for number in range(found, len(PG_MIGRATIONS)):
                if number:
                    log.info("migrating the database's schema to version %d", number + 1)
                for statement in PG_MIGRATIONS[number]:
                    conn.execute(statement)  # type: ignore[call-overload]
                conn.execute("UPDATE schema_version SET version = %s", (number + 1,))
    finally:
        if isinstance(conn, BoundedConnection):
            conn.answer_within = bound
