"""The HTTP clients the adapters share: one ``httpx.AsyncClient`` with the budgets' timeouts,
or several behind one (``ShardedClient``) when many streams are open at once."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

import httpx
import trio

from .h11transport import PlainHTTPTransport

if TYPE_CHECKING:
    from .http import Budgets

__all__ = ["ShardedClient", "make_client", "make_sharded_client"]


def make_client(
    budgets: Budgets,
    *,
    max_connections: int = 100,
    transport: httpx.AsyncBaseTransport | None = None,
    verify: ssl.SSLContext | None = None,
) -> httpx.AsyncClient:
    """The one client the adapters share. Read timeout off: the budgets above replace it.
    Plain-HTTP upstreams go through ``PlainHTTPTransport`` (h11 on trio), HTTPS ones through
    httpx's own transport; ``transport`` (a test's) replaces both."""
    limits = httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=30.0,
    )
    if transport is None:
        tls = httpx.AsyncHTTPTransport(verify=verify if verify is not None else True,
                                       limits=limits, trust_env=False)
        transport = PlainHTTPTransport(limits=limits, tls=tls)
    return httpx.AsyncClient(
        timeout=httpx.Timeout(
            connect=budgets.connect, read=None, write=budgets.first_chunk, pool=budgets.connect
        ),
        transport=transport,
        trust_env=False,  # a loopback LLM server must not go through an HTTP(S)_PROXY
        follow_redirects=False,
    )


class ShardedClient(httpx.AsyncClient):
    """Several httpx clients behind one: requests go round-robin to the shards.

    httpcore's pool walks all of its connections whenever a request starts or a response
    closes, so with a thousand streams open each of those costs a thousand checks (seen in
    profiles of the capacity benchmark). N pools cut that N-fold. Only what the adapters use is
    routed (``build_request``, ``send``, ``get``); everything else is this client's own (unused).
    """

    def __init__(self, shards: list[httpx.AsyncClient], verify: ssl.SSLContext) -> None:
        super().__init__(trust_env=False, verify=verify)
        self.shards = shards
        self._next = 0

    def _pick(self) -> httpx.AsyncClient:
        shard = self.shards[self._next]
        self._next = (self._next + 1) % len(self.shards)
        return shard

    async def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        return await self._pick().send(request, **kwargs)

    async def get(self, url: Any, **kwargs: Any) -> httpx.Response:  # type: ignore[override]
        return await self._pick().get(url, **kwargs)

    def build_request(self, *args: Any, **kwargs: Any) -> httpx.Request:
        return self.shards[0].build_request(*args, **kwargs)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            for shard in self.shards:
                await shard.aclose()
            await super().aclose()


def make_sharded_client(
    budgets: Budgets,
    *,
    max_connections: int = 100,
    shards: int = 8,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """``make_client`` split into ``shards`` pools (a test transport gets one pool)."""
    if transport is not None or shards <= 1:
        return make_client(budgets, max_connections=max_connections, transport=transport)
    # Each shard may hold the full limit: round-robin does not balance by open streams, and
    # the backends' own CapacityLimiter already bounds how many are open at once.
    # One TLS context for all: httpx loads the CA bundle per client otherwise (measured:
    # 16 clients took 21 MB and 0.46 s; with a shared context 48 KB and 1 ms).
    tls = httpx.create_ssl_context()
    return ShardedClient(
        [make_client(budgets, max_connections=max_connections, verify=tls)
         for _ in range(shards)],
        tls,
    )
