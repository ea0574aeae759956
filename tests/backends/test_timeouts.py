"""Each budget fires at exactly its configured time (virtual time, in-memory simulator)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
from trio.testing import MockClock

from service.backends.base import ChatChunk
from service.backends.h11transport import PlainHTTPTransport
from service.backends.http import Budgets, make_client
from service.backends.ollama import OllamaBackend
from service.backends.openai_compat import OpenAICompatBackend
from service.errors import (
    BackendUnavailable,
    CallTimeout,
    ChunkGapTimeout,
    ConnectTimeout,
    FirstChunkTimeout,
)
from service.sim import Reply, Simulator

from ..backend_helpers import BUDGETS, mock_client, req

Adapter = type[OllamaBackend] | type[OpenAICompatBackend]
ADAPTERS = pytest.mark.parametrize("adapter", [OllamaBackend, OpenAICompatBackend])


async def consume(backend: OllamaBackend | OpenAICompatBackend, seen: list[ChatChunk]) -> None:
    async with backend.stream(req()) as chunks:
        async for chunk in chunks:
            seen.append(chunk)


def setup(adapter: Adapter, reply: Reply, budgets: Budgets = BUDGETS
          ) -> tuple[Simulator, OllamaBackend | OpenAICompatBackend]:
    sim = Simulator(default=reply)
    return sim, adapter("b", "http://sim", mock_client(sim, budgets), budgets)


@ADAPTERS
async def test_first_chunk_timeout_after_headers(
    adapter: Adapter, autojump_clock: MockClock
) -> None:
    sim, backend = setup(adapter, Reply(first_delay=1000))
    start = trio.current_time()
    with pytest.raises(FirstChunkTimeout, match="10s"):
        await consume(backend, [])
    assert trio.current_time() == start + BUDGETS.first_chunk
    assert sim.streams[0].client_gone
    assert sim.streams[0].closed.is_set()


@ADAPTERS
async def test_first_chunk_budget_covers_slow_headers(
    adapter: Adapter, autojump_clock: MockClock
) -> None:
    _, backend = setup(adapter, Reply(headers_delay=1000))  # Ollama loading a model
    start = trio.current_time()
    with pytest.raises(FirstChunkTimeout):
        await consume(backend, [])
    assert trio.current_time() == start + BUDGETS.first_chunk


@ADAPTERS
async def test_slow_but_in_budget_is_fine(
    adapter: Adapter, autojump_clock: MockClock
) -> None:
    _, backend = setup(adapter, Reply(headers_delay=4, first_delay=5.5, interval=4.5, tokens=5))
    start = trio.current_time()
    seen: list[ChatChunk] = []
    await consume(backend, seen)
    assert seen[-1].done
    assert len(seen) == 6
    assert trio.current_time() == start + 4 + 5.5 + 4 * 4.5


@ADAPTERS
async def test_gap_timeout(
    adapter: Adapter, autojump_clock: MockClock
) -> None:
    _, backend = setup(adapter, Reply(tokens=10, interval=2, hang_after=3))
    start = trio.current_time()
    seen: list[ChatChunk] = []
    with pytest.raises(ChunkGapTimeout, match="5s"):
        await consume(backend, seen)
    assert len(seen) == 3
    assert trio.current_time() == start + 2 * 2 + BUDGETS.gap  # last chunk at 4, then 5 silent


async def test_keepalives_are_not_progress(autojump_clock: MockClock) -> None:
    # A comment every second would reset a naive idle timer forever; ours still fires at 5 s.
    _, backend = setup(OpenAICompatBackend, Reply(tokens=10, interval=1, hang_after=2,
                                                    keepalive=0.5))
    start = trio.current_time()
    seen: list[ChatChunk] = []
    with pytest.raises(ChunkGapTimeout):
        await consume(backend, seen)
    assert len(seen) == 2
    assert trio.current_time() == start + 1 + BUDGETS.gap


async def test_keepalives_before_first_chunk_are_not_progress(autojump_clock: MockClock) -> None:
    _, backend = setup(OpenAICompatBackend, Reply(first_delay=1000, keepalive=1))
    start = trio.current_time()
    with pytest.raises(FirstChunkTimeout):
        await consume(backend, [])
    assert trio.current_time() == start + BUDGETS.first_chunk


async def test_keepalives_counted_and_stream_still_completes(autojump_clock: MockClock) -> None:
    _, backend = setup(OpenAICompatBackend, Reply(tokens=3, interval=3, keepalive=1))
    async with backend.stream(req()) as chunks:
        got = [c async for c in chunks]
        assert chunks.reader.keepalives == 4  # two per 3 s gap (at 1 s and 2 s)
    assert got[-1].done


@ADAPTERS
async def test_call_timeout(
    adapter: Adapter, autojump_clock: MockClock
) -> None:
    budgets = Budgets(connect=3, first_chunk=10, gap=5, call=30)
    _, backend = setup(adapter, Reply(tokens=100, interval=4), budgets)
    start = trio.current_time()
    seen: list[ChatChunk] = []
    with pytest.raises(CallTimeout, match="30s"):
        await consume(backend, seen)
    assert trio.current_time() == start + 30
    assert len(seen) == 8  # chunks at 0, 4, ..., 28


async def test_call_budget_shorter_than_first_chunk(autojump_clock: MockClock) -> None:
    budgets = Budgets(connect=3, first_chunk=10, gap=5, call=7)
    _, backend = setup(OllamaBackend, Reply(headers_delay=100), budgets)
    start = trio.current_time()
    with pytest.raises(CallTimeout):
        await consume(backend, [])
    assert trio.current_time() == start + 7


@pytest.mark.parametrize(
    ("exc", "mapped"),
    [
        (httpx.ConnectTimeout("slow"), ConnectTimeout),
        (httpx.PoolTimeout("full"), ConnectTimeout),
        (httpx.ConnectError("refused"), BackendUnavailable),
        (httpx.ReadError("reset"), BackendUnavailable),
    ],
)
async def test_httpx_errors_mapped_once(
    exc: Exception, mapped: type[Exception], autojump_clock: MockClock
) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise exc

    client = make_client(BUDGETS, transport=httpx.MockTransport(fail))
    backend = OllamaBackend("b", "http://x", client, BUDGETS, default_model="m")
    with pytest.raises(mapped) as info:
        await consume(backend, [])
    assert info.value.__cause__ is exc
    assert info.value.backend == "b"


def test_client_timeouts_are_explicit() -> None:
    client = make_client(Budgets(connect=3, first_chunk=10, gap=5, call=100), max_connections=7)
    assert client.timeout == httpx.Timeout(connect=3, read=None, write=10, pool=3)
    transport = client._transport
    assert isinstance(transport, PlainHTTPTransport)
    assert transport.max_connections == 7


# -- a reasoning model's thinking is progress ---------------------------------------------------
# Found in review: a thinking model streams its reasoning for a long time before any content
# (Ollama: message.thinking, gpt-oss thinks by default; llama.cpp: delta.reasoning_content).
# Those lines were not progress, so a model actively thinking past the first-chunk budget
# failed with first_chunk_timeout, and the thinking was dropped.

_THINKING_BUDGETS = Budgets(connect=3.0, first_chunk=10.0, gap=5.0, call=1000.0)


def _paced(lines: list[bytes], every: float, content_type: str) -> httpx.AsyncClient:
    """A client whose upstream sends ``lines`` one every ``every`` seconds."""

    class Body(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for line in lines:
                await trio.sleep(every)
                yield line

    async def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": content_type}, stream=Body())

    return make_client(_THINKING_BUDGETS, transport=httpx.MockTransport(handle))


async def _text_and_thinking(backend: OllamaBackend | OpenAICompatBackend) -> tuple[str, str]:
    text, thinking = [], []
    async with backend.stream(req()) as chunks:
        async for c in chunks:
            text.append(c.text)
            thinking.append(c.thinking)
    return "".join(text), "".join(thinking)


def _line(obj: dict[str, Any]) -> bytes:
    """One line of an Ollama NDJSON answer."""
    return json.dumps({"model": "m", **obj}).encode() + b"\n"


async def test_ollama_thinking_is_progress_not_answer(autojump_clock: MockClock) -> None:
    # 30 s of thinking, a line a second: past the 10 s first-chunk budget, within the gaps.
    lines = [_line({"message": {"role": "assistant", "content": "", "thinking": f"t{i} "},
                   "done": False}) for i in range(30)]
    lines += [_line({"message": {"role": "assistant", "content": "42"}, "done": False}),
              _line({"message": {"role": "assistant", "content": ""}, "done": True,
                    "done_reason": "stop", "prompt_eval_count": 3, "eval_count": 31})]
    backend = OllamaBackend("ollama", "http://o", _paced(lines, 1.0, "application/x-ndjson"),
                            _THINKING_BUDGETS)
    text, thinking = await _text_and_thinking(backend)
    assert text == "42"
    assert thinking == "".join(f"t{i} " for i in range(30))


async def test_llamacpp_reasoning_is_progress_not_answer(autojump_clock: MockClock) -> None:
    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        obj = {"object": "chat.completion.chunk", "model": "m",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    lines = [event({"reasoning_content": f"t{i} "}) for i in range(30)]
    lines += [event({"content": "42"}), event({}, "stop"), b"data: [DONE]\n\n"]
    backend = OpenAICompatBackend("llamacpp", "http://l", _paced(lines, 1.0, "text/event-stream"),
                                  _THINKING_BUDGETS)
    text, thinking = await _text_and_thinking(backend)
    assert text == "42"
    assert thinking == "".join(f"t{i} " for i in range(30))


async def test_silence_while_thinking_still_times_out(autojump_clock: MockClock) -> None:
    # Thinking resets the budget; it does not remove it: a model silent mid-thought fails.
    lines = [_line({"message": {"role": "assistant", "content": "", "thinking": "t "},
                   "done": False})] * 3
    backend = OllamaBackend("ollama", "http://o", _paced(lines, 6.0, "application/x-ndjson"),
                            _THINKING_BUDGETS)
    with pytest.raises(ChunkGapTimeout):
        await _text_and_thinking(backend)
