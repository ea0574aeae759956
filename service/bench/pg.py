"""A throw-away PostgreSQL server from the distribution's binaries (the benchmark's and the tests').

The server runs from ``/usr/lib/postgresql/<version>/bin`` (`.ci/run` installs it where missing)
in a temporary directory, with trust authentication, listening on 127.0.0.1 on a free port (its
unix socket in that directory). initdb refuses to run as root, so under root the server is run as
the ``postgres`` user. ``tests/pg.py`` builds its fixtures on this module; the benchmark
(``python -m service.bench --store postgres``, the ``cross`` scenario) starts one with
``fsync=on``, as a deployment would run.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

__all__ = ["PostgresServer", "find_pg_bin", "start_postgres"]


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
    shared_buffers: str = "32MB"
    settings: dict[str, str] = field(default_factory=dict)  # more -c name=value

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def version(self) -> str:
        return self.bin.parent.name

    def url(self, dbname: str = "postgres", *, user: str = "postgres",
            password: str | None = None) -> str:
        auth = f"{user}:{password}" if password is not None else user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{dbname}"

    def pid(self) -> int | None:
        """The postmaster's PID (its backends are its children), or None if it is not running."""
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

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
                f"-c max_connections=200 -c shared_buffers={self.shared_buffers}"
                + "".join(f" -c {k}={v}" for k, v in self.settings.items()))
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", opts,
                  "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        """Stop it (immediate) if it runs, and delete its directory."""
        try:
            if self.pid() is not None:
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
        return self.url(name)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


def start_postgres(*, fsync: bool = False, shared_buffers: str = "32MB",
                   settings: dict[str, str] | None = None,
                   before_start: Callable[[PostgresServer], None] | None = None
                   ) -> PostgresServer:
    """Initialise and start a throw-away server (the caller stops it: :meth:`remove`).

    ``before_start`` may edit the data directory (``pg_hba.conf``) between initdb and start.
    """
    pg_bin = find_pg_bin()
    if pg_bin is None:
        raise FileNotFoundError("no PostgreSQL binaries under /usr/lib/postgresql/*/bin")
    as_user = "postgres" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="service-pg-"))
    if as_user:
        shutil.chown(root, as_user, as_user)
    server = PostgresServer(pg_bin, root, _free_port(), as_user, fsync, shared_buffers,
                            dict(settings or {}))
    try:
        server._run("initdb", "-D", str(server.data), "-A", "trust", "-U", "postgres",
                    "-E", "UTF8", "--locale=C", "--no-sync")
        if before_start is not None:
            before_start(server)
        server.start()
    except BaseException:
        server.remove()
        raise
    return server
