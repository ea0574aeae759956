"""Operations review of 2026-12-06: settings, start-up, shutdown, logs, as an operator meets
them. Each test starts ``python -m service`` as a real process on 127.0.0.1 and fails on the
code it was written against, for the defect its docstring names.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import httpx
import pytest
import trio

from ..servers import ROOT

GUARD = 40  # seconds any one process may take to start or to stop


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update({"SERVICE_DB": str(tmp_path / "data" / "s.db"), "SERVICE_BACKEND": "llamacpp",
                "SERVICE_LLAMACPP_URL": "http://127.0.0.1:9", "SERVICE_LOG_FORMAT": "json",
                **extra})
    return env


class Service:
    """``python -m service`` in a process of its own; its stderr goes to a file."""

    def __init__(self, proc: trio.Process, log: Path) -> None:
        self.proc, self.log = proc, log
        self.url: str | None = None

    @classmethod
    async def start(cls, tmp_path: Path, args: list[str], env: dict[str, str],
                    cwd: Path | None = None) -> Service:
        log = tmp_path / f"service-{os.getpid()}-{len(os.listdir(tmp_path))}.log"
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "service", *args], cwd=cwd or tmp_path, env=env,
                stderr=out, stdout=out)
        finally:
            os.close(out)
        return cls(proc, log)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    async def serving_or_exited(self) -> str | None:
        """The URL it announces, or None once it has exited without announcing one."""
        with trio.fail_after(GUARD):
            while True:
                m = re.search(r"Running on (http://127\.0\.0\.1:\d+)", self.text())
                if m:
                    self.url = m.group(1)
                    return self.url
                if self.proc.poll() is not None:
                    return None
                await trio.sleep(0.05)

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        with trio.move_on_after(GUARD, shield=True):
            await self.proc.wait()
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
            return -999  # hung
        return self.proc.returncode


# -- hypercorn.toml and --config ---------------------------------------------------------------


async def test_a_config_file_that_does_not_exist_stops_the_start(tmp_path: Path) -> None:
    """``--config /etc/agent/hypercorn.toml`` naming a file that is not there (a typo, a volume
    not mounted) is silently replaced by built-in defaults (``service/server.py:build_config``:
    ``if config_path is not None and config_path.exists() ... else: Config()``): the service
    serves on 127.0.0.1:8000 with one worker and a 10 s graceful timeout, whatever the file
    said (its bind, ``workers = 4``, TLS). operations.md: "``--config`` picks another TOML
    file"; an operator (or systemd, which sees a healthy start) is never told the file was not
    read. Expected: one line naming the file, exit 2 (as for a file that does not parse),
    nothing served."""
    missing = tmp_path / "etc" / "hypercorn.toml"
    svc = await Service.start(
        tmp_path, ["--config", str(missing), "--bind", "127.0.0.1:0"], _env(tmp_path))
    code = -1
    try:
        url = await svc.serving_or_exited()
    finally:
        with trio.move_on_after(3 * GUARD, shield=True):
            code = await svc.stop()
    out = svc.text()
    assert url is None, f"served on {url} with built-in defaults instead of {missing}"
    assert code == 2, (code, out[-2000:])
    last = out.strip().splitlines()[-1]
    assert last.startswith("service: "), out[-2000:]
    assert str(missing) in last, out[-2000:]


@pytest.mark.parametrize("line", [
    'workers = "2"',
    'startup_timeout = "150"',
    'backlog = "100"',
], ids=["workers", "startup_timeout", "backlog"])
async def test_a_quoted_number_in_the_config_stops_the_start_in_one_line(
    tmp_path: Path, line: str,
) -> None:
    """A number written as a TOML string in ``hypercorn.toml`` (``workers = "2"``: a common
    slip, and what a templating tool writes) passes ``build_config`` (``Config.from_toml``
    checks no types; only a file that does not parse is caught) and then crashes the start
    with a Python traceback (``TypeError: '<' not supported between instances of 'str' and
    'int'`` in ``server.main``; ``max(config.startup_timeout, 150)``; ``sock.listen``).
    operations.md: "a start-up failure is one line, exit 1"; CHANGELOG: "a ``--config`` that
    does not parse is one line". Expected: one line naming the key, exit 2, no traceback."""
    config = tmp_path / "hypercorn.toml"
    config.write_text(f'worker_class = "trio"\nbind = ["127.0.0.1:0"]\n{line}\n')
    svc = await Service.start(tmp_path, ["--config", str(config)], _env(tmp_path))
    code = -1
    try:
        url = await svc.serving_or_exited()
    finally:
        with trio.move_on_after(3 * GUARD, shield=True):
            code = await svc.stop()
    out = svc.text()
    assert "Traceback" not in out, out[-3000:]
    assert url is None
    assert code == 2, (code, out[-2000:])
    last = out.strip().splitlines()[-1]
    assert last.startswith("service: "), out[-2000:]
    assert line.split()[0] in last, out[-2000:]


async def test_a_quoted_graceful_timeout_is_refused_at_start_not_crashing_the_shutdown(
    tmp_path: Path,
) -> None:
    """``graceful_timeout = "5"`` in ``hypercorn.toml`` is accepted: the service starts and
    serves, and only the SIGTERM meant to drain it finds the string
    (``hypercorn/trio/run.py``: ``trio.current_time() + config.graceful_timeout``): a
    TypeError traceback (an ExceptionGroup of several screens) and exit 1, the graceful
    shutdown that operations.md promises ("SIGTERM ... the process exits 0") never happens, and
    the supervisor's record says the service failed at every stop. A bad value must stop the
    start (one line, exit 2), where the operator is watching, not the first deploy's stop."""
    config = tmp_path / "hypercorn.toml"
    config.write_text('worker_class = "trio"\nbind = ["127.0.0.1:0"]\ngraceful_timeout = "5"\n')
    svc = await Service.start(tmp_path, ["--config", str(config)], _env(tmp_path))
    code = -1
    try:
        url = await svc.serving_or_exited()
        if url is not None:
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                assert (await http.get("/healthz")).status_code == 200
    finally:
        with trio.move_on_after(3 * GUARD, shield=True):
            code = await svc.stop()
    out = svc.text()
    assert "Traceback" not in out, out[-3000:]
    assert url is None, "started with graceful_timeout a string"
    assert code == 2, (code, out[-2000:])


# -- SERVICE_DB: a PostgreSQL URL mistyped ---------------------------------------------------


@pytest.mark.parametrize("db", [
    "postgresql:/service:S3cretPw@db.internal:5432/service",  # one slash
    "postgresql:service:S3cretPw@db.internal:5432/service",  # none
], ids=["one-slash", "no-slash"])
async def test_a_mistyped_postgresql_url_stops_the_start_without_showing_its_password(
    tmp_path: Path, db: str,
) -> None:
    """``SERVICE_DB`` holding a PostgreSQL URL with a slash missing after the scheme:

    * ``postgresql:/user:pw@host/db`` is refused (exit 2), but its one line echoes the whole
      value, password included: ``settings.load_settings`` redacts only ``//...@``
      (``text.redact_userinfo``), and this URL has no ``//``. Start-up errors go to stderr and
      from there to journald / the cluster's log store (the code's own comment on ``_redact``).
    * ``postgresql:user:pw@host/db`` is not even seen as a URL (``_store_location`` wants
      ``scheme:/``): it becomes a SQLite *path*, the service starts on a new empty SQLite file
      in a directory named after the credentials (``./postgresql:user:pw@host:5432/db``) and
      logs the password in its ``store open`` line. The operator meant the shared database;
      each host now keeps its own data, silently.

    operations.md, ``SERVICE_DB``: "a SQLite path, or a PostgreSQL URL ...; anything else stops
    the start with one line"; "What is shown to whom": credentials are never shown. Expected:
    exit 2, one line, the password nowhere in the output, nothing created."""
    svc = await Service.start(tmp_path, ["--bind", "127.0.0.1:0"],
                              _env(tmp_path, SERVICE_DB=db), cwd=tmp_path)
    code = -1
    try:
        url = await svc.serving_or_exited()
    finally:
        with trio.move_on_after(3 * GUARD, shield=True):
            code = await svc.stop()
    out = svc.text()
    assert "S3cretPw" not in out, out[-2000:]
    assert url is None, f"served on {url} with SERVICE_DB={db!r} taken for a SQLite path"
    assert code == 2, (code, out[-2000:])
    assert not [name for name in os.listdir(tmp_path) if "postgres" in name]


# -- logs --------------------------------------------------------------------------------------


async def test_debug_logging_never_shows_an_api_key(tmp_path: Path) -> None:
    """With ``SERVICE_LOG_LEVEL=DEBUG`` (a documented setting, what an operator turns on to
    chase a problem), a client speaking HTTP/2 (h2c on the plain port, which hypercorn serves
    and ``service/h2streams.py`` hardens) has its ``Authorization`` header written to the log
    in clear: the ``hpack.hpack`` logger's "Decoded (b'authorization', b'Bearer <key>')".
    ``service/logs.py:configure_logging`` sets the root logger to the level and quiets only
    ``httpx``. The keys are the service's only authentication (operations.md, "What is shown to
    whom": a token "is never logged"; a key must not be either); logs are shipped and read by
    more people than hold keys. Expected: no key in any log line at any level."""
    key = "sk-review-K3y-0000000000000000"
    env = _env(tmp_path, SERVICE_LOG_LEVEL="DEBUG", SERVICE_API_KEYS=key)
    svc = await Service.start(tmp_path, ["--bind", "127.0.0.1:0", "--config",
                                         str(ROOT / "hypercorn.toml")], env)
    code = -1
    try:
        url = await svc.serving_or_exited()
        assert url is not None, svc.text()[-2000:]
        async with httpx.AsyncClient(base_url=url, http1=False, http2=True,
                                     timeout=10) as http:
            r = await http.get("/api/conversations", headers={"authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
            assert r.http_version == "HTTP/2"
    finally:
        with trio.move_on_after(3 * GUARD, shield=True):
            code = await svc.stop()
    assert code == 0
    leaked = [line for line in svc.text().splitlines() if key in line]
    assert not leaked, leaked[:3]


# -- SERVICE_* settings ------------------------------------------------------------------------


async def test_a_misspelt_api_keys_variable_does_not_serve_without_authentication(
    tmp_path: Path,
) -> None:
    """``SERVICE_API_KEY=...`` (the singular: one letter from ``SERVICE_API_KEYS``) is ignored
    without a word (``Settings.model_config``: ``extra="ignore"``; no check of the
    ``SERVICE_*`` names given): the service starts with no authentication at all and answers
    every conversation to anyone who can reach it, while the operator believes it is keyed.
    operations.md: settings are "validated at start-up: a bad value stops the process with one
    line naming the variable"; a variable of the service's own prefix that names no setting is
    the same mistake, and here the most costly one. Expected: the start stops (exit 2) with a
    line naming ``SERVICE_API_KEY``, or at the very least the log says it was not used; never
    an open service and a silent log."""
    env = _env(tmp_path, SERVICE_API_KEY="sk-meant-to-be-required")
    svc = await Service.start(tmp_path, ["--bind", "127.0.0.1:0", "--config",
                                         str(ROOT / "hypercorn.toml")], env)
    code = -1
    status = None
    try:
        url = await svc.serving_or_exited()
        if url is not None:
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                status = (await http.get("/api/conversations")).status_code
    finally:
        with trio.move_on_after(3 * GUARD, shield=True):
            code = await svc.stop()
    out = svc.text()
    if url is None:
        assert code == 2, out[-2000:]
        assert "SERVICE_API_KEY" in out.strip().splitlines()[-1], out[-2000:]
    else:
        assert "SERVICE_API_KEY" in out, (
            f"served with no authentication (GET /api/conversations: {status}) and said "
            "nothing of SERVICE_API_KEY")


async def test_workers_0_in_the_config_is_served_as_hypercorn_serves_it(tmp_path: Path) -> None:
    """``workers = 0`` in ``hypercorn.toml`` is hypercorn's own single-process mode (no master
    process), and operations.md describes running the service that way ("with ``workers = 0``
    SIGTERM is graceful too"); API.md: "``python -m service`` serves with ``hypercorn.toml``
    (bind, workers, graceful timeout)". The same file makes ``python -m service`` refuse to
    start with "service: --workers must be at least 1" (``server.main``), naming a flag the
    operator never passed, so switching a unit from the hypercorn CLI to ``python -m service``
    (as operations.md advises for process managers) fails on a file both are said to read.
    Expected: served in one process, like ``workers = 1``."""
    config = tmp_path / "hypercorn.toml"
    config.write_text('worker_class = "trio"\nbind = ["127.0.0.1:0"]\nworkers = 0\n'
                      'graceful_timeout = 5\n')
    svc = await Service.start(tmp_path, ["--config", str(config)], _env(tmp_path))
    code = -1
    try:
        url = await svc.serving_or_exited()
        if url is not None:
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                assert (await http.get("/healthz")).status_code == 200
    finally:
        with trio.move_on_after(3 * GUARD, shield=True):
            code = await svc.stop()
    assert url is not None, svc.text()[-2000:]
    assert code == 0, svc.text()[-2000:]
