"""Review of the diff ab2d04b..HEAD (upstream and client bounds): defects it introduced or left.

Each upstream is a real server on a loopback socket (raw HTTP/1.1 written by the test), read
through the service's own client and adapters, as in ``test_review_upstream_bounds``."""

from __future__ import annotations

import gzip
import zlib

import trio

from service.backends.http import BodyTooLarge, Budgets
from service.errors import BackendError, BackendRateLimited, ChunkGapTimeout

from .raw_upstream import (
    END,
    FINISH,
    GZIP_JSON_HEAD,
    SSE_HEAD,
    call_raw,
    chunk,
    delta,
    small_raw,
    sse,
)

READ_FOR = 10  # seconds a request_small may take here (its callers' deadlines: 2-10 s)


# --------------------------------------------------------------------------------------------
# 1. A tool call's *name*, sent again and again, counts as progress.

async def test_a_repeated_tool_call_name_is_not_progress() -> None:
    """Defect (medium, introduced): ``OpenAIChunks._add_call_delta`` (openai_compat.py:
    230-232; read at :128-132) sets ``_call_progress`` whenever a delta carries a non-empty
    ``function.name``, even the same name again. A name replaces the one kept: it adds
    nothing to the answer, and nothing bounds it (MAX_ARGUMENTS counts arguments only). An
    upstream stuck repeating ``{"index": 0, "function": {"name": "f"}}`` every 0.2 s renews
    the gap deadline at each event, so it holds the call (and a limiter slot) until the call
    budget (600 s in production) instead of the gap budget (60 s). Only new arguments (or a
    first name) are progress; empty arguments are already excluded (:233). Measured here:
    ``CallTimeout`` after the 8 s call budget, not ``ChunkGapTimeout`` after 1 s (before
    the diff: ChunkGapTimeout)."""
    budgets = Budgets(connect=3.0, first_chunk=5.0, gap=1.0, call=8.0)
    same_name = chunk(delta(tool_calls=[{"index": 0, "function": {"name": "f"}}]))

    async def respond(stream: trio.SocketStream) -> None:
        await stream.send_all(SSE_HEAD + chunk(delta(content="ok")) + chunk(delta(tool_calls=[
            {"index": 0, "id": "c1", "type": "function", "function": {"name": "f"}}])))
        while True:
            await trio.sleep(0.2)
            await stream.send_all(same_name)

    start = trio.current_time()
    out = await call_raw(respond, budgets=budgets)
    took = trio.current_time() - start
    assert isinstance(out.error, ChunkGapTimeout), (took, out)
    assert took < 4, (took, out)


# --------------------------------------------------------------------------------------------
# 2. request_small (model lists, health probes): data after a gzip member, and a 2nd member.



async def test_request_small_bounds_the_data_after_a_gzip_member() -> None:
    """Defect (medium, left by the diff): the diff taught ``TimedResponse._read_inflated``
    (http.py:334-346) that a gzip member can end, but ``request_small`` (http.py:541-552),
    every model list, health probe and ``request_json``, still feeds each raw chunk to an
    inflater that has reached its end: zlib returns b"" and appends the chunk to
    ``unused_data`` (a new bytes object each time: quadratic copying, memory without bound),
    and ``limit`` bounds only the *inflated* bytes (``body``). A server (or a proxy) that
    sends one small gzip member then keeps sending is read until the caller's deadline, with
    a core busy copying. Expected: the data after the member is refused (BodyTooLarge, or a
    zlib error as the stream path now raises) at once, or at the latest at ``limit`` raw bytes.
    Measured: still reading (and copying) after 10 s."""
    member = gzip.compress(b'{"object": "list", "data": []}')
    junk = chunk(b"\0" * 65536)

    async def respond(stream: trio.SocketStream) -> None:
        await stream.send_all(GZIP_JSON_HEAD + chunk(member))
        while True:
            await stream.send_all(junk)

    body, error, took = await small_raw(respond, read_for=READ_FOR)
    assert body is None, (took, body)
    assert isinstance(error, BodyTooLarge | zlib.error | BackendError), (took, error)


async def test_request_small_reads_a_second_gzip_member() -> None:
    """Defect (low, left by the diff): the diff reads a gzip body's next member on the stream
    path (RFC 1952: a body may be several members; Python's ``gzip.decompress`` reads them
    all); ``request_small`` (http.py:547-552) keeps the first member's inflater, which
    swallows the second member into ``unused_data``: the body is cut at the first member's
    end, silently, and a model list sent that way is "body is not JSON". Expected: the whole
    body, or an error that says the rest was refused."""
    first = gzip.compress(b'{"object": "list", ')
    second = gzip.compress(b'"data": [{"id": "m"}]}')

    async def respond(stream: trio.SocketStream) -> None:
        await stream.send_all(GZIP_JSON_HEAD + chunk(first) + chunk(second) + END)

    body, error, _ = await small_raw(respond, read_for=READ_FOR)
    if error is None:
        assert body == b'{"object": "list", "data": [{"id": "m"}]}', body
    else:
        assert isinstance(error, BodyTooLarge | BackendError), error


# --------------------------------------------------------------------------------------------
# 3. The stream path's inflation: zero padding after a member, and raw deflate.

GZIP_SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                 b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n")
DEFLATE_SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    b"Content-Encoding: deflate\r\nTransfer-Encoding: chunked\r\n\r\n")


async def test_zero_padding_after_a_gzip_member_does_not_lose_a_whole_answer() -> None:
    """Defect (low, introduced): ``_read_inflated`` (http.py:334-346) now opens a new inflater
    on whatever follows a gzip member, so zero padding after it (gzip's FAQ allows it;
    Python's ``gzip`` module skips it) is a ``zlib.error``, raised as a protocol error from the
    read that would have found the end of the body. Before the diff it was ignored. An answer
    that ends with its ``finish_reason`` and no ``[DONE]`` (tolerated: openai_compat.py:113-117)
    is read to the end of the body, so a whole answer is lost as "the stream's compressed body
    is corrupt". Expected: the answer, whole (padding skipped), as before the diff."""
    member = gzip.compress(delta(content="whole answer") + sse(
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))

    async def respond(stream: trio.SocketStream) -> None:
        await stream.send_all(GZIP_SSE_HEAD + chunk(member + b"\0" * 512) + END)

    out = await call_raw(respond)
    assert out.error is None, out
    assert out.text == "whole answer", out


async def test_a_raw_deflate_stream_is_read() -> None:
    """Defect (low, left): ``Content-Encoding: deflate`` sent as raw deflate (no zlib header:
    what many servers send; httpx's ``DeflateDecoder`` falls back to it, so the service read it
    before it inflated streams itself) is a ``zlib.error`` for ``decompressobj(47)``
    (http.py:281, and request_small's http.py:541): the whole answer is a protocol error.
    Expected: the answer, as httpx's own decoding gave it."""
    raw = zlib.compressobj(wbits=-15)
    body = raw.compress(delta(content="deflated") + FINISH) + raw.flush()

    async def respond(stream: trio.SocketStream) -> None:
        await stream.send_all(DEFLATE_SSE_HEAD + chunk(body) + END)

    out = await call_raw(respond)
    assert out.error is None, out
    assert out.text == "deflated", out



async def test_zero_padding_after_a_gzip_error_body_keeps_the_upstream_status() -> None:
    """The same defect on an error status: ``open_stream`` reads the error body through
    ``_read_bounded`` (http.py:508-516), whose read raises the zlib error of the padding, so
    a 429 with its Retry-After becomes "the stream's compressed body is corrupt" (a protocol
    error, 502): the client loses the status and when to come back. Before the diff: a
    ``BackendRateLimited`` with ``retry_after`` 7."""
    body = gzip.compress(b'{"error": {"message": "slow down", "type": "rate_limit"}}')

    async def respond(stream: trio.SocketStream) -> None:
        await stream.send_all(
            b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
            b"Content-Encoding: gzip\r\nRetry-After: 7\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunk(body + b"\0" * 64) + END)

    out = await call_raw(respond)
    assert isinstance(out.error, BackendRateLimited), out
    assert out.error.retry_after == 7, out
