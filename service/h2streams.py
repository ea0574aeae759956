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

* **An idle HTTP/2 connection is closed at ``keep_alive_timeout``.** Hypercorn's idle timer
  never ran for an h2c connection that opened no stream (its preface, taken for an HTTP/1.1
  request, stopped it), and was re-armed after a connection's last stream from the app's last
  send, which quart-trio cancels (as ``service.keepalive`` says of HTTP/1.1): each connection
  stayed open for as long as its client liked, and held a shutdown for ``graceful_timeout``.
* **A client that grants no flow-control credit is dropped.** A response's bytes wait in its
  stream's buffer for the client's WINDOW_UPDATEs; a client that announced a window of 0 and
  never opened it (while it answered PINGs, so its socket never stalled) held each of its
  streams' tasks, and the connection, for as long as it liked. Now a stream whose client has
  taken nothing of its buffer for the stall limit (``service.sendstall``) is reset (CANCEL)
  and closed as if the client had reset it: its app sees the disconnect, its runs stop.

Installed from ``create_app``; the tests fail if a hypercorn upgrade changes these names.
"""

from __future__ import annotations

from typing import Any

import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import priority
import trio
from hypercorn.events import Closed, Updated
from hypercorn.protocol.events import EndBody, StreamClosed
from hypercorn.protocol.h2 import BUFFER_HIGH_WATER, BufferCompleteError, H2Protocol, StreamBuffer

from .logs import get_logger
from .sendstall import stall_limit

__all__ = ["install"]

log = get_logger("service.server")

_handle_events = H2Protocol._handle_events
_stream_send = H2Protocol.stream_send
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
    # The connection's idle timer runs until a stream opens: an h2c connection is taken for
    # an HTTP/1.1 request at first (its preface), which stopped the timer, and nothing started
    # it again, so a connection that sent its preface and no request stayed open for ever.
    await self.send(Updated(idle=self.idle))


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


_STALLED = "_service_stalled"  # set on a connection once one of its streams was reset so


class _Stalled(Exception):
    """The client took nothing of a stream's buffer for the stall limit."""


async def _taken_within_stall(buffer: StreamBuffer, event: Any) -> None:
    """``event.wait()``, while the client takes some of ``buffer`` within each stall limit
    (a slow client that takes a frame within it is never cut)."""
    while True:
        size = len(buffer.buffer)
        with trio.move_on_after(stall_limit()):
            await event.wait()
            return
        if len(buffer.buffer) >= size:
            raise _Stalled


async def _push(self: StreamBuffer, data: bytes) -> None:
    """``StreamBuffer.push`` (hypercorn 0.18's), its wait for room bounded by progress, and
    waiting until there is room: hypercorn's send task pops nothing from a stream whose client
    gave no credit, which sets ``_paused`` all the same (an empty pop is under the low-water
    mark), so a streaming response's sends never waited: its events piled up in the buffer,
    and the stall limit never came."""
    if self._complete:
        raise BufferCompleteError()
    self.buffer.extend(data)
    await self._is_empty.clear()
    size = len(self.buffer)
    deadline = trio.current_time() + stall_limit()
    while len(self.buffer) >= BUFFER_HIGH_WATER and not self._complete:
        with trio.move_on_at(deadline):
            await self._paused.wait()
        await self._paused.clear()
        if len(self.buffer) < size:  # the client took some: the limit counts from now
            size, deadline = len(self.buffer), trio.current_time() + stall_limit()
        elif trio.current_time() >= deadline:
            raise _Stalled


async def _drain(self: StreamBuffer) -> None:
    await _taken_within_stall(self, self._is_empty)


async def _stream_send_within_stall(self: H2Protocol, event: Any) -> None:
    try:
        if isinstance(event, StreamClosed):
            # Shielded (bounded: its one write, a GOAWAY at a shutdown, is sendstall's): the
            # app's last send runs in its request's nursery, which ends with it, and the
            # connection's idle timer, re-armed here once no stream is left, was cancelled
            # with it: a connection idle after its requests was never closed.
            with trio.move_on_after(stall_limit(), shield=True):
                await _stream_send(self, event)
            return
        await _stream_send(self, event)
    except _Stalled:
        if not getattr(self, _STALLED, False):  # (said once a connection, not per stream)
            setattr(self, _STALLED, True)
            log.warning("an HTTP/2 client took nothing of a response for %g s: its streams "
                        "are reset", stall_limit())
        # (Shielded: the app's send runs in its request's nursery, which ends with it.)
        with trio.move_on_after(stall_limit(), shield=True):
            try:
                self.connection.reset_stream(event.stream_id, h2.errors.ErrorCodes.CANCEL)
                await self._flush()
            except h2.exceptions.H2Error:
                pass  # (the stream or the connection is closed already)
            # As for a client's reset: the app is told, and the send task drops the buffer;
            # once no stream is left, the connection's idle timer runs (keep_alive_timeout).
            await self._close_stream(event.stream_id)
            await self._window_updated(event.stream_id)
            await self.send(Updated(idle=all(s.idle for s in self.streams.values())))


def install() -> None:
    StreamBuffer.push = _push  # type: ignore[method-assign]
    StreamBuffer.drain = _drain  # type: ignore[method-assign]
    H2Protocol.stream_send = _stream_send_within_stall  # type: ignore[method-assign]
    H2Protocol._priority_updated = _priority_updated_within_bounds  # type: ignore[method-assign]
    H2Protocol._handle_events = _handle_events_of_live_streams  # type: ignore[method-assign]
    H2Protocol._create_stream = _create_stream_or_refuse  # type: ignore[method-assign]
    H2Protocol.initiate = _initiate  # type: ignore[method-assign]
    H2Protocol.__init__ = _init_without_websockets  # type: ignore[method-assign]
