"""Each protocol detail parsed from the simulator over real loopback sockets."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import httpx
import pytest
import trio

from service.backends.base import ChatChunk, ChatMessage, ChatRequest, ToolCall
from service.backends.http import Budgets, make_client
from service.backends.ollama import OllamaBackend
from service.backends.openai_compat import OpenAICompatBackend
from service.errors import (
    BackendProtocolError,
    BackendRateLimited,
    BackendResponseError,
    BackendUnavailable,
    ContextLengthExceeded,
    ModelNotFound,
    UpstreamBroken,
)
from service.sim import Reply, Simulator, open_simulator

from ..backend_helpers import pool_summary, req, text_of

GUARD = 10  # seconds on trio's clock: a hang fails the test instead of blocking it


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with open_simulator(Simulator(("sim-model", "other-model"))) as s:
        yield s


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(Budgets(connect=5, first_chunk=30, gap=30, call=60)) as c:
        yield c


async def collect(backend: OllamaBackend | OpenAICompatBackend, request: ChatRequest
                  ) -> list[ChatChunk]:
    with trio.fail_after(GUARD):
        async with backend.stream(request) as chunks:
            return [c async for c in chunks]


def both(sim: Simulator, client: httpx.AsyncClient) -> list[OllamaBackend | OpenAICompatBackend]:
    return [OllamaBackend("ollama", sim.url, client),
            OpenAICompatBackend("llamacpp", sim.url, client)]


# -- Ollama --------------------------------------------------------------------------------------


async def test_ollama_text_usage_timings(sim: Simulator, client: httpx.AsyncClient) -> None:
    sim.script("The sky is blue.")
    chunks = await collect(OllamaBackend("ollama", sim.url, client),
                           req(max_tokens=7, temperature=0.5, stop=("\n",)))
    assert text_of(chunks) == "The sky is blue."
    assert [c.text for c in chunks[:-1]] == ["The ", "sky ", "is ", "blue."]
    final = chunks[-1]
    assert final.done
    assert final.finish_reason == "stop"
    assert final.usage is not None
    assert not final.usage.estimated
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (3, 4)
    # nanoseconds -> milliseconds
    assert final.timings == {"total_ms": 9.0, "load_ms": 1.0, "prompt_ms": 1.5, "predicted_ms": 4.0}
    assert {c.backend for c in chunks} == {"ollama"}
    assert final.model == "sim-model"
    body = sim.streams[0].body
    assert body["stream"] is True
    assert body["model"] == "sim-model"
    assert body["options"] == {"temperature": 0.5, "num_predict": 7, "stop": ["\n"]}
    assert body["messages"] == [{"role": "user", "content": "hello there"}]


async def test_ollama_tool_calls_get_ids(sim: Simulator, client: httpx.AsyncClient) -> None:
    sim.script(Reply(text="", tool_calls=({"name": "add", "arguments": {"a": 1, "b": 2}},
                                          {"name": "now", "arguments": {}})))
    tools = ({"type": "function", "function": {"name": "add", "parameters": {}}},)
    result = await OllamaBackend("ollama", sim.url, client).chat(req(tools=tools))
    calls = result.message.tool_calls
    assert [(c.name, c.arguments) for c in calls] == [("add", {"a": 1, "b": 2}), ("now", {})]
    assert all(c.id.startswith("call_") for c in calls)
    assert calls[0].id != calls[1].id
    assert result.finish_reason == "tool_calls"
    assert sim.streams[0].body["tools"] == list(tools)


async def test_ollama_sends_history_with_tool_messages(sim: Simulator, client: httpx.AsyncClient
                                                       ) -> None:
    history = (
        ChatMessage("user", "add"),
        ChatMessage("assistant", "", tool_calls=(ToolCall("c1", "add", {"a": 1}),)),
        ChatMessage("tool", "2", tool_call_id="c1", name="add"),
    )
    await OllamaBackend("ollama", sim.url, client).chat(ChatRequest(history, model="sim-model"))
    assert sim.streams[0].body["messages"] == [
        {"role": "user", "content": "add"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"function": {"name": "add", "arguments": {"a": 1}}}]},
        {"role": "tool", "content": "2", "tool_name": "add"},
    ]


async def test_ollama_names_a_tool_result_by_the_call_its_id_answers(
        sim: Simulator, client: httpx.AsyncClient) -> None:
    # An OpenAI client's tool results carry only the call's id: Ollama (no ids) is told the
    # tool's name, so two parallel calls' results are told apart (they went without one).
    history = (
        ChatMessage("user", "weather in A and time in B"),
        ChatMessage("assistant", "", tool_calls=(ToolCall("c1", "weather", {"city": "A"}),
                                                 ToolCall("c2", "clock", {"city": "B"}))),
        ChatMessage("tool", "sunny", tool_call_id="c1"),
        ChatMessage("tool", "12:00", tool_call_id="c2"),
        ChatMessage("tool", "?", tool_call_id="c9"),  # answers no call it was sent: no name
    )
    await OllamaBackend("ollama", sim.url, client).chat(ChatRequest(history, model="sim-model"))
    assert sim.streams[0].body["messages"][2:] == [
        {"role": "tool", "content": "sunny", "tool_name": "weather"},
        {"role": "tool", "content": "12:00", "tool_name": "clock"},
        {"role": "tool", "content": "?"},
    ]


async def test_ollama_error_object_mid_stream(sim: Simulator, client: httpx.AsyncClient) -> None:
    sim.script(Reply(tokens=5, error_after=2, error="model runner crashed"))
    seen: list[ChatChunk] = []
    backend = OllamaBackend("ollama", sim.url, client)

    async def consume() -> None:
        async with backend.stream(req()) as chunks:
            async for chunk in chunks:
                seen.append(chunk)

    with pytest.raises(BackendResponseError, match="model runner crashed") as info:
        await consume()
    assert len(seen) == 2
    assert info.value.details["mid_stream"] is True


@pytest.mark.parametrize(
    ("reply", "error", "match"),
    [
        (Reply(status=503, error="server busy"), BackendUnavailable, "server busy"),
        (Reply(status=500, error="boom"), BackendResponseError, "boom"),
        (Reply(status=400, error="bad options"), BackendResponseError, "bad options"),
        (Reply(malformed_after=1), BackendProtocolError, "malformed NDJSON"),
        # It answered (200), then the connection broke: a bad answer, not "unreachable".
        (Reply(die_after=2), UpstreamBroken, "connection lost mid-answer"),
        (Reply(die_after=0), UpstreamBroken, "connection lost mid-answer"),
        (Reply(die_after=-1), BackendUnavailable, "connection lost"),
        (Reply(status=429, error="slow down"), BackendRateLimited, "slow down"),
        (Reply(context=2), ContextLengthExceeded, "exceeds the context length"),
        # Ollama versions whose runner refuses an over-long prompt answer it as a 500 with
        # the runner's words: still the request's fault, not a server to fail over from.
        (Reply(status=500, error="input exceeds context length"), ContextLengthExceeded,
         "exceeds context length"),
    ],
)
async def test_ollama_failures(sim: Simulator, client: httpx.AsyncClient, reply: Reply,
                               error: type[Exception], match: str) -> None:
    sim.script(reply)
    with pytest.raises(error, match=match):
        await collect(OllamaBackend("ollama", sim.url, client), req())


async def test_ollama_unknown_model(sim: Simulator, client: httpx.AsyncClient) -> None:
    with pytest.raises(ModelNotFound, match="not found"):
        await collect(OllamaBackend("ollama", sim.url, client), req(model="nope"))


async def test_ollama_models_default_health_preload(sim: Simulator, client: httpx.AsyncClient
                                                    ) -> None:
    backend = OllamaBackend("ollama", sim.url, client)
    models = await backend.list_models()
    assert [m.id for m in models] == ["sim-model", "other-model"]
    assert models[0].backend == "ollama"
    assert models[0].details["details"]["format"] == "gguf"
    await collect(backend, req(model=None))  # no model: the first one listed
    assert sim.streams[-1].model == "sim-model"
    health = await backend.health()
    assert health.ready
    assert health.reachable
    assert health.models == ("sim-model", "other-model")
    await backend.preload("other-model")
    assert sim.preloads == ["other-model"]
    assert sim.streams[-1].body == {"model": "other-model", "messages": [], "stream": False,
                                    "keep_alive": "10m"}


# -- OpenAI-compatible (llama.cpp) ---------------------------------------------------------------


async def test_openai_text_usage_timings(sim: Simulator, client: httpx.AsyncClient) -> None:
    sim.script("Hi there friend")
    chunks = await collect(OpenAICompatBackend("llamacpp", sim.url, client),
                           req(max_tokens=9, stop=("x",)))
    assert [c.text for c in chunks[:-1]] == ["Hi ", "there ", "friend"]
    final = chunks[-1]
    assert final.done
    assert final.finish_reason == "stop"
    assert final.text == ""
    assert final.usage is not None
    assert not final.usage.estimated
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (3, 3)
    assert final.timings is not None
    assert final.timings["predicted_n"] == 3
    assert final.timings["prompt_per_second"] == 2000.0  # llama.cpp's object, passed through
    body = sim.streams[0].body
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 9
    assert body["stop"] == ["x"]


async def test_openai_tool_call_deltas_joined(sim: Simulator, client: httpx.AsyncClient) -> None:
    args = {"query": "weather in Paris", "units": ["c", "f"], "n": 3}
    sim.script(Reply(text="Let me check.", tool_calls=({"name": "search", "arguments": args},
                                                       {"name": "now", "arguments": {}})))
    result = await OpenAICompatBackend("llamacpp", sim.url, client).chat(req())
    assert result.message.content == "Let me check."
    assert result.message.tool_calls == (
        ToolCall("call_sim_0", "search", args), ToolCall("call_sim_1", "now", {}))
    assert result.finish_reason == "tool_calls"


async def test_openai_history_shape(sim: Simulator, client: httpx.AsyncClient) -> None:
    history = (
        ChatMessage("system", "be brief"),
        ChatMessage("assistant", "", tool_calls=(ToolCall("c1", "add", {"a": 1}),)),
        ChatMessage("tool", "2", tool_call_id="c1", name="add"),
    )
    await OpenAICompatBackend("l", sim.url, client).chat(ChatRequest(history, model="sim-model"))
    assert sim.streams[0].body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "add", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "content": "2", "tool_call_id": "c1", "name": "add"},
    ]


async def test_openai_usage_missing_is_estimated(sim: Simulator, client: httpx.AsyncClient) -> None:
    sim.script(Reply(tokens=4, usage=False))
    final = (await collect(OpenAICompatBackend("llamacpp", sim.url, client), req()))[-1]
    assert final.usage is not None
    assert final.usage.estimated
    assert final.usage.completion_tokens == 4
    assert final.usage.prompt_tokens is None


@pytest.mark.parametrize(
    ("reply", "error", "match"),
    [
        (Reply(status=503, error="Loading model"), BackendUnavailable, "Loading model"),
        (Reply(status=400, error="context too long"), BackendResponseError, "context too long"),
        (Reply(status=500, error="kaput"), BackendResponseError, "kaput"),
        (Reply(error_after=1, error="slot died"), BackendResponseError, "slot died"),
        (Reply(malformed_after=2), BackendProtocolError, "malformed SSE"),
        (Reply(die_after=1), UpstreamBroken, "connection lost mid-answer"),
        (Reply(die_after=-1), BackendUnavailable, "connection lost"),
        (Reply(status=429, error="slow down"), BackendRateLimited, "slow down"),
        (Reply(context=2), ContextLengthExceeded, "exceeds the available context size"),
    ],
)
async def test_openai_failures(sim: Simulator, client: httpx.AsyncClient, reply: Reply,
                               error: type[Exception], match: str) -> None:
    sim.script(reply)
    with pytest.raises(error, match=match):
        await collect(OpenAICompatBackend("llamacpp", sim.url, client), req())


async def test_openai_unknown_model(sim: Simulator, client: httpx.AsyncClient) -> None:
    with pytest.raises(ModelNotFound):
        await collect(OpenAICompatBackend("llamacpp", sim.url, client), req(model="nope"))


async def test_openai_models_and_health_loading(sim: Simulator, client: httpx.AsyncClient
                                                ) -> None:
    backend = OpenAICompatBackend("llamacpp", sim.url, client)
    assert [m.id for m in await backend.list_models()] == ["sim-model", "other-model"]
    sim.set_loading(2)
    first, second, third = [await backend.health() for _ in range(3)]
    assert first.reachable
    assert not first.ready
    assert first.error == "Loading model"
    assert second == second
    assert not second.ready
    assert third.ready
    assert third.error is None


async def test_health_of_a_closed_port(client: httpx.AsyncClient) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for backend in (OllamaBackend("o", f"http://127.0.0.1:{port}", client),
                    OpenAICompatBackend("l", f"http://127.0.0.1:{port}", client)):
        health = await backend.health()
        assert not health.reachable
        assert not health.ready
        assert health.error
        with pytest.raises(BackendUnavailable, match="cannot connect"):
            await collect(backend, req())


# -- connection hygiene --------------------------------------------------------------------------


async def test_complete_streams_reuse_one_connection(sim: Simulator, client: httpx.AsyncClient
                                                     ) -> None:
    for backend in both(sim, client) * 2:
        await collect(backend, req())
    with trio.fail_after(GUARD):
        for record in sim.streams:
            await record.closed.wait()  # the server may still be finishing its side
    assert all(r.completed and not r.client_gone for r in sim.streams), sim.streams
    assert "Connections: 0 active, 1 idle" in pool_summary(client)


@pytest.mark.parametrize("protocol", ["ollama", "openai"])
async def test_cancelled_consumer_closes_upstream(sim: Simulator, client: httpx.AsyncClient,
                                                  protocol: str) -> None:
    backend = both(sim, client)[protocol == "openai"]
    sim.script(Reply(tokens=10, hang_after=3))
    seen: list[ChatChunk] = []
    with trio.CancelScope() as scope:
        async with backend.stream(req()) as chunks:
            async for chunk in chunks:
                seen.append(chunk)
                if len(seen) == 3:
                    scope.cancel()
    assert len(seen) == 3
    record = sim.streams[0]
    with trio.fail_after(GUARD):
        await record.closed.wait()
    assert record.client_gone
    assert not record.completed
    assert record.chunks_sent == 3
    assert "Requests: 0 active, 0 queued | Connections: 0 active, 0 idle" in pool_summary(client)


async def test_tool_call_arguments_that_are_not_json_come_back_marked_not_raised(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    # They failed the whole call; now our tools answer the model with an error it can correct,
    # and a client's tool gets the arguments as they came (as OpenAI passes them on).
    for backend in both(sim, client):
        sim.script(Reply(tool_calls=({"name": "f", "raw_arguments": "{oops"},)))
        (call,) = [c for chunk in await collect(backend, req()) for c in chunk.tool_calls]
        assert (call.name, call.arguments, call.invalid_arguments) == ("f", {}, "{oops")


def _over_body(kind: type[OpenAICompatBackend] | type[OllamaBackend], body: bytes
               ) -> OpenAICompatBackend | OllamaBackend:
    """An adapter whose upstream answers every request with ``body`` (at once, whole)."""
    content_type = "text/event-stream" if kind is OpenAICompatBackend else "application/x-ndjson"

    async def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": content_type}, content=body)

    budgets = Budgets()
    return kind("upstream", "http://upstream",
                make_client(budgets, transport=httpx.MockTransport(handle)), budgets)


async def _text(backend: OpenAICompatBackend | OllamaBackend) -> str:
    async with backend.stream(req()) as chunks:
        return text_of([c async for c in chunks])


async def test_a_llamacpp_stream_error_line_carries_the_upstreams_message() -> None:
    backend = _over_body(OpenAICompatBackend, (
        b'error: {"code":500,"message":"the model runner crashed",'
        b'"type":"server_error"}\n\ndata: [DONE]\n\n'))
    with pytest.raises(BackendResponseError) as info:
        await _text(backend)
    assert info.value.message == "the model runner crashed"
    assert info.value.details["upstream_status"] == 500
    # A prompt over the context, said in the stream: the request's fault, as its HTTP 400 is
    # (found in review: it was failed over to every server, then a 503).
    backend = _over_body(OpenAICompatBackend, (
        b'error: {"code":400,"message":"the request exceeds the available context size",'
        b'"type":"exceed_context_size_error"}\n\ndata: [DONE]\n\n'))
    with pytest.raises(ContextLengthExceeded) as overflow:
        await _text(backend)
    assert overflow.value.message == "the request exceeds the available context size"
    assert (overflow.value.status, overflow.value.details["upstream_status"]) == (400, 400)


async def test_a_stream_error_in_a_data_line_keeps_the_upstreams_code() -> None:
    # vLLM and OpenAI-style gateways put a mid-stream error in a ``data:`` line. Its code was
    # dropped there (kept only for llama.cpp's ``error:`` line): the run's error had no
    # ``upstream_status``, and a prompt over the context no status of its own.
    backend = _over_body(OpenAICompatBackend, (
        b'data: {"error":{"code":500,"message":"the model runner crashed",'
        b'"type":"server_error"}}\n\ndata: [DONE]\n\n'))
    with pytest.raises(BackendResponseError) as info:
        await _text(backend)
    assert info.value.message == "the model runner crashed"
    assert info.value.details["upstream_status"] == 500
    backend = _over_body(OpenAICompatBackend, (
        b'data: {"error":{"code":400,"message":"the request exceeds the available context '
        b'size","type":"exceed_context_size_error"}}\n\ndata: [DONE]\n\n'))
    with pytest.raises(ContextLengthExceeded) as overflow:
        await _text(backend)
    assert (overflow.value.status, overflow.value.details["upstream_status"]) == (400, 400)
    # A plain string error keeps its words.
    backend = _over_body(OpenAICompatBackend, b'data: {"error":"overloaded"}\n\n')
    with pytest.raises(BackendResponseError) as plain:
        await _text(backend)
    assert plain.value.message == "overloaded"


async def test_an_emoji_split_into_surrogate_halves_across_chunks_is_joined() -> None:
    # Found in review: some JavaScript servers split a character outside the BMP into its two
    # UTF-16 halves, one per chunk; json.loads gives lone surrogates, which UTF-8 (the store,
    # every client) cannot encode: the run's final write raised and took the supervisor down.
    backend = _over_body(OpenAICompatBackend, (
        b'data: {"choices":[{"index":0,"delta":{"content":"smile \\ud83d"}}]}\n\n'
        b'data: {"choices":[{"index":0,"delta":{"content":"\\ude00 ok"}}]}\n\n'
        b'data: {"choices":[{"index":0,"delta":{"content":" lone \\udc00"}}]}\n\n'
        b'data: {"choices":[{"index":0,"delta":{"content":" end \\ud83d"}}]}\n\n'
        b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
        b"data: [DONE]\n\n"))
    text = await _text(backend)
    assert text == "smile \U0001f600 ok lone \ufffd end \ufffd"
    text.encode("utf-8")


async def test_ollama_surrogate_halves_across_lines_are_joined() -> None:
    backend = _over_body(OllamaBackend, (
        b'{"model":"m","message":{"role":"assistant","content":"smile \\ud83d"},"done":false}\n'
        b'{"model":"m","message":{"role":"assistant","content":"\\ude00"},"done":false}\n'
        b'{"model":"m","message":{"role":"assistant","content":" \\ud83d"},"done":true,'
        b'"done_reason":"stop","prompt_eval_count":1,"eval_count":3}\n'))
    assert await _text(backend) == "smile \U0001f600 \ufffd"


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("7", 7), (" 0 ", 0), ("99999999999", 3600), ("soon", None), (None, None), ("-3", None),
     ("Thu, 03 Dec 2026 12:00:30 GMT", 30), ("Thu, 03 Dec 2026 11:00:00 GMT", 0)],
)
def test_retry_after_is_read_as_seconds_or_a_date(value: str | None, seconds: int | None
                                                  ) -> None:
    from email.utils import parsedate_to_datetime

    from service.backends.http import retry_after_seconds

    now = parsedate_to_datetime("Thu, 03 Dec 2026 12:00:00 GMT").timestamp()
    assert retry_after_seconds(value, now=now) == seconds
