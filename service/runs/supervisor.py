"""The run supervisor: owns every run's task, commits their events, drains them at shutdown.

One supervisor per app, started in the app's lifespan with ``nursery.start(supervisor.serve)``.
Each run is a task in the supervisor's nursery with its own ``CancelScope`` (a deadline from the
run timeout) and its own nursery for the agent's work, so cancelling one run stops its LLM stream
and its tools and nothing else.

How a run ends (``_execute``):

* the agent returns -> ``succeeded``; a backend or agent error -> ``failed`` (other runs go on);
* ``handle.cancel(reason)`` (a client, an explicit cancel) -> ``cancelled``;
* its deadline passes -> ``timed_out``;
* the supervisor itself is cancelled (shutdown) -> ``cancelled`` with reason "shutdown", and the
  ``Cancelled`` keeps propagating once the final state is written.

Whatever happened, the final state (run status, the reply's text - partial if cut - and the last
events up to exactly one ``run.finished``) is written in one transaction under a shielded, bounded
scope, so a cancel cannot leave it half done.

What clients are told is what the store says: the :class:`~.committer.EventCommitter` publishes
an event only once it is committed, a run's last events only with its final state. (The store's
upkeep loops: :mod:`.upkeep`.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from ..errors import (
    ServiceError,
    ShuttingDown,
    StoreError,
    StoreUnavailable,
    TooManyRuns,
    first_leaf,
    internal_message,
    is_interrupt,
    retry_after_of_type,
    split_cancelled,
)
from ..logs import RUN_ID, get_logger
from ..metrics import Metrics
from ..store import BegunRun, MessageStatus, RunEvent, Store, new_id
from ..text import clean_text
from . import upkeep
from .call_records import CallRecords
from .committer import FINAL_WRITE_BUDGET, EventCommitter, FinalState
from .handle import RunHandle
from .lifecycle import RunStatus
from .reads import BatchedReads
from .wakeups import Wakeups

__all__ = ["RunSpec", "RunSupervisor"]

log = get_logger("service.runs")

_ABANDONED_MAX = 10_000  # runs whose start failed, still to close if their write landed

@dataclass(frozen=True)
class RunSpec:
    conversation_id: str | None  # None: a new one (``new_conversation``), in the same write
    content: str
    agent: str | None = None  # None: the conversation's, else "chat"
    model: str | None = None  # None: the conversation's, else ``default_model``
    default_model: str | None = None
    owner: str | None = None
    timeout: float | None = None  # None: the supervisor's default
    idempotency_key: str | None = None  # a retried request's: it finds its run (begin_run)
    # The OpenAI-compatible endpoint supplies the whole history and its own options:
    messages: tuple[Any, ...] | None = None  # ChatMessage history ending with the question
    client_tools: tuple[dict[str, Any], ...] = ()  # passed through to the model (chat agent)
    max_tokens: int | None = None
    temperature: float | None = None
    stop: tuple[str, ...] = ()
    options: tuple[tuple[str, Any], ...] = ()  # other OpenAI options (ChatRequest.options)
    new_conversation: dict[str, str | None] | None = None  # title, system, model, agent
    # Called with a new-conversation run's handle as soon as it exists, before its first write
    # lands (sync): its request owns it from then on (``service.api.owned``).
    on_handle: Callable[[RunHandle], None] | None = None


AgentRunner = Callable[[RunHandle, RunSpec, trio.Nursery], Any]  # returns the answer's text


class RunSupervisor:
    def __init__(
        self,
        store: Store,
        runner: AgentRunner,
        *,
        metrics: Metrics,
        max_runs: int = 1000,
        run_timeout: float = 300.0,
        events_retention: float = 0.0,
        history_chars: int | None = None,
    ) -> None:
        self._store = store
        # Of a conversation's earlier messages, a run reads the newest its history can keep
        # (SERVICE_HISTORY_CHARS; None: all).
        self.history_chars = history_chars
        self._runner = runner
        self._metrics = metrics
        self.max_runs = max_runs
        self.run_timeout = run_timeout
        self.events_retention = events_retention  # seconds; 0: events are kept for ever
        self._runs: dict[str, RunHandle] = {}
        self._reserved = 0  # runs being set up (counted against max_runs)
        # Runs whose first write is in flight: set when each is launched (or failed to start).
        self._starting: dict[str, trio.Event] = {}
        self._starting_on: dict[str, str] = {}  # run id -> its conversation's, while starting
        self._cancel_at_launch: dict[str, str] = {}  # run id -> reason, asked while starting
        # Runs whose start was answered as failed, though their first write may have landed.
        self._abandoned: set[str] = set()
        self._starts_done = trio.Event()  # set when _reserved drops to 0 (drain waits on it)
        self._nursery: trio.Nursery | None = None
        self._scope: trio.CancelScope | None = None
        self.committer = EventCommitter(
            store, self._runs.get, on_stored_late=lambda s: self._metrics.runs.labels(s).inc())
        self.call_records = CallRecords(store)  # the interceptor's recorder (lifespan)
        self.wakeups = Wakeups()  # what other instances committed (on PostgreSQL)
        self.reads = BatchedReads(store)  # readers' store reads, one query for all waiting
        self.draining = False
        self.failure: str | None = None  # set if ``serve`` ended with an error
        self.lease = upkeep.Lease()  # this process's lease, as its loop sees it (``/readyz``)
        self._cancelling = False  # the drain's grace is over: runs still going are cancelled

    def __repr__(self) -> str:
        return (f"<RunSupervisor [{len(self._runs)} runs, "
                f"{self.committer.pending} events pending]>")

    # -- lifecycle ------------------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[RunSupervisor] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Own the runs until cancelled. Runs still going then end ``cancelled`` (shutdown).

        If it ever ends with an error instead, ``failure`` says so (``/healthz`` and ``/readyz``
        report it: the process would still answer HTTP but could run nothing).
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._scope = nursery.cancel_scope
                nursery.start_soon(self.committer.run)
                await nursery.start(self.call_records.run)
                nursery.start_soon(self.reads.run)
                nursery.start_soon(upkeep.maintain_loop, self._store, self.committer)
                nursery.start_soon(self._store.listen, self.wakeups.notified)
                nursery.start_soon(upkeep.cancel_requests_loop, self._store, lambda: self._runs,
                                   self.wakeups)
                nursery.start_soon(upkeep.recover_loop, self._store, self._abandoned)
                await nursery.start(partial(upkeep.lease_loop, self._store, lambda: self._runs,
                                            lease=self.lease))
                if self.events_retention > 0:
                    nursery.start_soon(upkeep.prune_loop, self._store, self.events_retention)
                task_status.started(self)
                await trio.sleep_forever()
        except BaseException as exc:
            _, rest = split_cancelled(exc)
            if rest is not None:
                leaf = first_leaf(rest)
                self.failure = f"the run supervisor stopped: {type(leaf).__name__}: {leaf}"
                log.error("the run supervisor stopped", exc_info=rest)
            raise

    def stop(self) -> None:
        """End ``serve`` (runs still going end ``cancelled``, reason "shutdown"). Sync."""
        if self._scope is not None:
            self._scope.cancel()

    @property
    def nursery(self) -> trio.Nursery:
        if self._nursery is None:
            raise RuntimeError("the supervisor is not serving")
        return self._nursery

    @property
    def in_flight(self) -> int:
        return len(self._runs)

    @property
    def starting_count(self) -> int:
        """Runs whose first write is in flight (not launched yet, counted against max_runs)."""
        return self._reserved

    def live(self) -> list[RunHandle]:
        """The runs in flight in this process."""
        return list(self._runs.values())

    def starting(self, run_id: str) -> bool:
        """Whether a run's first write is in flight or has just landed, its launch to come."""
        return run_id in self._starting

    async def stop_conversation(self, conversation_id: str, reason: str) -> None:
        """Stop this process's runs on a conversation, those in flight and those whose first
        write is in flight (cancelled as they launch; one whose write fails does not start),
        and return once each has ended: a delete's, so that no run of a deleted conversation
        goes on after it (calling the model for a conversation that is gone), and the LLM
        calls of those stopped before its rows go are deleted with them."""
        starting = [run_id for run_id, on in self._starting_on.items() if on == conversation_id]
        for run_id in starting:
            self._cancel_at_launch.setdefault(run_id, reason)
        for run_id in starting:
            if (launched := self._starting.get(run_id)) is not None:
                await launched.wait()
        going = [h for h in self._runs.values() if h.conversation_id == conversation_id]
        for handle in going:
            handle.cancel(reason)
        for handle in going:
            await handle.finished.wait()

    async def cancel_starting(self, run_id: str, reason: str) -> RunHandle | None:
        """Cancel a run whose first write is in flight (it is stored, maybe visible, but not
        launched): it is cancelled as it launches. Returns its handle once launched (None if
        it was not starting, or its start failed)."""
        launched = self._starting.get(run_id)
        if launched is None:
            return self._runs.get(run_id)
        self._cancel_at_launch.setdefault(run_id, reason)
        await launched.wait()
        return self._runs.get(run_id)

    def get(self, run_id: str) -> RunHandle | None:
        """A live run, or one that ended but whose final write is still to be retried (its
        handle holds run.finished, which the store does not have yet)."""
        return self._runs.get(run_id) or self.committer.ended(run_id)

    async def drain(self, grace: float) -> None:
        """Refuse new runs, give those in flight ``grace`` seconds, then cancel the rest."""
        self.draining = True
        deadline = trio.current_time() + grace
        told: set[str] = set()

        def tell() -> None:
            for handle in list(self._runs.values()):
                if handle.id not in told and handle.status is RunStatus.running:
                    told.add(handle.id)
                    _tell_shutdown(handle, max(0.0, deadline - trio.current_time()))

        tell()
        with trio.move_on_at(deadline):
            # Runs whose first write was in flight when the drain began are in flight too: they
            # get the grace, told as each is launched (they were cancelled at once, untold).
            while self._reserved:
                self._starts_done = trio.Event()
                await self._starts_done.wait()
                tell()
            for handle in list(self._runs.values()):
                await handle.finished.wait()
        # Runs whose first write was in flight when the drain began are launched once it lands:
        # wait for those starts (bounded), so that they are cancelled and stored with the rest.
        with trio.move_on_after(FINAL_WRITE_BUDGET):
            while self._reserved:
                self._starts_done = trio.Event()
                await self._starts_done.wait()
        self._cancelling = True
        tell()  # (launched at the grace's end: told, with no grace left)
        for handle in list(self._runs.values()):
            handle.cancel("shutdown")
        for handle in list(self._runs.values()):
            await handle.finished.wait()
        async with trio.open_nursery() as nursery:  # what the store refused: one more try
            nursery.start_soon(self.committer.store_everything, FINAL_WRITE_BUDGET)
            nursery.start_soon(self.call_records.store_everything, FINAL_WRITE_BUDGET)
        if self.unstored:
            log.error("shutting down with %d run(s) not stored: the store refused their final "
                      "state or events", self.unstored)

    @property
    def unstored(self) -> int:
        """Runs whose final state, or events, the store has not taken (yet)."""
        return self.committer.unstored

    async def flush(self) -> bool:
        """Write the pending events now (``EventCommitter.flush``)."""
        return await self.committer.flush()

    # -- starting runs --------------------------------------------------------------------------

    async def start(self, spec: RunSpec) -> RunHandle:
        """Start a run; returns once it is stored and its task is started.

        The run's task is started in the supervisor's nursery, never inside the caller's cancel
        scope: a caller that goes away once the run's first write has been taken (it then lands
        whole) leaves a started run, which its endpoint cancels or not (``on_disconnect``).
        A caller cancelled before that write was taken starts nothing that lasts.
        """
        if self.draining:
            raise ShuttingDown("the service is shutting down; no new runs")
        if len(self._runs) + self._reserved >= self.max_runs:
            raise TooManyRuns(f"{self.max_runs} runs in flight; retry later")
        if self.lease.lapsing and self._store.leases_decide:
            # It would be stopped within ``LAPSE_POLL``: refused instead (503, retried later or
            # on another instance, as ``/readyz`` says). One admitted just before the lease
            # began to lapse is stopped by the lease's watchdog. (On SQLite a lease lapses only
            # while the store refuses writes, which the check below says.)
            raise StoreUnavailable(f"{upkeep.LAPSING}; no new runs here until it is renewed")
        self.committer.refuse_while_refusing()
        if spec.conversation_id is None:
            return await self._start_new(spec)
        self._reserved += 1
        run_id = new_id("run")
        self._starting[run_id] = launched = trio.Event()
        self._starting_on[run_id] = spec.conversation_id
        try:
            # One write checks the conversation, resolves agent and model, stores the run, both
            # messages and event 1 (run.started), and reads the history for the agent; the
            # agent starts once it has landed.
            try:
                begun = await self._store.begin_run(
                    spec.conversation_id, content=spec.content, agent=spec.agent,
                    model=spec.model, owner=spec.owner, default_model=spec.default_model,
                    run_id=run_id, history_chars=self.history_chars,
                    idempotency_key=spec.idempotency_key)
            except StoreUnavailable:
                # Its COMMIT may have landed all the same (a connection lost during it): the
                # caller is told no run started, so if it did, the upkeep closes it.
                if len(self._abandoned) < _ABANDONED_MAX:
                    self._abandoned.add(run_id)
                raise
            handle = self._new_handle(begun, spec)
            handle.adopt_first_event(begun.started)
            if (asked := self._cancel_at_launch.get(run_id)) is not None:
                # A cancel (or a delete) came while its write was in flight: it starts
                # stopped, its agent stopped before its first call (``_execute``); cancelled
                # only once launched, the agent's first step ran, its upstream call made.
                handle.cancel(asked)
            await self._launch(handle, spec)
        finally:
            del self._starting[run_id], self._starting_on[run_id]
            launched.set()
            self._reserved -= 1
            self._starts_done.set()  # (the drain tells each run launched meanwhile)
            reason = self._cancel_at_launch.pop(run_id, None)
        if self._cancelling:  # its write landed after the drain's grace: it ends at once
            _tell_shutdown(handle, 0.0)
            handle.cancel("shutdown")
        elif reason is not None:  # a cancel (or a delete) came while its write was in flight
            handle.cancel(reason)
        return handle

    async def _start_new(self, spec: RunSpec) -> RunHandle:
        """A run on a new conversation (the OpenAI-compatible endpoint, which brings its own
        history): nothing has to be read first, so the agent starts, and its upstream request
        goes out, while the run's first write commits (that write is most of the time a request
        spends in the service before its upstream call, measured in ``service.bench``).

        Ordering: the run's task is spawned (``start_soon``: it first runs once this task
        yields) just before the write is called, and the write joins the store's queue before
        this task's first checkpoint (``Store.write_run``), so it is in the queue ahead of every
        other write about the run (its events, its LLM calls, its final state), which land
        after it. (Started with ``nursery.start`` and a go-ahead event, the agent's first
        step waited three scheduling rounds: 0.5-1 ms on a busy loop before the upstream
        request.) Event 1
        (``run.started``) is written with the run and published once that write has landed;
        events the run commits meanwhile are held back behind it (``reserve_first_event``), so
        nothing about the run is published before the run is stored, and the first token does
        not wait for a commit of its own for ``run.started``. If the write fails (the run ends
        ``failed``), or this caller is cancelled before the write was taken (``cancelled``), the
        run is stopped (its upstream call at once; its later writes find no run and change
        nothing) and the error is raised here. The interceptor's record of an upstream call it
        made is kept: that call happened.
        """
        begun = self._store.plan_run(
            content=spec.content, agent=spec.agent, model=spec.model, owner=spec.owner,
            new_conversation=spec.new_conversation, default_model=spec.default_model,
        )
        if spec.stop and begun.run.agent != "chat":
            # The stop sequences its answer is cut at after the run (the chat agent's server
            # cuts it): in its first event, so that a survivor closing it after its instance
            # died cuts its answer so far there too (``ownership.close_interrupted``).
            s = begun.started
            begun = begun._replace(started=RunEvent.make(
                s.run_id, s.seq, s.type, {**s.data, "stop": list(spec.stop)}, s.created_at))
        handle = self._new_handle(begun, spec)
        handle.reserve_first_event()
        self._launch_soon(handle, spec)
        if spec.on_handle is not None:
            # Before the write: a client that leaves while it commits (a write taken into a
            # commit is waited for, shielded, while the agent already streams) stops the run
            # at once through its request (``CancelOwnedRuns`` sees the disconnect), not once
            # the commit is done (a slow disk: seconds).
            spec.on_handle(handle)
        try:
            # No checkpoint between the two: the write is queued before the run's task runs.
            await self._store.write_run(begun)
        except BaseException as exc:
            # Failed, not cancelled (unless this caller was): the service could not store it.
            _not_stored(handle, begun, exc if isinstance(exc, Exception) else None)
            raise
        handle.adopt_first_event(begun.started)
        return handle

    async def _launch(self, handle: RunHandle, spec: RunSpec) -> None:
        """Register the run and start its task in the supervisor's nursery; returns once the
        task runs (``nursery.start``): its status is then ``running``.

        Shielded: the task hands itself over before its first checkpoint, so the wait is one
        scheduler pass, and a caller cancelled meanwhile cannot leave a started run behind
        that it does not know about."""
        self._runs[handle.id] = handle
        try:
            with trio.CancelScope(shield=True):
                await self.nursery.start(self._run, handle, spec)
        except BaseException:
            del self._runs[handle.id]
            raise
        self._metrics.runs_in_flight.inc()

    def _launch_soon(self, handle: RunHandle, spec: RunSpec) -> None:
        """Register the run and spawn its task in the supervisor's nursery, where it first
        runs once the caller yields (sync: nothing can cancel the caller in between)."""
        self._runs[handle.id] = handle
        try:
            self.nursery.start_soon(self._run, handle, spec)
        except BaseException:
            del self._runs[handle.id]
            raise
        self._metrics.runs_in_flight.inc()

    def _new_handle(self, begun: BegunRun, spec: RunSpec) -> RunHandle:
        run = begun.run
        handle = RunHandle(
            run_id=run.id, conversation_id=run.conversation_id, agent=run.agent,
            model=run.model, owner=spec.owner, message_id=begun.reply.id,
            sink=self.committer.enqueue, begun=begun,
        )
        # A request's own timeout, never more than the service's (SERVICE_RUN_TIMEOUT).
        timeout = min(spec.timeout, self.run_timeout) if spec.timeout else self.run_timeout
        handle.scope.deadline = trio.current_time() + timeout
        return handle

    async def _run(
        self, handle: RunHandle, spec: RunSpec,
        *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()  # before any checkpoint: see _launch
        token = RUN_ID.set(handle.id)
        try:
            await self._execute(handle, spec)
        finally:
            RUN_ID.reset(token)
            del self._runs[handle.id]
            self._metrics.runs_in_flight.dec()

    async def _execute(self, handle: RunHandle, spec: RunSpec) -> None:
        status = RunStatus.failed
        answer: str | None = None
        error: str | None = None
        try:
            with handle.scope:
                handle.set_status(RunStatus.running)
                await trio.lowlevel.checkpoint_if_cancelled()  # (stopped before its launch)
                try:
                    async with trio.open_nursery() as run_nursery:
                        answer = await self._runner(handle, spec, run_nursery)
                    status = RunStatus.succeeded
                except Exception as group:
                    exc = first_leaf(group)  # the run's nursery wraps errors in an ExceptionGroup
                    status = RunStatus.failed
                    if isinstance(exc, ServiceError):
                        error, handle.error_type = exc.message, exc.type
                        handle.error_event = {"type": exc.type, "message": exc.message}
                        if exc.retry_after is not None:  # the upstream said when (429, 503)
                            handle.error_event["retry_after"] = exc.retry_after
                        # One line per failed run, its upstream's failures too (the most
                        # common: a client was told, the log said only its 200).
                        log.warning("run failed (%s): %s", exc.type, exc.message)
                    else:
                        # A bug in an agent or a tool runner: this run fails, the others go on.
                        log.error("run crashed", exc_info=group)
                        error = internal_message(exc)
                        handle.error_type = "internal_error"
                        handle.error_event = {"type": "internal_error", "message": error}
            if handle.scope.cancelled_caught:
                if handle.cancel_reason is not None:
                    status, error = handle.cancel_status, handle.cancel_reason
                else:
                    status, error = _timed_out(handle)
                    log.warning("run timed out: %s", error)
        except BaseException as exc:  # noqa: ASYNC103 (re-raised unless no Cancelled is in it)
            cancelled, rest = split_cancelled(exc)
            if cancelled is not None or is_interrupt(rest):
                # Cancelled from outside this run's scope (the supervisor is shutting down),
                # maybe in a group from the run's nursery: record, then keep propagating.
                handle.cancel_reason = handle.cancel_reason or "shutdown"
                # _finish shields and bounds its own waits; this outer bound only says so.
                with trio.move_on_after(2 * FINAL_WRITE_BUDGET, shield=True):
                    await self._finish(handle, RunStatus.cancelled, None, handle.cancel_reason)
                if cancelled is not None and rest is not None:
                    # A tool failing while it unwinds must not turn a shutdown into a crash:
                    # log it, and let only the cancellation propagate.
                    log.error("run raised while being shut down", exc_info=rest)
                    raise cancelled from None  # noqa: ASYNC104 (the Cancelled part, re-raised)
                raise
            # An error that escaped the run's own scope: raised by a tool or a stream while the
            # run was being cancelled, or not an Exception (a SystemExit from an agent's or a
            # tool's code). It ends this run, never the supervisor.
            assert rest is not None  # no Cancelled in it, so all of it is the rest
            log.error("run failed outside its own error handling", exc_info=rest)
            if handle.cancel_reason is not None:
                status, error = handle.cancel_status, handle.cancel_reason
            elif handle.scope.cancelled_caught:  # its deadline ended it; the rest is logged
                status, error = _timed_out(handle)
            else:
                leaf = first_leaf(rest)
                status, error = RunStatus.failed, internal_message(leaf)
                handle.error_type = "internal_error"
                handle.error_event = {"type": "internal_error", "message": error}
        await self._finish(handle, status, answer, error)

    async def _finish(
        self, handle: RunHandle, status: RunStatus, answer: str | None, error: str | None
    ) -> None:
        """Store the run's final state with its last events, then publish them.

        Shielded and bounded (``EventCommitter.finish``): whatever is cancelled, it ends.
        """
        # Its end: the error that ended it, its message, run.finished; stored together.
        last: list[tuple[str, dict[str, Any]]] = []
        # The error's text as the store keeps it (a NUL or a lone surrogate from an upstream's
        # message becomes U+FFFD): told as stored, not raw while the store says otherwise.
        error = clean_text(error) if error else error
        # So is its answer (an agent may decode one from JSON: "\u0000"), which a non-stream
        # request is answered with (``final_text``).
        answer = clean_text(answer) if answer else answer
        if handle.error_event is not None and isinstance(handle.error_event.get("message"),
                                                         str):
            handle.error_event = {**handle.error_event,
                                  "message": clean_text(handle.error_event["message"])}
        if handle.error_event is None and handle.error_type is not None and error:
            # Ended by its deadline, or stopped because the store could not take it: a stream
            # says why with the type, as a non-stream answer's status does (504 run_timeout).
            handle.error_event = {"type": handle.error_type, "message": error}
            if (seconds := retry_after_of_type(handle.error_type)) is not None:
                handle.error_event["retry_after"] = seconds  # stopped for a lapse: 5
        if handle.error_event is not None:
            last.append(("error", handle.error_event))
        if status is RunStatus.succeeded and answer is not None:
            content, msg_status = answer, MessageStatus.complete
            last.append(("message", {"id": handle.message_id, "role": "assistant",
                                     "content": answer, **handle.result_extra}))
        elif status is RunStatus.failed:
            content, msg_status = handle.partial_text, MessageStatus.error
        else:
            content, msg_status = handle.partial_text, MessageStatus.cancelled
        handle.error = error
        handle.final_text = content
        # The model that answered (the run's own, or the backend's choice when nothing named
        # one: run.started then said null), as the run is stored with it.
        # A reply cut short is told as stored (its ``message`` tells a whole one): of a ReAct
        # turn only its answer's part, not the thought its clients were streamed.
        last.append(("run.finished", {"status": status.value, "usage": handle.usage,
                                      **({"model": handle.model} if handle.model else {}),
                                      **({"error": error} if error else {}),
                                      **({} if status is RunStatus.succeeded
                                         else {"content": content})}))
        closing = handle.close(last)
        # The run's events not taken by a batch yet go with its final state; one taken
        # already is written before it (the store writes in call order) or, if refused, again
        # after it: publishing waits for it.
        events = tuple(self.committer.take(handle.id) + closing)
        ours = await self.committer.finish(handle, FinalState(
            handle.id, status, handle.message_id, content, msg_status, error, handle.usage,
            events, model=handle.model))
        if ours and handle.final_stored:
            # (Closed by another instance: counted there, as its recovery closed it. Kept for
            # a retry: counted once it lands, by the committer, and not if it is adopted.)
            self._metrics.runs.labels(status.value).inc()
        handle.finished.set()


def _tell_shutdown(handle: RunHandle, grace: float) -> None:
    if not handle.closed:
        handle.emit("shutdown", {"message": "the service is shutting down", "grace": grace})


def _not_stored(handle: RunHandle, begun: BegunRun, exc: Exception | None) -> None:
    """A ``/v1`` run whose first write did not land: stopped (its upstream call at once; its
    later writes find no run and change nothing); ``failed`` if the store refused it."""
    if isinstance(exc, StoreError):
        handle.cancel_status, handle.error_type = RunStatus.failed, exc.type
    handle.cancel("the run could not be stored")
    # Not stored, and nobody was told the run's id: released so that the handle's events (its
    # end among them) reach a subscriber in order all the same.
    handle.adopt_first_event(begun.started)




def _timed_out(handle: RunHandle) -> tuple[RunStatus, str]:
    """The end of a run its deadline cut (the status and error it is stored and told with)."""
    handle.error_type = "run_timeout"
    return RunStatus.timed_out, "the run's deadline passed"
