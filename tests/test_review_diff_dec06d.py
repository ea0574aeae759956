"""Review (Dec 06, d) of the diff 34a1789~1..HEAD. Each test asserts the documented behaviour
and failed on the code it was written against."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
import trio.testing

from service.runs import RunHandle, RunSpec

from .fakes import Env, Reply, ScriptedBackend, supervisor_env


def _first_writes_taking(env: Env, delays: list[float]) -> None:
    """The Nth native run's first write (``begin_run``) lands ``delays[N]`` seconds after it
    is asked."""
    real = env.store.begin_run
    queue = list(delays)

    async def slow_begin_run(*args: Any, **kwargs: Any) -> Any:
        await trio.sleep(queue.pop(0))
        return await real(*args, **kwargs)

    env.store.begin_run = slow_begin_run  # type: ignore[method-assign]


async def test_a_run_launched_during_the_drain_is_told_even_while_another_start_is_in_flight(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """docs/operations.md (Shutdown): "every live run gets a `shutdown` event ... one accepted
    just before, whose first write lands during the drain, too: it is told and given what is
    left of the grace". ``RunSupervisor.drain`` calls ``tell()`` only once ``_reserved`` drops
    to 0 (``_starts_done``): two runs admitted before the drain, the first write landing 1 s
    into a 5 s grace and the other's only after the grace, leave the first one running for
    the whole grace untold, and it is then cancelled ("shutdown") without ever having had a
    ``shutdown`` event (the move_on_at fires inside the wait, and no ``tell()`` follows)."""
    backend = ScriptedBackend([Reply("tick " * 100, gap=1.0)] * 2)  # longer than the grace
    async with supervisor_env(tmp_path, backend) as env:
        conv_a = await env.conversation()
        conv_b = await env.conversation()
        _first_writes_taking(env, [1.0, 8.0])  # lands in the grace / after the grace
        box: dict[str, RunHandle] = {}

        async def start(name: str, conv: str) -> None:
            box[name] = await env.supervisor.start(RunSpec(conv, "q"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(start, "a", conv_a)
            await trio.sleep(0.1)
            nursery.start_soon(start, "b", conv_b)
            await trio.sleep(0.4)  # both writes in flight: both runs were admitted
            with trio.fail_after(120):
                await env.supervisor.drain(5.0)
        first = box["a"]
        events = await env.store.list_run_events(first.id)
        types = [e.type for e in events]
        assert types[-1] == "run.finished"
        assert first.cancel_reason == "shutdown"  # it ran through the grace, then was cut
        assert "shutdown" in types, types


def _finished_runs(metrics: Any) -> float:
    return sum(metrics.registry.get_sample_value("service_runs_total", {"status": s}) or 0
               for s in ("succeeded", "failed", "cancelled", "timed_out"))


async def test_a_run_whose_kept_end_finds_its_conversation_deleted_is_still_counted(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """docs/operations.md (Metrics): ``service_runs`` counts finished runs. Since f11069a a run
    whose final state is kept for a retry is counted only when ``retry_final_writes`` stores
    it (``on_stored_late``), and ``_finish`` no longer counts it. When the retry finds the run
    gone (its conversation deleted meanwhile by another worker: ``finish_run`` -> False,
    ``_adopt_stored_end`` -> NotFound -> ``end_gone``), nobody counts it: no survivor closed
    it (the rows are gone), so a run that ran and ended in this process is counted zero times
    on every instance (it was counted once before the change)."""
    from service.store import SQLiteStore
    from service.store.faults import InjectedFault

    backend = ScriptedBackend([Reply("a b", gap=1.0)])
    other = SQLiteStore(tmp_path / "runs.db", threaded=False)  # another worker's view
    try:
        async with supervisor_env(tmp_path, backend) as env:
            await other.open()
            conv = await env.conversation()
            handle = await env.supervisor.start(RunSpec(conv, "q"))
            await trio.sleep(0.5)

            def refuse() -> None:
                raise InjectedFault("disk I/O error")

            env.store.faults.before_commit = refuse  # this worker's writes are refused
            with trio.fail_after(120):
                await handle.finished.wait()  # its end is kept, to be written again
            assert not handle.final_stored
            await other.delete_conversation(conv)  # deleted on another worker meanwhile
            env.store.faults.clear()  # writes land again: the kept end is retried
            with trio.fail_after(120):
                while not handle.final_stored:  # noqa: ASYNC110 (the upkeep's retry)
                    await trio.sleep(1.0)
            assert env.supervisor.unstored == 0
            assert _finished_runs(env.metrics) == 1
    finally:
        await other.aclose()
