"""A raw HTTP/2 client for tests: one h2c connection (prior knowledge) on a real socket, read
only when asked, so a test controls every frame it sends and sees every event it gets."""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import trio

GUARD = 20  # seconds any one wait may take

Headers = list[tuple[bytes, bytes]]


def request(method: str, path: str, length: int | None = None) -> Headers:
    """A request's headers (JSON body of ``length`` bytes when given)."""
    h = [(b":method", method.encode()), (b":scheme", b"http"), (b":authority", b"127.0.0.1"),
         (b":path", path.encode()), (b"content-type", b"application/json")]
    if length is not None:
        h.append((b"content-length", str(length).encode()))
    return h


class H2Client:
    """One HTTP/2 connection on a raw socket, read only when asked."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h2 = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.events: list[Any] = []

    @classmethod
    async def open(cls, port: int, *, settled: bool = False) -> H2Client:
        """Connected, preface and SETTINGS sent; ``settled``: the server's SETTINGS read and
        our own acknowledged (nothing of ours is then left to send on its own)."""
        c = cls(await trio.open_tcp_stream("127.0.0.1", port))
        c.h2.initiate_connection()
        await c.flush()
        if settled:
            with trio.fail_after(GUARD):
                while not c.saw(h2.events.SettingsAcknowledged):
                    assert await c.pump(), "closed before the server's settings"
        return c

    @classmethod
    async def to(cls, url: str) -> H2Client:
        """To a server's ``http://127.0.0.1:<port>``, once its SETTINGS are read (ours may not
        be acknowledged yet: a test may break the server's handling of them)."""
        c = await cls.open(int(url.rsplit(":", 1)[1]))
        with trio.fail_after(GUARD):
            while not c.saw(h2.events.RemoteSettingsChanged):
                assert await c.pump(), "closed before the server's settings"
        return c

    def saw(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    async def flush(self) -> None:
        if out := self.h2.data_to_send():
            await self.stream.send_all(out)

    async def pump(self) -> bool:
        """Read once; False once the server closed the connection (EOF, reset, GOAWAY)."""
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            return False
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            return False
        for e in events:
            self.events.append(e)
            if isinstance(e, h2.events.DataReceived):
                self.h2.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        try:
            await self.flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return not self.saw(h2.events.ConnectionTerminated)

    async def closed_within(self, seconds: float) -> float | None:
        """Seconds until the server closed the connection, None if not within ``seconds``."""
        start = trio.current_time()
        with trio.move_on_after(seconds):
            while await self.pump():
                pass
            return trio.current_time() - start
        return None

    async def aclose(self) -> None:
        await self.stream.aclose()
