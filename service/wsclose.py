"""WebSocket closes hypercorn 0.18 leaves out, and a buffer it leaves unbounded (RFC 6455).

Found by a review over raw sockets (tests/test_ws_protocol_edges.py):

* **A protocol error from the client got no close frame.** On a frame that breaks the RFC
  (invalid UTF-8 in a text message or a close reason, a reserved opcode, a stray continuation,
  an oversized control frame, a close code that may not be sent) wsproto yields a
  ``CloseConnection`` with the status to fail the connection with (1007, 1002) while its state
  is still ``OPEN``; hypercorn answers a close only in ``REMOTE_CLOSING``, so it cut the TCP
  connection with nothing sent. A browser saw 1006, a network failure, and reconnected into
  the same error. Now the close frame is sent with that status, then the connection closed
  (sections 7.1.7 and 8.1).
* **A message over the cap (1009) half-closed the socket.** Hypercorn wrote the 1009 and went
  on reading, without closing the connection or telling the app: a client that did not answer
  the close kept its handler and its ``on_disconnect: cancel`` runs (their events dropped
  unseen) until the ping watchdog, never while it kept sending; and every frame it sent went
  into the overflowed buffer, never cleared, written before its size check: memory without
  bound. Now the buffer is dropped and the connection closed after the 1009, whose reason
  names the cap; the app gets its disconnect, and the runs end.
* **A handshake of another version got a bare 400.** Section 4.4: a server that does not
  speak the client's version answers 426 with ``Sec-WebSocket-Version: 13``.
* **The cap counts bytes.** Hypercorn's buffer counts a text message's characters: 3,000
  emoji (12,000 bytes) went under a 8,192-byte cap. The bytes past the characters are added.
* **permessage-deflate is declined.** wsproto inflates each read of a compressed frame whole
  before any size check (about 1,000:1: a 64 kB read became some 64 MB in memory, per
  connection), and hypercorn cannot bound it. The events sent are small JSON objects; a
  client that offered compression goes on without it (every browser does).

Installed from ``create_app`` (with ``service.wsping``); the tests fail if a hypercorn upgrade
changes these names.
"""

from __future__ import annotations

from time import time
from typing import Any

from hypercorn.protocol.events import EndBody, Response, StreamClosed
from hypercorn.protocol.ws_stream import FrameTooLargeError, Handshake, WSStream
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Message, Ping, TextMessage
from wsproto.frame_protocol import CloseReason
from wsproto.handshake import WEBSOCKET_VERSION

__all__ = ["install"]

_REASON_BYTES = 123  # a close frame's payload is at most 125 bytes, 2 of them the code


def _reason(text: str) -> str:
    return text.encode()[:_REASON_BYTES].decode(errors="ignore")


async def _handle_events(self: WSStream) -> None:
    """``WSStream._handle_events``, failing the connection with a close frame and closing it
    (see the module docstring); otherwise as hypercorn's."""
    for event in self.connection.events():
        if isinstance(event, Message):
            try:
                self.buffer.extend(event)
                if isinstance(event, TextMessage) and not event.data.isascii():
                    # Hypercorn counts a text message in characters; the cap is in bytes
                    # (an emoji is 4): up to 4 x the cap went through.
                    self.buffer.length += len(event.data.encode()) - len(event.data)
                    if self.buffer.length > self.buffer.max_length:
                        raise FrameTooLargeError
            except FrameTooLargeError:
                self.buffer.clear()
                await self._send_wsproto_event(CloseConnection(
                    code=CloseReason.MESSAGE_TOO_BIG,
                    reason=_reason(f"a message may be at most {self.buffer.max_length} bytes")))
                await self.send(StreamClosed(stream_id=self.stream_id))
                return
            if event.message_finished:
                assert self.app_put is not None  # set when the connection was accepted
                await self.app_put(self.buffer.to_message())
                self.buffer.clear()
        elif isinstance(event, Ping):
            await self._send_wsproto_event(event.response())
        elif isinstance(event, CloseConnection):
            if self.connection.state == ConnectionState.REMOTE_CLOSING:  # the client closed
                await self._send_wsproto_event(event.response())
            elif self.connection.state == ConnectionState.OPEN:  # its frame broke the RFC
                await self._send_wsproto_event(
                    CloseConnection(code=event.code, reason=_reason(event.reason or "")))
            await self.send(StreamClosed(stream_id=self.stream_id))
            return


_send_error_response = WSStream._send_error_response


async def _send_error_response_naming_the_version(self: WSStream, status_code: int) -> None:
    handshake: Handshake | None = getattr(self, "handshake", None)
    if (status_code != 400 or handshake is None
            or handshake.version in (None, WEBSOCKET_VERSION)):
        await _send_error_response(self, status_code)
        return
    await self.send(Response(stream_id=self.stream_id, status_code=426, headers=[
        (b"content-length", b"0"), (b"connection", b"close"),
        (b"sec-websocket-version", WEBSOCKET_VERSION)]))
    await self.send(EndBody(stream_id=self.stream_id))
    await self.config.log.access(self.scope, {"status": 426, "headers": []},
                                 time() - self.start_time)


_accept = Handshake.accept


def _accept_uncompressed(self: Handshake, *args: Any, **kwargs: Any) -> Any:
    self.extensions = None  # no permessage-deflate (see the module docstring)
    return _accept(self, *args, **kwargs)


def install() -> None:
    WSStream._handle_events = _handle_events  # type: ignore[method-assign]
    WSStream._send_error_response = (  # type: ignore[method-assign]
        _send_error_response_naming_the_version)
    Handshake.accept = _accept_uncompressed  # type: ignore[method-assign]
