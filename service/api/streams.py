"""Reading a run's events for a client: from the store, then live, with no gap and no duplicate.

Works for a run that is live (its handle is in the supervisor) and for one long finished (only the
store has it). A live subscription that falls behind the handle's window re-reads the store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import trio

from ..runs import ResumeFrom, RunEvent, RunSupervisor, Subscription
from ..store import Store

__all__ = ["EventReader", "Keepalive"]

_GAP_POLL = 0.1  # seconds between store reads while a gap (or a run's start) is not stored yet


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
        self._backlog: list[RunEvent] = []
        self._gap_wait = 0.0  # seconds waited for a gap to reach the store (see __anext__)
        self._finished = False
        self._live: Subscription | None = None

    def __aiter__(self) -> EventReader:
        return self

    async def __anext__(self) -> RunEvent | Keepalive:
        while True:
            if self._finished:
                raise StopAsyncIteration
            if self._backlog:
                return self._take(self._backlog.pop(0))
            if self._live is None:
                handle = self._supervisor.get(self.run_id)
                if handle is not None and handle.covers(self.last_seq):
                    # Live, and its in-memory window still holds everything after our cursor:
                    # no store read needed (the common case: a client following its own run).
                    self._live = handle.subscribe(self.last_seq)
                    continue
                await self._refill_from_store()
                if self._backlog:
                    self._gap_wait = 0.0
                    continue
                handle = self._supervisor.get(self.run_id)
                if handle is not None and not handle.covers(self.last_seq):
                    # The window has moved past the cursor but the store does not have the gap
                    # yet (its write is late, or failed and is being retried): wait, not spin.
                    await trio.sleep(_GAP_POLL)
                    self._gap_wait += _GAP_POLL
                    if self._gap_wait >= self._keepalive:
                        self._gap_wait = 0.0
                        return Keepalive()
                    continue
                if handle is None:
                    # Not live here: the store had everything, including run.finished (or the
                    # run was deleted). One more read closes the race with a run just finishing.
                    await self._refill_from_store()
                    if self._backlog:
                        continue
                    if await self._store.run_in_progress(self.run_id):
                        # Stored without its end yet, by a live process: this one, in the
                        # scheduling round between the run's first write and its launch, or
                        # another worker sharing the store. Its end will come: poll for it.
                        await trio.sleep(_GAP_POLL)
                        self._gap_wait += _GAP_POLL
                        if self._gap_wait >= self._keepalive:
                            self._gap_wait = 0.0
                            return Keepalive()
                        continue
                    self._finished = True
                    continue
                self._live = handle.subscribe(self.last_seq)
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

    def _take(self, event: RunEvent) -> RunEvent:
        self.last_seq = event.seq
        if event.type == "run.finished":
            self._finished = True
        return event

    async def _refill_from_store(self) -> None:
        records = await self._store.list_run_events(self.run_id, after=self.last_seq)
        self._backlog = [
            RunEvent(r.run_id, r.seq, r.type, r.data, r.created_at,
                     r.raw if r.raw is not None else json.dumps(r.data, separators=(",", ":")))
            for r in records
        ]
