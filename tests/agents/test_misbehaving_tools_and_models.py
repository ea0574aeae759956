"""What the agents do when tools and models misbehave: an expression that would compute for
hours, a result too large, sync tools past their timeout, a tool raising SystemExit, deeply nested
or non-JSON arguments, the step limit reached (found in review, 2026-12-01: each test failed
before its fix)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from service.agents import AgentContext
from service.backends.base import ChatRequest, ToolCall
from service.metrics import Metrics
from service.runs import RunSpec, RunStatus
from service.store import SQLiteStore
from service.tools import BUILTIN_TOOLS, ToolRegistry, tool

from ..fakes import Reply, ScriptedBackend, supervisor_env
from ..servers import ROOT


class _Handle:
    id = "run_x"

    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def emit(self, type_: str, data: dict) -> None:
        self.events.append((type_, data))


def _ctx(tools, nursery) -> AgentContext:  # real worker threads (the production run_sync)
    return AgentContext(handle=_Handle(), backend=None, tools=ToolRegistry(tools),  # type: ignore[arg-type]
                        history=[], nursery=nursery, metrics=Metrics())


async def _run(env, content: str, agent: str):  # type: ignore[no-untyped-def]
    conv = await env.conversation()
    handle = await env.supervisor.start(RunSpec(conv, content, agent=agent))
    await handle.finished.wait()
    return handle, await env.store.list_run_events(handle.id)


# 1. calculator: a 20-character expression computes for hours / hundreds of MB -----------------

def test_calculator_chained_powers_are_refused() -> None:
    # In a child process, so that a regression fails the test instead of hanging it for hours
    # (the 60 s bound is a hang guard, not a speed requirement: the refusal takes microseconds).
    code = ("from service.tools import calculate\n"
            "try: calculate('((9**999)**999)**999')\n"
            "except ValueError as e: print(e)\n")
    try:
        out = subprocess.run([sys.executable, "-c", code], timeout=60, check=True,
                             capture_output=True, text=True,
                             env={"PYTHONPATH": str(ROOT)}).stdout
    except subprocess.TimeoutExpired:
        pytest.fail("calculate('((9**999)**999)**999') still computing after 60 s")
    assert out.strip() == "result too large"


async def test_a_calculator_result_too_large_is_an_observation() -> None:
    # Big-integer arithmetic holds the GIL: in its "abandoned" thread it froze the whole event
    # loop (measured 7 s for ((9**999)**999)**10), and the tool's timeout could not fire.
    async with trio.open_nursery() as nursery:
        ctx = _ctx(BUILTIN_TOOLS, nursery)
        obs = await ctx.call_tool("calculator", {"expression": "((9**999)**999)**10"}, "c1")
    assert obs.error is not None
    assert "too large" in obs.error


# 3. abandoned sync-tool threads keep trio's default thread limiter token until they end; the
#    store uses the same limiter, so 40 hung sync tools stop every store read/write.

RELEASE = threading.Event()
RETURNED: list[int] = []  # one item per blocking tool thread that has returned


@tool("blocking", "A sync tool that blocks (a slow HTTP call, say).",
      {"type": "object", "properties": {}}, timeout=0.05)
def blocking() -> str:
    RELEASE.wait(30)
    RETURNED.append(1)
    return "late"


async def test_timed_out_sync_tools_do_not_starve_the_store(tmp_path: Path) -> None:
    # Abandoned sync-tool threads kept trio's default limiter tokens until they returned, and
    # the store used the same limiter: 40 hung tools stopped every store read and write.
    RELEASE.clear()
    RETURNED.clear()
    store = SQLiteStore(tmp_path / "s.db")  # threaded, as in production
    await store.open()
    try:
        async with trio.open_nursery() as nursery:
            ctx = _ctx([blocking], nursery)
            obs = []
            for step in range(3):  # 48 hung threads: 16 a step (the most one step runs)
                obs += await ctx.call_tools_parallel(
                    [ToolCall(f"c{step}-{i}", "blocking", {}) for i in range(16)])
            assert len(obs) == 48
            assert all(o.error and "timed out" in o.error for o in obs)  # as promised
            await store.create_conversation(title="after the tools timed out")
            assert RETURNED == []  # the write did not wait for a hung tool's thread to end
            RELEASE.set()
    finally:
        RELEASE.set()
        await store.aclose()


# 4. malformed model output: deeply nested JSON crashes the run (RecursionError escapes the
#    parsers, which only catch JSONDecodeError) instead of an observation / re-ask.

DEEP = '{"expression": ' + "[" * 5000


async def test_react_deeply_nested_action_input_is_not_a_crash(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    backend = ScriptedBackend([
        Reply(f"Thought: go\nAction: calculator\nAction Input: {DEEP}", chunks=1),
        Reply("Final Answer: could not parse that"),
    ])
    async with supervisor_env(tmp_path, backend) as env:
        handle, events = await _run(env, "2+2?", "react")
        errs = [e.data for e in events if e.type == "error"]
        assert handle.status is RunStatus.succeeded, (handle.status, errs)


async def test_plan_deeply_nested_json_is_re_asked_not_a_crash(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    def reply(req: ChatRequest) -> Reply:
        if req.messages[0].content.startswith("Break the user's request"):
            return Reply('{"steps": ' + "[" * 5000, chunks=1)
        return Reply("Final Answer: fine")

    async with supervisor_env(tmp_path, ScriptedBackend(reply)) as env:
        handle, events = await _run(env, "do things", "plan_execute")
        errs = [e.data for e in events if e.type == "error"]
        assert handle.status is RunStatus.succeeded, (handle.status, errs)


# 5. NaN/Infinity in model-written arguments reach tool.call (and plan) events as bare NaN:
#    not JSON (JSON.parse in a browser rejects the SSE frame).

async def test_tool_call_event_is_strict_json(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    backend = ScriptedBackend([
        Reply('Action: unit_convert\nAction Input: {"value": NaN, "from_unit": "m", '
              '"to_unit": "km"}', chunks=1),
        Reply("Final Answer: ok"),
    ])
    async with supervisor_env(tmp_path, backend) as env:
        _, events = await _run(env, "convert", "react")

        def refuse(constant: str) -> None:
            raise ValueError(f"not JSON: {constant}")

        for e in events:
            json.loads(e.raw, parse_constant=refuse)  # strict JSON: no NaN / Infinity
        (call,) = [e for e in events if e.type == "tool.call"]
        assert call.data["arguments"]["value"] == "nan"


# 6. step limit: a model that still answers with an Action gets its raw protocol text (or "")
#    stored as the final answer.

async def test_step_limit_answer_is_not_raw_protocol_text(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    stubborn = 'Thought: more\nAction: calculator\nAction Input: {"expression": "1+1"}'
    backend = ScriptedBackend(lambda req: Reply(stubborn))
    async with supervisor_env(tmp_path, backend) as env:
        _, events = await _run(env, "loop", "react")
        answer = events[-2].data["content"]
        assert "Action Input:" not in answer, answer
        assert answer.startswith("I could not finish this within 8 steps.")


@pytest.mark.parametrize("last", ["Final Answer:", "Thought: I am done\nFinal Answer:"])
async def test_an_empty_final_answer_at_the_step_limit_is_not_stored_as_the_answer(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, last: str
) -> None:
    stubborn = 'Thought: more\nAction: calculator\nAction Input: {"expression": "1+1"}'
    replies = iter([stubborn] * 8 + [last])
    backend = ScriptedBackend(lambda req: Reply(next(replies)))
    async with supervisor_env(tmp_path, backend) as env:
        _, events = await _run(env, "loop", "react")
        answer = events[-2].data["content"]
        assert answer.startswith("I could not finish this within 8 steps.")


@pytest.mark.parametrize("expression", ["16**1000", "17**1000", "1024**400", "100**600",
                                        "2**1000 * 2**1000", "10**300 + 1"])
def test_the_calculator_bound_allows_results_that_fit(expression: str) -> None:
    from service.tools import calculate

    assert isinstance(calculate(expression), int)


def test_strict_json_writes_keys_as_json_does() -> None:
    from service.store.records import RunEvent, strict_json

    assert strict_json({True: float("nan"), None: 1, 1.5: [float("inf")], "a": (1, 2)}) == {
        "true": "nan", "null": 1, "1.5": ["inf"], "a": [1, 2]}
    event = RunEvent.make("r", 1, "tool.result", {"output": {"x": float("-inf")}}, 0.0)
    assert json.loads(event.raw) == {"output": {"x": "-inf"}}


async def test_native_tool_arguments_that_are_not_json_are_an_observation(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # The whole run failed with a protocol error; the model now sees what was wrong and can
    # correct itself (small local models write broken JSON now and then).
    backend = ScriptedBackend([
        Reply("", tool_calls=[ToolCall("c1", "calculator", {}, invalid_arguments="{expr: 2+2")]),
        Reply("", tool_calls=[ToolCall("c2", "calculator", {"expression": "2+2"})]),
        Reply("Final Answer: 4"),
    ])
    async with supervisor_env(tmp_path, backend) as env:
        handle, events = await _run(env, "2+2?", "react")
        assert handle.status is RunStatus.succeeded
        results = [e.data for e in events if e.type == "tool.result"]
        assert results[0]["call_id"] == "c1"
        assert "not a valid JSON object" in results[0]["error"]
        assert results[1] == {"call_id": "c2", "output": 4}
        assert handle.final_text == "4"
        # The model was told, in the tool message of its next turn.
        second = backend.streams[1].request.messages
        assert any(m.role == "tool" and "not a valid JSON object" in m.content for m in second)


@tool("cli_tool", "Parses its input like a command line (argparse exits on bad input).",
      {"type": "object", "properties": {}})
def _cli_tool() -> str:
    raise SystemExit(2)  # what argparse and click do with bad arguments


async def test_a_tool_raising_systemexit_is_an_observation(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Found in review: SystemExit is not an Exception; it went past the tool runner, ended the
    # run as a "shutdown" and then the supervisor itself: every later run was a 500.
    backend = ScriptedBackend([Reply("", tool_calls=[ToolCall("c1", "cli_tool", {})]),
                               Reply("Final Answer: the tool failed"), Reply("still here")])
    async with supervisor_env(tmp_path, backend, tools=(*BUILTIN_TOOLS, _cli_tool)) as env:
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, "go", agent="react"))
        await handle.finished.wait()
        assert handle.status is RunStatus.succeeded
        (result,) = [e.data for e in await env.store.list_run_events(handle.id)
                     if e.type == "tool.result"]
        assert result == {"call_id": "c1", "error": "SystemExit: 2"}
        # The model saw the failure as its observation.
        assert "SystemExit: 2" in str(env.backend.streams[1].request.messages[-1].content)
        after = await env.supervisor.start(RunSpec(conv, "again"))
        await after.finished.wait()
        assert after.status is RunStatus.succeeded
        assert env.supervisor.failure is None


@tool("slow_lookup", "Looks something up, slowly.", {"type": "object", "properties": {}})
async def _slow_lookup() -> str:
    await trio.sleep(3600)
    return "found"


async def test_a_tool_call_cut_by_a_cancel_is_counted(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Found in review: the cancellation went past the tool runner's except clauses and the
    # call was never counted in service_tool_calls_total.
    backend = ScriptedBackend([Reply("", tool_calls=[ToolCall("c1", "slow_lookup", {})])])
    async with supervisor_env(tmp_path, backend, tools=(*BUILTIN_TOOLS, _slow_lookup)) as env:
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, "go", agent="react"))
        await trio.sleep(5)  # inside the tool (its timeout is 30 s)
        handle.cancel("cancelled by request")
        await handle.finished.wait()
        assert handle.status is RunStatus.cancelled
        sample = env.metrics.registry.get_sample_value
        assert sample("service_tool_calls_total",
                      {"tool": "slow_lookup", "outcome": "cancelled"}) == 1
