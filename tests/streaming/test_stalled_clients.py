"""A client that stops reading but keeps its connection open is dropped (service/sendstall.py;
found by a review, each test failed before): its cancel run stops, and it cannot hold a
shutdown past its bounds. Raw sockets with a small receive buffer."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import h11
import trio
import trio.testing
from hypercorn.events import Closed, RawData

from service.runs import RunStatus
from service.sendstall import _protocol_send
from service.settings import Settings, load_settings

from ..fakes import Reply, ScriptedBackend
from ..servers import RunningServer, running_server

GUARD = 10  # seconds any wait may take before the test fails


def _settings(tmp_path: Path, **update: Any) -> Settings:
    return load_settings(db=tmp_path / "service.db", **update)


async def _raw_connect(srv: RunningServer, *, rcvbuf: int | None = None) -> trio.SocketStream:
    """A raw TCP connection; ``rcvbuf``: a small receive buffer, so a client that stops
    reading fills the window fast."""
    host, port = srv.url.removeprefix("http://").rsplit(":", 1)
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect((host, int(port)))
    return trio.SocketStream(sock)


def _request(method: str, target: str, body: Any = None) -> bytes:
    raw = b"" if body is None else json.dumps(body).encode()
    conn = h11.Connection(h11.CLIENT)
    head = conn.send(h11.Request(method=method, target=target, headers=[
        ("Host", "127.0.0.1"), ("Content-Type", "application/json"),
        ("Content-Length", str(len(raw)))]))
    return head + conn.send(h11.Data(data=raw)) + conn.send(h11.EndOfMessage())


async def _read_until(stream: trio.SocketStream, marker: bytes, limit: int = 1 << 20) -> bytes:
    data = b""
    while marker not in data:
        chunk = await stream.receive_some(4096)
        assert chunk, f"closed before {marker!r}: {data[:500]!r}"
        data += chunk
        assert len(data) < limit
    return data


async def _conversation(srv: RunningServer) -> str:
    async with srv.client() as c:
        r = await c.post("/api/conversations", json={})
        assert r.status_code == 201, r.text
        return str(r.json()["id"])


# -- a client that stops reading ----------------------------------------------------------------

BIG = ("x" * 4000 + " ") * 4000  # 16 MB of tokens: far more than socket buffers hold


async def _stalled_stream(srv: RunningServer, conv: str) -> tuple[trio.SocketStream, str]:
    """A streamed message whose client reads its first token, then nothing more."""
    stream = await _raw_connect(srv, rcvbuf=4096)
    await stream.send_all(_request("POST", f"/api/conversations/{conv}/messages",
                                   {"content": "hi", "stream": True}))
    with trio.fail_after(GUARD):
        head = await _read_until(stream, b"event: token")
    assert head.startswith(b"HTTP/1.1 200")
    run_id = json.loads(head.split(b"data: ", 1)[1].split(b"\n", 1)[0])["run_id"]
    return stream, str(run_id)


async def test_a_client_that_stops_reading_is_dropped_and_its_cancel_run_stopped(
    tmp_path: Path,
) -> None:
    # The contract: "a client that stops reading is eventually dropped, without leaking the
    # run (on_disconnect: cancel) or the memory". The client keeps its TCP connection open
    # but reads nothing; the run (paced, long) is not slowed by it (pull model), so it goes
    # on producing into a window no one will ever read, and the response task is parked for
    # ever in hypercorn's shielded send_all. Keep-alive is 0.2 s here: 25 keep-alive
    # intervals with not one byte taken by the client is "eventually" by any measure.
    backend = ScriptedBackend(lambda req: Reply(BIG, gap=0.01))
    settings = _settings(tmp_path, sse_keepalive=0.2)
    stalled_for = 5.0
    async with running_server(settings, backend) as srv:
        conv = await _conversation(srv)
        stream, run_id = await _stalled_stream(srv, conv)
        try:
            sup = srv.services.require_supervisor()
            handle = sup.get(run_id)
            assert handle is not None
            # From now on the client reads nothing.
            with trio.move_on_after(stalled_for):
                await handle.finished.wait()
            status = handle.status
            emitted = handle.emitted_seq
        finally:
            await stream.aclose()  # lets the parked send fail, so the server can stop
    assert status is not RunStatus.running, (
        f"{stalled_for} s after the client stopped reading (keep-alive 0.2 s) its "
        f"on_disconnect=cancel run is still running, {emitted} events emitted for nobody")


async def test_a_client_that_stops_reading_does_not_hold_shutdown_past_its_bound(
    tmp_path: Path,
) -> None:
    # graceful_timeout bounds how long requests in flight may hold a shutdown. A client that
    # stops reading parks its response in hypercorn's *shielded* send_all, which no cancel
    # reaches: the server never finishes shutting down (here: until the test closes the
    # client's socket itself, LIMIT seconds later).
    backend = ScriptedBackend(lambda req: Reply(BIG, gap=0.01))
    settings = _settings(tmp_path, sse_keepalive=0.2, shutdown_drain=0.5)
    limit = 8.0  # graceful_timeout 1 s + drain 0.5 s + a wide margin
    leaving = trio.Event()
    unstuck: list[float] = []
    stream: trio.SocketStream | None = None

    async def unstick() -> None:
        await leaving.wait()
        await trio.sleep(limit)
        unstuck.append(trio.current_time())
        assert stream is not None
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(unstick)
        async with running_server(settings, backend, graceful_timeout=1) as srv:
            conv = await _conversation(srv)
            stream, _ = await _stalled_stream(srv, conv)
            await trio.sleep(0.5)  # the client's window is full
            leaving.set()
            start = trio.current_time()
        took = trio.current_time() - start
        nursery.cancel_scope.cancel()
    await stream.aclose()
    assert not unstuck, (
        f"the shutdown took {took:.1f} s with graceful_timeout=1: it ended only when the "
        "stalled client's socket was closed")


# -- the first token's bytes are not held behind the head ---------------------------------------

async def test_a_streams_head_and_first_token_leave_in_one_go(tmp_path: Path) -> None:
    """A ``/v1`` stream's head and its first token are written without a scheduling round
    between them (service/sendstall.py): trio's ``send_all`` yields after each write and its
    ``Lock`` yields even when free, so the first token waited a round or two of every other
    ready task behind the head (measured at 100 streams: 0.65 ms p50). The client here shares
    the server's event loop, so it can only read between two writes if the server yielded
    between them: each of its first reads must hold the head and the first token (before the
    fix, about one in two held the head alone)."""
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    backend = ScriptedBackend(lambda _req: Reply(text="alpha beta gamma"))
    async with running_server(_settings(tmp_path), backend) as srv:
        for _ in range(12):
            stream = await _raw_connect(srv)
            async with stream:
                await stream.send_all(_request("POST", "/v1/chat/completions", body))
                with trio.fail_after(GUARD):
                    first = await stream.receive_some(65536)
                assert first.startswith(b"HTTP/1.1 200"), first[:200]
                assert b'"content":"alpha' in first, first


async def test_a_write_racing_hypercorns_close_is_a_closed_connection() -> None:
    """hypercorn's ``TCPServer._close`` sends its EOF without the send lock, so a response's
    write racing it found the stream busy: ``BusyResourceError`` escaped the write as a
    traceback in the log (seen with an early 413 closed at its linger). It is the connection
    closing: the protocol is told so, as for a broken or closed stream."""
    stream, peer = trio.testing.lockstep_stream_pair()  # a send waits for the peer's read
    told: list[object] = []

    class Protocol:
        async def handle(self, event: object) -> None:
            told.append(event)

    class Server:  # the parts of hypercorn's TCPServer the write uses
        send_lock = trio.Lock()
        config = type("Config", (), {})()
        protocol = Protocol()

    Server.stream = stream  # type: ignore[attr-defined]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.send_all, b"eof")  # as _close's send_eof, holding the stream
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(GUARD):
            await _protocol_send(Server(), RawData(b"body"))
        assert [type(e) for e in told] == [Closed]
        await peer.receive_some(10)  # lets the first send finish
