"""The event committer: run events into the store in batches, and only then to subscribers.

What clients are told is what the store says:

* every event is published (reaches a subscriber) only once it is committed; pending events of
  all runs go in one transaction (group commit), one batch in flight at a time;
* a batch the store refuses (a full volume, a database away) is held, in order, and written
  again with a back-off (:class:`~.backoff.Backoff`: 0.1 s doubling to 2 s); nothing after it is
  published meanwhile; past ``_PENDING_MAX`` held events (or ``_PENDING_BYTES_MAX`` of their
  JSON) the runs making them are stopped;
* a run's last events (``error``, ``message``, ``run.finished``) are written only in the
  transaction of its final state (:class:`FinalState`), tried again for
  ``FINAL_WRITE_BUDGET`` seconds; if the store still refuses it, it is kept and retried
  (``retry_final_writes``) and the run's subscribers are told ``store_unavailable`` instead of
  an end the store might contradict.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from ..errors import NotFound, StoreError, StoreUnavailable
from ..logs import get_logger
from ..store import MessageStatus, RunEvent, Store
from .backoff import Backoff, Wakeup, write_when_woken
from .handle import RunHandle
from .lifecycle import RunStatus

__all__ = ["FINAL_WRITE_BUDGET", "EventCommitter", "FinalState", "lost", "unstored_end"]

log = get_logger("service.runs")

WRITE_BUDGET = 10.0  # seconds one store write (a batch, a final state) may take
FINAL_WRITE_BUDGET = 15.0  # seconds a run's final state is tried (again) before it is kept
_PENDING_MAX = 100_000  # events held while the store refuses them; past it their runs fail
# ... and their JSON's size: a tool's result is up to 16,000 characters (up to 6 bytes each,
# escaped), so 100,000 of them could hold gigabytes.
_PENDING_BYTES_MAX = 64 * 2**20
_CHECK_EVERY = 1_024  # events waiting between two looks at the bound (see enqueue)
_UNSTORED_ENDS_MAX = 1_000  # ended runs whose final write failed, still served from memory


@dataclass(frozen=True)
class FinalState:
    """A run's end, written in one transaction: its status, its reply's text and status, and
    its last events (those not written yet, ``run.finished`` last)."""

    run_id: str
    status: RunStatus
    message_id: str
    content: str
    message_status: MessageStatus
    error: str | None
    usage: dict[str, Any]
    events: tuple[RunEvent, ...]
    finished_at: float = field(default_factory=time.time)  # stored as the run's end
    model: str | None = None  # the model that answered: stored where the run named none

    async def write(self, store: Store) -> bool:
        """False if the run is no longer this process's to close (``Store.finish_run``)."""
        return await store.finish_run(
            self.run_id, status=self.status.value, message_id=self.message_id,
            content=self.content, message_status=self.message_status, error=self.error,
            usage=self.usage, events=self.events, finished_at=self.finished_at,
            model=self.model,
        )


class EventCommitter:
    """Owns the events not yet stored and the final states still to store (one per process,
    run by the supervisor). ``live(run_id)`` finds a running run's handle."""

    def __init__(self, store: Store, live: Callable[[str], RunHandle | None], *,
                 on_stored_late: Callable[[str], None] = lambda status: None) -> None:
        self._store = store
        self._live = live
        # A kept final state landed, or its run was found gone (its status): counted then.
        self._on_stored_late = on_stored_late
        self._pending: list[RunEvent] = []  # emitted, not yet written (or refused: held)
        self._unchecked_bytes = 0  # of events enqueued since the bound was last looked at
        self._retrying = False  # the last batch was refused: the next may hold stored events
        self._refused = False  # the store's latest answer to a final state was a refusal
        self._ends_refused: set[str] = set()  # runs whose end is refused, tried again now
        self._wake = Wakeup()
        self._lock = trio.Lock()  # one batch in flight at a time
        self._in_flight: set[str] = set()  # the runs with events in the batch in flight
        # Final states the store did not take within the budget: retried until it does.
        self._final_retries: list[tuple[RunHandle, FinalState]] = []
        self._final_retry_lock = trio.Lock()
        self._ended: dict[str, RunHandle] = {}  # runs whose end is not all stored/published

    def __repr__(self) -> str:
        return (f"<EventCommitter [{len(self._pending)} events pending, "
                f"{len(self._final_retries)} final states to retry]>")

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def unstored(self) -> int:
        """Runs whose final state, or events, the store has not taken (yet)."""
        return len(self._final_retries) + len({e.run_id for e in self._pending})

    @property
    def refusing(self) -> bool:
        """The store refused (or did not answer in time) its latest write of runs' events or
        final states, and some are held for a retry: it does not take this instance's runs,
        whatever a one-row probe says (a nearly full volume takes a page, not a batch)."""
        return ((self._retrying and bool(self._pending)) or bool(self._ends_refused)
                or (self._refused and bool(self._final_retries)))

    def refuse_while_refusing(self) -> None:
        """StoreUnavailable (503, Retry-After) while ``refusing``, as ``/readyz`` says, for a new
        run or conversation: its few rows may still fit (a nearly full PostgreSQL tablespace
        takes a row in a page it has, not a batch of events in new ones), and its stream
        would then show only keep-alives until the held writes land."""
        if self.refusing:
            raise StoreUnavailable("the store refuses this instance's writes (held here for a "
                                   "retry, not lost); nothing new until they land")

    def ended(self, run_id: str) -> RunHandle | None:
        """An ended run whose end the store has not all taken (it is served from memory)."""
        return self._ended.get(run_id)

    def enqueue(self, event: RunEvent) -> None:
        """A handle's sink: sync, per token."""
        self._pending.append(event)
        self._wake.set()
        # The bound is also looked at while a batch is stuck in the store (taken, not
        # answered: a hung disk), where no refusal comes to look at it: every 1,024 events
        # waiting, or 1/64 of the bytes' bound (nothing to do while the store keeps up).
        self._unchecked_bytes += len(event.raw)
        if (not len(self._pending) % _CHECK_EVERY
                or self._unchecked_bytes > _PENDING_BYTES_MAX // 64):
            self._unchecked_bytes = 0
            self._fail_runs_past_the_bound()

    def take(self, run_id: str) -> list[RunEvent]:
        """The run's events not taken by a batch yet (sync: none can be taken in between)."""
        mine = [e for e in self._pending if e.run_id == run_id]
        if mine:
            self._pending = [e for e in self._pending if e.run_id != run_id]
        return mine

    # -- event batches ------------------------------------------------------------------------

    async def run(self) -> None:
        """Commit pending events as they come (in the supervisor's nursery)."""
        # A batch the store refused (held, in order): again after a pause, doubling.
        await write_when_woken(self._wake, self.flush)

    async def flush(self) -> bool:
        """Write every pending event (one transaction for all runs), then publish them.
        False if the store refused them: they are held, in order, for the next try.

        Shielded, with only the store call bounded: a batch taken from the queue is always
        either published or put back."""
        stored = False
        with trio.CancelScope(shield=True):
            stored = await self._flush()
        return stored

    async def _flush(self) -> bool:
        async with self._lock:
            batch, self._pending = self._pending, []
            if not batch:
                return True
            self._in_flight = {e.run_id for e in batch}
            try:
                return await self._write_batch(batch)
            finally:
                self._in_flight = set()  # stored, or put back in _pending: decided

    async def _write_batch(self, batch: list[RunEvent]) -> bool:
        """Write a batch taken by ``_flush`` (under its lock), then publish it; False if the
        store refused it (put back in ``_pending``, ahead of what came since)."""
        stored = False
        not_held: set[str] = set()
        try:
            with trio.move_on_after(WRITE_BUDGET) as write:
                # After a refusal some may have landed (a write that timed out): skipped.
                not_held = await self._store.append_run_events(
                    batch, retry=self._retrying)
                stored = True
            if write.cancelled_caught:
                log.error("storing %d run events took over %ss; will retry", len(batch),
                          WRITE_BUDGET, extra=_runs_of(batch))
        except StoreError as exc:
            log.error("could not store %d run events (will retry): %s", len(batch),
                      exc.message, extra=_runs_of(batch))
        if not stored:
            # Held, ahead of what came since, and not published: a client is never shown
            # an event a crash now could lose.
            self._pending = batch + self._pending
            self._retrying = True
            self._fail_runs_past_the_bound()
            return False
        self._retrying = False
        by_run: dict[str, list[RunEvent]] = {}
        for e in batch:
            by_run.setdefault(e.run_id, []).append(e)
        for run_id, events in by_run.items():
            handle = self._live(run_id) or self._ended.get(run_id)
            if run_id in not_held:  # not stored, so never shown
                if handle is not None:
                    lost(handle)
                continue
            if handle is not None:
                handle.publish(events)
                if handle.final_stored and handle.published_final:
                    self._ended.pop(run_id, None)
        return True

    def _fail_runs_past_the_bound(self) -> None:
        """While the store refuses events, the runs making them go on (a database restart
        takes seconds); past ``_PENDING_MAX`` held events, or ``_PENDING_BYTES_MAX`` of their
        JSON, they are stopped, ``failed`` (``store_unavailable``), so memory stays bounded and
        nothing held is dropped. (Counted here, on a refused batch, and from ``enqueue`` every
        so many events: not per token.)"""
        if (len(self._pending) <= _PENDING_MAX
                and sum(len(e.raw) for e in self._pending) <= _PENDING_BYTES_MAX):
            return
        for run_id in {e.run_id for e in self._pending}:
            handle = self._live(run_id)
            if handle is not None and handle.cancel_reason is None:
                log.error("run %s stopped: the store cannot take its events", run_id)
                handle.cancel_status, handle.error_type = RunStatus.failed, "store_unavailable"
                handle.cancel("the store cannot take the run's events")

    # -- final states -------------------------------------------------------------------------

    async def finish(self, handle: RunHandle, final: FinalState) -> bool:
        """Store a run's final state, then publish its last events. False if another instance
        had closed the run (its end, counted there, is the one told).

        Shielded (the final state must be recorded whatever is cancelled) and bounded: the
        write is tried again while the store refuses it, for ``FINAL_WRITE_BUDGET`` seconds;
        after that it is kept for ``retry_final_writes`` and the run's subscribers are told
        ``store_unavailable`` rather than an end the store does not have."""
        held: bool | None = None
        elsewhere = False  # the end told is another instance's
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                # A write the store has taken cannot be interrupted (its thread runs on, and
                # a lock or a stalled volume may hold it long): the run's subscribers are told
                # at the budget all the same; if the write lands later, a re-join gets the end.
                nursery.start_soon(self._tell_if_late, handle)
                with trio.move_on_after(FINAL_WRITE_BUDGET):
                    final = await self._with_earlier(final)
                    held = await self._store_final(handle, final)
                    if held is False:  # another instance closed it: tell what it stored
                        elsewhere = await self._adopt_stored_end(handle, final)
                    elif held:
                        handle.stored_as(final.status, final.finished_at)
                        handle.publish(list(final.events))
                        # A batch with earlier events of the run, refused and held, is
                        # written again by the commit loop: the end is published after it.
                        await handle.wait_published()
                nursery.cancel_scope.cancel()
        if not handle.final_stored:
            self._final_retries.append((handle, final))
            if len(self._final_retries) > _UNSTORED_ENDS_MAX:
                dropped, _ = self._final_retries.pop(0)
                log.error("giving up storing the final state of run %s", dropped.id)
            self._keep_ended(handle)
            handle.give_up_end(unstored_end())
        elif not handle.published_final:
            self._keep_ended(handle)  # its earlier events are still to be published
        return not elsewhere

    async def _with_earlier(self, final: FinalState) -> FinalState:
        """``final`` with the run's events that are not stored yet: a batch of them in flight
        is decided first (stored, or refused and held), and those held go in the final state's
        transaction. Else a refused batch would land after the run's end, and until it did
        the store would hold an end with a hole before it (a reader on another instance takes
        a finished run's stored events for all there are). The wait is a batch's, bounded by
        ``WRITE_BUDGET``: within the final state's budget."""
        if final.run_id in self._in_flight:
            async with self._lock:  # its batch decided
                earlier = self.take(final.run_id)
        else:  # all of it not stored yet is in _pending (sync: no batch can take it meanwhile)
            earlier = self.take(final.run_id)
        if not earlier:
            return final
        return replace(final, events=(*earlier, *final.events))

    @staticmethod
    async def _tell_if_late(handle: RunHandle) -> None:
        await trio.sleep(FINAL_WRITE_BUDGET)
        if not handle.final_stored:
            handle.give_up_end(unstored_end())

    async def _store_final(self, handle: RunHandle, final: FinalState) -> bool | None:
        """Write a final state, again while the store refuses it (the caller bounds it).
        True: stored; False: the run is no longer this process's (closed by another
        instance); None: it cannot be stored (a bug, logged)."""
        backoff = Backoff()
        tries = 0
        try:
            while True:
                refused = True
                # The first failure is an error; the tries after it, debug (an ERROR line each
                # second made thousands in one outage), and the landing says how many it took.
                level = logging.ERROR if tries == 0 else logging.DEBUG
                tries += 1
                try:
                    with trio.move_on_after(WRITE_BUDGET):
                        written = await final.write(self._store)
                        self._refused = False
                        if tries > 1:
                            log.warning("the final state of run %s stored at try %d",
                                        handle.id, tries)
                        return written
                    log.log(level, "final write of run %s took over %ss; trying again",
                            handle.id, WRITE_BUDGET)
                except StoreError as exc:
                    refused = isinstance(exc, StoreUnavailable)
                    log.log(level, "could not store the final state of run %s (trying again): "
                            "%s", handle.id, exc.message)
                except Exception:
                    # Not the store's trouble but a bug (what it was given): retrying now
                    # would fail the same way. The run still ends, and the supervisor goes on.
                    log.exception("the final state of run %s cannot be stored", handle.id)
                    return None
                if refused:  # (``refusing`` while it is tried again, not only once set aside)
                    self._refused = True
                    self._ends_refused.add(handle.id)
                else:  # the store answered (this row's own trouble): not a refusal of its own
                    self._refused = False
                    self._ends_refused.discard(handle.id)
                await backoff.pause()
        finally:
            self._ends_refused.discard(handle.id)

    async def _adopt_stored_end(self, handle: RunHandle, final: FinalState) -> bool:
        """The run was closed by another instance (this one's lease lapsed, so the others took
        it for dead): its clients get the end the store has, never this process's own (True).
        A run that is gone altogether (its conversation deleted, or never stored) is told so
        (``end_gone``; False): a ``succeeded`` with an answer the store has no trace of was
        told before."""
        backoff = Backoff()
        while True:  # the caller bounds it
            try:
                run = await self._store.get_run(handle.id, owner=handle.owner)
                stored = await self._store.list_run_events(handle.id, after=handle.published_seq)
                reply = next((m for m in await self._store.get_messages(handle.conversation_id)
                              if m.id == handle.message_id), None)
                break
            except NotFound:
                handle.end_gone("the conversation was deleted")
                return False
            except StoreError as exc:
                log.error("could not read the stored end of run %s (trying again): %s",
                          handle.id, exc.message)
            await backoff.pause()
        status = RunStatus(run.status)
        log.warning("run %s was closed by another instance (%s: %s); its clients get that end",
                    handle.id, status.value, run.error)
        handle.error, handle.error_type = run.error, None
        handle.final_text = reply.content if reply is not None else ""
        handle.started_at = run.started_at
        handle.stored_as(status, run.finished_at)
        handle.publish(stored)
        return True

    def _keep_ended(self, handle: RunHandle) -> None:
        """Keep serving a run whose end is not all stored or published (bounded: the oldest
        are let go, their subscribers told ``store_unavailable``: nothing would end them)."""
        self._ended[handle.id] = handle
        while len(self._ended) > _UNSTORED_ENDS_MAX:
            oldest = self._ended.pop(next(iter(self._ended)))
            if not oldest.published_final:
                oldest.give_up_end(unstored_end())

    async def retry_final_writes(self) -> None:
        """Store the final states the store did not take within their budget; publish each
        run's end once it is stored.

        One retry pass at a time: the upkeep loop and a drain both call this, and two passes
        over the same list crashed the supervisor (the second ``remove``). A pass ends at the
        store's first refusal or first write past its budget: that is the store's answer, not
        the run's, and going on would ask it once per kept state (N writes refused, or N x
        ``WRITE_BUDGET`` against a hung store, the lock held meanwhile)."""
        async with self._final_retry_lock:
            for entry in list(self._final_retries):
                handle, final = entry
                try:
                    with trio.move_on_after(WRITE_BUDGET) as bound:
                        # With the run's events still held (a batch refused after the final
                        # state was set aside): written before its end, in its transaction,
                        # or the store would hold an end with a hole before it, which a
                        # re-join past that end (a 204) could never fill.
                        merged = await self._with_earlier(final)
                        if merged is not final:
                            if entry not in self._final_retries:  # let go meanwhile
                                taken = merged.events[:len(merged.events) - len(final.events)]
                                self._pending = [*taken, *self._pending]  # held again
                                continue
                            at = self._final_retries.index(entry)
                            entry = self._final_retries[at] = (handle, merged)
                            final = merged
                        written = await final.write(self._store)
                        self._refused = False
                        if written:
                            handle.stored_as(final.status, final.finished_at)
                            handle.publish(list(final.events))
                            self._on_stored_late(final.status.value)
                        elif not await self._adopt_stored_end(handle, final):
                            # Gone (its conversation deleted): nobody else closed it, so
                            # nobody else counted it.
                            self._on_stored_late(final.status.value)
                        if entry in self._final_retries:
                            self._final_retries.remove(entry)
                        if handle.published_final:
                            self._ended.pop(handle.id, None)
                        log.info("stored the final state of run %s on retry", handle.id)
                    if bound.cancelled_caught:
                        self._refused = True
                        log.warning("final state of run %s still not stored: the store took "
                                    "over %ss", handle.id, WRITE_BUDGET)
                        # Last in the next pass: a write the store is slow to take only for
                        # itself (a locked row, a huge answer) ended every pass first, and the
                        # others were never tried.
                        self._to_the_back(entry)
                        return
                except StoreUnavailable as exc:
                    self._refused = True
                    log.warning("final state of run %s still not stored: %s", handle.id,
                                exc.message)
                    # (Last in the next pass too: a lock on its row, a statement timeout, is
                    # its own trouble as often as the store's.)
                    self._to_the_back(entry)
                    return
                except StoreError as exc:  # this run's (a row the store cannot take)
                    # The store answered: no refusal of its own (left set, it refused every
                    # new run until another end landed, and none could start to land one).
                    self._refused = False
                    log.warning("final state of run %s still not stored: %s", handle.id,
                                exc.message)
                except Exception:
                    log.exception("final state of run %s still cannot be stored", handle.id)

    def _to_the_back(self, entry: tuple[RunHandle, FinalState]) -> None:
        if entry in self._final_retries:
            self._final_retries.remove(entry)
            self._final_retries.append(entry)

    async def store_everything(self, budget: float) -> None:
        """At shutdown: what the store refused so far gets one more ``budget`` (a volume
        freed, a database back)."""
        backoff = Backoff()
        with trio.move_on_after(budget):
            while True:
                await self.flush()
                await self.retry_final_writes()
                if not self.unstored:
                    break
                await backoff.pause()


def lost(handle: RunHandle) -> None:
    """Another instance closed ``handle``'s run (or it is gone): its events are no longer
    stored, so it stops; its end will be the stored one (``_adopt_stored_end``)."""
    if handle.cancel_reason is None and not handle.closed:
        log.warning("run %s: closed by another instance or gone; stopping it here", handle.id)
        handle.cancel_status = RunStatus.failed
    handle.cancel("the run was closed by another instance, or its conversation deleted")


def unstored_end() -> StoreUnavailable:
    """What a run's clients are told when its end could not be stored."""
    return StoreUnavailable(
        "the run has ended but the store cannot take its result yet; re-join it later")


def _runs_of(batch: list[RunEvent]) -> dict[str, object]:
    """A refused batch's runs, for its log line (the first ten, and how many): which users'
    streams are held is what an operator asks next."""
    runs = list(dict.fromkeys(e.run_id for e in batch))
    return {"runs": runs[:10], "n_runs": len(runs)}
