"""``PlainHTTPTransport``: the lean HTTP/1.1 transport below the adapters' httpx client, against a
raw keep-alive server on loopback (every byte the server sends is the test's). What must hold:
connections reused only in a known state, limits kept, httpx's own errors, nothing leaked."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import pytest
import trio
import trio.testing

from service.backends.h11transport import MalformedResponse, PlainHTTPTransport
from service.backends.http import Budgets, make_client
from service.backends.openai_compat import OpenAICompatBackend
from service.errors import BackendProtocolError, BackendUnavailable, UpstreamBroken

from ..backend_helpers import req
from ..raw_upstream import FINISH, SSE_HEAD, chunk, delta

GUARD = 10  # seconds: no step here may take longer

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

# What the server does with request n (from 0) of a connection: write bytes, then go on
# (True) or close the connection (False).
Answer = Callable[[trio.SocketStream, int], Awaitable[bool]]


@dataclass
class Server:
    port: int = 0
    connections: int = 0  # accepted
    closed: int = 0  # ended, by either side
    requests: list[bytes] = field(default_factory=list)  # request heads, in order
    gone: trio.Event = field(default_factory=trio.Event)  # set whenever a connection ends


@asynccontextmanager
async def keepalive_server(answer: Answer) -> AsyncIterator[Server]:
    """An HTTP/1.1 server that reads request after request on each connection (no bodies)."""
    server = Server()

    async def handle(stream: trio.SocketStream) -> None:
        server.connections += 1
        buffer = b""
        try:
            for n in range(1000):
                while b"\r\n\r\n" not in buffer:
                    got = await stream.receive_some(65536)
                    if not got:
                        return
                    buffer += got
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                server.requests.append(head)
                if not await answer(stream, n):
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            server.closed += 1
            server.gone.set()
            server.gone = trio.Event()
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        server.port = listeners[0].socket.getsockname()[1]
        await nursery.start(trio.serve_listeners, handle, listeners)
        yield server
        nursery.cancel_scope.cancel()


def url(server: Server, path: str = "/") -> str:
    return f"http://127.0.0.1:{server.port}{path}"


async def until_closed(stream: trio.SocketStream) -> bool:
    """Send nothing more; return (False: the connection ends) once the client closes."""
    while await stream.receive_some(65536):
        pass
    return False


def endless_chunked(first: bytes = b"") -> Answer:
    """An answer that sends a chunked 200 head and ``first``, then nothing more until the
    client closes (a stream that never ends)."""
    async def answer(stream: trio.SocketStream, n: int) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + first)
        return await until_closed(stream)
    return answer


async def ok(stream: trio.SocketStream, n: int) -> bool:
    await stream.send_all(OK)
    return True


def transport(max_connections: int = 10, max_idle: int | None = None,
              expiry: float = 30.0, sweep_every: float = 0.0) -> PlainHTTPTransport:
    """A transport whose https requests go to an in-memory one; by default every request
    looks over the idle connections of every host (in service: once a second at most)."""
    limits = httpx.Limits(max_connections=max_connections,
                          max_keepalive_connections=max_idle if max_idle is not None
                          else max_connections, keepalive_expiry=expiry)
    return PlainHTTPTransport(limits=limits, sweep_every=sweep_every, tls=httpx.MockTransport(
        lambda request: httpx.Response(200, text="via tls")))


@asynccontextmanager
async def client_for(t: PlainHTTPTransport, pool: float = 5.0
                     ) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=t, trust_env=False,
                                 timeout=httpx.Timeout(5.0, pool=pool)) as client:
        yield client


async def stream_into(backend: OpenAICompatBackend, texts: list[str]) -> None:
    """One streamed chat call; each chunk's text appended to ``texts`` as it comes."""
    with trio.fail_after(GUARD):
        async with backend.stream(req()) as chunks:
            async for c in chunks:
                texts.append(c.text)


async def wait_closed(server: Server, count: int) -> None:
    with trio.fail_after(GUARD):
        while server.closed < count:
            await server.gone.wait()


# -- keep-alive ---------------------------------------------------------------------------------


async def test_complete_responses_reuse_one_connection() -> None:
    t = transport()
    async with keepalive_server(ok) as server, client_for(t) as client:
        for _ in range(3):
            response = await client.get(f"http://127.0.0.1:{server.port}/x")
            assert (response.status_code, response.text) == (200, "ok")
        assert server.connections == 1
        assert len(server.requests) == 3
        assert "Requests: 0 active, 0 queued | Connections: 0 active, 1 idle" in repr(t)


async def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    async def once(stream: trio.SocketStream, n: int) -> bool:
        await stream.send_all(OK)
        return False  # then closes, without saying so in a header

    t = transport()
    async with keepalive_server(once) as server, client_for(t) as client:
        for count in (1, 2):
            assert (await client.get(f"http://127.0.0.1:{server.port}/")).text == "ok"
            await wait_closed(server, count)  # its EOF is there before the next request
        assert server.connections == 2
        # The second request went on a fresh connection: no "disconnected" error on reuse.


async def test_connection_close_and_expiry_are_honoured() -> None:
    async def closing(stream: trio.SocketStream, n: int) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
                              b"Content-Length: 2\r\n\r\nok")
        return True  # the server would go on; the client must not

    t = transport()
    async with keepalive_server(closing) as server, client_for(t) as client:
        for _ in range(2):
            assert (await client.get(f"http://127.0.0.1:{server.port}/")).text == "ok"
        assert server.connections == 2
        assert t.counts() == (0, 0)

    t = transport(expiry=0.0)  # idle for no time at all is too long
    async with keepalive_server(ok) as server, client_for(t) as client:
        for _ in range(2):
            assert (await client.get(f"http://127.0.0.1:{server.port}/")).text == "ok"
        assert server.connections == 2


async def test_informational_responses_are_skipped() -> None:
    async def early(stream: trio.SocketStream, n: int) -> bool:
        await stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
        return True

    async with keepalive_server(early) as server, client_for(transport()) as client:
        response = await client.get(f"http://127.0.0.1:{server.port}/")
        assert (response.status_code, response.text) == (200, "ok")
        assert response.reason_phrase == "OK"
        assert response.http_version == "HTTP/1.1"


# -- closing before the end, failures, cancellation -------------------------------------------


async def test_a_response_closed_before_its_end_closes_its_connection() -> None:
    endless = endless_chunked(chunk(b"first"))

    t = transport()
    async with keepalive_server(endless) as server, client_for(t) as client:
        async with client.stream("GET", f"http://127.0.0.1:{server.port}/") as response:
            async for data in response.aiter_raw():
                assert data == b"first"
                break
        await wait_closed(server, 1)  # the server saw the connection end
        assert t.counts() == (0, 0)
        assert t.requests == 0


async def test_server_gone_before_a_response_or_mid_body_is_a_protocol_error() -> None:
    async def silent_close(stream: trio.SocketStream, n: int) -> bool:
        return False

    t = transport()
    async with keepalive_server(silent_close) as server, client_for(t) as client:
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            await client.get(f"http://127.0.0.1:{server.port}/")
        assert t.counts() == (0, 0)

    async def cut(stream: trio.SocketStream, n: int) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        return False

    t = transport()
    async with keepalive_server(cut) as server, client_for(t) as client:
        with pytest.raises(httpx.RemoteProtocolError, match="complete message body") as info:
            await client.get(f"http://127.0.0.1:{server.port}/")
        assert not isinstance(info.value, MalformedResponse)  # lost, not malformed
        assert t.counts() == (0, 0)
        assert t.requests == 0


async def test_malformed_head_is_a_protocol_error() -> None:
    async def garbage(stream: trio.SocketStream, n: int) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxyz")
        return True

    t = transport()
    async with keepalive_server(garbage) as server, client_for(t) as client:
        with pytest.raises(MalformedResponse, match="Transfer-Encoding"):
            await client.get(f"http://127.0.0.1:{server.port}/")
        await wait_closed(server, 1)
        assert t.counts() == (0, 0)


@pytest.mark.parametrize("where", ["head", "body"])
async def test_malformed_answers_through_an_adapter_are_protocol_errors(where: str) -> None:
    """Not "connection lost" (503, or 502 upstream_broken): the server answered wrongly."""
    async def answer(stream: trio.SocketStream, n: int) -> bool:
        if where == "head":
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                  b"Transfer-Encoding: gzip\r\n\r\nxyz")
        else:
            await stream.send_all(SSE_HEAD + chunk(delta(content="hi")) + b"zz\r\nnot hex")
        return await until_closed(stream)

    budgets = Budgets(connect=5, first_chunk=5, gap=5, call=30)
    seen: list[str] = []
    async with keepalive_server(answer) as server, make_client(budgets) as client:
        backend = OpenAICompatBackend("up", f"http://127.0.0.1:{server.port}", client, budgets)
        with pytest.raises(BackendProtocolError, match="malformed response"):
            await stream_into(backend, seen)
        await wait_closed(server, 1)
    assert "".join(seen) == ("hi" if where == "body" else "")


async def test_refused_connection_is_a_connect_error_and_frees_its_slot() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    t = transport(max_connections=1)
    async with client_for(t) as client:
        for _ in range(2):  # the second would wait for the pool if the first kept its slot
            with pytest.raises(httpx.ConnectError):
                await client.get(f"http://127.0.0.1:{port}/")
        assert t.counts() == (0, 0)


async def test_cancelled_while_waiting_for_the_head_closes_the_connection() -> None:
    async def never(stream: trio.SocketStream, n: int) -> bool:
        return await until_closed(stream)

    t = transport(max_connections=1)
    async with keepalive_server(never) as server, client_for(t) as client:
        with trio.move_on_after(0.2):
            await client.get(f"http://127.0.0.1:{server.port}/")
        await wait_closed(server, 1)
        assert t.counts() == (0, 0)
        assert t.requests == 0
        async with keepalive_server(ok) as other:  # its slot is free again
            assert (await client.get(f"http://127.0.0.1:{other.port}/")).text == "ok"


# -- limits -------------------------------------------------------------------------------------


async def test_a_full_pool_waits_then_times_out() -> None:
    async def held(stream: trio.SocketStream, n: int) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                              + chunk(b"x"))
        await trio.sleep_forever()
        return True  # pragma: no cover

    t = transport(max_connections=1)
    async with keepalive_server(held) as server, client_for(t, pool=0.2) as client:
        async with client.stream("GET", f"http://127.0.0.1:{server.port}/"):
            with pytest.raises(httpx.PoolTimeout):
                await client.get(f"http://127.0.0.1:{server.port}/")
            assert "Requests: 1 active, 0 queued" in repr(t)
        # Closed: the slot is back, and a waiting request gets it.
        async with keepalive_server(ok) as other:
            assert (await client.get(f"http://127.0.0.1:{other.port}/")).text == "ok"


async def test_a_waiting_request_gets_the_connection_given_back() -> None:
    release = trio.Event()

    first_in = trio.Event()

    async def slow_first(stream: trio.SocketStream, n: int) -> bool:
        if n == 0:
            first_in.set()
            await release.wait()
        await stream.send_all(OK)
        return True

    t = transport(max_connections=1)
    async with keepalive_server(slow_first) as server, client_for(t) as client:
        texts: list[str] = []

        async def get() -> None:
            texts.append((await client.get(f"http://127.0.0.1:{server.port}/")).text)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(get)
            with trio.fail_after(GUARD):
                await first_in.wait()
            nursery.start_soon(get)
            await trio.testing.wait_all_tasks_blocked()
            assert "1 queued" in repr(t)
            release.set()
        assert texts == ["ok", "ok"]
        assert server.connections == 1  # the second took the first's connection


async def test_idle_connections_are_bounded_and_give_way_to_another_host() -> None:
    t = transport(max_connections=1)
    async with keepalive_server(ok) as a, keepalive_server(ok) as b, client_for(t) as client:
        assert (await client.get(f"http://127.0.0.1:{a.port}/")).text == "ok"
        assert t.counts() == (0, 1)
        # The pool is full of a's idle connection: b's request closes it rather than wait.
        assert (await client.get(f"http://127.0.0.1:{b.port}/")).text == "ok"
        await wait_closed(a, 1)
        assert t.counts() == (0, 1)

    t = transport(max_connections=4, max_idle=1)
    async with keepalive_server(ok) as server, client_for(t) as client:
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(client.get, f"http://127.0.0.1:{server.port}/")
        assert t.counts()[1] <= 1


async def test_https_goes_to_the_tls_transport_and_close_closes_idle_ones() -> None:
    t = transport()
    async with keepalive_server(ok) as server:
        async with client_for(t) as client:
            assert (await client.get("https://example.invalid/")).text == "via tls"
            assert (await client.get(f"http://127.0.0.1:{server.port}/")).text == "ok"
            assert t.counts() == (0, 1)
        await wait_closed(server, 1)  # the client's close closed its idle connection
        assert t.counts() == (0, 0)


# -- through an adapter ---------------------------------------------------------------------------


async def test_streams_through_an_adapter_reuse_the_connection_and_map_errors() -> None:
    async def answer(stream: trio.SocketStream, n: int) -> bool:
        if n < 2:
            await stream.send_all(SSE_HEAD + chunk(delta(content="hi")) + chunk(FINISH)
                                  + b"0\r\n\r\n")
            return True
        await stream.send_all(SSE_HEAD + chunk(delta(content="cut")))
        return False  # gone mid-answer

    budgets = Budgets(connect=5, first_chunk=5, gap=5, call=30)
    async with keepalive_server(answer) as server:
        client = make_client(budgets)
        backend = OpenAICompatBackend("up", f"http://127.0.0.1:{server.port}", client, budgets)
        async with client:
            for _ in range(2):
                async with backend.stream(req()) as chunks:
                    assert "".join([c.text async for c in chunks]) == "hi"
            assert server.connections == 1
            with pytest.raises(UpstreamBroken, match="connection lost mid-answer"):
                await stream_into(backend, [])
            await wait_closed(server, 1)
            port = server.port
    async with make_client(budgets) as client:
        backend = OpenAICompatBackend("up", f"http://127.0.0.1:{port}", client, budgets)
        with pytest.raises(BackendUnavailable, match="cannot connect"):  # the server is gone
            await stream_into(backend, [])
