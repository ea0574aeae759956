"""Keep hypercorn's keep-alive timer alive after a response (quart-trio + hypercorn trio worker).

The bug (hypercorn 0.18, quart-trio 0.12): after an HTTP/1.1 response, hypercorn re-arms the
connection's idle timer (the task that closes it after ``keep_alive_timeout``, or at once when
the server shuts down) with ``nursery.start`` from inside the app's final ``send``. Quart-trio
runs that ``send`` in its per-request nursery, which its message task has just cancelled (the
request is over), and a task started from a cancelled context is never moved to its target
nursery: trio cancels it straight away. So after its first request a keep-alive connection had
no idle timer: it stayed open forever while idle (a file descriptor and a task per client that
keeps connections, such as a proxy), and it held the shutdown for the whole ``graceful_timeout``.

The fix: the final ``http.response.body`` message of an HTTP/1.x response is sent under a
shield, so the timer starts from an uncancelled context. That send already writes its bytes
under hypercorn's own shield, so this adds no wait that could not already block.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, ASGISendEvent, Scope

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

        async def send_last_shielded(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.CancelScope(shield=True):
                    await send(message)
            else:
                await send(message)

        await self.app(scope, receive, send_last_shielded)
