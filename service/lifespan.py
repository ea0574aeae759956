"""The app's lifespan: what starts before serving and stops, bounded, after.

Start: the store, the backend (with the recording interceptor; the embedded llama.cpp server
when asked for), the tools, and the run supervisor in quart-trio's lifespan nursery.

Stop (``begin_shutdown`` first, when the process got a signal; ``after_serving`` in any case):
refuse new runs, let those in flight finish for ``SERVICE_SHUTDOWN_DRAIN`` seconds, cancel the
rest and wait for their final state to be stored, then close the backends and the store.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import trio

from .agents import make_runner
from .backends import build_backend, client_from_settings
from .backends.router import FleetBackend
from .errors import BackendUnavailable, ShuttingDown, StoreError
from .logs import get_logger
from .runs import RunSupervisor
from .runs.committer import FINAL_WRITE_BUDGET
from .services import Services
from .settings import BackendKind, embedded_alias
from .store import describe_store, make_store
from .store.ownership import LEASE
from .tools import BUILTIN_TOOLS, ToolRegistry, load_tool_modules

if TYPE_CHECKING:
    from quart_trio import QuartTrio

    from .backends.base import Backend

__all__ = ["begin_shutdown"]

log = get_logger("service.lifespan")

_CLOSE_BUDGET = 10.0


async def _start_services(app: QuartTrio, svc: Services, backend: Backend | None) -> None:
    """Start, unless a shutdown begins meanwhile (a signal: ``begin_shutdown`` cancels the
    start, e.g. a wait for another instance's schema migration, which has no bound): what was
    opened is closed and the start fails with ``ShuttingDown`` (the process exits 0)."""
    with svc.starting:
        await _open_services(app, svc, backend)
    if svc.starting.cancelled_caught:
        await _stop_services(svc)
        raise ShuttingDown("stopped by a signal before it started serving")


async def _open_services(app: QuartTrio, svc: Services, backend: Backend | None) -> None:
    settings = svc.settings
    stack = AsyncExitStack()
    svc.extras["stack"] = stack
    store = make_store(
        settings.db,
        synchronous=settings.db_synchronous,
        metrics=svc.metrics,
        statement_timeout=settings.db_timeout,
    )
    try:
        await store.open()
    except StoreError as exc:  # a path that cannot be a store, a database away: say which
        raise StoreError(f"SERVICE_DB: {exc.message}") from exc
    svc.store = store
    try:
        # This instance's lease first: other instances sharing the store see it alive.
        await store.renew_lease(LEASE)
        interrupted = await store.recover_interrupted()
    except StoreError as exc:  # opens, but cannot be read (a corrupted file): say which setting
        await store.aclose()
        raise StoreError(f"SERVICE_DB: {exc.message}") from exc
    log.info("store open", extra={"db": describe_store(settings.db),
                                  "interrupted_runs": len(interrupted)})
    svc.tools = ToolRegistry([*BUILTIN_TOOLS, *load_tool_modules(settings.tools)])
    supervisor = RunSupervisor(
        store,
        make_runner(
            backend=lambda: svc.backend, tools=svc.tools, metrics=svc.metrics,
            tool_timeout=settings.tool_timeout, history_chars=settings.history_chars,
            abandon_in=lambda: supervisor.nursery,
        ),
        metrics=svc.metrics, max_runs=settings.max_runs, run_timeout=settings.run_timeout,
        events_retention=settings.events_retention_days * 86_400,
        history_chars=settings.history_chars,
    )
    if backend is None:
        client = client_from_settings(settings)
        stack.push_async_callback(client.aclose)
        embedded_url = await _maybe_start_embedded(app, svc)
        # Each LLM call's record: written in the call's path, again later if the store
        # refused it (the supervisor runs the retries).
        backend = build_backend(settings, client, recorder=supervisor.call_records,
                                metrics=svc.metrics, embedded_url=embedded_url)
        stack.push_async_callback(backend.aclose)
        if isinstance(backend, FleetBackend):
            _start_loop(app, stack, _keep_fleet_fresh, backend)
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # --workers: siblings read our gauges
            _start_loop(app, stack, svc.metrics.keep_gauges_fresh)
    svc.backend = backend
    svc.supervisor = await app.nursery.start(_supervise, svc, supervisor)


async def _supervise(  # noqa: ASYNC128 (serve calls started)
    svc: Services, supervisor: RunSupervisor, *, task_status: trio.TaskStatus[RunSupervisor],
) -> None:
    """The supervisor's ``serve``. Its failure (logged, in ``failure``) is the process's: the
    server shuts down (``Services.broken``) rather than answering HTTP with nothing to run it.
    Not passed on into the lifespan's nursery: hypercorn would go on "without Lifespan
    support", and the shutdown's close of the store would be skipped."""
    try:
        await supervisor.serve(task_status=task_status)
    except Exception:
        if supervisor.failure is None or svc.supervisor is None:  # (not started: a failed start)
            raise
        svc.broken.set()
    except BaseException:  # (a failure beside a cancel: the shutdown is under way already)
        if supervisor.failure is not None:
            svc.broken.set()
        raise


def _start_loop(app: QuartTrio, stack: AsyncExitStack,
                loop: Callable[..., Awaitable[None]], *args: object) -> None:
    """``loop(*args)`` in the app's nursery, the lifespan's own: stopped by its shutdown (its
    scope cancelled by ``stack``, before what was pushed on it earlier, such as the client it
    uses, is closed), not left to whoever ends the app's nursery. A scope each: a cancel
    scope is entered once."""
    scope = trio.CancelScope()
    stack.callback(scope.cancel)
    app.nursery.start_soon(_within, scope, loop, *args)


async def _within(scope: trio.CancelScope, loop: Callable[..., Awaitable[None]],
                  *args: object) -> None:
    with scope:
        await loop(*args)


async def _keep_fleet_fresh(fleet: FleetBackend) -> None:
    """Refresh what every server of a fleet serves in the background, so no call waits for it
    (if this stops, calls refresh it themselves)."""
    try:
        await fleet.keep_fresh()
    except Exception:
        log.exception("keeping the fleet's model lists fresh stopped; calls refresh them")


async def _maybe_start_embedded(app: QuartTrio, svc: Services) -> str | None:
    settings = svc.settings
    wanted = settings.backend is BackendKind.embedded or (
        settings.backend is BackendKind.auto and settings.gguf is not None
    )
    if not wanted:
        return None
    stop = trio.Event()
    svc.extras["embedded_stop"] = stop
    done = trio.Event()
    svc.extras["embedded_done"] = done
    url: str = await app.nursery.start(_serve_embedded, svc, stop, done)
    log.info("embedded llama.cpp server up", extra={"url": url})
    return url


async def _serve_embedded(
    svc: Services, stop: trio.Event, done: trio.Event, *, task_status: trio.TaskStatus[str]
) -> None:
    """Own the embedded llama.cpp server for the app's lifetime (stopped by ``stop``)."""
    from .backends.embedded import embedded_llama_server
    from .errors import ConfigError

    settings = svc.settings
    if settings.gguf is None:
        raise ConfigError("SERVICE_BACKEND=embedded needs SERVICE_GGUF (a .gguf model file)",
                          variable="SERVICE_GGUF")
    served = False
    try:
        async with embedded_llama_server(
            settings.gguf, alias=embedded_alias(settings) or settings.gguf.stem,
            n_ctx=settings.embedded_ctx,
            n_predict=settings.embedded_max_tokens or -1,
        ) as server:
            task_status.started(server.base_url)
            served = True
            await stop.wait()
    except BackendUnavailable as exc:
        if served:
            raise
        # It never served: the model file is the likely cause; name the setting.
        raise ConfigError(f"SERVICE_GGUF={settings.gguf}: {exc.message}",
                          variable="SERVICE_GGUF") from exc
    finally:
        done.set()


async def begin_shutdown(svc: Services) -> None:
    """Drain runs (bounded); safe to call more than once. During the start: stop it."""
    svc.draining = True
    if svc.supervisor is None:
        svc.starting.cancel()
    supervisor = svc.supervisor
    if supervisor is not None and not svc.extras.get("drained"):
        svc.extras["drained"] = True
        log.info("draining runs", extra={"in_flight": supervisor.in_flight})
        # The grace, then the runs' final writes and one more try at what the store refused
        # (each up to FINAL_WRITE_BUDGET, only that long while the store refuses writes).
        budget = svc.settings.shutdown_drain + 3 * FINAL_WRITE_BUDGET + _CLOSE_BUDGET
        try:
            with trio.move_on_after(budget, shield=True):
                await supervisor.drain(svc.settings.shutdown_drain)
        finally:
            svc.drained.set()


async def _stop_services(svc: Services) -> None:
    await begin_shutdown(svc)
    with trio.move_on_after(_CLOSE_BUDGET, shield=True):
        if svc.supervisor is not None:
            svc.supervisor.stop()
        stack: AsyncExitStack | None = svc.extras.get("stack")
        if stack is not None:
            await stack.aclose()
        stop: trio.Event | None = svc.extras.get("embedded_stop")
        if stop is not None:
            stop.set()
            await svc.extras["embedded_done"].wait()
        if svc.store is not None:
            try:
                await svc.store.end_lease()  # what it left is closed by others at once
            except StoreError as exc:
                log.warning("could not end this instance's lease: %s", exc.message)
            await svc.store.aclose()
            log.info("store closed")
