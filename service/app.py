"""``service.app:app``: the app built from the environment, for
``hypercorn --config hypercorn.toml service.app:app``.

Importing this module reads the settings; a bad one stops the process with one line naming it.
"""

from __future__ import annotations

import multiprocessing
import os
import sys

from quart_trio import QuartTrio

from .errors import ConfigError
from .factory import create_app
from .logs import configure_logging, get_logger
from .settings import load_settings, unknown_variables

__all__ = ["app"]

log = get_logger("service.app")


def _app_from_env() -> QuartTrio:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"service: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None
    # hypercorn's own CLI with workers: spawned processes sharing one stream, each line
    # naming its own.
    configure_logging(settings.log_level, settings.log_format,
                      pid=multiprocessing.parent_process() is not None)
    if _says_for_every_worker():
        for line in unknown_variables(os.environ):  # as ``python -m service`` says them
            log.warning("%s", line)
    return create_app(settings)


def _says_for_every_worker() -> bool:
    """Whether this process says what is the same for every worker (the environment's unknown
    variables): hypercorn's CLI with ``workers = N`` spawns N processes from one environment,
    each building the app, and the same warning came N times. The first one spawned
    (``SpawnProcess-1``) says it; a process of its own always."""
    if multiprocessing.parent_process() is None:
        return True
    return multiprocessing.current_process().name == "SpawnProcess-1"


app = _app_from_env()
