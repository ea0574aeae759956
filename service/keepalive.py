"""Keep hypercorn's keep-alive timer alive after a response (quart-trio + hypercorn trio worker).

The bug (hypercorn 0.18, quart-trio 0.12): after an HTTP/1.1 response, hypercorn re-arms the
connection's idle timer (the task that closes it after ``keep_alive_timeout``, or at once when
the server shuts down) from inside the app's final ``send``. Quart-trio runs that ``send`` in its
per-request nursery, which its message task cancels as soon as the request is over, so the
re-arm is cancelled before the timer task exists (at the checkpoint of the timer's lock, or,
scheduled the other way round, because trio does not move a task started from a cancelled
nursery). After its first response a keep-alive connection had no idle timer: it stayed open
for as long as the client kept it (a file descriptor and a task per idle client, such as a
proxy's pool), and it held every shutdown for the whole ``graceful_timeout``.

The fix: the final ``http.response.body`` message of an HTTP/1.x response is sent under a
shield, so the timer is armed (or the connection closed) from an uncancelled context. Its bytes
were already written under hypercorn's own shield, so this adds no wait that could not block
before. A response that comes before the whole request body has arrived (a 413, a 401 to an
upload) first waits up to ``LINGER`` seconds for the rest of the body, which quart reads and
drops: closing a socket with unread data resets it, and a client still uploading (most read
only once they have sent everything) would lose the answer. Past ``LINGER`` the connection is
closed anyway. HTTP/2 connections (whose final send may wait for flow-control credit) are
left as they were. WebSocket connections do not need it: after a refused handshake or a close
handshake the server closes the connection at once (checked over raw sockets).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)

__all__ = ["LINGER", "KeepAliveFix"]

LINGER = 5.0  # seconds an early answer waits for the rest of the request body before closing

ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]


class KeepAliveFix:
    """ASGI middleware: see the module docstring."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __repr__(self) -> str:
        return f"<KeepAliveFix {self.app!r}>"

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http" or scope.get("http_version") not in ("1.0", "1.1"):
            await self.app(scope, receive, send)
            return

        body_in = trio.Event()  # the whole request body has been received (or the client left)

        async def receive_noting_the_end() -> ASGIReceiveEvent:
            message = await receive()
            if message["type"] == "http.disconnect" or (
                message["type"] == "http.request" and not message.get("more_body", False)
            ):
                body_in.set()
            return message

        async def send_last_shielded(message: ASGISendEvent) -> None:
            if message["type"] != "http.response.body" or message.get("more_body", False):
                await send(message)
                return
            if not body_in.is_set():
                with trio.move_on_after(LINGER):
                    await body_in.wait()
            with trio.CancelScope(shield=True):
                await send(message)

        await self.app(scope, receive_noting_the_end, send_last_shielded)
