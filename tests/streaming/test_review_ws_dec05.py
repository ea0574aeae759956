"""A review of ``GET /api/ws`` (service/api/ws.py, service/wsping.py, service/wsclose.py,
service/api/owned.py, service/runs/reader.py) against /work/shared/API.md and docs/api.md: each
test fails on the code it was written against, because of the defect its docstring names.

Real servers on 127.0.0.1 (the app under hypercorn on port 0, or hypercorn's own CLI in a
process of its own), the real simulator upstream; trio-websocket, or a raw wsproto socket where
the test must decide when it reads. No part of the service is mocked.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import wsproto
from trio_websocket import ConnectionClosed, open_websocket_url
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Message,
    Ping,
    Request,
    TextMessage,
)

from service.settings import Settings
from service.sim import Reply, open_simulator

from ..api.test_ws_and_v1_faults import RawWS
from ..e2e import e2e
from ..servers import ROOT
from ..streams import ws_reply, ws_url

GUARD = 20  # seconds any single wait may take before the test fails
BIG = ("x" * 4000 + " ") * 3100  # 12 MB of tokens: far more than socket buffers and the queue


# -- error replies echo a request's unknown field names whole ---------------------------------


async def test_an_error_reply_does_not_echo_an_unknown_fields_name_whole(
    settings: Settings,
) -> None:
    """docs/api.md (WebSocket): "error replies echo only the request's `type`,
    `conversation_id` and `run_id`, cut short" (ws.py: never the whole request, "a content of
    a megabyte ... would come back").

    Wrong: a message with an unknown field is answered ``invalid_request`` whose ``message`` is
    ``"<the field's name>: Extra inputs are not permitted"``, the name whole and JSON-escaped
    (``ensure_ascii``: "é" becomes the six bytes ``\\u00e9``). A message of 1 MB (under
    ``SERVICE_MAX_BODY_BYTES``, so the socket stays) with a 500,000-character key comes back as
    a 3 MB reply: three times what was sent, and past the 1 MiB a default client takes in one
    message (trio-websocket closes the socket with 1009 on it, its runs then cancelled as a
    client that left). The same request with a huge ``run_id`` gets a short reply (fixed
    before: tests/api/test_endpoint_faults.py); the key's name is the way around that.

    Right: the reply names the field cut short (or not at all), as the echo is: a few hundred
    bytes, whatever the request's size; the socket stays open for a default client.
    """
    async with e2e(settings, "llamacpp") as env:
        conv = await env.conversation()
        key = "é" * 500_000  # 1,000,000 bytes of UTF-8
        raw = json.dumps({"type": "message", "conversation_id": conv, "content": "q", key: 1},
                         ensure_ascii=False)
        assert len(raw.encode()) < settings.max_body_bytes  # within the limit: answered
        sizes: list[int] = []
        async with open_websocket_url(ws_url(env.server), max_message_size=2**25) as ws:
            await ws.send_message(raw)
            text, reply = await ws_reply(ws)
            sizes.append(len(text.encode()))
            assert reply["type"] == "error", reply
            assert reply["error"]["type"] == "invalid_request", reply
            # And with a cancel (another model, the same echo).
            await ws.send_message(json.dumps({"type": "cancel", "run_id": "run_x", key: 1},
                                             ensure_ascii=False))
            text, reply = await ws_reply(ws)
            sizes.append(len(text.encode()))
            assert reply["error"]["type"] == "invalid_request", reply
        # A client with trio-websocket's defaults (1 MiB per message) keeps its socket.
        default_client_ok = True
        async with open_websocket_url(ws_url(env.server)) as ws:
            await ws.send_message(raw)
            try:
                with trio.fail_after(GUARD):
                    await ws.get_message()
            except ConnectionClosed:
                default_client_ok = False
    assert (max(sizes) < 10_000, default_client_ok) == (True, True), (
        f"error replies of {sizes} bytes for a request of {len(raw.encode())} bytes (the "
        f"unknown field's name echoed whole); a default client's socket "
        f"{'stayed' if default_client_ok else 'was closed (1009)'}")


# -- a refused start is not a reply that goes ahead of the runs' events ----------------------


async def test_a_refused_start_is_answered_ahead_of_the_runs_events(
    settings: Settings,
) -> None:
    """docs/api.md (WebSocket): the server sends ``{"type": "error", ...}`` "for a bad client
    message or a refused start", and "Replies to a client's own messages go out ahead of the
    runs' events".

    A client has a run streaming fast and is briefly behind (its send queue is full: the
    normal state of a socket slower than its run). It sends a message for a conversation that
    does not exist (refused: ``not_found``), then a message of an unknown type (refused:
    ``invalid_request``), then reads on.

    Wrong: the ``invalid_request`` reply, to the later message, comes within a few frames,
    ahead of the queued events; the ``not_found`` reply, to the earlier one, comes only after
    the whole send queue (256 events of the other run) and after that later reply.
    ``_Session._start_run`` (and ``_cancel_through_store``) put their error replies in the
    runs' event queue (``self.send.send``) instead of the replies' queue; and while that queue
    is full the start's task waits, holding one of the socket's 32 slots.

    Right: every reply to the client's own messages, a refused start's included, goes out
    ahead of the runs' events (after at most what is already in the socket's buffers), and so
    in the order of the messages it answers.
    """
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(text=BIG, hang_after=3000))
        conv = await env.conversation()
        ws = await RawWS.open(env.server, rcvbuf=4096)  # a client behind fills its window fast
        try:
            await ws.send({"type": "message", "conversation_id": conv, "content": "q"})
            started = await ws.recv()
            assert isinstance(started, dict), started
            assert started["type"] == "run.started", started
            run_id = started["run_id"]
            (upstream,) = await env.sim.wait_streams(1)
            with trio.fail_after(GUARD):  # the run has produced far more than the queue holds
                while upstream.chunks_sent < 2000:  # noqa: ASYNC110 (the simulator's count)
                    await trio.sleep(0.02)
            await ws.send({"type": "message", "conversation_id": "conv_nope", "content": "x"})
            await trio.sleep(0.5)  # its start is refused by now (one store read)
            await ws.send({"type": "dance"})
            got: list[str] = []
            with trio.fail_after(GUARD):
                while not {"not_found", "invalid_request"} <= set(got):
                    m = await ws.recv()
                    assert isinstance(m, dict), m
                    got.append(m["error"]["type"] if m.get("type") == "error" else m["type"])
            await ws.send({"type": "cancel", "run_id": run_id})
        finally:
            await ws.stream.aclose()
    refused, other = got.index("not_found"), got.index("invalid_request")
    run_events_before = sum(1 for t in got[:refused] if t not in ("not_found", "invalid_request"))
    # (What was already in the socket's buffers comes first in any case: a few frames.)
    assert run_events_before < 64, (
        f"the refused start's not_found came as frame {refused}, after {run_events_before} "
        f"events of the other run (the reply to the later message came as frame {other})")


# -- hypercorn's own CLI serves WebSockets without their pings and their size bound ----------


async def _serve_with_hypercorn_cli(tmp_path: Path, env_extra: dict[str, str]
                                    ) -> tuple[trio.Process, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    env.update(env_extra)
    log = tmp_path / "hypercorn.log"
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "hypercorn", "--config", str(ROOT / "hypercorn.toml"),
             "--bind", "127.0.0.1:0", "service.app:app"],
            cwd=tmp_path, env=env, stdout=out, stderr=out,
        )
    finally:
        os.close(out)
    with trio.fail_after(60):
        while True:
            text = log.read_bytes()
            m = re.search(rb"Running on (http://127\.0\.0\.1:\d+)", text)
            if m:
                return proc, m.group(1).decode()
            assert proc.returncode is None, text.decode()
            await trio.sleep(0.05)


class _Frames:
    """A raw WebSocket client that records the server's pings (and answers them)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self.pings = 0
        self.events: list[Any] = []

    @classmethod
    async def open(cls, url: str) -> _Frames:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        ws = cls(await trio.open_tcp_stream(host, int(port)))
        await ws.stream.send_all(ws.conn.send(Request(host=f"{host}:{port}", target="/api/ws")))
        with trio.fail_after(GUARD):
            while not any(isinstance(e, AcceptConnection) for e in ws.events):
                assert await ws.pump(), "closed during the handshake"
        ws.events.clear()
        return ws

    async def pump(self) -> bool:
        data = await self.stream.receive_some(65536)
        self.conn.receive_data(data or None)
        for e in self.conn.events():
            if isinstance(e, Ping):
                self.pings += 1
                with contextlib.suppress(trio.BrokenResourceError):  # the server closed it
                    await self.stream.send_all(self.conn.send(e.response()))
            else:
                self.events.append(e)
        return bool(data)

    async def send_text(self, text: str) -> None:
        await self.stream.send_all(self.conn.send(TextMessage(text)))

    async def next_message_or_close(self) -> Any:
        text = ""
        with trio.fail_after(GUARD):
            while True:
                while self.events:
                    e = self.events.pop(0)
                    if isinstance(e, Message):
                        text += e.data
                        if e.message_finished:
                            return json.loads(text)
                    elif isinstance(e, CloseConnection):
                        return e
                if not await self.pump():
                    return None


@pytest.mark.slow
async def test_under_hypercorns_own_cli_a_websocket_is_pinged_and_bounded(
    tmp_path: Path,
) -> None:
    """API.md: "`hypercorn --config hypercorn.toml service.app:app` must work too".
    docs/api.md (WebSocket): "The server pings the socket every `SERVICE_SSE_KEEPALIVE`
    seconds (a browser cannot, and a proxy's idle timeout would cut a socket whose run is
    quiet ...); a socket from which nothing has come for four ping intervals after a ping went
    out ... is closed as a client that left, and its `cancel` runs are cancelled"; a message
    over `SERVICE_MAX_BODY_BYTES` gets `body_too_large`, "past twice that it is closed with
    1009, whose reason names the cap".

    Wrong: both come from ``service.server.build_config`` (``websocket_ping_interval``,
    ``websocket_max_message_size``), which only ``python -m service`` uses. Under hypercorn's
    own CLI (``service.drainfirst`` wraps its serve, but sets neither; hypercorn.toml has
    neither) a socket is never pinged: a quiet run's socket is cut by a proxy's idle timeout
    (its run cancelled), and a peer that vanished without a FIN keeps its ``cancel`` runs for
    good. And a message of ten times the cap is buffered whole (up to hypercorn's own 16 MiB)
    and answered ``body_too_large`` instead of closing the socket with 1009.

    Right: the same WebSocket behaviour under both documented ways of serving: a ping every
    ``SERVICE_SSE_KEEPALIVE`` seconds, and a 1009 past twice ``SERVICE_MAX_BODY_BYTES``.
    """
    keepalive = 0.5
    cap = 10_000
    async with open_simulator() as sim:
        sim.script(Reply("late answer", first_delay=30))  # a quiet run: the model thinks
        proc, url = await _serve_with_hypercorn_cli(tmp_path, {
            "SERVICE_DB": str(tmp_path / "s.db"), "SERVICE_BACKEND": "llamacpp",
            "SERVICE_LLAMACPP_URL": sim.url, "SERVICE_SSE_KEEPALIVE": str(keepalive),
            "SERVICE_MAX_BODY_BYTES": str(cap)})
        try:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                r = await client.post("/api/conversations", json={})
                assert r.status_code == 201, r.text
                conv = r.json()["id"]
            ws = await _Frames.open(url)
            await ws.send_text(json.dumps(
                {"type": "message", "conversation_id": conv, "content": "think long"}))
            started = await ws.next_message_or_close()
            assert isinstance(started, dict), started
            assert started["type"] == "run.started", started
            with trio.move_on_after(6 * keepalive):  # the model has not answered yet
                while await ws.pump():
                    pass
            pings = ws.pings
            # Three times the cap (one read of the server's): past twice it, the socket is
            # closed with 1009.
            await ws.send_text(json.dumps({"type": "cancel", "run_id": "r" * (3 * cap)}))
            after = await ws.next_message_or_close()
            while isinstance(after, dict) and after.get("run_id") == started["run_id"]:
                after = await ws.next_message_or_close()
            await ws.stream.aclose()
        finally:
            proc.terminate()
            with trio.move_on_after(GUARD, shield=True):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
    closed_1009 = isinstance(after, CloseConnection) and after.code == 1009
    assert (pings > 0, closed_1009) == (True, True), (
        f"under hypercorn's CLI: {pings} pings in {6 * keepalive:g} s of a quiet run "
        f"(SERVICE_SSE_KEEPALIVE={keepalive:g}); a message of {3 * cap} bytes "
        f"(SERVICE_MAX_BODY_BYTES={cap}) got {after!r} instead of a 1009 close")
