"""A raw HTTP/1.1 upstream on a loopback socket (every header and byte written by the test), read
through the service's own client and adapters: the review tests of upstream bounds share it."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from service.backends.base import ChatChunk
from service.backends.http import MAX_SMALL_BODY, Budgets, make_client, request_small
from service.backends.interceptor import Interceptor
from service.backends.ollama import OllamaBackend
from service.backends.openai_compat import OpenAICompatBackend
from service.metrics import Metrics

from .backend_helpers import BUDGETS, req

GUARD = 20  # seconds: no call here may run longer

Respond = Callable[[trio.SocketStream], Awaitable[None]]

SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
GZIP_SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                 b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n")
NDJSON_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")
GZIP_JSON_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                  b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n")
END = b"0\r\n\r\n"


def chunk(data: bytes) -> bytes:
    assert data, "an empty chunk would end the body"
    return b"%x\r\n%s\r\n" % (len(data), data)


def sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def delta(**fields: object) -> bytes:
    return sse({"choices": [{"index": 0, "delta": fields}]})


FINISH = (sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
          + b"data: [DONE]\n\n")


async def read_request(stream: trio.SocketStream) -> tuple[str, dict[str, str]] | None:
    """One request, its body read: its path (without the query) and its headers (lower-cased);
    None if the client closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        got = await stream.receive_some(65536)
        if not got:
            return None
        data += got
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (
        line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        got = await stream.receive_some(65536)
        if not got:
            return None
        rest += got
    return lines[0].split(" ")[1].split("?")[0], headers


async def serve_raw(respond: Respond, seen: list[dict[str, str]] | None = None,  # noqa: ASYNC114
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """A server that reads each request (its headers, lower-cased, appended to ``seen``) and
    answers it with ``respond``."""

    async def handle(stream: trio.SocketStream) -> None:
        request = await read_request(stream)
        if request is None:
            return
        if seen is not None:
            seen.append(request[1])
        try:
            await respond(stream)
            with trio.move_on_after(5):
                await stream.receive_some(1)  # until the client closes
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


def json_response(status: str, body: bytes) -> bytes:
    return (b"HTTP/1.1 %s\r\nContent-Type: application/json; charset=utf-8\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (status.encode(), len(body), body))


NOT_FOUND = json_response("404 Not Found", b'{"error":{"code":404,"message":"File Not Found",'
                                           b'"type":"not_found_error"}}')


async def serve_routes(routes: dict[str, bytes], *,  # noqa: ASYNC114
                       task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """A server answering each request by its path (raw bytes; 404 JSON for other paths), one
    request per connection (each answer closes it)."""

    async def handle(stream: trio.SocketStream) -> None:
        try:
            request = await read_request(stream)
            if request is None:
                return
            answer = routes.get(request[0]) or NOT_FOUND
            answer = answer.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
            await stream.send_all(answer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


class Outcome:
    def __init__(self) -> None:
        self.chunks: list[ChatChunk] = []
        self.text_chars = 0
        self.error: BaseException | None = None
        self.peak = 0  # bytes traced at most, when measured

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.chunks)

    def __repr__(self) -> str:
        return (f"<Outcome chunks={len(self.chunks)} text_chars={self.text_chars} "
                f"error={self.error!r:.300} peak={self.peak / 2**20:.1f} MB>")


async def call_raw(respond: Respond, *, protocol: str = "openai", budgets: Budgets = BUDGETS,
                measure: bool = False, keep: bool = True,
                stop_after_chars: int | None = None, intercepted: bool = False) -> Outcome:
    """One streamed chat call through the service's adapter to a loopback upstream. Any
    exception of the call is kept in ``error`` (the tests assert its type)."""
    out = Outcome()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_raw, respond)
        client = make_client(budgets)
        cls = OllamaBackend if protocol == "ollama" else OpenAICompatBackend
        backend: Any = cls("up", f"http://127.0.0.1:{port}", client, budgets)
        if intercepted:  # as every call of a run goes (its records, its bounds)
            backend = Interceptor(backend, None, Metrics())
        if measure:
            tracemalloc.start()
        try:
            with trio.fail_after(GUARD):
                try:
                    async with backend.stream(req()) as chunks:
                        async for c in chunks:
                            out.text_chars += len(c.text)
                            if keep:
                                out.chunks.append(c)
                            if stop_after_chars is not None and out.text_chars > stop_after_chars:
                                break
                except Exception as exc:  # the test asserts what it was
                    out.error = exc
            if measure:
                out.peak = tracemalloc.get_traced_memory()[1]
        finally:
            if measure:
                tracemalloc.stop()
            await client.aclose()
        nursery.cancel_scope.cancel()
    return out


async def small_raw(respond: Respond, limit: int = MAX_SMALL_BODY, read_for: float = 10.0
                    ) -> tuple[bytes | None, BaseException | None, float]:
    """``request_small`` (with ``limit``) against a raw server: (body, error, seconds taken);
    still reading after ``read_for`` s is a TimeoutError."""
    body: bytes | None = None
    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_raw, respond)
        client = make_client(Budgets(connect=3.0, first_chunk=10.0, gap=5.0, call=30.0))
        start = trio.current_time()
        try:
            with trio.move_on_after(read_for) as cut:
                try:
                    response = await request_small(
                        client, "GET", f"http://127.0.0.1:{port}/v1/models", limit=limit)
                    body = response.content
                except Exception as exc:  # the test asserts what it was
                    error = exc
            if cut.cancelled_caught:
                error = TimeoutError(f"still reading after {read_for} s")
        finally:
            took = trio.current_time() - start
            await client.aclose()
        nursery.cancel_scope.cancel()
    return body, error, took
