"""What the stack alone costs: stand-in relays with none of the service in them.

The relay benchmark's added time to first token is the service's whole chain: hypercorn, Quart,
validation, the run's supervisor and store, the interceptor, httpx, the SSE parser, the encoder.
The ``floor`` scenario measures, the same way (alternating with the direct target and the service,
same load), four relays that do nothing but pass a request upstream and its reply back:

* ``stack``: hypercorn (trio worker, the benchmark's hypercorn settings) serving a bare ASGI app
  that sends the body upstream with httpx (one ``AsyncClient``, keep-alive pool) and passes the
  upstream's bytes back as they come: no framework, no validation, no parsing, no store;
* ``hyperc``: the same ASGI app under hypercorn, but upstream over plain trio sockets;
* ``httpx``: plain trio sockets in front (read the head and body, answer chunked), httpx upstream;
* ``trio``: plain trio sockets both ways (a kept-alive upstream connection, the reply copied back
  until its chunked terminator): the floor of two loopback hops in one trio process.

    python -m service.bench.floor --kind stack|hyperc|httpx|trio --port N --upstream PORT

Bench-only code: never imported by the service. The stand-ins handle the benchmark's requests and
nothing else (no errors, no limits).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import trio

from .client import Target
from .harness import Bench
from .procs import HYPERCORN_TOML, Proc, free_port, started
from .relay import RelayLevel, relay

__all__ = ["KINDS", "floor", "main"]

KINDS = ("stack", "hyperc", "httpx", "trio")
_REPO = Path(__file__).resolve().parents[2]
_END = b"\r\n0\r\n\r\n"  # the end of a chunked body
_Send = Callable[[dict[str, Any]], Awaitable[None]]
_Receive = Callable[[], Awaitable[dict[str, Any]]]


def _httpx_client(upstream: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{upstream}", timeout=httpx.Timeout(60.0), trust_env=False,
        limits=httpx.Limits(max_connections=20000, max_keepalive_connections=20000))


class _Pool:
    """Kept-alive plain connections to the upstream (LIFO)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[trio.SocketStream] = []

    async def get(self) -> trio.SocketStream:
        if self.idle:
            return self.idle.pop()
        return await trio.open_tcp_stream("127.0.0.1", self.port)

    async def relay(self, request: bytes, out: Callable[[bytes], Awaitable[None]]) -> None:
        """Send ``request`` (a whole HTTP/1.1 request) and pass every received byte to ``out``."""
        upstream = await self.get()
        await upstream.send_all(request)
        tail = b""
        while True:
            chunk = await upstream.receive_some(65536)
            if not chunk:
                await upstream.aclose()
                return
            await out(chunk)
            tail = (tail + chunk)[-len(_END):]
            if tail == _END:
                self.idle.append(upstream)
                return


def _upstream_request(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: upstream\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class AsgiRelay:
    """The ASGI stand-in: the request's body upstream, the reply's bytes back, nothing else."""

    def __init__(self, upstream: int, use_httpx: bool) -> None:
        self.upstream = upstream
        self.use_httpx = use_httpx
        self.pool = _Pool(upstream)
        self.client: httpx.AsyncClient | None = None

    async def __call__(self, scope: dict[str, Any], receive: _Receive, send: _Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: _Receive, send: _Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.client = _httpx_client(self.upstream) if self.use_httpx else None
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: dict[str, Any], receive: _Receive, send: _Send) -> None:
        if scope["path"] == "/health":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        start = {"type": "http.response.start", "status": 200,
                 "headers": [(b"content-type", b"text/event-stream")]}
        if self.client is not None:
            request = self.client.build_request("POST", scope["path"], content=body,
                                                headers={"content-type": "application/json"})
            response = await self.client.send(request, stream=True)
            try:
                await send(start)
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            finally:
                await response.aclose()
        else:
            started = False

            async def out(chunk: bytes) -> None:
                # The upstream's chunked framing is passed through inside ours: the load
                # client only counts token markers and waits for the final terminator.
                nonlocal started
                if not started:
                    chunk = chunk.partition(b"\r\n\r\n")[2]
                    await send(start)
                    started = True
                await send({"type": "http.response.body", "body": chunk, "more_body": True})

            await self.pool.relay(_upstream_request(scope["path"], body), out)
        await send({"type": "http.response.body", "body": b""})


async def _read_request(stream: trio.SocketStream) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    while len(body) < length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        body += chunk
    return head + b"\r\n\r\n" + body


async def _serve_plain(stream: trio.SocketStream, pool: _Pool,
                       client: httpx.AsyncClient | None) -> None:
    """One connection of the plain-socket front (``httpx`` and ``trio`` kinds)."""
    async with stream:
        request = await _read_request(stream)
        if request is None:
            return
        if request.startswith(b"GET /health"):
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                                  b"Connection: close\r\n\r\n{}")
            return
        path = request.split(b" ", 2)[1].decode()
        body = request.partition(b"\r\n\r\n")[2]
        if client is None:
            # The upstream's response, head and all, goes back as it is.
            await pool.relay(_upstream_request(path, body), stream.send_all)
            return
        async with client.stream("POST", path, content=body,
                                 headers={"content-type": "application/json"}) as response:
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n")
            async for chunk in response.aiter_raw():
                await stream.send_all(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        await stream.send_all(b"0\r\n\r\n")


async def _main_plain(port: int, upstream: int, use_httpx: bool) -> None:
    pool = _Pool(upstream)
    client = _httpx_client(upstream) if use_httpx else None

    async def handler(stream: trio.SocketStream) -> None:
        with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                                 httpx.HTTPError):
            await _serve_plain(stream, pool, client)

    await trio.serve_tcp(handler, port, host="127.0.0.1", backlog=4096)


def _main_hypercorn(port: int, upstream: int, use_httpx: bool, config_path: Path) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config.from_toml(str(config_path))
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None  # as the service's
    trio.run(serve, AsgiRelay(upstream, use_httpx), config)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.bench.floor", description=__doc__)
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", type=int, required=True)
    parser.add_argument("--config", type=Path, help="hypercorn settings (stack, hyperc)")
    args = parser.parse_args(argv)
    use_httpx = args.kind in ("stack", "httpx")
    if args.kind in ("stack", "hyperc"):
        if args.config is None:
            parser.error("--config is required for the hypercorn kinds")
        _main_hypercorn(args.port, args.upstream, use_httpx, args.config)
    else:
        trio.run(_main_plain, args.port, args.upstream, use_httpx)
    return 0


# ---- the scenario ------------------------------------------------------------------------------


async def _start(workdir: Path, kind: str, sim_port: int) -> Proc:
    log = workdir / f"floor-{kind}.log"
    toml = workdir / "floor-hypercorn.toml"
    toml.write_text(HYPERCORN_TOML)
    port = free_port()
    popen = subprocess.Popen(  # noqa: ASYNC220 (a child that lives for the scenario)
        [sys.executable, "-m", "service.bench.floor", "--kind", kind, "--port", str(port),
         "--upstream", str(sim_port), "--config", str(toml)],
        cwd=_REPO, env=os.environ.copy(),
        stdout=subprocess.DEVNULL, stderr=log.open("wb"),
    )
    return await started(Proc(kind, popen, port, log))


async def floor(bench: Bench, workdir: Path, levels: list[RelayLevel]) -> list[dict[str, Any]]:
    """The relay measurement of the direct target, the service's ``/v1`` and the stand-ins."""
    procs: list[Proc] = []
    try:
        for kind in KINDS:
            proc = await _start(workdir, kind, bench.sim.port)
            procs.append(proc)
            bench.servers[kind] = proc
            bench.targets[kind] = Target(kind, "127.0.0.1", proc.port, "/v1/chat/completions",
                                         bench.targets["direct"].marker)
        await bench.configure(tokens=4, interval=0.0)
        for kind in KINDS:
            for _ in range(3):
                res = await bench.stream(kind, bench.new_tag("warm"), limit=30)
                if not res.ok:
                    raise RuntimeError(f"warm-up stream to {kind} failed: {res.error}")
        return await relay(bench, levels, ("direct", "openai", *KINDS))
    finally:
        for proc in procs:
            proc.stop()
            bench.servers.pop(proc.name, None)
            bench.targets.pop(proc.name, None)


if __name__ == "__main__":
    raise SystemExit(main())
