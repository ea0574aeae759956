"""Shared HTTP plumbing of the adapters: one client, time budgets, error mapping, timed reads.

Time budgets are enforced here with trio scopes, not with httpx's read timeout (which is off):

* ``connect``: TCP connect (httpx's connect timeout) and waiting for a pooled connection.
* ``first_chunk``: from sending the request to the first upstream message (headers included:
  Ollama sends its headers only once the model is loaded).
* ``gap``: from asking for the next message to getting it. A keep-alive comment is not progress:
  the deadline is fixed when the wait starts and comments do not move it; nor is a message that
  carries nothing (an empty or role-only delta): the adapters keep one deadline until a chunk.
* ``call``: the whole call, from sending the request to the end of the stream.

Every httpx exception is mapped once, here, to a :mod:`service.errors` type (``raise X from exc``).
Reads are class-based (no ``yield`` inside a cancel scope): each awaited read opens and closes its
own scope.
"""

from __future__ import annotations

import ssl
import zlib
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from typing import Any

import httpx
import trio

from ..errors import (
    BackendError,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
    CallTimeout,
    ChunkGapTimeout,
    ConnectTimeout,
    FirstChunkTimeout,
    UpstreamBroken,
)
from .clients import ShardedClient, make_client, make_sharded_client  # re-exported
from .h11transport import MalformedResponse
from .inflate import ENCODINGS, Inflater
from .stream_parsers import LineTooLong, NDJSONSplitter, SSEComment, SSEEvent, SSEParser
from .upstream_errors import (  # re-exported: the adapters' one place for their HTTP layer
    context_numbers,
    error_from_status,
    error_kind,
    loads_json,
    retry_after_seconds,
)

__all__ = [
    "BackendTLSError",
    "Budgets",
    "NDJSONReader",
    "SSEReader",
    "ShardedClient",
    "TimedResponse",
    "context_numbers",
    "error_from_status",
    "error_kind",
    "httpx_error",
    "loads_json",
    "make_client",
    "make_sharded_client",
    "map_httpx_errors",
    "open_stream",
    "request_json",
    "request_small",
    "retry_after_seconds",
    "tls_reason",
]

MAX_ERROR_BODY = 64 * 1024


@dataclass(frozen=True, slots=True)
class Budgets:
    """Seconds allowed for each phase of one streamed call (see the module docstring)."""

    connect: float = 10.0
    first_chunk: float = 60.0
    gap: float = 60.0
    call: float = 600.0
    tool_call: float = 180.0  # a chunk's wait where the server withholds a tool call's writing
    why: str = ""  # said after a first-chunk or gap timeout: the setting that bounded it

    @classmethod
    def from_idle(cls, idle: float, *, connect: float = 10.0, call: float = 600.0,
                  tool_call: float = 180.0) -> Budgets:
        """``SERVICE_LLM_IDLE_TIMEOUT`` bounds both the first chunk and each gap."""
        return cls(connect=connect, first_chunk=idle, gap=idle, call=call, tool_call=tool_call)

    def withholding_tool_calls(self) -> Budgets:
        """For a server that sends a tool call only once the model has written all of it
        (Ollama): silent meanwhile, for as long as the model takes, so the first chunk and
        each gap wait up to ``tool_call`` (``SERVICE_LLM_TOOL_CALL_TIMEOUT``) when that is
        longer; the call's bound is unchanged."""
        if self.tool_call <= max(self.first_chunk, self.gap):
            return self
        return replace(self, first_chunk=self.tool_call, gap=self.tool_call,
                       why=" (tools offered to a server that sends a tool call only once "
                           "written: SERVICE_LLM_TOOL_CALL_TIMEOUT)")


class BackendTLSError(BackendError):
    """The TLS handshake with the backend failed: its certificate is not trusted (no or the
    wrong CA bundle), its name does not match, or it refused our client certificate. Not worth
    a retry on the same server until its configuration changes."""

    status = 502
    type = "backend_tls_error"


def tls_reason(exc: BaseException) -> str | None:
    """What went wrong in a TLS handshake, if ``exc`` (or its causes) is one's failure."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {seen.verify_message}"
        if isinstance(seen, ssl.SSLError):
            return seen.reason or str(seen)
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    return text if "SSL" in text or "CERTIFICATE" in text.upper() else None


def _has_request(exc: httpx.HTTPError) -> bool:
    try:
        exc.request  # noqa: B018 (raises RuntimeError when the exception has none)
    except RuntimeError:
        return False
    return True


def httpx_error(exc: httpx.HTTPError, backend: str, url: str = "") -> BackendError:
    """The service's error for one of httpx's (the caller raises it ``from exc``)."""
    where = f" ({url})" if url else ""
    if isinstance(exc, httpx.TransportError) and (reason := tls_reason(exc)) is not None:
        return BackendTLSError(f"TLS handshake failed{where}: {reason} (is its CA in the "
                               "backend's CA bundle? is its client certificate accepted?)",
                               backend=backend)
    if isinstance(exc, httpx.ConnectTimeout):
        if str(exc.request.url if _has_request(exc) else url).startswith("https:"):
            return ConnectTimeout(f"connect or TLS handshake timed out{where}", backend=backend)
        return ConnectTimeout(f"connect timed out{where}", backend=backend)
    if isinstance(exc, httpx.PoolTimeout):
        return ConnectTimeout(f"no free connection in the pool{where}", backend=backend)
    if isinstance(exc, httpx.TimeoutException):
        return BackendTimeout(f"{type(exc).__name__}{where}", backend=backend)
    if isinstance(exc, httpx.ConnectError):
        return BackendUnavailable(f"cannot connect{where}: {exc}", backend=backend)
    if isinstance(exc, MalformedResponse):
        return BackendProtocolError(f"malformed response{where}: {exc}", backend=backend)
    if isinstance(exc, httpx.RemoteProtocolError):
        # Mostly "peer closed connection without sending complete message body": it went away.
        return BackendUnavailable(f"connection lost{where}: {exc}", backend=backend)
    if isinstance(exc, httpx.TransportError):  # ReadError, WriteError, ...
        return BackendUnavailable(f"{type(exc).__name__}{where}: {exc}", backend=backend)
    if isinstance(exc, httpx.DecodingError):
        return BackendProtocolError(f"undecodable body{where}: {exc}", backend=backend)
    return BackendProtocolError(f"{type(exc).__name__}{where}: {exc}", backend=backend)


@contextmanager
def map_httpx_errors(backend: str, url: str = "") -> Iterator[None]:
    """Translate httpx's exceptions into the service's tree, keeping the cause."""
    try:
        yield
    except httpx.HTTPError as exc:
        raise httpx_error(exc, backend, url) from exc


def _timeout_error(kind: str, budget: float, backend: str, why: str = "") -> BackendTimeout:
    if kind == "call":
        return CallTimeout(f"call exceeded {budget:g}s", backend=backend)
    if kind == "first":
        return FirstChunkTimeout(f"no first chunk within {budget:g}s{why}", backend=backend)
    return ChunkGapTimeout(f"no chunk for {budget:g}s{why}", backend=backend)


class TimedResponse:
    """An open streamed response whose reads are bounded by the budgets.

    ``read(first=...)`` returns the next bytes or ``b""`` at the end of the body. The deadline of
    a wait is given by the caller (a reader fixes it once per message, see :class:`SSEReader`).
    """

    def __init__(
        self, response: httpx.Response, budgets: Budgets, started: float, backend: str
    ) -> None:
        self.response = response
        self.budgets = budgets
        self.started = started
        self.backend = backend
        self.got_first = False  # set by the reader when the first message arrives
        # The body is read raw: one generator fewer per chunk than ``aiter_bytes``, and an
        # encoded one (the request asked for identity, but a server or proxy may compress
        # anyway) is inflated here, ``INFLATED_READ`` bytes at a time (``Inflater``: httpx
        # inflates a whole network read at once, 64 KB of gzip: 64 MB).
        # (A body already read, a test transport's, is served decoded by ``aiter_bytes``.)
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        self._inflater: Inflater | None = None
        if response.is_stream_consumed:
            self._raw = response.aiter_bytes()
        else:
            self._raw = response.aiter_raw()
            if encoding in ENCODINGS:
                self._inflater = Inflater(encoding)
            elif encoding not in ("", "identity"):
                raise BackendProtocolError(
                    f"the stream came with content-encoding {encoding[:40]!r}, which this "
                    f"service does not read (it asks for identity)", backend=backend)
        self._call_deadline = started + budgets.call

    def __repr__(self) -> str:
        return (
            f"<TimedResponse {self.backend} status={self.response.status_code} "
            f"got_first={self.got_first} closed={self.response.is_closed}>"
        )

    def next_deadline(self) -> tuple[float, str, float]:
        """The deadline for the next message, which budget it is, and that budget's length."""
        if self.got_first:
            deadline, kind, budget = trio.current_time() + self.budgets.gap, "gap", self.budgets.gap
        else:
            deadline = self.started + self.budgets.first_chunk
            kind, budget = "first", self.budgets.first_chunk
        if self._call_deadline <= deadline:
            return self._call_deadline, "call", self.budgets.call
        return deadline, kind, budget

    async def read(self, deadline: tuple[float, str, float]) -> bytes:
        at, kind, budget = deadline
        # Per chunk: a plain try rather than map_httpx_errors (a generator per read).
        with trio.move_on_at(at) as scope:
            try:
                if self._inflater is None:
                    return await self._raw.__anext__()
                return await self._read_inflated()
            except StopAsyncIteration:
                return b""
            except zlib.error as exc:
                raise BackendProtocolError(f"the stream's compressed body is corrupt: {exc}",
                                           backend=self.backend) from exc
            except httpx.TransportError as exc:
                if isinstance(exc, (httpx.TimeoutException, MalformedResponse)):
                    raise httpx_error(exc, self.backend) from exc
                # The status and headers came: the backend answered, then the connection
                # broke (it died, or a proxy cut it). Not "unreachable" (503): a bad answer.
                raise UpstreamBroken(f"connection lost mid-answer: {type(exc).__name__}: "
                                     f"{exc}", backend=self.backend) from exc
            except httpx.HTTPError as exc:
                raise httpx_error(exc, self.backend) from exc
        if scope.cancelled_caught:
            raise _timeout_error(kind, budget, self.backend, self.budgets.why)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _read_inflated(self) -> bytes:
        """The next inflated bytes (at most ``INFLATED_READ``); raises StopAsyncIteration at
        the end of the body."""
        assert self._inflater is not None
        while not (data := self._inflater.inflate(INFLATED_READ)):
            self._inflater.take(await self._raw.__anext__())
        return data

    async def aclose(self) -> None:
        await self.response.aclose()


INFLATED_READ = 64 * 1024  # bytes of a compressed stream inflated at a time

DRAIN_SECONDS = 1.0  # after the last message, how long the rest of the body may take
DRAIN_BYTES = 64 * 1024  # ... and how much of it is read


async def _drain(timed: TimedResponse) -> None:
    """After the last message: read the rest (the chunked terminator) so the connection can go
    back to the pool. Briefly: the answer is whole, so a body that does not end soon (a proxy
    or server that keeps it open, or keeps sending) is not waited for; its connection is then
    closed instead of reused. A failure here is ignored."""
    deadline, kind, budget = timed.next_deadline()
    at = min(deadline, trio.current_time() + DRAIN_SECONDS)
    read = 0
    try:
        while read <= DRAIN_BYTES and (data := await timed.read((at, kind, budget))):
            read += len(data)
    except BackendError:
        pass


class NDJSONReader:
    """Next JSON object of an NDJSON body, under the budgets."""

    def __init__(self, timed: TimedResponse) -> None:
        self.timed = timed
        self._splitter = NDJSONSplitter()
        self._lines: deque[bytes] = deque()
        self._eof = False

    async def drain(self) -> None:
        if not self._eof:
            self._eof = True
            await _drain(self.timed)

    async def next(self, deadline: tuple[float, str, float] | None = None
                   ) -> dict[str, Any] | None:
        """The next object, or None at the end of the body. ``deadline``: one fixed by the
        caller for several reads (objects that carry nothing are not progress either)."""
        # A cancelled consumer stops here, not after the lines already buffered.
        await trio.lowlevel.checkpoint_if_cancelled()
        deadline = deadline or self.timed.next_deadline()
        while not self._lines:
            if self._eof:
                return None
            data = await self.timed.read(deadline)
            try:
                if data:
                    self._lines.extend(self._splitter.feed(data))
                else:
                    self._eof = True
                    last = self._splitter.flush()
                    if last is not None:
                        self._lines.append(last)
            except LineTooLong as exc:
                raise BackendProtocolError(str(exc), backend=self.timed.backend) from exc
        line = self._lines.popleft()
        self.timed.got_first = True
        try:
            obj = loads_json(line)
        except ValueError as exc:
            raise BackendProtocolError(
                f"malformed NDJSON line: {line[:200]!r}", backend=self.timed.backend
            ) from exc
        if not isinstance(obj, dict):
            raise BackendProtocolError(
                f"NDJSON line is not an object: {line[:200]!r}", backend=self.timed.backend
            )
        return obj


class SSEReader:
    """Next SSE event of a body, under the budgets. Comments are counted, never progress."""

    def __init__(self, timed: TimedResponse) -> None:
        self.timed = timed
        self.keepalives = 0
        self._parser = SSEParser()
        self._items: deque[SSEEvent | SSEComment] = deque()
        self._eof = False

    async def drain(self) -> None:
        if not self._eof:
            self._eof = True
            await _drain(self.timed)

    async def next(self, deadline: tuple[float, str, float] | None = None) -> SSEEvent | None:
        """The next event, or None at the end of the body. ``deadline``: one fixed by the
        caller for several reads (events that carry nothing are not progress either)."""
        await trio.lowlevel.checkpoint_if_cancelled()  # stop at once, not after the buffer
        # Fixed for this wait: comments do not move it.
        deadline = deadline or self.timed.next_deadline()
        while True:
            while self._items:
                item = self._items.popleft()
                if isinstance(item, SSEComment):
                    self.keepalives += 1
                    continue
                self.timed.got_first = True
                return item
            if self._eof:
                return None
            data = await self.timed.read(deadline)
            if not data:
                self._eof = True
                continue
            try:
                self._items.extend(self._parser.feed(data))
            except LineTooLong as exc:
                raise BackendProtocolError(str(exc), backend=self.timed.backend) from exc


@asynccontextmanager
async def open_stream(
    client: httpx.AsyncClient,
    request: httpx.Request,
    budgets: Budgets,
    *,
    backend: str,
    model: str | None = None,
) -> AsyncIterator[TimedResponse]:
    """Send ``request``, check its status, and hold the streamed response for the block.

    The first-chunk and call budgets bound the wait for the headers. An error status is read
    (bounded) and raised as the mapped error before the block is entered. Leaving the block in any
    way closes the response (and the connection, if the body was not read to its end).
    """
    started = trio.current_time()
    first_at = started + budgets.first_chunk
    call_at = started + budgets.call
    kind, budget = ("call", budgets.call) if call_at <= first_at else ("first", budgets.first_chunk)
    response: httpx.Response | None = None
    where = str(request.url)
    # No compression: an LLM's stream gains little from it, and an encoded one is inflated
    # here, bounded (``TimedResponse``), rather than by httpx, unbounded.
    request.headers["Accept-Encoding"] = "identity"
    with trio.move_on_at(min(first_at, call_at)) as scope, map_httpx_errors(backend, where):
        response = await client.send(request, stream=True)
    if scope.cancelled_caught or response is None:
        raise _timeout_error(kind, budget, backend, budgets.why)
    try:
        timed = TimedResponse(response, budgets, started, backend)
        if response.status_code >= 400:
            body = await _read_bounded(timed)
            raise error_from_status(response.status_code, body, backend=backend, model=model,
                                    headers=response.headers)
        yield timed
    finally:
        await response.aclose()  # httpcore shields its own close; cancellation cannot leak it


async def _read_bounded(timed: TimedResponse) -> bytes:
    body = bytearray()
    deadline = timed.next_deadline()
    while len(body) < MAX_ERROR_BODY:
        data = await timed.read(deadline)
        if not data:
            break
        body += data
    return bytes(body[:MAX_ERROR_BODY])


MAX_SMALL_BODY = 8 * 1024 * 1024  # a model list, a health answer: far below this


class BodyTooLarge(Exception):
    """A response that should be small was larger than ``MAX_SMALL_BODY`` (or could not be
    read: an unknown or corrupt content-encoding)."""


async def request_small(
    client: httpx.AsyncClient, method: str, url: str, *, json_body: Any = None,
    headers: dict[str, str] | None = None, limit: int = MAX_SMALL_BODY,
) -> httpx.Response:
    """A non-streamed request whose body is read up to ``limit`` bytes (``BodyTooLarge`` past
    it): an upstream answering a model list or a health probe with an endless body must not
    grow memory without end. Asks for no compression; a gzip/deflate answer anyway is inflated
    here with the same bound (httpx would inflate a whole chunk, or nested layers, unbounded).
    Returns a complete, closed response."""
    sent = {"Accept-Encoding": "identity", **(headers or {})}
    async with client.stream(method, url, json=json_body, headers=sent) as response:
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("identity", "") and encoding not in ENCODINGS:
            raise BodyTooLarge(f"{method} {url}: unsupported content-encoding {encoding!r}")
        inflater = Inflater(encoding) if encoding in ENCODINGS else None
        body = bytearray()
        # An in-memory response (a test transport's) arrives already read, and decoded.
        raw = _whole(response.content) if response.is_stream_consumed else response.aiter_raw()
        if response.is_stream_consumed:
            inflater = None
        # Bytes read as sent: compressed, a body is seldom larger than what it holds (an
        # encoder flushing every few bytes: ~1.2 x), so past four times ``limit`` of them it is
        # padding or garbage sent without end.
        taken, raw_limit = 0, 4 * limit + 65536
        async for chunk in raw:
            taken += len(chunk)
            if taken > raw_limit:
                raise BodyTooLarge(f"{method} {url}: response larger than {limit} bytes")
            if inflater is None:
                body += chunk
            else:
                inflater.take(chunk)
                try:
                    while piece := inflater.inflate(limit + 1 - len(body)):
                        body += piece
                        if len(body) > limit:
                            break
                except zlib.error as exc:
                    raise BodyTooLarge(f"{method} {url}: the compressed body is corrupt: "
                                       f"{exc}") from exc
            if len(body) > limit:
                raise BodyTooLarge(f"{method} {url}: response larger than {limit} bytes")
    kept = [(k, v) for k, v in response.headers.multi_items()
            if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
    return httpx.Response(response.status_code, headers=kept, content=bytes(body),
                          request=response.request)


async def _whole(content: bytes) -> AsyncIterator[bytes]:
    yield content


async def request_json(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    backend: str,
    deadline: float,
    json_body: Any = None,
    model: str | None = None,
    headers: dict[str, str] | None = None,
) -> Any:
    """One small non-streamed request under an absolute trio deadline; returns the parsed body."""
    with trio.move_on_at(deadline) as scope, map_httpx_errors(backend, url):
        try:
            response = await request_small(client, method, url, json_body=json_body,
                                           headers=headers)
        except BodyTooLarge as exc:
            raise BackendProtocolError(str(exc), backend=backend) from exc
    if scope.cancelled_caught:
        raise CallTimeout(f"{method} {url} timed out", backend=backend)
    if response.status_code >= 400:
        raise error_from_status(
            response.status_code, response.content, backend=backend, model=model,
            headers=response.headers,
        )
    try:
        return loads_json(response.content)
    except ValueError as exc:
        raise BackendProtocolError(f"{method} {url}: body is not JSON", backend=backend) from exc
