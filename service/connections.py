"""One connection's failure is that connection's, never the server's (hypercorn 0.18, trio).

Hypercorn's ``TCPServer.run`` (one task per connection, under ``trio.serve_listeners``) lets any
exception but ``OSError`` out of the connection, and so out of the server's nursery: every
connection of the process went with it, and the service stopped. Reviews found four ways for one
client to do that over HTTP/2 alone (a DATA frame for a stream already answered, a ``:path`` or
``:method`` that is not ASCII, 1,001 PRIORITY frames, a CONNECT through an h2c upgrade); those
are answered properly in ``service.h2streams``. Whatever else such a bug in a protocol layer
raises is now logged with its traceback (once a minute per kind, the rest counted: a client
can cause some on purpose) and ends that connection (its socket closed, its
requests told ``http.disconnect``), and the server serves on.

Installed from ``create_app``; the tests fail if a hypercorn upgrade changes these names.
"""

from __future__ import annotations

import math
import time

from hypercorn.trio.tcp_server import TCPServer

from .logs import get_logger

__all__ = ["install"]

log = get_logger("service.server")

_run = TCPServer.run


_LOG_EVERY = 60.0  # seconds: one traceback per kind of failure in each, the rest counted


class _Quiet:
    """A failure a client can cause on purpose would otherwise write a traceback per
    connection: the log is not the client's to fill."""

    def __init__(self) -> None:
        self.logged_at: dict[str, float] = {}
        self.since: dict[str, int] = {}  # failures of a kind not logged since its last line

    def log(self, exc: Exception) -> None:
        # The failure's own kind: what reaches the backstop comes in hypercorn's task group's
        # ExceptionGroup, and one client's kind of failure must not silence every other.
        kind = ", ".join(sorted({type(e).__qualname__ for e in _leaves(exc)}))
        now = time.monotonic()
        if now - self.logged_at.get(kind, -math.inf) < _LOG_EVERY:
            self.since[kind] = self.since.get(kind, 0) + 1
            return
        more = self.since.pop(kind, 0)
        self.logged_at[kind] = now
        log.error("a connection failed in hypercorn's protocol layer (%s); it is closed and "
                  "the server goes on%s", kind,
                  f" ({more} more such failures since the last report)" if more else "",
                  exc_info=exc)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


_QUIET = _Quiet()


async def _run_on_its_own(self: TCPServer) -> None:
    try:
        await _run(self)
    except Exception as exc:
        # Not a cancellation (a BaseException): the server's own stop goes on as before.
        _QUIET.log(exc)


def install() -> None:
    TCPServer.run = _run_on_its_own  # type: ignore[method-assign]
