"""Review (dec07z): slow and abusive clients at the protocol level, on ``python -m service``.

Each test starts the real ``python -m service`` (hypercorn trio worker, ``build_config`` over a
copy of the repository's ``hypercorn.toml``) in a process of its own, talks to it over raw trio
sockets, and counts the server's ``/proc/<pid>/fd`` before and after: can one client with
negligible effort hold a connection slot, a task, a file descriptor, memory or a store
transaction for ever, or make the service unresponsive to others?

Documented, configurable bounds are shortened rather than waited for: ``keep_alive_timeout``
(75 s in ``hypercorn.toml``) to 2 s, ``SERVICE_SSE_KEEPALIVE`` to 0.5 s (so the stall limit of
``service/sendstall.py`` and ``service/wsping.py`` is their minimum, 2 s, and the WebSocket
ping interval 0.5 s). Quart's ``BODY_TIMEOUT`` (60 s, not a service setting) bounds a request
body's arrival; the process below shortens it to 3 s through quart's default config only, and
``test_the_body_timeout_of_the_production_app_is_finite`` checks the production value.

Not covered here (covered elsewhere): an SSE reader that stops reading
(``tests/streaming/test_stalled_clients.py``), a WebSocket client that answers no ping
(``service/wsping.py``'s tests, ``tests/test_abandoned_tools_and_ping_regressions.py``).
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

from service.sim import Reply, Simulator, open_simulator

from .servers import ROOT

_WRAPPER = """
import os, runpy, sys
t = os.environ.get("REVIEW_BODY_TIMEOUT")
if t:
    import quart.app
    from werkzeug.datastructures import ImmutableDict
    quart.app.Quart.default_config = ImmutableDict(
        {**quart.app.Quart.default_config, "BODY_TIMEOUT": float(t)})
sys.argv = ["service", *sys.argv[1:]]
runpy.run_module("service", run_name="__main__")
"""

KEEP_ALIVE = 2.0  # keep_alive_timeout given to hypercorn (75 s in hypercorn.toml)
SSE_KEEPALIVE = 0.5  # -> stall limit 2 s (STALL_MIN), WebSocket pings every 0.5 s
BODY_TIMEOUT = 3.0  # quart's BODY_TIMEOUT in the process (60 s by default)


@dataclass
class Svc:
    proc: trio.Process
    url: str
    port: int
    log: Path

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=30)


@asynccontextmanager
async def serve(tmp_path: Path, *, max_body: int | None = None,
                body_timeout: float | None = BODY_TIMEOUT) -> AsyncIterator[Svc]:
    sim = Simulator(("sim-model",), default=Reply(text="ok"), strict_models=False)
    async with open_simulator(sim) as running:
        toml = ROOT.joinpath("hypercorn.toml").read_text()
        toml = re.sub(r"(?m)^keep_alive_timeout.*$", f"keep_alive_timeout = {KEEP_ALIVE}", toml)
        assert f"keep_alive_timeout = {KEEP_ALIVE}" in toml
        conf = tmp_path / "hypercorn.toml"
        conf.write_text(toml)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
        env.update({"SERVICE_DB": str(tmp_path / "s.db"), "SERVICE_BACKEND": "llamacpp",
                    "SERVICE_LLAMACPP_URL": running.url,
                    "SERVICE_SSE_KEEPALIVE": str(SSE_KEEPALIVE)})
        if max_body is not None:
            env["SERVICE_MAX_BODY_BYTES"] = str(max_body)
        if body_timeout is not None:
            env["REVIEW_BODY_TIMEOUT"] = str(body_timeout)
        log = tmp_path / "service.log"
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-c", _WRAPPER, "--bind", "127.0.0.1:0", "--config",
                 str(conf)], cwd=tmp_path, env=env, stderr=out)
        finally:
            os.close(out)
        try:
            with trio.fail_after(60):
                while True:
                    text = log.read_bytes()
                    m = re.search(rb"Running on (http://127\.0\.0\.1:(\d+))", text)
                    if m:
                        break
                    assert proc.returncode is None, text.decode()
                    await trio.sleep(0.05)
            svc = Svc(proc, m.group(1).decode(), int(m.group(2)), log)
            async with svc.http() as c:  # warm up: lazily opened store/backends
                assert (await c.get("/healthz")).status_code == 200
            yield svc
        finally:
            proc.terminate()
            with trio.CancelScope(deadline=trio.current_time() + 20, shield=True):
                with trio.move_on_after(15):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()


async def baseline(svc: Svc) -> int:
    await trio.sleep(0.3)
    return svc.fds()


async def fds_back_to(svc: Svc, base: int, *, slack: int = 3, within: float = 20) -> None:
    """The server's fd count falls back to ``base`` (+ slack: the store's WAL, a backend's
    pooled connection) within ``within`` seconds."""
    with trio.fail_after(within):
        while True:
            if svc.fds() <= base + slack:
                break
            await trio.sleep(0.1)


async def connect(svc: Svc) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", svc.port)


async def until_closed(stream: trio.SocketStream, keep: int = 1 << 16) -> bytes:
    """Read until the server closes (EOF or reset); the first ``keep`` bytes read."""
    got = bytearray()
    while True:
        try:
            data = await stream.receive_some(1 << 16)
        except trio.BrokenResourceError:
            break
        if not data:
            break
        if len(got) < keep:
            got += data[: keep - len(got)]
    await stream.aclose()
    return bytes(got)


async def served(svc: Svc) -> None:
    """A normal client is served (a request with a fresh connection each time)."""
    async with svc.http() as c:
        assert (await c.get("/healthz")).status_code == 200


# -- HTTP/1.1 -----------------------------------------------------------------------------------


async def test_slowloris_heads_are_closed_at_keep_alive_timeout_while_others_are_served(
        tmp_path: Path) -> None:
    """200 connections trickle a request head one byte a second (some a WebSocket upgrade
    never completed): hypercorn's idle timer runs until a whole head has arrived (bytes do
    not re-arm it), so each is closed at ``keep_alive_timeout``; a normal client is served
    meanwhile; a head past ``h11_max_incomplete_size`` (16 KiB) is a 431 at once."""
    async with serve(tmp_path) as svc:
        base = await baseline(svc)
        head = (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
                + b"a" * 200 + b"\r\n\r\n")
        ws_head = (b"GET /api/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                   b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                   b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Slow: " + b"a" * 200)
        closed_after: list[float] = []

        async def slow(i: int) -> None:
            stream = await connect(svc)
            start = trio.current_time()
            text = ws_head if i % 4 == 0 else head
            try:
                for b in text:
                    await stream.send_all(bytes([b]))
                    with trio.move_on_after(1.0):
                        data = await stream.receive_some(4096)
                        assert data == b"", data  # closed, never answered
                        break
            except trio.BrokenResourceError:
                pass
            closed_after.append(trio.current_time() - start)
            await stream.aclose()

        with trio.fail_after(40):
            async with trio.open_nursery() as nursery:
                for i in range(200):
                    nursery.start_soon(slow, i)
                await trio.sleep(1.0)
                held = svc.fds()
                assert held >= base + 100, (base, held)  # they are held, for now
                for _ in range(3):
                    await served(svc)
                    await trio.sleep(0.3)
        assert len(closed_after) == 200
        # Closed near keep_alive_timeout, well before a head of ~250 bytes at 1 byte/s ended.
        assert max(closed_after) < KEEP_ALIVE + 10, max(closed_after)
        await fds_back_to(svc, base)

        # A head that never ends but grows: 431 once past h11's 16 KiB, then closed.
        stream = await connect(svc)
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000)
        with trio.fail_after(10):
            answer = await until_closed(stream)
        assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
        await fds_back_to(svc, base)


async def _post_head(path: str, length: int, *extra: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n").encode() + b"".join(extra) + b"\r\n"


async def test_a_body_trickled_or_never_sent_is_cut_by_the_body_timeout_and_holds_nothing(
        tmp_path: Path) -> None:
    """Bodies declared 1 MB arriving at a byte every 0.5 s (on ``.../messages``, on
    ``/v1/chat/completions``, chunked), and an ``Expect: 100-continue`` whose body never
    comes: each is answered 408 at quart's BODY_TIMEOUT and closed (after keepalive's
    5 s LINGER); nothing is written to the store meanwhile and the store serves others."""
    async with serve(tmp_path, max_body=1_100_000) as svc:
        async with svc.http() as c:
            r = await c.post("/api/conversations", json={})
            assert r.status_code == 201, r.text
            conv = r.json()["id"]
        base = await baseline(svc)
        cases = {
            "messages": await _post_head(f"/api/conversations/{conv}/messages", 1_000_000),
            "v1": await _post_head("/v1/chat/completions", 1_000_000),
            "expect": await _post_head(f"/api/conversations/{conv}/messages", 1_000_000,
                                       b"Expect: 100-continue\r\n"),
            "chunked": (f"POST /api/conversations/{conv}/messages HTTP/1.1\r\n"
                        "Host: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        "Transfer-Encoding: chunked\r\n\r\n").encode(),
        }
        answers: dict[str, bytes] = {}

        async def slow(name: str, head: bytes) -> None:
            stream = await connect(svc)
            await stream.send_all(head)
            got = bytearray()

            async def trickle() -> None:
                if name == "expect":
                    return  # told 100 Continue, sends nothing
                piece = b'{"content": "' if name != "chunked" else b'1\r\n{\r\n'
                try:
                    for b in piece:
                        await stream.send_all(bytes([b]))
                        await trio.sleep(0.5)
                    while True:
                        await stream.send_all(b"a" if name != "chunked" else b"1\r\na\r\n")
                        await trio.sleep(0.5)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle)
                while True:
                    try:
                        data = await stream.receive_some(65536)
                    except trio.BrokenResourceError:
                        break
                    if not data:
                        break
                    got += data
                nursery.cancel_scope.cancel()
            answers[name] = bytes(got)
            await stream.aclose()

        with trio.fail_after(40):
            async with trio.open_nursery() as nursery:
                for name, head in cases.items():
                    nursery.start_soon(slow, name, head)
                await trio.sleep(1.0)
                # Meanwhile the store and the same conversation serve a normal client.
                async with svc.http() as c:
                    r = await c.post(f"/api/conversations/{conv}/messages",
                                     json={"content": "hello"})
                    assert r.status_code == 200, r.text
        for name, got in answers.items():
            final = re.findall(rb"HTTP/1.1 (\d{3})", got)
            assert final, (name, got[:300])
            assert final[-1] == b"408", (name, got[:300])
        assert answers["expect"].startswith(b"HTTP/1.1 100"), answers["expect"][:100]
        async with svc.http() as c:
            r = await c.get(f"/api/conversations/{conv}")
            contents = [m["content"] for m in r.json()["messages"]]
        assert contents == ["hello", "ok"], contents  # nothing from the slow ones
        await fds_back_to(svc, base)


def test_the_body_timeout_of_the_production_app_is_finite(tmp_path: Path) -> None:
    """What bounds a trickled body in production: quart's BODY_TIMEOUT, 60 s (the service
    does not change it)."""
    from service.factory import create_app
    from service.settings import load_settings

    app = create_app(load_settings(db=tmp_path / "s.db"))
    assert app.config["BODY_TIMEOUT"] == 60


async def test_500_idle_keep_alive_connections_are_closed_at_keep_alive_timeout(
        tmp_path: Path) -> None:
    """500 connections each make one request, read the answer and go idle: hypercorn closes
    each at ``keep_alive_timeout`` (service/keepalive.py's fix), and every fd is released."""
    async with serve(tmp_path) as svc:
        base = await baseline(svc)
        streams: list[trio.SocketStream] = []
        with trio.fail_after(30):
            for _ in range(500):
                s = await connect(svc)
                await s.send_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                streams.append(s)
            peak = svc.fds()
            for s in streams:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += await s.receive_some(4096)
                assert data.startswith(b"HTTP/1.1 200"), data[:100]
        assert peak >= base + 100, (base, peak)  # held while idle, for now
        with trio.fail_after(KEEP_ALIVE + 20):
            async with trio.open_nursery() as nursery:
                for s in streams:
                    nursery.start_soon(until_closed, s)
        await fds_back_to(svc, base)
        await served(svc)


async def test_1000_pipelined_requests_in_one_write_are_answered_in_order(
        tmp_path: Path) -> None:
    """1,000 requests in one write: hypercorn parses one at a time (h11 pauses), so the
    rest wait in the socket; all are answered, the 1,000th with ``Connection: close``
    (``keep_alive_max_requests``), and the connection closes."""
    async with serve(tmp_path) as svc:
        base = await baseline(svc)
        stream = await connect(svc)
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 1000)
        with trio.fail_after(60):
            got = await until_closed(stream, keep=1 << 30)
        heads = re.findall(rb"HTTP/1.1 (\d{3})", got)
        assert len(heads) == 1000, len(heads)
        assert set(heads) == {b"200"}, set(heads)
        assert got.rfind(b"connection: close") > got.rfind(b"HTTP/1.1 200")
        await fds_back_to(svc, base)


async def test_pipelined_large_answers_never_read_are_dropped_at_the_stall_limit(
        tmp_path: Path) -> None:
    """A client pipelines 1,000 requests for a large answer (``/openapi.json``) and reads
    nothing: the server's writes stall, and sendstall closes the connection at its limit
    (4 keep-alive intervals, at least 2 s); the server answers others meanwhile."""
    async with serve(tmp_path) as svc:
        async with svc.http() as c:
            size = len((await c.get("/openapi.json")).content)
        assert size > 10_000, size
        base = await baseline(svc)
        stream = await connect(svc)
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await stream.send_all(b"GET /openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 1000)
        await trio.sleep(1.0)
        await served(svc)
        # Not read until the server has given up on it: then what is in our buffer, and EOF
        # or a reset (never all 1,000 answers).
        with trio.fail_after(30):
            await fds_back_to(svc, base, slack=2, within=30)
            got = await until_closed(stream, keep=1 << 30)
        assert len(got) < 1000 * size, len(got)
        assert b"took nothing" in svc.log.read_bytes()
        await fds_back_to(svc, base)


# -- WebSocket -----------------------------------------------------------------------------------


def frame(opcode: int, payload: bytes, *, fin: bool = True, length: int | None = None) -> bytes:
    """A masked client frame (``length``: the length announced, if not the payload's)."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    mask = b"\x01\x02\x03\x04"
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def ws_open(svc: Svc) -> trio.SocketStream:
    stream = await connect(svc)
    await stream.send_all(
        b"GET /api/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some(4096)
    assert data.startswith(b"HTTP/1.1 101"), data[:200]
    return stream


def close_code(data: bytes) -> int | None:
    """The code of the first close frame among server frames in ``data``."""
    at = 0
    while at + 2 <= len(data):
        op, n = data[at] & 0x0F, data[at + 1] & 0x7F
        at += 2
        if n == 126:
            n, at = struct.unpack("!H", data[at:at + 2])[0], at + 2
        elif n == 127:
            n, at = struct.unpack("!Q", data[at:at + 8])[0], at + 8
        if op == 0x8:
            return struct.unpack("!H", data[at:at + 2])[0] if n >= 2 else 1005
        at += n
    return None


async def test_a_message_in_thousands_of_tiny_continuation_frames(tmp_path: Path) -> None:
    """A message in 1-byte continuation frames: answered when whole (20,000 frames), and one
    that keeps growing is closed with 1009 past twice SERVICE_MAX_BODY_BYTES (frames do not
    escape the message bound); the server answers others meanwhile."""
    async with serve(tmp_path, max_body=4096) as svc:
        base = await baseline(svc)
        stream = await ws_open(svc)
        msg = json.dumps({"type": "join", "run_id": "nope", "pad": "x" * 3000}).encode()
        parts = [frame(0x1, msg[:1], fin=False)]
        parts += [frame(0x0, msg[i:i + 1], fin=False) for i in range(1, len(msg) - 1)]
        parts += [frame(0x0, b"", fin=False)] * 16_000  # empty ones cost a frame each
        parts.append(frame(0x0, msg[-1:]))
        with trio.fail_after(30):
            await stream.send_all(b"".join(parts))
            got = b""
            while b'"type"' not in got:  # an answer (an error reply: no such run)
                got += await stream.receive_some(65536)
        assert b"error" in got, got[:300]
        await served(svc)

        # Never finished, growing a byte a frame: closed with 1009 past 8192 bytes.
        parts = [frame(0x1, b"[", fin=False)]
        parts += [frame(0x0, b" ", fin=False)] * 9000
        with trio.fail_after(30):
            with suppress(trio.BrokenResourceError):
                await stream.send_all(b"".join(parts))
            got = await until_closed(stream)
        assert close_code(got) == 1009, got[-200:]
        await fds_back_to(svc, base)


async def test_a_frame_announcing_a_huge_length_is_bounded_by_the_message_size(
        tmp_path: Path) -> None:
    """A frame header announcing 2^40 bytes: nothing is reserved for it; its payload trickled
    past twice SERVICE_MAX_BODY_BYTES closes the socket with 1009 and frees its fd."""
    async with serve(tmp_path, max_body=4096) as svc:
        base = await baseline(svc)
        stream = await ws_open(svc)
        head = frame(0x2, b"", length=1 << 40)
        await stream.send_all(head)
        with trio.fail_after(30):
            sent = 0
            try:
                while sent < 9000:
                    await stream.send_all(b"\x00" * 500)
                    sent += 500
                    await trio.sleep(0.05)
            except trio.BrokenResourceError:
                pass
            got = await until_closed(stream)
        assert close_code(got) == 1009, got[-200:]
        await fds_back_to(svc, base)


async def test_a_ping_flood_from_a_client_that_reads_nothing_is_dropped(tmp_path: Path) -> None:
    """A client floods pings (each one a pong to write) and reads nothing: the pongs fill the
    socket, the writes stall, and the connection is closed at the stall limit; the server
    answers others meanwhile and the fd is released."""
    async with serve(tmp_path) as svc:
        base = await baseline(svc)
        stream = await ws_open(svc)
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        ping = frame(0x9, b"p" * 125)
        sent = 0
        with trio.fail_after(40):
            try:
                while True:
                    await stream.send_all(ping * 1000)
                    sent += 1000
                    if sent % 20_000 == 0:
                        await served(svc)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            await until_closed(stream, keep=0)
        # Our send stopped: the server stopped reading once its pongs could not go out, and
        # closed the socket (sendstall, or wsping after its bound).
        await fds_back_to(svc, base)
        await served(svc)
        assert sent < 10_000_000, sent


# -- HTTP/2 (h2c, prior knowledge: served on the plain port) -------------------------------------


async def test_an_h2_client_that_grants_no_flow_control_credit_is_dropped(
        tmp_path: Path) -> None:
    """Fixed (was: DEFECT: an HTTP/2 client (h2c prior knowledge, which hypercorn serves on the
    plain port) that says SETTINGS_INITIAL_WINDOW_SIZE = 0 and asks for a large answer
    (``/openapi.json``, 100 streams at once: hypercorn's ``h2_max_concurrent_streams``), then
    keeps reading its socket but never sends a WINDOW_UPDATE, holds the connection (its fd), and
    each stream's app task parked in hypercorn's ``H2Protocol.stream_send`` waiting for credit,
    for ever: the socket never stalls, so ``service/sendstall.py``'s limit (here 2 s) never
    fires; the stream is not idle, so ``keep_alive_timeout`` (here 2 s) does not apply;
    ``read_timeout`` is unset in ``hypercorn.toml`` / ``build_config``; and
    ``service/keepalive.py`` leaves HTTP/2 "as it was". docs/operations.md promises that a
    client that reads nothing is dropped ("A client that stops reading is dropped"; sendstall's
    limit, 60 s by default). Checked here: still open 20 s (10 stall limits) later.)"""
    import h2.config
    import h2.connection
    import h2.events
    import h2.settings

    async with serve(tmp_path) as svc:
        base = await baseline(svc)
        stream = await connect(svc)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        conn.initiate_connection()
        for i in range(100):
            conn.send_headers(1 + 2 * i, [(":method", "GET"), (":path", "/openapi.json"),
                                          (":scheme", "http"), (":authority", "127.0.0.1")],
                              end_stream=True)
        await stream.send_all(conn.data_to_send())
        heads = 0
        closed = False
        with trio.move_on_after(20):
            while True:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    closed = True
                    break
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived):
                        heads += 1
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        closed = True
                out = conn.data_to_send()
                if out:
                    await stream.send_all(out)  # SETTINGS and PING acks; never WINDOW_UPDATE
                if closed:
                    break
        held = svc.fds()
        await stream.aclose()
        assert heads > 0, heads  # the answers began (their heads need no credit)
        await fds_back_to(svc, base)
        assert closed, (f"still open after 20 s with {heads} answers parked awaiting "
                        f"flow-control credit (server fds {held}, base {base})")
