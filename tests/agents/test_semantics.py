"""What the agents do with awkward but real model output and /v1 histories (from a review of the
agents' semantics: each test failed before its fix)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio
import trio.testing

from service.agents.auto import classify_by_rule
from service.backends.base import ChatMessage, ChatRequest, ToolCall
from service.runs import RunHandle, RunSpec, RunStatus
from service.settings import Settings
from service.store import RunEvent
from service.tools import BUILTIN_TOOLS

from ..fakes import Env, Reply, ScriptedBackend, supervisor_env
from ..servers import running_server

_PLANNER = "Break the user's request"  # the start of plan_execute's planning prompt


def _system(req: ChatRequest) -> str:
    return req.messages[0].content if req.messages and req.messages[0].role == "system" else ""


def _planner(plans: list[dict[str, Any]], answer: str) -> ScriptedBackend:
    """A model that answers the planning prompt with ``plans`` in turn, anything else with
    ``answer``."""
    queue = iter(plans)

    def reply(req: ChatRequest) -> Reply:
        if _system(req).startswith(_PLANNER):
            return Reply(json.dumps(next(queue)))
        return Reply(answer)

    return ScriptedBackend(reply)


async def _run(env: Env, content: str, agent: str
               ) -> tuple[RunHandle, list[RunEvent]]:
    conv = await env.conversation()
    handle = await env.supervisor.start(RunSpec(conv, content, agent=agent))
    await handle.finished.wait()
    return handle, await env.store.list_run_events(handle.id)


async def _run_v1(env: Env, messages: list[ChatMessage], agent: str
                  ) -> tuple[RunHandle, list[RunEvent]]:
    """A run as /v1 starts one: the client's own history, on a new conversation."""
    question = next((m.content for m in reversed(messages) if m.role == "user"), "")
    spec = RunSpec(conversation_id=None, content=question, agent=agent,
                   messages=tuple(messages),
                   new_conversation={"title": "t", "system": None, "model": None, "agent": agent})
    handle = await env.supervisor.start(spec)
    await handle.finished.wait()
    return handle, await env.store.list_run_events(handle.id)


# -- plan_execute -------------------------------------------------------------------------------


async def test_a_plan_longer_than_max_steps_is_re_asked(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # The prompt says "at most 8 steps" but up to 12 ran.
    long_plan = {"steps": [{"id": i, "task": f"compute {i}", "tool": "calculator",
                            "arguments": {"expression": f"{i}+1"}} for i in range(1, 12)]}
    short_plan = {"steps": long_plan["steps"][:2]}
    async with supervisor_env(tmp_path, _planner([long_plan, short_plan], "done")) as env:
        handle, events = await _run(env, "do things", "plan_execute")
    assert handle.status is RunStatus.succeeded
    assert len([e for e in events if e.type == "step.started"]) == 2
    asked_again = env.backend.streams[1].request.messages[-1].content
    assert "the plan has 11 steps; at most 8" in asked_again


async def test_v1_plan_execute_with_an_empty_question_and_no_plan_still_answers(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # The one-step fallback took the question as its task; an empty one (a /v1 message with
    # only an image) failed the run as an internal error.
    def reply(req: ChatRequest) -> Reply:
        return Reply("no plan, sorry") if _system(req).startswith(_PLANNER) else Reply("answer")

    async with supervisor_env(tmp_path, ScriptedBackend(reply)) as env:
        handle, events = await _run_v1(env, [ChatMessage("user", "")], "plan_execute")
    assert handle.status is RunStatus.succeeded, [e.data for e in events if e.type == "error"]
    (plan,) = [e.data for e in events if e.type == "plan"]
    assert plan["steps"][0]["task"] == "Answer the user's request."


async def test_v1_empty_message_with_plan_execute_is_answered(settings: Settings) -> None:
    backend = ScriptedBackend(lambda req: Reply("not a plan"))
    async with running_server(settings, backend) as srv, srv.client() as client:
        r = await client.post("/v1/chat/completions", json={
            "model": "m", "agent": "plan_execute",
            "messages": [{"role": "user", "content": ""}]})
    assert r.status_code == 200, r.text


async def test_the_question_is_the_users_last_message_not_a_tool_result(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # After a /v1 client's tool round trip the history ends with the tool's result: it was
    # taken for the question, and the synthesis kept a tool call whose result it dropped.
    seen: list[ChatRequest] = []

    def reply(req: ChatRequest) -> Reply:
        if _system(req).startswith(_PLANNER):
            return Reply('{"steps": [{"id": 1, "task": "add", "tool": "calculator", '
                         '"arguments": {"expression": "2+2"}}]}')
        seen.append(req)
        return Reply("It is sunny.")

    history = [ChatMessage("user", "what is the weather in Paris?"),
               ChatMessage("assistant", "", (ToolCall("c1", "weather", {"city": "Paris"}),)),
               ChatMessage("tool", "sunny, 21C", tool_call_id="c1", name="weather")]
    async with supervisor_env(tmp_path, ScriptedBackend(reply)) as env:
        handle, _ = await _run_v1(env, history, "plan_execute")
    assert handle.status is RunStatus.succeeded
    synthesis = seen[-1].messages
    assert "Request: what is the weather in Paris?" in synthesis[-1].content
    calls = {c.id for m in synthesis for c in m.tool_calls}
    results = {m.tool_call_id for m in synthesis if m.role == "tool"}
    assert calls == results == {"c1"}


async def test_a_react_step_that_reaches_its_limit_is_a_failed_step(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Its "could not finish" text counted as the step's result: no re-plan ever followed.
    def reply(req: ChatRequest) -> Reply:
        if _system(req).startswith(_PLANNER):
            return Reply('{"steps": [{"id": 1, "task": "find the thing"}]}')
        if "You have reached the limit" in req.messages[-1].content:
            return Reply('Action: calculator\nAction Input: {"expression": "1/0"}')
        if _system(req).startswith("You can use tools"):
            return Reply('Action: calculator\nAction Input: {"expression": "1/0"}')
        return Reply("summary")

    async with supervisor_env(tmp_path, ScriptedBackend(reply)) as env:
        handle, events = await _run(env, "find the thing", "plan_execute")
    assert handle.status is RunStatus.succeeded
    first = next(e.data for e in events if e.type == "step.finished")
    assert "could not finish" in first["error"]
    assert len([e for e in events if e.type == "plan"]) == 2  # the one re-plan


# -- react --------------------------------------------------------------------------------------


async def test_action_none_before_a_final_answer_is_no_action(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # "Action: None" was called as an unknown tool, step after step, to the limit.
    backend = ScriptedBackend(lambda req: Reply(
        "Thought: I know this.\nAction: None\nFinal Answer: Paris"))
    async with supervisor_env(tmp_path, backend) as env:
        _handle, events = await _run(env, "capital of France?", "react")
    assert events[-2].data["content"] == "Paris"
    assert len(env.backend.streams) == 1


async def test_at_the_step_limit_a_final_answer_after_an_action_is_the_answer(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    def reply(req: ChatRequest) -> Reply:
        if "You have reached the limit" in req.messages[-1].content:
            return Reply('Thought: enough\nAction: calculator\nAction Input: {"expression": "1+1"}'
                         "\nObservation: 2\nFinal Answer: the answer is 2")
        return Reply('Thought: again\nAction: calculator\nAction Input: {"expression": "1+1"}')

    async with supervisor_env(tmp_path, ScriptedBackend(reply)) as env:
        _handle, events = await _run(env, "1+1?", "react")
    assert events[-2].data["content"] == "the answer is 2"


async def test_usage_counts_a_call_that_reported_no_usage(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # A call cut before its usage (or a backend that never reports one) was not counted.
    def reply(req: ChatRequest) -> Reply:
        if len(backend.streams) == 1:
            return Reply('Action: calculator\nAction Input: {"expression": "1+1"}')
        return Reply("Final Answer: slow", gap=5, hang_after=1)

    backend = ScriptedBackend(reply)
    async with supervisor_env(tmp_path, backend) as env:
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, "1+1", agent="react"))
        await env.backend.wait_stream(1)
        await trio.sleep(1)
        handle.cancel("cancelled by request")
        await handle.finished.wait()
        events = await env.store.list_run_events(handle.id)
    assert events[-1].data["usage"]["llm_calls"] == 2


# -- auto ---------------------------------------------------------------------------------------


def test_a_decimal_number_is_not_a_numbered_list() -> None:
    tools = [t.name for t in BUILTIN_TOOLS]
    assert classify_by_rule("3.5 * 2", tools) == "react"
    assert classify_by_rule("convert 10.5 km to miles", tools) == "react"
    assert classify_by_rule("1. find the price\n2. convert it to euros", tools) == "plan_execute"


async def test_re_planned_steps_never_reuse_an_id_of_the_first_plan(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Noticed in review: new ids followed the steps that ran, so a step of the first plan that
    # never ran (listed in its plan event) shared its id with a re-planned one.
    plans = [
        {"steps": [{"id": 1, "task": "break", "tool": "calculator", "arguments": {"x": 1}},
                   {"id": 2, "task": "after", "depends_on": [1]},
                   {"id": 3, "task": "later", "depends_on": [2]}]},
        {"steps": [{"id": 1, "task": "compute", "tool": "calculator",
                    "arguments": {"expression": "2+2"}}]},
    ]
    async with supervisor_env(tmp_path, _planner(plans, "4")) as env:
        handle, events = await _run(env, "compute", "plan_execute")
    assert handle.status is RunStatus.succeeded
    first, second = [e.data["steps"] for e in events if e.type == "plan"]
    assert {s["id"] for s in first} == {1, 2, 3}
    assert [s["id"] for s in second] == [4]
