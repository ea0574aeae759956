"""Ollama withholds a tool call until the model has written all of it.

Ollama's ``/api/chat`` streams an answer's text as it is written, but a tool call only once it is
whole (Ollama's issue 11633: one chunk holds the whole call); while the model writes it, nothing
comes. A model writing a long call (a file's content as an argument, on a CPU at a few tokens a
second) is silent for longer than ``SERVICE_LLM_IDLE_TIMEOUT`` (60 s), and the run failed with
``chunk_gap_timeout`` while the model was working. A request that offers Ollama tools now waits
up to ``SERVICE_LLM_TOOL_CALL_TIMEOUT`` (180 s) for a chunk; a request without tools, and
llama.cpp (which streams a call's arguments as they are written), keep the idle bound.

Through the real adapters, the interceptor and the simulator's wire formats, in virtual time
(the simulator in memory, ``mock_transport``, so ``autojump_clock`` can assert exact times).
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
from service.settings import load_settings
from service.sim import Reply, Simulator, mock_transport
from service.store import LLMCallOutcome

from ..fakes import Env, supervisor_env

IDLE, TOOL_CALL = 60.0, 180.0  # the settings' defaults
CALL = {"name": "calculator", "arguments": {"expression": "6*7"}}


@asynccontextmanager
async def _env(tmp_path: Path, sim: Simulator, protocol: str) -> AsyncIterator[Env]:
    budgets = Budgets.from_idle(IDLE, connect=3.0, call=1000.0, tool_call=TOOL_CALL)
    async with make_client(budgets, transport=mock_transport(sim)) as client:
        adapter = (OllamaBackend("ollama", "http://sim", client, budgets) if protocol == "ollama"
                   else OpenAICompatBackend("llamacpp", "http://sim", client, budgets))
        async with supervisor_env(
            tmp_path, lambda store: Interceptor(adapter, store, Metrics()),  # type: ignore[arg-type]
            run_timeout=900.0,
        ) as env:
            yield env


def test_the_settings_defaults() -> None:
    settings = load_settings()
    assert (settings.llm_idle_timeout, settings.llm_tool_call_timeout) == (IDLE, TOOL_CALL)


@pytest.mark.parametrize("text", ["Let me compute that.", ""], ids=["after text", "first"])
async def test_a_tool_call_written_in_silence_past_the_idle_bound_is_waited_for(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, text: str
) -> None:
    """A ReAct run on Ollama: the model writes a tool call for 150 s (2.5 x the idle bound),
    after some text or as its first output. The run succeeds with the tool's result, in 150
    s; both calls are recorded ok."""
    sim = Simulator(strict_models=False)
    sim.script(Reply(text=text, tool_calls=(CALL,), tool_delay=150.0),
               Reply(text="Final Answer: 42"))
    async with _env(tmp_path, sim, "ollama") as env:
        conv = await env.conversation()
        start = trio.current_time()
        handle = await env.supervisor.start(RunSpec(conv, "compute", agent="react"))
        await handle.finished.wait()
        assert handle.status is RunStatus.succeeded, handle.error
        assert trio.current_time() - start == pytest.approx(150.0)
        events = await env.store.list_run_events(handle.id)
        assert [e.data.get("output") for e in events if e.type == "tool.result"] == [42]
        calls = await env.store.list_llm_calls(run_id=handle.id)
        assert [c.outcome for c in calls] == [LLMCallOutcome.ok, LLMCallOutcome.ok]
        assert "tools" in sim.streams[0].body  # the tools were offered


async def test_a_silent_ollama_offered_tools_still_ends_at_the_tool_call_bound(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Offered tools, an Ollama that goes silent for good is given up at 180 s: the run fails
    ``chunk_gap_timeout`` with an error naming the setting, the upstream stream is closed, and
    the call is recorded timed out."""
    sim = Simulator(default=Reply(tokens=5, hang_after=2), strict_models=False)
    async with _env(tmp_path, sim, "ollama") as env:
        conv = await env.conversation()
        start = trio.current_time()
        handle = await env.supervisor.start(RunSpec(conv, "x", agent="react"))
        await handle.finished.wait()
        assert trio.current_time() - start == pytest.approx(TOOL_CALL)
        assert handle.status is RunStatus.failed
        assert handle.error_type == "chunk_gap_timeout"
        assert "SERVICE_LLM_TOOL_CALL_TIMEOUT" in (handle.error or ""), handle.error
        assert sim.streams[0].client_gone
        (call,) = await env.store.list_llm_calls(run_id=handle.id)
        assert call.outcome is LLMCallOutcome.timed_out


@pytest.mark.parametrize(("protocol", "agent"), [("ollama", "chat"), ("openai", "react")],
                         ids=["ollama without tools", "llama.cpp with tools"])
async def test_other_requests_keep_the_idle_bound(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, protocol: str, agent: str
) -> None:
    """Ollama without tools (the chat agent offers none), and llama.cpp with tools (it streams
    a call's arguments as they are written): a silence ends at the idle bound, 60 s, and the
    error does not name the tool-call setting."""
    sim = Simulator(default=Reply(tokens=5, hang_after=2), strict_models=False)
    async with _env(tmp_path, sim, protocol) as env:
        conv = await env.conversation()
        start = trio.current_time()
        handle = await env.supervisor.start(RunSpec(conv, "x", agent=agent))
        await handle.finished.wait()
        assert trio.current_time() - start == pytest.approx(IDLE)
        assert handle.error_type == "chunk_gap_timeout"
        assert "TOOL_CALL" not in (handle.error or "")
        assert ("tools" in sim.streams[0].body) is (agent == "react")


def test_a_longer_idle_bound_is_not_shortened() -> None:
    """A server whose idle bound is already longer (a backends file's ``timeouts.idle``) keeps
    it with tools."""
    budgets = Budgets.from_idle(600.0, tool_call=TOOL_CALL)
    assert budgets.withholding_tool_calls() == budgets
    longer = Budgets.from_idle(IDLE, tool_call=TOOL_CALL).withholding_tool_calls()
    assert (longer.first_chunk, longer.gap, longer.call) == (TOOL_CALL, TOOL_CALL, 600.0)
