"""Serve the app with hypercorn's trio worker, programmatically, with graceful signals.

``python -m service`` reads ``hypercorn.toml`` (``--config`` to pick another, ``--bind`` to
override its bind), serves until SIGTERM or SIGINT, then shuts down gracefully: listeners close,
requests in flight get ``graceful_timeout`` seconds, the app's lifespan closes the store, and the
process exits 0.
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from .api.state import Services
from .errors import ConfigError, ServiceError
from .lifespan import begin_shutdown
from .logs import configure_logging, get_logger
from .settings import Settings, load_settings

__all__ = ["build_config", "main", "run_server"]

log = get_logger("service.server")

_GC_GEN0, _GC_GEN1, _GC_GEN2 = 50_000, 50, 1000


def build_config(config_path: Path | None, bind: Sequence[str] | None) -> Config:
    if config_path is not None and config_path.exists():
        config = Config.from_toml(str(config_path))
    else:
        config = Config()
        config.bind = ["127.0.0.1:8000"]
        config.graceful_timeout = 10
    if bind:
        config.bind = list(bind)
    # Our own after_request handler logs every request with its request id.
    config.accesslog = None
    # Hypercorn's own messages go through our structured handler (see service.logs).
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


async def _wait_for_signal(svc: Services, stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s: shutting down gracefully", signal.Signals(signum).name)
            # Drain runs while connections are still open, so every stream gets its end;
            # only then let hypercorn close listeners and connections.
            await begin_shutdown(svc)
            stop.set()
            return


async def run_server(  # noqa: ASYNC128 (task_status is handed to hypercorn's serve)
    settings: Settings,
    config: Config,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGTERM/SIGINT. ``task_status.started`` reports the bound URLs."""
    from .factory import create_app

    app = create_app(settings)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_wait_for_signal, app.extensions["service"], stop)
        nursery.start_soon(_settle_gc)
        await serve(
            app, config, shutdown_trigger=stop.wait, task_status=task_status  # type: ignore[arg-type]
        )
        nursery.cancel_scope.cancel()


async def _settle_gc() -> None:
    """Tune the garbage collector for a long-lived server with many live streams.

    Measured by the benchmark: the tail of the inter-token gap with thousands of live streams
    is the collector's pauses, not CPU. Objects alive once start-up is done (modules, the app)
    are frozen out of every collection, and young collections run less often.
    """
    await trio.sleep(1.0)  # let the lifespan finish building the app's services
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_GEN0, _GC_GEN1, _GC_GEN2)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bind", action="append", help="HOST:PORT (repeatable); overrides the config"
    )
    parser.add_argument(
        "--config", type=Path, default=Path("hypercorn.toml"), help="hypercorn TOML config"
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
    config = build_config(args.config, args.bind)
    try:
        trio.run(run_server, settings, config)
    except ServiceError as exc:
        print(f"service: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
