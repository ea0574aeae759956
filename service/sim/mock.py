"""The simulator as an in-memory ``httpx.MockTransport``: same scenarios, no sockets.

With no real I/O, tests can run under trio's ``autojump_clock`` and assert exact virtual times.
A scenario's "die" raises what httpx raises for a connection closed mid-body; a response closed
by the client before its end marks the stream record ``client_gone``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import trio

from .app import Simulator, StreamRecord
from .scenario import Die, Hang, Send, SimResponse, Sleep

__all__ = ["mock_transport"]


class _Body(httpx.AsyncByteStream):
    def __init__(self, response: SimResponse, record: StreamRecord | None) -> None:
        self.response = response
        self.record = record
        self.finished = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        record = self.record
        for step in self.response.body:
            if isinstance(step, Send):
                yield step.data
                if step.chunk and record is not None:
                    record.chunks_sent += 1
                    if record.first_chunk_at is None:
                        record.first_chunk_at = trio.current_time()
            elif isinstance(step, Sleep):
                await trio.sleep(step.seconds)
            elif isinstance(step, Hang):
                while True:
                    await trio.sleep(step.keepalive or 3600)
                    if step.keepalive:
                        yield step.comment
            elif isinstance(step, Die):
                self.finished = True
                if record is not None:
                    record.died = True
                    record.finish()
                raise httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body "
                    "(incomplete chunked read)"
                )
        self.finished = True
        if record is not None:
            record.completed = True

    async def aclose(self) -> None:
        if self.record is not None:
            if not self.finished:
                self.record.mark_client_gone()
            self.record.finish()


def mock_transport(sim: Simulator) -> httpx.MockTransport:
    """An httpx transport answering from ``sim`` in memory (``sim.streams`` records as usual)."""

    async def handle(request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        headers = {k.lower(): v for k, v in request.headers.items()}
        response, record = sim.route(request.method, request.url.raw_path.decode(), headers, body)
        try:
            for step in response.head:
                if isinstance(step, Sleep):
                    await trio.sleep(step.seconds)
                elif isinstance(step, Hang):
                    await trio.sleep_forever()
                elif isinstance(step, Die):
                    if record is not None:
                        record.died = True
                    raise httpx.RemoteProtocolError(
                        "Server disconnected without sending a response."
                    )
        except BaseException:
            if record is not None:
                if not record.died:
                    record.mark_client_gone()
                record.finish()
            raise
        return httpx.Response(
            response.status,
            headers={"content-type": response.content_type, **dict(response.headers)},
            stream=_Body(response, record),
        )

    return httpx.MockTransport(handle)
