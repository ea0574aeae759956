"""An instance renews its lease before it serves a run: the lifespan's renewal may be old (a
model's load came in between), and a survivor elsewhere takes a run of an instance whose
lease has lapsed for a dead one's and closes it (found by a review; failed before the fix)."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from service.agents import make_runner
from service.metrics import Metrics
from service.runs import RunSpec, RunStatus
from service.runs.supervisor import RunSupervisor
from service.store import SQLiteStore
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
