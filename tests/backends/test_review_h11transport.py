"""Review of ``PlainHTTPTransport`` (service/backends/h11transport.py): behaviours where it is
wrong, or worse than httpcore's pool it replaces. Every test here fails on the reviewed code;
each docstring says what is wrong. Real sockets on 127.0.0.1, helpers from test_h11transport."""

from __future__ import annotations

import h11
import httpx
import pytest
import trio
import trio.testing

from ..raw_upstream import chunk
from .test_h11transport import (
    OK,
    client_for,
    endless_chunked,
    keepalive_server,
    ok,
    transport,
    until_closed,
    url,
    wait_closed,
)

GUARD = 2  # seconds: every wait here is bounded by this


async def test_an_early_error_response_while_the_body_is_sent_is_returned() -> None:
    """A server that answers (413, Connection: close) and closes before it has read a large
    request body: httpcore ignores the write error and returns the server's answer; this
    transport raises WriteError, so the gateway reports 'unavailable' instead of the
    upstream's 413 (e.g. a proxy's client_max_body_size on a long prompt)."""
    async def reject(stream: trio.SocketStream, n: int) -> bool:
        await stream.send_all(b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\n"
                              b"Content-Length: 8\r\n\r\ntoo big!")
        return False  # closes with the body unread: a reset reaches the client's write

    body = b"x" * (32 * 1024 * 1024)  # more than the socket buffers hold
    async with keepalive_server(reject) as server, client_for(transport()) as client:
        with trio.fail_after(GUARD):
            response = await client.post(url(server), content=body)
        assert (response.status_code, response.text) == (413, "too big!")


async def test_a_response_head_larger_than_16_kib_is_accepted() -> None:
    """h11's default bound on a head not yet complete after a read (16 KiB) is kept, where
    httpcore raises it to 100 KiB: a response with a 20 KB header arriving in two reads (a
    proxy's cookies, a long link list) that httpx's own transport reads is here a
    MalformedResponse (mapped to a 'malformed response' protocol error)."""
    async def big(stream: trio.SocketStream, n: int) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 20_000)
        await trio.testing.wait_all_tasks_blocked()  # the client has read this part
        await stream.send_all(b"\r\nContent-Length: 2\r\n\r\nok")
        return True

    async with keepalive_server(big) as server, client_for(transport()) as client:
        with trio.fail_after(GUARD):
            response = await client.get(url(server))
        assert (response.status_code, response.text) == (200, "ok")


async def test_bytes_after_a_response_do_not_become_the_next_response() -> None:
    """A connection goes back to the pool with bytes already in h11's buffer (a server that
    sent more than its Content-Length, a body on a 204/HEAD answer): only the socket is checked
    for readability, so the next request, maybe another user's, gets those stale bytes as its
    response. The connection must not be reused with unread data. (httpcore has the same hole;
    it is still a response mix-up between callers.)"""
    stale = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale"
    fresh = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh"
    answered = 0

    async def extra(stream: trio.SocketStream, n: int) -> bool:
        nonlocal answered
        answered += 1
        await stream.send_all(OK + stale if answered == 1 else fresh)  # one write, one read
        return True

    t = transport()
    async with keepalive_server(extra) as server, client_for(t) as client:
        with trio.fail_after(GUARD):
            assert (await client.get(url(server))).text == "ok"
            assert (await client.get(url(server))).text == "fresh"


async def test_a_response_closed_while_another_task_reads_it_is_released_once() -> None:
    """``_Body.aclose`` (from another task: a watchdog, a shutdown) releases the connection and
    closes its socket; the task blocked in the read then gets a ReadError and its error path
    releases the same connection again. ``_open``/``_active``/``_requests`` go negative, and the
    pool then opens more than ``max_connections``."""
    endless = endless_chunked()

    t = transport(max_connections=1)
    async with keepalive_server(endless) as server, client_for(t, pool=0.2) as client:
        with trio.fail_after(GUARD):
            response = await client.send(client.build_request("GET", url(server)),
                                         stream=True)
            errors: list[BaseException] = []

            async def reader() -> None:
                try:
                    async for _ in response.aiter_raw():
                        pass
                except httpx.HTTPError as exc:
                    errors.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
                await response.aclose()
            assert (t.counts(), t.requests) == ((0, 0), 0)
            # With the slot counted once, a second concurrent stream must wait for the pool.
            async with client.stream("GET", url(server)):
                with pytest.raises(httpx.PoolTimeout):
                    async with client.stream("GET", url(server)):
                        pass


async def test_an_idle_connection_the_server_closed_is_closed_on_other_traffic() -> None:
    """An idle connection the server has closed (llama.cpp closes idle keep-alives after a few
    seconds) is only noticed when a request for the same host and port comes: traffic to other
    upstreams leaves it open (CLOSE_WAIT, an fd) indefinitely. httpcore drops closed and
    expired idle connections of every host whenever a request starts or a response closes."""
    async def once(stream: trio.SocketStream, n: int) -> bool:
        await stream.send_all(OK)
        return False  # then closes, without a Connection: close header

    t = transport()
    async with keepalive_server(once) as a, keepalive_server(ok) as b, client_for(t) as client:
        with trio.fail_after(GUARD):
            assert (await client.get(url(a))).text == "ok"
            await wait_closed(a, 1)  # its EOF is at the client's socket
            assert (await client.get(url(b))).text == "ok"
        assert t.counts() == (0, 1)  # only b's connection is left


async def test_closing_the_transport_closes_the_connections_of_open_responses() -> None:
    """``aclose`` closes only idle connections: one carrying an open response stays open (and
    an upstream LLM keeps generating into it) until that response is closed, if ever.
    httpcore's pool closes all of its connections on close."""
    endless = endless_chunked(chunk(b"x"))

    t = transport()
    async with keepalive_server(endless) as server:
        client = httpx.AsyncClient(transport=t, trust_env=False)
        response = await client.send(client.build_request("GET", url(server)), stream=True)
        try:
            await client.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert server.closed == 1  # the server saw its connection end
        finally:
            await response.aclose()


async def test_a_101_answer_to_an_upgrade_request_does_not_spin(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """After a 101 to a request offering an Upgrade, h11 returns PAUSED forever; ``_exchange``
    treats that like a 1xx and loops on ``next_event`` without a checkpoint: the whole trio
    process (every stream, every request) hangs at 100% CPU. httpcore returns the 101.
    (A guard on h11 turns the spin into an error here.)"""
    real = h11.Connection.next_event
    paused = 0

    def guarded(self: h11.Connection) -> object:
        nonlocal paused
        event = real(self)
        if event is h11.PAUSED:
            paused += 1
            if paused > 100:
                raise AssertionError("busy loop on h11.PAUSED")
        return event

    monkeypatch.setattr(h11.Connection, "next_event", guarded)

    async def switch(stream: trio.SocketStream, n: int) -> bool:
        await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                              b"Connection: Upgrade\r\n\r\n")
        return await until_closed(stream)

    async with keepalive_server(switch) as server, client_for(transport()) as client:
        with trio.fail_after(GUARD):
            async with client.stream("GET", url(server), headers={
                    "Upgrade": "websocket", "Connection": "Upgrade"}) as response:
                assert response.status_code == 101


async def test_the_response_http_version_is_the_servers() -> None:
    """``http_version`` is always reported as HTTP/1.1; httpcore reports what the server said
    (an HTTP/1.0 server's answer is not kept alive, which logs and metrics should show)."""
    async def old(stream: trio.SocketStream, n: int) -> bool:
        await stream.send_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return False

    async with keepalive_server(old) as server, client_for(transport()) as client:
        with trio.fail_after(GUARD):
            response = await client.get(url(server))
        assert response.text == "ok"
        assert response.http_version == "HTTP/1.0"


async def test_requests_waiting_for_the_pool_are_served_first_come_first_served() -> None:
    """A waiter woken for a released connection is overtaken by a request that arrives before
    it runs; it then parks again at the back of the ParkingLot, behind later waiters. Under
    load an early request can be passed over again and again until its PoolTimeout while later
    ones succeed. httpcore assigns a released connection to the oldest queued request at
    release time."""
    t = transport(max_connections=1)
    async with keepalive_server(ok) as server, client_for(t) as client:
        order: list[str] = []

        async def get(name: str) -> None:
            await client.get(url(server))
            order.append(name)

        with trio.fail_after(GUARD):
            held = await client.send(client.build_request("GET", url(server)), stream=True)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(get, "first")
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(get, "second")
                await trio.testing.wait_all_tasks_blocked()
                assert "2 queued" in repr(t)
                await held.aread()  # the connection goes back: "first" is woken ...
                await get("newcomer")  # ... and overtaken before it runs
        assert order.index("first") < order.index("second"), order


async def test_a_response_closed_between_reads_is_not_a_clean_end() -> None:
    """Closed by another task between two reads, a body ended as if complete (a silent cut):
    the reader now gets a ReadError."""
    endless = endless_chunked(chunk(b"x"))

    t = transport()
    async with keepalive_server(endless) as server, client_for(t) as client:
        with trio.fail_after(GUARD):
            response = await client.send(client.build_request("GET", url(server)),
                                         stream=True)
            chunks = response.aiter_raw()
            assert await chunks.__anext__() == b"x"
            await response.stream.aclose()  # as another task closing it would
            with pytest.raises(httpx.ReadError):
                await chunks.__anext__()
        assert t.counts() == (0, 0)


async def test_closing_the_transport_wakes_the_requests_waiting_for_it() -> None:
    """Requests waiting for room in a full pool waited out their pool timeout when the
    transport closed (and might then open a connection on it): they are told at once."""
    endless = endless_chunked()

    t = transport(max_connections=1)
    async with keepalive_server(endless) as server:
        client = httpx.AsyncClient(transport=t, trust_env=False,
                                   timeout=httpx.Timeout(5.0, pool=60.0))
        held = await client.send(client.build_request("GET", url(server)), stream=True)
        failed: list[BaseException] = []

        async def waiting() -> None:
            try:
                await client.get(url(server))
            except httpx.HTTPError as exc:
                failed.append(exc)

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiting)
                await trio.testing.wait_all_tasks_blocked()
                await t.aclose()
            await held.aclose()
        assert [type(e) for e in failed] == [httpx.ConnectError], failed
        assert t.counts() == (0, 0)
