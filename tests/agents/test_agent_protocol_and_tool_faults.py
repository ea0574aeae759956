"""Agents and tools under faults (a review of service/agents and service/tools, 2026-12-04):
each test failed before its fix (the plan under a client's small max_tokens was a strict xfail
until 2026-12-06: the plan now has a token budget of its own)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from service.agents.base import TOOL_OUTPUT_CHARS
from service.backends.base import ChatMessage, ChatRequest, ToolCall
from service.errors import UpstreamBroken
from service.runs import RunHandle, RunSpec, RunStatus
from service.sim import Reply as SimReply
from service.sim import Simulator
from service.store import RunEvent
from service.tools import BUILTIN_TOOLS, tool

from ..fakes import Env, Reply, ScriptedBackend, supervisor_env
from .test_agents_on_simulator import sim_env

_PLANNER = "Break the user's request"


def _system(req: ChatRequest) -> str:
    return req.messages[0].content if req.messages and req.messages[0].role == "system" else ""


async def _run(env: Env, content: str, agent: str, **kw: Any) -> tuple[RunHandle, list[RunEvent]]:
    conv = await env.conversation()
    handle = await env.supervisor.start(RunSpec(conv, content, agent=agent, **kw))
    await handle.finished.wait()
    return handle, await env.store.list_run_events(handle.id)


async def _run_v1(env: Env, question: str, agent: str, **kw: Any
                  ) -> tuple[RunHandle, list[RunEvent]]:
    """A run as /v1 starts one: the client's own history and options, a new conversation."""
    spec = RunSpec(conversation_id=None, content=question, agent=agent,
                   messages=(ChatMessage("user", question),),
                   new_conversation={"title": "t", "system": None, "model": None,
                                     "agent": agent}, **kw)
    handle = await env.supervisor.start(spec)
    await handle.finished.wait()
    return handle, await env.store.list_run_events(handle.id)


# -- 1. a tool's error is not bounded like its output ------------------------------------------


@tool("fetch_page", "Fetch a page (its server answers with a huge error page).",
      {"type": "object", "properties": {"url": {"type": "string"}}, "required": ["url"]})
def fetch_page(url: str) -> str:
    # What an HTTP client's exception often carries: the whole response body.
    raise RuntimeError(f"GET {url} failed: 500\n" + "<html>oops</html>\n" * 60_000)


async def test_a_tools_huge_error_is_cut_like_its_output(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    backend = ScriptedBackend([
        Reply("", tool_calls=[ToolCall("c1", "fetch_page", {"url": "http://x"})]),
        Reply("Final Answer: the page could not be fetched"),
    ])
    async with supervisor_env(tmp_path, backend, tools=(*BUILTIN_TOOLS, fetch_page)) as env:
        handle, events = await _run(env, "fetch x", "react")
    assert handle.status is RunStatus.succeeded
    (result,) = [e.data for e in events if e.type == "tool.result"]
    # Now: the whole 1 MB error goes into the stored event and to the model (which a 1 MB
    # output no longer does: outputs are cut at TOOL_OUTPUT_CHARS).
    assert len(result["error"]) <= TOOL_OUTPUT_CHARS + 200, len(result["error"])
    (sent,) = [m.content for m in backend.streams[1].request.messages if m.role == "tool"]
    assert len(sent) <= TOOL_OUTPUT_CHARS + 200, len(sent)


# -- 2. abandoned sync-tool threads hold the one shared tool limiter: every sync tool stops ----


WEDGED = threading.Event()  # set: the wedged tools return
ENTERED: list[int] = []
_ENTERED_LOCK = threading.Lock()


@tool("fetch_feed", "Fetch a feed (its host black-holes the connection).",
      {"type": "object", "properties": {"n": {"type": "integer"}}}, timeout=1)
def fetch_feed(n: int = 0) -> str:
    with _ENTERED_LOCK:
        ENTERED.append(n)
    WEDGED.wait(60)  # a socket read without a timeout, say
    return "late"


async def test_hung_sync_tools_of_a_finished_run_do_not_disable_every_other_sync_tool(
    tmp_path: Path,
) -> None:
    # User 1's run calls a wedged sync tool 16 times at once (one step) and the user goes
    # away: the run is cancelled, its 16 threads abandoned, and they keep the runner's 16
    # tool-thread tokens until they return (maybe never). User 2 asks for the calculator.
    from service.settings import load_settings

    from ..servers import running_server

    WEDGED.clear()
    ENTERED.clear()
    backend = ScriptedBackend(lambda req: (
        Reply("", tool_calls=[ToolCall(f"f{i}", "fetch_feed", {"n": i}) for i in range(16)])
        if req.messages[-1].content == "read the feeds" else
        Reply("", tool_calls=[ToolCall("c1", "calculator", {"expression": "6*7"})])
        if req.messages[-1].content == "6*7?" else Reply("Final Answer: done")))
    settings = load_settings(db=tmp_path / "s.db", tools=(__name__,), tool_timeout=5)
    try:
        async with running_server(settings, backend) as srv, srv.client() as client:
            conv = (await client.post("/api/conversations", json={})).json()["id"]
            with trio.fail_after(30):
                async with client.stream("POST", f"/api/conversations/{conv}/messages",
                                         json={"content": "read the feeds", "agent": "react",
                                               "stream": True}) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            first = json.loads(line[6:])["run_id"]  # run.started
                            break
                    while len(ENTERED) < 16:  # noqa: ASYNC110 (set by worker threads)
                        await trio.sleep(0.01)
                # The client went away (on_disconnect: cancel): its run ends cancelled.
                while (await client.get(f"/api/runs/{first}")).json()[  # noqa: ASYNC110
                        "status"] != "cancelled":
                    await trio.sleep(0.05)
            other = (await client.post("/api/conversations", json={})).json()["id"]
            with trio.fail_after(60):
                r = await client.post(f"/api/conversations/{other}/messages",
                                      json={"content": "6*7?", "agent": "react"})
                assert r.status_code == 200, r.text
                run_id = r.json()["run"]["id"]
                events = (await client.get(f"/api/runs/{run_id}/events")).text
        results = [json.loads(line[6:]) for line in events.splitlines()
                   if line.startswith("data: ") and '"call_id"' in line and "arguments" not in line]
        # Now: [{"call_id": "c1", "error": "tool calculator timed out after 5s"}]: the
        # calculator never started (no tool thread is free), yet is said to have timed out.
        assert results == [{"call_id": "c1", "output": 42}], results
    finally:
        WEDGED.set()


# -- 3. a /v1 client's max_tokens and stop (for its answer) cut plan_execute's own calls --------


def _honours_limits(text: str, req: ChatRequest) -> Reply:
    """A server's reply: cut at the request's first stop sequence and at ``max_tokens`` (a
    word a token here), as llama.cpp and Ollama do."""
    for s in req.stop:
        if s in text:
            text = text[:text.index(s)]
    words = text.split(" ")
    if req.max_tokens is not None and len(words) > req.max_tokens:
        return Reply(" ".join(words[:req.max_tokens]))
    return Reply(text)


PLAN = {"steps": [
    {"id": 1, "task": "convert 5 km to miles", "tool": "unit_convert",
     "arguments": {"value": 5, "from_unit": "km", "to_unit": "mi"}},
    {"id": 2, "task": "convert 3 kg to pounds", "tool": "unit_convert",
     "arguments": {"value": 3, "from_unit": "kg", "to_unit": "lb"}},
]}


async def test_a_v1_clients_max_tokens_bounds_the_answer_not_the_plan(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    def reply(req: ChatRequest) -> Reply:
        if _system(req).startswith(_PLANNER):
            return _honours_limits(json.dumps(PLAN), req)  # 36 words
        return _honours_limits("5 km is 3.1 mi and 3 kg is 6.6 lb.", req)  # 11 words

    backend = ScriptedBackend(reply)
    async with supervisor_env(tmp_path, backend) as env:
        # A client that wants a short answer: 20 tokens are plenty for it.
        handle, events = await _run_v1(env, "convert 5 km to miles and 3 kg to pounds",
                                       "plan_execute", max_tokens=20)
    assert handle.status is RunStatus.succeeded
    assert handle.final_text == "5 km is 3.1 mi and 3 kg is 6.6 lb."
    # Before: the planning call (never the answer) was cut at the client's 20 tokens, twice
    # (the re-ask too), and the run fell back to a one-step plan: "no valid plan (the plan is
    # not JSON: ...); using one step", and no tool ran.
    plans = [e.data["steps"] for e in events if e.type == "plan"]
    assert [[s["id"] for s in p] for p in plans] == [[1, 2]], plans
    outputs = [e.data.get("output") for e in events if e.type == "tool.result"]
    assert sorted(round(o, 1) for o in outputs) == [3.1, 6.6], outputs  # one wave: any order


async def test_a_v1_clients_stop_sequence_does_not_cut_the_react_protocol(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # A client stops its answer at a blank line (a common stop for a one-paragraph answer).
    def reply(req: ChatRequest) -> Reply:
        if any(m.role == "user" and m.content.startswith("Observation:") for m in req.messages):
            return _honours_limits("Thought: I have it.\n\nFinal Answer: 42", req)
        return _honours_limits(
            'Thought: I should compute it.\n\nAction: calculator\n\n'
            'Action Input: {"expression": "6*7"}', req)

    backend = ScriptedBackend(reply)
    async with supervisor_env(tmp_path, backend) as env:
        handle, events = await _run_v1(env, "what is 6*7?", "react", stop=("\n\n",))
    # Now: every ReAct call is cut at the client's stop: "Thought: I should compute it." is
    # taken for the final answer, no tool runs.
    assert [e.data.get("output") for e in events if e.type == "tool.result"] == [42]
    assert handle.final_text == "42"


async def test_a_v1_clients_stop_sequence_cuts_an_agents_answer(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Not passed to the agent's own calls, the stop still ends the answer, as a model's
    # server would have cut it.
    backend = ScriptedBackend(lambda req: _honours_limits(
        "Thought: easy.\nFinal Answer: 42 is the answer.\n\nA second paragraph.", req))
    async with supervisor_env(tmp_path, backend) as env:
        handle, _ = await _run_v1(env, "what is 6*7?", "react", stop=("\n\n",))
    assert handle.final_text == "42 is the answer."


# -- 4. what the model invents after its action is still sent back as its own turn ---------------


@pytest.mark.parametrize("invented", [
    # Bold labels, which the parser reads (and stops the action's input at) as labels:
    "**Observation:** 381\n**Thought:** I know the answer\n**Final Answer:** 381",
    # A made-up answer without a made-up "Observation:" label first:
    "Thought: that gives 381\nFinal Answer: 381",
])
async def test_an_invented_answer_after_an_action_is_not_fed_back_to_the_model(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, invented: str
) -> None:
    backend = ScriptedBackend([
        Reply('Thought: compute it\nAction: calculator\nAction Input: {"expression": "17*23"}\n'
              + invented),
        Reply("Final Answer: 391"),
    ])
    async with supervisor_env(tmp_path, backend) as env:
        _, events = await _run(env, "17*23?", "react")
    assert [e.data.get("output") for e in events if e.type == "tool.result"] == [391]
    said = [m.content for m in backend.streams[1].request.messages if m.role == "assistant"]
    # Now: the assistant turn sent back still holds "... Final Answer: 381", then comes the
    # real "Observation: 391": the model is shown its own invented result as if it were said
    # (only a plain "Observation:" line is cut, not the labels the parser itself reads).
    assert not any("381" in s for s in said), said


# -- 5. outputs cut one by one still overflow the model's context together ----------------------


@tool("read_page", "Read a web page's text.",
      {"type": "object", "properties": {"url": {"type": "string"}}, "required": ["url"]})
async def read_page(url: str) -> str:
    await trio.lowlevel.checkpoint()
    return "lorem " * 200_000  # an ordinary long page: cut to 16,000 characters


async def test_several_long_tool_outputs_in_one_step_do_not_fail_the_run(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # The demo model's context (8,192 tokens); the question is a few words, and the model
    # reads four pages at once (one step, native parallel calls).
    sim = Simulator(strict_models=False, default=SimReply(text="Final Answer: they agree",
                                                          context=8192))
    sim.script(SimReply(tool_calls=tuple(
        {"name": "read_page", "arguments": {"url": f"http://x/{i}"}} for i in range(4)),
        context=8192))
    async with sim_env(tmp_path, sim, tools=(*BUILTIN_TOOLS, read_page)) as env:
        handle, events = await _run(env, "compare these four pages", "react")
    # Now: each output is cut to 16,000 characters, but the four together (and the loop's
    # messages are never budgeted) exceed the context: the server answers 400 and the run
    # fails context_length_exceeded, the four pages read for nothing.
    errors = [e.data for e in events if e.type == "error"]
    assert handle.status is RunStatus.succeeded, (handle.status, errors)
    assert handle.final_text == "they agree"


# -- 6. a ReAct text-protocol turn cut mid-way is stored as the reply, labels and all -------------


@pytest.mark.parametrize(("turn", "cut_after", "kept"), [
    # Cut while the model writes its action: no answer yet.
    ('Thought: I need to compute it\nAction: calculator\nAction Input: {"expression": "2+2"}',
     7, ""),
    # Cut while it writes its final answer: the answer so far, without the protocol's labels.
    ("Thought: I know it now\nFinal Answer: The answer is four, because two and two", 8,
     "The answer"),
])
async def test_a_react_text_turn_cut_short_does_not_store_the_protocol_as_the_reply(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, turn: str, cut_after: int,
    kept: str,
) -> None:
    backend = ScriptedBackend([Reply(turn, gap=1.0, hang_after=cut_after), Reply("x")])
    async with supervisor_env(tmp_path, backend) as env:
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, "what is 2+2?", agent="react"))
        await backend.wait_stream(0)
        await trio.sleep(cut_after + 5)  # the model has stopped mid-turn
        handle.cancel("client went away")
        await handle.finished.wait()
        assert handle.status is RunStatus.cancelled
        [_, reply] = await env.store.get_messages(conv)
    # Now: the stored (and next turn's) reply is the raw turn so far, e.g. "Thought: I need to
    # compute it\nAction: calculator\nAction Input: " - the protocol text the fix of finished
    # steps (text after the last step event) keeps out of a cut reply, for the turn in flight.
    assert "Thought:" not in reply.content, reply.content
    assert "Action" not in reply.content, reply.content
    assert reply.content.strip() == kept


# -- 7. a tool's exception that cannot be shown as text crashes the run --------------------------


class UpstreamError(Exception):
    """An HTTP library's error whose text reads its response, None when none came."""

    def __init__(self, response: Any) -> None:
        super().__init__()
        self.response = response

    def __str__(self) -> str:
        return f"upstream answered {self.response.status_code}"


@tool("get_quote", "A stock quote.", {"type": "object", "properties": {}})
def get_quote() -> str:
    raise UpstreamError(None)  # the connection failed before any response


async def test_a_tool_error_whose_text_fails_is_still_an_observation(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    backend = ScriptedBackend([Reply("", tool_calls=[ToolCall("c1", "get_quote", {})]),
                               Reply("Final Answer: the quote service is down")])
    async with supervisor_env(tmp_path, backend, tools=(*BUILTIN_TOOLS, get_quote)) as env:
        handle, events = await _run(env, "quote?", "react")
    # Now: str(exc) raises AttributeError inside call_tool's except clause; it escapes, and the
    # run fails "internal error (AttributeError)" instead of the model seeing the tool failed.
    errors = [e.data for e in events if e.type == "error"]
    assert handle.status is RunStatus.succeeded, (handle.status, errors)
    (result,) = [e.data for e in events if e.type == "tool.result"]
    assert result["error"].startswith("UpstreamError")


# -- 8. the planner is asked for tools' arguments without being told their parameters ------------


async def test_the_planner_is_told_the_parameters_it_must_fill(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # PLAN_SYSTEM asks for "arguments" of a tool, but lists tools by name and description only
    # (the ReAct prompt gives each tool's JSON schema). A model that fills in the names it was
    # given, and guesses otherwise, as a model must:
    def reply(req: ChatRequest) -> Reply:
        if _system(req).startswith(_PLANNER):
            told = "from_unit" in _system(req)
            args = ({"value": 5, "from_unit": "km", "to_unit": "mi"} if told
                    else {"value": 5, "from": "km", "to": "mi"})
            return Reply(json.dumps({"steps": [{"id": 1, "task": "convert", "tool":
                                                "unit_convert", "arguments": args}]}))
        return Reply("5 km is about 3.1 miles.")

    backend = ScriptedBackend(reply)
    async with supervisor_env(tmp_path, backend) as env:
        handle, events = await _run(env, "5 km in miles?", "plan_execute")
    assert handle.status is RunStatus.succeeded
    # Now: the planner never saw "from_unit"; its step fails "invalid arguments for
    # unit_convert: arguments: 'from_unit' is a required property", and the re-plan (told
    # no more) fails the same way.
    results = [e.data for e in events if e.type == "tool.result"]
    assert results, events
    assert "output" in results[0], results


# -- 9. an empty Action Input is given to a tool as its one parameter: "" -----------------------


@pytest.mark.parametrize("action", ["Action: current_time\nAction Input:",
                                    "Action: current_time()"])
async def test_an_empty_action_input_calls_the_tool_with_no_arguments(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, action: str
) -> None:
    backend = ScriptedBackend([Reply(f"Thought: I need the time\n{action}"),
                               Reply("Final Answer: it is now")])
    async with supervisor_env(tmp_path, backend) as env:
        _, events = await _run(env, "what time is it?", "react")
    (call,) = [e.data for e in events if e.type == "tool.call"]
    (result,) = [e.data for e in events if e.type == "tool.result"]
    # Now: called with {"timezone": ""} (the empty input fills the tool's only parameter),
    # and fails "ValueError: unknown time zone ''" where its default (UTC) was meant.
    assert call["arguments"] == {}, call
    assert "output" in result, result


# -- 10. a prose answer on the first turn is parsed as a text-protocol action ----------------------


async def test_a_prose_answer_with_an_action_line_on_the_first_turn_is_the_answer(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # The model was offered the tools natively and needed none: it answers in prose at once.
    # (After a native call such prose is the answer; before one, it is parsed as the text
    # protocol.)
    answer = ("Incident summary:\n"
              "- **Cause:** the disk was full (93 GB of logs)\n"
              "- **Action:** rotate the logs daily\n"
              "- **Owner:** ops")
    backend = ScriptedBackend(lambda req: Reply(answer))
    async with supervisor_env(tmp_path, backend) as env:
        handle, events = await _run(env, "write the incident summary", "react")
    calls = [e.data["name"] for e in events if e.type == "tool.call"]
    # Now: 8 calls of an unknown tool named "rotate the logs daily" (the model, told so,
    # answers the same), then the step limit: the stored answer is "I could not finish this
    # within 8 steps." instead of the summary the model wrote 9 times.
    assert calls == [], calls
    assert handle.final_text == answer


# -- 11. re-planned steps never see what the first plan found -----------------------------------


@tool("flaky_fetch", "Fetch a price list (its server is down).",
      {"type": "object", "properties": {}})
def flaky_fetch() -> str:
    raise ConnectionError("price server unreachable")


async def test_a_re_planned_step_is_given_the_results_it_builds_on(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    plans = [
        {"steps": [{"id": 1, "task": "compute the base", "tool": "calculator",
                    "arguments": {"expression": "1200*3"}},
                   {"id": 2, "task": "fetch the prices", "tool": "flaky_fetch",
                    "arguments": {}}]},
        # What is left, building on step 1's result (which the re-plan prompt showed it).
        {"steps": [{"id": 3, "task": "estimate the prices from the base of step 1",
                    "depends_on": [1]}]},
    ]
    step_prompts: list[str] = []

    def reply(req: ChatRequest) -> Reply:
        if _system(req).startswith(_PLANNER):
            replanning = any("A step failed" in m.content for m in req.messages)
            return Reply(json.dumps(plans[1] if replanning else plans[0]))
        last = req.messages[-1].content
        if last.startswith("Do this step:"):
            step_prompts.append(last)
            return Reply("Final Answer: about 4000")
        return Reply("About 4000.")

    backend = ScriptedBackend(reply)
    async with supervisor_env(tmp_path, backend, tools=(*BUILTIN_TOOLS, flaky_fetch)) as env:
        handle, _ = await _run(env, "estimate the prices", "plan_execute")
    assert handle.status is RunStatus.succeeded
    # Now: the re-plan's step naming step 1 is refused ("depends on unknown steps [1]": only
    # the new plan's ids count), re-asked, refused again, and replaced by the one-step
    # fallback, whose prompt holds no result: what step 1 found (3600) never reaches a step
    # of the re-plan, whatever its depends_on.
    assert step_prompts
    assert all("3600" in p for p in step_prompts), step_prompts



# -- 12. a step whose model call fails is a failed step (re-planned), not a failed run ----------


async def test_a_step_whose_model_call_breaks_is_re_planned(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The module's promise: "The first failed step triggers one re-plan". A step's own LLM
    call that breaks mid-answer (the upstream connection lost) failed the whole run: the
    other steps' results, shown to the client in their ``step.finished``, were thrown away
    and the reply stored empty. It is a failed step: re-planned, and answered from what the
    steps found."""
    plans = [
        {"steps": [{"id": 1, "task": "compute the base", "tool": "calculator",
                    "arguments": {"expression": "1200*3"}},
                   {"id": 2, "task": "look up the prices"}]},
        {"steps": [{"id": 3, "task": "estimate the prices", "depends_on": [1]}]},
    ]

    def reply(req: ChatRequest) -> Reply:
        if _system(req).startswith(_PLANNER):
            replanning = any("A step failed" in m.content for m in req.messages)
            return Reply(json.dumps(plans[1] if replanning else plans[0]))
        last = req.messages[-1].content
        if last.startswith("Do this step: look up"):
            return Reply("Thought: I will look it up and", fail_after=3,
                         error=UpstreamBroken("connection lost mid-answer", backend="fake"))
        if last.startswith("Do this step:"):
            return Reply("Final Answer: about 4000")
        return Reply("About 4000, from a base of 3600.")

    backend = ScriptedBackend(reply)
    async with supervisor_env(tmp_path, backend) as env:
        handle, events = await _run(env, "estimate the prices", "plan_execute")
    assert handle.status is RunStatus.succeeded, (handle.status, handle.error)
    assert handle.final_text == "About 4000, from a base of 3600."
    finished = {e.data["id"]: e.data for e in events if e.type == "step.finished"}
    assert "connection lost" in finished[2]["error"], finished
    assert finished[3]["output"] == "about 4000", finished


TOOLS = [fetch_feed]  # what a server of this module's tests loads (SERVICE_TOOLS)
