"""Backend fleet figures (issue 16): ``python -m service.bench.fleet [--turns N]``.

1. Conversation affinity on the embedded llama.cpp: two real llama.cpp servers (the tiny model,
   one slot each, 1 thread), a conversation with a long history. Its follow-up turn's time to
   first token on the server that served the previous turn (its prompt cache holds the history)
   vs on the other server (which holds another conversation).
2. Routing CPU: process time per call of FleetBackend over two servers vs the bare adapter of
   one server, the same calls (in-memory simulated upstreams), and of the routing decision
   alone (``FleetBackend.route`` + ``served``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from ..backends.base import (
    Backend,
    BackendHealth,
    ChatChunk,
    ChatMessage,
    ChatRequest,
    ChatResult,
    ModelInfo,
    collect_chat,
)
from ..backends.http import Budgets, make_client
from ..backends.openai_compat import OpenAICompatBackend
from ..backends.router import FleetBackend
from ..sim import Reply, Simulator, mock_transport

__all__ = ["affinity_ttft", "routing_cpu"]

_HISTORY = " ".join(f"line {i}: the quick brown fox jumps over the lazy dog." for i in range(40))


async def _ttft(backend: Backend, messages: list[ChatMessage]) -> tuple[float, str]:
    """Seconds to the first chunk, and the whole answer (to continue the conversation)."""
    request = ChatRequest(messages=tuple(messages), model="tiny", max_tokens=16, temperature=0)
    started = time.perf_counter()
    first: float | None = None
    parts = []
    async with backend.stream(request) as chunks:
        async for chunk in chunks:
            if first is None and (chunk.text or chunk.done):
                first = time.perf_counter() - started
            parts.append(chunk.text)
    assert first is not None
    return first, "".join(parts)


async def affinity_ttft(turns: int = 12) -> dict[str, float]:
    """Median follow-up TTFT (ms) on the same server vs the other one."""
    from ..backends.embedded import embedded_llama_server
    from ..tinymodel import write_tiny_model

    same: list[float] = []
    other: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_model(Path(tmp) / "tiny.gguf")
        budgets = Budgets(connect=5, first_chunk=60, gap=60, call=120)
        async with (embedded_llama_server(model, alias="tiny", n_parallel=1, n_ctx=2048) as a,
                    embedded_llama_server(model, alias="tiny", n_parallel=1, n_ctx=2048) as b,
                    make_client(budgets) as client):
            server_a = OpenAICompatBackend("a", a.base_url, client, budgets)
            server_b = OpenAICompatBackend("b", b.base_url, client, budgets)
            for turn in range(turns):
                history = [ChatMessage("system", f"conversation {turn}. {_HISTORY}"),
                           ChatMessage("user", "first question")]
                # Turn 1 on A. B meanwhile serves another conversation (a warm, busy server).
                _, reply = await _ttft(server_a, history)
                await _ttft(server_b, [ChatMessage("system", f"other {turn}. {_HISTORY}"),
                                       ChatMessage("user", "something else")])
                follow = [*history, ChatMessage("assistant", reply),
                          ChatMessage("user", "and a follow-up question")]
                # Alternate which is measured first, so neither always comes second.
                if turn % 2:
                    other.append((await _ttft(server_b, follow))[0])
                    same.append((await _ttft(server_a, follow))[0])
                else:
                    same.append((await _ttft(server_a, follow))[0])
                    other.append((await _ttft(server_b, follow))[0])
    return {"same_ms": statistics.median(same) * 1000,
            "other_ms": statistics.median(other) * 1000}


class _Instant:
    """A backend that answers at once from memory: what routing adds, without I/O noise."""

    url = "mem://"

    def __init__(self, name: str) -> None:
        self.name = name

    @asynccontextmanager
    async def stream(self, request: ChatRequest) -> AsyncIterator[AsyncIterator[ChatChunk]]:
        await trio.lowlevel.checkpoint()
        yield self._chunks()

    async def _chunks(self) -> AsyncIterator[ChatChunk]:
        for i in range(4):
            yield ChatChunk(text=f"tok{i} ", backend=self.name)
        yield ChatChunk(done=True, finish_reason="stop", backend=self.name)

    async def chat(self, request: ChatRequest) -> ChatResult:
        return await collect_chat(self, request)  # type: ignore[arg-type]

    async def list_models(self) -> list[ModelInfo]:
        return [ModelInfo("m", self.name)]

    async def inventory(self) -> tuple[frozenset[str], frozenset[str] | None]:
        return frozenset({"m"}), frozenset({"m"})

    async def health(self) -> BackendHealth:
        return BackendHealth(self.name, self.url, reachable=True, ready=True)

    async def preload(self, model: str) -> None:
        return None

    async def aclose(self) -> None:
        return None


async def _per_call(backend: Backend, calls: int) -> float:
    started = time.process_time()
    for i in range(calls):
        request = ChatRequest(messages=(ChatMessage("user", "hi"),), model="m",
                              conversation_id=f"c{i % 50}")
        await backend.chat(request)
    return (time.process_time() - started) / calls * 1000


async def _compare(single: Backend, fleet: Backend, calls: int) -> tuple[float, float]:
    await _per_call(single, calls)  # warm both paths up
    await _per_call(fleet, calls)
    # Interleaved rounds, the fastest of each: this machine is shared, and interference only
    # ever adds time.
    rounds = [(await _per_call(single, calls), await _per_call(fleet, calls)) for _ in range(9)]
    return min(r[0] for r in rounds), min(r[1] for r in rounds)


async def routing_cpu(calls: int = 2000) -> dict[str, float]:
    """Process-time ms per call: one bare adapter, a two-server fleet, the decision alone."""
    budgets = Budgets()
    sims = [Simulator(("m",), default=Reply(tokens=4)) for _ in range(2)]
    clients = [make_client(budgets, transport=mock_transport(s)) for s in sims]
    single = OpenAICompatBackend("one", "http://one", clients[0], budgets)
    fleet = FleetBackend([OpenAICompatBackend(f"s{i}", f"http://s{i}", c, budgets)
                          for i, c in enumerate(clients)], default_model="m")

    bare, routed = await _compare(single, fleet, calls)
    instant = FleetBackend([_Instant("a"), _Instant("b")], default_model="m")  # type: ignore[list-item]
    mem_bare, mem_routed = await _compare(_Instant("one"), instant, calls * 4)  # type: ignore[arg-type]
    request = ChatRequest(messages=(ChatMessage("user", "hi"),), model="m", conversation_id="c")
    started = time.process_time()
    for _ in range(100_000):
        fleet.served(fleet.route(request)[0], request)
    decision = (time.process_time() - started) / 100_000 * 1000
    for client in clients:
        await client.aclose()
    return {"single_ms": bare, "fleet_ms": routed, "added_ms": routed - bare,
            "decision_ms": decision, "mem_single_ms": mem_bare, "mem_fleet_ms": mem_routed,
            "mem_added_ms": mem_routed - mem_bare}


def main() -> None:  # pragma: no cover - a manual measurement
    parser = argparse.ArgumentParser(prog="python -m service.bench.fleet")
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--skip-llama", action="store_true")
    args = parser.parse_args()

    async def run() -> None:
        cpu = await routing_cpu(args.calls)
        print(f"routing CPU per call, simulated HTTP upstreams: single server "
              f"{cpu['single_ms']:.3f} ms, fleet of 2 {cpu['fleet_ms']:.3f} ms, added "
              f"{cpu['added_ms']:.3f} ms", flush=True)
        print(f"routing CPU per call, in-memory upstreams: single {cpu['mem_single_ms']:.3f} "
              f"ms, fleet of 2 {cpu['mem_fleet_ms']:.3f} ms, added {cpu['mem_added_ms']:.3f} "
              f"ms; the routing decision alone {cpu['decision_ms'] * 1000:.1f} us", flush=True)
        if not args.skip_llama:
            ttft = await affinity_ttft(args.turns)
            print(f"follow-up turn TTFT (median of {args.turns}): same server "
                  f"{ttft['same_ms']:.1f} ms, another server {ttft['other_ms']:.1f} ms "
                  f"({ttft['other_ms'] / ttft['same_ms']:.1f}x)", flush=True)

    trio.run(run)


if __name__ == "__main__":  # pragma: no cover
    main()
