"""Review of 41f09a1 (``service/backends/inflate.py``, its use in ``http.py``, and the tool-call
progress change in ``openai_compat.py``): defects it introduced or left.

Pure tests of ``Inflater``, and loopback-socket tests as in ``test_review_diff_dec05e`` (raw
HTTP/1.1 written by the test, read through the service's own client and adapters). Each test
here failed when written."""

from __future__ import annotations

import json
import zlib

import trio

from service.backends.http import Budgets
from service.backends.inflate import Inflater
from service.errors import ChunkGapTimeout

from .raw_upstream import END, FINISH, GZIP_JSON_HEAD, call_raw, chunk, delta, small_raw

DEFLATE_SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    b"Content-Encoding: deflate\r\nTransfer-Encoding: chunked\r\n\r\n")
DEFLATE_JSON_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Encoding: deflate\r\nTransfer-Encoding: chunked\r\n\r\n")




def _raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def _inflate_all(inflater: Inflater, pieces: list[bytes], max_out: int = 65536) -> bytes:
    out = b""
    for piece in pieces:
        inflater.take(piece)
        while got := inflater.inflate(max_out):
            out += got
    return out


# --------------------------------------------------------------------------------------------
# 1. Raw deflate whose first chunk is a single byte: the fallback drops that byte.

def test_raw_deflate_with_a_one_byte_first_chunk_is_inflated_whole() -> None:
    """Defect (low-medium, introduced): ``Inflater.inflate`` (inflate.py:54-61) decides that a
    ``deflate`` body is raw (no zlib header) when zlib raises, then restarts from
    ``self._input``: only what has not been fed to zlib yet. wbits 47 needs two bytes to check
    a header; fed one, zlib *consumes* it (``unconsumed_tail`` is b"", inflate.py:62) and
    raises only at the next chunk. The restart then begins at the second byte: the first byte
    of the raw stream (its first block header) is lost, and the body is "invalid stored block
    lengths" (or, by chance, garbage). Chunk boundaries are the sender's or a proxy's choice;
    the same body in one chunk is read. Expected: the body, whatever its chunking (keep the
    bytes fed to the auto-detecting inflater until it has produced output or passed the
    header, and restart from them)."""
    text = b"data: " + b"hello " * 50 + b"\n\n"
    body = _raw_deflate(text)
    assert _inflate_all(Inflater("deflate"), [body]) == text  # in one chunk: read
    try:
        got = _inflate_all(Inflater("deflate"), [body[:1], body[1:]])
    except zlib.error as exc:
        raise AssertionError(f"a one-byte first chunk: {exc}") from exc
    assert got == text


async def test_a_raw_deflate_stream_with_a_one_byte_first_chunk_is_read() -> None:
    """The same on the stream path (``TimedResponse._read_inflated``, http.py:332-338): the
    whole answer is lost as "the stream's compressed body is corrupt" (a protocol error)."""
    body = _raw_deflate(delta(content="deflated") + FINISH)

    async def respond(stream: trio.SocketStream) -> None:
        await stream.send_all(DEFLATE_SSE_HEAD + chunk(body[:1]))
        await trio.sleep(0.05)  # a separate read on the client's side
        await stream.send_all(chunk(body[1:]) + END)

    out = await call_raw(respond)
    assert out.error is None, out
    assert out.text == "deflated", out


async def test_request_small_reads_raw_deflate_with_a_one_byte_first_chunk() -> None:
    """The same in ``request_small`` (http.py:543-553): a model list or a health answer is
    ``BodyTooLarge("the compressed body is corrupt")``, the backend unreachable."""
    payload = b'{"object": "list", "data": [{"id": "m"}]}'
    body = _raw_deflate(payload)

    async def respond(stream: trio.SocketStream) -> None:
        await stream.send_all(DEFLATE_JSON_HEAD + chunk(body[:1]))
        await trio.sleep(0.05)
        await stream.send_all(chunk(body[1:]) + END)

    got, error, _ = await small_raw(respond)
    assert error is None, error
    assert got == payload, got


# --------------------------------------------------------------------------------------------
# 2. request_small's raw bound refuses a valid compressed answer below ``limit``.

async def test_request_small_raw_bound_admits_a_valid_flushed_gzip_body_below_the_limit(
) -> None:
    """Defect (low, introduced): ``request_small`` (http.py:538-541) now refuses a body once
    ``limit + limit // 64 + 1024`` raw bytes are read, on the reasoning that compressed data
    is "hardly larger than what it holds" (5 bytes per 64 KB stored block). That holds for one
    deflate stream written at once, not for a valid gzip body written by a streaming encoder
    that flushes (Z_SYNC_FLUSH: an empty stored block, 4-5 bytes, and a new block header) after
    each small write, or one gzip member per write (20 bytes each), or a header with long
    FNAME/FCOMMENT/FEXTRA fields: the raw size can exceed the inflated size by far more than
    1/64. Such a body, *below* ``limit`` once inflated, is "response larger than {limit}
    bytes": a model list or health answer lost. (Practically: an answer within a few percent
    of the 8 MB limit, or a very chatty encoder; hence low.) Measured: an answer of 240 KB,
    limit 256 KB, flushed every 8 bytes: 275 KB raw, refused. Expected: the bound on raw bytes
    only cuts what is not an answer (endless padding), e.g. a multiple of ``limit``."""
    limit = 256 * 1024
    models = [{"id": f"org/model-{i:06d}-{(i * 7919) % 100003:x}", "object": "model"}
              for i in range(4000)]
    payload = json.dumps({"object": "list", "data": models}).encode()
    payload = payload[:-2] + b" " * (240 * 1024 - len(payload)) + payload[-2:]
    assert len(payload) < limit
    gz = zlib.compressobj(6, zlib.DEFLATED, 31)
    body = b"".join(gz.compress(payload[i:i + 8]) + gz.flush(zlib.Z_SYNC_FLUSH)
                    for i in range(0, len(payload), 8)) + gz.flush()
    assert len(body) > limit + limit // 64 + 1024  # the premise: 275 KB raw
    assert zlib.decompress(body, 31) == payload  # a valid gzip body

    async def respond(stream: trio.SocketStream) -> None:
        await stream.send_all(GZIP_JSON_HEAD + b"".join(chunk(body[i:i + 16384])
                                                   for i in range(0, len(body), 16384)) + END)

    got, error, _ = await small_raw(respond, limit=limit)
    assert error is None, error
    assert got == payload


# --------------------------------------------------------------------------------------------
# 3. A tool call's name that *changes* back and forth is still progress without end.

async def test_alternating_tool_call_names_are_not_progress() -> None:
    """Defect (low, left by the fix): the fix (openai_compat.py:231-234) makes a name equal
    to the one kept no progress, but a name that alternates (``f``, ``g``, ``f``, ...) is
    "new" at each event: it replaces the kept one (the answer gains nothing, nothing bounds it:
    MAX_ARGUMENTS counts arguments only) and renews the gap deadline each time. An upstream
    stuck in such a loop holds the call (and its limiter slot) to the call budget, as the
    repeated name did before the fix. Expected: ``ChunkGapTimeout`` after the gap budget
    (a name is progress only once per call, or only while the call has no name). Measured:
    ``CallTimeout`` after the call budget."""
    budgets = Budgets(connect=3.0, first_chunk=5.0, gap=0.5, call=3.0)

    def named(name: str) -> bytes:
        return delta(tool_calls=[{"index": 0, "function": {"name": name}}])

    async def respond(stream: trio.SocketStream) -> None:
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunk(delta(content="ok")) + chunk(delta(
                tool_calls=[{"index": 0, "id": "c1", "type": "function",
                             "function": {"name": "f"}}])))
        names = ("g", "f")
        i = 0
        while True:
            await trio.sleep(0.1)
            await stream.send_all(chunk(named(names[i % 2])))
            i += 1

    start = trio.current_time()
    out = await call_raw(respond, budgets=budgets)
    took = trio.current_time() - start
    assert isinstance(out.error, ChunkGapTimeout), (took, out)
    assert took < 2.5, (took, out)
