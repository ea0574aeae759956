"""``GET /api/ws``: several runs on one WebSocket.

Client -> server::

    {"type": "message", "conversation_id", "content", "agent"?, "model"?, "on_disconnect"?,
     "timeout"?}
    {"type": "cancel", "run_id"}

Server -> client: each run's events as ``{"run_id", "id", "type", "data"}``, and
``{"type": "error", "error": {"type", "message"}, "request"?}`` for a bad client message (the
socket stays open).

Shape: a receive loop and a send loop are sibling tasks in the handler's nursery; each run has a
forwarder task there that reads the run's events and queues them for the send loop (a bounded
channel: a slow socket slows only its forwarders, never a run). At most 32 runs are being started
or forwarded per socket: more are refused (``too_many_runs``), and a client that sends without
reading is then held back by its full send queue and TCP instead of growing tasks and memory;
cancels are always read. When the socket drops, quart-trio
cancels the handler: the nursery unwinds and runs started with ``on_disconnect: cancel`` (the
default) are cancelled; ``continue`` runs go on and can be re-joined over SSE.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import trio
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from quart import Blueprint, websocket

from ..errors import NotFound, ServiceError
from ..runs import RunHandle, RunSpec
from .models import AgentName
from .state import Services, current_owner, services
from .streams import EventReader, Keepalive

__all__ = ["blueprint"]

blueprint = Blueprint("ws", __name__)

_SEND_QUEUE = 256
_RUNS_PER_SOCKET = 32  # runs being started or forwarded on one socket at once


class WsMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["message"]
    conversation_id: str
    content: str = Field(min_length=1)
    agent: AgentName | None = None
    model: str | None = None
    on_disconnect: Literal["cancel", "continue"] = "cancel"
    timeout: float | None = Field(None, gt=0, le=86_400)


class WsCancel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["cancel"]
    run_id: str


def _error(type_: str, message: str, request: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "error", "error": {"type": type_, "message": message}}
    if request is not None:
        out["request"] = request
    return out


class _Session:
    def __init__(self, svc: Services, owner: str | None, nursery: trio.Nursery,
                 send: trio.MemorySendChannel[dict[str, Any] | str]) -> None:
        self.svc = svc
        self.owner = owner
        self.nursery = nursery
        self.send = send
        self.runs: dict[str, tuple[RunHandle, str]] = {}
        self.slots = trio.Semaphore(_RUNS_PER_SOCKET)  # start_run tasks (each releases one)

    async def receive_loop(self) -> None:
        while True:
            raw = await websocket.receive()
            try:
                msg = json.loads(raw)
            except (ValueError, TypeError, RecursionError):  # RecursionError: "[[[[..." nesting
                await self.send.send(_error("malformed_json", "the message is not valid JSON"))
                continue
            kind = msg.get("type") if isinstance(msg, dict) else None
            try:
                if kind == "message":
                    # Started in its own task: the receive loop keeps reading (a cancel for
                    # another run must not wait behind this run's first store write). At most
                    # _RUNS_PER_SOCKET such tasks at once (more are refused), so a client that
                    # sends but does not read cannot pile up tasks, or finished runs held by
                    # forwarders stuck on its full queue: its refusals fill the send queue,
                    # and then this loop waits on it.
                    m = WsMessage.model_validate(msg)
                    try:
                        self.slots.acquire_nowait()
                    except trio.WouldBlock:
                        # Refused, not waited for: the loop must stay free for cancels.
                        await self.send.send(_error(
                            "too_many_runs",
                            f"{_RUNS_PER_SOCKET} runs are in flight on this socket; retry "
                            "when one has ended", msg))
                        continue
                    self.nursery.start_soon(self.start_run, m, msg)
                elif kind == "cancel":
                    self.cancel(WsCancel.model_validate(msg))
                else:
                    await self.send.send(_error(
                        "invalid_request", "type must be 'message' or 'cancel'", msg))
            except ValidationError as exc:
                first = exc.errors()[0]
                field = ".".join(str(p) for p in first["loc"]) or "message"
                await self.send.send(_error("invalid_request", f"{field}: {first['msg']}", msg))
            except ServiceError as exc:
                await self.send.send(
                    {"type": "error", "error": exc.to_dict(), "request": msg}
                )

    async def start_run(self, m: WsMessage, request: Any) -> None:
        try:
            await self._start_run(m, request)
        finally:
            self.slots.release()

    async def _start_run(self, m: WsMessage, request: Any) -> None:
        spec = RunSpec(
            conversation_id=m.conversation_id, content=m.content, agent=m.agent,
            model=m.model, default_model=self.svc.settings.default_model, owner=self.owner,
            timeout=m.timeout,
        )
        try:
            handle = await self.svc.require_supervisor().start(spec)
        except ServiceError as exc:
            await self.send.send({"type": "error", "error": exc.to_dict(), "request": request})
            return
        # Entries of runs that ended while their forwarder could not finish (a store error).
        for run_id in [k for k, (h, _) in self.runs.items() if h.done]:
            del self.runs[run_id]
        self.runs[handle.id] = (handle, m.on_disconnect)
        await self.forward(handle)

    def cancel(self, m: WsCancel) -> None:
        entry = self.runs.get(m.run_id)
        if entry is None:
            # Only runs of this socket (or owned by its key) may be cancelled from here.
            live = self.svc.require_supervisor().get(m.run_id)
            if live is None or live.owner != self.owner:
                raise NotFound(f"no live run {m.run_id!r} on this socket", id=m.run_id)
            live.cancel("cancelled by request")
            return
        entry[0].cancel("cancelled by request")

    async def forward(self, handle: RunHandle) -> None:
        reader = EventReader(
            handle.id, after=0, store=self.svc.require_store(),
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
            await self.send.send({"type": "error", "error": exc.to_dict(), "run_id": handle.id})
            return
        self.runs.pop(handle.id, None)

    def abandon(self) -> None:
        for handle, on_disconnect in self.runs.values():
            if on_disconnect == "cancel" and not handle.done:
                handle.cancel("client disconnected")


async def _send_loop(recv: trio.MemoryReceiveChannel[dict[str, Any] | str]) -> None:
    async for msg in recv:
        text = msg if isinstance(msg, str) else json.dumps(msg, separators=(",", ":"))
        await websocket.send(text)


@blueprint.websocket("/api/ws")
async def ws() -> None:
    svc = services()
    await websocket.accept()
    send, recv = trio.open_memory_channel[dict[str, Any] | str](_SEND_QUEUE)
    session: _Session | None = None
    try:
        async with trio.open_nursery() as nursery:
            session = _Session(svc, current_owner(), nursery, send)
            nursery.start_soon(_send_loop, recv)
            await session.receive_loop()
    finally:
        if session is not None:
            session.abandon()
