"""``python -m service copy-store SRC DST``: a SQLite store copied into an empty PostgreSQL
database, for a deployment that outgrows one host (docs/deploy.md, "From SQLite to PostgreSQL").

What is copied is what the service reads: conversations, messages, runs, their events and the
LLM calls, with their ids and order (each table's ``seq``; PostgreSQL's identities then go on
after the copied ones). Not the instances' leases, the write probes or the schema's version:
the destination's schema is the one this code creates.

* **At rest.** The source must not be in use: a service process that holds it (a live lease,
  a live owner of a run in progress) stops the copy before anything is written. A run left in
  progress by a process that died is copied as it is; the first instance started on the
  destination closes it as it would have on SQLite (``failed``, "interrupted", its reply with
  what it had stored).
* **One snapshot, one transaction.** The source is read in one read transaction (one consistent
  state, read-only); the destination is written in one transaction, its tables locked, and
  checked empty under that lock: a copy that fails or is stopped (Ctrl+C, a kill) leaves the
  destination as it was, and can simply be run again.
* **Text PostgreSQL cannot hold** (NUL, U+0000: SQLite can; text from before the service
  cleaned it) becomes U+FFFD, as the service stores such text itself; the summary counts it.

A sync program (no event loop: one reader, one writer, nothing concurrent); exit 0 copied,
1 not copied (one line saying why), 2 a usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from ..errors import StoreError
from ..text import clean_text
from . import describe_store, is_postgres_url
from .ownership import owner_alive
from .schema import SCHEMA_VERSION

__all__ = ["TABLES", "CopyError", "copy_store", "main"]

# What is copied, parents first (the foreign keys), each with its primary key's order.
TABLES: tuple[tuple[str, str], ...] = (
    ("conversations", "seq"),
    ("messages", "seq"),
    ("runs", "seq"),
    ("run_events", "run_id, seq"),
    ("llm_calls", "seq"),
)
_FETCH = 1_000  # rows read from SQLite at a time (the copy's memory is bounded by it)
_REPORT_EVERY = 100_000  # rows of one table between two progress lines
_LOCK_TIMEOUT_MS = 10_000  # the destination's tables taken within this, or the copy stops


class CopyError(Exception):
    """The copy did not happen (nothing was written); its message says why, for one line."""


class _Signalled(BaseException):
    """SIGTERM, raised where the copy is (as SIGINT raises KeyboardInterrupt): the
    destination's transaction is rolled back on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service copy-store",
        description="Copy a SQLite store (a stopped service's SERVICE_DB) into an empty "
                    "PostgreSQL database, in one transaction.")
    parser.add_argument("source", help="the SQLite file, e.g. ./data/service.db")
    parser.add_argument("destination",
                        help="the PostgreSQL URL, postgresql://user:password@host:port/db "
                             "(its database empty; the schema is created)")
    args = parser.parse_args(argv)
    if is_postgres_url(args.source) or not is_postgres_url(args.destination):
        parser.error("copy SQLITE_FILE POSTGRESQL_URL: a SQLite file into PostgreSQL (between "
                     "two PostgreSQL databases, use pg_dump and pg_restore: docs/deploy.md)")

    def progress(line: str) -> None:
        print(f"copy-store: {line}", file=sys.stderr, flush=True)

    def stop(signum: int, _frame: object) -> None:
        raise _Signalled(signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        summary = copy_store(Path(args.source), args.destination, progress)
    except CopyError as exc:
        print(f"copy-store: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Signalled) as exc:
        signum = exc.signum if isinstance(exc, _Signalled) else signal.SIGINT
        print(f"copy-store: interrupted ({signal.Signals(signum).name}): nothing was copied "
              "(the destination's transaction was rolled back)", file=sys.stderr)
        return 128 + signum
    print(summary)
    return 0


def copy_store(source: Path, url: str, progress: Callable[[str], None] = lambda _: None) -> str:
    """Copy the SQLite store at ``source`` into the empty PostgreSQL database at ``url``;
    return the summary line. Raises CopyError if it cannot (nothing written, unless its
    message says the outcome of the COMMIT is not known)."""
    import psycopg  # only here: the SQLite service never loads it

    from .pg_url import url_secrets

    secrets = url_secrets(url)
    where = describe_store(url)

    def scrub(exc: BaseException) -> str:
        text = " ".join(str(exc).split()) or type(exc).__name__
        for secret in secrets:
            text = text.replace(secret, "***")
        return text

    began = time.monotonic()
    with _open_source(source) as (src, watch, version):
        in_progress = _check_at_rest(src, source)
        try:
            dst = psycopg.connect(url, autocommit=True, connect_timeout=10,
                                  application_name="service copy-store")
        except psycopg.Error as exc:
            raise CopyError(f"cannot connect to {where}: {scrub(exc)}") from None
        with dst:
            copy = _Copy(src, watch, version, dst, source, where, progress)
            try:
                copy.run()
            except (StoreError, CopyError) as exc:
                raise CopyError(scrub(exc)) from None
            except BaseException as exc:  # noqa: ASYNC104 (sync code, no trio: re-raised or told)
                if not copy.committing:
                    if isinstance(exc, psycopg.Error):
                        raise CopyError(f"the copy into {where} failed and nothing was "  # noqa: ASYNC104
                                        f"written (its transaction was rolled back): "
                                        f"{scrub(exc)}") from None
                    raise
                # Cut off (connection lost, or stopped) at the COMMIT itself: it may have landed.
                raise CopyError(  # noqa: ASYNC104 (sync code, no trio)
                    f"the copy's COMMIT into {where} was cut off ({scrub(exc)}): whether "
                    "it landed is not known. It is one transaction: "
                    "if the database now holds the conversations, all of it landed; if it is "
                    "empty, run the copy again") from None
            try:  # committed: the planner's statistics, which a failure here does not undo
                dst.execute("ANALYZE " + ", ".join(t for t, _ in TABLES))  # type: ignore[arg-type]
                analyzed = ""
            except (psycopg.Error, KeyboardInterrupt, _Signalled) as exc:
                analyzed = (f"; the copy is committed, but its ANALYZE did not run "
                            f"({scrub(exc) if isinstance(exc, psycopg.Error) else 'stopped'}): "
                            "autovacuum will, or run ANALYZE")
    names = {"run_events": "run events", "llm_calls": "LLM calls"}
    what = ", ".join(f"{copy.counts[t]:,} {names.get(t, t)}" for t, _ in TABLES)
    summary = (f"copied {source} into {where}: {what} in "
               f"{time.monotonic() - began:.1f} s")
    if copy.cleaned:
        summary += (f"; {copy.cleaned:,} texts held NUL characters, stored as U+FFFD "
                    "(PostgreSQL's text cannot hold them; the service stores them so)")
    if in_progress:
        summary += (f"; {in_progress:,} runs were left in progress by a process that died: "
                    "the first instance started on the database closes them as interrupted, "
                    "with what they had stored")
    return summary + analyzed


@contextmanager
def _open_source(path: Path) -> Iterator[tuple[sqlite3.Connection, sqlite3.Connection, int]]:
    """The SQLite file, read-only: one connection in one read transaction (one consistent
    state), one that watches for commits made meanwhile, and what it read before the snapshot
    began (``PRAGMA data_version``: any commit after that read changes it)."""
    if not path.is_file():
        raise CopyError(f"no SQLite file at {path}")
    uri = path.resolve().as_uri() + "?mode=ro"
    try:
        watch = sqlite3.connect(uri, uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise CopyError(f"cannot open {path}: {exc}") from None
    with closing(watch), closing(sqlite3.connect(uri, uri=True, isolation_level=None)) as conn:
        try:
            for c in (watch, conn):
                c.execute("PRAGMA busy_timeout = 10000")
            # Read before the snapshot begins: a commit after it changes the version.
            version0 = watch.execute("PRAGMA data_version").fetchone()[0]
            conn.execute("BEGIN")
            tables = {r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as exc:
            raise CopyError(f"cannot read {path}: {exc}") from None
        missing = [t for t, _ in TABLES if t not in tables]
        if missing:
            raise CopyError(f"{path} is not a store of this service (no table {missing[0]})")
        if version != SCHEMA_VERSION:
            raise CopyError(
                f"{path} is at schema version {version}, this code's is {SCHEMA_VERSION}: " + (
                    "start this version of the service on it once (it migrates the file at "
                    "start), stop it, then copy" if version < SCHEMA_VERSION else
                    "copy it with the code that wrote it"))
        yield conn, watch, version0


def _check_at_rest(src: sqlite3.Connection, path: Path) -> int:
    """Raise CopyError if a service process holds the file; return how many runs a process
    that died left in progress."""
    now = time.time()
    try:
        for tag, lease_until, host, pid in src.execute(
                "SELECT id, lease_until, host, pid FROM instances"):
            if owner_alive(tag, "", lease_until > now):
                raise CopyError(
                    f"{path} is in use: a service process holds it (pid {pid} on "
                    f"{host or 'this host'}); stop the service first, then copy (a copy "
                    "taken while it runs would miss what it writes after)")
        runs = src.execute(
            "SELECT r.id, r.process, CASE WHEN i.id IS NULL THEN NULL "
            "ELSE i.lease_until > ? END FROM runs r LEFT JOIN instances i ON i.id = r.process "
            "WHERE r.status IN ('queued', 'running')", (now,)).fetchall()
    except sqlite3.Error as exc:
        raise CopyError(f"cannot read {path}: {exc}") from None
    for run_id, process, lease in runs:
        if owner_alive(process, "", None if lease is None else bool(lease)):
            raise CopyError(f"{path} is in use: run {run_id} is going on in a live process; "
                            "stop the service first, then copy")
    return len(runs)


class _Copy:
    """The destination's schema, then every table, in one transaction: ``committing`` once
    everything is written and the COMMIT is under way."""

    def __init__(self, src: sqlite3.Connection, watch: sqlite3.Connection, version: int,
                 dst: Any, path: Path, where: str, progress: Callable[[str], None]) -> None:
        self.src, self.watch, self.version, self.dst = src, watch, version, dst
        self.path, self.where, self.progress = path, where, progress
        self.counts: dict[str, int] = {}
        self.cleaned = 0  # texts with NUL characters
        self.committing = False
        self._said_waiting = False

    def run(self) -> None:
        from psycopg.errors import LockNotAvailable

        from .pg_migrate import migrate

        dst, where = self.dst, self.where
        with dst.transaction():
            dst.execute("SET LOCAL statement_timeout = 0")  # a big copy takes what it takes
            dst.execute(f"SET LOCAL lock_timeout = {_LOCK_TIMEOUT_MS}")
            # The schema in the copy's transaction: a refusal or a failure leaves none behind,
            # and a database that holds rows is refused before its schema is touched. Its
            # advisory lock holds instances starting meanwhile until the copy is done.
            migrate(dst, self._waiting)
            try:
                dst.execute("LOCK TABLE " + ", ".join(t for t, _ in TABLES) + " IN EXCLUSIVE MODE")
            except LockNotAvailable:
                raise CopyError(f"{where}'s tables are in use (a service running on it?): not "
                                "taken within 10 s; stop it, then copy") from None
            for table, _ in TABLES:
                held = dst.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                if held:
                    raise CopyError(f"{where} is not empty ({held:,} rows in {table}): copy "
                                    "into an empty database; nothing was written")
            last = dict(self.src.execute("SELECT name, seq FROM sqlite_sequence").fetchall())
            for table, order in TABLES:
                self._table(table, order, last.get(table))
            # Any commit since the snapshot began (the version was read before it).
            if self.watch.execute("PRAGMA data_version").fetchone()[0] != self.version:
                raise CopyError(f"{self.path} was written while it was copied (a service "
                                "started on it?): nothing was copied; stop it, then copy "
                                "again")
            self.progress("committing")
            self.committing = True
        self.committing = False

    def _waiting(self) -> None:
        """Called while another instance holds the schema's migration lock (once a poll)."""
        if not self._said_waiting:
            self._said_waiting = True
            self.progress("waiting for another instance's schema migration of the database")

    def _table(self, table: str, order: str, last_seq: int | None) -> None:
        dst = self.dst
        columns = _columns(self.src, dst, table)
        names = ", ".join(columns)
        n = 0
        with dst.cursor().copy(f"COPY {table} ({names}) FROM STDIN") as sink:
            for row in _rows(self.src, f"SELECT {names} FROM {table} ORDER BY {order}",
                             self.path):
                out = []
                for value in row:
                    if isinstance(value, bytes):  # SQLite's typing lets a blob in
                        value = value.decode("utf-8", "replace")
                    if isinstance(value, str):
                        clean = clean_text(value)
                        if clean is not value:
                            self.cleaned += 1
                        value = clean
                    out.append(value)
                sink.write_row(out)
                n += 1
                if n % _REPORT_EVERY == 0:
                    self.progress(f"{table}: {n:,} rows...")
        stored = dst.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        if stored != n:  # cannot happen unless something else wrote: say so, not commit
            raise CopyError(f"{table}: {n:,} rows written, {stored:,} found after")
        if table != "run_events":
            # The identity goes on after the copied rows and after SQLite's last number
            # (AUTOINCREMENT never gives a deleted row's number again): else the first new
            # row's seq collides with a copied one's. Never back: numbers the database gave
            # before (rows since deleted) are not given again either.
            seq = dst.execute(f"SELECT pg_get_serial_sequence('{table}', 'seq')").fetchone()[0]
            given = dst.execute(f"SELECT CASE WHEN is_called THEN last_value ELSE 0 END "
                                f"FROM {seq}").fetchone()[0]
            top = max(dst.execute(f"SELECT max(seq) FROM {table}").fetchone()[0] or 0,
                      last_seq or 0, given)
            dst.execute("SELECT setval(%s, %s, %s)", (seq, max(top, 1), bool(top)))
        self.counts[table] = n
        self.progress(f"{table}: {n:,} rows")


def _columns(src: sqlite3.Connection, dst: Any, table: str) -> list[str]:
    """The table's columns, the same in both (this code's schemas): else CopyError."""
    ours = [r[1] for r in src.execute(f"PRAGMA table_info({table})")]
    theirs = {r[0] for r in dst.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = %s", (table,))}
    if set(ours) != theirs:
        raise CopyError(f"the schemas differ at {table}: SQLite has "
                        f"{sorted(set(ours) - theirs)}, PostgreSQL {sorted(theirs - set(ours))}")
    return ours


def _rows(src: sqlite3.Connection, query: str, path: Path) -> Iterator[tuple[Any, ...]]:
    try:
        cursor = src.execute(query)
        while batch := cursor.fetchmany(_FETCH):
            yield from batch
    except sqlite3.Error as exc:
        raise CopyError(f"cannot read {path}: {exc}") from None
