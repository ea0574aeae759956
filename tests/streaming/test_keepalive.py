"""Idle keep-alive connections are closed: after ``keep_alive_timeout``, and at once on shutdown.

Without ``service.keepalive.KeepAliveFix`` hypercorn's idle timer died with quart-trio's request
nursery after the first response (see that module): such connections stayed open forever and
held every shutdown for the whole ``graceful_timeout``.
"""

from __future__ import annotations

import json
import math
from contextlib import AsyncExitStack

import h11
import trio

from service.settings import Settings

from ..servers import RunningServer, running_server

GUARD = 10  # seconds any wait may take before the test fails


async def _connect(srv: RunningServer) -> trio.SocketStream:
    """A raw connection to ``srv`` (the tests close it with ``async with``)."""
    host, port = srv.url.removeprefix("http://").rsplit(":", 1)
    return await trio.open_tcp_stream(host, int(port))


async def _exchange(
    stream: trio.SocketStream, method: str, target: str, body: bytes = b""
) -> tuple[int, bytes]:
    """One HTTP/1.1 request and its whole response over ``stream``, which stays open."""
    conn = h11.Connection(h11.CLIENT)
    headers = [("Host", "127.0.0.1"), ("Content-Type", "application/json"),
               ("Content-Length", str(len(body)))]
    await stream.send_all(conn.send(h11.Request(method=method, target=target, headers=headers)))
    await stream.send_all(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
    status, data = 0, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
            assert (b"connection", b"close") not in event.headers  # a keep-alive answer
        elif isinstance(event, h11.Data):
            data += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, data
        elif isinstance(event, h11.ConnectionClosed):
            raise AssertionError("the server closed the connection before answering")


async def test_an_idle_connection_is_closed_after_keep_alive_timeout(
    settings: Settings, autojump_clock: trio.abc.Clock
) -> None:
    # The clock jumps while the store's threads work: no lifespan deadlines under it.
    async with (running_server(settings, keep_alive_timeout=30, startup_timeout=math.inf,
                               shutdown_timeout=math.inf) as srv,
                await _connect(srv) as stream):
        for _ in range(2):  # the timer must be re-armed after every response, not only the first
            assert (await _exchange(stream, "GET", "/healthz"))[0] == 200
        idle_since = trio.current_time()
        with trio.fail_after(30 + GUARD):
            assert await stream.receive_some(100) == b""  # the server closed it
        assert trio.current_time() - idle_since >= 30


async def test_shutdown_closes_idle_keep_alive_connections_at_once(settings: Settings) -> None:
    # graceful_timeout is far above the guard: only closing idle connections at once passes.
    # The connections outlive the server (closed by the stack, whatever fails).
    with trio.fail_after(GUARD):
        async with AsyncExitStack() as connections:
            async with running_server(settings, graceful_timeout=120) as srv:
                plain = await connections.enter_async_context(await _connect(srv))
                assert (await _exchange(plain, "GET", "/healthz"))[0] == 200
                streamed = await connections.enter_async_context(await _connect(srv))
                status, body = await _exchange(
                    streamed, "POST", "/v1/chat/completions", json.dumps({
                        "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode())
                assert status == 200
                assert body.endswith(b"data: [DONE]\n\n")
            # The server is gone, and it closed both connections itself.
            assert await plain.receive_some(100) == b""
            assert await streamed.receive_some(100) == b""


async def test_a_413_reaches_a_client_that_sends_its_whole_large_body_first(
    settings: Settings,
) -> None:
    # The answer comes before the body is read. Closing the socket then would reset it under
    # a client still uploading (as most clients do before they read): the server must read
    # the rest of the body first, then answer and close cleanly.
    size = 8 * 2**20
    conn = h11.Connection(h11.CLIENT)
    head = conn.send(h11.Request(method="POST", target="/api/conversations", headers=[
        ("Host", "127.0.0.1"), ("Content-Type", "application/json"),
        ("Content-Length", str(size))]))
    with trio.fail_after(GUARD):
        async with (running_server(settings.model_copy(update={"max_body_bytes": 2048})) as srv,
                    await _connect(srv) as stream):
            await stream.send_all(head)
            for _ in range(size // 65536):
                await stream.send_all(b" " * 65536)  # BrokenResourceError: it was reset
            while (event := conn.next_event()) is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            assert isinstance(event, h11.Response)
            assert event.status_code == 413
            assert (b"connection", b"close") in event.headers
            # The body, then the server's clean close (a reset raises BrokenResourceError).
            while not isinstance(event := conn.next_event(), h11.ConnectionClosed):
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
