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
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.protocol.ws_stream import WSStream
from wsproto.events import Ping

__all__ = ["install"]

_CLOSED = "_service_closed"  # the instance attribute holding the stream's close event


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
_app_send_then_look = _then_look(WSStream.app_send)


async def _send_pings(self: WSStream) -> None:
    closed = _closed(self)
    interval = self.config.websocket_ping_interval
    assert interval is not None  # hypercorn starts this task only when it is set
    while not self.closed:
        await self._send_wsproto_event(Ping())
        with trio.move_on_after(interval):
            await closed.wait()


def install() -> None:
    WSStream.handle = _handle_then_look  # type: ignore[method-assign,assignment]
    WSStream.app_send = _app_send_then_look  # type: ignore[method-assign,assignment]
    WSStream._send_pings = _send_pings  # type: ignore[method-assign]
