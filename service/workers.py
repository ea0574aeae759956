"""``python -m service --workers N``: N processes serving one port and sharing the store.

The parent binds the listening sockets, starts N worker processes (``spawn``: each a fresh
interpreter running ``server.serve_one`` on the inherited sockets), and supervises them:

* a worker that fails to start stops them all: the start failed (exit 1, the worker's one line
  is on stderr);
* a worker that dies later (killed, crashed) is logged and replaced; its runs are closed by a
  surviving worker ("interrupted", as after any crash: ``Store.recover_interrupted``);
* SIGTERM or SIGINT to the parent is passed to every worker, which drains its runs as a single
  process does; the parent exits 0 once all have, 1 if any did not exit 0.

Metrics: every worker writes its Prometheus values to files in one directory
(``PROMETHEUS_MULTIPROC_DIR``, made by the parent), so ``/metrics`` on any worker covers all.
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import trio
from hypercorn.config import Config, Sockets
from hypercorn.utils import repr_socket_addr

from .logs import configure_logging, get_logger
from .settings import Settings

__all__ = ["serve_workers"]

log = get_logger("service.workers")

_READY_TIMEOUT = 180.0  # seconds a worker may take to start (the embedded model loads then)
_STOP_MARGIN = 10.0  # seconds past a worker's own shutdown bound before it is killed
_GIVE_UP = 5  # replacements in a row that fail to start, with no worker up: the service stops
_RESTART_SOON = 10.0  # a worker dying within this many seconds of its start...
_RESTART_FIRST, _RESTART_MAX = 0.5, 30.0  # ... is restarted after a pause, doubling


def _worker(settings: Settings, config: Config, sockets: Sockets, ready: Connection,
            parent: int) -> None:
    """A worker process: serve on the parent's sockets; tell the parent once listening.
    It drains and exits if the parent dies (killed, crashed): nobody would supervise it, and a
    SIGTERM to the service's pid would no longer reach it."""
    from .server import serve_one

    # Started with SIGINT blocked (``_Pool._start``; fork and exec keep the mask): a Ctrl+C
    # reaches the whole process group, and one during a worker's start (the interpreter,
    # spawn's imports) was a 30-line KeyboardInterrupt traceback on the terminal. The parent
    # passes every stop on as SIGTERM; the serving's own receiver takes SIGINT too once it is
    # in place. Until then it is ignored (one that came during the start with it).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _exit_with_parent(parent)
    configure_logging(settings.log_level, settings.log_format, pid=True)
    code = serve_one(settings, config, sockets=sockets, on_ready=lambda: ready.send(True))
    ready.close()
    sys.exit(code)


_PR_SET_PDEATHSIG = 1  # prctl(2)


def _exit_with_parent(parent: int) -> None:
    """SIGTERM to this process when its parent dies (Linux), as if the parent had passed a
    stop on; exit at once if the parent is gone already."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl to call: supervised by the parent only
            log.warning("worker: cannot ask to be stopped with its parent")
    if os.getppid() != parent:  # it died before the request above
        sys.exit(0)


@dataclass
class _Pool:
    settings: Settings
    config: Config
    sockets: Sockets
    ctx: Any = field(default_factory=lambda: multiprocessing.get_context("spawn"))
    stopping: bool = False
    failed: bool = False
    exit_codes: list[int] = field(default_factory=list)
    procs: dict[int, BaseProcess] = field(default_factory=dict)  # worker slot -> process
    # Whether each slot's latest start came up (a worker restarting after a crash counts as
    # up until its new start fails): the service gives up only when every slot's has failed.
    started_ok: dict[int, bool] = field(default_factory=dict)
    scope: trio.CancelScope | None = None  # the parent's wait for its workers
    stopped: trio.Event = field(default_factory=trio.Event)  # set with ``stopping``
    stop_timeout: float = math.inf  # ... bounded by this once the pool stops

    async def run_slot(self, slot: int, *, task_status: trio.TaskStatus[None]) -> None:
        """Keep worker ``slot`` alive until the pool stops; started once its first process
        listens (or the start failed)."""
        first = True
        pause = _RESTART_FIRST
        failed_starts = 0  # in a row
        while True:
            began = trio.current_time()
            proc, up = await self._start(slot)
            self.started_ok[slot] = up
            failed_starts = 0 if up else failed_starts + 1
            if first:
                task_status.started()
                if not up and not self.stopping:
                    # The first start failed (a setting, the store): the service cannot
                    # start; stop everything. A replacement that fails is tried again below.
                    self.failed = True
                    self.stop()
            if self.stopping and up and proc.is_alive() and proc.pid is not None:
                # The stop came while it started (its SIGTERM may have come before it could
                # take one): it drains now, as the others do. A second SIGTERM is ignored.
                os.kill(proc.pid, signal.SIGTERM)
            first = False
            await trio.lowlevel.wait_readable(proc.sentinel)
            proc.join()
            code = proc.exitcode if proc.exitcode is not None else 1
            _mark_dead(proc.pid)
            if self.stopping:
                # A worker stopped before it could listen was stopped, not failed.
                self.exit_codes.append(code if up else 0)
                return
            if (not up and failed_starts >= _GIVE_UP
                    and not any(self.started_ok.get(i, True) for i in self.procs)):
                # Nothing serves, and nothing can (a bad deploy on disk, the store gone): the
                # port would accept connections nobody answers, and a process manager would
                # never see a failure. Stop, exit 1.
                log.error("worker %d could not start %d times in a row and no worker could "
                          "either: stopping the service", slot, failed_starts)
                self.failed = True
                self.stop()
                self.exit_codes.append(1)
                return
            if up:
                log.error("worker %d (pid %s) died (exit %s); starting another", slot,
                          proc.pid, code)
            else:
                log.error("worker %d (pid %s) could not start; trying again", slot, proc.pid)
            # One that keeps dying soon after its start is restarted ever more slowly.
            if trio.current_time() - began < _RESTART_SOON:
                # A stop ends the pause (up to 30 s): the other workers drained at once, and
                # the parent's exit waited for the pause to run out.
                with trio.move_on_after(pause):
                    await self.stopped.wait()
                pause = min(2 * pause, _RESTART_MAX)
            else:
                pause = _RESTART_FIRST
            if self.stopping:  # the stop came during the pause: start nothing more
                self.exit_codes.append(0)
                return

    async def _start(self, slot: int) -> tuple[BaseProcess, bool]:
        recv, send = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_worker, name=f"service-worker-{slot}",
                                args=(self.settings, self.config, self.sockets, send,
                                      os.getpid()))
        # The worker starts with SIGINT blocked (see ``_worker``): blocked here, in this
        # thread, for the fork, the child keeps the mask. This process's handler stays: one
        # that comes meanwhile is taken at the unblock (or by another thread; ignoring it here
        # instead lost it when another thread took it). Spawn's resource tracker is started
        # first: its own start unblocks SIGINT.
        resource_tracker.ensure_running()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        send.close()
        self.procs[slot] = proc
        up = False
        with trio.move_on_after(_READY_TIMEOUT):
            up = await trio.to_thread.run_sync(_wait_ready, recv, abandon_on_cancel=True)
        recv.close()
        if up:
            log.info("worker %d up (pid %s)", slot, proc.pid)
        elif proc.is_alive():
            proc.kill()
        return proc, up

    def stop(self) -> None:
        """Tell every worker to drain and exit (sync; idempotent). However the stop came (a
        signal, a failed start, giving up), the parent's wait for them is bounded from here."""
        self.stopping = True
        self.stopped.set()
        if self.scope is not None and self.scope.deadline == math.inf:
            self.scope.deadline = trio.current_time() + self.stop_timeout
        for proc in self.procs.values():
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.is_alive():
                proc.kill()


def _wait_ready(conn: Connection) -> bool:
    """Blocks until the worker says it listens; False if it exits first."""
    try:
        return bool(conn.recv())
    except EOFError:
        return False


def _mark_dead(pid: int | None) -> None:
    """Let go of a dead worker's live gauges (prometheus multiprocess mode)."""
    if pid is None or not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


def _stop_timeout(pool: _Pool) -> float:
    """Seconds workers get to drain after SIGTERM before they are killed: a worker's own bound
    (the drain, its final writes' budgets, closing, hypercorn's graceful timeout) and a margin:
    a fixed 60 s cut a drain that SERVICE_SHUTDOWN_DRAIN allowed longer."""
    from .lifespan import _CLOSE_BUDGET
    from .runs.committer import FINAL_WRITE_BUDGET

    return (pool.settings.shutdown_drain + 3 * FINAL_WRITE_BUDGET + _CLOSE_BUDGET
            + float(pool.config.graceful_timeout) + _STOP_MARGIN)


async def _supervise(pool: _Pool, workers: int) -> None:
    stop_timeout = _stop_timeout(pool)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                async for signum in signals:
                    log.info("received %s: stopping %d workers",
                             signal.Signals(signum).name, workers)
                    pool.stop()  # (a repeated signal does not move the deadline)

            pool.scope, pool.stop_timeout = nursery.cancel_scope, stop_timeout

            nursery.start_soon(on_signal)
            async with trio.open_nursery() as slots:
                for slot in range(workers):
                    await slots.start(pool.run_slot, slot)
                    if pool.failed or pool.stopping:  # nothing more to start
                        break
                else:
                    binds = ", ".join(_urls(pool.sockets))
                    log.info("Running on %s with %d workers", binds, workers)
            nursery.cancel_scope.cancel()
    if any(proc.is_alive() for proc in pool.procs.values()):
        log.error("workers still running after %gs: killed", stop_timeout)
        pool.kill_all()
        pool.exit_codes.append(1)


def _urls(sockets: Sockets) -> list[str]:
    """As each worker's own line (hypercorn's) says them: ``http://[::1]:8000``,
    ``http://unix:/run/service.sock``."""
    return [f"{scheme}://{repr_socket_addr(sock.family, sock.getsockname())}"
            for scheme, socks in (("http", sockets.insecure_sockets),
                                  ("https", sockets.secure_sockets))
            for sock in socks]


def serve_workers(settings: Settings, config: Config, workers: int) -> int:
    """Serve with ``workers`` processes; the parent's exit status."""
    # One set of sockets, bound here and shared: hypercorn sets SO_REUSEPORT when its
    # ``workers`` is over 1 (for its own workers, each binding its own), which here would only
    # let a second service (an old version, another store) bind the same port and take half
    # its connections.
    config.workers = 1
    from .server import listen

    sockets = listen(config)
    if sockets is None:
        return 1
    metrics_dir = tempfile.mkdtemp(prefix="service-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # the spawned workers inherit it
    pool = _Pool(settings, config, sockets)
    try:
        trio.run(_supervise, pool, workers)
    finally:
        for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
            sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    if pool.failed:
        return 1
    return 0 if all(code == 0 for code in pool.exit_codes) else 1
