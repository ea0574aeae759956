"""The servers the tests run (not a test module): the real app under hypercorn on port 0, in
this process (``running_server``), or ``python -m service`` in a process of its own
(``start_service``); which of its processes serves a connection (``pid_serving_port``).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from service.backends.base import Backend
from service.factory import create_app
from service.metrics import Metrics
from service.services import Services
from service.settings import Settings

from .fakes import ScriptedBackend

ROOT = Path(__file__).resolve().parents[1]  # the repository (hypercorn.toml, service/)
EMBEDDED_ALIAS = "tiny"  # the tiny model's name on the embedded llama.cpp server (conftest)


def commits_of(store: Any, *ops: str) -> Callable[[], bool]:
    """For a ``before_commit`` hook on a running service's store, which commits on its own too
    (the lease's renewal every 5 s on SQLite, upkeep, call records): a hook that held or
    failed "the next commit" caught one of those at times (e1537a8). Returns ``holds()``, to
    call in the hook: whether the transaction about to commit holds one of the writes ``ops``
    (the store's names: "begin_run" for ``begin_run`` and ``write_run``,
    "append_run_events", "finish_run", ...), as ``store.faults.committing`` names them."""
    wanted = frozenset(ops)
    return lambda: not wanted.isdisjoint(store.faults.committing)



def all_tasks() -> Iterator[trio.lowlevel.Task]:
    """Every trio task of this process (a server run in it included)."""
    root = trio.lowlevel.current_root_task()
    assert root is not None
    todo = [root]
    while todo:
        task = todo.pop()
        yield task
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)


def task_count() -> int:
    return sum(1 for _ in all_tasks())


def fd_count(pid: int | None = None) -> int:
    """Open file descriptors of a process (this one by default)."""
    return len(os.listdir(f"/proc/{pid or os.getpid()}/fd"))


@dataclass
class RunningServer:
    url: str
    services: Services

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=30, **kwargs)


@asynccontextmanager
async def running_server(
    settings: Settings, backend: Backend | None = None, *, from_settings: bool = False,
    **hypercorn: Any,
) -> AsyncIterator[RunningServer]:
    """The real app under hypercorn's trio worker on 127.0.0.1:0, shut down gracefully after.

    ``backend`` defaults to an in-memory scripted one; pass a real adapter (on the simulator)
    for end-to-end tests, or ``from_settings=True`` to let the lifespan build the backend the
    settings describe (adapters, interceptors recording into the server's store) as in production.
    """
    if from_settings:
        assert backend is None, "from_settings builds the backend; do not pass one"
    else:
        backend = backend or ScriptedBackend()
    app = create_app(settings, metrics=Metrics(), backend=backend)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.graceful_timeout = 2
    config.accesslog = None
    for name, value in hypercorn.items():  # e.g. keep_alive_timeout=..., graceful_timeout=...
        setattr(config, name, value)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config, shutdown_trigger=stop.wait))
        try:
            yield RunningServer(binds[0], app.extensions["service"])
        finally:
            stop.set()


async def start_service(db: Path | str, sim_url: str, cwd: Path, *, name: str | None = None,
                        env_extra: dict[str, str] | None = None) -> tuple[trio.Process, str]:
    """The service in a process of its own (``db``: a SQLite path or a PostgreSQL URL); its
    log goes to a file (a pipe nobody reads would fill and stall it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    env.update({"SERVICE_DB": str(db), "SERVICE_BACKEND": "llamacpp",
                "SERVICE_LLAMACPP_URL": sim_url, **(env_extra or {})})
    stem = name or (db.stem if isinstance(db, Path) else "service")
    log = cwd / f"{stem}-{trio.current_time():.0f}.log"
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "service", "--bind", "127.0.0.1:0", "--config",
             str(ROOT / "hypercorn.toml")],
            cwd=cwd, env=env, stderr=out,
        )
    finally:
        os.close(out)
    with trio.fail_after(60):
        while True:
            text = await trio.Path(log).read_bytes()
            m = re.search(rb"Running on (http://127\.0\.0\.1:\d+)", text)
            if m:
                return proc, m.group(1).decode()
            assert proc.returncode is None, text.decode()
            await trio.sleep(0.05)


def pid_serving_port(client_port: int, pids: set[int]) -> int | None:
    """Which of ``pids`` holds the server end of the TCP connection from local port
    ``client_port`` (found from /proc: the socket's inode, then the process holding it)."""
    inodes = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[2].split(":")[1], 16) == client_port:
                inodes.add(fields[9])
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return pid
    return None
