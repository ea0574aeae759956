"""Second review of ``PlainHTTPTransport`` (service/backends/h11transport.py), after d162707:
the waiter queue with direct hand-off, and ``aclose``. Every test here fails on the reviewed
code; each docstring says what is wrong. Real sockets on 127.0.0.1, no sleeps: the helpers of
test_h11transport and ``wait_all_tasks_blocked``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import trio
import trio.testing

from service.backends.h11transport import PlainHTTPTransport

from .test_h11transport import (
    OK,
    Server,
    endless_chunked,
    keepalive_server,
    ok,
    transport,
    url,
)

GUARD = 1.5  # seconds: every wait here is bounded by this


async def get_into(client: httpx.AsyncClient, server: Server, got: list[object]) -> None:
    """One GET: its text, or its error's class, appended to ``got``."""
    try:
        got.append((await client.get(url(server))).text)
    except httpx.HTTPError as exc:
        got.append(type(exc))


async def behind_a_held_connection(
        client: httpx.AsyncClient, t: PlainHTTPTransport, server: Server, got: list[object],
        then: Callable[[httpx.Response], Awaitable[None]]) -> None:
    """The pool's one connection held by a streamed response, a GET queued behind it (its
    outcome into ``got``), then ``then(held)``; all within GUARD."""
    with trio.fail_after(GUARD):
        held = await client.send(client.build_request("GET", url(server)), stream=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(get_into, client, server, got)
            await trio.testing.wait_all_tasks_blocked()
            assert "1 queued" in repr(t)
            await then(held)


async def test_a_connection_handed_to_a_waiter_with_unread_bytes_gives_it_no_stale_answer(
        ) -> None:
    """``_release`` hands a released connection straight to the oldest waiter without the
    check an idle one gets in ``_take_idle`` (``reusable``: nothing readable on the socket).
    Bytes a server sent past its response, still in the socket (not yet in h11's buffer, so
    the trailing-data check misses them), become the waiter's answer: another caller's request
    gets a response that is not its own, and its real answer is left on the wire."""
    stale = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale"
    fresh = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh"
    go = trio.Event()
    answered = 0

    async def answer(stream: trio.SocketStream, n: int) -> bool:
        nonlocal answered
        answered += 1
        if answered == 1:
            await stream.send_all(OK)
            await go.wait()
            await stream.send_all(stale)  # past the response: no one's answer
            return True
        await stream.send_all(fresh)
        return True

    t = transport(max_connections=1)
    async with keepalive_server(answer) as server, httpx.AsyncClient(
            transport=t, trust_env=False, timeout=httpx.Timeout(GUARD)) as client:
        texts: list[object] = []

        async def then(held: httpx.Response) -> None:
            go.set()
            await trio.testing.wait_all_tasks_blocked()  # the bytes are at the client
            await held.aread()  # its end: the connection goes to the waiter

        await behind_a_held_connection(client, t, server, texts, then)
        assert texts == ["fresh"]


async def test_a_connection_the_server_closed_is_not_handed_to_a_waiter() -> None:
    """Same hand-off, the common case: the upstream closed the connection (its keep-alive
    timeout, while a slow consumer was still reading the buffered end of a stream) and its EOF
    is in the socket. An idle connection like that is dropped and a new one opened; handed to
    a waiter it is used, and the waiter's request fails with 'Server disconnected without
    sending a response' (a 503 for a healthy upstream, under load, when waiters exist)."""
    answered = 0
    go = trio.Event()

    async def answer(stream: trio.SocketStream, n: int) -> bool:
        nonlocal answered
        answered += 1
        await stream.send_all(OK)
        if answered == 1:
            await go.wait()
            return False  # then closes, without a Connection: close header
        return True

    t = transport(max_connections=1)
    async with keepalive_server(answer) as server, httpx.AsyncClient(
            transport=t, trust_env=False, timeout=httpx.Timeout(GUARD)) as client:
        got: list[object] = []

        async def then(held: httpx.Response) -> None:
            go.set()
            await trio.testing.wait_all_tasks_blocked()  # its EOF is at the client
            assert server.closed == 1
            await held.aread()  # its end: the connection goes to the waiter

        await behind_a_held_connection(client, t, server, got, then)
        assert got == ["ok"], got


async def test_closing_the_transport_stops_a_waiter_already_handed_a_connection() -> None:
    """A waiter handed a released connection, not yet run, is no longer in ``_waiters`` nor
    its connection in ``_in_use`` or the idle lists: ``aclose`` neither closes that connection
    nor tells the waiter. The request still waiting for the pool when the transport closed is
    then sent on it, after the close (an LLM generation started on a closed client), and the
    connection stays open past ``aclose``. Waiters still queued get a ConnectError; this one
    must too, and the upstream must not see its request."""
    t = transport(max_connections=1)
    async with keepalive_server(ok) as server:
        client = httpx.AsyncClient(transport=t, trust_env=False,
                                   timeout=httpx.Timeout(GUARD))
        outcome: list[object] = []

        async def then(held: httpx.Response) -> None:
            await held.aread()  # handed to the waiter, which has not run yet
            await client.aclose()

        await behind_a_held_connection(client, t, server, outcome, then)
        assert outcome == [httpx.ConnectError], outcome
        assert len(server.requests) == 1, server.requests


async def test_a_request_reaching_the_pool_after_close_is_told_at_once() -> None:
    """``handle_async_request`` checks ``_closed`` before reading the request body, ``_acquire``
    never: a request whose body was still being read when the transport closed (a streamed
    body) finds a pool still counting the closed connections of open responses, queues, and
    is never woken (``aclose`` woke only the waiters queued at the time; a release after the
    close frees no place to waiters). It waits out its whole pool timeout (unbounded with
    pool=None) and then gets a PoolTimeout instead of the ConnectError of a closed transport."""
    endless = endless_chunked()

    t = transport(max_connections=1)
    async with keepalive_server(endless) as server:
        client = httpx.AsyncClient(transport=t, trust_env=False,
                                   timeout=httpx.Timeout(GUARD, pool=60.0))
        body_ready = trio.Event()

        async def body() -> AsyncIterator[bytes]:
            await body_ready.wait()
            yield b"{}"

        failed: list[BaseException] = []

        async def posting() -> None:
            try:
                await client.post(url(server), content=body())
            except httpx.HTTPError as exc:
                failed.append(exc)

        with trio.fail_after(GUARD):
            held = await client.send(client.build_request("GET", url(server)), stream=True)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(posting)
                await trio.testing.wait_all_tasks_blocked()  # reading its body
                await client.aclose()
                body_ready.set()
                await trio.testing.wait_all_tasks_blocked()
                await held.aclose()  # the closed connection's place is freed, too
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()  # still waiting: give up on it
        assert [type(e) for e in failed] == [httpx.ConnectError], failed
