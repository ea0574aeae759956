"""Review (Dec 07, b): settings, start-up and shutdown as an operator meets them.

Every test runs ``python -m service`` as a real process (127.0.0.1, ports chosen at run time)
and kills what it started in a ``finally``. The failing ones are defects found in the review;
the passing ones pin behaviour an operator relies on.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from .servers import ROOT

pytestmark = pytest.mark.slow

_SAFETY = 90.0  # seconds: a safety net only, never a measure of speed


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a service under test: no SERVICE_* of the caller's, a store in
    ``tmp_path``, a backend that is down (port 9: nothing listens; a start does not need it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    env.update({"SERVICE_DB": str(tmp_path / "s.db"), "SERVICE_BACKEND": "llamacpp",
                "SERVICE_LLAMACPP_URL": "http://127.0.0.1:9", "SERVICE_LOG_FORMAT": "json",
                **extra})
    return env


@contextmanager
def _service(args: list[str], env: dict[str, str], cwd: Path) -> Iterator[subprocess.Popen[str]]:
    """``python -m service ARGS``, its stderr piped; killed whatever happens."""
    proc = subprocess.Popen([sys.executable, "-m", "service", *args], cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=_SAFETY)


def _wait_for_reader(fifo: Path, proc: subprocess.Popen[str]) -> int:
    """Open ``fifo`` for writing once a reader has it open (the process under test is then
    blocked reading it); the write end's descriptor."""
    deadline = time.monotonic() + _SAFETY
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
        assert proc.poll() is None, proc.communicate(timeout=_SAFETY)[1]
        assert time.monotonic() < deadline, "the service never reached the blocking read"
        time.sleep(0.02)


# -- defects -------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_a_backlog_too_large_for_listen_is_one_line_naming_it_not_a_traceback(
    tmp_path: Path, workers: int
) -> None:
    # Found in review: `_check_types` accepts any whole number >= 0 for hypercorn's integer
    # keys; `backlog = 99999999999` (a typo, an extra digit or three) passes, and
    # `sock.listen(backlog)` then raises OverflowError inside hypercorn's worker_serve, after
    # the store has been opened. One process: a 60-line exception-group traceback (the
    # `_bind_error` filter only recognises errors raised in `create_sockets`). --workers 2: one
    # line, but blaming the address ("cannot listen on 127.0.0.1:0: signed integer is greater
    # than maximum"), not the key.
    config = tmp_path / "hypercorn.toml"
    config.write_text(f'worker_class = "trio"\nbind = ["127.0.0.1:0"]\nworkers = {workers}\n'
                      "backlog = 99999999999\n")
    out = subprocess.run([sys.executable, "-m", "service", "--config", str(config)],
                         cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                         timeout=_SAFETY, check=False)
    assert out.returncode in (1, 2), out.stderr
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("service: "), out.stderr[-3000:]
    assert "backlog" in last, last


def test_sigint_while_the_settings_are_read_is_one_line_and_130_as_documented(
    tmp_path: Path,
) -> None:
    # docs/operations.md: "A SIGINT that comes before the signal handler is in place (early in
    # start-up) is not that shutdown: one line, `service: interrupted (SIGINT) outside the
    # graceful shutdown`, exit 130." Only a SIGINT inside `trio.run` gets that: one during the
    # imports, `load_settings` (which reads SERVICE_BACKENDS_FILE), `build_config` or
    # `create_app` is Python's KeyboardInterrupt traceback and status -2. (Seen with no trick
    # at all: `python -m service` and Ctrl+C within its first second.) A FIFO as the fleet
    # file holds the start inside `load_settings` so the signal lands there every time.
    fifo = tmp_path / "fleet.toml"
    os.mkfifo(fifo)
    env = _env(tmp_path, SERVICE_BACKENDS_FILE=str(fifo))
    with _service(["--bind", "127.0.0.1:0", "--config", str(ROOT / "hypercorn.toml")],
                  env, tmp_path) as proc:
        writer = _wait_for_reader(fifo, proc)
        try:
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=_SAFETY)
        finally:
            os.close(writer)
    assert "Traceback" not in err, err[-3000:]
    assert "KeyboardInterrupt" not in err, err[-3000:]
    assert proc.returncode == 130, (proc.returncode, err[-3000:])
    assert err.strip().splitlines()[-1] == (
        "service: interrupted (SIGINT) outside the graceful shutdown"), err[-3000:]
    assert not (tmp_path / "s.db").exists()  # nothing was started


def test_backend_embedded_without_a_model_is_refused_before_the_store_is_made(
    tmp_path: Path,
) -> None:
    # Found in review: SERVICE_BACKEND=embedded with no SERVICE_GGUF is a combination of
    # settings that can be judged without using anything, yet it is only found in the
    # lifespan: the store is created first (here a new directory and SQLite file), then the
    # start stops with exit 1, the status docs/operations.md keeps for what "can only be
    # checked by using it" (a bad value: exit 2, before anything is made).
    db = tmp_path / "data" / "service.db"
    out = subprocess.run(
        [sys.executable, "-m", "service", "--bind", "127.0.0.1:0", "--config",
         str(ROOT / "hypercorn.toml")],
        cwd=tmp_path, env=_env(tmp_path, SERVICE_BACKEND="embedded", SERVICE_DB=str(db)),
        capture_output=True, text=True, timeout=_SAFETY, check=False)
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "SERVICE_GGUF" in last, out.stderr
    assert out.returncode == 2, out.stderr
    assert not db.parent.exists(), "the store was made for a start that could never serve"


def _start_or_exit(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int | None, str]:
    """Start ``python -m service``: (None, its log so far) once it serves (it is then stopped
    with SIGTERM and waited for), or (its exit status, its stderr) if it exits first."""
    with _service(args, env, cwd) as proc:
        assert proc.stderr is not None
        seen = ""
        deadline = time.monotonic() + _SAFETY
        while "Running on http://" not in seen:
            line = proc.stderr.readline()
            if not line:  # it exited
                proc.wait(timeout=_SAFETY)
                return proc.returncode, seen
            seen += line
            assert time.monotonic() < deadline, seen
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=_SAFETY)
        assert proc.returncode == 0, seen + rest
        return None, seen + rest


@pytest.mark.parametrize(("var", "extra"), [
    ("SERVICE_DB", {}),
    ("SERVICE_GGUF", {"SERVICE_BACKEND": "auto"}),
    ("SERVICE_BACKENDS_FILE", {}),
    ("SERVICE_OLLAMA_CA_BUNDLE", {}),
])
def test_an_empty_path_setting_is_not_taken_for_the_working_directory(
    tmp_path: Path, var: str, extra: dict[str, str]
) -> None:
    # Found in review: `VAR=` (an env file's way of leaving a setting unset: docker compose's
    # `${X}` with X unset, a Helm value "") makes every path setting Path("") == ".", the
    # working directory: SERVICE_DB= opens the directory as the store ("cannot open store
    # /srv/app: Is a directory", exit 1, after the lifespan started), SERVICE_GGUF= under
    # auto creates the store and then fails with "model file not found: .", SERVICE_BACKENDS_FILE=
    # and SERVICE_OLLAMA_CA_BUNDLE= fail on "." being a directory. The list settings already
    # take an empty value as none (SERVICE_TOOLS=, SERVICE_API_KEYS= serve), and API.md gives
    # these optional ones the default "unset". Either reading is fine (empty = unset or the
    # default, or a one-line refusal at validation, exit 2, saying it is empty); taking the
    # working directory is not.
    env = _env(tmp_path, **extra)
    env[var] = ""
    code, log = _start_or_exit(
        ["--bind", "127.0.0.1:0", "--config", str(ROOT / "hypercorn.toml")], env, tmp_path)
    assert "Traceback" not in log, log[-3000:]
    if code is None:  # served: the empty value was read as unset (or, for the store, default)
        return
    last = log.strip().splitlines()[-1]
    assert code == 2, log[-3000:]
    assert var in last, last
    assert "Is a directory" not in last, last
    assert ": ." not in last, last
    assert " . " not in last, last


def test_a_store_path_starting_with_a_tilde_does_not_make_a_directory_named_tilde(
    tmp_path: Path,
) -> None:
    # Found in review: SERVICE_DB=~/svc/service.db (as written in a systemd unit or an env
    # file, where no shell expands "~") silently creates a directory literally named "~" in the
    # working directory and serves from ./~/svc/service.db: the conversations are not where
    # the operator looks, and the natural clean-up, `rm -rf ~`, deletes the home directory.
    # Either expand it (Path.expanduser) or refuse it at validation in one line.
    home = tmp_path / "home"
    home.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    env = _env(tmp_path, SERVICE_DB="~/svc/service.db", HOME=str(home))
    code, log = _start_or_exit(
        ["--bind", "127.0.0.1:0", "--config", str(ROOT / "hypercorn.toml")], env, work)
    assert "Traceback" not in log, log[-3000:]
    assert not (work / "~").exists(), "a directory named '~' was made in the working directory"
    if code is None:
        assert (home / "svc" / "service.db").is_file(), log[-3000:]
    else:
        assert code == 2, log[-3000:]
        assert "SERVICE_DB" in log.strip().splitlines()[-1], log[-3000:]


def test_a_server_names_string_is_not_matched_as_a_substring(tmp_path: Path) -> None:
    # Found in review: `_check_types` promises that each hypercorn key of the file holds its
    # default's type, but checks no list but `bind`. `server_names = "example.com"` (a string,
    # as `bind` may be) is accepted, and hypercorn's Host check (`host in
    # config.server_names`, its DNS-rebinding guard) then matches substrings: a request for
    # Host "ample.com", "e.com" or "x" is served, where the list ["example.com"] answers 404.
    # Either refuse it (one line, exit 2, naming server_names) or read it as a list of one,
    # as `bind` is.
    config = tmp_path / "hypercorn.toml"
    config.write_text('worker_class = "trio"\nbind = ["127.0.0.1:0"]\n'
                      'server_names = "example.com"\n')
    with _service(["--config", str(config)], _env(tmp_path), tmp_path) as proc:
        assert proc.stderr is not None
        seen = ""
        deadline = time.monotonic() + _SAFETY
        while (m := re.search(r"Running on (http://127\.0\.0\.1:\d+)", seen)) is None:
            line = proc.stderr.readline()
            if not line:  # refused at start: fine, if it says so
                proc.wait(timeout=_SAFETY)
                assert proc.returncode == 2, seen
                assert "server_names" in seen.strip().splitlines()[-1], seen
                return
            seen += line
            assert time.monotonic() < deadline, seen
        with httpx.Client(base_url=m.group(1), timeout=30) as client:
            assert client.get("/healthz", headers={"Host": "example.com"}).status_code == 200
            for host in ("ample.com", "e.com", "x"):
                r = client.get("/healthz", headers={"Host": host})
                assert r.status_code == 404, (host, r.status_code)


def test_max_requests_in_the_config_does_not_silently_stop_the_one_process(
    tmp_path: Path,
) -> None:
    # Found in review: hypercorn's `max_requests` (recycle a worker after N requests: its
    # master starts another) is accepted from hypercorn.toml ("a whole number of at least 0"),
    # but `python -m service` with one process (the default, workers = 1) has no master to
    # start another: after N+1 requests the service drains and exits 0, with no line saying
    # why; a process manager's Restart=on-failure leaves it down, and `max_requests = 0`
    # stops it after its first request. Refuse the key for one process (one line, exit 2),
    # or keep serving (replace the process, as --workers does).
    config = tmp_path / "hypercorn.toml"
    config.write_text('worker_class = "trio"\nbind = ["127.0.0.1:0"]\nmax_requests = 2\n')
    with _service(["--config", str(config)], _env(tmp_path), tmp_path) as proc:
        assert proc.stderr is not None
        seen = ""
        deadline = time.monotonic() + _SAFETY
        while (m := re.search(r"Running on (http://127\.0\.0\.1:\d+)", seen)) is None:
            line = proc.stderr.readline()
            if not line:  # refused at start: fine, if it says so
                proc.wait(timeout=_SAFETY)
                assert proc.returncode == 2, seen
                assert "max_requests" in seen.strip().splitlines()[-1], seen
                return
            seen += line
            assert time.monotonic() < deadline, seen
        with httpx.Client(base_url=m.group(1), timeout=30) as client:
            for i in range(6):
                try:
                    status = client.get("/healthz").status_code
                except httpx.TransportError as exc:
                    pytest.fail(f"request {i + 1}: {exc!r}; the service exited "
                                f"{proc.poll()}")
                assert status == 200, (i, status)
        assert proc.poll() is None, "the service stopped by itself"


# -- behaviour pinned -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def _simulator() -> Iterator[str]:
    """The repository's llama.cpp simulator in a process of its own (a long, slow answer);
    its base URL once it answers /health."""
    port = _free_port()
    sim = subprocess.Popen([sys.executable, "-m", "service.sim", "--port", str(port),
                            "--tokens", "400", "--interval", "0.05"], cwd=ROOT,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + _SAFETY
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert sim.poll() is None, "the simulator exited"
            assert time.monotonic() < deadline, "the simulator never answered"
            time.sleep(0.05)
        yield url
    finally:
        sim.kill()
        sim.wait(timeout=_SAFETY)


def test_a_second_and_third_signal_during_the_drain_change_nothing(tmp_path: Path) -> None:
    # SIGTERM while a streamed answer is in flight, then SIGTERM and SIGINT again during the
    # drain (an operator, or a process manager, insisting): the drain goes on, the stream gets
    # its end, the store is closed, exit 0, no traceback, and the port is free afterwards.
    port = _free_port()
    with _simulator() as sim_url:
        env = _env(tmp_path, SERVICE_LLAMACPP_URL=sim_url, SERVICE_SHUTDOWN_DRAIN="2")
        with _service(["--bind", f"127.0.0.1:{port}", "--config",
                       str(ROOT / "hypercorn.toml")], env, tmp_path) as proc:
            assert proc.stderr is not None
            seen = ""
            deadline = time.monotonic() + _SAFETY
            while "Running on http://127.0.0.1:" not in seen:
                line = proc.stderr.readline()
                assert line, f"exited early: {seen}"
                seen += line
                assert time.monotonic() < deadline, seen
            body = {"model": "sim-model", "stream": True,
                    "messages": [{"role": "user", "content": "hi"}]}
            lines: list[str] = []
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions",
                              json=body, timeout=_SAFETY) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    lines.append(line)
                    if len(lines) == 1:  # the answer is streaming: stop the service
                        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT):
                            proc.send_signal(sig)
            _, err = proc.communicate(timeout=_SAFETY)
    log = seen + err
    assert proc.returncode == 0, log
    assert "Traceback" not in log, log
    assert "already shutting down" in log, log
    assert '"msg": "store closed"' in log, log
    assert any("shutting_down" in line for line in lines), lines[-3:]
    with socket.socket() as again, pytest.raises(ConnectionRefusedError):
        again.connect(("127.0.0.1", port))  # nothing left listening


def test_a_keepalive_of_a_microsecond_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Found in review (no test then): SERVICE_SSE_KEEPALIVE=0.000001 was accepted (gt=0), and
    # one idle WebSocket kept a core busy with pings. At least 0.1 s; one line naming it.
    from service.errors import ConfigError
    from service.settings import load_settings

    monkeypatch.setenv("SERVICE_SSE_KEEPALIVE", "0.000001")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "SERVICE_SSE_KEEPALIVE" in caught.value.message
    monkeypatch.setenv("SERVICE_SSE_KEEPALIVE", "0.1")
    assert load_settings().sse_keepalive == 0.1


def test_smaller_settings_slips_from_the_review(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    # Found in review (no test then): SERVICE_DB=data/ made a SQLite file named "data"; a
    # fleet file took `timeouts = { idle = inf }`, which SERVICE_LLM_IDLE_TIMEOUT refuses; and
    # repr(Settings) showed the API keys (no line logs it today; one added later would).
    from service.errors import ConfigError
    from service.settings import load_settings

    monkeypatch.setenv("SERVICE_DB", str(tmp_path / "data") + "/")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "SERVICE_DB" in caught.value.message
    assert "directory" in caught.value.message
    monkeypatch.setenv("SERVICE_DB", str(tmp_path / "s.db"))
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[[server]]\nname = "a"\nkind = "llamacpp"\nurl = "http://127.0.0.1:1"\n'
                     "timeouts = { idle = inf }\n")
    monkeypatch.setenv("SERVICE_BACKENDS_FILE", str(fleet))
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "idle" in caught.value.message, caught.value.message
    monkeypatch.delenv("SERVICE_BACKENDS_FILE")
    monkeypatch.setenv("SERVICE_API_KEYS", "sekrit-key-1")
    settings = load_settings()
    assert settings.api_keys == ("sekrit-key-1",)
    assert "sekrit-key-1" not in repr(settings)
    assert "sekrit-key-1" not in str(settings)
