"""TCP proxies on loopback between a client and the real service, for network faults the way
they happen: every connection dropped at once (``CuttableProxy.cut``), the network staying down
(``refuse``), or connections going silent both ways while left open (``FreezableProxy.freeze``).

Subclasses change ``_pump`` or ``_serve`` for one fault of their own; ``serving`` runs any of
them on a free port and sets its ``url``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import Protocol, TypeVar

import trio

from .servers import RunningServer

__all__ = ["CuttableProxy", "FreezableProxy", "cuttable", "freezable", "port_of", "serving"]

class _Serves(Protocol):
    url: str

    async def _serve(self, client: trio.SocketStream) -> None: ...


P = TypeVar("P", bound=_Serves)


def port_of(srv: RunningServer) -> int:
    return int(srv.url.rsplit(":", 1)[1])


class CuttableProxy:
    """A TCP proxy in front of the service; ``cut()`` drops every connection open at that
    moment (as a Wi-Fi change or a proxy restart does), new ones pass; while ``refusing``, new
    ones are closed at once (the network stays down)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = ""
        self.refusing = False
        self.refused = 0  # connections closed at once while refusing
        self._open: set[trio.CancelScope] = set()

    def cut(self, *, refuse: bool = False) -> None:
        self.refusing = refuse
        for scope in list(self._open):
            scope.cancel()

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream) -> None:
        while data := await src.receive_some(65536):
            await dst.send_all(data)
        await dst.send_eof()

    async def _serve(self, client: trio.SocketStream) -> None:
        if self.refusing:
            self.refused += 1
            await client.aclose()
            return
        with trio.CancelScope() as scope:
            self._open.add(scope)
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.port)
                async with client, upstream, trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, upstream)
                    nursery.start_soon(self._pump, upstream, client)
            except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                # A pump's error comes in its nursery's group: a peer gone while a pump
                # still sent to it (its send_eof, ENOTCONN) is the network cut, not a failure.
                pass
            finally:
                self._open.discard(scope)


class FreezableProxy(CuttableProxy):
    """``freeze()``: the connections open at that moment go silent both ways, left open (a
    laptop's sleep, a NAT or proxy that dropped its state, a wedged upstream); new ones pass."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.generation = 0

    def freeze(self) -> None:
        self.generation += 1

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream) -> None:
        born = self.generation
        while data := await src.receive_some(65536):
            if self.generation != born:
                await trio.sleep_forever()
            await dst.send_all(data)
        await dst.send_eof()


@asynccontextmanager
async def serving(proxy: P) -> AsyncIterator[P]:
    """``proxy`` (any with ``_serve`` and ``url``) listening on a free loopback port (its
    ``url``) until the block ends."""
    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, proxy._serve, 0,
                                                  host="127.0.0.1"))
        proxy.url = f"http://127.0.0.1:{listener.socket.getsockname()[1]}"
        yield proxy
        nursery.cancel_scope.cancel()


def cuttable(srv: RunningServer) -> AbstractAsyncContextManager[CuttableProxy]:
    return serving(CuttableProxy(port_of(srv)))


def freezable(srv: RunningServer) -> AbstractAsyncContextManager[FreezableProxy]:
    return serving(FreezableProxy(port_of(srv)))
