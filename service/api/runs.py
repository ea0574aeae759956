"""Messages and runs: start a run (JSON or SSE), read it, re-join its events, cancel it."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Literal

import trio
from quart import Blueprint, Response, jsonify, request
from quart_schema import (
    document_response,
    validate_querystring,
    validate_request,
    validate_response,
)

from ..errors import (
    AlreadyBegun,
    BackendError,
    NotFound,
    RunCancelled,
    RunTimeout,
    ServiceError,
    ShuttingDown,
    StoreUnavailable,
    TooManyRuns,
    status_of_type,
    worth_retry_of_type,
)
from ..runs import RunHandle, RunSpec, RunStatus
from ..runs.reader import EventReader, Keepalive
from ..store import RunRecord, Store
from .errors import json_error
from .models import (
    CancelOut,
    ErrorBody,
    MessageOut,
    MessageResult,
    PostMessage,
    RunEventsQuery,
    RunOut,
    is_event_id,
    iso,
)
from .owned import disown_run, own_run
from .sse import KEEPALIVE, sse_event
from .state import current_owner, services

__all__ = [
    "blueprint",
    "error_status",
    "error_type",
    "run_error",
    "run_out",
    "sse_response",
]

blueprint = Blueprint("runs", __name__)

ELSEWHERE_CANCEL_WAIT = 5.0  # seconds a cancel waits for another worker to end its run
# An Idempotency-Key: Stripe's bound, printable ASCII (it is stored and may be logged).
IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")

def error_status(handle: RunHandle) -> int:
    """The HTTP status of a run that ended without succeeding (or whose end is not stored): its
    error's exception class's (service/errors.py)."""
    if handle.end_error is not None:
        return handle.end_error.status
    if handle.status is RunStatus.timed_out:
        return RunTimeout.status
    if handle.status is RunStatus.cancelled:
        # A user's cancel is final (not retried); a shutdown's is worth a retry elsewhere.
        return ShuttingDown.status if handle.cancel_reason == "shutdown" else RunCancelled.status
    # An error type no class has is the backend's bad answer.
    return status_of_type(handle.error_type or "") or BackendError.status


def error_type(handle: RunHandle) -> str:
    if handle.end_error is not None:
        return handle.end_error.type
    if handle.status is RunStatus.cancelled and handle.cancel_reason == "shutdown":
        return "shutting_down"
    return handle.error_type or handle.status.value


def run_error(handle: RunHandle, **extra: object) -> Response:
    """The JSON error of a run that ended without succeeding, or whose end the store has not
    taken (503 ``store_unavailable``, worth a retry: the answer is not lost, only not stored
    yet; what the store says then is the answer)."""
    if handle.end_error is not None:
        resp = json_error(handle.end_error.status, handle.end_error.type,
                          handle.end_error.message, run_id=handle.id, **extra)
        if handle.end_error.retry_after is not None:
            resp.headers["Retry-After"] = str(handle.end_error.retry_after)
        return resp
    resp = json_error(error_status(handle), error_type(handle),
                      handle.error or f"the run ended {handle.status.value}",
                      run_id=handle.id, run_status=handle.status.value, **extra)
    # The upstream's Retry-After (a 429 or a 503 passed on), or its error class's.
    seconds = (handle.error_event or {}).get("retry_after")
    if isinstance(seconds, int) and not isinstance(seconds, bool):
        resp.headers["Retry-After"] = str(seconds)
    if not worth_retry_of_type(error_type(handle)):
        resp.headers["x-should-retry"] = "false"
    return resp


def run_out(run: RunRecord | None, live: RunHandle | None = None) -> RunOut:
    """A run as the store has it; a live run's status and usage so far from its handle. Its
    error only once its end is stored (until then the store has none)."""
    if live is not None:
        return RunOut(
            id=live.id, conversation_id=live.conversation_id, agent=live.agent, model=live.model,
            status=live.status.value, created_at=iso(live.created_at),
            started_at=iso(live.started_at), finished_at=iso(live.finished_at),
            error=live.error if live.done else None, usage=live.usage,
        )
    assert run is not None
    return RunOut(
        id=run.id, conversation_id=run.conversation_id, agent=run.agent, model=run.model,
        status=run.status, created_at=iso(run.created_at),  # type: ignore[arg-type]
        started_at=iso(run.started_at), finished_at=iso(run.finished_at), error=run.error,
        usage=run.usage,
    )


def sse_response(body: AsyncIterator[bytes]) -> Response:
    resp = Response(body, content_type="text/event-stream; charset=utf-8")
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Accel-Buffering"] = "no"  # tell proxies not to buffer
    # The keep-alive comments' interval (SERVICE_SSE_KEEPALIVE): a client can tell a quiet run
    # from a service that stopped answering (the terminal client waits four of them).
    resp.headers["X-Keepalive-Interval"] = f"{services().settings.sse_keepalive:g}"
    resp.timeout = None  # a stream may last as long as its run (Quart's 60 s would cut it)
    return resp


async def _event_stream(
    reader: EventReader, handle: RunHandle | None, on_disconnect: str
) -> AsyncIterator[bytes]:
    ended = False  # the stream ended on its own (not the client leaving)
    try:
        try:
            async for item in reader:
                if isinstance(item, Keepalive):
                    yield KEEPALIVE
                else:
                    yield sse_event(item.seq, item.type, item.raw)
        except ServiceError as exc:
            # The store failed while the run's events were re-read (a client behind the window,
            # or re-joining): end the stream with an error frame (no id: it is not one of the
            # run's events) instead of a broken connection. The client may re-join later.
            yield sse_event(None, "error", exc.to_event())
        ended = True
    finally:
        if handle is not None and on_disconnect == "cancel" and not handle.done:
            if ended:
                # Only an error frame ended it: the client is still there and may re-join,
                # so neither this stream nor its request (CancelOwnedRuns) cancels the run.
                disown_run(handle)
            else:
                # The client went away (quart-trio cancels the body: trio.Cancelled, or the
                # generator is closed: GeneratorExit): a ``cancel`` run stops with it.
                handle.cancel("client disconnected")


def _reader(run_id: str, after: int) -> EventReader:
    svc = services()
    return EventReader(
        run_id, after=after, store=svc.require_store(), supervisor=svc.require_supervisor(),
        keepalive=svc.settings.sse_keepalive,
    )


@blueprint.post("/api/conversations/<conversation_id>/messages")
@validate_request(PostMessage)
@document_response(MessageResult, 200)
# Documented, not validated: quart-schema refuses (500) a Response for a validated status, and
# a failed run's 404 (unknown model) is a json_error Response.
@document_response(ErrorBody, 404)
async def post_message(conversation_id: str, data: PostMessage) -> Response:
    """Start a run on the conversation: its result as JSON, or its events as SSE. With an
    ``Idempotency-Key`` header, a request repeated (a retry after a connection lost) gets the
    run the first one began, its events from the start or its result, instead of another."""
    svc = services()
    key = request.headers.get("Idempotency-Key")
    if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
        return json_error(422, "invalid_request", "Idempotency-Key must be 1 to 255 printable "
                          "ASCII characters", field="Idempotency-Key")
    # The run's first write checks the conversation (404 if not the caller's) and resolves
    # agent and model from it.
    spec = RunSpec(
        conversation_id=conversation_id, content=data.content, agent=data.agent,
        model=data.model, default_model=svc.settings.default_model, owner=current_owner(),
        timeout=data.timeout, idempotency_key=key,
    )
    refused: TooManyRuns | StoreUnavailable | None = None
    try:
        handle = await svc.require_supervisor().start(spec)
    except AlreadyBegun as begun:
        return await _again(begun, data)
    except (TooManyRuns, StoreUnavailable) as exc:
        if key is None:
            raise
        refused = exc
    if refused is not None:
        # Refused for the runs in flight, or while the store refuses writes (it may still
        # answer reads), and this request may repeat a run that began (its client's
        # connection lost): that one is answered, not refused.
        assert key is not None
        found = await svc.require_store().run_of_key(conversation_id, key,
                                                     owner=current_owner())
        if found is None:
            raise refused
        return await _again(AlreadyBegun(*found), data)
    if data.on_disconnect == "cancel":
        own_run(handle)  # cancelled if this request ends while it still runs
    if data.stream:
        resp = sse_response(_event_stream(_reader(handle.id, 0), handle, data.on_disconnect))
        # Known with the headers: a stream cut before its first event is re-joined by it.
        resp.headers["X-Run-Id"] = handle.id
        return resp
    try:
        await handle.finished.wait()
    finally:
        if data.on_disconnect == "cancel" and not handle.done:
            handle.cancel("client disconnected")
    if handle.status is not RunStatus.succeeded:
        return run_error(handle)
    assert handle.begun is not None  # a run on a stored conversation
    reply = handle.begun.reply  # as stored at the start; its final text is on the handle
    message = MessageOut(
        id=reply.id, role="assistant", content=handle.final_text, status="complete",
        created_at=iso(reply.created_at) or "", run_id=handle.id,
    )
    result = MessageResult(run=run_out(None, handle), message=message)
    return jsonify(result.model_dump(mode="json"))


async def _again(begun: AlreadyBegun, data: PostMessage) -> Response:
    """The answer to a request repeated with its ``Idempotency-Key``: the run it began (the
    stream of its events from the first, or its result once it has ended), as the first request
    had it; a key used again with another message is a 422."""
    run = await services().require_store().get_run(begun.run_id, owner=current_owner())
    if begun.content != data.content or (data.agent or run.agent) != run.agent or (
            data.model or run.model) != run.model:
        return json_error(422, "idempotency_key_reused", "this Idempotency-Key began a run "
                          "with another message, agent or model", field="Idempotency-Key",
                          run_id=begun.run_id)
    if data.stream:
        resp = sse_response(_event_stream(_reader(begun.run_id, 0), None, "continue"))
    else:
        ends: dict[str, dict[str, object]] = {}  # its message, error and run.finished
        async for item in _reader(begun.run_id, 0):
            if not isinstance(item, Keepalive) and item.type in ("message", "error",
                                                                   "run.finished"):
                ends[item.type] = json.loads(item.raw)
        run = await services().require_store().get_run(begun.run_id, owner=current_owner())
        message = ends.get("message")
        if run.status == "succeeded" and message is not None:
            reply = MessageOut(
                id=str(message.get("id")), role="assistant", content=str(message.get("content")),
                status="complete", created_at=iso(run.created_at) or "", run_id=run.id)
            resp = jsonify(MessageResult(run=run_out(run), message=reply).model_dump(mode="json"))
        else:
            error = ends.get("error") or {}
            type_ = str(error.get("type") or run.status)
            status = status_of_type(type_) or {"cancelled": RunCancelled.status,
                                               "timed_out": RunTimeout.status}.get(
                                                   run.status, BackendError.status)
            resp = json_error(status, type_, str(error.get("message") or run.error
                                                 or f"the run ended {run.status}"),
                              run_id=run.id, run_status=run.status)
            # (A run that ended so let its key go: only one whose end came meanwhile.)
            if isinstance(seconds := error.get("retry_after"), int):
                resp.headers["Retry-After"] = str(seconds)
            if not worth_retry_of_type(type_):
                resp.headers["x-should-retry"] = "false"
    resp.headers["X-Run-Id"] = begun.run_id
    resp.headers["Idempotent-Replayed"] = "true"
    return resp


@blueprint.get("/api/runs/<run_id>")
@validate_response(RunOut, 200)
@validate_response(ErrorBody, 404)
async def get_run(run_id: str) -> RunOut:
    """A run's status, whether live or finished. On the instance running it, its model and
    usage so far come from its handle (ahead of the store, which stores them with its end and
    never contradicts them: a survivor closing it takes the model its events named); its
    status is the store's either way."""
    svc = services()
    run = await svc.require_store().get_run(run_id, owner=current_owner())
    return run_out(run, svc.require_supervisor().get(run_id))


@blueprint.get("/api/runs/<run_id>/events")
@validate_querystring(RunEventsQuery)
@validate_response(ErrorBody, 404)
async def run_events(run_id: str, query_args: RunEventsQuery) -> Response:
    """SSE: the run's events after ``Last-Event-ID`` or ``?after=`` (the later of the two),
    then live ones; 204 when the run is over and the client has seen all of it."""
    svc = services()
    run = await svc.require_store().get_run(run_id, owner=current_owner())
    after = query_args.after or 0
    field = "after"  # the one that gave the position (named by an error about it)
    header = request.headers.get("Last-Event-ID", "").strip()
    if header:
        if not is_event_id(header) or int(header) >= 2**63:  # bounded before int()
            return json_error(422, "invalid_request", "Last-Event-ID must be an event id",
                              field="Last-Event-ID")
        # A browser's EventSource opened on "...?after=N" reconnects to the same URL with the
        # last id it saw in the header: the later position wins, or it would get events again.
        if int(header) > after:
            after, field = int(header), "Last-Event-ID"
    try:
        where = await rejoin_at(run, after)
    except ServiceError as exc:
        # Where the id is cannot be told now (the store refused the read): the stream says
        # so in a frame, as a failed re-read does, and the client re-joins later. Followed
        # blind, an id past the run's events gave a 200 that ended with no frame at all.
        return sse_response(_failed(exc))
    if where == "end":
        # Its client saw run.finished (also when the run ended between the two reads). The
        # HTML spec's EventSource stops reconnecting on a 204; on an empty 200 it would
        # reconnect every few seconds forever.
        return Response("", status=204)
    if where == "past":
        await _still_there(run)  # (deleted meanwhile, its events with it: a 404)
        # An id this run has not reached: no client can have seen it (an event is shown only
        # once stored; another run's id, a stale or made-up one). Followed, the stream would
        # wait for the run's end and then close without it; a 204 would tell an EventSource
        # it had seen the end, and stop it for good without the events.
        return json_error(422, "invalid_request", past_message(run, after), field=field)
    if request.method == "HEAD":
        # The stream's headers, and no body to run: its generator ran, for a response that
        # sends none, until the run's end, and held the connection that long.
        return sse_response(_no_events())
    # Re-joining never cancels the run: it belongs to whoever started it.
    return sse_response(_event_stream(_reader(run_id, after), None, "continue"))


async def _no_events() -> AsyncIterator[bytes]:
    return
    yield  # an async generator with nothing in it


async def _failed(exc: ServiceError) -> AsyncIterator[bytes]:
    yield sse_event(None, "error", exc.to_event())


async def rejoin_at(run: RunRecord, after: int) -> Literal["follow", "end", "past"]:
    """Where a re-join after event ``after`` of ``run`` stands: ``"follow"`` (its events after
    it, then live ones), ``"end"`` (its client saw ``run.finished``: nothing more), ``"past"``
    (no event the run has: no client was shown it; ``past_message`` says so). Raises what the
    store raises."""
    if not after:
        return "follow"
    if run.status in ("queued", "running"):
        seen = await _event_type(run, after)
        return "past" if seen is None else "end" if seen == "run.finished" else "follow"
    where = await _where_in_the_end(run, after)
    return "end" if where == "end" else "past" if where == "past" else "follow"


def past_message(run: RunRecord, after: int) -> str:
    live = run.status in ("queued", "running")
    return f"event {after} is past this run's {'events so far' if live else 'last event'}"


async def _still_there(run: RunRecord) -> None:
    """NotFound (a 404) if the run is gone: a delete of its conversation that landed after
    the run was read took its events too, and the id was then told "past this run's events"
    (a 422 for an id the client had been shown)."""
    await services().require_store().get_run(run.id, owner=current_owner())


async def _event_type(run: RunRecord, seq: int) -> str | None:
    """The type of the run's event ``seq`` in the store, None if it has none."""
    found = await services().require_store().list_run_events(run.id, after=seq - 1, limit=1)
    return found[0].type if found and found[0].seq == seq else None


async def _where_in_the_end(run: RunRecord, after: int) -> str:
    """Where event ``after`` is in a finished run's events: ``"end"`` (its ``run.finished``,
    the last: its client saw the run end), ``"past"`` (beyond the last), ``"before"`` (more
    come after it; pruned ids in between count as before). The store has a finished run's
    events: its final write carries them."""
    found = await services().require_store().list_run_events(run.id, after=after - 1, limit=2)
    if not found:
        return "past"
    return "end" if len(found) == 1 and found[0].seq == after else "before"


async def stop_runs(run_ids: list[str], reason: str) -> None:
    """Cancel runs, this process's or another worker's (through the store), and wait until
    they have ended: this process's until their final write, another's at most
    ``ELSEWHERE_CANCEL_WAIT`` seconds."""
    svc = services()
    store, supervisor = svc.require_store(), svc.require_supervisor()
    mine, elsewhere = await ask_to_stop(run_ids, reason)
    for handle in mine:
        await handle.finished.wait()
    with trio.move_on_after(ELSEWHERE_CANCEL_WAIT):
        for run_id in elsewhere:
            # Another instance's run: the store says when it has ended (its final write
            # announces itself on PostgreSQL; else a look every 0.1 s).
            # The mark comes before the look: an end announced while it reads is not missed.
            mark = supervisor.wakeups.mark()
            while True:
                # Ended; or its owner's lease ran out meanwhile (it froze again): then it is
                # closed here, once nothing holds its row.
                if await store.run_in_progress(run_id) is None and (
                        run_id in await store.recover_interrupted(run_id)
                        or not await _in_progress(store, run_id)):
                    break
                await supervisor.wakeups.wait_run(run_id, 0.1, since=mark)
                mark = supervisor.wakeups.mark()


async def ask_to_stop(run_ids: list[str], reason: str) -> tuple[list[RunHandle], list[str]]:
    """Cancel runs without waiting for their end: this process's at once (the handles), another
    live instance's through the store (the ids); one whose instance is gone is closed here, one
    that has ended is left as it is."""
    svc = services()
    store, supervisor = svc.require_store(), svc.require_supervisor()
    mine: list[RunHandle] = []
    elsewhere: list[str] = []
    for run_id in run_ids:
        if (handle := supervisor.get(run_id)) is not None:
            handle.cancel(reason)
            mine.append(handle)
        elif supervisor.starting(run_id):
            # Stored (its id may be known) but not launched yet: cancelled as it launches.
            if (handle := await supervisor.cancel_starting(run_id, reason)) is not None:
                mine.append(handle)
        else:
            where = await store.run_in_progress(run_id)
            if where == "elsewhere":
                await store.request_cancel(run_id, reason)
                elsewhere.append(run_id)
            elif where is None:
                # Stored as running by an instance that is gone (its lease ran out): the
                # asker closes it now, as recovery would (failed, "interrupted").
                closed = await store.recover_interrupted(run_id)
                if run_id not in closed and await _in_progress(store, run_id):
                    # Not closed: its row is held by a batch of its owner (frozen mid-write,
                    # so alive after all), or the owner is back. Asked through the store as
                    # a live owner's run and waited for (a 202 "running" was answered, and
                    # the owner, back, ran the run to "succeeded").
                    await store.request_cancel(run_id, reason)
                    elsewhere.append(run_id)
    return mine, elsewhere


async def _in_progress(store: Store, run_id: str) -> bool:
    try:
        run = await store.get_run(run_id)
    except NotFound:
        return False
    return run.status in (RunStatus.queued.value, RunStatus.running.value)


@blueprint.post("/api/runs/<run_id>/cancel")
@validate_response(CancelOut, 202)
@validate_response(ErrorBody, 404)
async def cancel_run(run_id: str) -> tuple[CancelOut, int]:
    """Cancel a run (idempotent); it ends ``cancelled`` with its partial answer stored."""
    svc = services()
    owner = current_owner()
    handle = svc.require_supervisor().get(run_id)
    if handle is not None and handle.owner == owner:
        # A live run of this process is stopped in memory, as the WebSocket's cancel does: no
        # store read first, so Stop works while the store is away (its final state is
        # stored once the store takes it: the committer retries it). The answer waits for
        # that end, within a bound.
        handle.cancel("cancelled by request")
        with trio.move_on_after(ELSEWHERE_CANCEL_WAIT):
            await handle.finished.wait()
        return CancelOut(id=handle.id, status=handle.status.value), 202
    run = await svc.require_store().get_run(run_id, owner=owner)
    # Another worker sharing the store may run it: it is asked through the store (it looks
    # every 0.25 s), and the answer comes once the run has ended there, or after a bound with
    # what the store says then.
    await stop_runs([run_id], "cancelled by request")
    run = await svc.require_store().get_run(run_id, owner=owner)
    return CancelOut(id=run.id, status=run.status), 202


