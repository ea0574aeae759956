"""A lean HTTP/1.1 transport for plain-``http://`` upstreams: h11 on trio sockets, under httpx.

The adapters keep httpx's client (requests, responses, timeouts, its exception tree, test
transports); only the transport below it changes. httpx's own (httpcore's pool) costs about
0.33 ms of CPU more per streamed call and a few generator layers per chunk (measured:
0.81 against 0.48 ms per call of 9 SSE chunks, both ends in one process), and a local LLM
server is nearly always plain HTTP on loopback. ``https://`` requests go to httpx's own
transport, TLS and all.

What it keeps of httpcore's behaviour:

* Keep-alive: a connection whose response was read to its end goes back to an idle list
  (last in, first out) and is reused for the same host and port. An idle connection that has
  become readable (the server closed it, or sent what it should not) or that has been idle past
  ``keepalive_expiry`` is closed instead of reused.
* Limits: at most ``max_connections`` open connections (idle ones count; one idle for another
  host is closed to make room); a request waits up to the pool timeout for a connection to
  come back or close (``httpx.PoolTimeout``). At most ``max_keepalive_connections`` idle
  ones are kept.
* Timeouts from the request's ``timeout`` extension: connect, write, read (None: no bound).
* Errors as httpx's own transport raises them: ``ConnectError``/``ConnectTimeout``,
  ``WriteError``/``WriteTimeout``, ``ReadError``/``ReadTimeout``, ``RemoteProtocolError``
  (malformed framing, a server that closes before a response or mid-body), ``PoolTimeout``.
* A response closed before its end, or any failure or cancellation while a request is out,
  closes the connection: it is never reused in an unknown state.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import h11
import httpx
import trio

__all__ = ["MalformedResponse", "PlainHTTPTransport"]

RECEIVE_SIZE = 65536

_Key = tuple[bytes, int]


class MalformedResponse(httpx.RemoteProtocolError):
    """The server sent what HTTP/1.1 does not allow (a transfer-encoding other than chunked,
    a bad chunk size, a broken header line): a bad answer, not a lost connection."""


class _Connection:
    __slots__ = ("eof", "h11", "idle_since", "key", "stream")

    def __init__(self, stream: trio.SocketStream, key: _Key) -> None:
        self.stream = stream
        self.key = key
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0
        self.eof = False  # the server closed its side

    def reusable(self, now: float, expiry: float) -> bool:
        """Idle and still good: not past its expiry, and nothing (an EOF) waiting to be read."""
        return now - self.idle_since < expiry and not self.stream.socket.is_readable()

    def close(self) -> None:
        self.stream.socket.close()


class PlainHTTPTransport(httpx.AsyncBaseTransport):
    """See the module docstring. ``tls``: the transport ``https://`` requests go to."""

    def __init__(self, *, limits: httpx.Limits, tls: httpx.AsyncBaseTransport) -> None:
        self._tls = tls
        self._max_connections = limits.max_connections or 1_000_000
        self._max_idle = (limits.max_keepalive_connections
                          if limits.max_keepalive_connections is not None
                          else self._max_connections)
        self._expiry = limits.keepalive_expiry if limits.keepalive_expiry is not None else 5.0
        self._open = 0  # connections open, idle ones included
        self._released = trio.lowlevel.ParkingLot()  # requests waiting for room in the pool
        self._idle: dict[_Key, list[_Connection]] = {}
        self._idle_count = 0
        self._active = 0  # connections carrying a request
        self._requests = 0  # requests holding a connection
        self._queued = 0  # requests waiting for one
        self._closed = False

    def __repr__(self) -> str:
        return (f"<PlainHTTPTransport [Requests: {self._requests} active, {self._queued} queued"
                f" | Connections: {self._active} active, {self._idle_count} idle]>")

    @property
    def max_connections(self) -> int:
        return self._max_connections

    @property
    def requests(self) -> int:
        """Requests holding a connection (sent, their response not yet closed)."""
        return self._requests

    def counts(self) -> tuple[int, int]:
        """(connections carrying a request, idle connections)."""
        return self._active, self._idle_count

    # -- the pool -------------------------------------------------------------------------------

    def _take_idle(self, key: _Key) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            self._idle_count -= 1
            if conn.reusable(now, self._expiry):
                return conn
            self._drop(conn)
        return None

    def _drop(self, conn: _Connection) -> None:
        """Close a connection that is no one's (idle or just released): its place is free."""
        conn.close()
        self._open -= 1
        self._released.unpark()

    def _drop_oldest_idle(self) -> bool:
        oldest: _Connection | None = None
        for conns in self._idle.values():
            if conns and (oldest is None or conns[0].idle_since < oldest.idle_since):
                oldest = conns[0]
        if oldest is None:
            return False
        self._idle[oldest.key].pop(0)
        self._idle_count -= 1
        self._drop(oldest)
        return True

    def _release(self, conn: _Connection, reuse: bool) -> None:
        self._active -= 1
        self._requests -= 1
        if not reuse or self._closed:
            self._drop(conn)
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.key, []).append(conn)
        self._idle_count += 1
        if self._idle_count > self._max_idle:
            self._drop_oldest_idle()
        self._released.unpark()  # a request waiting for room may take it

    async def _acquire(self, request: httpx.Request, key: _Key,
                       timeouts: dict[str, Any]) -> _Connection:
        """An idle connection to ``key``, or a new one once the pool has room (an idle one to
        another host gives its place up); a request waits for a release up to the pool
        timeout."""
        deadline = trio.current_time() + _seconds(timeouts.get("pool"))
        while True:
            if (conn := self._take_idle(key)) is not None:
                return conn
            if self._open >= self._max_connections:
                self._drop_oldest_idle()
            if self._open < self._max_connections:
                break
            self._queued += 1
            try:
                with trio.move_on_at(deadline) as waited:
                    await self._released.park()
            finally:
                self._queued -= 1
            if waited.cancelled_caught:
                raise httpx.PoolTimeout("no free connection in the pool", request=request)
        self._open += 1
        host = request.url.host
        connected = False
        try:
            with trio.move_on_after(_seconds(timeouts.get("connect"))) as connecting:
                stream = await trio.open_tcp_stream(host, key[1])
            if connecting.cancelled_caught:
                raise httpx.ConnectTimeout(f"connect to {host}:{key[1]} timed out",
                                           request=request)
            connected = True
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__, request=request) from exc
        finally:
            if not connected:  # failed, timed out or cancelled: its place is free again
                self._open -= 1
                self._released.unpark()
        return _Connection(stream, key)

    # -- one request ----------------------------------------------------------------------------

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            return await self._tls.handle_async_request(request)
        if self._closed:
            raise httpx.ConnectError("the transport is closed", request=request)
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        key = (url.raw_host, url.port or 80)
        body = await request.aread()
        conn = await self._acquire(request, key, timeouts)
        self._active += 1
        self._requests += 1
        try:
            event = await self._exchange(conn, request, body, timeouts)
        except BaseException:
            self._release(conn, reuse=False)
            raise
        return httpx.Response(
            status_code=event.status_code,
            headers=event.headers.raw_items(),
            stream=_Body(self, conn, request, _seconds(timeouts.get("read"))),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": bytes(event.reason)},
        )

    async def _exchange(self, conn: _Connection, request: httpx.Request, body: bytes,
                        timeouts: dict[str, Any]) -> h11.Response:
        """Send the request; return the response's head (informational ones skipped)."""
        h = conn.h11
        try:
            data = h.send(h11.Request(method=request.method, target=request.url.raw_path,
                                      headers=request.headers.raw))
            if body:
                data += h.send(h11.Data(data=body))  # type: ignore[operator]
            data += h.send(h11.EndOfMessage())  # type: ignore[operator]
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc), request=request) from exc
        with trio.move_on_after(_seconds(timeouts.get("write"))) as writing:
            try:
                await conn.stream.send_all(data)  # type: ignore[arg-type]
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise httpx.WriteError(str(exc) or type(exc).__name__,
                                       request=request) from exc
        if writing.cancelled_caught:
            raise httpx.WriteTimeout("sending the request timed out", request=request)
        read_timeout = _seconds(timeouts.get("read"))
        while True:
            event = await _next_event(conn, request, read_timeout)
            if type(event) is h11.Response:
                return event
            if type(event) is h11.ConnectionClosed:
                raise httpx.RemoteProtocolError(
                    "Server disconnected without sending a response.", request=request)
            # h11.InformationalResponse (1xx): wait for the real one.

    async def aclose(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                self._drop(conn)
        self._idle.clear()
        self._idle_count = 0
        await self._tls.aclose()


def _seconds(value: Any) -> float:
    return float("inf") if value is None else float(value)


async def _next_event(conn: _Connection, request: httpx.Request, read_for: float) -> Any:
    """h11's next event, reading from the socket as it needs; httpx's errors."""
    h = conn.h11
    while True:
        try:
            event = h.next_event()
        except h11.RemoteProtocolError as exc:
            # After an EOF h11 says "peer closed connection without sending complete message
            # body": the connection was lost. Otherwise what came was malformed.
            lost = h.their_state is h11.CLOSED or conn.eof
            raise (httpx.RemoteProtocolError if lost else MalformedResponse)(
                str(exc), request=request) from exc
        if event is not h11.NEED_DATA:
            return event
        with trio.move_on_after(read_for) as reading:
            try:
                data = await conn.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc
        if reading.cancelled_caught:
            raise httpx.ReadTimeout("reading the response timed out", request=request)
        if not data:
            conn.eof = True
        if not data and h.their_state is h11.SEND_RESPONSE:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.",
                                            request=request)
        try:
            h.receive_data(data)
        except h11.RemoteProtocolError as exc:  # data after the connection was closed
            raise MalformedResponse(str(exc), request=request) from exc


class _Body(httpx.AsyncByteStream):
    """The response body: h11's ``Data`` events as bytes; at its end the connection goes back
    to the pool if both sides allow it. A class, not a generator: each read is one call."""

    def __init__(self, transport: PlainHTTPTransport, conn: _Connection,
                 request: httpx.Request, timeout: float) -> None:
        self._transport = transport
        self._conn: _Connection | None = conn
        self._request = request
        self._timeout = timeout

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise StopAsyncIteration
        try:
            while True:
                event = await _next_event(conn, self._request, self._timeout)
                kind = type(event)
                if kind is h11.Data:
                    data = event.data
                    if data:
                        return data if type(data) is bytes else bytes(data)
                    continue
                if kind is h11.EndOfMessage:
                    self._finish(conn)
                    raise StopAsyncIteration
                # ConnectionClosed mid-body is raised by h11 as a RemoteProtocolError above.
                raise httpx.RemoteProtocolError(f"unexpected {kind.__name__} in a body",
                                                request=self._request)
        except StopAsyncIteration:
            raise
        except BaseException:
            self._conn = None
            self._transport._release(conn, reuse=False)
            raise

    def _finish(self, conn: _Connection) -> None:
        self._conn = None
        h = conn.h11
        reuse = h.our_state is h11.DONE and h.their_state is h11.DONE
        if reuse:
            try:
                h.start_next_cycle()
            except h11.LocalProtocolError:
                reuse = False
        self._transport._release(conn, reuse=reuse)

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:  # closed before its end: the connection's state is unknown
            self._transport._release(conn, reuse=False)
