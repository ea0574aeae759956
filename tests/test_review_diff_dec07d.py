"""Review (dec07d) of the changes 00ffb0b, d2c5c03 and 6b3c656: a conversation's server kept
only within the best tier up (service/backends/router.py), Ollama's quoted tool-call text
(service/errors.py), a streamed tool call's TTFT and the load gauges (d2c5c03), and the
start-up checks (settings paths, hypercorn.toml types, max_requests, SIGINT).

Each test fails on the code as reviewed, for the defect its docstring names, and passes once
that defect is fixed. Nothing here depends on wall-clock time (timeouts are hang guards only);
the one test that starts ``python -m service --workers 2`` (on 127.0.0.1, its port chosen at
run time) stops and reaps it, and its workers, in a ``finally``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from service.backends.base import ChatMessage, ChatRequest
from service.backends.router import FleetBackend, Member
from service.errors import ConfigError
from service.server import build_config
from service.settings import load_settings

from .fakes import ScriptedBackend

_NO_SUCH_USER = "~zz-review-no-such-user"  # a ``~user`` prefix naming no account here


def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No SERVICE_* of the caller's; the working directory a scratch one (a path setting that
    is taken literally lands there, never in the repository)."""
    for name in list(os.environ):
        if name.startswith("SERVICE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


# -- 1. a leading "~user" no account has: a traceback, not one line --------------------------


@pytest.mark.parametrize("variable", ["SERVICE_DB", "SERVICE_GGUF", "SERVICE_BACKENDS_FILE"])
def test_a_tilde_path_naming_no_user_is_one_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str,
) -> None:
    """6b3c656 made a path setting's leading ``~`` the home directory
    (``Path(value).expanduser()`` in ``settings._path``). ``Path.expanduser`` raises
    ``RuntimeError("Could not determine home directory.")`` for ``~name`` when no account
    ``name`` exists (and for ``~`` with no ``HOME`` and no passwd entry: a container run under
    an arbitrary uid). A field validator's RuntimeError is not a pydantic ValidationError, so
    ``load_settings`` does not turn it into its ConfigError: ``python -m service`` dies with a
    traceback ending ``RuntimeError: Could not determine home directory.``, where API.md says
    of SERVICE_DB "anything else stops the start with one line" (exit 2, naming the variable).
    Before the change the value was a relative path (a directory named "~zz..."), never a
    crash.

    Right: ``load_settings`` either takes the value (unexpanded) or raises ConfigError naming
    the variable; never another exception. (The same unguarded ``expanduser`` is in
    service/demo.py's ``demo_overrides`` for SERVICE_GGUF.)

    Root cause: service/settings.py ``_path`` calls ``Path(value).expanduser()`` without
    catching RuntimeError (raise ValueError from it, so pydantic reports the field)."""
    _clean_env(monkeypatch, tmp_path)
    monkeypatch.setenv(variable, f"{_NO_SUCH_USER}/file")
    told: str | None = None
    try:
        load_settings()
    except ConfigError as exc:  # one line naming the variable: right
        told = exc.message
    except RuntimeError as exc:  # the defect: a traceback at start
        pytest.fail(f"{variable}={_NO_SUCH_USER}/file: {type(exc).__name__}: {exc} escapes "
                    f"load_settings (a traceback at start, not one line)")
    assert told is None or variable in told, told


def test_demo_with_a_tilde_model_path_naming_no_user_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    """As above for ``python -m service --demo``: service/demo.py ``demo_overrides`` (changed in
    6b3c656) does ``Path(os.environ.get("SERVICE_GGUF") or DEMO_MODEL).expanduser()`` outside
    any check: ``SERVICE_GGUF=~nobody-here/m.gguf --demo`` is a RuntimeError traceback; main()
    only turns a ConfigError into its one line and exit 2."""
    pytest.importorskip("gguf")
    pytest.importorskip("xllamacpp")
    from service.demo import demo_overrides

    _clean_env(monkeypatch, tmp_path)
    monkeypatch.setenv("SERVICE_GGUF", f"{_NO_SUCH_USER}/m.gguf")
    try:
        demo_overrides()
    except ConfigError:
        pass
    except RuntimeError as exc:
        pytest.fail(f"--demo with SERVICE_GGUF={_NO_SUCH_USER}/m.gguf: {exc!r} (a traceback)")


# -- 2. every server down: the conversation's server loses its place ---------------------------


def _named(name: str) -> ScriptedBackend:
    backend = ScriptedBackend()
    backend.name = name  # type: ignore[misc]
    return backend


def _turn(conversation: str) -> ChatRequest:
    return ChatRequest(messages=(ChatMessage("user", "hello"),), model=None,
                       conversation_id=conversation)


async def test_with_every_server_down_the_conversation_keeps_its_server_first() -> None:
    """docs/architecture.md (as 00ffb0b changed it): the conversation's server comes first
    "while it is usable and has a free slot (...; and only while no higher tier is up: a
    conversation that failed over once to llama.cpp goes back to Ollama's server once it is
    up ...)". With every server down (each cooling down, or each known not ready: the router
    then tries everyone), no higher tier is up, yet ``route`` drops the conversation's server
    (the lower tier, whose prompt cache holds the conversation) behind the higher tier, which
    is down as well: the code compares with the best tier of *all* servers when none is up
    (``live = [i for i in usable if i in up] or usable``). Before 00ffb0b it came first.

    Right: with no server up, nothing of a higher tier is up, and the conversation's server
    stays first (as the docs say), as when only the higher tier is down.

    Root cause: service/backends/router.py ``FleetBackend.route``: the ``or usable`` fallback
    of ``live``; with ``live`` empty the affinity should stand."""
    ollama, llamacpp = _named("ollama"), _named("llamacpp")
    fleet = FleetBackend([ollama, llamacpp],
                         [Member(priority=0, kind="ollama"), Member(priority=1, kind="llamacpp")])
    try:
        fleet.served(llamacpp, _turn("conv-1"))  # it failed over there once: its home now
        now = trio.current_time()
        fleet._state[id(ollama)].cooldown_until = now + 60.0  # Ollama down
        only_ollama_down = [b.name for b in fleet.route(_turn("conv-1"))]
        fleet._state[id(llamacpp)].cooldown_until = now + 60.0  # and then llama.cpp too
        all_down = [b.name for b in fleet.route(_turn("conv-1"))]
    finally:
        await fleet.aclose()
    assert only_ollama_down == ["llamacpp"], only_ollama_down
    assert all_down == ["llamacpp", "ollama"], all_down


# -- 3. hypercorn.toml: counts no C int carries refused past 2^31-1 ---------------------------


@pytest.mark.parametrize("line", [
    "keep_alive_max_requests = 4294967295",  # "no limit", as a uint32's highest value
    "websocket_max_message_size = 4294967296",  # 4 GiB
])
def test_a_large_count_hypercorn_reads_as_a_python_int_is_not_refused(
    tmp_path: Path, line: str,
) -> None:
    """6b3c656 bounds every whole-number key of hypercorn.toml by 2^31-1 (``_INT_MAX``, "what
    listen(2) and hypercorn's h2 settings take"). That is right for ``backlog`` (listen) and
    the ``h2_*`` settings, but ``keep_alive_max_requests``, ``websocket_max_message_size`` and
    ``h11_max_incomplete_size`` are only ever compared with Python ints by hypercorn
    (protocol/h11.py, h2.py, ws_stream.py's WebsocketBuffer): a file that served before the
    change (``keep_alive_max_requests = 4294967295`` to mean "no limit") now stops the start,
    exit 2, with "a whole number from 0 to 2147483647 expected", which is not true of it.

    Right: the C-int bound only on the keys that reach C (backlog, the h2 settings); the other
    counts a whole number of at least 0.

    Root cause: service/server.py ``_check_types``: ``most = ... _INT_MAX`` for every key
    whose default is an int."""
    config = tmp_path / "hypercorn.toml"
    config.write_text(f'worker_class = "trio"\nbind = ["127.0.0.1:0"]\n{line}\n')
    try:
        build_config(config, None, required=True)
    except ConfigError as exc:
        pytest.fail(f"a valid hypercorn.toml refused: {exc.message}")


# -- 4. a worker recycled by max_requests cuts its streams without their end --------------------

GUARD = 90.0  # seconds: a hang guard only (a worker's start included)


def test_max_requests_is_refused_in_the_pool_too(tmp_path: Path) -> None:
    """6b3c656 made ``max_requests`` a supported setting of the ``--workers`` pool (refused
    with one process; in the pool "a worker that ends so is logged as recycled"). But the
    recycle is hypercorn's own shutdown (``WorkerContext.terminate``), not the service's:
    ``run_server``'s drain waits for ``stop``, which only a signal sets, so hypercorn closed
    the listener, gave in-flight requests ``graceful_timeout`` and cancelled them: every SSE
    stream open on the recycled worker was cut mid-answer ("incomplete chunked read"),
    without its ``run.finished`` (API.md: "Every stream ends with `run.finished`, whatever
    happened"). Reproduced with a real pool of 2, ``max_requests = 200``, a stream on one
    worker and that worker's other connection sending requests until it recycled.

    Fixed by refusing ``max_requests`` in the pool too (one line naming it, exit 2) until a
    recycle drains as a SIGTERM does."""
    config = tmp_path / "hypercorn.toml"
    config.write_text('worker_class = "trio"\nbind = ["127.0.0.1:0"]\nmax_requests = 200\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    env["SERVICE_DB"] = str(tmp_path / "s.db")
    out = subprocess.run(
        [sys.executable, "-m", "service", "--workers", "2", "--config", str(config)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=GUARD, check=False)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "max_requests" in out.stderr.strip().splitlines()[-1], out.stderr[-3000:]
    assert not (tmp_path / "s.db").exists()  # refused before anything was made
