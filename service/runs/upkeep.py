"""The store's upkeep while runs go on, each a loop in the supervisor's nursery: final states to
store again and the store's own maintenance, cancels asked of this process by another, runs a
dead process left open, old events pruned."""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

from ..errors import NotFound, StoreError
from ..logs import get_logger
from ..store import Store
from ..store.ownership import LEASE
from .committer import EventCommitter, lost
from .handle import RunHandle
from .lifecycle import RunStatus
from .wakeups import Wakeups

__all__ = ["LAPSING", "Lease", "cancel_requests_loop", "lease_loop", "maintain_loop", "prune_loop",
           "recover_loop"]

log = get_logger("service.runs")

_IN_PROGRESS = ("queued", "running")

MAINTAIN_EVERY = 2.0  # seconds between final-state retries and store maintenance (checkpoints)
CANCEL_POLL = 0.25  # seconds between looks for cancels other workers asked for
GONE_POLL = 1.0  # seconds between looks for runs of this process deleted elsewhere
RECOVER_EVERY = 5.0  # seconds between looks for runs a dead instance left running
PRUNE_EVERY = 60.0  # seconds between prunings of old runs' events (when a retention is set)
PRUNE_PAUSE = 0.05  # seconds between two pruning batches: other writes go in between
# Why a lapsing instance stops its runs and refuses new ones (the run's error, the 503's).
LAPSING = "this instance could not renew its lease in the store"
LAPSE_POLL = 0.25  # seconds between looks for runs to stop while this lease is lapsing
RENEW_RETRY = 1.0  # seconds before a renewal that failed is tried again


async def maintain_loop(store: Store, committer: EventCommitter) -> None:
    while True:
        await trio.sleep(MAINTAIN_EVERY)
        await committer.retry_final_writes()
        try:
            await store.maintain()
        except StoreError as exc:
            log.warning("store maintenance failed: %s", exc.message)


async def cancel_requests_loop(store: Store, live: Callable[[], dict[str, RunHandle]],
                               wakeups: Wakeups) -> None:
    """Cancel this process's runs whose cancel another instance sharing the store asked for
    (``Store.request_cancel``: a client's cancel can reach any instance); woken at once by
    the asker's notification on PostgreSQL, else every ``CANCEL_POLL`` seconds."""
    looked = None
    gone_at = trio.current_time()  # the next look for runs deleted under this process
    while True:
        await wakeups.wait_cancels(CANCEL_POLL, since=looked)
        looked = wakeups.cancels_announced  # one announced during the look: look again
        runs = live()
        if not runs:
            continue
        gone: list[str] = []
        try:
            requests = await store.cancel_requests()
            if trio.current_time() >= gone_at:
                # A conversation deleted on another worker or instance while a run of it
                # began here (its delete stopped the runs it found, then the rows went): the
                # run went on, out of reach, until its next write; a silent model's, until
                # its deadline. Every GONE_POLL seconds.
                gone_at = trio.current_time() + GONE_POLL
                gone = await store.runs_missing(
                    [h.id for h in runs.values() if h.first_written and not h.closed])
        except StoreError as exc:
            log.warning("could not read cancel requests: %s", exc.message)
            continue
        for run_id, reason in [*requests, *((r, "the conversation was deleted") for r in gone)]:
            handle = runs.get(run_id)
            if handle is not None:
                handle.cancel(reason)


async def lease_loop(store: Store, live: Callable[[], dict[str, RunHandle]], *,
                     lease: Lease | None = None,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Renew this process's lease (a third of it at a time). When its renewals do not land, this
    process stops its runs (``failed``, ``store_unavailable``): past its lease another
    instance takes them for dead and closes them, and two instances must never both finish
    one run. Where leases decide (``Store.leases_decide``: PostgreSQL, whose renewals go on a
    connection of their own and land or fail within a third of a lease), once none has landed
    for two thirds of a lease, whether the one under way has failed yet or not; on SQLite,
    where a renewal is a write of the queue and a live process on the host is judged by its
    PID, once one has failed more than half a lease after the last that landed (a disk slow
    for a while does not stop a live process's runs). ``lease`` says how it goes
    (``Lease.lapsing``: ``/readyz``)."""
    # At once, before any run is served: the lease written at start-up may be old (a model's
    # load came in between), and a run of an instance whose lease has lapsed is taken for dead.
    # Bounded: a store stuck at start-up holds up serving no longer than a third of a lease.
    lease = lease or Lease()
    started, landed = trio.current_time(), False
    with trio.move_on_after(LEASE / 3):
        try:
            await store.renew_lease(LEASE)
            landed = True
        except StoreError as exc:
            log.warning("could not renew this instance's lease: %s", exc.message)
    # The last renewal that landed: this one; if it did not, none this loop can vouch for (the
    # lifespan's may have lapsed while a model loaded): taken as lapsing already, so runs are
    # stopped and ``/readyz`` says so until one lands.
    lease.sent = started if landed else started - LEASE
    to_check: set[str] = set()  # runs to look up after a lapse (until each has been)
    async with trio.open_nursery() as nursery:
        if store.leases_decide:
            nursery.start_soon(_stop_runs_when_lapsing, lease, live)
        task_status.started()
        due = started + LEASE / 3 if landed else started
        while True:
            # A third of a lease after the last one was sent (at once after a slow one): how
            # long a renewal took does not push the next one back.
            await trio.sleep_until(due)
            sent = trio.current_time()  # the lease it writes runs from then, at least
            due = sent + LEASE / 3
            try:
                await store.renew_lease(LEASE)
            except StoreError as exc:
                log.warning("could not renew this instance's lease: %s", exc.message)
                # Again soon: one failure (a blip) must not cost the runs, which stop only
                # once none has landed for two thirds of a lease.
                due = min(due, trio.current_time() + RENEW_RETRY)
                if not store.leases_decide and trio.current_time() - lease.sent > LEASE / 2:
                    lease.lapsing = True
                    _stop_runs(live(), LAPSING)
                continue
            if trio.current_time() - lease.sent > LEASE:
                to_check = set(live())
                log.warning("this instance's lease had lapsed; checking which of its %d "
                            "run(s) it still holds", len(to_check))
            lease.renewed(sent)
            if to_check:
                # Until the next renewal is due, so it is not held up (the watchdog counts
                # from sends); what is left waits for the next turn.
                with trio.move_on_at(due):
                    await _stop_runs_taken_over(store, live(), to_check)


class Lease:
    """This process's lease as its loop sees it: when the last renewal that landed was sent
    (``landed`` is set when the next one lands), and whether it is lapsing (its runs being
    stopped until one lands)."""

    def __init__(self) -> None:
        self.sent = 0.0
        self.landed = trio.Event()
        self.lapsing = False

    def renewed(self, sent: float) -> None:
        self.sent = sent
        self.lapsing = False
        self.landed.set()
        self.landed = trio.Event()


async def _stop_runs_when_lapsing(lease: Lease, live: Callable[[], dict[str, RunHandle]]) -> None:
    """Two thirds of a lease after the last renewal that landed was sent, with none landed
    since, stop the runs, whether or not the renewal under way has failed yet (one that fails
    at once, then one that takes its whole bound, would be known only at the lease's end).
    Renewals go every third of a lease, each bounded to a third: by then the next one has
    landed or failed, and a third of a lease is left for the runs' ends. Until one lands,
    runs started meanwhile are stopped too (looked for every ``LAPSE_POLL`` seconds)."""
    while True:
        sent = lease.sent
        await trio.sleep_until(sent + 2 * LEASE / 3)
        while lease.sent == sent:
            lease.lapsing = True
            _stop_runs(live(), LAPSING)
            with trio.move_on_after(LAPSE_POLL):
                await lease.landed.wait()


def _stop_runs(runs: dict[str, RunHandle], why: str) -> None:
    for handle in runs.values():
        if handle.cancel_reason is None and not handle.closed:
            log.error("run %s stopped: %s", handle.id, why)
            handle.cancel_status = RunStatus.failed
            handle.error_type = "store_unavailable"
            handle.cancel(f"the run was stopped: {why}")


async def _stop_runs_taken_over(store: Store, runs: dict[str, RunHandle],
                                to_check: set[str]) -> None:
    """This process's lease lapsed (it was stopped, or cut off from the store, for longer than
    a lease): another instance may have closed its runs meanwhile. Those are stopped now and
    their clients told the stored end (``lost``); otherwise they learnt it only at the run's
    next write, which a silent model may put off for minutes, telling "running" meanwhile.
    Only on evidence: the store has the run ended, or another instance holding it (one whose
    first write has not landed yet is not in the store at all, and is left alone). Each id
    leaves ``to_check`` once looked up; one the store could not answer for stays."""
    for run_id in sorted(to_check):
        handle = runs.get(run_id)
        if handle is None or handle.closed:
            to_check.discard(run_id)
            continue
        try:
            where = await store.run_in_progress(run_id)
            taken = where == "elsewhere" or (
                where is None and (await store.get_run(run_id)).status not in _IN_PROGRESS)
        except NotFound:  # not written yet (or deleted: its next write finds out)
            taken = False
        except StoreError as exc:
            log.warning("could not look up run %s after the lease lapsed: %s", run_id,
                        exc.message)
            continue
        to_check.discard(run_id)
        if taken:
            lost(handle)


async def recover_loop(store: Store, abandoned: set[str]) -> None:
    """Close runs left running by a dead worker that shared the store (a killed sibling:
    nothing else would, until the next start); this process's own are closed at its start.
    ``abandoned``: this process's runs whose start it answered as failed though their first
    write may have landed (a COMMIT lost with its connection): closed if it did."""
    while True:
        await trio.sleep(RECOVER_EVERY)
        for run_id in list(abandoned):
            try:
                if await store.recover_interrupted(run_id, abandoned=True):
                    log.warning("closed run %s: its start failed, but its write had landed",
                                run_id)
            except StoreError as exc:
                log.warning("could not look for run %s (its start failed): %s", run_id, exc)
                continue
            abandoned.discard(run_id)
        try:
            closed = await store.recover_interrupted()
        except StoreError as exc:
            log.warning("could not look for interrupted runs: %s", exc)
            continue
        if closed:
            log.warning("closed %d run(s) of a worker that is gone", len(closed),
                        extra={"run_ids": closed})


async def prune_loop(store: Store, retention: float) -> None:
    """Delete old finished runs' events (``retention`` seconds after they finished), a few runs
    per transaction so that no write waits long behind one."""
    while True:
        await trio.sleep(PRUNE_EVERY)
        cutoff = time.time() - retention
        try:
            while await store.prune_events(cutoff):  # noqa: ASYNC110 (a paced loop)
                await trio.sleep(PRUNE_PAUSE)
        except StoreError as exc:
            log.warning("could not prune old events: %s", exc)
