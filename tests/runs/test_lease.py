"""An instance renews its lease before it serves a run: the lifespan's renewal may be old (a
model's load came in between), and a survivor elsewhere takes a run of an instance whose
lease has lapsed for a dead one's and closes it (found by a review; failed before the fix)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from service.agents import make_runner
from service.metrics import Metrics
from service.runs import RunSpec, RunStatus
from service.runs.supervisor import RunSupervisor
from service.store import SQLiteStore
from service.store.ownership import LEASE, process_tag
from service.tools import BUILTIN_TOOLS, ToolRegistry

from ..fakes import Reply, ScriptedBackend, _inline

ELSEWHERE = "999999999:1:another-boot-id:12345:4026531836"  # its lease decides, not its PID


async def test_a_run_started_at_once_is_not_taken_for_a_dead_instances(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    metrics = Metrics()
    store = SQLiteStore(tmp_path / "runs.db", threaded=False, metrics=metrics,
                        process_id=ELSEWHERE)
    await store.open()
    # lifespan: renew_lease(LEASE), recover_interrupted(), then the tools, the backend and an
    # embedded model's load (up to its 120 s startup_timeout) before the supervisor starts:
    # the lease written then has run out by the time runs are served.
    await store.renew_lease(-1)
    backend = ScriptedBackend(lambda req: Reply(" ".join(["word"] * 20), gap=1.0))
    runner = make_runner(backend=lambda: backend, tools=ToolRegistry(BUILTIN_TOOLS),
                         metrics=metrics, tool_timeout=30, history_chars=24_000,
                         run_sync=_inline)
    supervisor = RunSupervisor(store, runner, metrics=metrics)
    other = SQLiteStore(tmp_path / "runs.db", threaded=False)  # a survivor on another host
    await other.open()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            conv = (await store.create_conversation()).id
            handle = await supervisor.start(RunSpec(conv, "x"))
            await trio.sleep(1.0)  # serving for a second: the run is a live instance's
            closed = await other.recover_interrupted()
            with trio.fail_after(60):
                await handle.finished.wait()
            nursery.cancel_scope.cancel()
        assert closed == []
        assert handle.status is RunStatus.succeeded
    finally:
        await other.aclose()
        await store.aclose()


class _SteppedClock:
    """``time`` with its wall clock stepped ``by`` seconds (NTP correcting a drifted clock)."""

    def __init__(self, by: float) -> None:
        self.by = by

    def time(self) -> float:
        return time.time() + self.by

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


async def test_a_wall_clock_step_does_not_close_a_live_sibling_workers_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two workers on one host share a SQLite file. The sibling is alive and renewed its
    lease a moment ago; the wall clock then steps forward by a minute. On SQLite a lease is
    wall-clock time (written and read on this host), so every lease looks expired until the
    next renewal, and ``owner_alive`` now takes a live same-host process for dead: the
    other worker's recover loop (every 5 s) closes its runs. Before, the PID and its start
    tick (not the wall clock, ``ownership.alive``) said alive."""
    sibling = await trio.lowlevel.open_process(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        db = tmp_path / "s.db"
        owner = SQLiteStore(db, threaded=False, process_id=process_tag(sibling.pid))
        other = SQLiteStore(db, threaded=False)
        await owner.open()
        await other.open()
        try:
            await owner.renew_lease(LEASE)
            conv = await owner.create_conversation()
            run = (await owner.begin_run(conv.id, content="q", agent="chat", model=None)).run
            assert await other.recover_interrupted() == []  # alive
            monkeypatch.setattr("service.store.sqlite_ownership.time", _SteppedClock(60.0))
            closed = await other.recover_interrupted()
            assert closed == [], "a live worker's run was closed after a clock step"
            assert (await other.get_run(run.id)).status in ("queued", "running")
            # Stopped (SIGSTOP) with its lease run out: dead, as it would be on another host.
            os.kill(sibling.pid, signal.SIGSTOP)
            try:
                with trio.fail_after(5):
                    while not await other.recover_interrupted():  # noqa: ASYNC110 (the store)
                        await trio.sleep(0.01)
            finally:
                os.kill(sibling.pid, signal.SIGCONT)
            assert (await other.get_run(run.id)).status == "failed"
        finally:
            await other.aclose()
            await owner.aclose()
    finally:
        sibling.kill()
        with trio.move_on_after(5, shield=True):
            await sibling.wait()


async def test_a_run_closed_by_a_survivor_is_counted_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """An instance whose lease lapsed (a long stall) finds its run closed by a survivor, which
    counts it (``service_runs_total{status="failed"}``, its ownership recovery); the owner
    adopts the stored end and counted the run again under its own status: summed over the
    instances, /metrics said two runs for one (2026-12-06; failed before)."""
    mine, theirs = Metrics(), Metrics()
    store = SQLiteStore(tmp_path / "runs.db", threaded=False, metrics=mine,
                        process_id=ELSEWHERE)
    await store.open()
    backend = ScriptedBackend(lambda req: Reply(" ".join(["word"] * 20), gap=1.0))
    runner = make_runner(backend=lambda: backend, tools=ToolRegistry(BUILTIN_TOOLS),
                         metrics=mine, tool_timeout=30, history_chars=24_000,
                         run_sync=_inline)
    supervisor = RunSupervisor(store, runner, metrics=mine)
    other = SQLiteStore(tmp_path / "runs.db", threaded=False, metrics=theirs)
    await other.open()

    def count(metrics: Metrics) -> float:
        return sum(metrics.registry.get_sample_value("service_runs_total", {"status": s}) or 0
                   for s in ("succeeded", "failed", "cancelled", "timed_out"))

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            conv = (await store.create_conversation()).id
            handle = await supervisor.start(RunSpec(conv, "x"))
            await trio.sleep(2.0)
            # This instance's lease lapses (a stall the survivor cannot tell from a death).
            with sqlite3.connect(tmp_path / "runs.db") as db:
                db.execute("UPDATE instances SET lease_until = 0")
            closed = await other.recover_interrupted()
            with trio.fail_after(60):
                await handle.finished.wait()
            nursery.cancel_scope.cancel()
        assert closed, "the survivor did not close the run"
        assert handle.status is RunStatus.failed  # the stored end, adopted
        assert (count(mine), count(theirs)) == (0, 1)
    finally:
        await other.aclose()
        await store.aclose()
