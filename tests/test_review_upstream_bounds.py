"""Review: how the service reads an upstream's streamed answer, and whether each misbehaving
upstream is bounded in memory, CPU and time and ends in a clear ``BackendError``.

Each upstream here is a real server on a loopback socket (raw HTTP/1.1 written by the test, so
it controls every header and byte), read through the service's own client and adapters. Every
test in this file failed when it was written (see each docstring for the measured numbers)."""

from __future__ import annotations

import gzip
import json
import time

import pytest
import trio

from service.backends.auto import AutoBackend
from service.backends.http import Budgets, make_client
from service.backends.openai_compat import OpenAICompatBackend
from service.backends.stream_parsers import DEFAULT_MAX_LINE, SSEParser
from service.errors import BackendError

from .backend_helpers import BUDGETS, req
from .raw_upstream import (
    END,
    FINISH,
    GUARD,
    GZIP_SSE_HEAD,
    NDJSON_HEAD,
    SSE_HEAD,
    call_raw,
    chunk,
    delta,
    serve_raw,
    sse,
)

# --------------------------------------------------------------------------------------------
# 1. Deeply nested JSON in one event: RecursionError, not a BackendError.

DEEP = b"[" * 100_000 + b"]" * 100_000  # 200 KB, far below the 4 MB line bound


@pytest.mark.parametrize("protocol", ["openai", "ollama"])
async def test_deeply_nested_json_in_one_message_is_a_protocol_error(protocol: str) -> None:
    """Defect: service/backends/http.py:394 (NDJSONReader.next) and openai_compat.py:139
    (OpenAIChunks._event) catch only ``ValueError`` around ``json.loads``; 100,000 nested
    brackets (200 KB, within the 4 MB line bound) raise ``RecursionError`` (a RuntimeError),
    which escapes the adapter as a bare exception: no BackendError, so no failover, no typed
    error for the client, an "error" record with a Python message. ``parse_arguments``
    (common.py:44) already catches RecursionError for tool arguments; the message readers do
    not. Measured: ``RecursionError: maximum recursion depth exceeded while decoding a JSON
    array`` from both adapters, in ~3 ms."""
    if protocol == "openai":
        async def respond(stream: trio.SocketStream) -> None:
            await stream.send_all(SSE_HEAD + chunk(b"data: " + DEEP + b"\n\n") + END)
    else:
        async def respond(stream: trio.SocketStream) -> None:
            await stream.send_all(NDJSON_HEAD + chunk(DEEP + b"\n") + END)

    out = await call_raw(respond, protocol=protocol)
    assert isinstance(out.error, BackendError), out


async def test_a_deeply_nested_first_message_fails_over_to_the_next_backend() -> None:
    """The consequence of the defect above for a fleet: AutoBackend fails over on a
    BackendError before the first chunk (auto.py, module docstring step 2). The RecursionError
    is not one, so the healthy second backend is never tried and the call fails untyped."""
    async def deep(stream: trio.SocketStream) -> None:
        await stream.send_all(SSE_HEAD + chunk(b"data: " + DEEP + b"\n\n") + END)

    async def good(stream: trio.SocketStream) -> None:
        await stream.send_all(SSE_HEAD + chunk(delta(content="fine") + FINISH) + END)

    text, error = "", None
    async with trio.open_nursery() as nursery:
        bad_port = await nursery.start(serve_raw, deep)
        good_port = await nursery.start(serve_raw, good)
        client = make_client(BUDGETS)
        auto = AutoBackend([
            OpenAICompatBackend("bad", f"http://127.0.0.1:{bad_port}", client, BUDGETS),
            OpenAICompatBackend("good", f"http://127.0.0.1:{good_port}", client, BUDGETS),
        ])
        try:
            with trio.fail_after(GUARD):
                try:
                    async with auto.stream(req()) as chunks:
                        text = "".join([c.text async for c in chunks])
                except Exception as exc:
                    error = exc
        finally:
            await client.aclose()
        nursery.cancel_scope.cancel()
    assert (text, error) == ("fine", None)


# --------------------------------------------------------------------------------------------
# 2. A huge integer in a timing field: OverflowError, and a whole answer lost.

HUGE_INT = b"9" * 4000  # under Python's 4300-digit limit: json.loads gives an int


@pytest.mark.parametrize("protocol", ["openai", "ollama"])
async def test_a_huge_integer_timing_does_not_lose_the_answer(protocol: str) -> None:
    """Defect: openai_compat.py:157-160 does ``float(v)`` for every int in ``timings``, and
    ollama.py:71-77 divides each ``*_duration`` int by 1e6. A 4000-digit integer (valid JSON,
    under Python's int-parsing limit, so json.loads accepts it) raises ``OverflowError`` ("int
    too large to convert to float"; "integer division result too large for a float"): not a
    BackendError. The answer itself was whole: Ollama's text was already streamed when the
    done line failed the call. Timings are advisory, as token counts are (``token_count``,
    common.py:28-30: "a malformed count is not worth failing an answer for"). Expected: the
    answer ends normally (the bad timing dropped) or, at worst, a BackendError."""
    if protocol == "openai":
        last = (b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],'
                b'"timings":{"predicted_ms":' + HUGE_INT + b"}}\n\ndata: [DONE]\n\n")
        body = SSE_HEAD + chunk(delta(content="hi") + last) + END
    else:
        body = NDJSON_HEAD + chunk(
            b'{"message":{"role":"assistant","content":"hi"},"done":false}\n'
            b'{"message":{"role":"assistant","content":""},"done":true,'
            b'"total_duration":' + HUGE_INT + b"}\n") + END

    async def respond(stream: trio.SocketStream) -> None:
        await stream.send_all(body)

    out = await call_raw(respond, protocol=protocol)
    if out.error is not None:
        assert isinstance(out.error, BackendError), out
    else:
        assert out.text == "hi", out
        assert out.chunks[-1].done


# --------------------------------------------------------------------------------------------
# 3. Data after the end of a gzip stream: held in zlib's unused_data, copied again per read.

async def test_data_after_the_end_of_a_gzip_stream_is_not_accumulated() -> None:
    """Defect: ``TimedResponse._read_inflated`` (http.py:320-329) never looks at
    ``inflater.eof``. Once the gzip member has ended, zlib returns b"" for every further input
    and appends it to ``unused_data`` (a new bytes object each time: quadratic copying); the
    loop keeps reading until its deadline (the gap budget, 60 s in production). Measured with
    a 5 s gap: an upstream sending one small gzip member then zeros at socket speed got
    28.75 MB absorbed in 5 s with a core at 100% (5.0 s CPU), and 57 MB traced peak under
    tracemalloc, ending in ``ChunkGapTimeout`` rather than a protocol error. Expected: data
    after the end of the compressed stream is refused at once (BackendProtocolError), or read
    on as a next gzip member, never stored without bound."""
    member = gzip.compress(delta(content="hi"))
    junk = chunk(b"\0" * 65536)

    async def respond(stream: trio.SocketStream) -> None:
        await stream.send_all(GZIP_SSE_HEAD + chunk(member))
        for _ in range(48 * 16):  # 48 MB after the member's end
            await stream.send_all(junk)
        await stream.send_all(END)

    start = trio.current_time()
    out = await call_raw(respond, measure=True)
    took = trio.current_time() - start
    assert isinstance(out.error, BackendError), out
    assert out.peak < 4 * DEFAULT_MAX_LINE, out
    assert took < BUDGETS.gap, (took, out)


async def test_a_second_gzip_member_is_read_not_silently_dropped() -> None:
    """Low: RFC 1952 (the gzip coding of RFC 9110) lets a body be several members one after
    another (what ``cat a.gz b.gz`` or a proxy that compresses each flush as its own member
    sends; Python's ``gzip.decompress`` reads them all). ``_read_inflated`` stops after the
    first member and drops the rest (see the defect above), so an answer whose end is in the
    second member fails as "stream ended before a finish_reason". Expected: its text, whole,
    or a protocol error that says the data after the first member was refused."""
    first = gzip.compress(delta(content="one "))
    second = gzip.compress(delta(content="two") + FINISH)

    async def respond(stream: trio.SocketStream) -> None:
        await stream.send_all(GZIP_SSE_HEAD + chunk(first) + chunk(second) + END)

    out = await call_raw(respond)
    if out.error is None:
        assert out.text == "one two", out
    else:
        assert "finish_reason" not in str(out.error), out  # not blamed on the upstream's answer


# --------------------------------------------------------------------------------------------
# 4. Tool-call arguments: not progress (a false timeout), and joined without a bound.

async def test_tool_call_arguments_streamed_slowly_are_progress() -> None:
    """Defect: ``OpenAIChunks.__anext__`` (openai_compat.py:97-119) fixes one deadline per
    returned chunk, and an event carrying only a tool-call fragment returns no chunk
    (``_event`` returns None unless there is text or thinking, :193-195). The module docstring of
    http.py says only "a message that carries nothing (an empty or role-only delta)" is not
    progress; a tool-call fragment carries the answer. So a model that streams a long tool call
    (a file's content as an argument) for longer than the gap budget (or, if the call is its
    first output, than the first-chunk budget, counted from the request) fails with
    ChunkGapTimeout / FirstChunkTimeout although it sent a fragment every 0.5 s. Measured here
    (gap 2 s): ``ChunkGapTimeout: no chunk for 2s`` at t=2 s, 4 fragments in."""
    budgets = Budgets(connect=3.0, first_chunk=10.0, gap=2.0, call=30.0)
    start = delta(content="Writing it.") + delta(tool_calls=[
        {"index": 0, "id": "c1", "type": "function",
         "function": {"name": "write_file", "arguments": ""}}])
    pieces = ['{"path": "a.txt", ', '"content": "', *(["line\\n"] * 6), '"}']

    async def respond(stream: trio.SocketStream) -> None:
        await stream.send_all(SSE_HEAD + chunk(start))
        for piece in pieces:
            await trio.sleep(0.5)  # well within the gap: each fragment is new output
            await stream.send_all(chunk(delta(tool_calls=[
                {"index": 0, "function": {"arguments": piece}}])))
        await stream.send_all(chunk(sse({"choices": [
            {"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}) + b"data: [DONE]\n\n"))
        await stream.send_all(END)

    out = await call_raw(respond, budgets=budgets)
    assert out.error is None, out
    (call,) = out.chunks[-1].tool_calls
    assert call.arguments == {"path": "a.txt", "content": "line\n" * 6}


async def test_tool_call_arguments_are_bounded_in_size() -> None:
    """Defect: ``OpenAIChunks._add_call_delta`` (openai_compat.py:213-214) appends every
    ``arguments`` fragment to a list, joined at the end (``_final``), with no bound on their
    total: each event is bounded (4 MB, the SSE parser's), their number is not. Ollama's
    tool call comes in one NDJSON line and so is bounded by the same 4 MB
    (``DEFAULT_MAX_LINE``); OpenAI-style deltas are not. Measured: 300 fragments of 1 MB gave
    one tool call with 300 MB of arguments, delivered as "ok", 600 MB traced peak (the list and
    its join), in 3.3 s; only the time budgets stop it (fragments are not progress, see above:
    the first-chunk budget, 60 s in production, so gigabytes at loopback speed).
    Expected: past a bound (the line bound is the natural one) the call fails with a
    BackendProtocolError, or the joined arguments stay within it."""
    fragment = chunk(delta(tool_calls=[{"index": 0, "function": {"arguments": "x" * 2**20}}]))

    async def respond(stream: trio.SocketStream) -> None:
        await stream.send_all(SSE_HEAD + chunk(delta(tool_calls=[
            {"index": 0, "id": "c1", "function": {"name": "f", "arguments": ""}}])))
        for _ in range(4 * DEFAULT_MAX_LINE // 2**20):  # 16 MB of arguments
            await stream.send_all(fragment)
        await stream.send_all(chunk(sse({"choices": [
            {"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}) + b"data: [DONE]\n\n"))
        await stream.send_all(END)

    out = await call_raw(respond)
    if out.error is None:
        sizes = [len(c.invalid_arguments or json.dumps(c.arguments))
                 for c in out.chunks[-1].tool_calls]
        assert max(sizes) <= DEFAULT_MAX_LINE, f"tool call arguments of {sizes} characters"
    else:
        assert isinstance(out.error, BackendError), out


# --------------------------------------------------------------------------------------------
# 5. An answer's text: no bound at all but time.

async def test_an_upstream_streaming_text_without_end_is_cut_by_size_not_only_by_time() -> None:
    """Defect (design gap): nothing bounds the text of one call (or of a run): each content
    event is progress, so only the call budget (600 s) and the run's timeout (300 s) stop an
    upstream that streams fast. Measured on loopback: 1 MB content events reach the consumer at
    ~131 MB/s (655 MB in a 5 s call budget, 5.0 s CPU), so a run would collect ~39 GB before
    its timeout: ``call_llm`` keeps every piece (agents/base.py:305-306, joined at the end),
    the run handle keeps them again (``answer_parts``, runs/handle.py:143), each becomes a
    stored ``token`` event, and the final message is written as one string
    (``FinalState.content``). The process runs out of memory long before; the client gets
    tokens until then, and no typed error. No real model answers more than its context
    (128k tokens, well under 1 MB of text). Expected: past a bound far above any real answer
    (here: 256 MB) the call fails with a BackendError."""
    event = chunk(delta(content="x" * 2**20))

    async def respond(stream: trio.SocketStream) -> None:
        await stream.send_all(SSE_HEAD)
        while True:
            await stream.send_all(event)

    limit = 256 * 2**20
    out = await call_raw(respond, keep=False, stop_after_chars=limit, intercepted=True)
    assert isinstance(out.error, BackendError), (
        f"{out.text_chars / 2**20:.0f} MB of text delivered by one call, no error: {out}")


# --------------------------------------------------------------------------------------------
# 6. CPU: one long SSE line in small reads is quadratic.

def test_a_long_sse_line_in_small_reads_costs_linear_cpu() -> None:
    """Defect: ``SSEParser.feed`` (stream_parsers.py:129-130) searches for ``\\r`` and ``\\n``
    from the start of the buffer on every feed (the comment above it fixed the per-line
    rescans within one feed, not across feeds); ``NDJSONSplitter.feed`` resumes where the last
    feed stopped. A line growing to the 4 MB bound in 256-byte reads is scanned twice per read:
    measured 1.90 s CPU for the SSE parser against 0.0066 s for the NDJSON splitter (290x).
    Over a real socket (128-byte chunks) a 4 MB line took 7.6 s CPU before LineTooLong (NDJSON:
    2.1 s); smaller chunks push it past the gap budget, with a core busy all along. A pure
    parser test: the cost is the parser's alone."""
    def cpu_for(line: int) -> float:
        """Least CPU of three to parse a ``line``-byte data line fed 256 bytes at a time."""
        best = float("inf")
        for _ in range(3):
            parser = SSEParser(max_line=2 * line)
            parser.feed(b"data: ")
            started = time.process_time()
            for _ in range(line // 256):
                parser.feed(b"a" * 256)
            (event,) = parser.feed(b"\n\n")
            best = min(best, time.process_time() - started)
            assert len(event.data) == line // 256 * 256
        return best

    # Linear: four times the line, about four times the CPU; quadratic: sixteen. A ratio, so
    # the machine's speed does not matter.
    small, large = cpu_for(DEFAULT_MAX_LINE // 4), cpu_for(DEFAULT_MAX_LINE)
    assert large < 9 * small, (
        f"a 4 MB line took {large:.3f} s of CPU, a 1 MB one {small:.3f} s: not linear")
