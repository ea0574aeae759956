"""The simulator on real loopback sockets: trio streams and h11, one task per connection.

While a response is being sent, a second task reads the socket: EOF (or a reset) means the
client went away, which is recorded and stops the response at once, even in a hang.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import h11
import trio

from .app import Simulator, StreamRecord
from .scenario import Die, Hang, Send, SimResponse, Sleep

__all__ = ["open_simulator", "serve"]

_MAX_REQUEST = 16 * 1024 * 1024


async def serve(
    sim: Simulator,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``sim`` until cancelled; ``task_status.started`` reports the bound port. With
    ``ssl_context`` (a server context holding its certificate) it speaks HTTPS."""
    tcp = await trio.open_tcp_listeners(port, host=host)
    sim.port = tcp[0].socket.getsockname()[1]
    sim.url = f"{'https' if ssl_context else 'http'}://{host}:{sim.port}"
    listeners: list[trio.abc.Listener[trio.abc.Stream]] = list(tcp)
    if ssl_context is not None:
        # The handshake runs in the connection's task (https_compatible: no close_notify
        # needed), so a client that fails it breaks only its own connection.
        listeners = [trio.SSLListener(t, ssl_context, https_compatible=True) for t in tcp]
    task_status.started(sim.port)

    async def handle(stream: trio.abc.Stream) -> None:
        if isinstance(stream, trio.SSLStream) and not await _handshake(stream):
            return
        await _Connection(sim, stream).run()

    await trio.serve_listeners(handle, listeners)


async def _handshake(stream: trio.SSLStream[trio.abc.Stream]) -> bool:
    """The server side of a TLS handshake; False (and the connection closed) if it failed.

    trio drops the alert a failed handshake owes the client (TLS 1.3: "certificate required",
    "unknown CA"): a real server sends it, and the client's error then names the cause; so does
    this one (from the SSL object's outgoing buffer, which trio keeps private)."""
    try:
        await stream.do_handshake()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        alert = stream._outgoing.read()  # private to trio (see the docstring)
        transport = stream.transport_stream
        try:
            if alert:
                await transport.send_all(alert)
            # Read what the client still sends until it closes: closing with unread data
            # would reset the connection, and a reset can overtake the alert.
            with trio.move_on_after(1.0):
                while await transport.receive_some(65536):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        await trio.aclose_forcefully(transport)
        return False
    return True


@asynccontextmanager
async def open_simulator(
    sim: Simulator | None = None, host: str = "127.0.0.1", port: int = 0,
    *, ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[Simulator]:
    """Run a simulator for the block (``sim.url`` is its base URL)."""
    sim = sim or Simulator()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve, sim, host, port, ssl_context=ssl_context))
        try:
            yield sim
        finally:
            nursery.cancel_scope.cancel()


class _ClientGone(Exception):
    pass


class _Connection:
    def __init__(self, sim: Simulator, stream: trio.abc.Stream) -> None:
        self.sim = sim
        self.stream = stream
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST)
        self.record: StreamRecord | None = None

    async def run(self) -> None:
        try:
            while await self._one_request():
                self.conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError,
                _ClientGone):
            pass
        finally:
            await trio.aclose_forcefully(self.stream)

    async def _receive(self) -> bytes:
        try:
            return bytes(await self.stream.receive_some(65536))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    async def _one_request(self) -> bool:
        """Read one request and answer it; False when the connection must close."""
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self._receive())
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                return False
        assert request is not None
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        response, record = self.sim.route(
            request.method.decode(), request.target.decode(), headers, bytes(body)
        )
        self.record = record
        try:
            alive = await self._respond(response)
        finally:
            if record is not None:
                record.finish()
        return alive and self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE

    async def _respond(self, response: SimResponse) -> bool:
        alive = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_eof, nursery.cancel_scope)
            try:
                alive = await self._send_response(response)
            except _ClientGone:
                self._client_gone()
            nursery.cancel_scope.cancel()
        return alive and not self._eof_seen

    _eof_seen = False

    async def _watch_eof(self, scope: trio.CancelScope) -> None:
        """A response is in flight: any EOF now means the client left."""
        data = await self._receive()
        if data:  # a pipelined next request; h11 buffers it for the next cycle
            self.conn.receive_data(data)
            await trio.sleep_forever()
        self._eof_seen = True
        self._client_gone()
        scope.cancel()

    def _client_gone(self) -> None:
        if self.record is not None:
            self.record.mark_client_gone()

    async def _send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _ClientGone from exc

    async def _send_response(self, response: SimResponse) -> bool:
        for step in response.head:
            if isinstance(step, Sleep):
                await trio.sleep(step.seconds)
            elif isinstance(step, Hang):
                await trio.sleep_forever()
            elif isinstance(step, Die):
                self._died()
                return False
        headers = [("content-type", response.content_type), ("server", "sim"),
                   *response.headers]
        if response.streaming:
            headers.append(("cache-control", "no-cache"))
        else:
            size = sum(len(s.data) for s in response.body if isinstance(s, Send))
            headers.append(("content-length", str(size)))
        await self._send(h11.Response(status_code=response.status, headers=headers))
        for step in response.body:
            if isinstance(step, Send):
                await self._send(h11.Data(data=step.data))
                if step.chunk and self.record is not None:
                    self._count_chunk(self.record)
            elif isinstance(step, Sleep):
                await trio.sleep(step.seconds)
            elif isinstance(step, Hang):
                await self._hang(step)
            elif isinstance(step, Die):
                self._died()
                return False
        await self._send(h11.EndOfMessage())
        if self.record is not None:
            self.record.completed = True
        return True

    async def _hang(self, step: Hang) -> None:
        if not step.keepalive:
            await trio.sleep_forever()
        while True:
            await trio.sleep(step.keepalive)
            await self._send(h11.Data(data=step.comment))

    @staticmethod
    def _count_chunk(record: StreamRecord) -> None:
        record.chunks_sent += 1
        if record.first_chunk_at is None:
            record.first_chunk_at = trio.current_time()

    def _died(self) -> None:
        if self.record is not None:
            self.record.died = True

