"""``python -m service``: starts, answers, exits 0 on SIGTERM; a bad setting fails in one line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from ..servers import ROOT


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    env.update({"SERVICE_DB": str(tmp_path / "s.db"), "SERVICE_LOG_FORMAT": "json", **extra})
    return env


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_serves_and_exits_0_on_signal(tmp_path: Path, sig: signal.Signals) -> None:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "service", "--bind", "127.0.0.1:0"],
        cwd=ROOT, env=_env(tmp_path), stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    log = b""
    url = None
    with trio.fail_after(30):
        while url is None:
            chunk = await proc.stderr.receive_some(65536)
            assert chunk, f"exited early: {log.decode()}"
            log += chunk
            m = re.search(rb"Running on (http://127\.0\.0\.1:\d+)", log)
            url = m.group(1).decode() if m else None
    async with httpx.AsyncClient(base_url=url) as client:
        r = await client.get("/healthz")
        assert r.status_code == 200
        r = await client.post("/api/conversations", json={"title": "kept"})
        assert r.status_code == 201
    proc.send_signal(sig)
    # hypercorn.toml's graceful_timeout is 10 s; idle, the exit is immediate.
    with trio.fail_after(15):
        async for chunk in proc.stderr:
            log += chunk
        rc = await proc.wait()
    assert rc == 0, log.decode()
    lines = [json.loads(line) for line in log.decode().splitlines() if line.startswith("{")]
    assert any("shutting down gracefully" in line["msg"] for line in lines)
    assert any(line["msg"] == "store closed" for line in lines)
    assert "Traceback" not in log.decode()


@pytest.mark.parametrize(
    ("var", "value"),
    [("SERVICE_RUN_TIMEOUT", "soon"), ("SERVICE_BACKEND", "gpt"), ("SERVICE_MAX_RUNS", "0"),
     ("SERVICE_OLLAMA_URL", "ftp://x"),
     ("SERVICE_API_KEYS", " , ")],  # would have turned authentication off without a word
)
def test_bad_setting_stops_with_one_line(tmp_path: Path, var: str, value: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "service"], cwd=ROOT, env=_env(tmp_path, **{var: value}),
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert var in lines[0]
    assert "Traceback" not in out.stderr


def test_a_taken_port_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    # Found in review: hypercorn binds after the app has started, and its OSError went out as
    # a multi-level exception-group traceback.
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
        env["SERVICE_DB"] = str(tmp_path / "s.db")
        out = subprocess.run([sys.executable, "-m", "service", "--bind", f"127.0.0.1:{port}"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
                             check=False)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith(f"service: cannot listen on 127.0.0.1:{port}: "), line


def test_start_up_may_take_as_long_as_the_embedded_model_load() -> None:
    # Found in review: hypercorn's 60 s start-up limit cut a model load that the embedded
    # backend allows 120 s, with a traceback.
    from service.server import build_config

    assert build_config(ROOT / "hypercorn.toml", None).startup_timeout >= 150
    assert build_config(None, None).startup_timeout >= 150


def test_a_failed_start_announces_no_address(tmp_path: Path) -> None:
    # Found in a fault review: hypercorn logged "Running on http://..." for a start-up that had
    # failed (here: the store cannot be created under a file), just before the one-line error.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = subprocess.run(
        [sys.executable, "-m", "service", "--bind", "127.0.0.1:0"], cwd=ROOT,
        env=_env(tmp_path, SERVICE_DB=str(blocker / "s.db")),
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert out.returncode == 1, out.stderr
    assert "Running on" not in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("service: SERVICE_DB: ")


def test_sigint_before_the_graceful_shutdown_can_take_it_exits_130_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A SIGINT that arrives before the signal receiver is open (during start-up) reaches
    # trio's default handler, which raises KeyboardInterrupt in the main task, and trio hands
    # it out of the nursery inside an exception group: serve_one re-raised that (a
    # traceback), and its bare `except KeyboardInterrupt` would have returned 0 for a
    # shutdown that was not the graceful one.
    from service import server

    async def start_up_interrupted(*args: object, **kwargs: object) -> int:
        signal.raise_signal(signal.SIGINT)  # a real signal, to this process
        await trio.sleep(5)
        raise AssertionError("the SIGINT did not interrupt the start-up")

    monkeypatch.setattr(server, "run_server", start_up_interrupted)
    assert server.serve_one(None, None) == 130  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert err.strip() == "service: interrupted (SIGINT) outside the graceful shutdown"


def test_every_setting_left_empty_is_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    # docs/operations.md: "An empty value (`SERVICE_DB=`, as an env file or compose leaves a
    # variable unset) is the default". Found in review: that held for the paths and lists
    # only; an empty SERVICE_BACKEND, SERVICE_RUN_TIMEOUT, SERVICE_LLAMACPP_URL or
    # SERVICE_LOG_LEVEL stopped the start (exit 2).
    from service.settings import Settings, load_settings

    for name in list(os.environ):
        if name.startswith("SERVICE_"):
            monkeypatch.delenv(name)
    default = load_settings()
    for field in Settings.model_fields:
        monkeypatch.setenv(f"SERVICE_{field.upper()}", "")
    assert load_settings() == default
