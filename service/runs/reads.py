"""Reads of run events from the store, coalesced: one query for every reader waiting.

Readers of runs served by another instance (or behind a live window) read the store at each
wake-up, and a commit batch on the other instance wakes the readers of all its runs at once: a
query each would be a thread hop and a round trip each (on SQLite, one after another behind its
read lock). Here a reader's ask waits while a read is in flight and goes, with every other ask
made meanwhile, into the next one (``Store.list_events_of_runs``), the way group commit batches
writes. Nothing is cached: each ask is answered by a read that started after it was made.

When the loop is not running (before the supervisor serves, after it stops) a reader reads the
store itself.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import trio

from ..errors import StoreError, StoreUnavailable
from ..logs import get_logger
from ..store import RunEvent, Store

__all__ = ["READ_CHARS", "READ_LIMIT", "BatchedReads", "full"]

READ_LIMIT = 10_000  # events of one run in one read (the store's default)
# Characters of events' JSON of one run in one read (at least one event). A reader holds what
# it read until its client has taken it: a page bounded by count alone held up to 10,000
# events each (a follower joined from 0 behind the live window held the whole run's 9.7 MB,
# for each such follower, where the run's own window holds at most WINDOW_BYTES).
READ_CHARS = 1 << 20


def full(events: list[RunEvent]) -> bool:
    """Whether a read may have stopped short of what the store had (at READ_LIMIT events or
    READ_CHARS characters): one more read is needed to know."""
    return len(events) >= READ_LIMIT or sum(len(e.raw) for e in events) >= READ_CHARS

log = get_logger("service.runs")


def _copy(exc: Exception) -> Exception:
    try:
        return copy.copy(exc)
    except Exception:  # an exception type that cannot be copied: a plain one saying it
        return StoreError(f"store read failed: {type(exc).__name__}: {exc}")


@dataclass(eq=False)
class _Ask:
    after: int
    done: trio.Event = field(default_factory=trio.Event)
    events: list[RunEvent] | None = None  # None with ``done`` set: read it yourself
    error: Exception | None = None


class BatchedReads:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._asks: dict[str, list[_Ask]] = {}  # run id -> asks for the next read
        self._wake = trio.Event()
        self._running = False
        self.reads = 0  # queries made (for tests and metrics)

    def __repr__(self) -> str:
        return f"<BatchedReads [{len(self._asks)} runs asked, {self.reads} reads]>"

    async def run(self) -> None:
        """Answer asks until cancelled (in the supervisor's nursery)."""
        self._running = True
        batch: dict[str, list[_Ask]] = {}
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                batch, self._asks = self._asks, {}
                cursors = {run_id: min(a.after for a in asks) for run_id, asks in batch.items()}
                try:
                    got = await self._store.list_events_of_runs(cursors, limit=READ_LIMIT,
                                                                  max_chars=READ_CHARS)
                except Exception as exc:
                    # The readers' failure, not this loop's (nor the supervisor's): each of them
                    # raises it, as its own read would have. Its own copy: their tracebacks
                    # differ. Unless the store is there and the read failed on what it holds
                    # (a stored event that does not decode): that is one run's, so with
                    # several runs asked each reader reads its own, and only that run's fail.
                    if not isinstance(exc, StoreError):
                        log.exception("a batched read of run events failed")
                    alone = len(batch) > 1 and not isinstance(exc, StoreUnavailable)
                    for asks in batch.values():
                        for ask in asks:
                            if not alone:
                                ask.error = _copy(exc)
                            ask.done.set()
                    batch = {}
                    continue
                self.reads += 1
                for run_id, asks in batch.items():
                    events = got.get(run_id, [])
                    for ask in asks:
                        mine = [e for e in events if e.seq > ask.after]
                        # A read that hit its limits stopped after the lowest cursor's page:
                        # an ask from further on may have more to read than it got (and would
                        # take the cut for all there is); it reads the store itself.
                        if not full(events) or len(mine) == len(events):
                            ask.events = mine
                        ask.done.set()
                batch = {}
        finally:
            self._running = False
            # Asks not answered (the loop is stopping): their readers read the store themselves.
            for pending in (batch, self._asks):
                for asks in pending.values():
                    for ask in asks:
                        ask.done.set()
            self._asks = {}

    async def read(self, run_id: str, after: int) -> list[RunEvent]:
        """The run's stored events after ``after`` (as ``Store.list_run_events``)."""
        if not self._running:
            return await self._store.list_run_events(run_id, after=after, limit=READ_LIMIT,
                                                     max_chars=READ_CHARS)
        ask = _Ask(after)
        self._asks.setdefault(run_id, []).append(ask)
        self._wake.set()
        await ask.done.wait()
        if ask.error is not None:
            raise ask.error
        if ask.events is None:
            return await self._store.list_run_events(run_id, after=after, limit=READ_LIMIT,
                                                     max_chars=READ_CHARS)
        return ask.events
