"""WebSocket pings that end with their socket (hypercorn 0.18, trio worker).

``websocket_ping_interval`` (set from ``SERVICE_SSE_KEEPALIVE`` by ``service.server``) makes
hypercorn send a ping every interval: a browser cannot, and a proxy's idle timeout would cut a
socket whose run is quiet. But hypercorn's ping task sleeps the whole interval in the
connection's task group and looks at ``closed`` only when it wakes, so a socket the client had
closed kept its connection (a task and a file descriptor) up to 15 s, and a shutdown with no
request in flight waited the whole ``graceful_timeout`` for it (5.0 s against 0.05 s without
pings, measured).

The fix: the ping task waits for the interval *or* the stream's close. ``WSStream.handle`` and
``WSStream.app_send`` are where hypercorn sets ``closed``; after each, a stream that is closed
sets an event its ping task waits on. Installed from ``create_app``; the tests fail if a
hypercorn upgrade changes these names.

A peer that answers no ping is dropped: a client that reads nothing on a quiet run (a frozen
tab, a peer behind a NAT mapping that died) never fills a socket buffer with 2-byte pings, so
the stalled-write bound (``service.sendstall``) never fired, and its socket and its
``on_disconnect: cancel`` runs lived on for nobody, with their upstream streams. Now anything
heard from the client (a pong, a message, a ping) counts, and a socket that has heard nothing
for ``STALL_KEEPALIVES`` ping intervals (at least ``STALL_MIN`` s; 60 s by default) since a ping
was written is closed, as a client that left. Every browser answers pings by itself. A client
whose TCP keeps acknowledging our data (the socket's unacknowledged bytes fall from one interval
to the next) is reading, if slowly, what is ahead of a ping in the buffers: it is not dropped
(at 80 kB/s, 200 kB ahead of a ping is 2.5 s, past the bound at its minimum). One that stops
taking anything is, once the bound has passed.
"""

from __future__ import annotations

import array
import fcntl
import math
import termios
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.events import Closed
from hypercorn.protocol.events import Body, Data, StreamClosed
from hypercorn.protocol.ws_stream import WSStream
from wsproto.events import Ping

from .logs import get_logger
from .sendstall import STALL_KEEPALIVES, STALL_MIN

__all__ = ["install"]

log = get_logger("service.server")

_CLOSED = "_service_closed"  # the instance attribute holding the stream's close event
_HEARD = "_service_heard"  # ... the trio time anything last came from the client


def _closed(stream: WSStream) -> trio.Event:
    event: trio.Event | None = stream.__dict__.get(_CLOSED)
    if event is None:
        event = stream.__dict__[_CLOSED] = trio.Event()
    return event


def _then_look(original: Callable[[WSStream, Any], Awaitable[None]]
               ) -> Callable[[WSStream, Any], Awaitable[None]]:
    """``original``, then: a stream it closed sets its close event."""

    async def wrapped(self: WSStream, arg: Any) -> None:
        try:
            await original(self, arg)
        finally:
            if self.closed:
                _closed(self).set()

    return wrapped


_handle_then_look = _then_look(WSStream.handle)


async def _handle(self: WSStream, event: Any) -> None:
    if isinstance(event, Body | Data):  # bytes from the client: it is there
        self.__dict__[_HEARD] = trio.current_time()
    await _handle_then_look(self, event)
_app_send_then_look = _then_look(WSStream.app_send)


async def _send_pings(self: WSStream) -> None:
    closed = _closed(self)
    interval = self.config.websocket_ping_interval
    assert interval is not None  # hypercorn starts this task only when it is set
    silent_for = max(STALL_KEEPALIVES * interval, STALL_MIN)  # heard nothing: it is gone
    self.__dict__.setdefault(_HEARD, -math.inf)
    # When the oldest ping that nothing has answered yet was written: the silence counts from
    # there, not from our own writes' waits (a ping waits for the send lock behind a large
    # message to a client reading slowly, which sendstall bounds: such a client was dropped).
    owed_since: float | None = None
    unacked = _unacked(self)
    while not self.closed:
        await self._send_wsproto_event(Ping())
        if owed_since is None:
            owed_since = trio.current_time()
        with trio.move_on_after(interval):
            await closed.wait()
        # Fewer bytes waiting for the client's acknowledgement than an interval ago: its TCP
        # took our data, so it is there, reading what is ahead of the ping (a slow link
        # through a large message; the buffers may hold seconds of it at its pace).
        before, unacked = unacked, _unacked(self)
        if before is not None and unacked is not None and unacked < before:
            self.__dict__[_HEARD] = trio.current_time()
        if self.__dict__[_HEARD] >= owed_since:
            owed_since = None  # something came after it: the client is there
        elif trio.current_time() - owed_since >= silent_for and not self.closed:
            log.warning("a WebSocket client answered no ping for %gs: its connection is "
                        "closed", silent_for)
            await _drop(self)
            return


def _unacked(stream: WSStream) -> int | None:
    """Bytes written to ``stream``'s socket that the peer has not acknowledged yet (Linux's
    ``SIOCOUTQ``); None where that cannot be read (another platform, no plain socket)."""
    protocol = getattr(stream.send, "__self__", None)  # the HTTP protocol serving the stream
    tcp = getattr(getattr(protocol, "send", None), "__self__", None)  # its TCP server
    transport = getattr(tcp, "stream", None)
    transport = getattr(transport, "transport_stream", transport)  # under TLS: the socket's
    sock = getattr(transport, "socket", None)
    if sock is None:
        return None
    out = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, out, True)
    except (OSError, ValueError):
        return None
    return out[0]


async def _drop(stream: WSStream) -> None:
    """Close the connection under ``stream`` (its TCP server closes the socket, then tells the
    stream, whose app gets ``websocket.disconnect``), as for a client that left."""
    protocol = getattr(stream.send, "__self__", None)  # the HTTP protocol serving the stream
    send = getattr(protocol, "send", None)  # its TCP server's protocol_send
    if send is not None:
        await send(Closed())
    else:  # not reachable with hypercorn 0.18: at least the app is told
        await stream.handle(StreamClosed(stream_id=stream.stream_id))


def install() -> None:
    WSStream.handle = _handle  # type: ignore[method-assign]
    WSStream.app_send = _app_send_then_look  # type: ignore[method-assign,assignment]
    WSStream._send_pings = _send_pings  # type: ignore[method-assign]
