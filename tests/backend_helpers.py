"""Helpers shared by the backend tests (not a test module)."""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx

from service.backends.base import ChatChunk, ChatMessage, ChatRequest
from service.backends.http import Budgets, make_client
from service.sim import Simulator, mock_transport
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
