"""One connection's failure is that connection's, never the server's (hypercorn 0.18, trio).

Hypercorn's ``TCPServer.run`` (one task per connection, under ``trio.serve_listeners``) lets any
exception but ``OSError`` out of the connection, and so out of the server's nursery: every
connection of the process went with it, and the service stopped. Reviews found four ways for one
client to do that over HTTP/2 alone (a DATA frame for a stream already answered, a ``:path`` or
``:method`` that is not ASCII, 1,001 PRIORITY frames, a CONNECT through an h2c upgrade); those
are answered properly in ``service.h2streams``. Whatever else such a bug in a protocol layer
raises is now logged with its traceback and ends that connection (its socket closed, its
requests told ``http.disconnect``), and the server serves on.

Installed from ``create_app``; the tests fail if a hypercorn upgrade changes these names.
"""

from __future__ import annotations

from hypercorn.trio.tcp_server import TCPServer

from .logs import get_logger

__all__ = ["install"]

log = get_logger("service.server")

_run = TCPServer.run


async def _run_on_its_own(self: TCPServer) -> None:
    try:
        await _run(self)
    except Exception:
        # Not a cancellation (a BaseException): the server's own stop goes on as before.
        log.exception("a connection failed in hypercorn's protocol layer; it is closed and "
                      "the server goes on")


def install() -> None:
    TCPServer.run = _run_on_its_own  # type: ignore[method-assign]
