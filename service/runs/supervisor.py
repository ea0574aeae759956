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

Whatever happened, the final state (run status, the reply's text - partial if cut - and the
last events up to exactly one ``run.finished``) is written in one transaction under a shielded,
bounded scope, so a cancel cannot leave it half done.

What clients are told is what the store says: an event is published (reaches a subscriber) only
once it is committed, and a run's last events (``message``, ``run.finished``) only in the
transaction of its final state. A batch the store refuses (a full volume, a database away) is
held, in order, and written again with a back-off; nothing after it is published meanwhile. A
final state the store cannot take within ``_FINAL_WRITE_BUDGET`` is kept and retried; its
subscribers are told ``store_unavailable`` instead of an end the store might contradict.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from ..errors import (
    BackendError,
    ServiceError,
    ShuttingDown,
    StoreError,
    StoreUnavailable,
    TooManyRuns,
)
from ..logs import RUN_ID, get_logger
from ..metrics import Metrics
from ..store import MessageStatus, RunEventRecord, Store, new_id
from .events import RunEvent
from .handle import RunHandle
from .lifecycle import RunStatus

__all__ = ["RunSpec", "RunSupervisor"]

log = get_logger("service.runs")

_WRITE_BUDGET = 10.0  # seconds one store write (a batch, a final state) may take
_FINAL_WRITE_BUDGET = 15.0  # seconds a run's final state is tried (again) before it is kept
_RETRY_FIRST, _RETRY_MAX = 0.1, 2.0  # seconds between writes the store refused, doubling
_CHECKPOINT_EVERY = 2.0  # seconds between WAL checkpoints (the store's writer never does them)
_PENDING_MAX = 100_000  # events held while the store refuses them; past it their runs fail
_UNSTORED_ENDS_MAX = 1_000  # ended runs whose final write failed, still served from memory
_CANCEL_POLL = 0.25  # seconds between looks for cancels other workers asked for
_RECOVER_EVERY = 30.0  # seconds between looks for runs a dead sibling worker left running
_PRUNE_EVERY = 60.0  # seconds between prunings of old runs' events (when a retention is set)
_PRUNE_PAUSE = 0.05  # seconds between two pruning batches: other writes go in between


@dataclass(frozen=True)
class RunSpec:
    conversation_id: str | None  # None: a new one (``new_conversation``), in the same write
    content: str
    agent: str | None = None  # None: the conversation's, else "chat"
    model: str | None = None  # None: the conversation's, else ``default_model``
    default_model: str | None = None
    owner: str | None = None
    timeout: float | None = None  # None: the supervisor's default
    # The OpenAI-compatible endpoint supplies the whole history and its own options:
    messages: tuple[Any, ...] | None = None  # ChatMessage history ending with the question
    client_tools: tuple[dict[str, Any], ...] = ()  # passed through to the model (chat agent)
    max_tokens: int | None = None
    temperature: float | None = None
    stop: tuple[str, ...] = ()
    options: tuple[tuple[str, Any], ...] = ()  # other OpenAI options (ChatRequest.options)
    new_conversation: dict[str, str | None] | None = None  # title, system, model, agent


# An agent runner gets the handle and returns the final answer text.
AgentRunner = Callable[[RunHandle, RunSpec, trio.Nursery], Any]


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
    ) -> None:
        self._store = store
        self._runner = runner
        self._metrics = metrics
        self.max_runs = max_runs
        self.run_timeout = run_timeout
        self.events_retention = events_retention  # seconds; 0: events are kept for ever
        self._runs: dict[str, RunHandle] = {}
        self._reserved = 0  # runs being set up (counted against max_runs)
        # Runs whose first write is in flight: set when each is launched (or failed to start).
        self._starting: dict[str, trio.Event] = {}
        self._cancel_at_launch: dict[str, str] = {}  # run id -> reason, asked while starting
        self._starts_done = trio.Event()  # set when _reserved drops to 0 (drain waits on it)
        self._nursery: trio.Nursery | None = None
        self._scope: trio.CancelScope | None = None
        self._pending: list[RunEvent] = []  # emitted, not yet written (or refused: held)
        self._retrying = False  # the last batch was refused: the next may hold stored events
        self._wake = trio.Event()
        self._commit_lock = trio.Lock()  # one event batch in flight at a time
        # Final states the store did not take within the budget: retried until it does.
        self._final_retries: list[tuple[RunHandle, list[RunEvent], dict[str, Any]]] = []
        self._final_retry_lock = trio.Lock()
        self._unstored_ends: dict[str, RunHandle] = {}  # their runs, still served to re-joins
        self.draining = False
        self.failure: str | None = None  # set if ``serve`` ended with an error
        self._cancelling = False  # the drain's grace is over: runs still going are cancelled

    def __repr__(self) -> str:
        return f"<RunSupervisor [{len(self._runs)} runs, {len(self._pending)} events pending]>"

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
                nursery.start_soon(self._commit_loop)
                nursery.start_soon(self._checkpoint_loop)
                nursery.start_soon(self._cancel_requests_loop)
                nursery.start_soon(self._recover_loop)
                if self.events_retention > 0:
                    nursery.start_soon(self._prune_loop)
                task_status.started(self)
                await trio.sleep_forever()
        except BaseException as exc:
            _, rest = _split_cancelled(exc)
            if rest is not None:
                leaf = _leaf(rest)
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

    def starting(self, run_id: str) -> bool:
        """Whether a run's first write is in flight or has just landed, its launch to come."""
        return run_id in self._starting

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
        return self._runs.get(run_id) or self._unstored_ends.get(run_id)

    async def drain(self, grace: float) -> None:
        """Refuse new runs, give those in flight ``grace`` seconds, then cancel the rest."""
        self.draining = True
        for handle in list(self._runs.values()):
            if not handle.closed and handle.status is RunStatus.running:
                handle.emit("shutdown", {"message": "the service is shutting down", "grace": grace})
        with trio.move_on_after(grace):
            for handle in list(self._runs.values()):
                await handle.finished.wait()
        # Runs whose first write was in flight when the drain began are launched once it lands:
        # wait for those starts (bounded), so that they are cancelled and stored with the rest.
        with trio.move_on_after(_FINAL_WRITE_BUDGET):
            while self._reserved:
                self._starts_done = trio.Event()
                await self._starts_done.wait()
        self._cancelling = True
        for handle in list(self._runs.values()):
            handle.cancel("shutdown")
        for handle in list(self._runs.values()):
            await handle.finished.wait()
        # What the store refused so far gets one more budget: a volume freed, a database back.
        pause = _RETRY_FIRST
        with trio.move_on_after(_FINAL_WRITE_BUDGET):
            while True:
                await self.flush()
                await self.retry_final_writes()
                if not self.unstored:
                    break
                await trio.sleep(pause)
                pause = min(2 * pause, _RETRY_MAX)
        if self.unstored:
            log.error("shutting down with %d run(s) not stored: the store refused their final "
                      "state or events", self.unstored)

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
        if spec.conversation_id is None:
            return await self._start_new(spec)
        self._reserved += 1
        run_id = new_id("run")
        self._starting[run_id] = launched = trio.Event()
        try:
            # One write checks the conversation, resolves agent and model, stores the run, both
            # messages and event 1 (run.started), and reads the history for the agent; the
            # agent starts once it has landed.
            begun = await self._store.begin_run(
                spec.conversation_id, content=spec.content, agent=spec.agent,
                model=spec.model, owner=spec.owner, default_model=spec.default_model,
                run_id=run_id,
            )
            handle = self._new_handle(begun, spec)
            handle.adopt_first_event(_event(begun.started))
            self._launch(handle, spec)
        finally:
            del self._starting[run_id]
            launched.set()
            self._reserved -= 1
            if not self._reserved:
                self._starts_done.set()
            reason = self._cancel_at_launch.pop(run_id, None)
        if self._cancelling:  # its write landed after the drain's grace: it ends at once
            handle.cancel("shutdown")
        elif reason is not None:  # a cancel (or a delete) came while its write was in flight
            handle.cancel(reason)
        return handle

    async def _start_new(self, spec: RunSpec) -> RunHandle:
        """A run on a new conversation (the OpenAI-compatible endpoint, which brings its own
        history): nothing has to be read first, so the agent starts, and its upstream request
        goes out, while the run's first write commits (that write is most of the time a request
        spends in the service before its upstream call, measured in ``service.bench``).

        Ordering: the write is called before the agent's task first runs and before this task's
        first checkpoint, so it is queued in the store ahead of every other write about the run
        (its events, its LLM calls, its final state), which therefore land after it. Event 1
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
        handle = self._new_handle(begun, spec)
        handle.reserve_first_event()
        self._launch(handle, spec)
        try:
            await self._store.write_run(begun)
        except BaseException as exc:
            # Failed, not cancelled (unless this caller was): the service could not store it.
            if isinstance(exc, StoreError):
                handle.cancel_status, handle.error_type = RunStatus.failed, exc.type
            handle.cancel("the run could not be stored")
            # Not stored, and nobody was told the run's id: released so that the handle's
            # events (its end among them) reach a subscriber in order all the same.
            handle.adopt_first_event(_event(begun.started))
            raise
        handle.adopt_first_event(_event(begun.started))
        return handle

    def _launch(self, handle: RunHandle, spec: RunSpec) -> None:
        """Register the run and start its task in the supervisor's nursery (sync)."""
        self._runs[handle.id] = handle
        try:
            self.nursery.start_soon(self._run, handle, spec)
        except BaseException:
            del self._runs[handle.id]
            raise
        self._metrics.runs_in_flight.inc()

    def _new_handle(self, begun: Any, spec: RunSpec) -> RunHandle:
        run = begun.run
        handle = RunHandle(
            run_id=run.id, conversation_id=run.conversation_id, agent=run.agent,
            model=run.model, owner=spec.owner, message_id=begun.reply.id, sink=self._enqueue,
        )
        handle.begun = begun
        # A request's own timeout, never more than the service's (SERVICE_RUN_TIMEOUT).
        timeout = min(spec.timeout, self.run_timeout) if spec.timeout else self.run_timeout
        handle.scope.deadline = trio.current_time() + timeout
        return handle

    async def _run(self, handle: RunHandle, spec: RunSpec) -> None:
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
                try:
                    async with trio.open_nursery() as run_nursery:
                        answer = await self._runner(handle, spec, run_nursery)
                    status = RunStatus.succeeded
                except Exception as group:
                    exc = _leaf(group)  # the run's nursery wraps errors in an ExceptionGroup
                    status = RunStatus.failed
                    if isinstance(exc, ServiceError):
                        error, handle.error_type = exc.message, exc.type
                        handle.error_event = {"type": exc.type, "message": exc.message}
                        if exc.retry_after is not None:  # the upstream said when (429, 503)
                            handle.error_event["retry_after"] = exc.retry_after
                        if not isinstance(exc, BackendError):
                            log.warning("run failed: %s", exc.message)
                    else:
                        # A bug in an agent or a tool runner: this run fails, the others go on.
                        log.error("run crashed", exc_info=group)
                        error = _internal(exc)
                        handle.error_type = "internal_error"
                        handle.error_event = {"type": "internal_error", "message": error}
            if handle.scope.cancelled_caught:
                if handle.cancel_reason is not None:
                    status, error = handle.cancel_status, handle.cancel_reason
                else:
                    status, error = RunStatus.timed_out, "the run's deadline passed"
                    handle.error_type = "run_timeout"
        except BaseException as exc:  # noqa: ASYNC103 (re-raised unless no Cancelled is in it)
            cancelled, rest = _split_cancelled(exc)
            if cancelled is not None or _interrupt(rest):
                # Cancelled from outside this run's scope (the supervisor is shutting down),
                # maybe in a group from the run's nursery: record, then keep propagating.
                handle.cancel_reason = handle.cancel_reason or "shutdown"
                # _finish shields and bounds its own waits; this outer bound only says so.
                with trio.move_on_after(2 * _FINAL_WRITE_BUDGET, shield=True):
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
            else:
                leaf = _leaf(rest)
                status, error = RunStatus.failed, _internal(leaf)
                handle.error_type = "internal_error"
                handle.error_event = {"type": "internal_error", "message": error}
        await self._finish(handle, status, answer, error)

    async def _finish(
        self, handle: RunHandle, status: RunStatus, answer: str | None, error: str | None
    ) -> None:
        """Store the run's final state with its last events, then publish them.

        Shielded (the final state must be recorded whatever is cancelled) and bounded: the
        write is tried again while the store refuses it, for ``_FINAL_WRITE_BUDGET`` seconds;
        after that it is kept for the checkpoint loop's retries and the run's subscribers are
        told ``store_unavailable`` rather than an end the store does not have.
        """
        # Its end: the error that ended it, its message, run.finished; stored together.
        last: list[tuple[str, dict[str, Any]]] = []
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
        last.append(("run.finished", {"status": status.value, "usage": handle.usage,
                                      **({"error": error} if error else {})}))
        closing = handle.close(last)
        # The run's events not taken by a batch yet go with its final state (sync: no batch
        # can take them in between); one taken already is written before it (the store
        # writes in call order) or, if refused, again after it: publishing waits for it.
        mine = [e for e in self._pending if e.run_id == handle.id]
        if mine:
            self._pending = [e for e in self._pending if e.run_id != handle.id]
        events = mine + closing
        final: dict[str, Any] = {
            "run_id": handle.id, "status": status.value, "message_id": handle.message_id,
            "content": content, "message_status": msg_status, "error": error,
            "usage": handle.usage, "events": [_record(e) for e in events],
        }
        with trio.move_on_after(_FINAL_WRITE_BUDGET, shield=True):
            if await self._store_final(handle, final):
                handle.stored_as(status)
                handle.publish(events)
                # A batch with earlier events of the run, refused and held, is written
                # again by the commit loop: the end is published after it.
                await handle.wait_published()
        if not handle.final_stored:
            self._final_retries.append((handle, events, final))
            if len(self._final_retries) > _UNSTORED_ENDS_MAX:
                lost, _, _ = self._final_retries.pop(0)
                log.error("giving up storing the final state of run %s", lost.id)
            self._keep_unstored_end(handle)
            handle.give_up_end(StoreUnavailable(
                "the run has ended but the store cannot take its result yet; re-join it later"))
        elif not handle.published_final:
            self._keep_unstored_end(handle)  # its earlier events are still to be published
        self._metrics.runs.labels(status.value).inc()
        handle.finished.set()

    async def _store_final(self, handle: RunHandle, final: dict[str, Any]) -> bool:
        """Write a final state, again while the store refuses it (the caller bounds it)."""
        pause = _RETRY_FIRST
        while True:
            try:
                with trio.move_on_after(_WRITE_BUDGET) as write:
                    await self._store.finish_run(**final)
                    return True
                if write.cancelled_caught:
                    log.error("final write of run %s took over %ss; trying again", handle.id,
                              _WRITE_BUDGET)
            except StoreError as exc:
                log.error("could not store the final state of run %s (trying again): %s",
                          handle.id, exc.message)
            except Exception:
                # Not the store's trouble but a bug (what it was given): retrying would
                # fail the same way. The run still ends, and this supervisor goes on.
                log.exception("the final state of run %s cannot be stored", handle.id)
                return False
            await trio.sleep(pause)
            pause = min(2 * pause, _RETRY_MAX)

    # -- events ---------------------------------------------------------------------------------

    def _keep_unstored_end(self, handle: RunHandle) -> None:
        """Keep serving a run whose end is not all stored (bounded: the oldest are let go)."""
        self._unstored_ends[handle.id] = handle
        while len(self._unstored_ends) > _UNSTORED_ENDS_MAX:
            del self._unstored_ends[next(iter(self._unstored_ends))]

    def _enqueue(self, event: RunEvent) -> None:
        self._pending.append(event)
        self._wake.set()

    async def _commit_loop(self) -> None:
        pause = _RETRY_FIRST
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if await self.flush():
                pause = _RETRY_FIRST
                continue
            # The store refused the batch (held, in order): again after a pause, doubling.
            await trio.sleep(pause)
            pause = min(2 * pause, _RETRY_MAX)
            self._wake.set()

    async def _recover_loop(self) -> None:
        """Close runs left running by a dead worker that shared the store (a killed sibling:
        nothing else would, until the next start); this process's own are closed at its start."""
        while True:
            await trio.sleep(_RECOVER_EVERY)
            try:
                closed = await self._store.recover_interrupted()
            except StoreError as exc:
                log.warning("could not look for interrupted runs: %s", exc)
                continue
            if closed:
                log.warning("closed %d run(s) of a worker that is gone", len(closed),
                            extra={"run_ids": closed})

    async def _prune_loop(self) -> None:
        """Delete old finished runs' events (``events_retention``), a few runs per transaction
        so that no write waits long behind one."""
        while True:
            await trio.sleep(_PRUNE_EVERY)
            cutoff = time.time() - self.events_retention
            try:
                while await self._store.prune_events(cutoff):  # noqa: ASYNC110 (a paced loop)
                    await trio.sleep(_PRUNE_PAUSE)
            except StoreError as exc:
                log.warning("could not prune old events: %s", exc)

    async def _checkpoint_loop(self) -> None:
        while True:
            await trio.sleep(_CHECKPOINT_EVERY)
            await self.retry_final_writes()
            try:
                await self._store.maintain()
            except StoreError as exc:
                log.warning("WAL checkpoint failed: %s", exc.message)

    async def _cancel_requests_loop(self) -> None:
        """Cancel this process's runs whose cancel another worker sharing the store asked for
        (``Store.request_cancel``: a client's cancel can reach any worker)."""
        while True:
            await trio.sleep(_CANCEL_POLL)
            if not self._runs:
                continue
            try:
                requests = await self._store.cancel_requests()
            except StoreError as exc:
                log.warning("could not read cancel requests: %s", exc.message)
                continue
            for run_id, reason in requests:
                handle = self._runs.get(run_id)
                if handle is not None:
                    handle.cancel(reason)

    async def retry_final_writes(self) -> None:
        """Store the final states the store did not take within their budget; publish each
        run's end once it is stored.

        One retry pass at a time: the checkpoint loop and a drain both call this, and two
        passes over the same list crashed the supervisor (the second ``remove``)."""
        async with self._final_retry_lock:
            for entry in list(self._final_retries):
                handle, events, final = entry
                try:
                    with trio.move_on_after(_WRITE_BUDGET):
                        await self._store.finish_run(**final)
                        if entry in self._final_retries:
                            self._final_retries.remove(entry)
                        handle.stored_as(RunStatus(final["status"]))
                        handle.publish(events)
                        if handle.published_final:
                            self._unstored_ends.pop(handle.id, None)
                        log.info("stored the final state of run %s on retry", handle.id)
                except StoreError as exc:
                    log.warning("final state of run %s still not stored: %s", handle.id,
                                exc.message)
                except Exception:
                    log.exception("final state of run %s still cannot be stored", handle.id)

    @property
    def unstored(self) -> int:
        """Runs whose final state, and events, that the store has not taken (yet)."""
        return len(self._final_retries) + len({e.run_id for e in self._pending})

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
        async with self._commit_lock:
            batch, self._pending = self._pending, []
            if not batch:
                return True
            stored = False
            try:
                with trio.move_on_after(_WRITE_BUDGET) as write:
                    # After a refusal some may have landed (a write that timed out): skipped.
                    await self._store.append_run_events(
                        [_record(e) for e in batch], retry=self._retrying)
                    stored = True
                if write.cancelled_caught:
                    log.error("storing %d run events took over %ss; will retry", len(batch),
                              _WRITE_BUDGET)
            except StoreError as exc:
                log.error("could not store %d run events (will retry): %s", len(batch),
                          exc.message)
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
                handle = self.get(run_id)
                if handle is not None:
                    handle.publish(events)
                    if handle.final_stored and handle.published_final:
                        self._unstored_ends.pop(run_id, None)
            return True

    def _fail_runs_past_the_bound(self) -> None:
        """While the store refuses events, the runs making them go on (a database restart
        takes seconds); past ``_PENDING_MAX`` held events they are stopped, ``failed``
        (``store_unavailable``), so memory stays bounded and nothing held is dropped."""
        if len(self._pending) <= _PENDING_MAX:
            return
        for run_id in {e.run_id for e in self._pending}:
            handle = self._runs.get(run_id)
            if handle is not None and handle.cancel_reason is None:
                log.error("run %s stopped: the store cannot take its events", run_id)
                handle.cancel_status, handle.error_type = RunStatus.failed, "store_unavailable"
                handle.cancel("the store cannot take the run's events")


def _split_cancelled(
    exc: BaseException,
) -> tuple[BaseException | None, BaseException | None]:
    """(the trio.Cancelled part, the rest) of an exception or exception group."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)
    if isinstance(exc, trio.Cancelled):
        return exc, None
    return None, exc


def _internal(exc: BaseException) -> str:
    """What a client is told of a bug: its kind only. Its text (paths, hosts, data) and the
    traceback are in the log, with the run's and the request's ids."""
    return f"internal error ({type(exc).__name__}); the details are in the service's log"


def _interrupt(exc: BaseException | None) -> bool:
    """Whether ``exc`` is, or holds, a KeyboardInterrupt: that one is the process's, not a run's."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(KeyboardInterrupt) is not None
    return isinstance(exc, KeyboardInterrupt)


def _leaf(exc: BaseException) -> BaseException:
    """The first leaf of (nested) exception groups: what actually went wrong."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _event(r: RunEventRecord) -> RunEvent:
    return RunEvent(r.run_id, r.seq, r.type, r.data, r.created_at,
                    r.raw if r.raw is not None else json.dumps(r.data, separators=(",", ":")))


def _record(e: RunEvent) -> RunEventRecord:
    return RunEventRecord(e.run_id, e.seq, e.type, e.data, e.created_at, e.raw)
