"""The terminal client (service/chat.py, service/chat_render.py): what the last review left in
its "suspected" list, each a test that failed before its fix (2026-12-06):

* a plan step that failed (``step.finished`` with ``error``) was shown as "done";
* a tool call's non-ASCII arguments were shown as JSON escapes (``\\u041c...``);
* a carriage return in a model's text (CRLF line ends) showed as U+FFFD;
* an error frame that only ended an earlier stream (the store away) was named as the run's
  error when the run later ended for its own reason;
* Ctrl-C at the prompt exited 0, as Ctrl-D does; an interrupted chat exits 130.

The stale-error case runs the client against a loopback peer that answers the two requests as
the service does in that case (the real service cannot be made to lose its store between two
exact events); the Ctrl-C case is the real ``python -m service chat`` on a pseudo-terminal.
"""

from __future__ import annotations

from functools import partial
from io import StringIO

import pytest
import trio
from rich.console import Console

from service import chat
from service.chat_render import _describe
from service.settings import Settings

from ..fakes import ScriptedBackend
from ..servers import running_server
from .test_chat_cli import GUARD, _answers, _terminal
from .test_terminal_turn_faults import _read_request


def _renderer() -> tuple[chat.Renderer, StringIO, StringIO]:
    out, err = StringIO(), StringIO()
    return (chat.Renderer(Console(file=out, force_terminal=False),
                          Console(file=err, force_terminal=False, width=200)), out, err)


def test_a_failed_plan_step_is_shown_as_failed_with_its_error() -> None:
    assert _describe("step.finished", {"id": 2, "error": "tool calculator failed: 1/0"}) == (
        "· step 2 failed: tool calculator failed: 1/0")
    assert _describe("step.finished", {"id": 2, "output": "4"}) == "· step 2 done"
    renderer, _, err = _renderer()
    renderer.step("step.finished", {"id": 3, "error": "the model call timed out"})
    assert "step 3 failed: the model call timed out" in err.getvalue()
    assert "done" not in err.getvalue()


def test_the_auto_agents_choice_is_shown_as_a_step() -> None:
    assert "decision" in chat._STEPS
    assert _describe("decision", {"agent": "react", "method": "model"}) == (
        "· agent: react (chosen by model)")


def test_non_ascii_tool_arguments_and_results_read_as_written() -> None:
    call = {"name": "weather", "arguments": {"city": "Москва", "note": "naïve ☂"}}
    assert _describe("tool.call", call) == '· tool weather({"city": "Москва", "note": "naïve ☂"})'
    assert _describe("tool.result", {"output": {"city": "Zürich"}}) == (
        '· tool result: {"city": "Zürich"}')


@pytest.mark.parametrize("tokens", [
    ["line one\r\n", "line two"],
    ["line one\r", "\nline two"],  # the CRLF split across two tokens
], ids=["crlf", "crlf-split"])
def test_a_models_crlf_line_ends_are_line_ends(tokens: list[str]) -> None:
    renderer, out, _ = _renderer()
    renderer.started("chat")
    for token in tokens:
        renderer.token(token)
    renderer.message("".join(tokens))
    renderer.finished("succeeded", None)
    assert out.getvalue() == "line one\nline two\n"
    assert "\ufffd" not in out.getvalue()


# -- an error frame that only ended an earlier stream ---------------------------------------------

_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
         b"Connection: close\r\n\r\n")


async def _store_away_then_ended(requests: list[bytes], stream: trio.SocketStream) -> None:
    """The POST's stream: the run started, then an error frame with no id (the service could
    not read the store: the stream ends and the client re-joins, as API.md's error frames ask).
    The re-join's stream: the run's end, cancelled by the service shutting down."""
    async with stream:
        head = await _read_request(stream)
        requests.append(head.split(b"\r\n", 1)[0])
        if head.startswith(b"POST "):
            await stream.send_all(
                _HEAD + b'id: 1\nevent: run.started\ndata: {"run_id":"run_1",'
                b'"conversation_id":"conv_1","agent":"chat","model":"m"}\n\n'
                b'event: error\ndata: {"type":"store_unavailable","message":"the store is '
                b'away","retry_after":0}\n\n')
        else:
            await stream.send_all(
                _HEAD + b'id: 2\nevent: run.finished\ndata: {"status":"cancelled",'
                b'"error":"the service shut down","content":"","usage":{}}\n\n')


async def test_an_earlier_streams_error_is_not_named_as_the_runs_end() -> None:
    requests: list[bytes] = []
    renderer, _, err = _renderer()
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            (listener,) = await nursery.start(partial(
                trio.serve_tcp, partial(_store_away_then_ended, requests), 0,
                host="127.0.0.1"))
            port = listener.socket.getsockname()[1]
            opts = chat.Options(url=f"http://127.0.0.1:{port}", key=None, agent=None,
                                model=None, conversation="conv_1", message="hello")
            _, turn = await chat._one_turn(opts, renderer, "conv_1", "hello")
            nursery.cancel_scope.cancel()
    assert [r.split(b" ")[1] for r in requests] == [
        b"/api/conversations/conv_1/messages", b"/api/runs/run_1/events"]
    assert turn.status == "cancelled"
    said = err.getvalue()
    assert "[run cancelled: the service shut down]" in said, said
    assert "store" not in said, said


# -- Ctrl-C at the prompt -------------------------------------------------------------------------


@pytest.mark.slow
async def test_ctrl_c_at_the_prompt_exits_as_interrupted(settings: Settings) -> None:
    async with running_server(settings, ScriptedBackend(_answers)) as srv, \
            _terminal(srv) as term:
        await term.wait_for(r"you> ")
        await term.type("\x03")
        with trio.fail_after(GUARD):
            assert await term.process.wait() == chat.EXIT_INTERRUPTED


# -- a stream whose body cannot be decoded ---------------------------------------------------

def _corrupt_gzip(text: bytes) -> bytes:
    """``text`` gzip-compressed and flushed (a client decodes it as it comes), then bytes that
    are no deflate data: a proxy's corruption, a broken compressor."""
    import zlib

    packer = zlib.compressobj(wbits=31)
    return packer.compress(text) + packer.flush(zlib.Z_SYNC_FLUSH) + b"\xff" * 64


async def _corrupt_streams(requests: list[bytes], stream: trio.SocketStream) -> None:
    """Every stream (the POST's, each re-join's) breaks in its gzip body after its first
    frame; the run's cancel is taken (202)."""
    async with stream:
        head = await _read_request(stream)
        requests.append(head.split(b"\r\n", 1)[0])
        if b"/cancel" in head.split(b"\r\n", 1)[0]:
            await stream.send_all(b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\n"
                                  b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
            return
        if head.startswith((b"GET /api/conversations/conv_1 ", b"GET /api/conversations/conv_1?")):
            # (Where the client looks for the turn's run when the break came before it had
            # read run.started: the body arrived in one read, which then did not decode.)
            body = (b'{"id":"conv_1","messages":[{"role":"user","content":"hello"},'
                    b'{"role":"assistant","content":"","run_id":"run_1"}]}')
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                  b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
                                  + body)
            return
        await stream.send_all(  # (its run named with the headers, as the service does)
            _HEAD.replace(b"Connection:", b"Content-Encoding: gzip\r\nX-Run-Id: run_1\r\n"
                          b"Connection:")
            + _corrupt_gzip(b'id: 1\nevent: run.started\ndata: {"run_id":"run_1",'
                            b'"conversation_id":"conv_1","agent":"chat","model":"m"}\n\n'))


async def test_a_stream_that_cannot_be_decoded_is_rejoined_then_its_run_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stream whose body breaks (a corrupt gzip: ``httpx.DecodingError``) is a stream lost,
    as a cut connection is: re-joined, and when the re-joins fail too, the turn is given up and
    its run cancelled. It failed the turn at once and left the run going on the service, its
    answer generated for nobody."""
    # (One re-join, 0.5 s after the break: past 0.4 s without a new event, none more.)
    monkeypatch.setattr(chat, "_REJOIN_FOR", 0.4)
    requests: list[bytes] = []
    renderer, _, _ = _renderer()
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            (listener,) = await nursery.start(partial(
                trio.serve_tcp, partial(_corrupt_streams, requests), 0, host="127.0.0.1"))
            port = listener.socket.getsockname()[1]
            opts = chat.Options(url=f"http://127.0.0.1:{port}", key=None, agent=None,
                                model=None, conversation="conv_1", message="hello")
            failed: BaseException | None = None
            try:
                await chat._one_turn(opts, renderer, "conv_1", "hello")
            except BaseExceptionGroup as group:  # (the turn's nursery's)
                failed = group.subgroup(chat.httpx.DecodingError)
            nursery.cancel_scope.cancel()
    assert failed is not None, "the turn did not fail with the stream's decoding error"
    asked = [r.split(b" ")[:2] for r in requests if not r.startswith(b"GET /api/conversations/")]
    assert asked == [
        [b"POST", b"/api/conversations/conv_1/messages"],
        [b"GET", b"/api/runs/run_1/events"],
        [b"POST", b"/api/runs/run_1/cancel"]], requests
