"""Serve the app with hypercorn's trio worker, programmatically, with graceful signals.

``python -m service`` reads ``hypercorn.toml`` (``--config`` to pick another, ``--bind`` to
override its bind), serves until SIGTERM or SIGINT, then shuts down gracefully: listeners close,
requests in flight get ``graceful_timeout`` seconds, the app's lifespan closes the store, and the
process exits 0 (1 if the store refused some runs' final state to the end).
"""

from __future__ import annotations

import argparse
import errno
import gc
import logging
import math
import os
import signal
import ssl
import sys
import tomllib
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from ssl import VerifyMode

import trio
from hypercorn.config import Config, Sockets
from hypercorn.utils import LifespanFailureError, wrap_app

from . import __version__, sendstall
from .drainfirst import hypercorn_worker_serve
from .errors import ConfigError, ServiceError, ShuttingDown, is_interrupt
from .lifespan import begin_shutdown
from .logs import configure_logging, get_logger
from .services import Services
from .settings import Settings, load_settings, unknown_variables

__all__ = ["build_config", "main", "run_server"]

log = get_logger("service.server")

# Automatic collections are a backstop only (a burst of allocations between two ticks).
_GC_GEN0, _GC_GEN1, _GC_GEN2 = 50_000, 50, 100_000
_GC_YOUNG_EVERY = 0.05  # seconds between collections of the two young generations
_GC_IDLE_BELOW = 2_000  # fewer new young objects than this at a tick: nothing to collect yet...
_GC_IDLE_EVERY = 1.0  # ...and the ticks space out, doubling, up to this many seconds
_GC_FULL_GROWTH = 2.0  # a full collection once the heap has doubled (counted at least every
_GC_GROWTH_EVERY = 10.0  # this many seconds, as the count walks the heap: 1-13 ms, measured;
_GC_RSS_GROWTH = 1.25  # sooner once the resident memory grew this much since the last count)...
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_GC_FULL_AT_LEAST = 600.0  # ...or after this many seconds without one


# Keys of hypercorn's whose default is None, and what they hold when set.
_OPTIONAL_NUMBERS: dict[str, type] = {"websocket_ping_interval": float, "read_timeout": float,
                                      "max_requests": int, "umask": int, "user": int,
                                      "group": int}


_INT_MAX = 2**31 - 1  # what listen(2) (backlog) and hypercorn's h2 settings take
_MAX_WORKERS = 1024  # processes on one host: past it, a typo (each one spawned in turn)


def _check_types(config_path: Path) -> None:
    """Each key of the file that hypercorn knows holds a value of its default's type (a number
    for a number, a flag for a flag): hypercorn checks none, and ``workers = "2"`` crashed the
    start with a traceback (``graceful_timeout = "5"``: the first SIGTERM;
    ``keep_alive_timeout = -5.0`` and ``websocket_ping_interval = "20"``: every connection)."""
    with config_path.open("rb") as f:
        data = tomllib.load(f)
    defaults = Config()
    for key, value in data.items():
        default = getattr(defaults, key, None)
        kind = _OPTIONAL_NUMBERS.get(key) or type(default)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        most = (_MAX_WORKERS if key == "workers"
                else _INT_MAX if key == "backlog" or key.startswith("h2_") else None)
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:  # a count (workers, backlog): a whole number a C int holds
            ok = number and isinstance(value, int) and value >= 0 and (
                most is None or value <= most)
        elif kind is float:  # seconds: a finite number (TOML has nan and inf), not negative
            ok = number and math.isfinite(value) and value >= 0
        elif key in ("bind", "insecure_bind", "quic_bind"):
            ok = isinstance(value, str) or (
                isinstance(value, list) and all(isinstance(b, str) for b in value))
        elif kind is list:
            # Not a lone string: hypercorn reads server_names with ``in``, and a string's
            # ``in`` is a substring test (its Host check let "ample.com" in for "example.com").
            ok = isinstance(value, list) and all(isinstance(b, str) for b in value)
        elif kind is str:
            ok = isinstance(value, str)
        else:
            continue
        if not ok:
            what = ("true or false" if kind is bool
                    else "HOST:PORT strings" if key.endswith("bind")
                    else f"a whole number from 0 to {most} (no quotes)" if most is not None
                    else "a whole number of at least 0 (no quotes)" if kind is int
                    else "a number of seconds of at least 0 (no quotes)" if kind is float
                    else "a list of strings ([\"...\"])" if kind is list
                    else "a string")
            raise ConfigError(f"--config {config_path}: {key} = {value!r}: {what} expected",
                              variable="--config")


def build_config(
    config_path: Path | None, bind: Sequence[str] | None, *, max_body_bytes: int | None = None,
    keepalive: float | None = None, required: bool = False,
) -> Config:
    """hypercorn's config from ``config_path`` (its defaults, and ours, if there is no such
    file, unless ``required``: a ``--config`` named is read, or the start stops)."""
    if config_path is not None and required and not config_path.is_file():
        raise ConfigError(f"--config {config_path}: no such file", variable="--config")
    if config_path is not None and config_path.exists():
        try:
            _check_types(config_path)
            config = Config.from_toml(str(config_path))
            if isinstance(config.verify_mode, str):  # as hypercorn's CLI takes it: CERT_...
                config.verify_mode = VerifyMode[config.verify_mode]
        except KeyError as exc:
            names = ", ".join(m.name for m in VerifyMode)
            raise ConfigError(f"--config {config_path}: verify_mode = {exc}: one of {names}",
                              variable="--config") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, TypeError,
                ValueError) as exc:
            raise ConfigError(f"--config {config_path}: not a hypercorn TOML file: {exc}",
                              variable="--config") from None
    else:
        config = Config()
        config.bind = ["127.0.0.1:8000"]
        config.graceful_timeout = 10
    if bind:
        config.bind = list(bind)
    _check_bind_and_tls(config, config_path, from_args=bool(bind))
    # The embedded backend loads its model during start-up and allows it 120 s; hypercorn's
    # own default (60 s) cut a slow load short with a traceback.
    config.startup_timeout = max(config.startup_timeout, 150)
    websocket_limits(config, max_body_bytes=max_body_bytes, keepalive=keepalive)
    # Our own after_request handler logs every request with its request id.
    config.accesslog = None
    # Hypercorn's own messages go through our structured handler (see service.logs).
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


def _check_bind_and_tls(config: Config, config_path: Path | None, *, from_args: bool) -> None:
    """What hypercorn would take silently or fail on only once the app has started: no
    address, an empty one (hypercorn's "" is 0.0.0.0:8000, every interface), a certificate
    without its key (served as plain HTTP), a certificate or key that cannot be loaded (a
    traceback from each worker)."""
    where = "--bind" if from_args else f"--config {config_path}"
    if not config.bind:
        raise ConfigError(f"{where}: bind is empty: at least one HOST:PORT to listen on",
                          variable=where.split()[0])
    if any(not b.strip() for b in config.bind):
        raise ConfigError(f"{where}: an empty address (HOST:PORT expected)",
                          variable=where.split()[0])
    certfile, keyfile = config.certfile, config.keyfile
    if bool(certfile) != bool(keyfile):
        given, missing = ("certfile", "keyfile") if certfile else ("keyfile", "certfile")
        raise ConfigError(f"--config {config_path}: {given} is set without {missing}: TLS "
                          "needs both (without them it would serve plain HTTP)",
                          variable="--config")
    if certfile:
        try:
            config.create_ssl_context()
        except (OSError, ssl.SSLError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(
                f"--config {config_path}: cannot load certfile {certfile} with keyfile "
                f"{keyfile}: {why}", variable="--config") from None


def websocket_limits(config: Config, *, max_body_bytes: int | None,
                     keepalive: float | None) -> None:
    """The settings' WebSocket bounds on hypercorn's config: here for ``python -m service``,
    and by ``service.drainfirst`` for hypercorn's own CLI and an embedding's serve (which
    served without them: no ping, and hypercorn's fixed 16 MiB bound)."""
    if max_body_bytes is not None:
        # The app answers a WebSocket message over SERVICE_MAX_BODY_BYTES with an error and
        # keeps the socket; hypercorn buffers each message whole before the app sees it, so it
        # closes the socket (1009) on one over twice that: a bound that follows the setting,
        # not its own fixed 16 MiB.
        config.websocket_max_message_size = 2 * max_body_bytes
    if keepalive is not None and config.websocket_ping_interval is None:
        # A WebSocket gets a ping as often as an SSE stream gets its keep-alive comment
        # (SERVICE_SSE_KEEPALIVE): a browser cannot send one, and a proxy's idle timeout
        # (nginx: 60 s) would otherwise cut the socket, and its run, while a model thinks.
        config.websocket_ping_interval = keepalive


async def wait_for_signal(svc: Services, stop: trio.Event) -> None:
    """Shut down gracefully on the first SIGTERM or SIGINT. The receiver stays open until the
    server is done: a second signal is logged and ignored (the drain is bounded), where closing
    the receiver would let trio re-deliver it to the default handler, killing the process in
    the middle of its graceful close (exit -15, streams cut without their end)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if stop.is_set():
                log.warning("received %s again: already shutting down", name)
                continue
            log.info("received %s: shutting down gracefully", name)
            # Drain runs while connections are still open, so every stream gets its end;
            # only then let hypercorn close listeners and connections.
            await begin_shutdown(svc)
            stop.set()


class SupervisorFailed(ServiceError):
    """The run supervisor failed while the server served: it shut down (exit 1)."""

    type = "supervisor_stopped"


async def stop_if_broken(svc: Services, stop: trio.Event) -> None:
    """Shut down if the run supervisor fails: the process can run nothing more, and its exit
    (1: ``SupervisorFailed``) has what runs it start another (``--workers``' parent, systemd)."""
    await svc.broken.wait()
    if not stop.is_set():
        log.error("the run supervisor stopped: shutting down (exit 1)")
        await begin_shutdown(svc)
        stop.set()


async def run_server(  # noqa: ASYNC128 (task_status is handed to hypercorn's serve)
    settings: Settings,
    config: Config,
    *,
    sockets: Sockets | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Serve until SIGTERM/SIGINT. ``task_status.started`` reports the bound URLs. Returns
    how many runs ended with their final state or events not stored (the store refused them
    to the end): 0 on a clean shutdown. ``sockets``: listening sockets made by a parent
    process (``--workers``), else bound from ``config``."""
    from .factory import create_app

    app = create_app(settings)
    svc: Services = app.extensions["service"]
    stop = trio.Event()
    quiet = RunningOnlyIfStarted(svc)
    hypercorn_log = logging.getLogger("hypercorn.error")
    hypercorn_log.addFilter(quiet)

    async def drained() -> None:
        await stop.wait()
        sendstall.closing(config)  # no write waits past the graceful timeout from here

    sendstall.serving(config)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_signal, svc, stop)
            nursery.start_soon(stop_if_broken, svc, stop)
            nursery.start_soon(_pace_gc)
            await hypercorn_worker_serve(
                wrap_app(app, config.wsgi_max_body_size, None), config, sockets=sockets,
                shutdown_trigger=drained,
                task_status=_StartedIfUp(svc, task_status),  # type: ignore[arg-type]
            )
            nursery.cancel_scope.cancel()
    finally:
        hypercorn_log.removeFilter(quiet)
    if svc.broken.is_set() and svc.supervisor is not None and svc.supervisor.failure:
        raise SupervisorFailed(svc.supervisor.failure)
    return svc.supervisor.unstored if svc.supervisor is not None else 0


class _StartedIfUp:
    """Hypercorn reports the server started even when the app's start-up failed (the failure
    surfaces just after): passed on only if it did start, so a failed start fails the
    caller's ``nursery.start`` with its error instead of looking started."""

    def __init__(self, svc: Services, task_status: trio.TaskStatus[list[str]]) -> None:
        self.svc, self.task_status = svc, task_status

    def started(self, value: list[str] | None = None) -> None:
        if self.svc.supervisor is not None:
            self.task_status.started(value)  # type: ignore[arg-type]


class RunningOnlyIfStarted(logging.Filter):
    """Hypercorn binds and logs "Running on http://..." even when the app's start-up failed
    (its lifespan marks start-up done either way, and the failure surfaces just after): a
    failed start then announced an address that never served before its one-line error. The
    supervisor is the last thing a successful start-up sets."""

    def __init__(self, svc: Services) -> None:
        super().__init__()
        self.svc = svc

    def filter(self, record: logging.LogRecord) -> bool:
        return self.svc.supervisor is not None or not record.getMessage().startswith(
            "Running on ")


def _resident_bytes() -> int:
    """The process's resident memory (Linux's ``/proc/self/statm``; 0 where there is none)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


async def _pace_gc() -> None:
    """Run the garbage collector on a clock, for a long-lived server with many live streams.

    CPython collects a generation when enough objects have entered it, and a collection scans
    every object of the generation that is still alive. A streaming server rebuilds each
    stream's chain of awaitables for every token and drops the old one, so the young
    generations are always full of live, new objects: one per stream and level of the chain.
    Measured at 1,500 live streams with the default scheme: collections of 200,000 live young
    objects, pauses of 24-106 ms, which were the tail of the inter-token gap.

    So: objects alive once start-up is done are frozen out of every collection; every
    ``_GC_YOUNG_EVERY`` seconds the two young generations are collected together, which scans
    only what was allocated since the last tick and moves what is still alive to the old
    generation, where nothing is scanned until the next full collection. A full collection
    (a pause proportional to the heap: 0.3-0.75 s at 3,000-4,000 streams) runs when the heap has
    doubled since the last one (so garbage in cycles can at most double the memory), or every
    ``_GC_FULL_AT_LEAST`` seconds; reference counting frees everything that is not in a cycle
    meanwhile. Automatic collections stay on as a backstop. The heap's size is not counted at
    every tick: ``sys.getallocatedblocks`` walks every pool of the heap (measured: 1-3.5 ms in
    an idle service, p50 5 / max 13 ms at 100 streams), which at every tick took 10 % of a core
    under load and stalled the loop 20 times a second. It is counted every
    ``_GC_GROWTH_EVERY`` seconds, and at the first tick the process's resident memory (a few
    microseconds to read) has grown by ``_GC_RSS_GROWTH`` since the last count: a heap that
    doubles grows the memory, unless it refills what a collection freed, which is no growth.

    An idle server does not tick 20 times a second: while fewer than ``_GC_IDLE_BELOW`` young
    objects are new at a tick, nothing is collected and the next tick comes twice as late, up to
    ``_GC_IDLE_EVERY`` seconds; the first busy tick brings the 50 ms pace back. (Measured: the
    ticks alone were 3 of an idle process's 4 % of a core.)
    """
    await trio.sleep(1.0)  # let the lifespan finish building the app's services
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_GEN0, _GC_GEN1, _GC_GEN2)
    blocks, last_full = sys.getallocatedblocks(), trio.current_time()
    every, counted, rss = _GC_YOUNG_EVERY, last_full, _resident_bytes()
    while True:
        await trio.sleep(every)
        now = trio.current_time()
        busy = gc.get_count()[0] >= _GC_IDLE_BELOW
        full = now - last_full >= _GC_FULL_AT_LEAST
        if not full and (now - counted >= _GC_GROWTH_EVERY
                         or _resident_bytes() > rss * _GC_RSS_GROWTH):
            counted, rss = now, _resident_bytes()
            full = sys.getallocatedblocks() > blocks * _GC_FULL_GROWTH
        if full:
            gc.collect()
            blocks, last_full = sys.getallocatedblocks(), now
            counted, rss = now, _resident_bytes()
        elif busy:
            gc.collect(1)
        every = _GC_YOUNG_EVERY if busy else min(2 * every, _GC_IDLE_EVERY)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"trio-agent-service {__version__}")
    parser.add_argument(
        "--bind", action="append", help="HOST:PORT (repeatable); overrides the config"
    )
    parser.add_argument(
        "--config", type=Path, default=None,
        help="hypercorn TOML config (default: ./hypercorn.toml if there is one)",
    )
    parser.add_argument(
        "--workers", type=int, default=None, metavar="N",
        help="serve with N processes sharing the port and the store (overrides the config)",
    )
    parser.add_argument(
        "--demo", action="store_true",
        help="write a tiny local model if absent and serve it on the embedded llama.cpp backend",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        overrides: dict[str, object] = {}
        if args.demo:
            from .demo import demo_overrides

            overrides = demo_overrides()
        settings = load_settings(**overrides)
    except ConfigError as exc:
        print(f"service: {exc.message}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        config = build_config(args.config or Path("hypercorn.toml"), args.bind,
                              max_body_bytes=settings.max_body_bytes,
                              keepalive=settings.sse_keepalive,
                              required=args.config is not None)
    except ConfigError as exc:
        print(f"service: {exc.message}", file=sys.stderr)
        return 2
    # The file's workers = 0 is hypercorn's one process, as its own CLI serves it.
    workers = args.workers if args.workers is not None else max(1, config.workers)
    if not 1 <= workers <= _MAX_WORKERS:
        print(f"service: --workers must be from 1 to {_MAX_WORKERS}", file=sys.stderr)
        return 2
    if config.max_requests is not None:
        # hypercorn then ends a worker after that many requests by its own shutdown, not the
        # service's: no drain first, so every stream open on it was cut without its
        # run.finished (and with one process nothing started another: the service stopped,
        # exit 0, no line saying why).
        print(f"service: max_requests = {config.max_requests} (hypercorn.toml) is not "
              "supported: hypercorn would end a worker without draining its runs (their "
              "streams cut without their end); remove it", file=sys.stderr)
        return 2
    if workers > 1:
        # Each line names its process: the workers' and this one's share the stream.
        configure_logging(settings.log_level, settings.log_format, pid=True)
    for line in unknown_variables(os.environ):
        log.warning("%s", line)
    if workers > 1:
        from .workers import serve_workers

        return serve_workers(settings, config, workers)
    # Bound by hypercorn once the app has started: a connection made before is refused, not
    # left waiting through a start-up that may take minutes (a model's load).
    return serve_one(settings, config)


def listen(config: Config) -> Sockets | None:
    """The sockets of ``config.bind``, bound and listening; None, with the one line printed,
    if they cannot be (a port taken or out of range, a unix socket's directory missing, an
    address that is not one)."""
    try:
        sockets = config.create_sockets()
        for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
            sock.listen(config.backlog)
    except (OSError, OverflowError, ValueError) as exc:
        print(_cannot_listen(config, exc), file=sys.stderr)
        return None
    return sockets


def _cannot_listen(config: Config, exc: BaseException) -> str:
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    hint = (" (another process may be using it; --bind picks another)"
            if isinstance(exc, OSError) and exc.errno in _TAKEN else "")
    return f"service: cannot listen on {', '.join(config.bind)}: {why}{hint}"


def serve_one(settings: Settings, config: Config, *, sockets: Sockets | None = None,
              on_ready: Callable[[], None] | None = None) -> int:
    """Serve in this process until SIGTERM/SIGINT; the process's exit status. ``on_ready`` is
    called once the app has started and listens."""
    unstored = 0

    async def serve_and_tell() -> int:
        async with trio.open_nursery() as nursery:
            done: list[int] = []

            async def serve_app(  # noqa: ASYNC128 (run_server calls started)
                *, task_status: trio.TaskStatus[list[str]]
            ) -> None:
                done.append(await run_server(settings, config, sockets=sockets,
                                             task_status=task_status))

            await nursery.start(serve_app)
            if on_ready is not None:
                on_ready()
        return done[0]

    try:
        unstored = trio.run(serve_and_tell)
    except BaseException as exc:  # noqa: ASYNC103 (sync, after trio.run: no Cancelled here)
        if is_interrupt(exc):
            # SIGINT outside the signal receiver's window (during start-up, or the last steps
            # of the close; trio raises it inside an exception group): not the graceful
            # shutdown, and whether every run's end was stored is not known. One line, and
            # the shell's convention for an interrupted process, 130; not a traceback, not 0.
            print("service: interrupted (SIGINT) outside the graceful shutdown",
                  file=sys.stderr)
            return 130  # noqa: ASYNC104 (as below)
        # A setting only checked at start-up (a tool module, the store's path, a model file)
        # fails the lifespan: hypercorn wraps it (an exception group, a LifespanFailureError);
        # the operator gets its one line, not a traceback. Anything else is a bug: re-raised.
        found = service_error(exc)
        if found is None:
            bind = _bind_error(exc)
            if bind is None:
                raise
            print(_cannot_listen(config, bind), file=sys.stderr)
            return 1  # noqa: ASYNC104 (as above)
        print(f"service: {found.message}", file=sys.stderr)
        # A signal during the start stopped it: asked for, and nothing was served.
        return 0 if isinstance(found, ShuttingDown) else 1  # noqa: ASYNC104 (as above)
    if unstored:
        # Clients were not told these ends (their streams said store_unavailable); a restart
        # on a store that can write again closes those runs (failed, "interrupted").
        print(f"service: shut down with {unstored} run(s) whose final state the store "
              "refused (SERVICE_DB cannot write)", file=sys.stderr)
        return 1
    return 0


_TAKEN = (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL)


def _bind_error(exc: BaseException) -> BaseException | None:
    """The error of hypercorn binding its listeners (a port taken or out of range, a unix
    socket's directory missing), alone in (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, OSError | OverflowError | ValueError) and any(
            frame.f_code.co_name == "create_sockets"
            for frame, _ in traceback.walk_tb(exc.__traceback__)):
        return exc
    return None


def service_error(exc: BaseException) -> ServiceError | None:
    """The ServiceError that failed the start-up, if that is what ``exc`` is: itself, alone in
    (nested) exception groups, or what hypercorn's LifespanFailureError was raised over. Nothing
    else counts (a bug raised while handling a ServiceError keeps its traceback)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, LifespanFailureError):
        inner = exc.__cause__ or exc.__context__
        return service_error(inner) if inner is not None else None
    return None
