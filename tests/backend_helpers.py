"""Helpers shared by the backend tests (not a test module)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import httpx
import trio

from service.backends.base import ChatChunk, ChatMessage, ChatRequest
from service.backends.http import Budgets, make_client
from service.sim import Simulator, mock_transport, serve
from service.store.records import LLMCallRecord

BUDGETS = Budgets(connect=3.0, first_chunk=10.0, gap=5.0, call=100.0)


def req(text: str = "hello there", model: str | None = "sim-model", **kw: object) -> ChatRequest:
    return ChatRequest(messages=(ChatMessage("user", text),), model=model, **kw)  # type: ignore[arg-type]


def mock_client(sim: Simulator, budgets: Budgets = BUDGETS) -> httpx.AsyncClient:
    return make_client(budgets, transport=mock_transport(sim))


def pool_summary(client: httpx.AsyncClient) -> str:
    """The transport's summary: ``<PlainHTTPTransport [Requests: 0 active, 0 queued |
    Connections: 0 active, 1 idle]>`` (httpcore's pool's words)."""
    return repr(client._transport)


def text_of(chunks: list[ChatChunk]) -> str:
    return "".join(c.text for c in chunks)


@dataclass
class FakeRecorder:
    """In-memory recorder; ``delay`` makes each write take that long (virtual time)."""

    rows: list[LLMCallRecord] = field(default_factory=list)
    delay: float = 0.0

    async def record_llm_call(self, rec: LLMCallRecord) -> None:
        if self.delay:
            import trio

            await trio.sleep(self.delay)
        self.rows.append(rec)


# -- simulators on loopback that a test can kill -------------------------------------------------

# Only ever started with nursery.start.
async def serve_in(  # noqa: ASYNC114
    sim: Simulator, scope: trio.CancelScope, ctx: ssl.SSLContext | None = None, *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``sim`` on loopback (its port told); cancel ``scope`` to kill it: its listener
    and its connections close."""
    with scope:
        async with trio.open_nursery() as nursery:
            task_status.started(await nursery.start(partial(serve, sim, ssl_context=ctx)))


@asynccontextmanager
async def killable(*sims: Simulator) -> AsyncIterator[list[trio.CancelScope]]:
    """Serve each simulator on loopback; cancelling its scope kills it (its port closes)."""
    async with trio.open_nursery() as nursery:
        scopes = []
        for sim in sims:
            scope = trio.CancelScope()
            await nursery.start(serve_in, sim, scope)
            scopes.append(scope)
        yield scopes
        nursery.cancel_scope.cancel()


async def until_refused(port: int) -> None:
    """Until a connection to ``port`` on loopback is refused (a killed server is gone)."""
    while True:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            return
        await stream.aclose()
        await trio.sleep(0.01)
