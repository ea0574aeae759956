"""WebSocket session, event reader and re-join fault paths found in review (2026-12-01); each
test failed before its fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, open_websocket_url

import service.api.ws as ws_mod
from service.api.models import MAX_CONTENT_CHARS, MAX_MODEL_CHARS
from service.errors import StoreError
from service.metrics import Metrics
from service.runs import RunHandle, RunSpec
from service.runs.reader import EventReader, Keepalive
from service.server import build_config
from service.services import Services
from service.settings import Settings, load_settings

from ..fakes import Reply, ScriptedBackend, supervisor_env
from ..servers import running_server
from ..streams import parse_sse, ws_reply, ws_url


class FakeSocket:
    """quart's ``websocket`` for _Session.receive_loop: scripted incoming messages."""

    def __init__(self) -> None:
        self.incoming_send, self.incoming = trio.open_memory_channel[str](10_000)

    async def receive(self) -> str:
        return await self.incoming.receive()


async def _receive_until_closed(session: Any, closed: list[bool]) -> None:
    """The session's receive loop, as ``ws()`` runs it: a client whose replies find its send
    queue full (it reads nothing) is closed (``NotReading``: 1008)."""
    try:
        await session.receive_loop()
    except ws_mod.NotReading:
        closed.append(True)


def _services(tmp_path: Path, env: Any) -> Services:
    svc = Services(settings=load_settings(db=tmp_path / "x.db"), metrics=Metrics())
    svc.store, svc.supervisor = env.store, env.supervisor
    return svc


async def test_a_ws_client_that_never_reads_cannot_pile_up_tasks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A client that sends 'message's and never reads: each one gets a start_run task, whose error
    # reply then blocks on the full send queue (the send loop is stuck in websocket.send). The
    # receive loop never blocks (start_soon), so tasks - each holding its request - pile up.
    sock = FakeSocket()
    monkeypatch.setattr(ws_mod, "websocket", sock)
    async with supervisor_env(tmp_path, ScriptedBackend()) as env:
        send, _recv = trio.open_memory_channel[Any](ws_mod._SEND_QUEUE)  # never drained
        closed: list[bool] = []
        sockets: list[tuple[Any, trio.Nursery]] = []

        async def one_socket() -> None:  # its nursery, as ws() has it
            async with trio.open_nursery() as nursery:
                session = ws_mod._Session(_services(tmp_path, env), None, nursery, send)
                sockets.append((session, nursery))
                nursery.start_soon(_receive_until_closed, session, closed)

        async with trio.open_nursery() as outer:
            outer.start_soon(one_socket)
            for _ in range(2000):
                sock.incoming_send.send_nowait(json.dumps(
                    {"type": "message", "conversation_id": "conv_nope", "content": "x" * 1000}))
            await trio.testing.wait_all_tasks_blocked()
            session, nursery = sockets[0]
            pending = len(nursery.child_tasks)
            outer.cancel_scope.cancel()
        assert pending < 300, f"{pending} tasks parked on one socket that never reads"
        # ... and the socket was closed: its replies (the refused starts') found their queue
        # full, in the receive loop or in the starts' own tasks.
        assert closed or session.not_reading


async def test_a_ws_client_that_never_reads_cannot_pin_finished_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    # max_runs bounds runs in flight, not forwarders: once a run finishes, a new one can start,
    # while the old forwarder stays parked on the full queue holding its RunHandle (and window).
    sock = FakeSocket()
    monkeypatch.setattr(ws_mod, "websocket", sock)
    backend = ScriptedBackend(lambda req: Reply("a b c d e f g h"))
    async with supervisor_env(tmp_path, backend, max_runs=5) as env:
        conv = await env.conversation()
        send, _recv = trio.open_memory_channel[Any](ws_mod._SEND_QUEUE)  # never drained
        closed: list[bool] = []
        async with trio.open_nursery() as nursery:
            session = ws_mod._Session(_services(tmp_path, env), None, nursery, send)
            nursery.start_soon(_receive_until_closed, session, closed)
            for _ in range(40):  # waves of max_runs runs, each waited for
                for _ in range(5):
                    sock.incoming_send.send_nowait(json.dumps(
                        {"type": "message", "conversation_id": conv, "content": "q"}))
                await trio.sleep(1)
                assert env.supervisor.in_flight == 0
            pinned = [h for h, _ in session.runs.values() if h.done]
            nursery.cancel_scope.cancel()
        assert len(pinned) < 50, f"{len(pinned)} finished RunHandles held by one socket"
        assert closed


async def test_a_store_error_in_a_ws_forwarder_still_lets_disconnect_cancel_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    # A slow socket's forwarder falls behind the window and re-reads the store; the read fails:
    # forward() sends an error and drops the run from session.runs - but the run goes on, and
    # when the socket then drops, abandon() no longer cancels it (on_disconnect=cancel).
    monkeypatch.setattr(RunHandle.__init__, "__kwdefaults__",
                        {**(RunHandle.__init__.__kwdefaults__ or {}), "window": 10})
    sock = FakeSocket()
    monkeypatch.setattr(ws_mod, "websocket", sock)
    backend = ScriptedBackend(lambda req: Reply("t " * 200, gap=0.1))
    async with supervisor_env(tmp_path, backend) as env:
        def broken(op: str) -> None:
            if op in ("list_run_events", "list_events_of_runs"):
                raise StoreError("store read failed: disk I/O error")

        env.store.faults.before_read = broken
        conv = await env.conversation()
        send, recv = trio.open_memory_channel[Any](4)
        async with trio.open_nursery() as nursery:
            session = ws_mod._Session(_services(tmp_path, env), None, nursery, send)
            nursery.start_soon(session.receive_loop)
            sock.incoming_send.send_nowait(json.dumps(
                {"type": "message", "conversation_id": conv, "content": "q"}))
            await trio.sleep(3)  # the socket reads nothing for 3 s (30 tokens > window)
            got: list[Any] = []
            for _ in range(20):  # then it reads again
                got += [m for m in iter(lambda: _nowait(recv), None)]
                await trio.sleep(0.01)
            handle = next(iter(env.supervisor.live()), None)
            assert handle, "the run is live"
            assert any(m.get("type") == "error" for m in got if isinstance(m, dict))
            nursery.cancel_scope.cancel()  # the socket drops
        session.abandon()  # as ws() does in its finally
        await trio.lowlevel.checkpoint()
        assert handle.cancel_reason == "client disconnected", (
            f"run still {handle.status}; nobody will ever read or cancel it")


def _nowait(recv: Any) -> Any:
    try:
        return recv.receive_nowait()
    except trio.WouldBlock:
        return None


async def test_a_rejoin_after_a_late_batch_write_has_no_gap(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # A batch whose write waited past the budget is published but never stored: live clients
    # got it, a re-joining client silently skips it.
    backend = ScriptedBackend([Reply("a b c d e f", gap=1.0)])
    async with supervisor_env(tmp_path, backend) as env:
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, "x"))
        await trio.sleep(1.5)
        await env.store.faults.hold_writes()
        await trio.sleep(12)  # past the 10 s budget
        env.store.faults.release_writes()
        await handle.finished.wait()
        reader = EventReader(handle.id, after=0, store=env.store, supervisor=env.supervisor,
                             keepalive=5.0)
        seqs = [e.seq async for e in reader if not isinstance(e, Keepalive)]
        assert seqs == list(range(1, handle.emitted_seq + 1))


class CountingStore:
    def __init__(self) -> None:
        self.reads = 0

    async def list_run_events(self, run_id: str, *, after: int = 0, limit: int = 10_000,
                              max_chars: int | None = None) -> list[Any]:
        self.reads += 1
        await trio.lowlevel.checkpoint()
        return []  # the gap was never stored (see the test above)


class OneRun:
    def __init__(self, handle: RunHandle, store: Any) -> None:
        from service.runs.reads import BatchedReads
        from service.runs.wakeups import Wakeups

        self.handle = handle
        self.wakeups = Wakeups()
        self.reads = BatchedReads(store)  # not running: each read goes to the store itself

    def get(self, run_id: str) -> RunHandle | None:
        return self.handle


async def test_a_reader_waiting_for_a_gap_to_be_stored_does_not_spin() -> None:
    handle = RunHandle(run_id="run_x", conversation_id="c", agent="chat", model=None,
                       owner=None, message_id="m", sink=lambda e: None, window=10)
    for _ in range(25):
        handle.publish([handle.emit("token", {"text": "x"})])
    store = CountingStore()
    reader = EventReader("run_x", after=0, store=store, supervisor=OneRun(handle, store),  # type: ignore[arg-type]
                         keepalive=5.0)
    with trio.move_on_after(0.2):
        await reader.__anext__()
    assert store.reads < 10, f"{store.reads} store reads in 0.2 s, no event, no keep-alive"


async def test_ws_deeply_nested_json_gets_an_error_not_a_dropped_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = FakeSocket()
    monkeypatch.setattr(ws_mod, "websocket", sock)
    async with supervisor_env(tmp_path, ScriptedBackend()) as env:
        send, _recv = trio.open_memory_channel[Any](10)
        async with trio.open_nursery() as nursery:
            session = ws_mod._Session(_services(tmp_path, env), None, nursery, send)
            sock.incoming_send.send_nowait("[" * 100_000)  # 100 kB, far under the size limit
            sock.incoming_send.send_nowait("{}")
            nursery.start_soon(session.receive_loop)
            await trio.testing.wait_all_tasks_blocked()
            replies = list(session.replies)  # (no send loop here: the replies wait for it)
            nursery.cancel_scope.cancel()
        assert len(replies) == 2, replies


async def test_sse_rejoin_store_error_ends_with_an_error_event(tmp_path: Path) -> None:
    import httpx

    settings = load_settings(db=tmp_path / "s.db")
    async with running_server(settings, ScriptedBackend(lambda r: Reply("a b"))) as srv, \
            srv.client() as client:
        conv = (await client.post("/api/conversations", json={})).json()["id"]
        r = await client.post(f"/api/conversations/{conv}/messages", json={"content": "q"})
        run_id = r.json()["run"]["id"]
        store = srv.services.require_store()

        def broken(op: str) -> None:
            if op in ("list_run_events", "list_events_of_runs"):
                raise StoreError("store read failed: disk I/O error")

        store.faults.before_read = broken
        try:
            async with client.stream("GET", f"/api/runs/{run_id}/events") as resp:
                status = resp.status_code
                body = b"".join([c async for c in resp.aiter_raw()])
        except httpx.HTTPError as exc:
            body = f"transport error: {exc!r}".encode()
        assert status == 200
        assert b"event: error" in body, body
        assert b"store_error" in body


async def test_a_batch_whose_write_failed_is_stored_later_and_the_run_end_has_no_gap(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # The store refuses one batch (disk full for a moment): its events were published, and are
    # written again, with the next batch or with the run's final write.
    backend = ScriptedBackend([Reply("a b c d e f", gap=1.0)])
    async with supervisor_env(tmp_path, backend) as env:
        real = env.store.append_run_events
        failures = [StoreError("store write failed: disk full")]

        async def flaky(events, **kwargs):  # type: ignore[no-untyped-def]
            if failures and any(e.type == "token" for e in events):
                raise failures.pop()
            return await real(events, **kwargs)

        env.store.append_run_events = flaky  # type: ignore[method-assign]
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, "x"))
        seen = [e.seq async for e in handle.subscribe()]
        await handle.finished.wait()
        assert not failures  # the failure happened
        stored = [e.seq for e in await env.store.list_run_events(handle.id)]
        assert stored == seen == list(range(1, handle.emitted_seq + 1))


async def test_a_cancel_is_read_while_a_socket_has_its_maximum_of_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    # Found in review: the receive loop waited for a free slot, so with 32 live runs and one
    # more message a cancel was never read.
    sock = FakeSocket()
    monkeypatch.setattr(ws_mod, "websocket", sock)
    backend = ScriptedBackend(lambda req: Reply("a b c", hang_after=1))  # long runs
    async with supervisor_env(tmp_path, backend) as env:
        conv = await env.conversation()
        send, recv = trio.open_memory_channel[Any](10_000)  # the client reads everything
        async with trio.open_nursery() as nursery:
            session = ws_mod._Session(_services(tmp_path, env), None, nursery, send)
            nursery.start_soon(session.receive_loop)
            for _ in range(ws_mod._RUNS_PER_SOCKET + 1):
                sock.incoming_send.send_nowait(json.dumps(
                    {"type": "message", "conversation_id": conv, "content": "q"}))
            await trio.sleep(1)
            first = next(iter(session.runs.values()))[0]
            sock.incoming_send.send_nowait(json.dumps({"type": "cancel", "run_id": first.id}))
            await first.finished.wait()
            replies = [*session.replies,  # (no send loop: they wait for it, ahead of events)
                       *(m for m in iter(lambda: _nowait(recv), None) if isinstance(m, dict))]
            nursery.cancel_scope.cancel()
        assert first.status.value == "cancelled"
        refused = [m for m in replies if m.get("type") == "error"]
        assert [m["error"]["type"] for m in refused] == ["too_many_runs"]


async def test_a_store_outage_paces_its_retries_and_keeps_every_event_in_order(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Found in review: every flush re-sent the whole backlog (up to 100,000 events) on the
    # event loop while the store was down. Held events are now written again with a back-off
    # (0.1 s doubling to 2 s), whatever the rate of new events, and none is published or lost.
    from service.store.records import RunEvent

    async with supervisor_env(tmp_path, ScriptedBackend()) as env:
        sup = env.supervisor
        real = env.store.append_run_events
        attempts: list[int] = []
        stored: list[int] = []

        async def down_for_30s(events, **kw):  # type: ignore[no-untyped-def]
            attempts.append(len(events))
            if trio.current_time() < 30:
                raise StoreError("store write failed: database or disk is full")
            stored.extend(e.seq for e in events)
            return await real(events, **kw)

        env.store.append_run_events = down_for_30s  # type: ignore[method-assign]
        for i in range(3000):  # a token every 10 ms for 30 s while the store is down
            sup.committer.enqueue(RunEvent.make("run_y", i + 1, "token", {"text": "t"}, 0.0))
            await trio.sleep(0.01)
        await trio.sleep(3)
        # Paced: a few tries while it doubles, then one per 2 s (not one per token batch).
        assert len(attempts) <= 5 + 30 / 2 + 2
        assert stored == list(range(1, 3001))  # every one, once, in order
        assert sup.committer.pending == 0


async def test_an_sse_store_error_does_not_cancel_the_run_as_if_the_client_had_left(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A burst of tokens past the handle's window makes the stream re-read the store, which
    # fails: the stream ends with an error frame (the client may re-join), and then its
    # ``finally`` (and the request's CancelOwnedRuns) cancelled the run as "client
    # disconnected" while the client was still there.
    monkeypatch.setattr(RunHandle.__init__, "__kwdefaults__",
                        {**(RunHandle.__init__.__kwdefaults__ or {}), "window": 2})
    backend = ScriptedBackend(lambda req: Reply("a b c d e f g h i j k l", hang_after=8))
    async with running_server(settings, backend) as srv, srv.client() as client:
        conv = (await client.post("/api/conversations", json={})).json()["id"]

        def broken(op: str) -> None:
            if op in ("list_run_events", "list_events_of_runs"):
                raise StoreError("store read failed: disk I/O error")

        srv.services.require_store().faults.before_read = broken
        with trio.fail_after(10):
            r = await client.post(f"/api/conversations/{conv}/messages",
                                  json={"content": "q", "stream": True})
        frames = parse_sse(r.text)
        assert (frames[-1]["event"], frames[-1]["data"]["type"]) == ("error", "store_error")
        run_id = frames[0]["data"]["run_id"]
        await trio.testing.wait_all_tasks_blocked()  # the request is over, server side too
        handle = srv.services.require_supervisor().get(run_id)
        assert handle is not None
        assert (handle.done, handle.cancel_reason) == (False, None)
        run = (await client.get(f"/api/runs/{run_id}")).json()
        assert (run["status"], run["error"]) == ("running", None)
        # The client re-joins later, or cancels it.
        r = await client.post(f"/api/runs/{run_id}/cancel")
        assert r.json()["status"] == "cancelled"
        assert handle.cancel_reason == "cancelled by request"


async def test_ws_messages_have_the_limits_of_http_messages(settings: Settings) -> None:
    # WsMessage had no max_length and the socket no size limit: a 2 MB content started a run,
    # and the error replies echoed whole requests back.
    async with running_server(settings, ScriptedBackend(lambda req: Reply("ok"))) as srv, \
            srv.client() as client:
        conv = (await client.post("/api/conversations", json={})).json()["id"]
        url = f"/api/conversations/{conv}/messages"
        huge = "y" * 2_000_000  # over SERVICE_MAX_BODY_BYTES
        assert (await client.post(url, json={"content": huge})).status_code == 413
        over = {"content": "y" * (MAX_CONTENT_CHARS + 1), "model": "m" * (MAX_MODEL_CHARS + 1)}
        for field, value in over.items():
            r = await client.post(url, json={"content": "q", field: value})
            assert (r.status_code, r.json()["error"]["field"]) == (422, field)
        async with open_websocket_url(ws_url(srv)) as ws:
            await ws.send_message(json.dumps(
                {"type": "message", "conversation_id": conv, "content": huge}))
            text, reply = await ws_reply(ws)
            assert reply["error"]["type"] == "body_too_large"
            assert "request" not in reply
            assert len(text) < 200
            for field, value in over.items():
                await ws.send_message(json.dumps(
                    {"type": "message", "conversation_id": conv, "content": "q", field: value}))
                text, reply = await ws_reply(ws)
                assert reply["error"]["type"] == "invalid_request"
                assert reply["error"]["message"].startswith(f"{field}:")
                # What tells which request it answers, not the request.
                assert reply["request"] == {"type": "message", "conversation_id": conv}
                assert len(text) < 400
            # The socket still works.
            await ws.send_message(json.dumps(
                {"type": "message", "conversation_id": conv, "content": "q"}))
            while reply.get("type") != "run.finished":
                _, reply = await ws_reply(ws)
            assert reply["data"]["status"] == "succeeded"
        stored = (await client.get(f"/api/conversations/{conv}")).json()["messages"]
        assert [(m["role"], m["content"]) for m in stored] == [("user", "q"), ("assistant", "ok")]


async def test_hypercorn_closes_a_socket_on_a_message_far_over_the_limit(
    settings: Settings,
) -> None:
    # Hypercorn buffers a message whole before the app sees it: its cap follows
    # SERVICE_MAX_BODY_BYTES (twice it: up to there the app answers and keeps the socket).
    small = settings.model_copy(update={"max_body_bytes": 4096})
    config = build_config(None, None, max_body_bytes=small.max_body_bytes)
    assert config.websocket_max_message_size == 8192
    async with running_server(
        small, websocket_max_message_size=config.websocket_max_message_size
    ) as srv, open_websocket_url(ws_url(srv)) as ws:
        await ws.send_message("x" * 8000)
        assert (await ws_reply(ws))[1]["error"]["type"] == "body_too_large"
        await ws.send_message("x" * 8193)
        with pytest.raises(ConnectionClosed) as closed, trio.fail_after(10):
            await ws.get_message()
        assert closed.value.reason.code == 1009  # message too big


@pytest.mark.parametrize("raw", [
    '{"type": "cancel", "run_id": NaN}',
    '{"type": "cancel", "run_id": -Infinity}',
    '{"type": "cancel", "run_id": 1e400}',
    '{"type": "message", "conversation_id": "c", "content": "q", "timeout": Infinity}',
])
async def test_ws_refuses_non_finite_numbers_and_replies_strict_json(
    settings: Settings, raw: str
) -> None:
    # Python's json reads NaN, Infinity and 1e400 (as inf); the error reply echoed them back
    # as bare NaN/Infinity, which a browser's JSON.parse refuses.
    async with running_server(settings) as srv, open_websocket_url(ws_url(srv)) as ws:
        await ws.send_message(raw)
        _, reply = await ws_reply(ws)
        assert reply["error"]["type"] == "malformed_json"
        assert reply["error"]["message"].startswith("the message is not valid JSON: ")
        await ws.send_message('{"type": "cancel", "run_id": 1e308}')  # finite: read
        _, reply = await ws_reply(ws)
        assert reply["error"]["type"] == "invalid_request"
