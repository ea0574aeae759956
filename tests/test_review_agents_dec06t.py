"""Outside behaviour review of the agents (2026-12-06, pass t): ReAct with tools, plan-and-execute
and auto, as a demanding user runs them. Each test fails on the code as reviewed, for the defect
its docstring names (what is wrong, what is right, the root cause)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from service.backends.base import ChatRequest, ToolCall
from service.runs import RunSpec, RunStatus
from service.settings import Settings
from service.sim import Reply as SimReply

from .agents.test_agents import TOOLS
from .e2e import GUARD, e2e
from .fakes import Reply, ScriptedBackend, supervisor_env

# -- 1. a text-protocol action whose JSON object is malformed ----------------------------------


async def test_a_malformed_json_action_input_is_not_run_as_the_tools_text(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A text-protocol turn ``Action: text_stats`` / ``Action Input: {"text": "a b c", }`` (a
    JSON object with a trailing comma: what small models write every day) is run as
    ``text_stats(text='{"text": "a b c", }')``: the tool counts the model's JSON syntax (5
    words, 19 characters) and its ``tool.result`` says ``output``, a success, so the model is
    handed wrong figures with no hint that its input was not read.

    Right: an input that opens a JSON object and is not one is the model's malformed
    arguments: an error observation the model sees (docs/architecture.md: "tool-call arguments
    that are not JSON, is an observation the model sees"), as a native call's malformed
    arguments already are ("the arguments are not a valid JSON object"); or, if repaired, the
    tool gets ``{"text": "a b c"}``. Never the object's source text as a parameter's value.

    Root cause: service/agents/react_parser.py ``_parse_input`` returns the raw text when a
    ``{...}`` input fails ``json`` and ``ast.literal_eval``, and service/agents/base.py
    ``AgentContext.call_tool`` then fills the tool's only parameter with it ("a bare value from
    the text protocol fills a tool's only parameter")."""
    backend = ScriptedBackend([
        Reply('Thought: count the words.\nAction: text_stats\n'
              'Action Input: {"text": "a b c", }'),
        Reply("Thought: done.\nFinal Answer: counted"),
    ])
    with trio.fail_after(60):
        async with supervisor_env(tmp_path, backend, tools=TOOLS) as env:
            handle, events, _ = await env.run_to_end("how many words in 'a b c'?", "react")
    assert handle.status is RunStatus.succeeded
    (result,) = [e.data for e in events if e.type == "tool.result"]
    if "error" not in result:
        assert result["output"]["words"] == 3, (
            f"text_stats ran on the model's JSON source text and reported {result['output']} "
            "as a success")


# -- 2. a nameless native tool call ------------------------------------------------------------


async def test_a_nameless_native_tool_call_is_an_observation_on_llamacpp_too(
    settings: Settings,
) -> None:
    """A model's native tool call with no function name (a malformed action) on a llama.cpp /
    OpenAI-compatible server fails the whole run: 502 ``backend_protocol_error`` "tool call 0
    has no name", the question's answer lost. The same call from an Ollama server is an
    observation (``unknown tool ''``, with the tools listed), the model answers next turn and
    the run succeeds: one model's one slip ends differently by the server it runs on.

    Right: as on Ollama and as an unknown tool name is: a ``tool.call`` and a ``tool.result``
    with an error the model sees, then its next turn (docs/architecture.md: a tool's failure,
    or arguments that are not JSON, "is an observation the model sees, never a crashed run").

    Root cause: service/backends/openai_compat.py, the stream parser's ``_final``: ``if not
    partial.name: raise BackendProtocolError("tool call {index} has no name")``, where the
    Ollama adapter (``_tool_call``) hands the call on with its empty name."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(
            SimReply(text="", tool_calls=({"name": "", "arguments": {"expression": "2+2"}},)),
            SimReply(text="Final Answer: 4"),
        )
        conv = await env.conversation()
        with trio.fail_after(GUARD):
            r = await env.client.post(f"/api/conversations/{conv}/messages",
                                      json={"content": "what is 2+2?", "agent": "react"})
        assert r.status_code == 200, r.text
        run_id = r.json()["run"]["id"]
        events = await env.run_events(run_id)
    results = [e.data for e in events if e.type == "tool.result"]
    assert results, [e.type for e in events]
    assert "error" in results[0], results
    assert r.json()["message"]["content"] == "4"


# -- 3. the step limit's last answer after native tool calls -----------------------------------


async def test_the_step_limits_prose_answer_after_native_calls_is_the_answer(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A model calling tools natively reaches the 8-step limit; asked to answer with what it
    found, it writes a plain Markdown answer in which one bullet reads ``- **Action:** restart
    the server``. The client is streamed that answer token by token, then the ``message`` and
    the stored reply say "I could not finish this within 8 steps." instead: the answer the
    model gave is thrown away, and what the client was shown contradicts what is stored. (Cut
    short at the same point, the run would store the prose: ``answer_so_far(native=True)``.)

    Right: after native tool calls a reply is prose, never parsed for an action
    (docs/architecture.md), at the limit too: the reply is the answer.

    Root cause: service/agents/react.py ``ReActAgent.loop``, the step-limit path:
    ``parse_react(reply.content, final_first=True, ...)`` regardless of ``native``; the bullet
    parses as an action, there is no final answer, and the "could not finish" text replaces
    the reply (the loop's own turns check ``native`` first)."""
    answer = ("Here is what I found:\n- **Action:** restart the server\n"
              "- 1+1 is 2, checked eight times")

    def reply(req: ChatRequest) -> Reply:
        if "reached the limit" in req.messages[-1].content:
            return Reply(answer)
        return Reply("", tool_calls=[ToolCall(f"c{len(req.messages)}", "calculator",
                                              {"expression": "1+1"})])

    backend = ScriptedBackend(reply)
    with trio.fail_after(60):
        async with supervisor_env(tmp_path, backend, tools=TOOLS) as env:
            handle, events, messages = await env.run_to_end("check 1+1 thoroughly", "react")
    assert handle.status is RunStatus.succeeded
    message = next(e.data for e in events if e.type == "message")
    assert message["content"] == answer, message["content"]
    assert messages[1].content == answer


# -- 4. a final answer the model ran on after -------------------------------------------------


async def test_a_final_answer_keeps_none_of_the_protocol_the_model_ran_on_to(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Small models often run on past their ``Final Answer:``, writing the next cycle they
    imagine: ``Final Answer: 4`` then ``Observation: ...``, ``Thought: ...``, ``Action:
    calculator``, ``Action Input: {...}``. The whole run-on is stored and told (``message``) as
    the answer: the user reads protocol labels and a tool call that never ran, and the next
    turn's history gives the model its own protocol as an answer it gave.

    Right: the answer is the final answer's text up to the next protocol label, as the turn
    of an action is cut where the model runs on (``up_to_the_action``: "what a model runs on
    to after it ... never happened"): here ``4``.

    Root cause: service/agents/react_parser.py ``parse_react`` (and ``answer_so_far``) take
    ``text[final_m.end():]``, everything after the label, instead of the section up to the next
    label (``_section``)."""
    backend = ScriptedBackend([Reply(
        "Thought: I know it.\nFinal Answer: 4\nObservation: the user is satisfied\n"
        "Thought: I should double-check\nAction: calculator\n"
        'Action Input: {"expression": "2+2"}')])
    with trio.fail_after(60):
        async with supervisor_env(tmp_path, backend, tools=TOOLS) as env:
            handle, events, messages = await env.run_to_end("what is 2+2?", "react")
    assert handle.status is RunStatus.succeeded
    message = next(e.data for e in events if e.type == "message")
    assert (message["content"], messages[1].content) == ("4", "4"), message["content"]


# -- 5. a tool call cut by a cancel or the run's deadline --------------------------------------


@pytest.mark.parametrize("how", ["cancel", "deadline"])
async def test_a_tool_call_cut_by_a_cancel_or_deadline_has_its_tool_result(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, how: str
) -> None:
    """A ReAct run is cancelled (``POST /api/runs/{id}/cancel``) or reaches its deadline
    (``timeout``) while a tool runs. The tool is stopped and counted (``service_tool_calls``
    ``cancelled``), but the run's events, live and as stored, hold its ``tool.call`` and no
    ``tool.result``: a client pairing calls with results (or replaying
    ``GET /api/runs/{id}/events``) is never told the call ended or how, while the metrics say
    it was cancelled.

    Right: every ``tool.call`` of a run has its ``tool.result`` before ``run.finished``; a cut
    call's says so (``{"call_id", "error": "cancelled"}`` or the like), as a timed-out tool's
    does ("tool X timed out after Ns").

    Root cause: service/agents/base.py ``AgentContext.call_tool``: its ``except
    BaseException`` counts the cancelled call in the metrics and re-raises without emitting the
    call's ``tool.result``."""
    backend = ScriptedBackend([
        Reply("", tool_calls=[ToolCall("c1", "slow_lookup", {"key": "k"})]),
        Reply("Final Answer: never reached"),
    ])
    with trio.fail_after(60):
        async with supervisor_env(tmp_path, backend, tools=TOOLS) as env:
            conv = await env.conversation()
            spec = RunSpec(conv, "look k up", agent="react",
                           timeout=5.0 if how == "deadline" else None)
            handle = await env.supervisor.start(spec)
            if how == "cancel":
                await trio.sleep(5)
                handle.cancel()
            await handle.finished.wait()
            events = await env.store.list_run_events(handle.id)
    assert handle.status is (RunStatus.cancelled if how == "cancel" else RunStatus.timed_out)
    calls = [e.data["call_id"] for e in events if e.type == "tool.call"]
    results = [e.data["call_id"] for e in events if e.type == "tool.result"]
    assert calls == ["c1"], [e.type for e in events]
    assert results == calls, (
        f"tool.call {calls} without a tool.result: {[e.type for e in events]}")


async def test_a_plan_step_cut_by_a_cancel_has_its_step_finished(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The same for a plan's steps (the review's suspicion, shown): a plan-and-execute run
    cancelled while two steps' tools run left two ``step.started`` without a
    ``step.finished``. Each has its end now, and each tool call its result."""
    from .agents.test_agents import _planner

    plan = {"steps": [
        {"id": 1, "task": "look up a", "tool": "slow_lookup", "arguments": {"key": "a"}},
        {"id": 2, "task": "look up b", "tool": "slow_lookup", "arguments": {"key": "b"}},
    ]}
    backend = ScriptedBackend(_planner(plan, synth="never reached"))
    with trio.fail_after(60):
        async with supervisor_env(tmp_path, backend, tools=TOOLS) as env:
            conv = await env.conversation()
            handle = await env.supervisor.start(RunSpec(conv, "get a and b", agent="plan_execute"))
            await trio.sleep(5)  # the steps' tools run (10 s each)
            handle.cancel()
            await handle.finished.wait()
            events = await env.store.list_run_events(handle.id)
    assert handle.status is RunStatus.cancelled
    started = sorted(e.data["id"] for e in events if e.type == "step.started")
    finished = sorted(e.data["id"] for e in events if e.type == "step.finished")
    assert (started, finished) == ([1, 2], [1, 2]), [e.type for e in events]
    calls = sorted(e.data["call_id"] for e in events if e.type == "tool.call")
    results = sorted(e.data["call_id"] for e in events if e.type == "tool.result")
    assert calls == results, [e.type for e in events]
    assert events[-1].type == "run.finished"
