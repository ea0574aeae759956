"""Review of the process layer and the terminal client (2026-12-06): ``python -m service``'s
start (its hypercorn TOML file: TLS, bind, typed keys), ``--workers``, and
``python -m service chat``. Each test asserts what docs/operations.md and ../shared/API.md say
and failed on the code it was written against:

* a TLS certificate or key that cannot be loaded (missing, not matching) stops the start with
  a multi-level exception-group traceback, from every worker with ``--workers``, where every
  other start-up failure is one line (docs/operations.md "Settings", "Running it");
* ``certfile`` without ``keyfile`` serves plain HTTP on the port meant for TLS, without a word;
* an empty ``--bind ""`` serves on every interface (0.0.0.0:8000), where the service's bind
  "stays loopback by default" (API.md: SERVICE_API_KEYS unset = no auth);
* ``bind = []`` crashes with a traceback (one process) or restarts workers that never listen
  for ever (``--workers``), logging "Running on  with 2 workers";
* a key of the TOML file that is a number of the wrong kind (``workers = 2.5``,
  ``graceful_timeout = nan``) passes the type check and crashes the start (or the first
  SIGTERM) with a traceback;
* the parent's "Running on ... with N workers" line gives a bogus address for a unix socket
  ("http:///:t") or an IPv6 one ("http://::1:PORT");
* a Markdown character reference in a model's answer (``&#x202E;``) is decoded by the terminal
  client's Markdown renderer into the bidi override ``_safe`` removes from the raw text: the
  answer is shown reordered;
* ``python -m service chat "..." | head``: the closed pipe is a traceback, and the run goes on;
* a terminal whose encoding cannot show a character of the answer (a Latin-1 locale): a
  UnicodeEncodeError traceback mid-answer.

Processes and sockets are real (``python -m service`` on 127.0.0.1, the chat client on a
pseudo-terminal); the timeouts are hang guards only.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
import trustme

from service.backends.base import ChatRequest
from service.settings import Settings

from ..clients.test_chat_cli import GUARD, _answers, _terminal
from ..clients.test_chat_cli import _env as _chat_env
from ..fakes import Reply, ScriptedBackend
from ..servers import ROOT, running_server

START_GUARD = 90  # seconds a start (or its failure) may take on a busy 2-core machine


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    env.update({"SERVICE_DB": str(tmp_path / "s.db"), "SERVICE_LOG_FORMAT": "json",
                # No backend answers here; the start does not need one.
                "SERVICE_BACKEND": "llamacpp", "SERVICE_LLAMACPP_URL": "http://127.0.0.1:9",
                **extra})
    return env


def _toml(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "hypercorn.toml"
    if "graceful_timeout" not in body:
        body = "graceful_timeout = 2\n" + body
    path.write_text('worker_class = "trio"\n' + body)
    return path


async def _start(tmp_path: Path, *args: str,
                 until: str = "Running on") -> tuple[int | None, str]:
    """``python -m service ARGS``: (its exit status, its stderr) once it exited, or (None,
    stderr so far) as soon as it says it serves (``until`` shows), after which it is stopped
    (SIGTERM, then SIGKILL). Stops no process but its own."""
    log_path = trio.Path(tmp_path / "service.log")  # one start per test
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "service", *args], cwd=tmp_path, env=_env(tmp_path),
            stdout=subprocess.DEVNULL, stderr=fd)
    finally:
        os.close(fd)
    try:
        with trio.fail_after(START_GUARD):
            while proc.poll() is None:
                text = await log_path.read_text(errors="replace")
                if re.search(until, text):
                    return None, text
                await trio.sleep(0.05)
        return proc.returncode, await log_path.read_text(errors="replace")
    finally:
        if proc.returncode is None:
            proc.terminate()
            with trio.move_on_after(30, shield=True):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                with trio.move_on_after(5, shield=True):
                    await proc.wait()


def _one_line(code: int | None, stderr: str, codes: tuple[int, ...]) -> str:
    """The start stopped with ``codes``, no traceback, its last stderr line "service: ..."."""
    assert code is not None, f"it served instead of stopping:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, f"exit {code} with a traceback:\n{stderr[-3000:]}"
    assert code in codes, f"exit {code}:\n{stderr[-3000:]}"
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("service: "), line
    return line


# -- TLS: hypercorn.toml's certfile/keyfile --------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    ca = trustme.CA()
    where = tmp_path_factory.mktemp("tls")
    cert, other = ca.issue_cert("127.0.0.1"), ca.issue_cert("127.0.0.1")
    files = {"cert": where / "cert.pem", "key": where / "key.pem",
             "other_key": where / "other-key.pem", "missing": where / "missing.pem"}
    cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    other.private_key_pem.write_to_path(str(files["other_key"]))
    return files


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize(("cert", "key"), [
    pytest.param("missing", "key", id="certfile-missing"),
    pytest.param("cert", "missing", id="keyfile-missing"),
    pytest.param("cert", "other_key", id="key-does-not-match-the-certificate"),
])
async def test_a_tls_certificate_or_key_that_cannot_be_loaded_stops_the_start_in_one_line(
    tmp_path: Path, tls_files: dict[str, Path], cert: str, key: str, workers: str,
) -> None:
    """hypercorn loads them only when it serves (``Config.create_ssl_context`` in
    ``worker_serve``), after the app has started: the FileNotFoundError / SSLError came out of
    ``serve_one`` as a five-level exception-group traceback (from each worker under
    ``--workers``). docs/operations.md: a bad value, or one only checked by using it, stops the
    start with one line (exit 2 or 1)."""
    config = _toml(tmp_path, f'bind = ["127.0.0.1:0"]\ncertfile = "{tls_files[cert]}"\n'
                             f'keyfile = "{tls_files[key]}"\n')
    code, stderr = await _start(tmp_path, "--config", str(config), "--workers", workers)
    line = _one_line(code, stderr, (1, 2))
    assert re.search(r"certfile|keyfile|certificate|TLS|\.pem", line), line


@pytest.mark.slow
async def test_a_certfile_without_a_keyfile_is_not_served_as_plain_http(
    tmp_path: Path, tls_files: dict[str, Path],
) -> None:
    """hypercorn enables TLS only when both are set (``Config.ssl_enabled``): a file naming its
    certificate and forgetting its key served plain HTTP on that port, silently (clients
    configured for https:// fail, a proxy falling back to http sends keys in clear). Said and
    refused, as any other setting that cannot be what was meant."""
    config = _toml(tmp_path, f'bind = ["127.0.0.1:0"]\ncertfile = "{tls_files["cert"]}"\n')
    code, stderr = await _start(tmp_path, "--config", str(config))
    assert "Running on http://" not in stderr, "served plain HTTP with a certfile configured"
    line = _one_line(code, stderr, (1, 2))
    assert re.search(r"certfile|keyfile|key", line), line


# -- the bind ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
async def test_an_empty_bind_is_refused_not_served_on_every_interface(
    tmp_path: Path, workers: str,
) -> None:
    """``--bind ""`` (``--bind "$BIND"`` with the variable unset) parses, in hypercorn, as host
    "" port 8000: 0.0.0.0:8000, every interface, with no key (API.md: with SERVICE_API_KEYS
    unset the bind "stays loopback by default"). An empty address is no address: one line,
    exit 2, as for the other bad arguments."""
    code, stderr = await _start(tmp_path, "--bind", "", "--workers", workers)
    assert "0.0.0.0" not in stderr, f"served on every interface:\n{stderr[-2000:]}"
    line = _one_line(code, stderr, (1, 2))
    assert "--bind" in line or "bind" in line, line


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_config_that_binds_nothing_stops_the_start_in_one_line(
    tmp_path: Path, workers: str,
) -> None:
    """``bind = []``: one process crashed with trio's "AssertionError: _serve_one_listener
    should never complete" under five exception groups; ``--workers 2`` logged
    "Running on  with 2 workers", and every worker said it was up, then died (exit 1, a
    traceback each) and was replaced, for ever: the crash loop never reached the pool's
    give-up (its workers count as started). Nothing to listen on is a bad config: one line,
    exit 2 (docs/operations.md "Running it")."""
    config = _toml(tmp_path, "bind = []\n")
    code, stderr = await _start(tmp_path, "--config", str(config), "--workers", workers)
    _one_line(code, stderr, (1, 2))


@pytest.mark.slow
@pytest.mark.parametrize(("bind", "shown"), [
    pytest.param("unix:{tmp}/service.sock", "unix:{tmp}/service.sock", id="unix-socket"),
    pytest.param("[::1]:0", "http://[::1]:", id="ipv6"),
])
async def test_the_workers_running_on_line_names_the_address_served(
    tmp_path: Path, bind: str, shown: str,
) -> None:
    """The parent's "Running on ... with N workers" (``workers._urls``) takes
    ``getsockname()[:2]`` as host and port: a unix socket's path (a str) gave
    "Running on http:///:t with 2 workers", an IPv6 address "http://::1:PORT" (no brackets,
    not a URL). Each worker's own line (hypercorn's) has it right: "http://unix:PATH",
    "http://[::1]:PORT"; the parent's is the one that says the service as a whole is up, and
    what a script or an operator reads the address from."""
    bind, shown = bind.format(tmp=tmp_path), shown.format(tmp=tmp_path)
    code, stderr = await _start(tmp_path, "--bind", bind, "--workers", "2",
                                until=r"with 2 workers")
    assert code is None, f"exit {code}:\n{stderr[-3000:]}"
    (line,) = [m for m in re.findall(r'"msg": "(Running on [^"]*)"', stderr)
               if "with 2 workers" in m]
    assert shown in line, line


# -- the TOML file's typed keys --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["workers = 2.5", "backlog = 100.5"])
async def test_an_integer_key_given_a_fraction_stops_the_start_in_one_line(
    tmp_path: Path, setting: str,
) -> None:
    """``_check_types`` takes any float for a key whose default is an int: ``workers = 2.5``
    crashed in ``range(workers)`` ("'float' object cannot be interpreted as an integer"), and
    ``backlog = 100.5`` in ``socket.listen``, each with a traceback. docs/operations.md: "A key
    of the file that hypercorn knows must hold its type (``workers = "2"`` is one line, exit 2,
    not a traceback at start or at the first SIGTERM)"."""
    config = _toml(tmp_path, f'bind = ["127.0.0.1:0"]\n{setting}\n')
    code, stderr = await _start(tmp_path, "--config", str(config))
    line = _one_line(code, stderr, (2,))
    assert setting.split()[0] in line, line


@pytest.mark.slow
async def test_a_graceful_timeout_that_is_not_a_number_of_seconds_is_refused_at_start(
    tmp_path: Path,
) -> None:
    """TOML has ``nan``, a float: it passed the type check, the service served, and its first
    SIGTERM crashed the shutdown (trio: "deadline must not be NaN"), exit 1 with a traceback:
    the very case docs/operations.md says is refused at start ("not a traceback at start or at
    the first SIGTERM")."""
    config = _toml(tmp_path, 'bind = ["127.0.0.1:0"]\ngraceful_timeout = nan\n')
    code, stderr = await _start(tmp_path, "--config", str(config))
    line = _one_line(code, stderr, (2,))
    assert "graceful_timeout" in line, line


# -- the terminal client -----------------------------------------------------------------------


_BIDI = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))}


def _referenced_bidi(req: ChatRequest) -> Reply:
    if req.messages[-1].content.startswith("refs"):
        # Shown as "pay 1000 EUR" where the terminal applies the override.
        return Reply("pay &#x202E;0001&#x202C; EUR to &#8295;acct&#8297; &#x202D;ok&#x202C; "
                     "done", chunks=1)
    return _answers(req)


@pytest.mark.slow
async def test_model_text_cannot_reorder_the_terminal_through_markdown_references(
    settings: Settings,
) -> None:
    """``_safe`` replaces the bidi controls in the model's text, and then the answer is
    rendered as Markdown on a terminal, where markdown-it decodes character references:
    ``&#x202E;`` became U+202E RIGHT-TO-LEFT OVERRIDE on the user's screen (ESC and the C1
    controls it replaces itself). The renderer's own promise (service/chat_render.py: "the
    bidi overrides, embeddings and isolates ... reorder what follows them on the screen") and
    tests/clients/test_terminal_turn_faults.py's, by another spelling."""
    async with running_server(settings, ScriptedBackend(_referenced_bidi)) as srv, \
            _terminal(srv) as term:
        at = await term.wait_for(r"you> ")
        await term.type("refs please\r")
        at = await term.wait_for(r"done", after=at)
        await term.wait_for(r"you> ", after=at)
        await term.type("\x04")
        with trio.fail_after(GUARD):
            assert await term.process.wait() == 0
        await term.drain()
    found = sorted({f"U+{ord(c):04X}" for c in term.screen if c in _BIDI})
    assert not found, f"bidi controls from the model reached the terminal: {found}"



def _slow_answers(req: ChatRequest) -> Reply:
    return Reply("tick " * 400, gap=0.05)  # 20 s: long enough to be left


async def _wait_run_over(client: httpx.AsyncClient) -> str:
    (conv,) = (await client.get("/api/conversations")).json()["data"]
    with trio.fail_after(GUARD * 2):
        while True:
            messages = (await client.get(f"/api/conversations/{conv['id']}")).json()["messages"]
            run_id = messages[-1].get("run_id")
            if run_id is not None:
                status = (await client.get(f"/api/runs/{run_id}")).json()["status"]
                if status not in ("queued", "running"):
                    return str(status)
            await trio.sleep(0.1)


@pytest.mark.slow
async def test_a_reader_that_stops_reading_the_answer_ends_the_turn_without_a_traceback(
    settings: Settings,
) -> None:
    """``python -m service chat "..." | head``: once the reader has gone, the next write of a
    token raised BrokenPipeError out of the turn's nursery, which ``_run_turn`` does not
    expect: an exception-group traceback on stderr (and "Exception ignored ... BrokenPipeError"
    at exit), and the run, posted with on_disconnect "continue", went on to store an answer
    nobody reads. service/chat.py: a request failing is one line, exit 1, and "a turn given up
    cancels its run"; a closed output is the user leaving, as Ctrl-C is."""
    async with running_server(settings, ScriptedBackend(_slow_answers)) as srv, \
            srv.client() as client:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "service", "chat", "count please", "--url", srv.url],
            cwd=ROOT, env=_chat_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None
        assert proc.stderr is not None
        try:
            seen = b""
            with trio.fail_after(GUARD):
                while b"tick tick" not in seen:
                    chunk = await proc.stdout.receive_some(4096)
                    assert chunk, "the answer never came"
                    seen += chunk
            await proc.stdout.aclose()  # the reader (head) exits
            err = b""
            with trio.fail_after(GUARD):
                async for chunk in proc.stderr:
                    err += chunk
                code = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                with trio.move_on_after(5, shield=True):
                    await proc.wait()
        assert "Traceback" not in err.decode(errors="replace"), err.decode(errors="replace")
        assert code != 0, "a turn whose answer could not be written is not a success"
        assert await _wait_run_over(client) == "cancelled", (
            "the run went on for a reader that had gone")


@pytest.mark.slow
async def test_an_answer_the_terminal_encoding_cannot_show_does_not_crash_the_client(
    settings: Settings,
) -> None:
    """A terminal in a legacy locale (LANG=de_DE.ISO-8859-1; here PYTHONIOENCODING=latin-1,
    the same stdout): Python's stdout is strict, and the first character of the answer that
    it cannot encode ("→", "東") raised UnicodeEncodeError out of the turn, a traceback, exit 1,
    the answer cut at that token. A terminal client shows what it can (a replacement for the
    rest) and exits 0 (service/chat.py: "streams the answer to stdout and exits 0")."""
    def answer(req: ChatRequest) -> Reply:
        return Reply("café → 東京 done")

    async with running_server(settings, ScriptedBackend(answer)) as srv:
        with trio.fail_after(GUARD):
            out = await trio.run_process(
                [sys.executable, "-m", "service", "chat", "hi", "--url", srv.url],
                cwd=ROOT, env={**_chat_env(), "PYTHONIOENCODING": "latin-1"},
                capture_stdout=True, capture_stderr=True, check=False)
    stderr = out.stderr.decode("latin-1")
    assert "Traceback" not in stderr, stderr[-3000:]
    assert out.returncode == 0, stderr[-3000:]
    assert b"caf\xe9" in out.stdout, out.stdout
    assert b"done" in out.stdout, out.stdout



@pytest.mark.slow
@pytest.mark.parametrize("setting", ["workers = -1", "insecure_bind = 5",
                                     'verify_mode = "CERT_SOMETIMES"'])
async def test_a_key_of_the_wrong_kind_stops_the_start_in_one_line(
    tmp_path: Path, setting: str,
) -> None:
    """Found after the review (its suspected list): ``workers = -1`` was taken for one worker
    without a word; ``insecure_bind = 5`` (a list of addresses expected) and a
    ``verify_mode`` that is no mode crashed the start with a traceback."""
    config = _toml(tmp_path, f'bind = ["127.0.0.1:0"]\n{setting}\n')
    code, stderr = await _start(tmp_path, "--config", str(config))
    line = _one_line(code, stderr, (2,))
    assert setting.split()[0] in line, line


@pytest.mark.slow
async def test_a_verify_mode_named_as_hypercorns_cli_takes_it_is_served(
    tmp_path: Path, tls_files: dict[str, Path],
) -> None:
    """``verify_mode = "CERT_OPTIONAL"`` (hypercorn's CLI takes the name): the TOML file's
    string was passed on as it was, and loading TLS failed on it."""
    config = _toml(tmp_path, f'bind = ["127.0.0.1:0"]\ncertfile = "{tls_files["cert"]}"\n'
                             f'keyfile = "{tls_files["key"]}"\nverify_mode = "CERT_OPTIONAL"\n'
                             f'ca_certs = "{tls_files["cert"]}"\n')
    code, stderr = await _start(tmp_path, "--config", str(config))
    assert code is None, f"exit {code}:\n{stderr[-3000:]}"
    assert "Running on https://" in stderr, stderr[-3000:]
