"""Found by a review of the agents under faults (2026-12-05); each test failed before its fix (a
promise of the contract or the docs broken; the comments say which): an async tool that shields
itself held its run past the tool timeout and a cancel (now run in an abandonable task of the
supervisor's nursery), a plan's parallel steps overflowed the synthesis together (they now share
one output budget), and the prompts showed tool schemas as Python, not JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from service.backends.base import ChatRequest, ToolCall
from service.runs import RunHandle, RunSpec, RunStatus
from service.runs.committer import FINAL_WRITE_BUDGET
from service.settings import Settings
from service.sim import Reply as SimReply
from service.sim import Simulator
from service.store import MessageStatus, RunEvent
from service.tools import BUILTIN_TOOLS, tool

from .agents.test_agents_on_simulator import sim_env
from .fakes import Env, Reply, ScriptedBackend, supervisor_env
from .servers import running_server

_PLANNER = "Break the user's request"


async def _run(env: Env, content: str, agent: str, **kw: Any) -> tuple[RunHandle, list[RunEvent]]:
    conv = await env.conversation()
    handle = await env.supervisor.start(RunSpec(conv, content, agent=agent, **kw))
    await handle.finished.wait()
    return handle, await env.store.list_run_events(handle.id)


# -- 1. an async tool that shields itself holds the run past every bound -------------------------
#
# An async tool whose code (or a library it calls: an SDK that shields its own flush/close, as
# trio's notes advise for cleanup) sits in a shielded scope cannot be reached by any cancel.
# call_tool awaits it inline, inside the run's task, so neither the tool timeout
# (SERVICE_TOOL_TIMEOUT: "seconds one tool call may take") nor a cancel ("the run ends
# cancelled promptly"), nor the run's deadline, nor a shutdown's drain can end the run: they all
# wait for the tool (a sync tool in the same state is abandoned in its thread; an async one is
# not).


@tool("flush_audit_log", "Flush the audit log to its (here: black-holed) server.",
      {"type": "object", "properties": {}})
async def flush_audit_log() -> str:
    with trio.CancelScope(shield=True):  # "must not be interrupted half-way"
        await trio.sleep(1000)  # its server never answers; the SDK has no timeout of its own
    return "flushed"


async def test_a_shielded_async_tool_is_held_to_the_tool_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    backend = ScriptedBackend([
        Reply("", tool_calls=[ToolCall("c1", "flush_audit_log", {})]),
        Reply("Final Answer: the log could not be flushed"),
    ])
    async with supervisor_env(tmp_path, backend, tools=(*BUILTIN_TOOLS, flush_audit_log),
                              tool_timeout=30) as env:
        start = trio.current_time()
        handle, events = await _run(env, "flush the audit log", "react")
        took = trio.current_time() - start
    (result,) = [e.data for e in events if e.type == "tool.result"]
    # Now: the call takes 1000 s (virtual) and is reported a success, {'output': 'flushed'};
    # the tool timeout of 30 s was never applied (move_on_after cannot cut into a shield).
    assert result.get("error") == "tool flush_audit_log timed out after 30s", result
    assert took <= 30 + 1, took
    assert handle.status is RunStatus.succeeded
    assert handle.final_text == "the log could not be flushed"


async def test_a_cancelled_run_in_a_shielded_async_tool_ends_promptly(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    backend = ScriptedBackend([Reply("", tool_calls=[ToolCall("c1", "flush_audit_log", {})])])
    async with supervisor_env(tmp_path, backend, tools=(*BUILTIN_TOOLS, flush_audit_log),
                              tool_timeout=30) as env:
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, "flush the audit log", agent="react"))
        await trio.sleep(5)  # the tool is running
        handle.cancel("the client cancelled")  # what POST /api/runs/{id}/cancel does (202)
        with trio.move_on_after(FINAL_WRITE_BUDGET):  # "promptly": far less than this
            await handle.finished.wait()
        stored = await env.store.get_run(handle.id)
        reply = (await env.store.get_messages(conv))[-1]
        # Now: 15 s after the cancel was accepted the run is still 'running' in the store, its
        # reply pending, and its clients have had no run.finished; it ends only when the tool
        # returns, 1000 s later (and so does a shutdown's drain: it waits for it unbounded
        # after its grace, past the lifespan's budget, which then closes the store under it).
        assert (stored.status, reply.status) == ("cancelled", MessageStatus.cancelled), (
            stored.status, reply.status)
        assert handle.finished.is_set()


_RELEASE: list[trio.Event] = []  # the test's: lets flush_until_released return


@tool("flush_until_released", "Flush the audit log (until the test lets it).",
      {"type": "object", "properties": {}})
async def flush_until_released() -> str:
    with trio.CancelScope(shield=True):
        await _RELEASE[-1].wait()
    return "flushed"


async def test_a_cancel_over_http_ends_a_run_in_a_shielded_async_tool(settings: Settings) -> None:
    # The same through the real app (the lifespan's runner, hypercorn, the cancel endpoint):
    # the stream ends with the run cancelled while the tool still sits in its shield. (The
    # server's own end would wait for the tool: Python cannot stop a coroutine that shields
    # itself; the test lets it go before leaving.)
    _RELEASE.append(trio.Event())
    conf = settings.model_copy(update={"tools": (__name__,), "tool_timeout": 600.0})
    backend = ScriptedBackend(
        [Reply("", tool_calls=[ToolCall("c1", "flush_until_released", {})])])
    text = ""
    async with running_server(conf, backend) as srv, srv.client() as client:
        conv = (await client.post("/api/conversations", json={})).json()["id"]
        try:
            with trio.fail_after(20):
                async with client.stream("POST", f"/api/conversations/{conv}/messages", json={
                        "content": "flush the audit log", "agent": "react",
                        "stream": True}) as r:
                    async for chunk in r.aiter_text():
                        text += chunk
                        if "event: tool.call" in text and "/cancel" not in text:
                            run_id = text.split('"run_id":"', 1)[1].split('"', 1)[0]
                            cancel = await client.post(f"/api/runs/{run_id}/cancel")
                            assert cancel.status_code == 202
                            text += "/cancel"
            run = (await client.get(f"/api/runs/{run_id}")).json()
            still_held = not _RELEASE[-1].is_set()
        finally:
            _RELEASE[-1].set()
    assert "event: run.finished" in text, text[-500:]
    assert run["status"] == "cancelled", run
    assert still_held  # the run ended while its tool was still in its shield


# -- 2. plan-and-execute: parallel steps' outputs overflow the synthesis together ------------------
#
# The docs: a tool's output reaches the model cut at 16,000 characters, and "the calls of one
# step share those 16,000 (four long pages at once overflowed an 8k context together)". A plan's
# wave of parallel tool steps is the same four pages read at once, but each step's call gets the
# whole 16,000, and the synthesis prompt (SYNTH_PROMPT) lists every step's result uncut: the
# server answers 400, the run fails context_length_exceeded, every step's work is lost (the
# reply stored is empty: planning and steps are quiet).


@tool("read_page", "Read a web page's text.",
      {"type": "object", "properties": {"url": {"type": "string"}}, "required": ["url"]})
async def read_page(url: str) -> str:
    await trio.lowlevel.checkpoint()
    return "lorem " * 200_000  # an ordinary long page: cut to 16,000 characters


FOUR_PAGES = {"steps": [
    {"id": i, "task": f"read page {i}", "tool": "read_page", "arguments": {"url": f"http://x/{i}"}}
    for i in range(1, 5)
]}


async def test_a_plans_parallel_long_outputs_do_not_fail_the_run(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # The demo model's context (8,192 tokens); the question is a few words.
    sim = Simulator(strict_models=False, default=SimReply(text="They agree.", context=8192))
    sim.script(SimReply(text=json.dumps(FOUR_PAGES), context=8192))
    async with sim_env(tmp_path, sim, tools=(*BUILTIN_TOOLS, read_page)) as env:
        handle, events = await _run(env, "compare these four pages", "plan_execute")
    assert sorted(e.data["id"] for e in events if e.type == "step.finished") == [1, 2, 3, 4]
    # Now: failed, [{"type": "context_length_exceeded", "message": "request (10730 tokens)
    # exceeds the available context size (8192 tokens), ...'}], and the reply stored is ''.
    errors = [e.data for e in events if e.type == "error"]
    assert handle.status is RunStatus.succeeded, (handle.status, errors, handle.final_text)
    assert handle.final_text == "They agree."


# -- 3. the planner's (and ReAct's) prompt shows tool schemas as Python, not JSON ------------------
#
# PLAN_SYSTEM says "Reply with JSON only" and the plan fills in each tool's arguments from the
# tool's parameters, which the prompt shows as a Python dict repr: single quotes, True/False/
# None. The model is shown the format it must not write (parse_plan reads JSON only: a plan
# with {'value': 5} arguments is refused and, after the re-ask, replaced by a one-step plan).


@tool("search_docs", "Search the documentation.",
      {"type": "object", "additionalProperties": False,
       "properties": {"query": {"type": "string"}, "exact": {"type": "boolean", "default": True},
                      "section": {"type": ["string", "null"], "default": None}},
       "required": ["query"]})
def search_docs(query: str, exact: bool = True, section: str | None = None) -> str:
    return f"nothing found for {query}"


@pytest.mark.parametrize("agent", ["plan_execute", "react"])
async def test_the_prompts_show_tool_parameters_as_json(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, agent: str
) -> None:
    seen: list[str] = []

    def reply(req: ChatRequest) -> Reply:
        seen.append(req.messages[0].content if req.messages[0].role == "system" else "")
        if seen[-1].startswith(_PLANNER):
            return Reply(json.dumps({"steps": [{"id": 1, "task": "answer"}]}))
        return Reply("Final Answer: ok")

    backend = ScriptedBackend(reply)
    async with supervisor_env(tmp_path, backend, tools=(search_docs,)) as env:
        await _run(env, "where is the install guide?", agent)
    (prompt, *_) = seen
    (shown,) = re.findall(r"- search_docs: Search the documentation\. Parameters: (.*)", prompt)
    # Now: "{'type': 'object', 'additionalProperties': False, 'properties': {'query': {'type':
    # 'string'}, 'exact': {'type': 'boolean', 'default': True}, ...": not JSON.
    assert json.loads(shown) == search_docs.parameters, shown


