"""Interceptor: wraps any Backend, limits its concurrency, and records every call.

For each ``stream``/``chat`` call it writes one :class:`LLMCallRecord` through an injected
recorder (the store implements :class:`LLMCallRecorder`) and updates the Prometheus metrics.
Outcomes: ``ok`` (the stream reached its done chunk), ``timed_out`` (a budget ran out),
``cancelled`` (the caller was cancelled, or left the stream before its end), ``error`` (anything
else). A call cut short still records the tokens seen so far, marked estimated.

The record is written under ``trio.move_on_after(record_timeout, shield=True)``: a cancelled
call must still leave its row, and a stuck store must not hold the caller forever (the
service's recorder, ``service.runs.call_records``, keeps a record it could not write in time
and writes it later).

A call that finds every slot taken waits in the limiter's queue (first come, first served), at
most ``queue_timeout`` seconds; past it the call fails with :class:`BackendBusy` (503 with
Retry-After: a burst is told to come back, not held in a silent, unbounded queue). While it
waits, its request's ``on_queued`` is told its place (1: next), at once and then every
``queue_report_every`` seconds if it moved, so the run can show it.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Protocol

import trio

from ..errors import BackendBusy, BackendProtocolError, BackendTimeout, ContextLengthExceeded
from ..metrics import Metrics
from ..store.records import LLMCallOutcome, LLMCallRecord
from ..text import clean_text
from .base import (
    Backend,
    BackendHealth,
    ChatChunk,
    ChatRequest,
    ChatResult,
    ModelInfo,
    collect_chat,
)

__all__ = ["Interceptor", "LLMCallRecorder", "classify_outcome"]

log = logging.getLogger(__name__)


class LLMCallRecorder(Protocol):
    async def record_llm_call(self, rec: LLMCallRecord) -> None: ...


def _contains(exc: BaseException, kind: type[BaseException]) -> bool:
    if isinstance(exc, kind):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(kind) is not None
    return False


def classify_outcome(exc: BaseException | None, *, finished: bool) -> LLMCallOutcome:
    """The outcome of a call that ended with ``exc`` (None: the block was left normally).
    One that reached its done chunk is ``ok`` whatever ended it after (a cancel or a deadline
    while its body's last bytes were read): its answer came whole, its usage counted."""
    if exc is None or finished:
        return LLMCallOutcome.ok if finished else LLMCallOutcome.cancelled
    if _contains(exc, trio.Cancelled):
        return LLMCallOutcome.cancelled
    if _contains(exc, BackendTimeout):
        return LLMCallOutcome.timed_out
    if isinstance(exc, GeneratorExit):  # the consumer dropped the stream unfinished
        return LLMCallOutcome.cancelled
    return LLMCallOutcome.error


_ERROR_CHARS = 2000  # of a record's error: an exception's text can be anything's


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return _error_text(exc.exceptions[0])
    message = str(getattr(exc, "message", None) or str(exc))[:_ERROR_CHARS]
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


# Characters of text (and thinking) one call may stream: far above any real answer (a model's
# whole context is at most a few million characters), so only an upstream gone wrong (streaming
# without end, fast) reaches it, and it ends there, a protocol error, with what it sent so far
# kept as any cut answer is; before, only the time budgets stopped it (~130 MB/s on loopback).
MAX_CALL_CHARS = 8 * 2**20


class _Call:
    """The measurements of one call while it runs."""

    def __init__(self, backend: str, request: ChatRequest) -> None:
        self.id = uuid.uuid4().hex
        self.backend = backend
        self.model = request.model or ""
        self.run_id = request.run_id
        self.deadline = request.deadline
        self.started_wall = time.time()
        self.queued_at = trio.current_time()
        self.started: float | None = None  # limiter acquired, upstream request begins
        self.first_token_at: float | None = None
        self.chunks = 0  # content chunks seen (the estimate if no usage arrives)
        self.chars = 0  # characters of text and thinking seen (bounded: MAX_CALL_CHARS)
        self.usage_prompt: int | None = None
        self.usage_completion: int | None = None
        self.estimated = False
        self.finished = False

    def __repr__(self) -> str:
        return f"<Call {self.backend} {self.model} chunks={self.chunks} finished={self.finished}>"

    def chosen(self, then: Callable[[str], None] | None) -> Callable[[str], None]:
        """An ``on_model`` that keeps the model the backend chose, then tells ``then``."""
        def told(model: str) -> None:
            if model:
                self.model = model
            if then is not None:
                then(model)
        return told

    def output_began(self) -> None:
        """``ChatRequest.on_output``: the answer's first output, held back by the adapter."""
        if self.first_token_at is None:
            self.first_token_at = trio.current_time()

    def seen(self, chunk: ChatChunk) -> None:
        if chunk.backend:
            self.backend = chunk.backend
        if chunk.model:
            self.model = chunk.model
        if (chunk.text or chunk.thinking or chunk.tool_calls or chunk.done) and (
                self.first_token_at is None):
            self.first_token_at = trio.current_time()
        if chunk.text or chunk.thinking:
            chars = self.chars + len(chunk.text) + len(chunk.thinking)
            if chars > MAX_CALL_CHARS:
                # (Not counted: the run never gets this chunk, and its usage does not count it.)
                raise BackendProtocolError(
                    f"the answer passed {MAX_CALL_CHARS:,} characters: cut there (an upstream "
                    f"streaming without end)", backend=self.backend)
            self.chunks += 1
            self.chars = chars
        if chunk.usage is not None:
            self.usage_prompt = chunk.usage.prompt_tokens
            self.usage_completion = chunk.usage.completion_tokens
            self.estimated = chunk.usage.estimated
        if chunk.done:
            self.finished = True

    def record(self, outcome: LLMCallOutcome, error: str | None) -> LLMCallRecord:
        now = trio.current_time()
        completion, estimated = self.usage_completion, self.estimated
        if completion is None and self.chunks:
            completion, estimated = self.chunks, True
        return LLMCallRecord(
            id=self.id,
            backend=self.backend,
            model=clean_text(self.model),
            outcome=outcome,
            started_at=self.started_wall,
            run_id=self.run_id,
            queue_wait=(self.started if self.started is not None else now) - self.queued_at,
            ttft=(self.first_token_at - self.started)
            if self.first_token_at is not None and self.started is not None else None,
            duration=now - self.started if self.started is not None else None,
            prompt_tokens=self.usage_prompt,
            completion_tokens=completion,
            tokens_estimated=estimated,
            error=clean_text(error) if error else error,
        )


class _Tracked:
    def __init__(self, inner: AsyncIterator[ChatChunk], call: _Call,
                 owner: Interceptor) -> None:
        self._inner = inner
        self._call = call
        self._owner = owner

    def __aiter__(self) -> _Tracked:
        return self

    async def __anext__(self) -> ChatChunk:
        chunk = await self._inner.__anext__()
        self._call.seen(chunk)
        self._owner.last_chunk_at = trio.current_time()
        return chunk


class Interceptor:
    """Same interface as the wrapped backend; adds a concurrency limit, records and metrics."""

    def __init__(
        self,
        inner: Backend,
        recorder: LLMCallRecorder | None,
        metrics: Metrics,
        *,
        limiter: trio.CapacityLimiter | None = None,
        concurrency: int = 64,
        record_timeout: float = 5.0,
        queue_timeout: float = 30.0,
        queue_report_every: float = 5.0,
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.url = inner.url
        self.recorder = recorder
        self.metrics = metrics
        self.limiter = limiter or trio.CapacityLimiter(concurrency)
        self.record_timeout = record_timeout
        self.queue_timeout = queue_timeout
        self.queue_report_every = queue_report_every
        self._waiting: list[object] = []  # calls waiting for a slot, in the limiter's order
        # Told when a call takes or gives back a slot, or joins or leaves the queue (a fleet
        # sets it: its per-server gauges follow at once, with several workers too).
        self.load_changed: Callable[[], None] | None = None
        self.last_chunk_at = -math.inf  # when any call on this backend last got a chunk
        # The adapter's check of a call's room for its answer (OpenAICompatBackend's), if any.
        self._check_room: Callable[[ChatRequest], Awaitable[ChatRequest]] | None = getattr(
            inner, "check_room", None)

    @property
    def open_calls(self) -> int:
        """Calls holding one of its slots now (sent upstream, or about to be)."""
        return int(self.limiter.statistics().borrowed_tokens)

    @property
    def queued_calls(self) -> int:
        """Calls waiting for a slot now (nothing of them sent upstream yet)."""
        return len(self._waiting)

    def __repr__(self) -> str:
        stats = self.limiter.statistics()
        return (
            f"<Interceptor {self.name} [{stats.borrowed_tokens}/{stats.total_tokens} in use, "
            f"{stats.tasks_waiting} waiting]>"
        )

    @asynccontextmanager
    async def stream(self, request: ChatRequest) -> AsyncIterator[AsyncIterator[ChatChunk]]:
        call = _Call(self.name, request)
        if not call.model:
            # No model named: the backend's configured default (``SERVICE_DEFAULT_MODEL``), so
            # a call that fails before its first chunk still says which model it asked for;
            # without one, the adapter tells the model it chose (the first its server lists).
            call.model = getattr(self.inner, "default_model", None) or ""
            request = replace(request, on_model=call.chosen(request.on_model))
        if request.tools:  # (only an answer with tool calls is held back: see on_output)
            request = replace(request, on_output=call.output_began)
        failure: BaseException | None = None
        try:
            if request.refuse_without_room and (check := self._check_room) is not None:
                # Before the call waits for a slot: refused and shortened, it keeps its place
                # in the queue (the check takes none of the server's slots).
                request = await check(request)
            await self._acquire(request)
            try:
                call.started = trio.current_time()
                async with self.inner.stream(request) as chunks:
                    yield _Tracked(aiter(chunks), call, self)
            finally:
                self.limiter.release()
                self._told_load()
        except BaseException as exc:
            failure = exc
            raise
        finally:
            # Shielded and bounded: a cancelled call still leaves its row; a stuck store
            # cannot hold the caller forever.
            with trio.move_on_after(self.record_timeout, shield=True) as scope:
                await self._finish(call, failure)
            if scope.cancelled_caught:
                log.warning("recording an LLM call took over %ss; not waited for (the "
                            "recorder may write it later)", self.record_timeout)

    async def _acquire(self, request: ChatRequest) -> None:
        """A slot of the limiter, waiting in its queue at most ``queue_timeout`` seconds.

        A free slot (nobody queued before this call) is taken without a scheduling round:
        the upstream request goes out now, not after every other ready task has run once
        more (0.1-0.3 ms on a loop relaying 100 streams). A cancelled call still stops here."""
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self.limiter.acquire_nowait()
        except trio.WouldBlock:
            pass
        else:
            self._told_load()
            return
        ticket = object()
        self._waiting.append(ticket)  # the limiter is FIFO: this call's place in its queue
        self._told_load()
        acquired = False
        try:
            with trio.move_on_after(self.queue_timeout) as waited:
                async with trio.open_nursery() as nursery:
                    if request.on_queued is not None:
                        nursery.start_soon(self._report_place, ticket, request.on_queued)
                    await self.limiter.acquire()
                    acquired = True
                    nursery.cancel_scope.cancel()
        except BaseException:
            # Cancelled as the nursery closed, after the slot was handed over: it is given
            # back (kept, it was lost for good, one slot of the backend fewer each time).
            if acquired:
                self.limiter.release()
            raise
        finally:
            self._waiting.remove(ticket)
            self._told_load()
        if acquired:
            return  # the queue's deadline may have passed as the nursery closed: too late
        if waited.cancelled_caught:
            busy = BackendBusy(
                f"all {self.limiter.total_tokens:g} slots of backend {self.name!r} stayed busy "
                f"for {self.queue_timeout:g}s (SERVICE_BACKEND_QUEUE_TIMEOUT); retry later",
                backend=self.name)
            busy.stalled = trio.current_time() - self.last_chunk_at >= self.queue_timeout
            raise busy

    def _told_load(self) -> None:
        if self.load_changed is not None:
            self.load_changed()

    async def _report_place(self, ticket: object, report: Callable[[int], None]) -> None:
        told = 0
        while True:
            place = self._waiting.index(ticket) + 1
            if place != told:
                report(place)
                told = place
            await trio.sleep(self.queue_report_every)

    async def _finish(self, call: _Call, failure: BaseException | None) -> None:
        if isinstance(failure, ContextLengthExceeded) and failure.unsent:
            return  # refused before it was sent: no LLM call (its run shortens and retries)
        outcome = classify_outcome(failure, finished=call.finished)
        if failure is None or outcome is LLMCallOutcome.ok:
            error = None if outcome is LLMCallOutcome.ok else "left before the end of the stream"
        elif (outcome is LLMCallOutcome.cancelled and call.deadline is not None
              and trio.current_time() >= call.deadline):
            # Cut by its run's deadline, not by a client or a shutdown.
            outcome, error = LLMCallOutcome.timed_out, "timed out (the run's deadline passed)"
        elif outcome is LLMCallOutcome.cancelled:
            # trio's Cancelled text names an internal task: say what happened instead.
            error = "cancelled (the run was cancelled, timed out or shut down)"
        else:
            error = _error_text(failure)
        rec = call.record(outcome, error)
        try:
            self._observe(rec)
        except Exception:  # a metric must never cost the call its record
            log.exception("metrics of LLM call %s failed", rec.id)
        if self.recorder is None:
            return
        try:
            await self.recorder.record_llm_call(rec)
        except Exception:
            log.exception("recording LLM call %s failed", rec.id)

    def _observe(self, rec: LLMCallRecord) -> None:
        m, b = self.metrics, rec.backend
        m.llm_calls.labels(backend=b, outcome=rec.outcome.value).inc()
        if rec.queue_wait is not None:
            m.llm_queue_wait.labels(backend=b).observe(rec.queue_wait)
        if rec.duration is not None:
            m.llm_latency.labels(backend=b).observe(rec.duration)
        if rec.ttft is not None:
            m.llm_ttft.labels(backend=b).observe(rec.ttft)
        if rec.prompt_tokens:
            m.llm_tokens.labels(backend=b, kind="prompt").inc(rec.prompt_tokens)
        if rec.completion_tokens:
            m.llm_tokens.labels(backend=b, kind="completion").inc(rec.completion_tokens)

    async def chat(self, request: ChatRequest) -> ChatResult:
        return await collect_chat(self, request)

    async def list_models(self) -> list[ModelInfo]:
        return await self.inner.list_models()

    async def health(self) -> BackendHealth:
        return await self.inner.health()

    async def preload(self, model: str) -> None:
        await self.inner.preload(model)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def __getattr__(self, attr: str) -> object:
        # AutoBackend.health_all and friends stay reachable through the wrapper.
        return getattr(self.inner, attr)
