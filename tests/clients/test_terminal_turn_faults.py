"""``python -m service chat`` against the suspicions a review left about it, each checked
against real sockets and processes. Each test here failed before its fix (2026-12-04) because
of a real defect (a Ctrl-C while the POST of a turn is in flight proved fine: no test):

* a service that goes silent (no answer, or an SSE stream with not even its keep-alive
  comments) holds the client forever: it has no read timeout;
* Ctrl-C while the first turn of a new chat is still creating its conversation quits the whole
  chat, where a Ctrl-C later in a turn cancels that turn and the chat goes on;
* with its input piped, the chat exits 0 although a turn failed;
* bidi controls (U+202E RIGHT-TO-LEFT OVERRIDE, the isolates) in a model's text reach the
  terminal, where they reorder what the user reads ("Trojan Source"); ESC and the other C0/C1
  controls are already replaced.

The service is the real app on port 0 (``running_server``) where it is the one answering; the
silent peer is a plain trio listener on loopback. Time is trio's autojump clock where the test
is in one process, and bounded by ``GUARD`` on a subprocess.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from io import StringIO
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from rich.console import Console

from service import chat
from service.api.models import MAX_CONTENT_CHARS
from service.backends.base import ChatRequest
from service.settings import Settings

from ..fakes import Reply, ScriptedBackend
from ..servers import ROOT, running_server
from .test_chat_cli import GUARD, _answers, _env, _terminal

# The service's SSE keep-alive interval (SERVICE_SSE_KEEPALIVE, docs/operations.md: 15 s by
# default); the service itself drops a peer that takes nothing for four of them (60 s,
# docs/architecture.md "Events"). A client may allow itself as long, or twice that: no more.
KEEPALIVE = 15.0
SILENCE_BOUND = 8 * KEEPALIVE  # the longest a demanding user waits on a silent service
LIVE_FOR = 20 * KEEPALIVE  # how long the quiet stream keeps sending its keep-alives


# -- 1. a silent service ----------------------------------------------------------------------


async def _read_request(stream: trio.SocketStream) -> bytes:
    """One HTTP/1.1 request's head and body; its head."""
    data = b""
    while b"\r\n\r\n" not in data:
        if not (chunk := await stream.receive_some(65536)):
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(m.group(1)) if (m := re.search(rb"(?i)content-length: *(\d+)", head)) else 0
    while len(body) < length:
        body += await stream.receive_some(65536)
    return head


async def _never_answers(log: list[float], stream: trio.SocketStream) -> None:
    """Accepts, takes the request, says nothing, keeps the connection open."""
    async with stream:
        await _read_request(stream)
        log.append(trio.current_time())
        await trio.sleep_forever()


_RUN_STARTED = (b'id: 1\nevent: run.started\ndata: {"run_id":"run_1","conversation_id":"conv_1",'
                b'"agent":"chat","model":"m"}\n\n')


async def _stream_goes_quiet(log: list[float], stream: trio.SocketStream) -> None:
    """Starts the run's SSE stream, sends the service's keep-alive comments every KEEPALIVE
    seconds for LIVE_FOR seconds (a quiet run: a model loading, a tool working), then nothing,
    the connection left open (a service wedged, a proxy holding a dead upstream)."""
    async with stream:
        if (await _read_request(stream)).startswith(b"POST /api/runs/run_1/cancel"):
            # The client gives the turn up and cancels its run (which would go on: it is
            # posted with on_disconnect "continue"): answered, not counted as the stream.
            log.append(-1.0)
            await stream.send_all(b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json"
                                  b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
            return
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                              b"Cache-Control: no-cache\r\nConnection: close\r\n\r\n"
                              + _RUN_STARTED)
        log.append(trio.current_time())
        while trio.current_time() + KEEPALIVE <= LIVE_FOR:
            await trio.sleep(KEEPALIVE)
            await stream.send_all(b": keep-alive\n\n")
            log.append(trio.current_time())
        await trio.sleep_forever()


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _renderer() -> tuple[chat.Renderer, StringIO]:
    err = StringIO()
    return chat.Renderer(Console(file=StringIO(), force_terminal=False),
                         Console(file=err, force_terminal=False, width=200)), err


@pytest.mark.parametrize(("peer", "conversation"), [
    pytest.param(_never_answers, None, id="accepts-and-never-answers"),
    pytest.param(_stream_goes_quiet, "conv_1", id="sse-stream-goes-quiet"),
])
async def test_a_silent_service_ends_the_turn_with_an_error(
    autojump_clock: trio.testing.MockClock,
    peer: Callable[[list[float], trio.SocketStream], Awaitable[None]],
    conversation: str | None,
) -> None:
    """``_http`` sets ``read=None`` ("the service's own keep-alives and deadlines bound it"), but
    nothing in the client checks that they come: a service that accepts and then says nothing
    (or whose stream stops, not even a keep-alive comment) holds ``python -m service chat "..."``
    forever, with nothing on the screen. Expected: while keep-alives come, the client waits (a
    quiet run is fine); once nothing has come for a few keep-alive intervals, the turn ends
    with a one-line error (``_run_turn``: exit 1)."""
    log: list[float] = []  # when the peer last sent something (or took the request)
    outcome: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, partial(peer, log), 0,
                                                  host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        opts = chat.Options(url=f"http://127.0.0.1:{port}", key=None, agent=None, model=None,
                            conversation=conversation, message="hello")
        renderer, err = _renderer()
        with trio.move_on_after(LIVE_FOR + SILENCE_BOUND + 1000) as guard:
            try:
                await chat._one_turn(opts, renderer, conversation, "hello")
            except* (chat.ChatError, httpx.HTTPError) as group:  # as _run_turn takes them
                outcome = {"at": trio.current_time(),
                           "exit": chat._report(renderer, _first_leaf(group))}
            else:
                outcome = {"at": trio.current_time(), "exit": 0}
        gave_up_at = trio.current_time()
        nursery.cancel_scope.cancel()
    assert log, "the client never reached the peer"
    cancelled = -1.0 in log  # the turn given up, its run cancelled
    log = [t for t in log if t >= 0]
    silent_since = log[-1]
    assert not guard.cancelled_caught, (
        f"the client was still waiting {gave_up_at - silent_since:.0f} s after the service "
        f"went silent (at {silent_since:.0f} s; keep-alives come every {KEEPALIVE:.0f} s): "
        f"a silent service holds it forever")
    waited = outcome["at"] - silent_since
    assert outcome["exit"] == 1, outcome
    assert waited <= SILENCE_BOUND, (
        f"the client gave up {waited:.0f} s after the service went silent; at most "
        f"{SILENCE_BOUND:.0f} s expected")
    if peer is _stream_goes_quiet:
        assert cancelled, "the turn was given up, and its run left going"
        # Keep-alives flowed for LIVE_FOR seconds: a quiet run, not a dead service.
        assert waited >= 2 * KEEPALIVE, (
            f"the client gave up {waited:.0f} s after the last keep-alive, while the service "
            f"sends one every {KEEPALIVE:.0f} s (at {outcome['at']:.0f} s of a stream that was "
            f"alive for {silent_since:.0f} s)")
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1, err.getvalue()
    assert re.search(r"(?i)time|no answer|silent|quiet|\d+ ?s\b", lines[0]), (
        f"the error does not say the service stopped answering: {lines[0]!r}")


# -- 2. Ctrl-C while the first turn creates its conversation ------------------------------


@pytest.mark.slow
async def test_ctrl_c_before_the_run_exists_cancels_the_turn_not_the_chat(
    settings: Settings,
) -> None:
    """The chat's docs: Ctrl-C during an answer cancels the run and the chat goes on; only a
    second one (or one at the prompt) quits. ``ask`` takes SIGINT (a trio signal receiver) for
    the whole of ``POST .../messages``, and a Ctrl-C before ``run.started`` is remembered and
    cancels the run once it is known. But the first turn of a new chat first creates its
    conversation (``_one_turn``: ``create_conversation``), outside ``ask``: a Ctrl-C there, the
    user's only one, is trio's KeyboardInterrupt, and ``_run_turn`` quits the chat (exit 130).
    Here the service's store is slow to create the conversation (a busy store)."""
    async with running_server(settings, ScriptedBackend(_answers)) as srv, \
            srv.client() as client:
        store = srv.services.require_store()
        create = store.create_conversation
        asked, answer = trio.Event(), trio.Event()

        async def slow_create(*args: Any, **kwargs: Any) -> Any:  # a busy store
            asked.set()
            await answer.wait()
            return await create(*args, **kwargs)

        store.create_conversation = slow_create  # type: ignore[method-assign]
        async with _terminal(srv) as term:
            at = await term.wait_for(r"you> ")
            await term.type("slow please\r")
            with trio.fail_after(GUARD):
                await asked.wait()  # the client waits for its conversation: inside the turn
            await term.type("\x03")
            # The terminal echoes ^C once it has sent the SIGINT: the client has it now.
            at = await term.wait_for(r"\^C", after=at)
            answer.set()
            at = await term.wait_for(r"you> |\[interrupted\]", after=at)
            quit_early = "[interrupted]" in term.screen
            if quit_early:
                with trio.fail_after(GUARD):
                    status = await term.process.wait()
                await term.drain()
                pytest.fail(f"one Ctrl-C before the run existed quit the chat (exit {status}):"
                            f"\n{term.screen}")
            await term.type("\x04")
            with trio.fail_after(GUARD):
                assert await term.process.wait() == 0
        # The turn was cancelled: no run of it ran to its end.
        for conv in (await client.get("/api/conversations")).json()["data"]:
            messages = (await client.get(f"/api/conversations/{conv['id']}")).json()["messages"]
            for m in messages:
                if m["role"] == "assistant":
                    run = (await client.get(f"/api/runs/{m['run_id']}")).json()
                    assert run["status"] == "cancelled", run


# -- 3. piped input: a failed turn's exit status ----------------------------------------------


async def _piped_chat(url: str, lines: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(GUARD):
        return await trio.run_process(
            [sys.executable, "-m", "service", "chat", "--url", url], cwd=ROOT, env=_env(),
            stdin=lines.encode(), capture_stdout=True, capture_stderr=True, check=False)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
async def test_piped_chat_exits_non_zero_when_a_turn_failed(settings: Settings) -> None:
    """``printf 'q\\n' | python -m service chat``: not a terminal, a script's input. Each turn's
    failure is written to stderr and the chat goes on, then EOF exits 0, whatever failed: the
    script is told all went well. The one-shot form exits 1 on the same failures (README,
    ``chat.py``'s docstring); so should a chat fed from a pipe, once its input is done."""
    gone = f"http://127.0.0.1:{_closed_port()}"  # the service unreachable
    out = await _piped_chat(gone, "q\n")
    assert "cannot reach the service" in out.stderr.decode()
    unreachable = out.returncode
    async with running_server(settings, ScriptedBackend(_answers)) as srv:
        out = await _piped_chat(srv.url, "hello\nfail now\n")  # the backend fails the 2nd run
        assert "echo" in out.stdout.decode(), out
        assert "run failed" in out.stderr.decode(), out
        failed_run = out.returncode
        ok = await _piped_chat(srv.url, "hello\nhello again\n")
    assert ok.returncode == 0, ok  # all turns succeeded: 0, as now
    assert 0 not in (unreachable, failed_run), (
        f"piped input, a failed turn: exit {unreachable} (service unreachable), {failed_run} "
        f"(a run failed); non-zero expected")


@pytest.mark.slow
async def test_a_chat_whose_first_turn_failed_goes_on_in_the_same_conversation(
    settings: Settings,
) -> None:
    """Found in review: the first turn of a new chat makes its conversation, then sends the
    message; when the send failed (here: a message over the service's size limit), the id of
    the conversation just made was lost with the turn, and the next turn started another
    conversation (an empty one left behind, and the chat's turns split across two)."""
    async with running_server(settings, ScriptedBackend(_answers)) as srv:
        out = await _piped_chat(srv.url, "x" * (MAX_CONTENT_CHARS + 1) + "\nhello\n")
        assert "echo" in out.stdout.decode(), out
        async with httpx.AsyncClient(base_url=srv.url) as client:
            convs = (await client.get("/api/conversations")).json()["data"]
    assert len(convs) == 1, [c["title"][:10] for c in convs]


# -- 4. bidi controls in a model's text -------------------------------------------------------

_BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"  # embeddings, overrides, isolates


def _bidi(req: ChatRequest) -> Reply:
    q = req.messages[-1].content
    if q.startswith("bidi"):
        # Shown as "pay 1000 EUR" on a terminal that applies the override: reads as 0001.
        return Reply("pay \u202e0001\u202c EUR to \u2067acct\u2069 \u202dok\u202c, "
                     "\u202a\u202bx\u202c\u202c \u2068y\u2069 \u05e9\u05dc\u05d5\u05dd done",
                     thinking=["thinking \u202eesrever\u202c"])
    return _answers(req)


@pytest.mark.slow
async def test_model_text_cannot_reorder_the_terminal(settings: Settings) -> None:
    """``_safe`` replaces C0 and C1 controls (ESC, CSI U+009B, DEL, ...), but not the Unicode
    bidi controls: U+202E RIGHT-TO-LEFT OVERRIDE and its kin in a model's answer or thought
    reach the terminal, which (with bidi support: VTE, mlterm, Konsole) shows the text after
    them reordered: what the user reads is not what the model wrote. Right-to-left text
    itself (Hebrew here) must still show."""
    async with running_server(settings, ScriptedBackend(_bidi)) as srv, \
            _terminal(srv) as term:
        at = await term.wait_for(r"you> ")
        await term.type("bidi please\r")
        at = await term.wait_for(r"done", after=at)
        await term.wait_for(r"you> ", after=at)
        await term.type("\x04")
        with trio.fail_after(GUARD):
            assert await term.process.wait() == 0
        await term.drain()
    screen = term.screen
    assert "\u05e9\u05dc\u05d5\u05dd" in screen, "right-to-left text itself must show"
    assert "thinking" in screen
    found = sorted({f"U+{ord(c):04X}" for c in screen if c in _BIDI})
    assert not found, f"bidi controls from the model reached the terminal: {found}"
