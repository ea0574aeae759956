"""Review (Dec 06) of a run's lifecycle: the shutdown drain, a deadline against a cancel, and
the count of finished runs. Each test failed on the code it was written against."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import trio
import trio.testing

from service.backends.interceptor import Interceptor
from service.metrics import Metrics
from service.runs import RunHandle, RunSpec, RunStatus
from service.store import SQLiteStore, Store
from service.store.faults import InjectedFault

from ..fakes import Env, Reply, ScriptedBackend, supervisor_env

ELSEWHERE = "999999999:1:another-boot-id:12345:4026531836"  # its lease decides, not its PID


def _slow_first_writes(env: Env, seconds: float) -> None:
    """Each native run's first write (``begin_run``) lands ``seconds`` after it is asked."""
    real = env.store.begin_run

    async def slow_begin_run(*args: Any, **kwargs: Any) -> Any:
        await trio.sleep(seconds)
        return await real(*args, **kwargs)

    env.store.begin_run = slow_begin_run  # type: ignore[method-assign]


async def _drain_while_a_start_is_in_flight(env: Env, conv: str, grace: float) -> RunHandle:
    """Start a run whose first write takes 1 s; the drain (``grace``) begins at 0.5 s."""
    box: list[RunHandle] = []

    async def start() -> None:
        box.append(await env.supervisor.start(RunSpec(conv, "q")))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(start)
        await trio.sleep(0.5)  # its write is in flight (the run was admitted before the drain)
        await env.supervisor.drain(grace)
    return box[0]


async def test_a_run_whose_first_write_lands_during_the_drain_gets_the_drains_grace(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """operations.md: "runs in flight may finish for SERVICE_SHUTDOWN_DRAIN seconds, then the
    rest are cancelled". A run admitted before the drain whose first write lands 0.5 s into a
    10 s grace needs 3 s more: it was cancelled ("shutdown") the moment it launched, because
    the grace only waited for the runs registered when the drain began (none here)."""
    backend = ScriptedBackend([Reply("a b c", gap=1.0)])  # ~3 s once launched
    async with supervisor_env(tmp_path, backend) as env:
        conv = await env.conversation()
        _slow_first_writes(env, 1.0)
        handle = await _drain_while_a_start_is_in_flight(env, conv, grace=10.0)
        run = await env.store.get_run(handle.id)
        assert (handle.status, handle.cancel_reason) == (RunStatus.succeeded, None)
        assert run.status == "succeeded"


async def test_a_run_whose_first_write_lands_during_the_drain_is_told_the_shutdown(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """operations.md: "every live run gets a `shutdown` event". One launched while the drain
    goes on (its write was in flight when it began) got none: only the runs registered when
    the drain began are told."""
    backend = ScriptedBackend([Reply("tick " * 100, gap=1.0)])  # longer than the grace
    async with supervisor_env(tmp_path, backend) as env:
        conv = await env.conversation()
        _slow_first_writes(env, 1.0)
        handle = await _drain_while_a_start_is_in_flight(env, conv, grace=5.0)
        types = [e.type for e in await env.store.list_run_events(handle.id)]
        assert types[-1] == "run.finished"
        assert "shutdown" in types, types


async def test_a_cancel_that_comes_after_the_deadline_fired_does_not_turn_a_timeout_into_a_cancel(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The deadline ends the run at 5 s; its LLM call's record (written shielded, in the
    call's path) takes 2 s on a slow store, and a Stop arrives at 5.5 s while it unwinds.
    ``RunHandle.cancel`` still records its reason (the scope was already cancelled by the
    deadline), so the run was stored ``cancelled`` ("cancelled by request") while its own
    LLM call is stored ``timed_out``: the store contradicts itself, and a client is told a
    409 run_cancelled instead of the 504 run_timeout (docs/api.md) of what ended it."""
    scripted = ScriptedBackend([Reply("x y z", hang_after=1)])  # one token, then silence

    def build(store: Store) -> Interceptor:
        return Interceptor(scripted, store, Metrics())  # records into the store

    async with supervisor_env(tmp_path, build) as env:
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, "q", timeout=5.0))
        await trio.sleep(4.0)

        async def slow_store() -> None:  # each write batch waits 2 s from now on
            await trio.sleep(2.0)

        env.store.faults.before_batch = slow_store
        await trio.sleep(1.5)  # t = 5.5: the deadline fired at 5; the run is unwinding
        assert handle.scope.cancel_called
        assert not handle.closed
        handle.cancel("cancelled by request")  # POST /api/runs/{id}/cancel, after it
        with trio.fail_after(60):
            await handle.finished.wait()
        env.store.faults.clear()
        run = await env.store.get_run(handle.id)
        calls = await env.store.list_llm_calls(run_id=handle.id)
        assert [c.outcome.value for c in calls] == ["timed_out"]
        assert (handle.status, run.status, run.error) == (
            RunStatus.timed_out, "timed_out", "the run's deadline passed")


def _finished_runs(metrics: Metrics) -> float:
    return sum(metrics.registry.get_sample_value("service_runs_total", {"status": s}) or 0
               for s in ("succeeded", "failed", "cancelled", "timed_out"))


async def test_a_run_whose_end_was_kept_for_a_retry_and_closed_by_a_survivor_is_counted_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A run ends while its instance's store refuses writes: its final state is kept for a
    retry (past FINAL_WRITE_BUDGET) but ``_finish`` counts it at once
    (``service_runs_total{status="succeeded"}``). The outage outlasts the lease, a survivor
    closes the run (counting it ``failed``), and the retry then adopts that stored end: summed
    over the instances /metrics says two finished runs for one (and this instance's count
    says ``succeeded`` for a run stored ``failed``). The same double count was fixed for an
    end that was stored at once (tests/runs/test_lease.py)."""
    backend = ScriptedBackend([Reply("a b", gap=1.0)])
    theirs = Metrics()
    other = SQLiteStore(tmp_path / "runs.db", threaded=False, metrics=theirs)  # the survivor
    try:
        async with supervisor_env(tmp_path, backend, process_id=ELSEWHERE) as env:
            await other.open()
            conv = await env.conversation()
            handle = await env.supervisor.start(RunSpec(conv, "q"))
            await trio.sleep(0.5)

            def refuse() -> None:
                raise InjectedFault("disk I/O error")

            env.store.faults.before_commit = refuse  # this instance's store refuses writes
            with trio.fail_after(120):
                await handle.finished.wait()  # its end is kept, to be written again
            assert not handle.final_stored
            # The outage outlasts this instance's lease: the survivor closes its run.
            with sqlite3.connect(tmp_path / "runs.db") as db:
                db.execute("UPDATE instances SET lease_until = 0")
            assert await other.recover_interrupted() == [handle.id]
            env.store.faults.clear()  # writes land again: the kept end is retried
            with trio.fail_after(120):
                while not handle.final_stored:  # noqa: ASYNC110 (the upkeep's retry)
                    await trio.sleep(1.0)
            assert handle.status is RunStatus.failed  # the survivor's end, adopted
            assert _finished_runs(env.metrics) + _finished_runs(theirs) == 1
    finally:
        await other.aclose()
