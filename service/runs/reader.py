"""Reading a run's events for a client: from the store, then live, with no gap and no duplicate.

Works for a run that is live (its handle is in the supervisor), for one long finished (only the
store has it), and for one running in another instance that shares the store, followed by
reading the store: when the run's commits are announced (PostgreSQL: one read per announced
commit, coalesced with other readers' by ``BatchedReads``, and a safety-net read a second),
otherwise every 0.1 s backing off to 1 s while nothing comes (SQLite). A live subscription
that falls behind the handle's window re-reads the store. Events are taken from the store in
order only: one missing between stored ones (its batch's write failed and is being retried) is
waited for while the run goes on, and skipped only once the run is over.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import trio

from ..errors import NotFound, ShuttingDown, StoreUnavailable
from ..logs import get_logger
from ..store import Store
from ..store.records import RunEvent
from .backoff import Backoff
from .committer import unstored_end
from .handle import ResumeFrom, Subscription
from .lifecycle import RunStatus
from .reads import full
from .supervisor import RunSupervisor

__all__ = ["EventReader", "Keepalive"]

_POLL_FIRST = 0.1  # seconds between store reads while waiting for what only the store will have,
_POLL_MAX = 1.0  # ... doubling while nothing comes, up to this
_WHERE_TTL = 1.0  # seconds another instance's ownership of a followed run is taken as known
_READ_RETRY_MAX = 10.0  # seconds a read the store refuses is tried again (and 2 keep-alives)

log = get_logger("service.runs")
T = TypeVar("T")


@dataclass(frozen=True)
class Keepalive:
    """Nothing happened for a keep-alive interval."""


class EventReader:
    """Async iterator of a run's events after ``after``, then Keepalive ticks while idle.

    Written as a class (not an async generator) so the keep-alive cancel scope opens and closes
    inside each ``__anext__`` and never spans a ``yield`` (see STACK_NOTES.md).
    """

    def __init__(
        self,
        run_id: str,
        *,
        after: int,
        store: Store,
        supervisor: RunSupervisor,
        keepalive: float,
    ) -> None:
        self.run_id = run_id
        self.last_seq = after
        self._store = store
        self._supervisor = supervisor
        self._keepalive = keepalive
        # Taken from its front: a deque (a list's pop(0) moved the rest of a page of up to
        # READ_LIMIT events at each: n squared within a re-join's page).
        self._backlog: deque[RunEvent] = deque()
        self._poll = _POLL_FIRST
        self._waited = 0.0  # seconds polled since the last event or keep-alive
        self._finished = False
        self._live: Subscription | None = None
        self._elsewhere_until = -math.inf  # trio time until which "elsewhere" is taken as known
        self._mark: int | None = None  # the wake-ups' mark taken before the last store read
        self._drained = False  # that read returned events and all the store had then

    def __aiter__(self) -> EventReader:
        return self

    async def __anext__(self) -> RunEvent | Keepalive:
        while True:
            if self._finished:
                raise StopAsyncIteration
            if self._backlog:
                return self._take(self._backlog.popleft())
            if self._live is None:
                if self._follow_live():
                    continue
                # Behind the live window, or not live here: the store, in order. An event
                # missing between stored ones (its batch's write failed and is being retried)
                # is waited for while the run goes on, so that none is skipped.
                if self._drained and not self._supervisor.wakeups.since(self.run_id,
                                                                        self._mark):
                    # The last read returned events and nothing of the run was committed
                    # since it began: another read would find nothing; wait for the next.
                    stored = []
                else:
                    self._drained = False  # before the read: it may be cancelled
                    stored = await self._read_store()
                self._drained = False
                if stored and stored[0].seq == self.last_seq + 1:
                    self._backlog = deque(_in_order(stored))
                    # All the store had when read (none past a gap, none past the limits).
                    self._drained = len(self._backlog) == len(stored) and not full(stored)
                    self._poll, self._waited = _POLL_FIRST, 0.0
                    continue
                if self._follow_live():
                    continue
                elsewhere = False
                if self._supervisor.get(self.run_id) is None:  # not live here
                    where = await self._where()
                    if self._supervisor.get(self.run_id) is not None:
                        continue  # launched here during that read: follow it live
                    if where == "elsewhere":
                        # Stored as running by another live worker sharing the store: its
                        # events (and its end) come through the store.
                        if self._supervisor.draining:
                            raise ShuttingDown("the service is shutting down")
                        elsewhere = True
                    elif where == "here" and self._supervisor.starting(self.run_id):
                        pass  # in the round between its first write and its launch here
                    elif where == "here":
                        # Stored as running by this process, which no longer holds it: it
                        # ended, its final state was refused, and past the bound of such
                        # runs it was let go. Its end is unknown to the store: this stream
                        # is told what its subscribers were, not given an end.
                        raise unstored_end()
                    else:
                        # Over (or gone): the store has everything it will ever have. A run
                        # whose process is gone is closed now (as the next start would: failed,
                        # "interrupted", with its run.finished), so this stream gets its end.
                        # One more read closes the race with a run that ended since the last
                        # one; a gap still there now stays (never stored): skipped.
                        await self._retrying("closing", partial(
                            self._store.recover_interrupted, self.run_id))
                        self._backlog = deque(await self._read_store())
                        if self._backlog:
                            continue
                        # Nothing more, and the run still in progress: not closed after all
                        # (its row held by a batch of an owner frozen mid-write, or the owner
                        # back with its lease renewed). Followed as another instance's run;
                        # ending here ended a stream with no end while the run went on.
                        if await self._retrying("reading", self._in_progress):
                            if self._supervisor.draining:
                                raise ShuttingDown("the service is shutting down")
                            elsewhere = True
                        else:
                            self._finished = True
                            continue
                # Else live here, but the window has moved past the cursor and the store does
                # not have the gap yet (its write is late, or failed and is being retried).
                if await self._wait_for_the_store(elsewhere):
                    return Keepalive()
                continue
            try:
                # Under load the next event is often published already (events come in commit
                # batches): take it without a cancel scope, which costs more than the rest.
                ready = self._live.ready()
                if ready is not None:
                    return self._take(ready)
                with trio.move_on_after(self._keepalive):
                    return self._take(await self._live.__anext__())
                return Keepalive()
            except StopAsyncIteration:
                self._live = None
                self._finished = True
            except ResumeFrom:
                self._live = None  # fell behind the window: the store has the gap

    async def _where(self) -> str | None:
        """Where the run runs (``Store.run_in_progress``). Another live instance's answer is
        kept for ``_WHERE_TTL``: followed through wake-ups, each wake then costs one store read,
        not two; its owner's death is still seen within that."""
        if trio.current_time() < self._elsewhere_until:
            return "elsewhere"
        where = await self._retrying("reading", partial(self._store.run_in_progress,
                                                         self.run_id))
        if where == "elsewhere":
            self._elsewhere_until = trio.current_time() + _WHERE_TTL
        return where

    def _follow_live(self) -> bool:
        """Subscribe if the run is live here and its window holds everything after our cursor
        (the common case: a client following its own run; no store read)."""
        handle = self._supervisor.get(self.run_id)
        if handle is not None and handle.covers(self.last_seq):
            self._live = handle.subscribe(self.last_seq)
            self._drained = False  # what the last store read said is stale once live
            return True
        return False

    async def _wait_for_the_store(self, elsewhere: bool) -> bool:
        """Wait before the next store read: until a commit of this run is announced
        (PostgreSQL; at once if one was since the last read began), or the poll interval
        (backing off while nothing comes); True when a keep-alive is due."""
        start = trio.current_time()
        wakeups = self._supervisor.wakeups
        # For a run another instance holds, while commits are announced, a poll is only the
        # safety net (a lost listener says so and every wait ends): once a second. A run of
        # this process (starting, or its write late) moves on without an announcement.
        poll = _POLL_MAX if elsewhere and wakeups.listening else self._poll
        if await wakeups.wait_run(self.run_id, poll, since=self._mark):
            self._poll = _POLL_FIRST
        else:
            self._poll = min(self._poll * 2, _POLL_MAX)
        self._waited += trio.current_time() - start
        if self._waited >= self._keepalive:
            self._waited = 0.0
            return True
        return False

    def _take(self, event: RunEvent) -> RunEvent:
        self.last_seq = event.seq
        if event.type == "run.finished":
            self._finished = True
        return event

    async def _read_store(self) -> list[RunEvent]:
        """The run's stored events after the cursor. A read the store refuses for a moment
        (``StoreUnavailable``: a connection lost, a database restarting) is tried again,
        backing off, for up to two keep-alive intervals (at most ``_READ_RETRY_MAX`` s): a
        blip is not the stream's end. A /v1 client cannot re-join, so a 503 there had its SDK
        run the whole completion again, while the first run went on to be stored."""
        return await self._retrying("reading", self._read_once)

    async def _retrying(self, doing: str, call: Callable[[], Awaitable[T]]) -> T:
        """``await call()``, tried again while the store refuses it for a moment
        (``StoreUnavailable``), backing off, for up to two keep-alive intervals (at most
        ``_READ_RETRY_MAX`` s). Every store call of the reader goes through it: one lost
        connection on the question "where does it run?" ended a follower on another
        instance with ``store_unavailable`` while the run went on."""
        backoff = Backoff()
        window = min(2 * self._keepalive, _READ_RETRY_MAX)
        give_up = trio.current_time() + window
        refused = False
        while True:
            try:
                if not (refused or self._supervisor.wakeups.away):
                    return await call()
                # The store refuses, or the database is away (the listener lost it): a try is
                # bounded by what is left of the window, and so is the stream's silence. A
                # try waiting out the pool's acquire_timeout (5 s) for a connection was, at
                # SERVICE_SSE_KEEPALIVE=0.5, ten intervals without a word before the frame.
                with trio.move_on_at(give_up):
                    return await call()
                raise StoreUnavailable(f"the store did not answer within {window:g} s")
            except StoreUnavailable as exc:
                refused = True
                if trio.current_time() >= give_up:
                    raise
                log.warning("%s run %s in the store failed (trying again): %s", doing,
                            self.run_id, exc.message)
            with trio.move_on_at(give_up):
                await backoff.pause()

    async def _in_progress(self) -> bool:
        """Whether the store has the run queued or running (whoever holds it). A run that is
        gone (its conversation deleted, here or by another instance, before this stream read
        its end) raises ``NotFound``: the stream ends with an error frame saying so. It just
        stopped, with neither its end nor an error: a client could not tell a deleted run
        from a connection cut (and an EventSource came back for a 404)."""
        try:
            run = await self._store.get_run(self.run_id)
        except NotFound:
            raise NotFound(f"run {self.run_id!r} was deleted (its conversation was deleted)",
                           id=self.run_id) from None
        return run.status in (RunStatus.queued.value, RunStatus.running.value)

    async def _read_once(self) -> list[RunEvent]:
        self._mark = self._supervisor.wakeups.mark()  # announcements after it: read again
        return await self._supervisor.reads.read(self.run_id, self.last_seq)


def _in_order(events: list[RunEvent]) -> list[RunEvent]:
    """The leading events without a gap in their numbering."""
    for i in range(1, len(events)):
        if events[i].seq != events[i - 1].seq + 1:
            return events[:i]
    return events
