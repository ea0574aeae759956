"""The app served by hypercorn's own entry points drains its runs first, as ``python -m service``.

``python -m service`` drains the runs when its signal arrives, while connections are still open
(every stream gets its ``run.finished``), and only then lets hypercorn close listeners and
connections. Under ``hypercorn --config hypercorn.toml service.app:app`` (or an embedding's
``hypercorn.trio.serve``) hypercorn's shutdown came first: requests in flight got
``graceful_timeout``, were then cancelled, and only after that did the app's ``after_serving``
drain the runs. A stream was cut without its end, and its run stored as "client disconnected"
although the client never left.

So hypercorn's trio ``worker_serve`` is wrapped (``install``, from ``create_app``): its shutdown
trigger, when it fires, drains the app's runs before hypercorn goes on. Under the CLI with no
trigger (``workers = 0``, where SIGTERM killed the process outright) SIGTERM and SIGINT become
one, as under ``python -m service``; code embedding ``hypercorn.trio.serve`` with no trigger
keeps its process's signals. And under the CLI a start-up failure is the one line
``python -m service`` prints, not an exception group's traceback after "Running on ...".
It also puts the settings' WebSocket bounds on hypercorn's config (``server.websocket_limits``:
pings every ``SERVICE_SSE_KEEPALIVE``, and the 1009 close past twice
``SERVICE_MAX_BODY_BYTES``), as ``python -m service`` does: without them a socket served by the
CLI was never pinged. ``python -m service`` calls :data:`hypercorn_worker_serve` (the
original) with its own trigger.
The tests fail if a hypercorn upgrade changes these names.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import hypercorn.trio
import hypercorn.trio.run
import trio

from . import sendstall

__all__ = ["hypercorn_worker_serve", "install"]

hypercorn_worker_serve = hypercorn.trio.run.worker_serve  # the original

_Trigger = Callable[[], Awaitable[Any]]


def _services(app: Any) -> Any:
    """The app's ``Services`` (``app`` is hypercorn's wrapper of the Quart app), or None."""
    extensions = getattr(getattr(app, "app", None), "extensions", None)
    return extensions.get("service") if isinstance(extensions, dict) else None


async def _serve(  # noqa: ASYNC128 (task_status is handed to hypercorn's worker_serve)
    app: Any, config: Any, *, sockets: Any = None, shutdown_trigger: _Trigger | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED, cli: bool = False,
) -> None:
    from .errors import ShuttingDown
    from .lifespan import begin_shutdown
    from .server import (
        RunningOnlyIfStarted,
        SupervisorFailed,
        stop_if_broken,
        wait_for_signal,
        websocket_limits,
    )

    svc = _services(app)
    if svc is not None:
        websocket_limits(config, max_body_bytes=svc.settings.max_body_bytes,
                         keepalive=svc.settings.sse_keepalive)
        _own_errorlog(config)
    if svc is None or (shutdown_trigger is None and not cli):
        # Not this service's app; or code embedding ``hypercorn.trio.serve`` with no trigger,
        # which owns its process's signals (the app's lifespan drains at the end).
        await hypercorn_worker_serve(app, config, sockets=sockets,
                                     shutdown_trigger=shutdown_trigger, task_status=task_status)
        return
    stop = trio.Event()
    sendstall.serving(config)

    async def drain_first() -> None:
        await stop.wait()
        await begin_shutdown(svc)  # idempotent; bounded
        sendstall.closing(config)  # no write waits past the graceful timeout from here

    # No "Running on ..." from a start that failed (service.server: the same filter).
    quiet = RunningOnlyIfStarted(svc)
    hypercorn_log = logging.getLogger("hypercorn.error")
    hypercorn_log.addFilter(quiet)
    try:
        async with trio.open_nursery() as nursery:
            if shutdown_trigger is not None:
                async def trigger() -> None:
                    await shutdown_trigger()
                    # During the start too: hypercorn looks at its trigger only after it, so
                    # a start that waits (another instance's migration) is stopped here.
                    await begin_shutdown(svc)
                    stop.set()

                nursery.start_soon(trigger)
            elif threading.current_thread() is threading.main_thread():  # the CLI, workers = 0
                nursery.start_soon(wait_for_signal, svc, stop)
            # A run supervisor that fails stops the server (exit 1 under the CLI, whose
            # parent starts another worker), as under ``python -m service``.
            nursery.start_soon(stop_if_broken, svc, stop)
            await hypercorn_worker_serve(app, config, sockets=sockets,
                                         shutdown_trigger=drain_first, task_status=task_status)
            nursery.cancel_scope.cancel()
        if svc.broken.is_set() and svc.supervisor is not None and svc.supervisor.failure:
            raise SupervisorFailed(svc.supervisor.failure)
    except BaseException as exc:  # noqa: ASYNC103 (re-raised unless a start-up failure)
        if not cli:
            raise
        from .server import service_error

        found = service_error(exc)
        if found is None:
            raise
        print(f"service: {found.message}", file=sys.stderr)
        # One line, exit 1; 0 for a start a signal stopped (asked for, nothing served).
        code = 0 if isinstance(found, ShuttingDown) else 1
        raise SystemExit(code) from None  # noqa: ASYNC104 (the process ends)
    finally:
        hypercorn_log.removeFilter(quiet)


def _own_errorlog(config: Any) -> None:
    """hypercorn's messages through the service's own handler, in its format and at its level,
    as ``build_config`` has it for ``python -m service``. Under hypercorn's command line the
    config says ``errorlog = "-"`` (its default too): hypercorn then gave its logger a plain
    stderr handler of its own, and each of its lines came twice, once not JSON."""
    hypercorn_log = logging.getLogger("hypercorn.error")
    if config.errorlog is hypercorn_log:
        return
    config.errorlog = hypercorn_log
    config._log = None  # made again from the errorlog above, if it was made already
    hypercorn_log.handlers.clear()
    hypercorn_log.propagate = True
    hypercorn_log.setLevel(logging.NOTSET)  # the service's level (SERVICE_LOG_LEVEL)


async def _serve_cli(  # noqa: ASYNC128 (as _serve)
    app: Any, config: Any, *, sockets: Any = None, shutdown_trigger: _Trigger | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    await _serve(app, config, sockets=sockets, shutdown_trigger=shutdown_trigger,
                 task_status=task_status, cli=True)


def install() -> None:
    # hypercorn's CLI (trio_worker) looks worker_serve up in hypercorn.trio.run when it serves;
    # hypercorn.trio.serve in its own module.
    hypercorn.trio.run.worker_serve = _serve_cli  # type: ignore[assignment]
    hypercorn.trio.worker_serve = _serve  # type: ignore[attr-defined]
