"""The load client: raw trio sockets, a minimal HTTP/1.1 writer, and a reader that parses nothing.

It shares two cores with the service and the simulator, so it does the least a measurement needs:
one connection per stream (``Connection: close``), the status code from the first line, the
arrival time of every receive that holds a token *marker* (a byte string counted with
``bytes.count``; no SSE or JSON parsing), and the end of the chunked body (its ``0\\r\\n\\r\\n``
terminator, or EOF). All times are ``time.perf_counter()``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import trio

__all__ = ["StreamResult", "Target", "get_json", "get_text", "post_json", "run_stream"]

_TERMINATOR = b"\r\n0\r\n\r\n"


@dataclass(frozen=True, slots=True)
class Target:
    """Where a stream goes and how its tokens look on the wire."""

    name: str  # "direct", "openai", "native"
    host: str
    port: int
    path: str
    marker: bytes  # occurs once per token in the body, nowhere else

    def request(self, body: dict[str, Any]) -> bytes:
        data = json.dumps(body).encode()
        head = (f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n")
        return head.encode() + data


@dataclass(slots=True)
class StreamResult:
    target: str
    tag: str = ""
    status: int = 0
    sent_at: float = 0.0  # request written (after the connection was open)
    first_token_at: float | None = None
    arrivals: list[float] = field(default_factory=list)  # one entry per receive with tokens
    counts: list[int] = field(default_factory=list)  # tokens in each of those receives
    tokens: int = 0
    bytes: int = 0
    complete: bool = False  # the chunked terminator arrived
    closed_at: float | None = None  # we closed it early (cancellation)
    error: str | None = None
    settled: trio.Event = field(default_factory=trio.Event)  # first token, or the end

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200 and (
            self.complete or self.closed_at is not None)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.sent_at

    def gaps(self, since: float = 0.0, until: float = float("inf")) -> list[float]:
        """Gaps between consecutive token arrivals, for arrivals in [since, until)."""
        out = []
        a = self.arrivals
        for i in range(1, len(a)):
            if since <= a[i] < until:
                out.append(a[i] - a[i - 1])
        return out


async def run_stream(
    target: Target,
    body: dict[str, Any],
    *,
    record: bool = True,
    close_at: float | None = None,
    result: StreamResult | None = None,
) -> StreamResult:
    """One streamed request to the end (or until ``close_at``, a perf_counter time).

    Never raises for network trouble: the error lands in ``result.error``. ``record=False`` only
    counts tokens (flood). ``result`` may be passed in to watch a live stream from outside.
    """
    res = result or StreamResult(target.name)
    marker = target.marker
    keep = max(len(marker) - 1, len(_TERMINATOR))
    try:
        stream = await trio.open_tcp_stream(target.host, target.port)
    except OSError as exc:
        res.error = f"connect: {exc}"
        res.settled.set()
        return res
    try:
        deadline = trio.current_time() + (close_at - time.perf_counter()) if close_at else None
        with trio.CancelScope(deadline=deadline if deadline is not None else float("inf")):
            await _exchange(stream, target.request(body), res, marker, keep, record)
        if close_at is not None and not res.complete and res.error is None:
            res.closed_at = time.perf_counter()
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    finally:
        stream.socket.close()  # a plain close (FIN), as a client that goes away sends
        res.settled.set()
    return res


async def _exchange(stream: trio.SocketStream, request: bytes, res: StreamResult,
                    marker: bytes, keep: int, record: bool) -> None:
    res.sent_at = time.perf_counter()
    await stream.send_all(request)
    head = b""
    tail = b""
    while True:
        data = await stream.receive_some(65536)
        now = time.perf_counter()
        if not data:
            if not res.complete:
                res.error = res.error or "EOF before the end of the body"
            return
        res.bytes += len(data)
        if not res.status:
            head += data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                continue
            try:
                res.status = int(head[9:12])
            except ValueError:
                res.error = "malformed status line"
                return
            if res.status != 200:
                res.error = f"HTTP {res.status}"
                return
            data = head[end + 4:]
            tail = b"\r\n"  # so an empty body's terminator still matches
        window = tail + data
        n = window.count(marker) - tail.count(marker)
        if n:
            if res.first_token_at is None:
                res.first_token_at = now
                res.settled.set()
            res.tokens += n
            if record:
                res.arrivals.append(now)
                res.counts.append(n)
        if window.endswith(_TERMINATOR):
            res.complete = True
            return
        tail = window[-keep:]


async def _simple(host: str, port: int, method: str, path: str, body: bytes | None,
                  *, text: bool = False) -> Any:
    stream = await trio.open_tcp_stream(host, port)
    try:
        head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        await stream.send_all(head.encode() + b"\r\n" + (body or b""))
        raw = b""
        while not _whole(raw):
            data = await stream.receive_some(1 << 20)
            if not data:
                break
            raw += data
    finally:
        stream.socket.close()
    head_bytes, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head_bytes[9:12])
    if b"transfer-encoding: chunked" in head_bytes.lower():
        payload = _dechunk(payload)
    if text:
        return status, payload.decode()
    return status, json.loads(payload) if payload.strip() else None


def _whole(raw: bytes) -> bool:
    """A whole response (Content-Length or chunked): servers may wait for us to close first."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        return body.endswith(b"0\r\n\r\n")
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2:]
    return bytes(out)


async def get_text(host: str, port: int, path: str) -> tuple[int, str]:
    return await _simple(host, port, "GET", path, None, text=True)  # type: ignore[no-any-return]


async def get_json(host: str, port: int, path: str) -> tuple[int, Any]:
    return await _simple(host, port, "GET", path, None)  # type: ignore[no-any-return]


async def post_json(host: str, port: int, path: str, obj: Any) -> tuple[int, Any]:
    return await _simple(host, port, "POST", path, json.dumps(obj).encode())  # type: ignore[no-any-return]
