"""``GET /api/ws``: several runs on one WebSocket.

Client -> server::

    {"type": "message", "conversation_id", "content", "agent"?, "model"?, "on_disconnect"?,
     "timeout"?, "idempotency_key"?}
                                    with ``idempotency_key`` (as the HTTP ``Idempotency-Key``), a
                                    message sent again (on a new socket, after one was lost) gets
                                    the run the first began, its events from the first, on any
                                    instance: no second run, no second copy of the question
    {"type": "join", "run_id", "after"?}
                                    any run of the socket's key, its events after ``after`` (0)
                                    then live ones, as GET /api/runs/{id}/events: a client whose
                                    socket was lost resumes its runs on a new one; nothing for a
                                    client that saw the run's end; never cancelled by the socket
    {"type": "cancel", "run_id"}    any run of the socket's key, as POST /api/runs/{id}/cancel:
                                    another worker's or instance's too; one that has ended is
                                    left as it is (no reply)

Server -> client: each run's events as ``{"run_id", "id", "type", "data"}``, and ``{"type":
"error", "error": {"type", "message"}, "request"?}`` for a bad client message (the socket stays
open; ``request`` echoes only its ``type``, ``conversation_id``, ``run_id`` and
``idempotency_key``, cut short). A message obeys the HTTP API's limits: its fields the same as
``POST .../messages``, its size ``SERVICE_MAX_BODY_BYTES`` (``body_too_large``); hypercorn
closes the socket (1009) on one over twice that, before buffering more of it (see
``service.server.build_config``). Non-finite numbers (``NaN``, ``Infinity``, ``1e400``) are
refused as invalid JSON, as a browser's ``JSON.parse`` does, and every reply is strict JSON.

Shape: a receive loop and a send loop are sibling tasks in the handler's nursery; each run has a
forwarder task there that reads the run's events and queues them for the send loop (a bounded
channel: a slow socket slows only its forwarders, never a run). At most 32 runs are being
started or forwarded per socket: more are refused (``too_many_runs``). The receive loop never
waits on the send loop (cancels, and the socket's disconnect, come through it): its replies go
in a queue of their own, sent ahead of the runs' events; a client that leaves ``_REPLY_QUEUE``
of them unsent reads nothing, and is closed (1008). When the socket drops, quart-trio cancels
the handler: the nursery unwinds and runs started with ``on_disconnect: cancel`` (the default)
are cancelled; ``continue`` runs go on and can be re-joined (``join`` on a new socket, or SSE).
At a shutdown, once the runs are drained and their ends forwarded, the socket is closed with
1001 Going Away.
"""

from __future__ import annotations

import json
import time
from collections import deque
from typing import Any, Literal

import trio
from pydantic import ConfigDict, Field, ValidationError, field_validator
from quart import Blueprint, g, websocket

from ..errors import (
    AlreadyBegun,
    ServiceError,
    ShuttingDown,
    StoreUnavailable,
    TooManyRuns,
)
from ..logs import get_logger
from ..runs import RunHandle, RunSpec
from ..runs.reader import EventReader, Keepalive
from ..services import Services
from ..store.records import strict_json
from ..text import clean_text
from .errors import error_message, field_name
from .models import (
    MAX_CONTENT_CHARS,
    MAX_MODEL_CHARS,
    AgentName,
    JsonRequest,
    NotFinite,
    strict_json_loads,
)
from .runs import IDEMPOTENCY_KEY, ask_to_stop, past_message, rejoin_at
from .state import current_owner, services

log = get_logger("service.app")  # (the access lines' logger)

__all__ = ["blueprint"]

blueprint = Blueprint("ws", __name__)

_SEND_QUEUE = 256
_RUNS_PER_SOCKET = 32  # runs being started or forwarded on one socket at once
_CANCELS_PER_SOCKET = 32  # cancels of runs not in this process, waiting for the store at once
# What an error reply echoes of the request:
_ECHOED = ("type", "conversation_id", "run_id", "idempotency_key")
_ECHO_CHARS = 200  # ... each cut to this length
_ID_CHARS = 200  # an id longer than this is refused (a not_found would carry it back whole)
_CLOSE_WAIT = 5.0  # seconds a closing socket waits for its close frame to be written
_CLOSE_REPLY_WAIT = 1.0  # seconds a socket closed at a shutdown waits for the client's close
_GOING_AWAY: dict[str, Any] = {}  # queued last on a shutdown: the send loop closes with 1001
_REPLY_QUEUE = 64  # replies to a client's own messages not yet sent: past it, it reads nothing


class WsMessage(JsonRequest):
    # The fields of POST .../messages, with the same JSON types and Unicode text.
    model_config = ConfigDict(extra="forbid")
    type: Literal["message"]
    conversation_id: str = Field(max_length=_ID_CHARS)
    content: str = Field(min_length=1, max_length=MAX_CONTENT_CHARS)
    agent: AgentName | None = None
    model: str | None = Field(None, max_length=MAX_MODEL_CHARS)
    on_disconnect: Literal["cancel", "continue"] = "cancel"
    timeout: float | None = Field(None, gt=0, le=86_400)
    idempotency_key: str | None = None

    @field_validator("idempotency_key")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        if value is not None:
            # As an HTTP header's value arrives (outer spaces are no part of it): the key
            # sent on a socket and over HTTP (a browser's fetch strips them) is one key.
            value = value.strip(" ")
        if value is not None and not IDEMPOTENCY_KEY.fullmatch(value):
            raise ValueError("must be 1 to 255 printable ASCII characters")
        return value


class WsJoin(JsonRequest):
    model_config = ConfigDict(extra="forbid")
    type: Literal["join"]
    run_id: str = Field(max_length=_ID_CHARS)
    after: int = Field(0, ge=0, lt=2**63)


class WsCancel(JsonRequest):
    model_config = ConfigDict(extra="forbid")
    type: Literal["cancel"]
    run_id: str = Field(max_length=_ID_CHARS)


def _error(type_: str, message: str, request: Any = None) -> dict[str, Any]:
    return _error_reply({"type": type_, "message": message}, request)


def _error_reply(error: dict[str, Any], request: Any = None) -> dict[str, Any]:
    """An error reply, echoing what tells which request it answers (never the whole of it: a
    content of a megabyte, or a deep nesting, would come back)."""
    out: dict[str, Any] = {"type": "error", "error": error}
    if isinstance(request, dict):
        # Cleaned: a lone surrogate echoed back is no more Unicode than it was coming in.
        echoed = {k: clean_text(v[:_ECHO_CHARS]) for k in _ECHOED
                  if isinstance(v := request.get(k), str)}
        if echoed:
            out["request"] = echoed
    return out


def _too_large(raw: str | bytes, limit: int) -> bool:
    if len(raw) > limit:  # a text's UTF-8 is at least as long as the text
        return True
    if isinstance(raw, bytes) or len(raw) * 4 <= limit:  # at most 4 bytes a character
        return False
    return len(raw.encode()) > limit


class _Session:
    def __init__(self, svc: Services, owner: str | None, nursery: trio.Nursery,
                 send: trio.MemorySendChannel[dict[str, Any] | str],
                 token_expires: float | None = None) -> None:
        self.svc = svc
        self.owner = owner
        # Opened with a short-lived token (?access_token=): no run is started or joined past
        # its expiry (a URL replayed from a log within its 5 minutes gave a session with no
        # end); cancels and the runs already sent go on, as an SSE stream opened with one does.
        self.token_expires = token_expires
        self.nursery = nursery
        self.send = send
        self.runs: dict[str, tuple[RunHandle, str]] = {}
        self.forwarding: set[str] = set()  # runs whose events this socket is sending
        # Their keys: (conversation, key) -> (run, the message's content, agent and model).
        self.keyed: dict[tuple[str, str], tuple[str, str, str | None, str | None]] = {}
        self.slots = trio.Semaphore(_RUNS_PER_SOCKET)  # start_run tasks (each releases one)
        self._ended = trio.Event()  # a start_run task ended (re-armed by its waiter)
        self.cancels = trio.Semaphore(_CANCELS_PER_SOCKET)  # cancels waiting for the store
        # Replies to the client's own messages: sent before the runs' events (which fill the
        # send queue whenever a run streams faster than the socket drains: a full queue is
        # a client briefly behind, not one that reads nothing).
        self.replies: deque[dict[str, Any]] = deque()
        self._waiting: trio.CancelScope | None = None  # the send loop's wait for an event
        self.not_reading = False  # its replies piled up unsent: it is closed (1008)
        self.closed = False  # its close (1001) is sent: the client's close is waited for

    async def receive_loop(self) -> None:
        limit = self.svc.settings.max_body_bytes
        while True:
            raw = await websocket.receive()
            if raw is None:  # an empty binary frame (quart-trio hands over None)
                raw = b""
            if _too_large(raw, limit):
                self.reply(_error(
                    "body_too_large", f"the message is over {limit} bytes "
                    "(SERVICE_MAX_BODY_BYTES)"))
                continue
            try:
                msg = strict_json_loads(raw)
            except NotFinite as exc:
                self.reply(_error("malformed_json", f"the message is not valid JSON: {exc}"))
                continue
            except (ValueError, TypeError, RecursionError):  # RecursionError: "[[[[..." nesting
                self.reply(_error("malformed_json", "the message is not valid JSON"))
                continue
            kind = msg.get("type") if isinstance(msg, dict) else None
            try:
                if kind == "message":
                    # Started in its own task: the receive loop keeps reading (a cancel for
                    # another run must not wait behind this run's first store write). At most
                    # _RUNS_PER_SOCKET such tasks at once (more are refused), so a client that
                    # sends but does not read cannot pile up tasks, or finished runs held by
                    # forwarders stuck on its full queue: its refusals fill its reply queue,
                    # and then it is closed (``reply``).
                    m = WsMessage.model_validate(msg)
                    if self.expired(msg):
                        continue
                    if self.sending_already(m):
                        # A repeat of a keyed message whose run this socket is sending: its
                        # events come once, and it takes no slot (a socket at its limit
                        # refused it as too_many_runs).
                        continue
                    if self.take_slot(msg):
                        self.nursery.start_soon(self.start_run, m, msg)
                elif kind == "join":
                    j = WsJoin.model_validate(msg)
                    if self.expired(msg):
                        continue
                    if j.run_id not in self.forwarding and self.take_slot(msg):
                        self.nursery.start_soon(self.join, j, msg)
                elif kind == "cancel":
                    await self.cancel(WsCancel.model_validate(msg), msg)
                else:
                    self.reply(_error("invalid_request",
                                      "type must be 'message', 'join' or 'cancel'", msg))
            except ValidationError as exc:
                first = exc.errors()[0]
                field = field_name(first["loc"], "message")
                self.reply(_error("invalid_request", f"{field}: {error_message(first)}",
                                  msg))
            except ServiceError as exc:
                self.reply(_error_reply(exc.to_event(), msg))

    def expired(self, request: Any) -> bool:
        """Opened with a token now expired: no run is started or joined (refused)."""
        if self.token_expires is None or time.time() < self.token_expires:
            return False
        self.reply(_error("unauthorized", "the token this socket was opened with expired: "
                          "open it again with a new one (POST /api/tokens)", request))
        return True

    def take_slot(self, request: Any) -> bool:
        """One of the socket's places for a run being started or forwarded; refused (a reply),
        not waited for: the receive loop must stay free for cancels.

        Refused once the runs are drained (a shutdown): the socket is closed with 1001 when the
        runs in flight on it have ended, and a client re-joining on and on kept one in flight
        at every moment (then the graceful timeout cut it: a 1006)."""
        if self.svc.drained.is_set():
            self.reply(_error_reply(ShuttingDown(
                "the service is shutting down: send it again once it is back, or to another "
                "instance").to_event(), request))
            return False
        try:
            self.slots.acquire_nowait()
        except trio.WouldBlock:
            self.reply(_error_reply(TooManyRuns(
                f"{_RUNS_PER_SOCKET} runs are in flight on this socket; retry when one has "
                "ended").to_event(), request))
            return False
        return True

    def sending_already(self, m: WsMessage) -> bool:
        if m.idempotency_key is None:
            return False
        sent = self.keyed.get((m.conversation_id, m.idempotency_key))
        return (sent is not None and sent[0] in self.forwarding
                and sent[1:] == (m.content, m.agent, m.model))

    def reply(self, msg: dict[str, Any]) -> None:
        """A reply to the client's own message, from the receive loop: never waited for. The
        loop must go on reading (cancels, and the socket's disconnect, which hypercorn hands
        over through a queue this loop drains: waiting here on a peer that reads nothing held
        that disconnect, and with it every run of the socket, for good). Replies go first,
        ahead of the runs' events; a client that leaves ``_REPLY_QUEUE`` of them unsent reads
        nothing: it is closed (``NotReading``). Once the socket's close is sent, none is."""
        if self.closed:
            return
        if len(self.replies) >= _REPLY_QUEUE:
            raise NotReading
        self.replies.append(msg)
        if self._waiting is not None:
            self._waiting.cancel()  # the send loop is waiting for an event: it sends this now

    def reply_from_task(self, msg: dict[str, Any]) -> None:
        """A reply from one of the socket's tasks (a refused start, a cancel the store could
        not take): ahead of the runs' events as well (queued behind them, a client briefly
        behind got it after a whole backlog of another run's, and after replies to messages
        it sent later). One that finds the reply queue full closes the socket, as ``reply``
        does."""
        try:
            self.reply(msg)
        except NotReading:
            self.not_reading = True
            self.nursery.cancel_scope.cancel()

    @property
    def leave_reason(self) -> str:
        """Why the socket's ``cancel`` runs stop when it ends."""
        return ("the client read nothing of its socket (closed)" if self.not_reading
                else "client disconnected")

    async def send_loop(self, recv: trio.MemoryReceiveChannel[dict[str, Any] | str],
                        done: trio.CancelScope) -> None:
        """The one task that sends on the socket: replies first, then the runs' events (and
        last, at a shutdown, the close)."""
        while True:
            while self.replies:
                await _send(self.replies.popleft())
            with trio.CancelScope() as waiting:
                self._waiting = waiting
                try:
                    msg = await recv.receive()
                except trio.EndOfChannel:
                    return
                finally:
                    self._waiting = None
            if waiting.cancelled_caught:
                continue  # a reply came (a memory channel's receive loses nothing when cut)
            if msg is _GOING_AWAY:
                while self.replies:
                    await _send(self.replies.popleft())
                with trio.move_on_after(_CLOSE_WAIT):
                    await websocket.close(1001, "the service is shutting down")
                self.closed = True
                # The client's close frame ends the handler (quart-trio cancels it on the
                # disconnect), and hypercorn then closes the connection (RFC 6455 5.5.1).
                # Returning at once closed it under a client still sending: its data met a
                # closed socket, the TCP reset took the close frame with it (a 1006).
                with trio.move_on_after(_CLOSE_REPLY_WAIT):
                    await trio.sleep_forever()
                done.cancel()
                return
            await _send(msg)

    async def start_run(self, m: WsMessage, request: Any) -> None:
        try:
            await self._start_run(m, request)
        finally:
            self.slots.release()
            self._ended.set()

    async def join(self, m: WsJoin, request: Any) -> None:
        """A run's events after ``m.after``, as ``GET /api/runs/{id}/events`` re-joins it."""
        try:
            store = self.svc.require_store()
            try:
                run = await store.get_run(m.run_id, owner=self.owner)
                where = await rejoin_at(run, m.after)
                if where == "past":
                    await store.get_run(m.run_id, owner=self.owner)  # (not deleted meanwhile)
            except ServiceError as exc:
                self.reply_from_task(_error_reply(exc.to_event(), request))
                return
            if where == "past":
                self.reply_from_task(_error("invalid_request",
                                            f"after: {past_message(run, m.after)}", request))
            elif where == "follow":
                await self.forward(m.run_id, after=m.after)
            # ("end": its client saw the run's end; nothing more to send.)
        finally:
            self.slots.release()
            self._ended.set()

    async def close_when_drained(self) -> None:
        """Once the service has drained its runs (a shutdown), and this socket has forwarded
        their ends, close it with 1001 Going Away (hypercorn would cut it at its graceful
        timeout with no close frame: a 1006 after seconds).

        No bound of its own: a client briefly behind gets its runs' ends, then the 1001, for
        as long as hypercorn's graceful timeout lasts (a bound of 5 s here gave up silently,
        and such a client got its ends and then a 1006 at the graceful timeout)."""
        await self.svc.drained.wait()
        while self.slots.value < _RUNS_PER_SOCKET:  # runs being started or forwarded
            self._ended = trio.Event()
            await self._ended.wait()
        await self.send.send(_GOING_AWAY)  # after what is queued

    async def _start_run(self, m: WsMessage, request: Any) -> None:
        spec = RunSpec(
            conversation_id=m.conversation_id, content=m.content, agent=m.agent,
            model=m.model, default_model=self.svc.settings.default_model, owner=self.owner,
            timeout=m.timeout, idempotency_key=m.idempotency_key,
        )
        begun: AlreadyBegun | None = None
        refused: TooManyRuns | StoreUnavailable | None = None
        try:
            try:
                handle = await self.svc.require_supervisor().start(spec)
            except AlreadyBegun as exc:
                begun = exc
            except (TooManyRuns, StoreUnavailable) as exc:
                if m.idempotency_key is None:
                    raise
                refused = exc
            if refused is not None:
                # Refused for the runs in flight, or while the store refuses writes (it may
                # still answer reads), and this message may repeat a run that began: that one
                # is forwarded, not refused.
                assert m.idempotency_key is not None
                found = await self.svc.require_store().run_of_key(
                    m.conversation_id, m.idempotency_key, owner=self.owner)
                if found is None:
                    raise refused
                begun = AlreadyBegun(*found)
            if begun is not None:
                await self._again(begun, m, request)
                return
        except ServiceError as exc:
            self.reply_from_task(_error_reply(exc.to_event(), request))
            return
        # Entries of runs that ended while their forwarder could not finish (a store error).
        for run_id in [k for k, (h, _) in self.runs.items() if h.finished.is_set()]:
            del self.runs[run_id]
        self.runs[handle.id] = (handle, m.on_disconnect)
        await self.forward(handle.id, m)

    async def _again(self, begun: AlreadyBegun, m: WsMessage, request: Any) -> None:
        """A message sent again with its ``idempotency_key``: the run the first began, its
        events from the first (as ``POST .../messages`` answers a repeated request). The run
        keeps the first's ``on_disconnect``: this socket's leaving never cancels it. The key
        used again with another content, agent or model is an ``idempotency_key_reused``
        error."""
        run = await self.svc.require_store().get_run(begun.run_id, owner=self.owner)
        if begun.content != m.content or (m.agent or run.agent) != run.agent or (
                m.model or run.model) != run.model:
            error = {"type": "idempotency_key_reused", "message": "this idempotency_key began "
                     "a run with another message, agent or model", "run_id": begun.run_id}
            self.reply_from_task(_error_reply(error, request))
            return
        await self.forward(begun.run_id, m)

    async def cancel(self, m: WsCancel, request: Any) -> None:
        """Any run of this key, as POST /api/runs/{id}/cancel. A live run of this process (of
        this socket or not) is cancelled at once, in memory: no store, so Stop works while
        the store is away. Any other (another worker's or instance's, asked through the store;
        one still starting; one that has just ended: nothing to do, a Stop racing the end is
        no error) in a task of its own, so that the next cancel is not held behind its store
        I/O. Not waited for: the run's events tell its end."""
        entry = self.runs.get(m.run_id)
        live = entry[0] if entry is not None else self.svc.require_supervisor().get(m.run_id)
        if live is not None and (entry is not None or live.owner == self.owner):
            live.cancel("cancelled by request")
            return
        try:
            self.cancels.acquire_nowait()
        except trio.WouldBlock:
            self.reply(_error(
                "too_many_cancels", f"{_CANCELS_PER_SOCKET} cancels are waiting for the store "
                "on this socket; retry", request))
            return
        self.nursery.start_soon(self._cancel_through_store, m, request)

    async def _cancel_through_store(self, m: WsCancel, request: Any) -> None:
        try:
            run = await self.svc.require_store().get_run(m.run_id, owner=self.owner)
            if run.status in ("queued", "running"):
                await ask_to_stop([m.run_id], "cancelled by request")
        except ServiceError as exc:  # not_found (not this key's, or no such run), the store's
            self.reply_from_task(_error_reply(exc.to_event(), request))
        finally:
            self.cancels.release()

    async def forward(self, run_id: str, m: WsMessage | None = None, *, after: int = 0) -> None:
        if run_id in self.forwarding:
            # A message repeated on the socket that is sending its run (two sends of one
            # click): the events are on their way once, not twice.
            return
        key = None if m is None or m.idempotency_key is None else (
            m.conversation_id, m.idempotency_key)
        self.forwarding.add(run_id)
        if m is not None and key is not None:
            self.keyed[key] = (run_id, m.content, m.agent, m.model)
        try:
            await self._forward(run_id, after)
        finally:
            self.forwarding.discard(run_id)
            if key is not None and self.keyed.get(key, ("",))[0] == run_id:
                del self.keyed[key]

    async def _forward(self, run_id: str, after: int) -> None:
        reader = EventReader(
            run_id, after=after, store=self.svc.require_store(),
            supervisor=self.svc.require_supervisor(), keepalive=3600.0,
        )
        try:
            async for item in reader:
                if not isinstance(item, Keepalive):
                    await self.send.send(item.wire_json())
        except ServiceError as exc:
            # The store failed under this run's events: tell the client, keep the socket, and
            # keep the run's entry, so that a later disconnect (or a cancel message) still
            # reaches it.
            await self.send.send({"type": "error", "error": exc.to_event(),
                                  "run_id": run_id})
            return
        self.runs.pop(run_id, None)

    def abandon(self, reason: str = "client disconnected") -> None:
        for handle, on_disconnect in self.runs.values():
            if on_disconnect == "cancel" and not handle.done:
                handle.cancel(reason)


class NotReading(Exception):
    """The client left ``_REPLY_QUEUE`` replies unsent: it reads nothing."""


async def _send(msg: dict[str, Any] | str) -> None:
    # Events are encoded strictly where they are made; the replies made here are too (a
    # browser's JSON.parse refuses NaN and Infinity).
    text = msg if isinstance(msg, str) else json.dumps(
        strict_json(msg), separators=(",", ":"), allow_nan=False)
    await websocket.send(text)


@blueprint.websocket("/api/ws")
async def ws() -> None:
    svc = services()
    await websocket.accept()
    send, recv = trio.open_memory_channel[dict[str, Any] | str](_SEND_QUEUE)
    session: _Session | None = None
    try:
        async with trio.open_nursery() as nursery:
            session = _Session(svc, current_owner(), nursery, send,
                               getattr(g, "token_expires", None))
            nursery.start_soon(session.send_loop, recv, nursery.cancel_scope)
            nursery.start_soon(session.close_when_drained)
            try:
                await session.receive_loop()
            except NotReading:
                session.not_reading = True
                nursery.cancel_scope.cancel()
            finally:
                # The client left (or reads nothing): its runs stop now, not once this
                # socket's tasks have ended. The send loop may be held in a write to this
                # peer (hypercorn's writes are shielded; sendstall bounds them), or a run's
                # start in a slow store write (a write taken into a commit is waited for):
                # the runs must not wait for them. (A run whose start lands after this is
                # stopped below.)
                session.abandon(session.leave_reason)
        if session.not_reading:
            with trio.move_on_after(_CLOSE_WAIT):
                await websocket.close(1008, "the client reads nothing of its replies")
    finally:
        if session is not None:
            session.abandon(session.leave_reason)
        # The session's access line (after_request is not called for a WebSocket).
        started = getattr(g, "started", None)
        log.info("WS %s closed", websocket.path, extra={
            "ms": round((time.perf_counter() - started) * 1000, 2) if started else None})
