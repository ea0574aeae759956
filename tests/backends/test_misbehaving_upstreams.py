"""What the adapters do with upstreams that misbehave: malformed deltas, token counts and tool
calls, bodies that stay open, endless or compressed answers, only empty messages; and a failover
after the headers (found in review, 2026-12-01: each was a failing test before its fix)."""

from __future__ import annotations

import httpx
import pytest
import trio
from trio.testing import MockClock

from service.backends.auto import AutoBackend
from service.backends.http import DRAIN_SECONDS, make_client
from service.backends.interceptor import Interceptor
from service.backends.ollama import OllamaBackend
from service.backends.openai_compat import OpenAICompatBackend
from service.backends.stream_parsers import LineTooLong, SSEParser
from service.errors import BackendProtocolError
from service.metrics import Metrics
from service.sim import Reply, Simulator
from service.store.records import LLMCallOutcome

from ..backend_helpers import BUDGETS, FakeRecorder, mock_client, req


def auto_pair(first: Reply) -> tuple[AutoBackend, FakeRecorder]:
    a, b = Simulator(default=first), Simulator(default=Reply(tokens=2))
    recorder, metrics = FakeRecorder(), Metrics()
    auto = AutoBackend([
        Interceptor(OllamaBackend("ollama", "http://a", mock_client(a), BUDGETS),
                    recorder, metrics),
        Interceptor(OpenAICompatBackend("llamacpp", "http://b", mock_client(b), BUDGETS),
                    recorder, metrics),
    ])
    return auto, recorder


@pytest.mark.parametrize(("first", "outcome"), [
    (Reply(first_delay=1000), LLMCallOutcome.timed_out),   # headers, then silence
    (Reply(malformed_after=0), LLMCallOutcome.error),      # garbage first line
    (Reply(error_after=0), LLMCallOutcome.error),          # {"error": ...} after 200
    (Reply(die_after=0), LLMCallOutcome.error),            # connection dropped
])
async def test_failover_after_the_headers_records_the_attempts_real_outcome(
    first: Reply, outcome: LLMCallOutcome, autojump_clock: MockClock
) -> None:
    # The attempt was recorded "cancelled" ("left before the end of the stream"): auto closed it
    # without telling its interceptor why.
    auto, recorder = auto_pair(first)
    async with auto.stream(req(run_id="r")) as chunks:
        async for _ in chunks:
            pass
    rows = [(r.backend, r.outcome, r.error) for r in recorder.rows]
    assert rows[0][:2] == ("ollama", outcome), rows
    assert rows[1][:2] == ("llamacpp", LLMCallOutcome.ok)


def test_an_sse_event_of_many_short_data_lines_is_bounded() -> None:
    # Each line is short, but no blank line ever comes: the event's data was held unbounded.
    parser = SSEParser(max_line=1024)
    line = b"data: " + b"x" * 500 + b"\n"

    def feed_10_mb() -> None:
        for _ in range(20_000):
            parser.feed(line)

    with pytest.raises(LineTooLong):
        feed_10_mb()
    assert parser._data_size <= 1024 + 502




def fixed_body(body: bytes, content_type: str) -> httpx.AsyncClient:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": content_type}, content=body)
    return make_client(BUDGETS, transport=httpx.MockTransport(handler))


async def _drain(backend: OpenAICompatBackend | OllamaBackend) -> None:
    async with backend.stream(req()) as chunks:
        async for _ in chunks:
            pass


@pytest.mark.parametrize("data", [
    b'{"choices":[{"index":0,"delta":"oops"}]}',
    b'{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":"f"}]}}]}',
    b'{"choices":[{"index":0,"delta":{"tool_calls":5}}]}',
])
async def test_a_malformed_openai_delta_is_a_protocol_error(data: bytes) -> None:
    # It was an AttributeError / TypeError: not a BackendError, so auto did not fail over.
    body = b"data: " + data + b"\n\ndata: [DONE]\n\n"
    backend = OpenAICompatBackend("b", "http://x", fixed_body(body, "text/event-stream"), BUDGETS)
    with pytest.raises(BackendProtocolError):
        await _drain(backend)


async def test_malformed_ollama_token_counts_keep_the_answer_and_its_record() -> None:
    # String counts reached a Prometheus counter, whose TypeError lost the call's record and
    # turned a whole answer into a failure.
    body = (b'{"message":{"role":"assistant","content":"hi"},"done":false}\n'
            b'{"message":{"role":"assistant","content":""},"done":true,'
            b'"prompt_eval_count":"3","eval_count":-1}\n')
    recorder = FakeRecorder()
    backend = Interceptor(
        OllamaBackend("o", "http://x", fixed_body(body, "application/x-ndjson"), BUDGETS),
        recorder, Metrics())
    async with backend.stream(req()) as chunks:
        got = [c async for c in chunks]
    assert got[-1].done
    (row,) = recorder.rows
    assert row.outcome is LLMCallOutcome.ok
    assert row.prompt_tokens is None  # unknown, not "3"
    assert (row.completion_tokens, row.tokens_estimated) == (1, True)  # counted from chunks


async def test_ollama_tool_calls_that_are_not_a_list_are_a_protocol_error() -> None:
    body = b'{"message":{"role":"assistant","content":"","tool_calls":5},"done":true}\n'
    backend = OllamaBackend("o", "http://x", fixed_body(body, "application/x-ndjson"), BUDGETS)
    with pytest.raises(BackendProtocolError):
        await _drain(backend)


class _OpenBody(httpx.AsyncByteStream):
    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts

    async def __aiter__(self):  # type: ignore[override]
        for p in self.parts:
            yield p
        await trio.sleep_forever()  # the body is never terminated


@pytest.mark.parametrize("protocol", ["ollama", "openai"])
async def test_a_whole_answer_whose_body_stays_open_ends_promptly(
    protocol: str, autojump_clock: MockClock
) -> None:
    if protocol == "ollama":
        parts = [b'{"message":{"content":"hi"},"done":false}\n',
                 b'{"message":{"content":""},"done":true,"eval_count":1}\n']
        ctype, cls = "application/x-ndjson", OllamaBackend
    else:
        parts = [b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n',
                 b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
                 b"data: [DONE]\n\n"]
        ctype, cls = "text/event-stream", OpenAICompatBackend

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": ctype}, stream=_OpenBody(parts))

    backend = cls("b", "http://x", make_client(BUDGETS, transport=httpx.MockTransport(handler)),
                  BUDGETS)
    start = trio.current_time()
    async with backend.stream(req()) as chunks:
        got = [c async for c in chunks]
    assert got[-1].done
    # The drain after the last message waited out the whole gap budget (60 s in production).
    assert trio.current_time() - start <= DRAIN_SECONDS


async def test_tool_calls_without_an_id_get_unique_ones() -> None:
    # They were "call_<index>", the same in every step of a ReAct run: call_id was ambiguous.
    body = (b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":'
            b'{"name":"calculator","arguments":"{}"}}]},"finish_reason":"tool_calls"}]}\n\n'
            b"data: [DONE]\n\n")
    ids = []
    for _ in range(2):
        backend = OpenAICompatBackend("b", "http://x", fixed_body(body, "text/event-stream"),
                                      BUDGETS)
        async with backend.stream(req()) as chunks:
            (call,) = [c async for c in chunks][-1].tool_calls
        ids.append(call.id)
    assert ids[0] != ids[1]


async def test_an_endless_model_list_or_health_answer_is_refused_not_read_forever() -> None:
    # /v1/models, /api/tags and the health probes read the whole body, whatever its size.
    from service.backends import http as http_mod

    class Endless(httpx.AsyncByteStream):
        async def __aiter__(self):  # type: ignore[override]
            while True:
                yield b"x" * 65536

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "application/json"},
                              stream=Endless())

    client = make_client(BUDGETS, transport=httpx.MockTransport(handler))
    backend = OpenAICompatBackend("b", "http://x", client, BUDGETS)
    with pytest.raises(BackendProtocolError, match="larger than"):
        await backend.list_models()
    health = await backend.health()
    assert not health.reachable
    assert health.error is not None
    assert "larger than" in health.error
    assert http_mod.MAX_SMALL_BODY <= 8 * 1024 * 1024


async def test_a_gzipped_small_answer_is_decoded() -> None:
    import gzip
    import json as _json

    body = gzip.compress(_json.dumps({"data": [{"id": "m1"}]}).encode())

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "application/json",
                                            "content-encoding": "gzip"}, content=body)

    backend = OpenAICompatBackend("b", "http://x",
                                  make_client(BUDGETS, transport=httpx.MockTransport(handler)),
                                  BUDGETS)
    assert [m.id for m in await backend.list_models()] == ["m1"]


@pytest.mark.parametrize("encoding", ["gzip", "identity", None])
async def test_a_compressed_stream_is_decoded_and_a_plain_one_read_raw(
        encoding: str | None) -> None:
    # Streams are read raw (``aiter_raw``, one generator fewer per chunk); one the server
    # encoded anyway (it was asked for identity) is inflated by the service, bounded.
    import gzip

    sse = b"".join(b'data: {"choices":[{"index":0,"delta":{"content":"%s "}}]}\n\n' % w
                   for w in (b"one", b"two", b"three"))
    sse += b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    sse += b"data: [DONE]\n\n"
    body = gzip.compress(sse) if encoding == "gzip" else sse

    async def pieces():  # type: ignore[no-untyped-def]  # streamed, as over a socket
        for at in range(0, len(body), 17):
            yield body[at:at + 17]

    async def handler(request: httpx.Request) -> httpx.Response:
        headers = {"content-type": "text/event-stream"}
        if encoding is not None:
            headers["content-encoding"] = encoding
        return httpx.Response(200, headers=headers, content=pieces())

    backend = OpenAICompatBackend("b", "http://x",
                                  make_client(BUDGETS, transport=httpx.MockTransport(handler)),
                                  BUDGETS)
    async with backend.stream(req()) as chunks:
        text = "".join([chunk.text async for chunk in chunks])
    assert text == "one two three "


@pytest.mark.parametrize(("encoding", "body", "says"), [
    ("br", b"\x1b\x00", "content-encoding 'br'"),
    ("gzip", b"\x1f\x8b\x08\x00garbage, not deflate" * 4, "corrupt"),
])
async def test_an_unreadable_encoded_stream_is_a_protocol_error(
        encoding: str, body: bytes, says: str) -> None:
    seen: list[str | None] = []

    async def pieces():  # type: ignore[no-untyped-def]
        yield body

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("accept-encoding"))
        return httpx.Response(200, headers={"content-type": "text/event-stream",
                                            "content-encoding": encoding}, content=pieces())

    backend = OpenAICompatBackend("b", "http://x",
                                  make_client(BUDGETS, transport=httpx.MockTransport(handler)),
                                  BUDGETS)
    with pytest.raises(BackendProtocolError, match=says):
        await _drain(backend)
    assert seen == ["identity"]  # it asked for no compression


@pytest.mark.parametrize("encoding", ["gzip", "gzip, gzip"])
async def test_a_compressed_small_answer_is_inflated_within_the_bound(encoding: str) -> None:
    # Found in review: httpx inflated a whole chunk (or nested layers) before our size check:
    # 65 KB of gzip became one 64 MB block. We now inflate it ourselves, capped; a layered
    # encoding is refused.
    import gzip

    from service.backends.http import BodyTooLarge, request_small

    payload = gzip.compress(b"\0" * (64 * 1024 * 1024))
    seen: list[str | None] = []

    async def body():  # type: ignore[no-untyped-def]
        yield payload

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("accept-encoding"))
        return httpx.Response(200, headers={"content-encoding": encoding}, content=body())

    client = make_client(BUDGETS, transport=httpx.MockTransport(handler))
    with pytest.raises(BodyTooLarge):
        await request_small(client, "GET", "http://x/api/tags", limit=1024 * 1024)
    assert seen == ["identity"]  # it asked for no compression


class _Drip(httpx.AsyncByteStream):
    """A body that sends ``first`` parts, then ``every`` forever, one per second."""

    def __init__(self, first: list[bytes], every: bytes) -> None:
        self.first, self.every = first, every

    async def __aiter__(self):  # type: ignore[override]
        for part in self.first:
            yield part
        while True:
            await trio.sleep(1)
            yield self.every


@pytest.mark.parametrize("protocol", ["ollama", "openai"])
@pytest.mark.parametrize("after_content", [False, True])
async def test_an_upstream_sending_only_empty_messages_hits_its_budget(
    protocol: str, after_content: bool, autojump_clock: MockClock
) -> None:
    # Found in review: only ":" comments were not progress; an empty delta (or an Ollama line
    # with empty content) every second kept a call alive until the whole-call budget.
    from service.errors import ChunkGapTimeout, FirstChunkTimeout

    if protocol == "ollama":
        content = b'{"message":{"role":"assistant","content":"hi"},"done":false}\n'
        empty = b'{"message":{"role":"assistant","content":""},"done":false}\n'
        ctype, cls = "application/x-ndjson", OllamaBackend
    else:
        content = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
        empty = b'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n'
        ctype, cls = "text/event-stream", OpenAICompatBackend

    async def handler(request: httpx.Request) -> httpx.Response:
        first = [content] if after_content else []
        return httpx.Response(200, headers={"content-type": ctype}, stream=_Drip(first, empty))

    backend = cls("b", "http://x", make_client(BUDGETS, transport=httpx.MockTransport(handler)),
                  BUDGETS)
    expected = ChunkGapTimeout if after_content else FirstChunkTimeout
    start = trio.current_time()
    with pytest.raises(expected):
        await _drain(backend)
    budget = BUDGETS.gap if after_content else BUDGETS.first_chunk
    assert trio.current_time() - start == pytest.approx(budget, abs=1.0)
