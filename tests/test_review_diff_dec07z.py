"""Review (dec07z) of the day's diff ``git diff e3ea557 -- service/``.

Defects it found, each fixed (its test failed before: "Fixed (was: DEFECT: ...)"):
* the terminal client takes any ``ssl.SSLError`` in a failure's chain for a refused
  certificate: a TLS handshake cut by the peer (SSLEOFError, a proxy or the service
  restarting) during a re-join ends the turn at once and cancels its run;
* ``service/h2streams.py``: a streaming response (SSE) to an HTTP/2 client that grants no
  flow-control credit is never reset: hypercorn's send task pops 0 bytes at a zero window,
  which sets the buffer's ``_paused`` event, and the patched wait takes that for progress;
* ``service/chat_render.py``: ``_printed`` is joined again at each read, and a reasoning
  model's thinking between answer tokens reads it once a piece: still quadratic.

The other tests pass: edge cases checked and found right.
"""

from __future__ import annotations

import ssl
from io import StringIO
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import httpx
import pytest
import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config
from hypercorn.events import Closed, RawData
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.worker_context import WorkerContext
from rich.console import Console

from service import chat, chat_render, h2streams, sendstall
from service.agents import react_parser
from service.agents.react_parser import _PLAIN_ACTION, _PLAIN_INPUT, _input_of

# -- chat.py: a TLS handshake cut by the peer is taken for a refused certificate ----------------


def _sse(*frames: tuple[str, str, dict[str, Any]]) -> bytes:
    import json
    return b"".join(f"id: {i}\nevent: {e}\ndata: {json.dumps(d)}\n\n".encode()
                    for i, e, d in frames)


class _CutBody(httpx.AsyncByteStream):
    """A body that sends ``data`` and then breaks (the connection lost mid-stream)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self) -> Any:
        yield self.data
        raise httpx.ReadError("connection lost")


def _tls_eof() -> httpx.ConnectError:
    """What httpx over trio raises when the peer closes TCP during the TLS handshake (seen
    against a socket that accepts and closes): ConnectError <- httpcore.ConnectError <-
    trio.BrokenResourceError <- ssl.SSLEOFError."""
    eof = ssl.SSLEOFError(8, "[SSL: UNEXPECTED_EOF_WHILE_READING] EOF occurred in violation "
                             "of protocol (_ssl.c:1006)")
    eof.library, eof.reason = "SSL", "UNEXPECTED_EOF_WHILE_READING"  # (as _ssl sets them)
    broken = trio.BrokenResourceError()
    broken.__cause__ = eof
    err = httpx.ConnectError("")
    err.__cause__ = broken
    return err


@pytest.mark.parametrize("cut", ["tls_eof", "refused"])
async def test_a_tls_handshake_cut_during_a_rejoin_is_retried_not_given_up(cut: str) -> None:
    """Fixed (was: DEFECT: service/chat.py ``_tls_failure`` (line ~472) takes any
    ``ssl.SSLError`` in the chain for a refused certificate, and ``Client._stream`` (line ~294)
    then neither re-joins nor keeps the run: ``SSLEOFError`` (UNEXPECTED_EOF_WHILE_READING: the
    peer closed TCP in the handshake, as a TLS proxy or the service restarting does; reproduced
    with a socket that accepts and closes) is a transient fault like a refused connection. Here
    a stream is cut after run.started, the first re-join's handshake is cut, the second would
    bring the answer: the turn fails with "the service cannot be reached again: TLS:
    UNEXPECTED_EOF_WHILE_READING" and the run is cancelled (before the change: re-joined for
    _REJOIN_FOR seconds). The intent (commit 96474a9) was "a refused certificate named at once"
    (ssl.SSLCertVerificationError). (``refused``, a connection refused instead, passes: the
    control.).)"""
    calls: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(f"{request.method} {request.url.path}")
        if request.method == "POST" and request.url.path.endswith("/messages"):
            body = _sse(("1", "run.started", {"run_id": "r1", "agent": "chat"}))
            return httpx.Response(200, headers={"X-Run-Id": "r1",
                                                "content-type": "text/event-stream"},
                                  stream=_CutBody(body))
        if request.url.path == "/api/runs/r1/events":
            if sum(c.endswith("/events") for c in calls) == 1:
                if cut == "refused":
                    raise httpx.ConnectError("[Errno 111] Connection refused")
                raise _tls_eof()
            return httpx.Response(200, headers={"content-type": "text/event-stream"},
                                  content=_sse(("2", "token", {"text": "hello"}),
                                               ("3", "run.finished",
                                                {"status": "succeeded", "content": "hello"})))
        if request.url.path.endswith("/cancel"):
            return httpx.Response(202, json={})
        return httpx.Response(404, json={})

    out = StringIO()
    renderer = chat.Renderer(Console(file=out, force_terminal=False),
                             Console(file=StringIO(), force_terminal=False, width=200))
    opts = chat.Options(url="https://svc.test", key=None, agent=None, model=None,
                        conversation="c1", message=None)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler),
                                 base_url="https://svc.test") as http:
        client = chat.Client(opts, http, renderer)
        turn = chat.Turn()
        failure: BaseException | None = None
        with trio.fail_after(20):
            try:
                await client._stream("c1", {"content": "hi", "stream": True}, turn)
            except chat.ChatError as exc:
                failure = exc
    assert failure is None, (f"turn given up on a transient TLS EOF: {failure}; "
                             f"requests {calls}")
    assert turn.status == "succeeded", turn.status
    assert not any(c.endswith("/cancel") for c in calls), calls


def test_a_refused_certificate_is_still_named() -> None:
    """(Checked, passes.) The case the change meant: a certificate refused is named."""
    cert = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cert.verify_message = "self-signed certificate"
    err = httpx.ConnectError("")
    err.__cause__ = cert
    assert chat._tls_failure(err) == "TLS: self-signed certificate"


# -- h2streams.py: a streaming response to a zero-window client is never reset -----------------


async def _h2_zero_window(monkeypatch: pytest.MonkeyPatch, app: Any,
                          seconds: float) -> tuple[bool, int]:
    """Hypercorn's real ``H2Protocol`` (patched by ``h2streams.install``) in this process,
    the stall limit at 0.2 s, an h2 client announcing SETTINGS_INITIAL_WINDOW_SIZE = 0 that
    asks for stream 1 and answers SETTINGS and PINGs, never a WINDOW_UPDATE: whether stream
    1 was reset within ``seconds``, and the bytes its buffer held at the end."""
    h2streams.install()
    monkeypatch.setattr(sendstall, "_stall", [0.2])
    out: list[bytes] = []

    async def send(event: Any) -> None:
        if isinstance(event, RawData):
            out.append(event.data)

    reset, held = False, 0
    async with TaskGroup() as tg:
        proto = H2Protocol(ASGIWrapper(app), Config(), WorkerContext(None), tg, {},  # type: ignore[arg-type]
                           False, ("127.0.0.1", 1), ("127.0.0.1", 2), send)
        await proto.initiate()
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        client.initiate_connection()
        client.send_headers(1, [(":method", "GET"), (":path", "/events"), (":scheme", "http"),
                                (":authority", "127.0.0.1")], end_stream=True)
        await proto.handle(RawData(data=client.data_to_send()))
        with trio.move_on_after(seconds):
            while not reset:
                await trio.sleep(0.05)
                data, out[:] = b"".join(out), []
                for ev in client.receive_data(data) if data else []:
                    if isinstance(ev, h2.events.StreamReset) and ev.stream_id == 1:
                        reset = True
                back = client.data_to_send()
                if back:
                    await proto.handle(RawData(data=back))
        buffer = proto.stream_buffers.get(1)
        held = len(buffer.buffer) if buffer is not None else 0
        await proto.handle(Closed())
        tg._nursery.cancel_scope.cancel()  # type: ignore[union-attr]
    return reset, held


def _streaming_app(chunk: bytes, more: bool) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        gone = trio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await send({"type": "http.response.body", "body": chunk, "more_body": more})
            while more and not gone.is_set():
                await trio.sleep(0.01)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await gone.wait()
            nursery.cancel_scope.cancel()
    return app


async def test_h2_one_body_to_a_zero_window_client_is_reset(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """(Checked, passes: the harness of the next test sees the fix work.) A whole 100 KB body
    to a client granting no credit: ``drain`` waits, nothing is taken, the stream is reset
    (CANCEL) within a few stall limits."""
    reset, _ = await _h2_zero_window(monkeypatch, _streaming_app(b"x" * 100_000, False), 2.0)
    assert reset


async def test_h2_streaming_response_to_a_zero_window_client_is_reset(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed (was: DEFECT: service/h2streams.py ``_push`` / ``_taken_within_stall`` (lines
    ~156-176): an SSE-like response (a body sent a piece at a time, as a run's events are) to an
    HTTP/2 client whose window is 0 (it answers PINGs, never sends WINDOW_UPDATE) is never
    reset. At each ``Body``, hypercorn's ``stream_send`` unblocks the stream, its send task
    (``_send_data``) pops ``min(window, ...) = 0`` bytes, and ``StreamBuffer.pop`` sets
    ``_paused`` for any pop under the low water (``len(b"") < BUFFER_LOW_WATER``): the patched
    wait sees its event set and returns, as if the client had taken some. So the app's sends
    never wait, the buffer grows by every event of the run (here ~0.9 MB in 2 s = 10 stall
    limits), and the stream, its task and the connection are held until the run ends (then
    ``drain`` is bounded). The doc (h2streams' docstring, docs) says such a client is dropped at
    the stall limit.)"""
    reset, held = await _h2_zero_window(monkeypatch, _streaming_app(b"data: x\n\n" * 500, True),
                                        2.0)
    assert reset, f"never reset in 10 stall limits; its buffer holds {held:,} bytes"


# -- chat_render.py: the printed text joined again at each read --------------------------------


def test_thinking_between_answer_tokens_in_a_pipe_is_linear(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed (was: DEFECT: service/chat_render.py ``Renderer.step`` (line ~120, ``if
    self._printed and ...``) reads ``_printed`` for a reasoning model's thinking piece; the
    property joins the parts (``_joined``, line ~264) whenever there are two, and each answer
    token appended since makes two: a token / thinking / token / ... turn copies the whole
    answer at each piece (quadratic, as the ``+=`` it replaced). Counted here through
    ``_joined``: n tokens of 4 characters with a thinking piece after each copy ~2 n^2
    characters (10^7 for n = 2,000; 160,000 tokens would be ~5 * 10^10). A truth test needs no
    join (``self._printed_parts``).)"""
    copied = [0]
    joined = chat_render._joined

    def counting(parts: list[str]) -> str:
        if len(parts) > 1:
            copied[0] += sum(map(len, parts))
        return joined(parts)

    monkeypatch.setattr(chat_render, "_joined", counting)
    renderer = chat.Renderer(Console(file=StringIO(), force_terminal=False),
                             Console(file=StringIO(), force_terminal=False, width=200))
    renderer.started("chat")  # a pipe, the chat agent: tokens written as they come
    n = 2000
    for _ in range(n):
        renderer.token("tok ")
        renderer.step("thought", {"reasoning": True, "text": "hm"})
    assert copied[0] < 20 * 4 * n, f"{copied[0]:,} characters copied for {4 * n:,} written"


# -- chat.py: Lines and ids (checked, pass) -----------------------------------------------------


def test_lines_split_across_reads_and_ids() -> None:
    """(Checked, passes.) A CR at a read's end and its LF at the next one's start are one
    break; a lone CR is one; a CR then a CRLF is a line and an empty line (an event's end);
    a line over the cap is refused even in small reads. An empty ``id:`` keeps the last id
    and is no error (as before the change)."""
    lines = chat.Lines()
    got = lines.feed("data: 1\r") + lines.feed("\n") + lines.feed("\r") + lines.feed("\n:k\r")
    got += lines.feed("a\r") + lines.feed("\r\n")
    assert got == ["data: 1", "", ":k", "a", ""]
    small = chat.Lines(limit=10)
    small.feed("12345")
    with pytest.raises(chat.LineTooLong):
        small.feed("678901")
    assert small.limit == 10
    parser = chat.SSEParser()
    frames = [parser.feed(line) for line in ["retry: 10", "id:", "event: token",
                                             'data: {"text": "x"}', ""]]
    frame = frames[-1]
    assert frame is not None
    assert frame["id"] == ""
    assert frame["data"] == {"text": "x"}

    class R:
        def __init__(self) -> None:
            self.shown: list[str] = []

        def token(self, text: str) -> None:
            self.shown.append(text)

    client = chat.Client(chat.Options("http://x", None, None, None, None, None), None,  # type: ignore[arg-type]
                         R())  # type: ignore[arg-type]
    turn = chat.Turn()
    turn.last_id = "7"
    trio.run(client._take, frame, turn)
    assert turn.last_id == "7"


# -- react_parser.py: _made_up_call vs the loop it replaced (checked, passes) -------------------


def _old_made_up_call(scan: str, start: int) -> list[int]:
    for m in _PLAIN_ACTION.finditer(scan, start):
        given = _PLAIN_INPUT.search(scan, m.end())
        if given is not None and _input_of(scan, m) is not None:
            return [m.start()]
    return []


@pytest.mark.parametrize("text", [
    "Action: a\nAction Input: {}\n",
    "Action: a\nThought: t\nAction Input: {}\n",
    "**Action:** a\nAction: b\nAction Input: {}\n",
    "Action: a\n**Action Input:** {}\nAction: b\nAction Input: {}\n",
    "Action: a\nObservation: o\nAction: b\n**Action Input:** {}\nFinal Answer: x\n",
    "- Action: a\n> Action Input: x\nAction: c\n",
    "Action: a\nFinal Answer: b\nAction Input: {}\n",
    "Action\uff1aa\nAction_Input\uff1a{}\n",
    "text\nAction: a\n\nAction Input: {}\nAction: z\n",
])
def test_made_up_call_agrees_with_the_old_loop(text: str) -> None:
    """(Checked, passes.) The one-pass ``_made_up_call`` finds what the loop it replaced
    found, from every start (labels plain or bold, fullwidth colons, inputs after other
    labels)."""
    for start in range(len(text) + 1):
        assert react_parser._made_up_call(text, start) == _old_made_up_call(text, start), start
