"""A lean HTTP/1.1 transport for plain-``http://`` upstreams: h11 on trio sockets, under httpx.

The adapters keep httpx's client (requests, responses, timeouts, its exception tree, test
transports); only the transport below it changes. httpx's own (httpcore's pool) costs about
0.33 ms of CPU more per streamed call and a few generator layers per chunk (measured:
0.81 against 0.48 ms per call of 9 SSE chunks, both ends in one process), and a local LLM
server is nearly always plain HTTP on loopback. ``https://`` requests go to httpx's own
transport, TLS and all.

What it keeps of httpcore's behaviour:

* Keep-alive: a connection whose response was read to its end, with nothing more in its
  buffer, goes back to an idle list (last in, first out) and is reused for the same host and
  port. An idle connection that has become readable (the server closed it, or sent what it
  should not) or that has been idle past ``keepalive_expiry`` is closed instead of reused; the
  idle connections of every host are looked over at most every ``sweep_every`` seconds, so
  those of an upstream no longer called are closed too.
* Limits: at most ``max_connections`` open connections (idle ones count; one idle for another
  host is closed to make room). A request that finds the pool full waits, first come first
  served, up to the pool timeout (``httpx.PoolTimeout``): a connection released goes to the
  oldest waiter (its own, if for the same host; else its place). At most
  ``max_keepalive_connections`` idle ones are kept.
* Timeouts from the request's ``timeout`` extension: connect, write, read (None: no bound).
* Errors as httpx's own transport raises them: ``ConnectError``/``ConnectTimeout``,
  ``WriteError``/``WriteTimeout``, ``ReadError``/``ReadTimeout``, ``RemoteProtocolError``
  (a server that closes before a response or mid-body), ``PoolTimeout``; what HTTP/1.1 does not
  allow (a transfer-encoding other than chunked, a bad chunk) is ``MalformedResponse``, a
  ``RemoteProtocolError`` the adapters tell from a lost connection.
* A server that answers early (a 413 and a close while a long prompt is still being sent) is
  heard: its answer is returned, not the write's error.
* A response closed before its end, a failure or a cancellation while a request is out, or a
  101 closes the connection: it is never reused in an unknown state. Closing the transport
  closes every connection, those carrying a response included.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import h11
import httpx
import trio

__all__ = ["MalformedResponse", "PlainHTTPTransport"]

RECEIVE_SIZE = 65536
MAX_HEAD = 100 * 1024  # bytes of a response's head (httpcore's bound; h11's own is 16 KiB)
SWEEP_EVERY = 1.0  # seconds between looks over every host's idle connections
_ONE_WRITE = 64 * 1024  # a request body up to this is written with its head, in one write

_Key = tuple[bytes, int]
_READ_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError,
                OSError)


class MalformedResponse(httpx.RemoteProtocolError):
    """The server sent what HTTP/1.1 does not allow (a transfer-encoding other than chunked,
    a bad chunk size, a broken header line): a bad answer, not a lost connection."""


class _Connection:
    __slots__ = ("broken", "eof", "h11", "idle_since", "in_use", "key", "stream")

    def __init__(self, stream: trio.SocketStream, key: _Key) -> None:
        self.stream = stream
        self.key = key
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self.idle_since = 0.0
        self.eof = False  # the server closed its side
        self.broken = False  # a write failed: never reused, whatever h11 thinks
        self.in_use = False  # carrying a request (released once, whoever releases it)

    def reusable(self, now: float, expiry: float) -> bool:
        """Idle and still good: not past its expiry, and nothing (an EOF) waiting to be read."""
        return now - self.idle_since < expiry and not self.stream.socket.is_readable()

    def close(self) -> None:
        self.stream.socket.close()


class _Waiter:
    """A request waiting for room in the pool; granted a connection for its host, or a place
    (``slot``: it may open one, already counted in ``_open``)."""

    __slots__ = ("conn", "event", "key", "slot")

    def __init__(self, key: _Key) -> None:
        self.key = key
        self.event = trio.Event()
        self.conn: _Connection | None = None
        self.slot = False

    @property
    def granted(self) -> bool:
        return self.conn is not None or self.slot


class PlainHTTPTransport(httpx.AsyncBaseTransport):
    """See the module docstring. ``tls``: the transport ``https://`` requests go to."""

    def __init__(self, *, limits: httpx.Limits, tls: httpx.AsyncBaseTransport,
                 sweep_every: float = SWEEP_EVERY) -> None:
        self._tls = tls
        self._max_connections = limits.max_connections or 1_000_000
        self._max_idle = (limits.max_keepalive_connections
                          if limits.max_keepalive_connections is not None
                          else self._max_connections)
        self._expiry = (limits.keepalive_expiry if limits.keepalive_expiry is not None
                        else math.inf)
        self._sweep_every = sweep_every
        self._next_sweep = 0.0
        self._open = 0  # connections open or being opened, idle ones included
        self._waiters: deque[_Waiter] = deque()  # oldest first
        self._idle: dict[_Key, list[_Connection]] = {}
        self._idle_count = 0
        self._in_use: set[_Connection] = set()  # connections carrying a request
        self._closed = False

    def __repr__(self) -> str:
        return (f"<PlainHTTPTransport [Requests: {len(self._in_use)} active, "
                f"{len(self._waiters)} queued | Connections: {len(self._in_use)} active, "
                f"{self._idle_count} idle]>")

    @property
    def max_connections(self) -> int:
        return self._max_connections

    @property
    def requests(self) -> int:
        """Requests holding a connection (sent, their response not yet closed)."""
        return len(self._in_use)

    def counts(self) -> tuple[int, int]:
        """(connections carrying a request, idle connections)."""
        return len(self._in_use), self._idle_count

    # -- the pool -------------------------------------------------------------------------------

    def _take_idle(self, key: _Key, now: float) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            self._idle_count -= 1
            if conn.reusable(now, self._expiry):
                return conn
            self._drop(conn)
        return None

    def _sweep(self, now: float) -> None:
        """Close the idle connections of every host that are no longer good."""
        self._next_sweep = now + self._sweep_every
        for key, conns in list(self._idle.items()):
            bad = [c for c in conns if not c.reusable(now, self._expiry)]
            if bad:
                self._idle[key] = [c for c in conns if c not in bad]
                self._idle_count -= len(bad)
                for conn in bad:
                    self._drop(conn)

    def _free_place(self) -> None:
        """A connection's place in the pool is free: to the oldest waiter, if any."""
        if self._waiters and not self._closed:
            waiter = self._waiters.popleft()
            waiter.slot = True  # it inherits the place, still counted in _open
            waiter.event.set()
        else:
            self._open -= 1

    def _drop(self, conn: _Connection) -> None:
        """Close a connection that is no one's (idle or just released)."""
        conn.close()
        self._free_place()

    def _drop_oldest_idle(self) -> bool:
        oldest: _Connection | None = None
        for conns in self._idle.values():
            if conns and (oldest is None or conns[0].idle_since < oldest.idle_since):
                oldest = conns[0]
        if oldest is None:
            return False
        self._idle[oldest.key].remove(oldest)
        self._idle_count -= 1
        self._drop(oldest)
        return True

    def _release(self, conn: _Connection, reuse: bool) -> None:
        """A request is done with ``conn`` (once: a second release, from another task that
        closed the response meanwhile, does nothing)."""
        if not conn.in_use:
            return
        conn.in_use = False
        self._in_use.discard(conn)
        now = time.monotonic()
        conn.idle_since = now
        if (not reuse or self._closed or conn.broken or self._max_idle <= 0
                or not conn.reusable(now, self._expiry)):  # the socket has more, or an EOF
            self._drop(conn)  # its place goes to the oldest waiter, if any
            return
        if self._waiters:  # the oldest waiter gets it: the connection, or its place
            waiter = self._waiters.popleft()
            if waiter.key == conn.key:
                waiter.conn = conn
            else:
                conn.close()
                waiter.slot = True
            waiter.event.set()
            return
        self._idle.setdefault(conn.key, []).append(conn)
        self._idle_count += 1
        if self._idle_count > self._max_idle:
            self._drop_oldest_idle()

    def _give_back(self, waiter: _Waiter) -> None:
        """A waiter granted something it will not use (cancelled as it was granted)."""
        if waiter.conn is not None:
            conn, waiter.conn = waiter.conn, None
            conn.in_use = True
            self._release(conn, reuse=True)
        elif waiter.slot:
            waiter.slot = False
            self._free_place()

    async def _acquire(self, request: httpx.Request, key: _Key,
                       timeouts: dict[str, Any]) -> _Connection:
        """An idle connection to ``key``, or a new one once the pool has room (an idle one to
        another host gives its place up); else the request waits its turn."""
        if self._closed:
            raise httpx.ConnectError("the transport is closed", request=request)
        now = time.monotonic()
        if now >= self._next_sweep:
            self._sweep(now)
        if not self._waiters:  # nobody is ahead
            if (conn := self._take_idle(key, now)) is not None:
                return conn
            if self._open >= self._max_connections:
                self._drop_oldest_idle()
            if self._open < self._max_connections:
                self._open += 1
                return await self._connect(request, key, timeouts)
        waiter = _Waiter(key)
        self._waiters.append(waiter)
        try:
            with trio.move_on_after(_seconds(timeouts.get("pool"))):
                await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self._give_back(waiter)
            raise
        finally:
            if not waiter.granted and waiter in self._waiters:
                self._waiters.remove(waiter)
        if self._closed:  # closed while it waited (granted or not): nothing is sent
            self._give_back(waiter)
            raise httpx.ConnectError("the transport is closed", request=request)
        if waiter.conn is not None:
            return waiter.conn
        if waiter.slot:
            return await self._connect(request, key, timeouts)
        raise httpx.PoolTimeout("no free connection in the pool", request=request)

    async def _connect(self, request: httpx.Request, key: _Key,
                       timeouts: dict[str, Any]) -> _Connection:
        """A new connection, its place in the pool already counted (given back on failure)."""
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
                self._free_place()
        conn = _Connection(stream, key)
        if self._closed:  # closed while this one connected
            conn.close()
            self._open -= 1
            raise httpx.ConnectError("the transport is closed", request=request)
        return conn

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
        conn.in_use = True
        self._in_use.add(conn)
        try:
            event = await self._exchange(conn, request, body, timeouts)
        except BaseException:
            self._release(conn, reuse=False)
            raise
        switched = event.status_code == 101  # nothing more of it is HTTP: closed at the end
        return httpx.Response(
            status_code=event.status_code,
            headers=event.headers.raw_items(),
            stream=_Body(self, conn, request, _seconds(timeouts.get("read")), switched),
            extensions={"http_version": b"HTTP/" + bytes(event.http_version),
                        "reason_phrase": bytes(event.reason)},
        )

    async def _exchange(self, conn: _Connection, request: httpx.Request, body: bytes,
                        timeouts: dict[str, Any]) -> h11.Response | h11.InformationalResponse:
        """Send the request; return the response's head (informational ones skipped, but a
        101). A write that fails is not the answer if the server sent one (an early 413)."""
        h = conn.h11
        try:
            head = h.send(h11.Request(method=request.method, target=request.url.raw_path,
                                      headers=request.headers.raw))
            rest = [h.send(h11.Data(data=body))] if body else []
            rest.append(h.send(h11.EndOfMessage()))
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc), request=request) from exc
        assert head is not None
        writes = ([b"".join([head, *rest])]  # type: ignore[list-item]
                  if len(body) <= _ONE_WRITE else [head, *rest])
        write_error: httpx.WriteError | None = None
        with trio.move_on_after(_seconds(timeouts.get("write"))) as writing:
            try:
                for data in writes:
                    await conn.stream.send_all(data)  # type: ignore[arg-type]
            except _READ_ERRORS as exc:
                conn.broken = True
                write_error = httpx.WriteError(str(exc) or type(exc).__name__,
                                               request=request)
                write_error.__cause__ = exc
        if writing.cancelled_caught:
            conn.broken = True
            raise httpx.WriteTimeout("sending the request timed out", request=request)
        read_for = _seconds(timeouts.get("read"))
        while True:
            try:
                event = await _next_event(conn, request, read_for)
            except httpx.TransportError:
                if write_error is not None:  # no answer came either: the write's error
                    raise write_error from write_error.__cause__
                raise
            kind = type(event)
            if kind is h11.Response:
                return event  # type: ignore[no-any-return]
            if kind is h11.InformationalResponse:
                if event.status_code == 101:
                    return event  # type: ignore[no-any-return]
                continue  # 100 Continue, 103 Early Hints: the real one follows
            if write_error is not None:
                raise write_error from write_error.__cause__
            if kind is h11.ConnectionClosed:
                raise httpx.RemoteProtocolError(
                    "Server disconnected without sending a response.", request=request)
            raise httpx.RemoteProtocolError(f"unexpected {kind.__name__} before a response",
                                            request=request)

    async def aclose(self) -> None:
        """Closes every connection: idle ones, and those carrying a response (their readers
        get a ReadError); requests waiting for the pool get a ConnectError."""
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
                self._open -= 1
        self._idle.clear()
        self._idle_count = 0
        for conn in self._in_use:
            conn.close()  # released (and counted out) by its response's close
        while self._waiters:
            self._waiters.popleft().event.set()  # granted nothing: told the transport closed
        await self._tls.aclose()


def _seconds(value: Any) -> float:
    return math.inf if value is None else float(value)


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
        if event is h11.PAUSED:  # after a 101: nothing more here is HTTP (never spin on it)
            raise httpx.RemoteProtocolError("the connection switched protocols",
                                            request=request)
        if event is not h11.NEED_DATA:
            return event
        with trio.move_on_after(read_for) as reading:
            try:
                data = await conn.stream.receive_some(RECEIVE_SIZE)
            except _READ_ERRORS as exc:
                raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc
        if reading.cancelled_caught:
            raise httpx.ReadTimeout("reading the response timed out", request=request)
        if not data:
            conn.eof = True
            if h.their_state is h11.SEND_RESPONSE:
                raise httpx.RemoteProtocolError(
                    "Server disconnected without sending a response.", request=request)
        h.receive_data(data)


class _Body(httpx.AsyncByteStream):
    """The response body: h11's ``Data`` events as bytes; at its end the connection goes back
    to the pool if both sides allow it and nothing more is buffered. A class, not a generator:
    each read is one call."""

    def __init__(self, transport: PlainHTTPTransport, conn: _Connection,
                 request: httpx.Request, read_for: float, switched: bool) -> None:
        self._transport = transport
        self._conn: _Connection | None = conn
        self._request = request
        self._read_for = read_for
        self._ended = switched  # a 101 has no body here
        if switched:
            conn.broken = True

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None or self._ended:
            if self._ended:
                raise StopAsyncIteration
            # Closed before its end (by another task): not a clean end of the body.
            raise httpx.ReadError("the response was closed", request=self._request)
        try:
            while True:
                event = await _next_event(conn, self._request, self._read_for)
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
            if self._conn is conn:
                self._conn = None
            self._transport._release(conn, reuse=False)
            raise

    def _finish(self, conn: _Connection) -> None:
        self._ended = True
        self._conn = None
        h = conn.h11
        # Reused only in a known state: both sides done, and nothing more in the buffer (a
        # server that sent past its Content-Length: those bytes are no one's answer).
        reuse = (h.our_state is h11.DONE and h.their_state is h11.DONE
                 and not h.trailing_data[0])
        if reuse:
            try:
                h.start_next_cycle()
            except h11.LocalProtocolError:
                reuse = False
        self._transport._release(conn, reuse=reuse)

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:  # closed before its end (or a 101): its state is unknown
            self._transport._release(conn, reuse=False)
