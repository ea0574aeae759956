"""A live run as the rest of the service sees it: status, cancel, events and subscriptions.

Events are numbered here (``emit`` is sync and cheap, called per token) and handed to the
supervisor's committer, which writes them to the store in batches and only then *publishes* them
on the handle. So a subscriber never sees an event that is not in the store.

Subscribers pull: each :class:`Subscription` keeps a cursor into the run's published events and
waits for more. A slow subscriber therefore never slows the run and costs no queue of its own.
The handle keeps a bounded window of recent events in memory; a subscriber that falls behind the
window gets :class:`ResumeFrom` and re-reads the gap from the store (``Store.list_run_events``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import trio

from ..errors import RunError, ServiceError
from ..store.records import BegunRun, RunEvent, ends_a_step
from ..text import clean_json, cut_at_stop
from .lifecycle import TERMINAL, RunStatus, check_transition

__all__ = ["WINDOW_BYTES", "ResumeFrom", "RunHandle", "Subscription"]

# The window's bound in bytes of the events' JSON, beside its count: a run's tool results
# (up to 16,000 characters each, 6 bytes per escaped one) or a long answer would otherwise be
# held whole for as long as the run lasts.
WINDOW_BYTES = 4 * 2**20


class ResumeFrom(RunError):
    """The subscriber fell behind the in-memory window: re-read from the store after ``seq``."""

    type = "resume_from"

    def __init__(self, seq: int) -> None:
        super().__init__(f"fell behind; resume after event {seq}", seq=seq)
        self.seq = seq


class RunHandle:
    def __init__(
        self,
        *,
        run_id: str,
        conversation_id: str,
        agent: str,
        model: str | None,
        owner: str | None,
        message_id: str,
        sink: Callable[[RunEvent], None],
        window: int = 20_000,
        window_bytes: int = WINDOW_BYTES,
        begun: BegunRun | None = None,
    ) -> None:
        self.id = run_id
        self.conversation_id = conversation_id
        self.agent = agent
        self.model = model
        self.owner = owner
        self.message_id = message_id  # the pending assistant reply this run fills
        self.status = RunStatus.queued
        self.error: str | None = None
        self.error_type: str | None = None  # the error model's type, for the API's status
        self.usage: dict[str, Any] = {}
        # The times the store has: the run is stored running from its first write.
        self.created_at = begun.run.created_at if begun is not None else time.time()
        self._stored_start = begun.run.created_at if begun is not None else None
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.scope = trio.CancelScope()
        self.cancel_reason: str | None = None
        self.cancel_status = RunStatus.cancelled  # how a cancel ends it (failed: see _start_new)
        # Set once the run is over for its clients: its final state stored and its end
        # published (``final_stored``), or the store could not take it within the final
        # write's budget (then its subscribers are told ``end_error``, not an end).
        self.finished = trio.Event()
        self.final_stored = False
        self.end_error: ServiceError | None = None
        self.answer_parts: list[str] = []  # token text since the last step: the answer if cut
        # A reasoning model's thinking in the calls that stream to clients (a non-stream /v1
        # answer's ``reasoning_content``, as the stream's chunks carry it).
        self.reasoning_parts: list[str] = []
        # How the agent's turn text holds its answer (the ReAct text protocol's labels), if not
        # all of it is the answer.
        self.answer_of: Callable[[str], str] | None = None
        self.stop: tuple[str, ...] = ()  # the stop sequences its answer ends at (see above)
        self.error_event: dict[str, Any] | None = None  # the run's ``error``, sent at its end
        self.result_extra: dict[str, Any] = {}  # e.g. tool_calls, finish_reason for the reply
        self.final_text = ""  # the reply as stored at the end (answer, or partial text)
        # What the store wrote and read at the start: the run, both messages, the conversation
        # and its history (None only for a handle made outside a supervisor, in tests).
        self.begun = begun
        self._sink = sink
        self._window = window
        self._window_bytes = window_bytes
        self._bytes = 0  # of the events' JSON in the window
        self._next_seq = 1
        self._events: list[RunEvent] = []  # published, seq base_seq .. base_seq+len-1
        self._base_seq = 1
        self._changed = trio.Event()
        self._closed = False  # run.finished has been emitted
        self._published_final = False  # ... and published
        self._held: list[RunEvent] | None = None  # committed before event 1 was published
        self._early: dict[int, RunEvent] = {}  # committed ahead of an earlier batch

    def __repr__(self) -> str:
        cancel = f", cancel: {self.cancel_reason}" if self.cancel_reason else ""
        return (
            f"<RunHandle {self.id} [{self.status}, {self._next_seq - 1} events, "
            f"{self.published_seq} published{cancel}]>"
        )

    # -- state ----------------------------------------------------------------------------------

    def set_status(self, status: RunStatus) -> None:
        check_transition(self.status, status)
        self.status = status
        if status is RunStatus.running:
            self.started_at = self._stored_start or time.time()
        elif status in TERMINAL:
            self.finished_at = time.time()

    @property
    def done(self) -> bool:
        """The run's final state is stored (its status is terminal)."""
        return self.status in TERMINAL

    @property
    def closed(self) -> bool:
        """The run has ended: its last events are numbered (they may not be stored yet), so
        nothing more can be emitted and a cancel changes nothing."""
        return self._closed

    def cancel(self, reason: str = "cancelled by request") -> None:
        """Stop the run (sync, idempotent). The first reason given is the one recorded; none
        once its deadline has stopped it (a Stop while it unwinds from a timeout changed a
        ``timed_out`` into a ``cancelled`` whose own LLM call was stored ``timed_out``)."""
        if self.cancel_reason is None and not self._closed and not self.scope.cancel_called:
            self.cancel_reason = reason
        self.scope.cancel()

    @property
    def partial_text(self) -> str:
        """The answer so far (the tokens since the last step), as the agent reads its turns."""
        text = "".join(self.answer_parts)
        text = self.answer_of(text) if self.answer_of is not None else text
        # A /v1 client's stop sequences, for an agent whose answer is cut after its run (not by
        # the model's server): an answer cut short is stored as a whole one would be (ReAct's
        # stripped first, as its loop strips a whole answer: a leading blank line cut it to
        # nothing, and the whole one at its end).
        if self.stop:
            text = cut_at_stop(text.strip() if self.answer_of is not None else text, self.stop)
        return text

    # -- events ---------------------------------------------------------------------------------

    def emit(self, type_: str, data: dict[str, Any]) -> RunEvent:
        """Number an event and hand it to the committer. Sync: safe on the per-token path."""
        event = self._number(type_, data)
        if type_ == "token":
            self.answer_parts.append(data.get("text", ""))
        elif ends_a_step(type_, data):
            self.answer_parts.clear()  # the text so far was the step's, not the answer
        self._sink(event)
        return event

    def close(self, last: list[tuple[str, dict[str, Any]]]) -> list[RunEvent]:
        """Number the run's last events (its ``run.finished`` last) without handing them to
        the committer: they are written with the run's final state, in its transaction, and
        published only once that has landed. Nothing can be emitted after."""
        events = [self._number(type_, data) for type_, data in last]
        assert events[-1].type == "run.finished", events
        return events

    def _number(self, type_: str, data: dict[str, Any]) -> RunEvent:
        if self._closed:
            raise RunError(f"run {self.id} already finished; cannot emit {type_}")
        if type_ != "token":  # (a token's text is cleaned where it is read: TextJoiner)
            # A model's JSON escapes decode to NUL and lone surrogates (a tool call's
            # arguments, a plan, an answer given as an action's input): no event holds
            # them, and what is told is what the store keeps (it cleans them alike).
            data = clean_json(data)
        event = RunEvent.make(self.id, self._next_seq, type_, data, time.time())
        self._next_seq += 1
        if type_ == "run.finished":
            self._closed = True
        return event

    def stored_as(self, status: RunStatus, finished_at: float | None = None) -> None:
        """The final state is in the store: the run's status (and its end's time, when
        known) is now what the store says."""
        self.set_status(status)
        if finished_at is not None:
            self.finished_at = finished_at
        self.final_stored = True
        self.end_error = None

    def give_up_end(self, error: ServiceError) -> None:
        """The final state could not be stored in time: subscribers waiting for the end get
        ``error`` instead (they may re-join later); what the store has is all they were shown."""
        self.end_error = error
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    @property
    def published_final(self) -> bool:
        """Whether every event, ``run.finished`` included, is published."""
        return self._published_final

    async def wait_published(self) -> None:
        """Until every event, ``run.finished`` included, is published."""
        while not self._published_final:
            await self._changed.wait()

    @property
    def emitted_seq(self) -> int:
        return self._next_seq - 1

    @property
    def buffered(self) -> int:
        """Published events kept in memory (at most the window) for subscribers to catch up."""
        return len(self._events)

    @property
    def published_seq(self) -> int:
        return self._base_seq + len(self._events) - 1

    def publish(self, events: list[RunEvent]) -> None:
        """Called by the committer once ``events`` (in seq order) are in the store.

        In numbering order whatever the order of the calls: a run's final write and a batch
        holding its previous events may land in one transaction and their publishers resume
        in either order, or the batch may fail and be written again after the final write.
        Events that come ahead of a gap wait here for it."""
        if not events:
            return
        if self._held is not None:  # event 1 is still being written with the run
            self._held.extend(events)
            return
        first = self.published_seq + 1
        if self._early or events[0].seq != first or events[-1].seq != first + len(events) - 1:
            for e in events:
                if e.seq >= first:
                    self._early[e.seq] = e
            events = []
            while first in self._early:
                events.append(self._early.pop(first))
                first += 1
            if not events:
                return
        self._events.extend(events)
        for e in events:
            self._bytes += len(e.raw)
        if events[-1].type == "run.finished":
            self._published_final = True
        if len(self._events) > self._window or self._bytes > self._window_bytes:
            # Down to half of either bound (the newest event always kept): a subscriber
            # behind it re-reads the store (ResumeFrom).
            drop = (len(self._events) - self._window // 2
                    if len(self._events) > self._window else 0)
            dropped = sum(len(e.raw) for e in self._events[:drop])
            while (drop < len(self._events) - 1
                   and self._bytes - dropped > self._window_bytes // 2):
                dropped += len(self._events[drop].raw)
                drop += 1
            del self._events[:drop]
            self._base_seq += drop
            self._bytes -= dropped
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    @property
    def first_written(self) -> bool:
        """Its first write (the run itself) has landed: from then on the store has its row,
        unless its conversation is deleted. (A ``/v1`` run starts while that write is in
        flight.)"""
        return self._held is None

    def end_gone(self, reason: str) -> None:
        """The run is gone from the store (its conversation deleted while it ran): nothing of
        it is stored, so its subscribers get none of its events not published yet, only an
        end that says so: ``run.finished`` ``cancelled`` with ``reason``, numbered after what
        they were shown (as a delete that found it running tells them). Never the end this
        process planned (a ``succeeded`` the store has no trace of)."""
        self._early.clear()
        self.error, self.error_type, self.error_event = reason, None, None
        self.final_text = ""
        self.stored_as(RunStatus.cancelled, time.time())  # the store's word: not there
        self.publish([RunEvent.make(
            self.id, self.published_seq + 1, "run.finished",
            {"status": RunStatus.cancelled.value, "usage": self.usage, "error": reason},
            time.time())])

    def reserve_first_event(self) -> None:
        """Number event 1 (``run.started``) without emitting it: the store writes it with the
        run, and :meth:`adopt_first_event` publishes it. Events committed before then (the run
        started working while its write was in flight) are held back until it is published."""
        assert self._next_seq == 1, self._next_seq
        self._next_seq = 2
        self._held = []

    def adopt_first_event(self, event: RunEvent) -> None:
        """Take an event the store wrote with the run itself (``run.started``) as published."""
        if self._held is not None:  # reserved: publish it, then what was held behind it
            assert event.seq == 1, event.seq
            held, self._held = self._held, None
            self.publish(sorted([event, *held], key=lambda e: e.seq))
            return
        assert event.seq == self._next_seq, (event.seq, self._next_seq)
        self._next_seq += 1
        self.publish([event])

    def covers(self, after: int) -> bool:
        """Whether every published event after ``after`` is still in the in-memory window."""
        return after + 1 >= self._base_seq

    def subscribe(self, after: int = 0) -> Subscription:
        """Events with seq > ``after``: those published so far, then live ones until the end."""
        return Subscription(self, after)


class Subscription:
    """An async iterator over a run's events from a cursor on. Raises ResumeFrom if too slow."""

    def __init__(self, handle: RunHandle, after: int) -> None:
        self._handle = handle
        self.last_seq = after

    def __aiter__(self) -> Subscription:
        return self

    def ready(self) -> RunEvent | None:
        """The next event if it is already published, else None; no wait (and no checkpoint).

        Raises like ``__anext__``: StopAsyncIteration after the last, ResumeFrom if too slow.
        """
        h = self._handle
        index = self.last_seq + 1 - h._base_seq
        if index < 0:
            raise ResumeFrom(self.last_seq)
        if index < len(h._events):
            event = h._events[index]
            self.last_seq = event.seq
            return event
        if h._published_final:
            raise StopAsyncIteration
        if h.end_error is not None:
            raise h.end_error
        return None

    async def __anext__(self) -> RunEvent:
        while (event := self.ready()) is None:
            await self._handle._changed.wait()
        return event
