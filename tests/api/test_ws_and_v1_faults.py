"""The WebSocket and /v1 endpoints under faults (a review, 2026-12-04): each test failed before
its fix. Real hypercorn servers on 127.0.0.1:0; the WebSocket client is a raw socket driven
with wsproto, so that a test decides when it reads (and can keep a small receive buffer)."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import wsproto
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Request,
    TextMessage,
)

import service.api.ws as ws_mod
from service.errors import StoreError
from service.runs import RunHandle
from service.settings import load_settings

from ..fakes import Reply, ScriptedBackend
from ..servers import RunningServer, running_server

GUARD = 10  # seconds any single wait may take before the test fails


class RawWS:
    """A WebSocket client on a raw socket that reads only when asked to."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self.pending: list[Any] = []

    @classmethod
    async def open(cls, srv: RunningServer, *, rcvbuf: int | None = None) -> RawWS:
        host, port = srv.url.removeprefix("http://").rsplit(":", 1)
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        if rcvbuf is not None:  # a client that stops reading fills its window fast
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect((host, int(port)))
        ws = cls(trio.SocketStream(sock))
        await ws.stream.send_all(ws.conn.send(Request(host="127.0.0.1", target="/api/ws")))
        with trio.fail_after(GUARD):
            while not any(isinstance(e, AcceptConnection) for e in ws.pending):
                assert await ws._pump(), "closed during the handshake"
        ws.pending = [e for e in ws.pending if not isinstance(e, AcceptConnection)]
        return ws

    async def _pump(self) -> bool:
        data = await self.stream.receive_some(65536)
        self.conn.receive_data(data or None)
        for e in self.conn.events():
            if isinstance(e, Ping):
                await self.stream.send_all(self.conn.send(e.response()))
            else:
                self.pending.append(e)
        return bool(data)

    async def send(self, obj: Any) -> None:
        await self.stream.send_all(self.conn.send(TextMessage(json.dumps(obj))))

    async def recv(self) -> dict[str, Any] | CloseConnection | None:
        """The next message (parsed), a close frame, or None: the connection ended without
        one (what a browser reports as 1006)."""
        text = ""
        with trio.fail_after(GUARD):
            while True:
                while self.pending:
                    e = self.pending.pop(0)
                    if isinstance(e, Message):
                        text += e.data
                        if e.message_finished:
                            return json.loads(text)  # type: ignore[no-any-return]
                    elif isinstance(e, CloseConnection):
                        return e
                if not await self._pump():
                    return None

    async def until(self, type_: str) -> list[Any]:
        got: list[Any] = []
        while True:
            m = await self.recv()
            got.append(m)
            if not isinstance(m, dict) or m.get("type") == type_:
                return got


async def _conversation(srv: RunningServer) -> str:
    async with srv.client() as c:
        r = await c.post("/api/conversations", json={})
        assert r.status_code == 201, r.text
        return str(r.json()["id"])


@asynccontextmanager
async def socket_with_a_run(srv: RunningServer) -> AsyncIterator[tuple[RawWS, RunHandle]]:
    """A raw socket that has started a ``cancel`` run on a new conversation and seen its first
    token: (the socket, the run's handle). The socket is closed at the end."""
    conv = await _conversation(srv)
    ws = await RawWS.open(srv)
    try:
        await ws.send({"type": "message", "conversation_id": conv, "content": "q"})
        got = await ws.until("token")
        handle = srv.services.require_supervisor().get(got[0]["run_id"])
        assert handle is not None
        yield ws, handle
    finally:
        await ws.stream.aclose()


# -- 1. a backed-up socket whose client vanishes ---------------------------------------------

BIG = ("x" * 4000 + " ") * 3100  # 12 MB of tokens: far more than socket buffers and the queue


def _record_sessions(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The WebSocket sessions the server makes, as it makes them."""
    sessions: list[Any] = []

    class Recorded(ws_mod._Session):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            sessions.append(self)

    monkeypatch.setattr(ws_mod, "_Session", Recorded)
    return sessions


async def test_a_ws_client_that_vanishes_with_requests_queued_has_its_run_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The client stops reading (a run streaming into a full window: the server's send queue
    # fills), sends a few dozen more requests (each needs an error reply: the receive loop
    # waits on the full queue, then quart-trio's and hypercorn's 10-message queues fill), then
    # its connection drops. Hypercorn's write fails and it reports the close with
    # app_put(websocket.disconnect) - into the full queue, from inside the app's own blocked
    # websocket.send: nothing moves again. The run (on_disconnect: cancel) streams on for
    # nobody until SERVICE_RUN_TIMEOUT, the upstream stays open, the handler never ends.
    sessions = _record_sessions(monkeypatch)
    backend = ScriptedBackend(lambda req: Reply(BIG, hang_after=3000))
    settings = load_settings(db=tmp_path / "s.db")  # stall limit 60 s: not what ends it here
    async with running_server(settings, backend) as srv:
        conv = await _conversation(srv)
        ws = await RawWS.open(srv, rcvbuf=4096)
        await ws.send({"type": "message", "conversation_id": conv, "content": "q"})
        started = await ws.recv()
        assert isinstance(started, dict), started
        assert started["type"] == "run.started", started
        handle = srv.services.require_supervisor().get(started["run_id"])
        assert handle is not None
        (session,) = sessions
        with trio.fail_after(GUARD):  # the socket is backed up: the send queue is full
            while session.send.statistics().current_buffer_used < ws_mod._SEND_QUEUE:  # noqa: ASYNC110
                await trio.sleep(0.05)
        for _ in range(64):  # requests the server must answer (the client reads nothing)
            with trio.move_on_after(0.1):
                await ws.send({"type": "dance"})
        with trio.fail_after(GUARD):  # the server has read what it could of them
            await trio.testing.wait_all_tasks_blocked(cushion=0.1)
        # (Before the fix the receive loop waited here on the full send queue, behind the
        # forwarder; now a reply that finds it full closes the socket: 1008.)
        await ws.stream.aclose()  # the client vanishes (unread data: a reset)
        with trio.move_on_after(5):
            await handle.finished.wait()
        status, reason = handle.status.value, handle.cancel_reason
        upstream_open = not backend.streams[0].closed
    assert status == "cancelled", (
        f"5 s after its client vanished the run is still {status} (upstream open: "
        f"{upstream_open}); without the queued requests it is cancelled in ~0.1 s")
    assert not upstream_open
    assert reason in ("client disconnected", "the client read nothing of its socket (closed)")


# -- 2. shutdown with sockets open -------------------------------------------------------------


async def test_shutdown_closes_websockets_with_going_away_once_their_runs_have_ended(
    tmp_path: Path,
) -> None:
    # At shutdown the run is drained and its run.finished sent; then the socket (and an idle
    # one) stayed open until hypercorn's graceful_timeout cancelled the handler and cut the TCP
    # connection without a close frame: every shutdown with a WebSocket open took the whole
    # graceful_timeout, and its clients saw 1006 (abnormal: a network failure, not a restart).
    backend = ScriptedBackend(lambda req: Reply("a b c d", hang_after=2))
    settings = load_settings(db=tmp_path / "s.db", shutdown_drain=0.3)
    graceful = 5.0
    seen: dict[str, list[tuple[float, Any]]] = {"busy": [], "idle": []}

    async def follow(ws: RawWS, name: str, t0: float) -> None:
        with trio.fail_after(GUARD):
            while True:
                m = await ws.recv()
                seen[name].append((trio.current_time() - t0, m))
                if not isinstance(m, dict):
                    return

    async with trio.open_nursery() as nursery:
        async with running_server(settings, backend, graceful_timeout=graceful) as srv:
            conv = await _conversation(srv)
            busy, idle = await RawWS.open(srv), await RawWS.open(srv)
            await busy.send({"type": "message", "conversation_id": conv, "content": "q"})
            await busy.until("token")
            t0 = trio.current_time()
            nursery.start_soon(follow, busy, "busy", t0)
            nursery.start_soon(follow, idle, "idle", t0)
        took = trio.current_time() - t0
    busy_types = [m.get("type") for _, m in seen["busy"] if isinstance(m, dict)]
    assert busy_types[-1] == "run.finished", busy_types  # the run's end was told
    for name, got in seen.items():
        at, end = got[-1]
        assert isinstance(end, CloseConnection), (
            f"{name} socket: the connection was cut after {at:.1f} s without a close frame")
        assert end.code in (1001, 1012), (name, end)
    assert took < graceful - 1, f"the shutdown took {took:.1f} s (graceful_timeout {graceful})"


# -- 3. an empty binary frame -------------------------------------------------------------------


async def test_an_empty_binary_frame_is_an_error_reply_not_a_dropped_socket(
    tmp_path: Path,
) -> None:
    # quart-trio hands an empty binary message to the app as None (``bytes or text``);
    # receive_loop's len(None) raised TypeError: a traceback in the log, the socket closed
    # with 1000 (a *normal* close), and every run of the socket cancelled and stored as
    # "client disconnected" though the client was there. A bad message gets an error frame
    # and the socket and its runs go on (docs/operations.md's table).
    backend = ScriptedBackend(lambda req: Reply("a b c d", hang_after=2))
    settings = load_settings(db=tmp_path / "s.db")
    async with running_server(settings, backend) as srv:
        conv = await _conversation(srv)
        ws = await RawWS.open(srv)
        await ws.send({"type": "message", "conversation_id": conv, "content": "q"})
        got = await ws.until("token")
        handle = srv.services.require_supervisor().get(got[0]["run_id"])
        assert handle is not None
        await ws.stream.send_all(ws.conn.send(BytesMessage(b"")))
        while isinstance(reply := await ws.recv(), dict) and "run_id" in reply:
            pass  # the run's own events
        await trio.sleep(0.1)
        run = (handle.status.value, handle.cancel_reason)
    assert isinstance(reply, dict), f"no error reply: {reply}"
    assert reply.get("type") == "error", reply
    assert reply["error"]["type"] == "malformed_json"
    assert run == ("running", None), run


# -- 4. /v1: a store read failure is not a client that left -------------------------------------


async def test_v1_stream_failed_by_a_store_read_is_not_stored_as_a_client_disconnect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The native SSE stream was fixed for this (test_an_sse_store_error_does_not_cancel_the_run
    # _as_if_the_client_had_left); /v1 was not: the client, still connected, is told
    # store_error (a 500 before the stream starts, or an error chunk in it), and the run is
    # then cancelled by the stream's finally / CancelOwnedRuns and stored as "client
    # disconnected": GET /api/runs/{id} says the client left, which it never did.
    monkeypatch.setattr(RunHandle.__init__, "__kwdefaults__",
                        {**(RunHandle.__init__.__kwdefaults__ or {}), "window": 2})
    backend = ScriptedBackend(lambda req: Reply("a b c d e f g h i j k l", hang_after=8))
    settings = load_settings(db=tmp_path / "s.db")
    async with running_server(settings, backend) as srv, srv.client() as client:
        store = srv.services.require_store()

        def broken(op: str) -> None:
            if op in ("list_run_events", "list_events_of_runs"):
                raise StoreError("store read failed: disk I/O error")

        store.faults.before_read = broken
        with trio.fail_after(GUARD):
            r = await client.post("/v1/chat/completions", json={
                "stream": True, "messages": [{"role": "user", "content": "q"}]})
        store.faults.before_read = None
        assert "store_error" in r.text, r.text  # what the client was told
        (c,) = (await client.get("/api/conversations")).json()["data"]
        messages = (await client.get(f"/api/conversations/{c['id']}")).json()["messages"]
        run_id = messages[-1]["run_id"]
        with trio.fail_after(GUARD):
            while True:  # the run's end, once stored
                run = (await client.get(f"/api/runs/{run_id}")).json()
                if run["status"] not in ("queued", "running"):
                    break
                await trio.sleep(0.05)
    assert run["error"] != "client disconnected", (r.status_code, run)
