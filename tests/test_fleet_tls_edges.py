"""Backend fleets and upstream TLS configuration at their edges (a review of 2026-12-05).

Each test here failed on the code it was written against; its docstring says what is wrong and
what the documented behaviour is (API.md, docs/architecture.md "Backend fleets",
docs/operations.md "Settings": a bad setting stops the start with one line, exit 2).

Real processes and simulated upstreams on 127.0.0.1 only; every wait is bounded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio
import trustme
from cryptography.hazmat.primitives import serialization

from service.backends import build_backend, client_from_settings
from service.backends.base import ChatMessage, ChatRequest
from service.backends.fleet import load_fleet_file
from service.errors import ConfigError
from service.settings import Settings, load_settings
from service.sim import Reply, Simulator, open_simulator
from service.sim.scenario import SimResponse, Sleep

ROOT = Path(__file__).resolve().parents[1]
GUARD = 10  # seconds any wait may take


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    env.update(extra)
    return env


def _start(tmp_path: Path, env: dict[str, str], *, stdin: int) -> subprocess.Popen[bytes]:
    """``python -m service`` on 127.0.0.1:0, in a session of its own (no controlling
    terminal: OpenSSL's prompt then falls back to stdin), stderr to a file."""
    err = (tmp_path / "stderr.txt").open("wb")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "service", "--bind", "127.0.0.1:0"],
            cwd=ROOT, env=env, stdin=stdin, stdout=subprocess.DEVNULL, stderr=err,
            start_new_session=True,
        )
    finally:
        err.close()


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """The exit status, or None (and the process killed) if it is still running."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=GUARD)
        return None


def _encrypted_key_fleet(tmp_path: Path) -> tuple[Path, Path]:
    """A fleet file whose one server has a client certificate and a passphrase-protected key."""
    ca = trustme.CA()
    cert = ca.issue_cert("service@example")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), None)
    key_path = tmp_path / "client.key"
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"correct horse")))
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        '[[server]]\nname = "gpu-a"\nkind = "llamacpp"\nurl = "https://127.0.0.1:9"\n'
        'tls = { ca_bundle = "ca.pem", client_cert = "client.pem", client_key = "client.key" }\n')
    return fleet, key_path


# -- 1. a passphrase-protected client key -----------------------------------------------------


def test_an_encrypted_client_key_does_not_wait_for_a_passphrase_on_stdin(tmp_path: Path) -> None:
    """An encrypted ``tls.client_key`` makes ``ssl.SSLContext.load_cert_chain`` (called with no
    ``password``, service/backends/fleet.py, ``tls_context``) fall back to OpenSSL's own
    prompt: "Enter PEM pass phrase:" on the terminal, or, without one, a read of stdin. Under
    a process manager that leaves stdin an open pipe (docker -i, a supervisor) the start hangs
    for good, before anything is logged. There is no setting to give the passphrase either.

    Correct: the start stops at once with one line naming the key file and saying it is
    encrypted (or takes a passphrase from a setting), exit 2, never reading stdin."""
    fleet, _ = _encrypted_key_fleet(tmp_path)
    env = _env(SERVICE_BACKENDS_FILE=str(fleet), SERVICE_DB=str(tmp_path / "s.db"))
    proc = _start(tmp_path, env, stdin=subprocess.PIPE)
    try:
        code = _wait(proc, 8)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
    err = (tmp_path / "stderr.txt").read_text(errors="replace")
    assert code is not None, f"still starting after 8 s, waiting on stdin; stderr: {err!r}"
    assert code == 2, err


def test_an_encrypted_client_key_is_one_clear_line(tmp_path: Path) -> None:
    """With stdin closed the start does stop, but stderr has OpenSSL's "Enter PEM pass
    phrase:" prompt(s) before the service's line, and that line says only "do not load as a
    PEM certificate and its key ([Errno 22] Invalid argument)": nothing says the key is
    encrypted (service/backends/fleet.py, ``tls_context``: no ``password`` callback).

    Correct (docs/architecture.md: "checked at start (one line naming the server and field,
    exit 2)"): exactly one line on stderr, naming the key file and saying it is encrypted /
    needs a passphrase."""
    fleet, key_path = _encrypted_key_fleet(tmp_path)
    env = _env(SERVICE_BACKENDS_FILE=str(fleet), SERVICE_DB=str(tmp_path / "s.db"))
    proc = _start(tmp_path, env, stdin=subprocess.DEVNULL)
    code = _wait(proc, GUARD)
    err = (tmp_path / "stderr.txt").read_text(errors="replace")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert str(key_path) in lines[0]
    assert "passphrase" in lines[0].lower() or "encrypted" in lines[0].lower(), lines[0]


# -- 2. URLs that pass the check but are not usable base URLs --------------------------------


@pytest.mark.parametrize("url", ["http://xn--.com:11434", "http://xn--zz.example:11434"])
def test_a_url_whose_host_httpx_cannot_decode_stops_the_start(tmp_path: Path, url: str) -> None:
    """``check_url`` (service/backends/fleet.py) builds ``httpx.URL(value)`` but never reads its
    ``host``; a malformed IDNA label ("xn--" with no punycode) is accepted at start, then every
    call and probe raises ``idna.IDNAError`` (not an ``httpx.HTTPError``, so not mapped to a
    BackendError): the fleet's chat and ``health()`` end in an ExceptionGroup. Through the app
    (checked by hand): ``/v1/chat/completions`` answers 500 ``internal_error (IDNAError)`` and
    ``/readyz`` 500, tracebacks in the log, where API.md has 503 for "no backend reachable"
    and "/readyz 503 naming what is down".

    Correct: one ConfigError line at start naming the variable (and the same for a fleet
    file's ``url``)."""
    with pytest.raises(ConfigError, match="SERVICE_OLLAMA_URL"):
        load_settings(db=tmp_path / "s.db", ollama_url=url)
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(f'[[server]]\nname = "a"\nkind = "ollama"\nurl = "{url}"\n')
    with pytest.raises(ConfigError, match=r"server 1 \('a'\): url"):
        load_settings(db=tmp_path / "s.db", backends_file=fleet)


@pytest.mark.parametrize("suffix", ["#primary", "/?tenant=a"])
async def test_a_base_url_with_a_fragment_or_query_is_refused_or_works(
        settings: Settings, suffix: str) -> None:
    """``check_url`` accepts a base URL with a fragment or a query; the adapters then append
    paths to it as text (``self.url + "/api/chat"``), so ``http://h:p#primary/api/chat``
    and ``http://h:p/?tenant=a/api/chat`` both send every request to ``/``: every call gets
    404 "no route for POST /" (two such servers: 503 all_backends_failed on every call) while
    nothing at start said the URL was wrong.

    Correct: either one ConfigError line at start ("not a base URL: it has a fragment/query"),
    or requests that reach the server's real paths. Either is accepted here."""
    async with open_simulator(Simulator(default=Reply(tokens=2))) as sim:
        url = sim.url + suffix
        refused: ConfigError | None = None
        try:
            conf = load_settings(**{**settings.model_dump(), "backend": "ollama",
                                    "ollama_url": f"{url},{url}"})
        except ConfigError as exc:
            refused = exc
        if refused is not None:
            assert "SERVICE_OLLAMA_URL" in refused.message
            assert "\n" not in refused.message
            return
        async with client_from_settings(conf) as client:
            backend = build_backend(conf, client)
            try:
                with trio.fail_after(GUARD):
                    result = await backend.chat(ChatRequest(
                        messages=(ChatMessage("user", "hi"),), model="sim-model"))
            finally:
                await backend.aclose()
        assert result.message.content == "tok0 tok1 "
        assert ("POST", "/api/chat") in sim.requests, sim.requests


# -- 3. the model-list probe's 1 s --------------------------------------------------------------


class _SlowTags(Simulator):
    """An Ollama whose ``/api/tags`` answers, correctly, after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        super().__init__(default=Reply(tokens=2))
        self.delay = delay

    def _get(self, path: str) -> SimResponse:
        response = super()._get(path)
        if path == "/api/tags":
            response.head = [Sleep(self.delay), *response.head]
        return response


async def test_a_slow_but_healthy_model_list_does_not_make_the_server_not_ready(
        settings: Settings, tmp_path: Path) -> None:
    """A fleet's model-list refresh is bounded by ``inventory_timeout = min(1.0,
    llm_connect_timeout)`` (service/backends/__init__.py, ``build_backend``), half of the 2 s
    the health probe of the very same endpoint (Ollama ``/api/tags``) is given. An Ollama that
    answers ``/api/tags`` in 1.4 s (loaded, or busy loading a model) is healthy by the probe,
    yet ``FleetBackend._refresh_one`` (service/backends/router.py) marks it
    ``reachable=False, ready=False`` ("no model list within 1s") for ``health_ttl``, again at
    every refresh (every 5 s): ``/readyz`` says 503 and ``/api/backends`` says unreachable
    while the server answers every request, and in a fleet its calls all go elsewhere.

    Correct (API.md: "/readyz -> 200 when the store and at least one backend answer"): a
    server that answers within the probe's bound is ready; a slow model list keeps the last
    known models instead of marking the server down (or gets at least the probe's bound)."""
    sim = _SlowTags(delay=1.4)
    async with open_simulator(sim):
        fleet = tmp_path / "fleet.toml"
        fleet.write_text(f'[[server]]\nname = "slow-tags"\nkind = "ollama"\nurl = "{sim.url}"\n')
        conf = settings.model_copy(update={"backends_file": fleet,
                                           "default_model": "sim-model"})
        from .servers import running_server

        async with running_server(conf, from_settings=True) as server, server.client() as c:
            await trio.sleep(2.5)  # the first model-list refresh is over either way
            with trio.fail_after(GUARD):
                backends = (await c.get("/api/backends")).json()["data"]
                ready = await c.get("/readyz")
            server_state = {k: backends[0].get(k) for k in ("reachable", "ready", "last_error")}
            assert server_state["reachable"] is True, server_state
            assert ready.status_code == 200, ready.text


# -- 4. a fleet file that lists no server of the selected kind ---------------------------------


def test_a_fleet_file_without_the_selected_kind_stops_the_start_with_exit_2(
        tmp_path: Path) -> None:
    """``SERVICE_BACKEND=ollama`` with a ``SERVICE_BACKENDS_FILE`` that lists only llama.cpp
    servers is a configuration that is wrong on its own, yet it is found only in the
    lifespan's ``build_backend`` (service/backends/__init__.py), after the store has been
    opened: exit 1, the one line after the store's log lines. ``load_settings`` ->
    ``validate_fleet`` (service/backends/fleet.py) does not check it.

    Correct (docs/operations.md "Settings": a bad value stops the process with one line
    naming the variable, exit status 2; architecture.md: the fleet file "checked at start
    (... exit 2)"): exit 2 before the store is opened."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[[server]]\nname = "a"\nkind = "llamacpp"\nurl = "http://127.0.0.1:9"\n')
    db = tmp_path / "s.db"
    env = _env(SERVICE_BACKEND="ollama", SERVICE_BACKENDS_FILE=str(fleet), SERVICE_DB=str(db))
    started = time.monotonic()
    proc = _start(tmp_path, env, stdin=subprocess.DEVNULL)
    code = _wait(proc, 20)
    err = (tmp_path / "stderr.txt").read_text(errors="replace")
    assert code is not None
    assert time.monotonic() - started < 20
    assert "lists no ollama server" in err.strip().splitlines()[-1], err
    assert code == 2, err
    assert not db.exists(), "the store was opened before the configuration was checked"


@pytest.mark.parametrize("url", ["http://127.0.0.1:11434?", "http://127.0.0.1:11434/?",
                                 "http://127.0.0.1:11434#"])
def test_a_base_url_with_an_empty_query_or_fragment_is_refused_or_works(
        tmp_path: Path, url: str) -> None:
    """``check_url`` (service/settings.py) refuses a query or a fragment by the truth of
    ``urlsplit(value).query``/``.fragment``, which are ``""`` for a bare trailing ``?`` or
    ``#``; ``rstrip("/")`` leaves those in place, and the adapters then append their paths as
    text: ``http://h:11434?/api/chat`` is ``/`` with the query ``/api/chat`` (and ``#/api/chat``
    a fragment), the very breakage the check was added for (every call 404 "no route for POST
    /", nothing said at start). Right: refused at start (one ConfigError line naming the
    variable / the fleet file's server), or the ``?``/``#`` dropped so that the paths
    reach the server."""
    for load in (
        lambda: load_settings(db=tmp_path / "s.db", backend="ollama", ollama_url=url).ollama_url,
        lambda: _fleet_url(tmp_path, url),
    ):
        refused: str | None
        try:
            base = load()
        except ConfigError as exc:
            refused = exc.message
        else:
            refused = None
        if refused is not None:
            assert "\n" not in refused
            continue
        assert httpx.URL(base + "/api/chat").path == "/api/chat", base


def _fleet_url(tmp_path: Path, url: str) -> str:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(f'[[server]]\nname = "a"\nkind = "ollama"\nurl = "{url}"\n')
    return load_fleet_file(fleet)[0].url
