"""HTTP/2 on the plain port (h2c, prior knowledge): service/h2streams.py.

Found by a review of 2026-12-05 (each test failed before its fix). A raw ``h2`` client on a
real hypercorn server on 127.0.0.1:0.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
import trio
from hypercorn.protocol.h2 import H2Protocol

from service.settings import load_settings

from .fakes import ScriptedBackend
from .h2client import H2Client
from .servers import RunningServer, running_server

GUARD = 10  # seconds any single wait may take


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
        c = await H2Client.to(srv.url)
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
        c = await H2Client.to(srv.url)
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


async def test_a_lowercase_connect_is_no_websocket_over_http2(tmp_path: Path) -> None:
    """service/h2streams.py refuses ``(b":method", b"CONNECT")`` only, byte for byte, but
    hypercorn's ``_create_stream`` upper-cases the method before it picks the stream class:
    ``:method connect`` (which h2 validates as an ordinary request, with ``:scheme`` and
    ``:path``) still made a ``WSStream``, and the app accepted the WebSocket over HTTP/2 (a
    200 on the stream, the handler running), the very thing the module says cannot happen.
    Right: any method that hypercorn would treat as CONNECT is reset (compare case-insensitively),
    no response headers are sent, and the server serves on."""
    settings = load_settings(db=tmp_path / "s.db")
    async with running_server(settings, ScriptedBackend()) as srv:
        c = await H2Client.to(srv.url)
        try:
            sid = c.h2.get_next_available_stream_id()
            c.h2.send_headers(sid, [
                (b":method", b"connect"), (b":scheme", b"http"),
                (b":path", b"/api/ws"), (b":authority", b"127.0.0.1"),
                (b"sec-websocket-version", b"13")])
            await c.flush()
            with trio.fail_after(GUARD):
                while not any(isinstance(e, (h2.events.StreamReset, h2.events.ResponseReceived))
                              for e in c.events):
                    assert await c.pump(), "the server closed the connection"
            responses = [dict(e.headers) for e in c.events
                         if isinstance(e, h2.events.ResponseReceived)]
            assert responses == [], responses
        finally:
            await c.stream.aclose()
        assert await _serves(srv) == 200


async def test_an_h2c_upgrade_of_a_connect_is_no_websocket_over_http2(tmp_path: Path) -> None:
    """service/h2streams.py guards ``H2Protocol._handle_events`` only; an HTTP/1.1 request
    with ``Upgrade: h2c`` becomes stream 1 through ``H2Protocol.initiate(headers=...)``, which
    calls ``_create_stream`` directly. ``CONNECT /api/ws`` with ``Upgrade: h2c`` and
    ``Sec-WebSocket-Version: 13`` was so accepted as a WebSocket over HTTP/2 (a 200 on stream 1,
    the app's handler running), which the module says cannot happen. Right: a CONNECT that
    arrives by an h2c upgrade is refused too (stream 1 reset, or the upgrade declined), and no
    200 is sent."""
    settings = load_settings(db=tmp_path / "s.db")
    async with running_server(settings, ScriptedBackend()) as srv:
        host, port = srv.url.removeprefix("http://").rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        client = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=True, header_encoding=None))
        settings_header = client.initiate_upgrade_connection() or b""
        try:
            await stream.send_all(
                b"CONNECT /api/ws HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: "
                + settings_header
                + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
            buf = b""
            with trio.fail_after(GUARD):
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    assert data, "closed before the upgrade answer"
                    buf += data
            head, _, rest = buf.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101"):
                return  # the upgrade was declined: sound
            await stream.send_all(client.data_to_send())
            events = list(client.receive_data(rest)) if rest else []
            with trio.fail_after(GUARD):
                while not any(isinstance(e, (h2.events.StreamReset, h2.events.ResponseReceived,
                                             h2.events.ConnectionTerminated)) for e in events):
                    data = await stream.receive_some(65536)
                    assert data, "the server closed the connection"
                    events += client.receive_data(data)
                    await stream.send_all(client.data_to_send())
            statuses = [dict(e.headers)[b":status"] for e in events
                        if isinstance(e, h2.events.ResponseReceived)]
            assert b"200" not in statuses, statuses
        finally:
            await stream.aclose()
        assert await _serves(srv) == 200


async def test_priority_frames_for_many_streams_do_not_stop_the_server(tmp_path: Path) -> None:
    """The KeyError for DATA on a closed stream was one of several exceptions that leave
    ``H2Protocol._handle_events`` uncaught and end hypercorn's serve (every connection of the
    process); service/h2streams.py guards that one and leaves its neighbour: a PRIORITY frame
    for a stream the tree does not know is inserted (``_priority_updated``) into a
    ``priority.PriorityTree`` that holds at most 1,000 streams, and the 1,001st raises
    ``priority.TooManyStreamsError``, caught nowhere. PRIORITY frames for idle streams are
    legal (RFC 9113 section 5.3.x / 6.3), so one client with 1,001 small frames stopped the
    service. Right: the error is caught (the frame ignored, or the connection closed with
    ENHANCE_YOUR_CALM / PROTOCOL_ERROR), and the server serves on."""
    settings = load_settings(db=tmp_path / "s.db")
    async with running_server(settings, ScriptedBackend()) as srv:
        await _send_then_read(srv, lambda c: _prioritize(c, 1100))
        assert await _serves(srv) == 200


def _prioritize(c: H2Client, streams: int) -> None:
    for i in range(streams):
        c.h2.prioritize(2 * i + 1, weight=16)


async def _send_then_read(srv: RunningServer, frames: Callable[[H2Client], None], *,
                          seconds: float = 1.0) -> None:
    """A connection that sends what ``frames`` queues, then reads until the server closes it
    (or ``seconds`` pass)."""
    c = await H2Client.to(srv.url)
    try:
        frames(c)
        await c.flush()
        with trio.move_on_after(seconds):
            while await c.pump():
                pass
    finally:
        await c.stream.aclose()


@pytest.mark.parametrize(("method", "path"), [(b"GET", "/h\u00e9althz".encode()),
                                              ("G\u00c9T".encode(), b"/healthz")])
async def test_a_request_with_a_non_ascii_path_or_method_does_not_stop_the_server(
    tmp_path: Path, method: bytes, path: bytes,
) -> None:
    """One HEADERS frame stops the service, as the DATA frame did before service/h2streams.py:
    h2 validates pseudo-headers but not that ``:path`` and ``:method`` are ASCII (h11 does,
    for HTTP/1.1), and hypercorn decodes them with ``.decode("ascii")``
    (``H2Protocol._create_stream`` for the method, ``HTTPStream.handle`` for the path). The
    ``UnicodeDecodeError`` leaves ``_handle_events`` uncaught (the wrapper passes every
    other event on unguarded) and ends hypercorn's serve with every connection of the process.
    Right: that stream is refused (400, or reset) and the server serves on."""
    settings = load_settings(db=tmp_path / "s.db")

    def request(c: H2Client) -> None:
        c.h2.send_headers(c.h2.get_next_available_stream_id(), [
            (b":method", method), (b":scheme", b"http"), (b":path", path),
            (b":authority", b"127.0.0.1")], end_stream=True)

    async with running_server(settings, ScriptedBackend()) as srv:
        await _send_then_read(srv, request)
        assert await _serves(srv) == 200


async def test_one_client_cannot_fill_the_error_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """service/connections.py logged every connection whose protocol layer raised with
    ``log.exception`` (ERROR, full traceback, about 3 kB each here). A failure any client can
    cause on purpose reached it: 1,001 PRIORITY frames (14 kB) on an h2c connection make
    hypercorn's ``_priority_updated`` raise ``priority.TooManyStreamsError`` (the aa815b3 test
    ``test_priority_frames_for_many_streams_do_not_stop_the_server`` only checks the server
    lives). No authentication is involved (this is below the app). Measured: 20 such
    connections from a plain Python client in under half a second gave 20 ERROR tracebacks;
    one client can write megabytes of ERROR tracebacks a minute (disk, log shipping, alerts).

    Right: a client-caused protocol failure is answered as one (the frame refused, or the
    connection closed with GOAWAY ENHANCE_YOUR_CALM, logged as one line at most), and the
    backstop, for failures nobody foresaw, logs its traceback a bounded number of times
    (e.g. once per kind per minute, counting the rest).

    Now the overflow is answered with ENHANCE_YOUR_CALM (no traceback), and the backstop logs
    once a minute per kind (next test)."""
    settings = load_settings(db=tmp_path / "s.db")
    caplog.set_level(logging.INFO)
    async with running_server(settings, ScriptedBackend()) as srv:
        with trio.fail_after(GUARD):
            for _ in range(20):
                await _send_then_read(srv, lambda c: _prioritize(c, 1001), seconds=2)
            assert await _serves(srv) == 200
    tracebacks = [r for r in caplog.records
                  if r.exc_info and r.levelno >= logging.ERROR and r.name == "service.server"]
    assert len(tracebacks) <= 2, (
        f"20 connections of one client wrote {len(tracebacks)} ERROR tracebacks "
        f"({tracebacks[0].getMessage()!r})")


def test_the_connection_backstop_logs_once_a_minute_per_kind(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """What the backstop (service/connections.py) catches is logged with its traceback once a
    minute per kind of failure; the rest are counted, and said with the next line."""
    import service.connections as connections

    now = [1000.0]
    monkeypatch.setattr(connections.time, "monotonic", lambda: now[0])
    quiet = connections._Quiet()
    caplog.set_level(logging.INFO)
    for _ in range(20):
        quiet.log(KeyError(1))
    quiet.log(ValueError("x"))
    now[0] += connections._LOG_EVERY
    quiet.log(KeyError(2))
    lines = [r.getMessage() for r in caplog.records if r.name == "service.server"]
    assert len(lines) == 3, lines
    assert "(KeyError)" in lines[0]
    assert "more" not in lines[0]
    assert "(ValueError)" in lines[1]
    assert "19 more such failures" in lines[2], lines[2]


def _leaves(exc: BaseException | None) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [] if exc is None else [exc]


async def test_a_client_caused_failure_does_not_silence_every_other_backstop_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """service/connections.py ``_Quiet`` logs one traceback a minute "per kind of failure",
    the kind being ``type(exc).__qualname__``. But what reaches the backstop from
    ``TCPServer.run`` is always trio's ``ExceptionGroup`` (hypercorn's task group wraps it), so
    every failure is of one kind, "ExceptionGroup". And a client can still cause one: 1,000
    PRIORITY frames for idle streams and a HEADERS frame in the same write (the priority
    wrapper sends GOAWAY ENHANCE_YOUR_CALM for the PRIORITY overflow, then hypercorn's
    ``_create_stream`` inserts the new stream into the full tree: ``TooManyStreamsError``,
    not caught by the wrapper of ``_priority_updated``).

    Wrong: after that client's connection, an unforeseen bug (here a KeyError raised by a
    WINDOW_UPDATE's handling, on another connection) is only counted, its traceback never
    logged; a client doing this once a minute hides every other failure of the protocol
    layer from the log.
    Right: the kind is the failure's own (the leaf exceptions of the group, e.g.
    ``TooManyStreamsError`` vs ``KeyError``), so the unforeseen one is logged with its
    traceback; and the overflow of the tree by a new stream is answered like the PRIORITY
    overflow (no backstop at all)."""
    import service.connections as connections

    quiet = connections._Quiet()  # a fresh minute
    monkeypatch.setattr(connections, "_QUIET", quiet)
    original = H2Protocol._window_updated

    async def unforeseen_bug(self: H2Protocol, stream_id: int | None) -> None:
        raise KeyError("an unforeseen bug in the protocol layer")

    settings = load_settings(db=tmp_path / "s.db")
    caplog.set_level(logging.INFO)
    async with running_server(settings, ScriptedBackend()) as srv:
        with trio.fail_after(20):
            def tree_filled_then_a_stream(c: H2Client) -> None:
                for i in range(1000):
                    c.h2.prioritize(2 * i + 3, weight=16)
                c.h2.send_headers(1, [(b":method", b"GET"), (b":scheme", b"http"),
                                      (b":path", b"/healthz"), (b":authority", b"127.0.0.1")],
                                  end_stream=True)

            await _send_then_read(srv, tree_filled_then_a_stream, seconds=2)  # the client
            monkeypatch.setattr(H2Protocol, "_window_updated", unforeseen_bug)
            # An ordinary client meets the bug.
            await _send_then_read(
                srv, lambda d: d.h2.increment_flow_control_window(1000), seconds=2)
            monkeypatch.setattr(H2Protocol, "_window_updated", original)
            assert await _serves(srv) == 200
    logged = [type(leaf).__name__ for r in caplog.records
              if r.name == "service.server" and r.exc_info for leaf in _leaves(r.exc_info[1])]
    assert "KeyError" in logged, (
        f"the unforeseen KeyError was not logged, only counted ({quiet.since}); tracebacks "
        f"logged: {logged}")
