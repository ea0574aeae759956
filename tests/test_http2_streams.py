"""HTTP/2 on the plain port (h2c, prior knowledge): service/h2streams.py.

Found by a review of 2026-12-05 (each test failed before its fix). A raw ``h2`` client on a
real hypercorn server on 127.0.0.1:0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import trio

from service.settings import load_settings

from .fakes import ScriptedBackend
from .servers import RunningServer, running_server

GUARD = 10  # seconds any single wait may take


class H2Client:
    """One HTTP/2 connection on a raw socket, read only when asked."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h2 = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.events: list[Any] = []

    @classmethod
    async def open(cls, srv: RunningServer) -> H2Client:
        host, port = srv.url.removeprefix("http://").rsplit(":", 1)
        c = cls(await trio.open_tcp_stream(host, int(port)))
        c.h2.initiate_connection()
        await c.flush()
        with trio.fail_after(GUARD):
            while not any(isinstance(e, h2.events.RemoteSettingsChanged) for e in c.events):
                assert await c.pump(), "closed before the server's settings"
        return c

    async def flush(self) -> None:
        if out := self.h2.data_to_send():
            await self.stream.send_all(out)

    async def pump(self) -> bool:
        data = await self.stream.receive_some(65536)
        if not data:
            return False
        for e in self.h2.receive_data(data):
            self.events.append(e)
            if isinstance(e, h2.events.DataReceived):
                self.h2.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        await self.flush()
        return True


async def _serves(srv: RunningServer) -> int:
    async with srv.client() as c:
        with trio.fail_after(GUARD):
            return (await c.get("/healthz")).status_code


async def test_data_after_an_early_answer_to_an_upload_does_not_stop_the_server(
    tmp_path: Path,
) -> None:
    """An upload over HTTP/2 past SERVICE_MAX_BODY_BYTES is answered 413 before it is all
    sent; hypercorn then forgets the stream, and the next DATA frame of the upload hit
    ``self.streams[stream_id]`` with no guard: a KeyError that ended hypercorn's serve, and
    every connection with it (one request stopped the service). Now the rest is credited and
    dropped: the client gets its 413 and the server serves on."""
    settings = load_settings(db=tmp_path / "s.db", max_body_bytes=4096)
    async with running_server(settings, ScriptedBackend()) as srv:
        c = await H2Client.open(srv)
        try:
            sid = c.h2.get_next_available_stream_id()
            c.h2.send_headers(sid, [
                (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/api/conversations"),
                (b":authority", b"127.0.0.1"), (b"content-type", b"application/json"),
                (b"content-length", b"100000")])
            await c.flush()
            with trio.fail_after(GUARD):
                for _ in range(6):  # the upload goes on, whatever the server answered
                    n = min(c.h2.local_flow_control_window(sid), c.h2.max_outbound_frame_size)
                    if n > 0:
                        c.h2.send_data(sid, b"x" * n)
                        await c.flush()
                    with trio.move_on_after(0.2):
                        assert await c.pump(), "the server closed the connection"
            statuses = [dict(e.headers)[b":status"] for e in c.events
                        if isinstance(e, h2.events.ResponseReceived)]
            assert statuses == [b"413"], statuses
        finally:
            await c.stream.aclose()
        assert await _serves(srv) == 200


async def test_websockets_are_not_offered_over_http2(tmp_path: Path) -> None:
    """Hypercorn advertised RFC 8441's extended CONNECT, but its WebSocket stream neither ends
    on the wire nor in its buffers over HTTP/2 when the server closes it (a 1009, a protocol
    error: the client then answering the close crashed the server, as above). It is no longer
    advertised: browsers then open their WebSocket over HTTP/1.1. A client that sends an
    extended CONNECT anyway has its stream reset (h2 takes ``:protocol`` all the same, and
    hypercorn had accepted the WebSocket), and the server serves on."""
    settings = load_settings(db=tmp_path / "s.db")
    async with running_server(settings, ScriptedBackend()) as srv:
        c = await H2Client.open(srv)
        try:
            assert not c.h2.remote_settings.enable_connect_protocol
            sid = c.h2.get_next_available_stream_id()
            # Sent by hand: h2 refuses to send ``:protocol`` to a server that did not offer it.
            c.h2.remote_settings.enable_connect_protocol = 1  # type: ignore[misc]
            c.h2.send_headers(sid, [
                (b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"http"),
                (b":path", b"/api/ws"), (b":authority", b"127.0.0.1"),
                (b"sec-websocket-version", b"13")])
            await c.flush()
            with trio.fail_after(GUARD):
                while not any(isinstance(e, h2.events.StreamReset) for e in c.events):
                    assert await c.pump(), "the server closed the connection"
            assert not any(isinstance(e, h2.events.ResponseReceived) for e in c.events)
        finally:
            await c.stream.aclose()
        assert await _serves(srv) == 200
