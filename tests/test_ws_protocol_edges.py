"""``GET /api/ws`` at the WebSocket protocol's edges (RFC 6455): service/wsclose.py.

Found by a review of 2026-12-05; each test failed before its fix. Real hypercorn servers on
127.0.0.1:0 with the scripted backend; the client is the raw wsproto socket of
tests/api/test_ws_and_v1_faults.py (a test decides what goes on the wire, when it reads and
whether it answers a close), plus hand-made frames for what wsproto itself refuses to send.

Checked and found sound (no test kept): malformed JSON, JSON that is not an object, unknown
or missing ``type``, extra fields, bad ``on_disconnect``, a duplicate ``type`` key, a UTF-8 BOM,
binary frames (non-UTF-8 bytes: ``malformed_json``; binary JSON is read as a text message
would be), a fragmented message with a ping between its fragments, 2,000 bad messages
pipelined in one write (2,000 error replies, no 1008), and a client that answers the 1009
(its cancel run is cancelled within ms).
"""

from __future__ import annotations

import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypercorn.protocol.ws_stream import WSStream
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage
from wsproto.extensions import PerMessageDeflate

from service.settings import load_settings

from .api.test_ws_and_v1_faults import GUARD, RawWS, _conversation, socket_with_a_run
from .fakes import Reply, ScriptedBackend
from .servers import RunningServer, running_server

MAX_BODY = 4096  # SERVICE_MAX_BODY_BYTES in the size tests ...
MAX_MESSAGE = 2 * MAX_BODY  # ... and hypercorn's cap, as service.server.build_config sets it


def _frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """One masked client frame, as it goes on the wire (wsproto refuses to build bad ones)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        length = bytes([0x80 | n])
    elif n < 65536:
        length = bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        length = bytes([0x80 | 127]) + struct.pack("!Q", n)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([(0x80 if fin else 0) | opcode]) + length + mask + body


async def _open_offering_deflate(srv: RunningServer) -> tuple[RawWS, list[Any]]:
    """A RawWS that offers permessage-deflate: the socket and the extensions the server took."""
    host, port = srv.url.removeprefix("http://").rsplit(":", 1)
    ws = RawWS(await trio.open_tcp_stream(host, int(port)))
    await ws.stream.send_all(ws.conn.send(Request(
        host="127.0.0.1", target="/api/ws", extensions=[PerMessageDeflate()])))
    with trio.fail_after(GUARD):
        while not any(isinstance(e, AcceptConnection) for e in ws.pending):
            assert await ws._pump(), "closed during the handshake"
    accepted = next(e for e in ws.pending if isinstance(e, AcceptConnection))
    ws.pending = [e for e in ws.pending if not isinstance(e, AcceptConnection)]
    return ws, list(accepted.extensions)


def _record_streams(monkeypatch: pytest.MonkeyPatch) -> list[WSStream]:
    """Hypercorn's WebSocket streams, as the server makes them (to read their buffers)."""
    streams: list[WSStream] = []
    original = WSStream.__init__

    def init(self: WSStream, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        streams.append(self)

    monkeypatch.setattr(WSStream, "__init__", init)
    return streams


@asynccontextmanager
async def _a_socket_with_a_quiet_run(tmp_path: Path) -> AsyncIterator[tuple[RawWS, Any]]:
    """A server with the message cap and pings every keep-alive, as service.server's
    build_config serves it; a raw socket whose ``cancel`` run has streamed a token and then
    goes quiet: (the socket, the run's handle)."""
    backend = ScriptedBackend(lambda req: Reply("a b c d", hang_after=2))  # then quiet
    settings = load_settings(db=tmp_path / "s.db", max_body_bytes=MAX_BODY)
    async with (running_server(settings, backend, websocket_max_message_size=MAX_MESSAGE,
                               websocket_ping_interval=settings.sse_keepalive) as srv,
                socket_with_a_run(srv) as (ws, handle)):
        yield ws, handle


async def _read_to_close(ws: RawWS) -> Any:
    """Skips the runs' events: the first thing that is not one (an error reply, a close
    frame, or None for a connection cut without a close frame: a browser's 1006)."""
    while isinstance(got := await ws.recv(), dict) and "run_id" in got:
        pass
    return got


# -- 1. a protocol error from the client: the connection is cut with no close frame -------------

BAD_FRAMES = {
    "invalid UTF-8 in a text frame": (_frame(0x1, b'{"type": "cancel", "run_id": "\xff"}'),
                                      1007),
    "invalid UTF-8 in a close frame's reason": (_frame(0x8, struct.pack("!H", 1000) + b"\xc3("),
                                                1007),
    "a reserved opcode": (_frame(0x3, b"x"), 1002),
    "a continuation with no message begun": (_frame(0x0, b"x"), 1002),
    "a text frame inside a fragmented message": (
        _frame(0x1, b'{"type": ', fin=False) + _frame(0x1, b'"cancel"}'), 1002),
    "a ping of 126 bytes": (_frame(0x9, b"p" * 126), 1002),
    "a close code that may not be sent (999)": (_frame(0x8, struct.pack("!H", 999)), 1002),
}


@pytest.mark.parametrize("name", list(BAD_FRAMES))
async def test_a_protocol_error_from_the_client_gets_a_close_frame_with_its_code(
    tmp_path: Path, name: str,
) -> None:
    """On a frame that breaks RFC 6455 (invalid UTF-8 in a text message or a close reason, a
    reserved opcode, a stray continuation, a text frame inside a fragmented message, an
    oversized control frame, a forbidden close code) the server cut the TCP connection with
    no close frame: the client saw 1006, a network failure, and was never told what it did
    wrong. RFC 6455 sections 7.1.7, 8.1 and 7.4.1: a close frame with the fault's status
    (1007 for invalid UTF-8, 1002 for the others), then the TCP close."""
    raw, code = BAD_FRAMES[name]
    settings = load_settings(db=tmp_path / "s.db")
    async with running_server(settings, ScriptedBackend()) as srv:
        ws = await RawWS.open(srv)
        try:
            await ws.stream.send_all(raw)
            got = await _read_to_close(ws)
        finally:
            await ws.stream.aclose()
    assert isinstance(got, CloseConnection), (
        f"{name}: the client got {got!r}, not a close frame {code}: the connection was cut "
        "(a browser reports 1006)")
    assert got.code == code, f"{name}: closed with {got.code}, not {code}"


# -- 2. a message over hypercorn's cap (1009): the socket is half-closed, not closed -----------


async def test_a_cancel_run_stops_promptly_once_its_socket_is_closed_with_1009(
    tmp_path: Path,
) -> None:
    """Past twice SERVICE_MAX_BODY_BYTES hypercorn sent a 1009 close frame and then neither
    closed the connection nor told the app. A client that did not answer the close kept its
    handler, and its ``on_disconnect: cancel`` runs went on calling the model with their
    events dropped unseen, until the ping watchdog (60 s by default), never while it sent
    anything. Now the connection is closed after the 1009, the app gets its disconnect and
    the socket's cancel run ends ``cancelled`` (RFC 6455 section 7.1.7)."""
    async with _a_socket_with_a_quiet_run(tmp_path) as (ws, handle):
        await ws.stream.send_all(ws.conn.send(TextMessage("x" * (MAX_MESSAGE + 1))))
        close = await _read_to_close(ws)
        assert isinstance(close, CloseConnection), close
        assert close.code == 1009, close
        # The client does not answer the close (it is behind, or wedged); it waits.
        with trio.move_on_after(3):
            await handle.finished.wait()
        status, reason = handle.status.value, handle.cancel_reason
        tcp = "open"
        with trio.move_on_after(0.5):  # has the server closed the connection?
            if await ws.stream.receive_some(65536) == b"":
                tcp = "closed"
    assert (status, tcp) == ("cancelled", "closed"), (
        f"3 s after the server's 1009 close frame, the socket's cancel run is {status} "
        f"(reason {reason}) and the TCP connection is {tcp}")


async def test_data_sent_after_a_1009_close_is_not_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After its 1009 close frame hypercorn went on reading the connection and feeding every
    data frame into the message buffer that overflowed: never cleared, and written to before
    its size check. A client that ignored the 1009 and kept sending made the server hold
    everything it sent (about 800 kB after 100 frames of 8 kB), and each frame counted as
    "heard" for the ping watchdog, so nothing closed the socket. RFC 6455 section 10.4: an
    endpoint must protect itself against its size limits; 7.1.7: after failing the
    connection it should not go on processing data. Now the buffer is dropped and the
    connection closed: the server never holds more than one message's cap."""
    streams = _record_streams(monkeypatch)
    async with _a_socket_with_a_quiet_run(tmp_path) as (ws, _):
        (stream,) = streams
        frames = [ws.conn.send(TextMessage("x" * (MAX_MESSAGE + 1)))]
        frames += [_frame(0x1, b"y" * 8000) for _ in range(100)]  # each under the cap
        sent, held = 0, 0
        for i, raw in enumerate(frames):
            try:
                await ws.stream.send_all(raw)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                break  # the server closed the connection: right
            sent += len(raw)
            with trio.fail_after(GUARD):  # the server has read and handled it
                await trio.testing.wait_all_tasks_blocked(cushion=0.02)
            if i == 0:  # the over-cap message: the server said 1009
                close = await _read_to_close(ws)
                assert isinstance(close, CloseConnection), close
                assert close.code == 1009, close
                assert str(MAX_MESSAGE) in close.reason, close  # it names the cap
            held = max(held, stream.buffer.length)
    assert held <= MAX_MESSAGE + 8192, (
        f"after its 1009 close the server holds {held:,} bytes of the client's data in the "
        f"socket's message buffer (cap {MAX_MESSAGE:,}; the client sent {sent:,} bytes on "
        "the wire), and it grows with every frame the client sends")


async def test_permessage_deflate_is_declined_and_a_compressed_frame_is_a_protocol_error(
    tmp_path: Path,
) -> None:
    """wsproto inflates each read of a compressed frame whole before any size check (about
    1,000:1: ten 4 kB frames became some 40 MB in the server's memory), and hypercorn cannot
    bound it. The extension is declined: a client that offers it goes on without it (the
    socket works), and one that compresses a frame anyway is failed with 1002."""
    settings = load_settings(db=tmp_path / "s.db")
    async with running_server(settings, ScriptedBackend()) as srv:
        conv = await _conversation(srv)
        ws, extensions = await _open_offering_deflate(srv)
        try:
            assert extensions == []
            await ws.send({"type": "message", "conversation_id": conv, "content": "q"})
            got = await ws.until("run.finished")
            assert got[-1]["data"]["status"] == "succeeded", got
            # A text frame with RSV1 set (compressed), which no extension allows now.
            raw = bytearray(_frame(0x1, b"\x00" * 8))
            raw[0] |= 0x40
            await ws.stream.send_all(bytes(raw))
            close = await _read_to_close(ws)
        finally:
            await ws.stream.aclose()
    assert isinstance(close, CloseConnection), close
    assert close.code == 1002, close


# -- 3. an unsupported WebSocket version --------------------------------------------------------


async def test_a_handshake_with_an_unsupported_version_is_told_the_supported_one(
    tmp_path: Path,
) -> None:
    """A handshake with ``Sec-WebSocket-Version: 8`` got hypercorn's bare 400, so a client
    could not tell that the version was the problem, nor which to use. RFC 6455 section 4.4:
    426 (or 400) with ``Sec-WebSocket-Version: 13``."""
    settings = load_settings(db=tmp_path / "s.db")
    async with running_server(settings, ScriptedBackend()) as srv:
        host, port = srv.url.removeprefix("http://").rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        try:
            await stream.send_all(
                b"GET /api/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 8\r\n\r\n")
            head = b""
            with trio.fail_after(GUARD):
                while b"\r\n\r\n" not in head:
                    data = await stream.receive_some(4096)
                    assert data, f"closed with no response: {head!r}"
                    head += data
        finally:
            await stream.aclose()
    status_line, *lines = head.split(b"\r\n\r\n")[0].decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
    status = int(status_line.split()[1])
    assert status in (400, 426), status_line
    assert headers.get("sec-websocket-version") == "13", (
        f"{status_line!r} with headers {sorted(headers)}: no Sec-WebSocket-Version naming "
        "the version the server speaks")
