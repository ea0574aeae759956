"""Runs through the real adapters, the interceptor and the simulator's protocol, in virtual time.

The simulator runs in memory (``mock_transport``) so ``autojump_clock`` can assert exact times;
the adapter, the interceptor (recording into the store) and the wire format are the real ones.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from service.backends import Interceptor, OllamaBackend, OpenAICompatBackend
from service.backends.http import Budgets, make_client
from service.metrics import Metrics
from service.runs import RunSpec, RunStatus
from service.sim import Reply, Simulator, mock_transport
from service.store import LLMCallOutcome, MessageStatus

from ..fakes import Env, supervisor_env
from .test_agents import TOOLS

BUDGETS = Budgets(connect=3.0, first_chunk=30.0, gap=30.0, call=1000.0)


@asynccontextmanager
async def sim_env(
    tmp_path: Path, sim: Simulator, protocol: str = "openai", **kw: object
) -> AsyncIterator[Env]:
    async with make_client(BUDGETS, transport=mock_transport(sim)) as client:
        adapter = (
            OpenAICompatBackend("llamacpp", "http://sim", client, BUDGETS)
            if protocol == "openai" else OllamaBackend("ollama", "http://sim", client, BUDGETS)
        )
        # The interceptor records into the environment's store, as in the app.
        async with supervisor_env(
            tmp_path, lambda store: Interceptor(adapter, store, Metrics()), **kw  # type: ignore[arg-type]
        ) as env:
            yield env


@pytest.mark.parametrize("protocol", ["openai", "ollama"])
async def test_cancel_mid_stream_closes_the_upstream_and_records_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, protocol: str
) -> None:
    sim = Simulator(default=Reply(tokens=20, interval=1.0), strict_models=False)
    async with sim_env(tmp_path, sim, protocol) as env:
        baseline = len(env.supervisor.nursery.child_tasks)
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, "count", model="sim-model"))
        await trio.sleep(5.5)
        at = trio.current_time()
        handle.cancel("client went away")
        await handle.finished.wait()
        assert trio.current_time() == at
        assert handle.status is RunStatus.cancelled
        (record,) = sim.streams
        assert record.client_gone
        assert record.client_gone_at == at
        msgs = await env.store.get_messages(conv)
        assert msgs[1].status is MessageStatus.cancelled
        assert msgs[1].content == "tok0 tok1 tok2 tok3 tok4 tok5 "
        (call,) = await env.store.list_llm_calls(run_id=handle.id)
        assert call.outcome is LLMCallOutcome.cancelled
        assert call.completion_tokens == 6
        await trio.testing.wait_all_tasks_blocked()
        assert len(env.supervisor.nursery.child_tasks) == baseline


async def test_react_with_tool_calls_over_the_wire(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sim = Simulator(strict_models=False)
    sim.script(
        Reply(tool_calls=({"name": "calculator", "arguments": {"expression": "6*7"}},
                          {"name": "slow_lookup", "arguments": {"key": "z"}})),
        Reply(text="Final Answer: 42 and value-of-z"),
    )
    async with sim_env(tmp_path, sim, tools=TOOLS) as env:
        conv = await env.conversation()
        start = trio.current_time()
        handle = await env.supervisor.start(RunSpec(conv, "compute", agent="react"))
        await handle.finished.wait()
        assert handle.status is RunStatus.succeeded
        assert trio.current_time() - start == pytest.approx(10.0)  # slow_lookup's 10 s
        events = await env.store.list_run_events(handle.id)
        outputs = [e.data.get("output") for e in events if e.type == "tool.result"]
        assert outputs == [42, "value-of-z"]
        assert events[-2].data["content"] == "42 and value-of-z"
        calls = await env.store.list_llm_calls(run_id=handle.id)
        assert [c.outcome for c in calls] == [LLMCallOutcome.ok, LLMCallOutcome.ok]


async def test_deadline_closes_the_upstream(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sim = Simulator(default=Reply(tokens=100, first_delay=2.0, interval=3.0),
                    strict_models=False)
    async with sim_env(tmp_path, sim, run_timeout=9.0) as env:
        conv = await env.conversation()
        start = trio.current_time()
        handle = await env.supervisor.start(RunSpec(conv, "x"))
        await handle.finished.wait()
        assert trio.current_time() - start == pytest.approx(9.0)
        assert handle.status is RunStatus.timed_out
        assert sim.streams[0].client_gone
        (call,) = await env.store.list_llm_calls(run_id=handle.id)
        assert call.outcome is LLMCallOutcome.timed_out  # cut by the run's deadline


async def test_upstream_death_fails_the_run_and_keeps_the_partial(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sim = Simulator(default=Reply(tokens=10, interval=1.0, die_after=3), strict_models=False)
    async with sim_env(tmp_path, sim) as env:
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, "x"))
        await handle.finished.wait()
        assert handle.status is RunStatus.failed
        msgs = await env.store.get_messages(conv)
        assert (msgs[1].content, msgs[1].status) == ("tok0 tok1 tok2 ", MessageStatus.error)
        (call,) = await env.store.list_llm_calls(run_id=handle.id)
        assert call.outcome is LLMCallOutcome.error


async def test_silent_upstream_times_out_at_the_idle_budget(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sim = Simulator(default=Reply(tokens=5, hang_after=2), strict_models=False)
    async with sim_env(tmp_path, sim) as env:
        conv = await env.conversation()
        start = trio.current_time()
        handle = await env.supervisor.start(RunSpec(conv, "x"))
        await handle.finished.wait()
        assert trio.current_time() - start == pytest.approx(BUDGETS.gap)
        assert handle.status is RunStatus.failed
        assert handle.error_type == "chunk_gap_timeout"
        (call,) = await env.store.list_llm_calls(run_id=handle.id)
        assert call.outcome is LLMCallOutcome.timed_out


async def test_500_concurrent_runs_through_the_simulator(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sim = Simulator(default=Reply(tokens=6, first_delay=0.5, interval=0.2), strict_models=False)
    async with sim_env(tmp_path, sim) as env:
        convs = [await env.conversation() for _ in range(25)]
        handles = [await env.supervisor.start(RunSpec(convs[i % 25], f"q{i}"))
                   for i in range(500)]
        for h in handles:
            await h.finished.wait()
        assert {h.status for h in handles} == {RunStatus.succeeded}
        assert {h.final_text for h in handles} == {"tok0 tok1 tok2 tok3 tok4 tok5 "}
        assert len(sim.streams) == 500
        assert all(s.completed and not s.client_gone for s in sim.streams)
        calls = await env.store.list_llm_calls(limit=1000)
        assert len(calls) == 500
        assert {c.outcome for c in calls} == {LLMCallOutcome.ok}
        assert env.supervisor.in_flight == 0
