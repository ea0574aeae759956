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
before. Not shielded, on purpose:

- a response sent before the app received the whole request body (a 413, a 401 to a large
  POST): hypercorn would close the connection at once, and closing a socket with unread data
  resets it, so the client might never read the answer. Such a connection keeps the old
  behaviour (open until the client closes it; a 413 says ``Connection: close``);
- HTTP/2 (its final send may wait for flow-control credit) and WebSocket connections, which
  keep the upstream behaviour: they close when the client closes them.
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

__all__ = ["KeepAliveFix"]

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

        body_received = False

        async def receive_noting_the_end() -> ASGIReceiveEvent:
            nonlocal body_received
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_received = True
            return message

        async def send_last_shielded(message: ASGISendEvent) -> None:
            if (message["type"] == "http.response.body" and not message.get("more_body", False)
                    and body_received):
                with trio.CancelScope(shield=True):
                    await send(message)
            else:
                await send(message)

        await self.app(scope, receive_noting_the_end, send_last_shielded)
