"""HTTP/2 streams hypercorn 0.18 has closed, and no WebSockets over HTTP/2.

Hypercorn serves HTTP/2 on the plain port too (h2c, prior knowledge), so any client reaches it.

* **DATA for a closed stream crashed the server.** Once a response is over (an early 413 to an
  upload still coming, a WebSocket closed), ``H2Protocol`` forgets the stream; a DATA frame the
  client sends on it after that (the rest of its upload) hit ``self.streams[stream_id]`` with
  no guard: an uncaught ``KeyError`` that left the connection's task and ended hypercorn's
  serve, with every connection of the process. One request could stop the service. Now such
  DATA is credited back (flow control) and dropped, as hypercorn already drops a late
  END_STREAM.
* **No WebSockets over HTTP/2** (RFC 8441's extended CONNECT is no longer advertised, and a
  CONNECT sent anyway is refused: its stream reset).
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
from hypercorn.protocol.h2 import H2Protocol

__all__ = ["install"]

_handle_events = H2Protocol._handle_events
_init = H2Protocol.__init__


async def _handle_events_of_live_streams(self: H2Protocol, events: list[h2.events.Event]) -> None:
    """``H2Protocol._handle_events``, with DATA for a stream it has closed dropped. One event at
    a time: a stream may close while the events before it are handled."""
    for event in events:
        if (isinstance(event, h2.events.RequestReceived)
                and (b":method", b"CONNECT") in (event.headers or ())):
            # A WebSocket (or a tunnel) on a stream, not offered: refused, as RFC 8441 has a
            # request the server did not enable (h2 takes ``:protocol`` all the same).
            self.connection.reset_stream(event.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            await self._flush()
            continue
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


def install() -> None:
    H2Protocol._handle_events = _handle_events_of_live_streams  # type: ignore[method-assign]
    H2Protocol.__init__ = _init_without_websockets  # type: ignore[method-assign]
