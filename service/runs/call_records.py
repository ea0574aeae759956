"""LLM-call records the store refused, written again: every call the interceptor makes keeps
its row (``/api/llm-calls``), even across a store stall longer than the record's budget.

A record is written at once and the call waits for it (so it is stored before the run's end,
as a client reading ``/api/llm-calls`` after ``run.finished`` expects), but the write is a task
of :meth:`CallRecords.run`'s own: a caller whose budget (the interceptor's ``record_timeout``)
ends first stops waiting, while a store stuck in a batch (which runs shielded, whole) held it
for as long as the store was stuck. If the store refuses a record (``StoreUnavailable``), it is
kept here and written again by :meth:`CallRecords.run` (in the supervisor's nursery) with a
back-off, in order, for as long as it takes; at shutdown the drain gives what is kept one more
budget. Writing a record twice is harmless: a record's id is unique, and a second insert of it
changes nothing. Bounded: past ``_KEPT_MAX`` records the oldest is dropped, logged.
"""

from __future__ import annotations

from collections import deque

import trio

from ..backends.interceptor import LLMCallRecorder
from ..errors import StoreError, StoreUnavailable
from ..logs import get_logger
from ..store.records import LLMCallRecord
from .backoff import Backoff, Wakeup, write_when_woken

__all__ = ["CallRecords"]

log = get_logger("service.runs")

_KEPT_MAX = 10_000  # records kept while the store refuses them
_WRITE_BUDGET = 10.0  # seconds one write again may take


class CallRecords:
    """The recorder the interceptor writes through (``LLMCallRecorder``)."""

    def __init__(self, store: LLMCallRecorder) -> None:
        self._store = store
        self._kept: deque[LLMCallRecord] = deque()
        self._wake = Wakeup()
        self._writes: trio.Nursery | None = None  # run()'s: the records being written

    def __repr__(self) -> str:
        return f"<CallRecords [{len(self._kept)} kept]>"

    @property
    def kept(self) -> int:
        """Records the store has refused and not taken since."""
        return len(self._kept)

    async def record_llm_call(self, rec: LLMCallRecord) -> None:
        if self._writes is None:  # not running (yet, or any more): in the call's path
            await self._write(rec)
            return
        written = trio.Event()
        self._writes.start_soon(self._write, rec, written)
        # Cancelled (the caller's budget): the write goes on, its record kept if refused.
        await written.wait()

    async def _write(self, rec: LLMCallRecord, written: trio.Event | None = None) -> None:
        try:
            await self._store.record_llm_call(rec)
        except StoreUnavailable as exc:
            log.warning("LLM call %s not recorded yet (will retry): %s", rec.id, exc.message)
            self._keep(rec)
        except StoreError as exc:  # not the store's passing trouble: it will not take it
            log.error("LLM call %s cannot be recorded: %s", rec.id, exc.message)
        except trio.Cancelled:  # never written (a shutdown, the caller's budget): kept
            self._keep(rec)
            raise
        finally:
            if written is not None:
                written.set()

    def _keep(self, rec: LLMCallRecord) -> None:
        self._kept.append(rec)
        if len(self._kept) > _KEPT_MAX:
            lost = self._kept.popleft()
            log.error("LLM call %s dropped: %d records wait for the store", lost.id,
                      _KEPT_MAX)
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        """Write the records as they come, and the kept ones again as long as there are any
        (the supervisor's nursery)."""
        async with trio.open_nursery() as writes:
            self._writes = writes
            task_status.started()
            try:
                await write_when_woken(self._wake, self.flush)
            finally:
                self._writes = None

    async def flush(self) -> bool:
        """Write the kept records, oldest first; False if the store refused one (it and those
        after it stay kept)."""
        while self._kept:
            rec = self._kept[0]
            try:
                with trio.move_on_after(_WRITE_BUDGET) as write:
                    await self._store.record_llm_call(rec)
                if write.cancelled_caught:
                    return False
            except StoreUnavailable:
                return False
            except StoreError as exc:  # not the store's passing trouble: it will not take it
                log.error("LLM call %s cannot be recorded: %s", rec.id, exc.message)
            if self._kept and self._kept[0] is rec:
                self._kept.popleft()
        return True

    async def store_everything(self, budget: float) -> None:
        """At shutdown: the kept records get ``budget`` more seconds."""
        backoff = Backoff()
        with trio.move_on_after(budget):
            while not await self.flush():
                await backoff.pause()
        if self._kept:
            log.error("shutting down with %d LLM call record(s) not stored", len(self._kept))
