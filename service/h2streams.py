"""HTTP/2 streams hypercorn 0.18 has closed, and no WebSockets over HTTP/2.

Hypercorn serves HTTP/2 on the plain port too (h2c, prior knowledge), so any client reaches it.

* **DATA for a closed stream crashed the server.** Once a response is over (an early 413 to an
  upload still coming, a WebSocket closed), ``H2Protocol`` forgets the stream; a DATA frame the
  client sends on it after that (the rest of its upload) hit ``self.streams[stream_id]`` with
  no guard: an uncaught ``KeyError`` that left the connection's task and ended hypercorn's
  serve, with every connection of the process. One request could stop the service. Now such
  DATA is credited back (flow control) and dropped, as hypercorn already drops a late
  END_STREAM.
* **Requests no stream is made for**: pseudo-headers that are not ASCII (hypercorn decodes
  them as ASCII: the error ended the server too) and any CONNECT are refused, their stream
  reset (also a CONNECT that comes as an h2c upgrade); PRIORITY frames for more than the
  1,000 streams hypercorn's tree holds close the connection with ENHANCE_YOUR_CALM. What else
  a protocol layer raises ends only its connection (``service.connections``).
* **No WebSockets over HTTP/2** (RFC 8441's extended CONNECT is no longer advertised, and a
  CONNECT sent anyway is refused, as above; in any case of its method).
  Hypercorn's WebSocket stream ends over HTTP/2 neither on the wire nor in its buffers when the
  server closes it (a 1009, a protocol error, a dropped peer: ``service.wsclose``,
  ``service.wsping``), and the connection-level ways to close a socket would close every
  stream of the connection. Browsers only use it where the server advertises it; without it
  they open the WebSocket over HTTP/1.1, where all of that is tested.

Installed from ``create_app``; the tests fail if a hypercorn upgrade changes these names.
"""

from __future__ import annotations

from typing import Any

import h2.errors
import h2.events
import h2.settings
import priority
from hypercorn.events import Closed
from hypercorn.protocol.events import EndBody
from hypercorn.protocol.h2 import H2Protocol

__all__ = ["install"]

_handle_events = H2Protocol._handle_events
_create_stream = H2Protocol._create_stream
_init = H2Protocol.__init__


def _refused(headers: list[tuple[bytes, bytes]] | None) -> bool:
    """A request no stream is made for: a CONNECT (a WebSocket or a tunnel, in any case:
    hypercorn upper-cases the method), or pseudo-headers that are not ASCII (RFC 9113 8.2.1:
    malformed; hypercorn decodes them as ASCII, and the error ended the server)."""
    for name, value in headers or ():
        if name.startswith(b":"):
            if not value.isascii():
                return True
            if name == b":method" and value.upper() == b"CONNECT":
                return True
    return False


async def _create_stream_or_refuse(self: H2Protocol, request: h2.events.RequestReceived) -> None:
    if _refused(request.headers):
        self.connection.reset_stream(request.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
        await self._flush()
        return
    try:
        await _create_stream(self, request)
    except priority.TooManyStreamsError:  # the tree filled by PRIORITY frames before it
        await _calm_down(self)


async def _calm_down(self: H2Protocol) -> None:
    self.connection.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
    await self._flush()
    await self.send(Closed())


async def _initiate(self: H2Protocol, headers: list[tuple[bytes, bytes]] | None = None,
                    settings: bytes | None = None) -> None:
    """``H2Protocol.initiate`` (hypercorn 0.18's, as it is), but an h2c upgrade's request
    (stream 1) may be refused: then there is no stream to end."""
    if settings is not None:
        self.connection.initiate_upgrade_connection(settings)
    else:
        self.connection.initiate_connection()
    await self._flush()
    if headers is not None:
        event = h2.events.RequestReceived(stream_id=1, headers=headers)
        await self._create_stream(event)
        if event.stream_id in self.streams:
            await self.streams[event.stream_id].handle(EndBody(stream_id=event.stream_id))
    self.task_group.spawn(self.send_task)


async def _handle_events_of_live_streams(self: H2Protocol, events: list[h2.events.Event]) -> None:
    """``H2Protocol._handle_events``, with DATA for a stream it has closed (or refused)
    dropped. One event at a time: a stream may close while the events before it are
    handled."""
    for event in events:
        if isinstance(event, h2.events.DataReceived) and event.stream_id not in self.streams:
            self.connection.acknowledge_received_data(event.flow_controlled_length,
                                                      event.stream_id)
            await self._flush()
            continue
        await _handle_events(self, [event])


def _init_without_websockets(self: H2Protocol, *args: Any, **kwargs: Any) -> None:
    _init(self, *args, **kwargs)
    self.connection.local_settings = h2.settings.Settings(
        client=False,
        initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS:
                self.config.h2_max_concurrent_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self.config.h2_max_header_list_size,
            # ENABLE_CONNECT_PROTOCOL left out (0): no extended CONNECT, no WebSocket here.
        },
    )


_priority_updated = H2Protocol._priority_updated


async def _priority_updated_within_bounds(self: H2Protocol, event: Any) -> None:
    """PRIORITY frames for more streams than the tree holds (1,000; legal for idle streams)
    raised ``TooManyStreamsError`` out of the connection: the client is told to calm down
    (GOAWAY ENHANCE_YOUR_CALM) and its connection closed."""
    try:
        await _priority_updated(self, event)
    except priority.TooManyStreamsError:
        await _calm_down(self)


def install() -> None:
    H2Protocol._priority_updated = _priority_updated_within_bounds  # type: ignore[method-assign]
    H2Protocol._handle_events = _handle_events_of_live_streams  # type: ignore[method-assign]
    H2Protocol._create_stream = _create_stream_or_refuse  # type: ignore[method-assign]
    H2Protocol.initiate = _initiate  # type: ignore[method-assign]
    H2Protocol.__init__ = _init_without_websockets  # type: ignore[method-assign]
