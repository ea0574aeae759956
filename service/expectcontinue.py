"""``Expect: 100-continue`` with a body over the cap: the 413 first, no ``100 Continue``.

hypercorn (0.18, HTTP/1.1) sends ``100 Continue`` as soon as it has read a request's head,
before the app has seen the request. A client that asks before it uploads (curl does for any
body over 1 KiB, so do .NET's and Java's clients) was told to go on with a body the app then
refused (413, ``SERVICE_MAX_BODY_BYTES``), and uploaded all of it. RFC 9110 10.1.1: a final
status that the head alone decides SHOULD be sent without the 100. So no 100 goes out for a
request whose declared ``Content-Length`` is over the cap: the app answers it 413 at once
(``factory``'s ``_begin``), and the client, told a final status, sends no body.
"""

from __future__ import annotations

from typing import Any

import h11
from hypercorn.protocol.h11 import H11Protocol

__all__ = ["install"]

_cap: list[int | None] = [None]  # bytes; set by install()
_send_h11_event = H11Protocol._send_h11_event


def _declared_over_the_cap(protocol: H11Protocol) -> bool:
    cap = _cap[0]
    scope = getattr(protocol.stream, "scope", None)
    if cap is None or not isinstance(scope, dict):
        return False
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value) > cap
            except ValueError:  # h11 refuses a malformed one before this
                return False
    return False


async def _send_h11_event_checked(self: H11Protocol, event: Any) -> None:
    if (isinstance(event, h11.InformationalResponse) and event.status_code == 100
            and _declared_over_the_cap(self)):
        return  # the app's 413 is the answer
    await _send_h11_event(self, event)


def install(max_body_bytes: int) -> None:
    """No ``100 Continue`` for a declared body over ``max_body_bytes``."""
    _cap[0] = max_body_bytes
    H11Protocol._send_h11_event = _send_h11_event_checked  # type: ignore[method-assign]
