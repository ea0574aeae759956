"""A real PostgreSQL server for the tests: started once per session, a fresh database per test.

The server runs from the distribution's binaries (``/usr/lib/postgresql/<version>/bin``; `.ci/run`
installs them where missing) in a temporary directory, with trust authentication, listening on
127.0.0.1 on a free port (its unix socket in that directory). initdb refuses to run as root, so
under root the server is run as the ``postgres`` user. Tests that need it skip when no binaries
are found.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

__all__ = ["PASSWORD", "PASSWORD_USER", "PostgresServer", "find_pg_bin", "start_postgres"]

PASSWORD_USER, PASSWORD = "pwuser", "Right-Pw-7x"  # a role that authenticates by password


def find_pg_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name)
                   if Path(p).parent.parent.name.isdigit() else 0)
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    bin: Path
    root: Path  # the temporary directory: data/, the socket, the log
    port: int
    as_user: str | None  # run its commands as this user (root cannot)
    fsync: bool = False  # tests need no durability against power loss; benchmarks do

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, dbname: str = "postgres", *, user: str = "postgres",
            password: str | None = None) -> str:
        auth = f"{user}:{password}" if password is not None else user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *args: str) -> None:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self.as_user:
            cmd = ["runuser", "-u", self.as_user, "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        if out.returncode != 0:
            log = (self.root / "log").read_text() if (self.root / "log").exists() else ""
            raise RuntimeError(f"{' '.join(args)} failed: {out.stderr}{out.stdout}\n{log}")

    def start(self) -> None:
        opts = (f"-h 127.0.0.1 -p {self.port} -k {self.root} "
                f"-c fsync={'on' if self.fsync else 'off'} "
                "-c max_connections=200 -c shared_buffers=32MB")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", opts,
                  "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
        return self.url(name)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


def start_postgres() -> PostgresServer:
    """Initialise and start a throw-away server (the caller stops it and removes ``root``)."""
    pg_bin = find_pg_bin()
    if pg_bin is None:
        raise FileNotFoundError("no PostgreSQL binaries under /usr/lib/postgresql/*/bin")
    as_user = "postgres" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="service-pg-"))
    if as_user:
        shutil.chown(root, as_user, as_user)
    server = PostgresServer(pg_bin, root, _free_port(), as_user)
    server._run("initdb", "-D", str(server.data), "-A", "trust", "-U", "postgres",
                "-E", "UTF8", "--locale=C", "--no-sync")
    # One role that must give its password (the rest is trusted), for the tests of a wrong one.
    hba = server.data / "pg_hba.conf"
    hba.write_text(f"host all {PASSWORD_USER} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    server.start()
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
        try:
            server.stop("immediate")
        finally:
            shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture
def pg_url(postgres: PostgresServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty database on the session's server, dropped after the test."""
    name = "t_" + os.urandom(6).hex()
    url = postgres.create_database(name)
    try:
        yield url
    finally:
        postgres.drop_database(name)
