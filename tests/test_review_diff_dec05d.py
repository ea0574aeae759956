"""Review of 6a5143b..dddca91 (lease lapse refused at admission; upstream identity streams read
with ``aiter_raw``). A real upstream on a loopback socket (raw HTTP/1.1 written here, so the
test controls every header and byte), the service's own adapter and httpx client.

Finding: the diff keeps ``aiter_bytes`` for an encoded stream (its new test asserts a gzip
stream "is decoded", its comment saying the stream "was asked for identity"). It was not:
a streamed call goes out with httpx's default ``Accept-Encoding: gzip, deflate``, and an
encoded body is inflated by httpx one whole network chunk at a time, before any bound of the
service's (the SSE parser's 4 MB line bound sees the chunk only once it is inflated). A 64 KB
read of gzip becomes one 64 MB block; a 1 MB one, a gigabyte. The same was found and fixed for
small answers (``request_small``: asks for identity, inflates itself within the bound,
tests/backends/test_misbehaving_upstreams.py::test_a_compressed_small_answer_is_inflated_within_the_bound),
not for streams."""

from __future__ import annotations

import gzip
import tracemalloc

import trio

from service.backends.http import make_client
from service.backends.openai_compat import OpenAICompatBackend
from service.backends.stream_parsers import DEFAULT_MAX_LINE
from service.errors import BackendError

from .backend_helpers import BUDGETS, req
from .raw_upstream import END, GZIP_SSE_HEAD, chunk, serve_raw

BOMB = 64 * 1024 * 1024  # inflated size of the body (about 64 KB of gzip)
GUARD = 30


async def _stream_through_the_adapter(body: bytes) -> tuple[int, list[dict[str, str]], str]:
    """Peak traced memory while the service's adapter reads ``body`` (gzip) from a real
    upstream socket; the headers the upstream saw; how the call ended."""
    seen: list[dict[str, str]] = []
    ended = "ok"
    async with trio.open_nursery() as nursery:
        async def respond(stream: trio.SocketStream) -> None:
            # One chunk: the client reads it as the socket gives it, 64 KB at most a read.
            await stream.send_all(GZIP_SSE_HEAD + chunk(body) + END)

        port = await nursery.start(serve_raw, respond, seen)
        client = make_client(BUDGETS)
        backend = OpenAICompatBackend("b", f"http://127.0.0.1:{port}", client, BUDGETS)
        tracemalloc.start()
        try:
            with trio.fail_after(GUARD):
                try:
                    async with backend.stream(req()) as chunks:
                        async for _ in chunks:
                            pass
                except BackendError as exc:
                    ended = f"{exc.type}: {exc.message}"
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            await client.aclose()
        nursery.cancel_scope.cancel()
    return peak, seen, ended


async def test_a_gzip_stream_is_not_inflated_past_the_services_bound() -> None:
    """Defect (left by dddca91, which kept ``aiter_bytes`` for an encoded stream and tests
    that a gzip stream "is decoded"): service/backends/http.py:261-264 hands an encoded body
    to httpx's ``aiter_bytes``, which inflates each network read whole; the streamed request
    (service/backends/openai_compat.py:288-290, ollama.py:208-211) asks for
    ``gzip, deflate`` (httpx's default), unlike ``request_small`` (http.py:482), which asks for
    identity and inflates within its bound. The SSE parser's line bound (4 MB,
    stream_parsers.py:28) is checked only after httpx has built the whole inflated block.

    Measured here: 64 KB of gzip on the wire (one line ``data: aaaa...``, 64 MB inflated)
    peaks at ~142 MB traced; the same 64 MB line sent uncompressed peaks at ~5 MB (the parser
    refuses it at 4 MB, LineTooLong). A 1 MB gzip read (a misbehaving or hostile
    upstream, a compressing proxy) would be a gigabyte per read, per call. Expected: the
    memory held stays within the service's own bounds (a few times the 4 MB line bound),
    whatever the upstream's encoding: ask for identity, and inflate an encoded stream
    ourselves, capped (as ``request_small`` does), or refuse it."""
    body = gzip.compress(b"data: " + b"a" * BOMB, compresslevel=9)
    assert len(body) < 256 * 1024
    peak, seen, ended = await _stream_through_the_adapter(body)
    asked = [h.get("accept-encoding") for h in seen]
    assert ended != "ok", ended  # a 64 MB line is refused either way (LineTooLong)
    assert peak < 4 * DEFAULT_MAX_LINE, (
        f"reading {len(body)} bytes of gzip held {peak / 2**20:.0f} MB at once (the request "
        f"asked for Accept-Encoding {asked}); ended: {ended}")


async def test_a_streamed_call_asks_for_no_compression() -> None:
    """The premise of dddca91's test ("it was asked for identity") and of ``request_small``:
    the service asks upstreams for an uncompressed body. A streamed chat call does not
    (service/backends/openai_compat.py:288-290: httpx's default ``gzip, deflate``), so a
    compressing server or proxy is invited to send what the defect above inflates unbounded."""
    body = gzip.compress(b'data: {"choices":[{"index":0,"delta":{"content":"hi"},'
                         b'"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')
    _, seen, ended = await _stream_through_the_adapter(body)
    assert ended == "ok", ended
    assert [h.get("accept-encoding") for h in seen] == ["identity"], seen
