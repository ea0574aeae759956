"""A real llama.cpp server, embedded in this process and owned by trio code.

``embedded_llama_server()`` starts llama.cpp's native C++ HTTP server (through the optional
``xllamacpp`` package) on a free loopback port, waits until ``GET /health`` answers 200, yields a
handle with the ``base_url`` and model alias, and stops the server on exit, after which the port
is closed. Tests, benchmarks and ``python -m service --demo`` use it with the tiny model from
:mod:`service.tinymodel`, so the llama.cpp backend adapter is exercised against the real wire
protocol (SSE, usage chunks, ``/slots``, 503 while loading) without an external process.

Lifecycle, and why it is shaped this way:

- Port: llama.cpp binds the port itself. A free one is found by binding port 0 and releasing it;
  another process may take it in between, so a failed start whose port is now in use is retried
  with a new port (a start that failed for another reason, e.g. a bad model file, is not).
- Start: ``xllamacpp.Server(params)`` returns only once the model is loaded (its HTTP listener is
  up from the beginning and answers 503 "Loading model" meanwhile). It runs in a worker thread and
  cannot be interrupted; the thread puts the server straight into a box this context owns, so a
  cancellation that arrives while loading still releases it.
- Ready: ``GET /health`` is polled with httpx until 200 (a 503 body is not ready), the whole start
  bounded by ``startup_timeout``.
- Stop: releasing the last reference to the ``Server`` runs its destructor, which stops the loop
  and the HTTP listener and joins their threads. That blocks, so it runs in a worker thread under
  a shielded, bounded scope: it must happen even while the caller is being cancelled.

The GIL (xllamacpp 2026.10): ``Server()`` and ``~Server`` hold it, so worker threads do not keep
the trio loop running while the model loads (~20 ms for the tiny model, ~0.3 s for 400 MB) or
while the server stops. Stopping is ~2 ms once clients have closed their streams; a stream still
open at exit makes llama.cpp wait for that stream's next SSE ping (see ``SSE_PING_INTERVAL``).
Close clients before leaving the block (the natural nesting of ``async with`` does).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import trio

from ..errors import BackendUnavailable, ConfigError

__all__ = ["EmbeddedLlamaServer", "embedded_llama_server", "ensure_tiny_model"]

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
# The calls the embedded server runs at once (its slots, each with its share of the context):
# the service queues the calls past them itself (its interceptor's limit), visibly. At most
# SLOTS, fewer when each would get under SLOT_CTX_MIN tokens (``slots_for``).
SLOTS = 4
SLOT_CTX_MIN = 2048


def slots_for(n_ctx: int) -> int:
    """The slots of an embedded server with ``n_ctx`` tokens of context: 4, fewer when each
    would hold under 2,048 tokens, 1 at least. The default 4,096 split four ways gave slots of
    1,024 tokens, under the ReAct and plan-and-execute agents' own prompts (about 1,160 tokens
    on the tiny model): every run of theirs was refused at once."""
    return max(1, min(SLOTS, n_ctx // SLOT_CTX_MIN))
INSTALL_HINT = "install the embedded extra: pip install -e '.[embedded]'"
# A start can fail because another process took the port between our probe and llama.cpp's bind.
BIND_ATTEMPTS = 3
HEALTH_POLL_INTERVAL = 0.02
# llama.cpp's stream handlers notice a stop only at their next SSE ping, and ~Server holds the
# GIL while it waits for them: with the default (30 s) a stream still open at exit froze the
# whole process for 30 s. With 1 s the worst case is ~2 s. Clients see an SSE ping after each
# second without tokens (a slow prompt), which SSE readers must skip anyway.
SSE_PING_INTERVAL = 1
# Stopping joins the server's threads; this bounds how long an exit may wait for that.
STOP_TIMEOUT = 30.0


@dataclass(frozen=True)
class EmbeddedLlamaServer:
    """A running embedded llama.cpp server (valid inside the ``async with`` block only)."""

    base_url: str  # http://127.0.0.1:PORT, no trailing /v1
    model: str  # the alias that /v1/models lists and requests must name
    port: int
    model_path: Path
    load_seconds: float  # wall time from start to /health 200, port retries included


def _import_xllamacpp() -> ModuleType:
    try:
        import xllamacpp
    except ImportError as exc:
        raise ConfigError(f"the embedded llama.cpp server needs xllamacpp: {INSTALL_HINT}") from exc
    return xllamacpp


def ensure_tiny_model(path: Path) -> Path:
    """Return ``path``, writing the tiny test model there first if no file exists.

    Plain sync code (it writes ~0.6 MB in well under a second): call it before ``trio.run``, or
    through ``trio.to_thread.run_sync`` from async code.
    """
    path = Path(path)
    if path.is_file():
        return path
    try:
        from ..tinymodel import write_tiny_model

        return write_tiny_model(path)
    except ImportError as exc:  # gguf or numpy missing
        raise ConfigError(f"writing the tiny model needs gguf: {INSTALL_HINT}") from exc


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
        return False


def _params(
    xllamacpp: ModuleType,
    model_path: Path,
    port: int,
    /,
    *,
    n_parallel: int,
    n_ctx: int,
    threads: int,
    alias: str,
    verbosity: int,
    n_predict: int = -1,
) -> Any:
    params = xllamacpp.CommonParams()
    params.model.path = str(model_path)
    params.hostnames = [HOST]
    params.port = port
    params.n_ctx = n_ctx  # split between the slots
    params.n_parallel = n_parallel
    params.n_predict = n_predict  # a cap on every answer's tokens (-1: none)
    # More than one thread starves on a 2-core machine whenever the other core is busy.
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.model_alias = {alias}
    params.sse_ping_interval = SSE_PING_INTERVAL
    params.verbosity = verbosity
    return params


def _start_server(xllamacpp: ModuleType, params: Any, box: list[Any]) -> None:
    # Runs in a worker thread. The server goes into the box before anything can be cancelled,
    # so the context that owns the box always releases it.
    box.append(xllamacpp.Server(params))


def _drop(box: list[Any]) -> None:
    # Runs in a worker thread: dropping the last reference runs ~Server, which joins its threads.
    box.clear()


async def _stop(box: list[Any]) -> None:
    # abandon_on_cancel: when the caller's stop budget runs out, stop waiting; the worker thread
    # still finishes the stop, and nothing waits for a result.
    await trio.to_thread.run_sync(_drop, box, abandon_on_cancel=True)


async def _start(xllamacpp: ModuleType, make_params: Callable[[int], Any], box: list[Any]) -> int:
    """Start the server on a free port (into ``box``) and return the port."""
    for attempt in range(1, BIND_ATTEMPTS + 1):
        port = _free_port()
        try:
            # Not abandonable: a server built after we stopped waiting would leak.
            await trio.to_thread.run_sync(_start_server, xllamacpp, make_params(port), box)
        except RuntimeError as exc:  # xllamacpp says only "Failed to init server"
            if attempt < BIND_ATTEMPTS and _port_in_use(port):
                logger.info("port %s was taken before llama.cpp bound it; retrying", port)
                continue
            raise BackendUnavailable(
                f"llama.cpp failed to start on port {port} (bad model file or parameters; "
                "llama.cpp logged the reason to stderr)",
                backend="embedded",
            ) from exc
        return port
    raise AssertionError("unreachable")


@dataclass
class _Health:
    last: str = "no answer yet"  # the last /health outcome, for the timeout message

    async def wait_ready(self, client: httpx.AsyncClient, base_url: str) -> None:
        while True:
            try:
                response = await client.get(f"{base_url}/health")
            except httpx.TransportError as exc:
                self.last = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    return
                self.last = f"{response.status_code} {response.text[:200]}"
            await trio.sleep(HEALTH_POLL_INTERVAL)


@contextlib.asynccontextmanager
async def embedded_llama_server(
    model_path: Path,
    *,
    n_parallel: int | None = None,
    n_ctx: int = 4096,
    n_predict: int = -1,
    threads: int = 1,
    alias: str | None = None,
    startup_timeout: float = 120.0,
    verbosity: int = 1,
) -> AsyncIterator[EmbeddedLlamaServer]:
    """Run llama.cpp's server in-process on a free loopback port for the duration of the block.

    ``n_ctx`` is split between the ``n_parallel`` slots (``slots_for(n_ctx)`` by default; each
    slot is capped at the model's training context). ``n_predict`` caps every answer's tokens
    (-1: no cap; a request's ``max_tokens`` may only ask for fewer). ``alias`` defaults to the
    file's stem.
    ``startup_timeout`` bounds the start only (load and readiness), which a scope around the
    whole ``async with`` could not do.
    ``verbosity`` is llama.cpp's stderr log threshold (1 errors, 2 +warnings, 3 +info; global).

    Raises :class:`ConfigError` if xllamacpp is missing or the model file does not exist, and
    :class:`BackendUnavailable` if the server fails to start or is not healthy in time.
    """
    xllamacpp = _import_xllamacpp()
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ConfigError(f"SERVICE_GGUF: model file not found: {model_path}",
                          path=str(model_path))
    alias = alias or model_path.stem
    make_params = functools.partial(
        _params,
        xllamacpp,
        model_path,
        n_parallel=slots_for(n_ctx) if n_parallel is None else n_parallel,
        n_ctx=n_ctx,
        n_predict=n_predict,
        threads=threads,
        alias=alias,
        verbosity=verbosity,
    )
    box: list[Any] = []  # holds the xllamacpp.Server while it runs; emptied to stop it
    port: int | None = None
    health = _Health()
    started = time.perf_counter()
    try:
        with trio.move_on_after(startup_timeout) as startup:
            port = await _start(xllamacpp, make_params, box)
            # Loopback, never through an HTTP(S)_PROXY of the environment (it cannot reach
            # this host's 127.0.0.1: the start waited its whole timeout), as the service's
            # own clients (clients.py).
            async with httpx.AsyncClient(timeout=httpx.Timeout(5.0), trust_env=False) as client:
                await health.wait_ready(client, f"http://{HOST}:{port}")
        if startup.cancelled_caught or port is None:
            raise BackendUnavailable(
                f"embedded llama.cpp server for {model_path} not healthy within "
                f"{startup_timeout}s (last /health: {health.last})",
                backend="embedded",
            )
        server = EmbeddedLlamaServer(
            base_url=f"http://{HOST}:{port}",
            model=alias,
            port=port,
            model_path=model_path,
            load_seconds=time.perf_counter() - started,
        )
        logger.info("embedded llama.cpp server ready: %s", server)
        yield server
    finally:
        if box:
            stopping = time.perf_counter()
            # Shielded: the server must stop even when we got here because of a cancellation.
            with trio.move_on_after(STOP_TIMEOUT, shield=True) as stop:
                await _stop(box)
            if stop.cancelled_caught:
                logger.warning("llama.cpp server on port %s: stop exceeded %ss", port, STOP_TIMEOUT)
            else:
                elapsed = time.perf_counter() - stopping
                logger.debug("llama.cpp server on port %s stopped in %.3fs", port, elapsed)


def _main() -> None:  # pragma: no cover - manual smoke run: python -m service.backends.embedded
    path = ensure_tiny_model(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny.gguf"))

    async def run() -> None:
        async with embedded_llama_server(path) as server:
            print(server, flush=True)
            await trio.sleep_forever()

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(run)


if __name__ == "__main__":
    _main()
