"""A real PostgreSQL server for the tests: started once per session, a fresh database per test.

The server itself (initdb and pg_ctl from the distribution's binaries, in a temporary directory,
trust authentication, 127.0.0.1 on a free port, as the ``postgres`` user under root) is
``service/bench/pg.py``, which the benchmark uses too; here, one more role that must give its
password, and the fixtures. Tests that need it skip when no binaries are found.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from service.bench.pg import PostgresServer, find_pg_bin
from service.bench.pg import start_postgres as _start_server

__all__ = ["PASSWORD", "PASSWORD_USER", "PostgresServer", "Signalled", "find_pg_bin",
           "signalled_while_waiting_for_a_migration", "start_postgres"]

PASSWORD_USER, PASSWORD = "pwuser", "Right-Pw-7x"  # a role that authenticates by password


def _password_role_hba(server: PostgresServer) -> None:
    hba = server.data / "pg_hba.conf"
    hba.write_text(f"host all {PASSWORD_USER} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())


def start_postgres() -> PostgresServer:
    """Initialise and start a throw-away server (the caller stops it and removes ``root``)."""
    # One role that must give its password (the rest is trusted), for the tests of a wrong one.
    server = _start_server(before_start=_password_role_hba)
    with psycopg.connect(server.url(), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {PASSWORD_USER} LOGIN SUPERUSER "  # type: ignore[arg-type]
                     f"PASSWORD '{PASSWORD}'")
    return server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session (about 2.5 s to start)."""
    if find_pg_bin() is None:
        pytest.skip("PostgreSQL is not installed (/usr/lib/postgresql/*/bin)")
    server = start_postgres()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def pg_url(postgres: PostgresServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty database on the session's server, dropped after the test."""
    name = "t_" + os.urandom(6).hex()
    url = postgres.create_database(name)
    try:
        yield url
    finally:
        postgres.drop_database(name)


def slow_token_trigger(seconds: float) -> str:
    """SQL creating a trigger that sleeps ``seconds`` in every insert of a token event whose
    text holds "slow": a test makes one batch of an instance's group commit hold its row locks
    that long, so that another write's overlap with it is certain rather than a matter of
    milliseconds. The rest of the store is untouched."""
    return f"""
CREATE FUNCTION review_slow_token() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.type = 'token' AND NEW.data LIKE '%slow%' THEN
    PERFORM pg_sleep({seconds});
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER review_slow_token BEFORE INSERT ON run_events
  FOR EACH ROW EXECUTE FUNCTION review_slow_token();
"""


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """Where a store is, for a test of both stores: a SQLite file, or a fresh database on the
    session's PostgreSQL."""
    if request.param == "sqlite":
        return tmp_path / "s.db"
    url: str = request.getfixturevalue("pg_url")
    return url


@dataclass
class Signalled:
    """A start stopped by a signal: its exit status, its log up to the wait and after it, and
    the server process id of the connection that held the migration's lock."""

    returncode: int
    seen: str
    rest: str
    holder_pid: int


def signalled_while_waiting_for_a_migration(
    pg_url: str, argv: list[str], sig: int = signal.SIGTERM, *, timeout: float = 60,
) -> Signalled:
    """Start ``argv`` (a service on ``pg_url``, run from the repository) while another
    connection ("migrating-elsewhere") holds the migration's lock; once it logs that it waits,
    send it ``sig``, the lock still held until it has exited."""
    from service.store.pg_migrate import MIGRATION_LOCK

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    env["SERVICE_DB"] = pg_url
    with psycopg.connect(pg_url, application_name="migrating-elsewhere") as holder, \
            holder.transaction():
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        proc = subprocess.Popen(argv, cwd=root, env=env, stderr=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            assert proc.stderr is not None
            seen = ""
            while "waiting for another instance's schema migration" not in seen:
                line = proc.stderr.readline()
                assert line, f"exited before waiting: {seen}"
                seen += line
            proc.send_signal(sig)
            rest = proc.communicate(timeout=timeout)[1]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # its own group: its workers too
                proc.wait()
        return Signalled(proc.returncode, seen, rest, holder.info.backend_pid)
