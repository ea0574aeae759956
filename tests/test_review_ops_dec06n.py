"""Review of the operator documentation (README.md, docs/deploy.md, docs/operations.md) against
the code and the running service (2026-12-06, n). Each test fails on the code as it was
reviewed, because of the defect its docstring names.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest
import trio

from .servers import ROOT

GUARD = 30  # seconds any single wait may take before the test fails


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    # No backend is needed to start (auto: none reachable is a 503 later, not a failed start).
    env.update({"SERVICE_DB": str(tmp_path / "s.db"), "SERVICE_LOG_FORMAT": "text",
                "SERVICE_BACKEND": "llamacpp", "SERVICE_LLAMACPP_URL": "http://127.0.0.1:9",
                **extra})
    return env


async def _start_and_stop(argv: list[str], env: dict[str, str], log: Path,
                          serving: int = 1) -> str:
    """Start ``argv`` (a server printing "Running on ..."), wait until it serves (``serving``
    such lines: one per worker), SIGTERM it, wait for its exit; its whole log."""
    with log.open("wb") as sink:
        proc = await trio.lowlevel.open_process(argv, cwd=ROOT, env=env, stdout=sink,
                                                stderr=sink)
    try:
        with trio.fail_after(GUARD):
            while len(re.findall(rb"Running on http://127\.0\.0\.1:\d+",
                                 await trio.Path(log).read_bytes())) < serving:
                assert proc.returncode is None, await trio.Path(log).read_text()
                await trio.sleep(0.05)  # (a bounded poll of the log, not a timing assumption)
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(GUARD):
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.CancelScope(shield=True), trio.move_on_after(GUARD):
                await proc.wait()
    return await trio.Path(log).read_text()


# -- 1. a misspelt setting is said only under python -m service ------------------------------


@pytest.mark.slow
async def test_hypercorn_cli_names_a_misspelt_setting_at_start(tmp_path: Path) -> None:
    """docs/operations.md ("Running it"): "A ``SERVICE_*`` variable that no setting reads
    (``SERVICE_API_KEY`` for ``SERVICE_API_KEYS``) is named in a warning at start, with the
    closest setting". Under ``python -m service`` it is. Under the other supported entry point,
    ``hypercorn --config hypercorn.toml service.app:app`` (API.md: "must work too"; the docs
    tell systemd users how to run it), nothing is said: an operator who wrote
    ``SERVICE_API_KEY=...`` gets a service with no authentication at all and not a word about
    it. Right: the same warning, whichever entry point builds the app from the environment.
    Root cause: ``settings.unknown_variables`` is only called by ``service/server.py``
    ``main``; ``service/app.py`` ``_app_from_env`` (what hypercorn's CLI imports) loads the
    settings and configures logging but never calls it."""
    env = _env(tmp_path, SERVICE_API_KEY="meant-as-the-key")
    # Under python -m service: said (the control).
    ours = await _start_and_stop(
        [sys.executable, "-m", "service", "--bind", "127.0.0.1:0", "--config",
         str(ROOT / "hypercorn.toml")], env, tmp_path / "ours.log")
    assert "SERVICE_API_KEY is not a setting" in ours, ours
    # Under hypercorn's own CLI, the same process environment.
    theirs = await _start_and_stop(
        [sys.executable, "-m", "hypercorn", "--config", str(ROOT / "hypercorn.toml"),
         "--bind", "127.0.0.1:0", "service.app:app"], env, tmp_path / "hypercorn.log")
    assert "SERVICE_API_KEY is not a setting" in theirs, theirs


@pytest.mark.slow
async def test_hypercorn_cli_with_workers_names_a_misspelt_setting_once(tmp_path: Path) -> None:
    # ``workers = N`` under hypercorn's CLI: N spawned processes, one environment. The warning
    # came once per worker (N times the same line); once is what is meant.
    env = _env(tmp_path, SERVICE_API_KEY="meant-as-the-key")
    text = await _start_and_stop(  # both workers serving: each has built its app
        [sys.executable, "-m", "hypercorn", "--config", str(ROOT / "hypercorn.toml"),
         "--bind", "127.0.0.1:0", "--workers", "2", "service.app:app"], env,
        tmp_path / "workers.log", serving=2)
    assert text.count("SERVICE_API_KEY is not a setting") == 1, text


# -- 2. hypercorn's CLI: its own lines again, not JSON ---------------------------------------


@pytest.mark.slow
async def test_hypercorn_cli_logs_are_json_lines_each_once(tmp_path: Path) -> None:
    """docs/operations.md: ``SERVICE_LOG_FORMAT`` ``json`` (the default) is "one object per
    line, with ``request_id``"; "Logs are JSON lines with ``request_id`` by default". Served as
    the docs say, ``hypercorn --config hypercorn.toml service.app:app``, every message of
    hypercorn's (``Running on ...``, a worker's errors) is written twice: once as the JSON
    object, once as hypercorn's own plain text (``[date] [pid] [INFO] Running on ...``), which
    a log shipper reading JSON lines chokes on (and a grep counts twice). Right: each record
    once, as one JSON object, as under ``python -m service``. Root cause: the repository's
    ``hypercorn.toml`` says ``errorlog = "-"``; hypercorn's ``logging._create_logger`` then
    puts a ``StreamHandler`` of its own on the ``hypercorn.error`` logger, after
    ``service/app.py`` ``_app_from_env``'s ``configure_logging`` cleared it, and leaves it
    propagating to the root's JSON handler. ``server.build_config`` avoids it for
    ``python -m service`` (``config.errorlog = logging.getLogger("hypercorn.error")``);
    ``service/drainfirst.py`` ``_serve`` (hypercorn's entry points) does not."""
    env = _env(tmp_path, SERVICE_LOG_FORMAT="json")
    text = await _start_and_stop(
        [sys.executable, "-m", "hypercorn", "--config", str(ROOT / "hypercorn.toml"),
         "--bind", "127.0.0.1:0", "service.app:app"], env, tmp_path / "hypercorn.log")
    lines = [line for line in text.splitlines() if line.strip()]
    not_json = [line for line in lines if not line.startswith("{")]
    assert not_json == [], text
    assert sum("Running on http://127.0.0.1:" in line for line in lines) == 1, text
