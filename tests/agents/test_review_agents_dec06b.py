"""Review of the agents and tools (2026-12-06, second pass): each test fails on the code as
reviewed, for the defect its docstring names."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import trio
import trio.testing

from service.backends.base import ChatChunk, ChatRequest, ToolCall
from service.errors import ContextLengthExceeded
from service.runs import RunSpec, RunStatus
from service.text import not_text_at
from service.tools import tool

from ..fakes import Reply, ScriptedBackend, supervisor_env
from .test_agents import TOOLS

# A model's JSON escapes: valid JSON, but NUL and a lone surrogate once decoded (the turn's
# text itself is clean: the escapes are plain ASCII in it).
ESCAPED = r"caf\u00e9 \u0000 \ud83d end"


async def test_a_text_protocol_actions_input_puts_no_nul_or_lone_surrogate_in_its_events(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A text-protocol turn ``Action Input: {"text": "caf\\u00e9 \\u0000 \\ud83d end"}`` (JSON
    escapes, what a model writes quoting binary or emoji-cut text) is decoded by
    ``_parse_input`` (service/agents/react_parser.py) into a NUL and a lone surrogate, and
    ``call_tool`` (service/agents/base.py) emits them as the ``tool.call`` event's
    ``arguments`` as they are: the event is stored and sent with ``\\u0000``/``\\ud83d``. A
    native call's arguments are cleaned (``_unicode_call``), and a tool's output is
    (tests/test_v1_and_tool_text_regressions.py: "a tool's NUL and lone surrogates reach no
    client and no event"); the text protocol's are not. Expected: no event of the run holds
    what is not text."""
    backend = ScriptedBackend([
        Reply('Thought: count it.\nAction: text_stats\nAction Input: {"text": "' + ESCAPED
              + '"}'),
        Reply("Thought: done.\nFinal Answer: counted"),
    ])
    with trio.fail_after(60):
        async with supervisor_env(tmp_path, backend, tools=TOOLS) as env:
            handle, events, _messages = await env.run_to_end("count this", "react")
    assert handle.status is RunStatus.succeeded
    calls = [e.data for e in events if e.type == "tool.call"]
    assert [c["name"] for c in calls] == ["text_stats"], calls
    bad = [(e.type, not_text_at(e.data)) for e in events if not_text_at(e.data) is not None]
    assert not bad, f"events hold what is not text: {bad}"


async def test_an_answer_given_as_an_actions_json_input_is_stored_and_told_alike(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """``Action: Final Answer`` / ``Action Input: {"answer": "...\\u0000 \\ud83d..."}`` is the
    answer (``parse_react``'s answer action); its JSON escapes decode to a NUL and a lone
    surrogate, which ``ReActAgent.run`` returns as they are. The store cleans the reply
    (``complete_run``: U+FFFD), but the ``message`` event (service/runs/supervisor.py
    ``_finish``: ``"content": answer``) carries the raw text: the client is told an answer
    the store does not hold (API.md: "What a client is told is what the store says";
    docs/architecture.md: a token reaches a subscriber only as it is in the store), and the
    event holds what is not text. Expected: the ``message`` event's content is the stored
    reply, text only."""
    backend = ScriptedBackend([Reply(
        'Thought: I know it.\nAction: Final Answer\nAction Input: {"answer": "' + ESCAPED
        + '"}')])
    with trio.fail_after(60):
        async with supervisor_env(tmp_path, backend, tools=TOOLS) as env:
            handle, events, messages = await env.run_to_end("say it", "react")
    assert handle.status is RunStatus.succeeded
    message = next(e.data for e in events if e.type == "message")
    assert not_text_at(message) is None, repr(message["content"])
    assert message["content"] == messages[1].content, (message["content"], messages[1].content)


class _LengthBackend(ScriptedBackend):
    """Every answer ends ``finish_reason: "length"`` (the model ran on to ``max_tokens``)."""

    @asynccontextmanager
    async def stream(self, request):  # type: ignore[no-untyped-def,override]
        async with super().stream(request) as chunks:
            yield _AtLength(chunks)


class _AtLength:
    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self._inner = inner

    def __aiter__(self) -> _AtLength:
        return self

    async def __anext__(self) -> ChatChunk:
        chunk = await self._inner.__anext__()
        if chunk.finish_reason is not None:
            chunk = replace(chunk, finish_reason="length")
        return chunk


def _routes_to_chat(req: ChatRequest) -> Reply:
    if req.messages[0].content.startswith("Decide how to handle"):
        return Reply("chat")
    return Reply("42\n\nAnd now a long digression that runs on until the token limit")


async def test_auto_routed_to_chat_an_answer_cut_at_the_clients_stop_finishes_stop(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """``agent: auto`` with a client's ``stop``: ``make_runner`` (service/agents/__init__.py)
    sends the stop sequences upstream only when the run's agent is ``chat``, so under ``auto``
    (which hands the run to ``chat``) the model runs past them to ``max_tokens`` (its call
    ends ``length``) and the answer is cut at the stop afterwards. The fix of the same defect
    for the other agents (``result_extra.setdefault("finish_reason", "stop")``) does nothing
    here: ``ChatAgent.run`` has already set ``finish_reason`` to its call's ``length``. The
    client gets an answer that ended at its stop sequence reported as cut by ``max_tokens``
    (docs/architecture.md: "an answer they cut ends finish_reason: \\"stop\\""; OpenAI SDKs
    raise ``LengthFinishReasonError`` on ``length``). Expected: ``"42"``, ``stop``."""
    backend = _LengthBackend(_routes_to_chat)
    with trio.fail_after(60):
        async with supervisor_env(tmp_path, backend, tools=TOOLS) as env:
            conv = await env.conversation()
            handle = await env.supervisor.start(
                RunSpec(conv, "hi there", agent="auto", stop=("\n\n",), max_tokens=40))
            await handle.finished.wait()
            events = await env.store.list_run_events(handle.id)
    assert handle.status is RunStatus.succeeded
    assert [e.data["agent"] for e in events if e.type == "decision"] == ["chat"]
    message = next(e.data for e in events if e.type == "message")
    assert message["content"] == "42"
    assert message["finish_reason"] == "stop", message


async def test_a_plans_json_escapes_put_no_nul_or_lone_surrogate_in_its_events(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A plan is JSON, and a model's JSON may carry ``\\u0000`` or half of a surrogate pair
    (an emoji cut in two) in a step's ``task`` or ``arguments``: ``parse_plan``
    (service/agents/plan_execute.py) decodes them into a NUL and a lone surrogate, and the
    ``plan`` and ``step.started`` events (``execute``, ``_run_step``) and the step's
    ``tool.call`` carry them as they are, stored and sent as ``\\u0000``/``\\ud83d``. Every
    other path cleans what is not text before an event (a model's tokens and native tool
    calls, a tool's output: tests/test_v1_and_tool_text_regressions.py "reach no client and
    no event"). Expected: no event of the run holds what is not text (the step itself runs:
    U+FFFD in place of each)."""
    plan = ('{"steps": [{"id": 1, "task": "count the words of the note \\u0000", '
            '"tool": "text_stats", "arguments": {"text": "' + ESCAPED + '"}}]}')

    def script(req: ChatRequest) -> Reply:
        if req.messages[0].content.startswith("Break the user's request"):
            return Reply(plan)
        return Reply("It has 4 words.")

    with trio.fail_after(60):
        async with supervisor_env(tmp_path, ScriptedBackend(script), tools=TOOLS) as env:
            handle, events, _messages = await env.run_to_end("count the note's words",
                                                               "plan_execute")
    assert handle.status is RunStatus.succeeded
    assert [e.data["name"] for e in events if e.type == "tool.call"] == ["text_stats"]
    bad = [(e.type, not_text_at(e.data)) for e in events if not_text_at(e.data) is not None]
    assert not bad, f"events hold what is not text: {bad}"


@tool("async_sdk_lookup", "Look a key up through an asyncio SDK (run to completion).",
      {"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]})
def async_sdk_lookup(key: str) -> str:
    async def request() -> str:
        await asyncio.sleep(1)
        return key

    async def lookup() -> tuple[str, str]:
        # The SDK gathers its requests; one is cancelled under it (a closed session, its own
        # timeout): gather, and then asyncio.run, raise asyncio.CancelledError, a
        # BaseException.
        one = asyncio.ensure_future(request())
        asyncio.get_running_loop().call_soon(one.cancel)
        return await asyncio.gather(one, request())

    return asyncio.run(lookup())[0]


async def test_a_sync_tool_raising_asyncios_cancelled_error_is_an_observation(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A sync tool that wraps an asyncio SDK with ``asyncio.run`` raises
    ``asyncio.CancelledError`` when a request the SDK gathers is cancelled under it (the
    exception ``asyncio.gather`` raises, and ``asyncio.run`` passes on): a ``BaseException``,
    but no cancellation of this run (the run's own is ``trio.Cancelled``) and no interrupt of
    the process. ``call_tool`` (service/agents/base.py) turns ``Exception`` and
    ``SystemExit`` into observations and re-raises any other ``BaseException`` as if the run
    were cancelled (counting the call ``cancelled``): the whole run fails
    ``internal_error``, every other tool result and the model's answer lost, and its events
    show a ``tool.call`` that never gets its ``tool.result``. docs/architecture.md: "A tool's
    failure or timeout ... is an observation the model sees, never a crashed run" (the
    SystemExit case was fixed for that very reason). Expected: an error ``tool.result``, and
    the run goes on to the model's answer."""
    backend = ScriptedBackend([
        Reply("", tool_calls=[ToolCall("c1", "async_sdk_lookup", {"key": "k"})]),
        Reply("The lookup failed; I cannot tell."),
    ])
    with trio.fail_after(60):
        async with supervisor_env(tmp_path, backend, tools=(*TOOLS, async_sdk_lookup)) as env:
            handle, events, messages = await env.run_to_end("look k up", "react")
    assert handle.status is RunStatus.succeeded, (handle.status, handle.error)
    results = [e.data for e in events if e.type == "tool.result"]
    assert len(results) == 1, results
    assert "error" in results[0], results
    assert messages[1].content == "The lookup failed; I cannot tell."


@pytest.mark.parametrize("action", [
    'Action: [calculator]\nAction Input: {"expression": "6*7"}',
    "Action: calculator[6*7]",
], ids=["bracketed-name", "paper-syntax"])
async def test_a_text_protocol_action_naming_its_tool_in_brackets_calls_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, action: str
) -> None:
    """The ReAct system prompt (service/agents/react.py ``REACT_SYSTEM``) shows the action's
    slot as ``Action: the tool name, one of [calculator, current_time, ...]``, and models copy
    the brackets: ``Action: [calculator]``; models tuned on the ReAct paper's traces write its
    own syntax, the input in brackets: ``Action: calculator[6*7]`` (Yao et al. 2022:
    ``Search[Colorado orogeny]``). ``parse_react`` (service/agents/react_parser.py) strips
    the decorations models put around a name (backticks, quotes, ``*``) and reads
    ``calculator(6*7)``, but neither of these: the call goes to a tool named
    ``[calculator]`` or ``calculator[6*7]``, "unknown tool", a step of the run's eight wasted
    (in a plan's four-step loop, a failed step). The parser's docstring: "Real models drift
    ... The parser accepts all of that". Expected: the calculator is called with 6*7."""
    backend = ScriptedBackend([
        Reply("Thought: I need to multiply.\n" + action),
        Reply("Thought: done.\nFinal Answer: 42"),
    ])
    with trio.fail_after(60):
        async with supervisor_env(tmp_path, backend, tools=TOOLS) as env:
            handle, events, _messages = await env.run_to_end("what is 6*7?", "react")
    assert handle.status is RunStatus.succeeded
    calls = [e.data["name"] for e in events if e.type == "tool.call"]
    assert calls == ["calculator"], calls
    assert [e.data.get("output") for e in events if e.type == "tool.result"] == [42]


CONTEXT_CHARS = 30_000  # the model's context, in characters here


def _plan_of_many_steps(room: int) -> str:
    """A plan that runs on, step after step, until the context is full (a small model in a
    repetition loop; its server stops it there, ``finish_reason: "length"``)."""
    steps: list[str] = []
    i = 1
    while True:
        step = json.dumps({"id": i, "task": f"check item {i}", "depends_on": []})
        if len('{"steps": [' + ", ".join([*steps, step])) > room:
            return '{"steps": [' + ", ".join(steps)
        steps.append(step)
        i += 1


def _context_bound_model(req: ChatRequest) -> Reply:
    """A model server with a context of ``CONTEXT_CHARS``: a longer prompt is refused (400
    ``context_length_exceeded``, as llama.cpp answers it), and an answer stops where the
    context is full."""
    size = sum(len(m.content) for m in req.messages)
    if size > CONTEXT_CHARS:
        return Reply(fail_after=0, error=ContextLengthExceeded(
            f"the request ({size} characters) exceeds the available context size "
            f"({CONTEXT_CHARS})", backend="fake"))
    if req.messages[0].content.startswith("Break the user's request"):
        if not any(m.role == "assistant" for m in req.messages):
            return Reply(_plan_of_many_steps(CONTEXT_CHARS - size), chunks=1)
        return Reply('{"steps": [{"id": 1, "task": "check the items"}]}', chunks=1)
    return Reply("All items checked: none is missing.")


async def test_a_runaway_plan_cut_at_the_context_does_not_fail_the_run(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A plan of hundreds of steps (a small model repeating itself until its context is full,
    where its server stops it) is invalid (cut mid-JSON; and far over the 8 steps
    ``PlanExecuteAgent._parse`` allows), so ``make_plan``
    (service/agents/plan_execute.py) re-asks, sending the whole invalid reply back to the
    model (``messages += [reply, ...]``): a prompt as long as the full context plus the
    re-ask, which the model's server refuses (400 ``context_length_exceeded``). That error
    escapes ``make_plan`` and the run fails, where docs/architecture.md promises a
    "validated JSON plan, re-asked once" and the module docstring "an invalid plan is
    re-asked once with the error, then falls back to a one-step plan". Expected: the run
    answers (re-asked without the runaway text, or on one step)."""
    with trio.fail_after(60):
        async with supervisor_env(tmp_path, ScriptedBackend(_context_bound_model),
                                  tools=TOOLS) as env:
            handle, _events, messages = await env.run_to_end("check every item of my list",
                                                             "plan_execute")
    assert handle.status is RunStatus.succeeded, (handle.status, handle.error)
    assert messages[1].content == "All items checked: none is missing."


async def test_a_text_protocol_input_given_as_a_json_string_reaches_the_tool_decoded(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A one-parameter tool's input written as a bare JSON string (a drift the parser
    accepts: "as a bare string instead of JSON", service/agents/react_parser.py):
    ``Action Input: "First line.\\nSecond line."``. ``_parse_input`` only strips the quotes,
    so the tool gets the escapes as text: a backslash and an ``n``, not a newline
    (``\\"`` stays a backslash and a quote, ``\\u00e9`` six characters). ``text_stats`` then
    counts one line of 27 characters instead of two of 25, and reports it as a success: a
    wrong answer with the tool's authority, where the model wrote valid JSON. Expected: the
    string decoded as JSON (what the model wrote), 2 lines."""
    backend = ScriptedBackend([
        Reply('Thought: count them.\nAction: text_stats\n'
              'Action Input: "First line.\\nSecond line."'),
        Reply("Thought: done.\nFinal Answer: two lines"),
    ])
    with trio.fail_after(60):
        async with supervisor_env(tmp_path, backend, tools=TOOLS) as env:
            handle, events, _messages = await env.run_to_end("how many lines?", "react")
    assert handle.status is RunStatus.succeeded
    assert [e.data["arguments"] for e in events if e.type == "tool.call"] == [
        {"text": "First line.\nSecond line."}]
    output = next(e.data["output"] for e in events if e.type == "tool.result")
    assert output["lines"] == 2, output


FORMAT_EXAMPLE_ACTION = (
    "A ReAct turn looks like this:\n\n```\nThought: I need the current time.\n"
    "Action: current_time\nAction Input: {\"timezone\": \"Europe/Paris\"}\n```\n\n"
    "The service runs the tool and sends its result back as an `Observation:` line; the "
    "model repeats until it can give its answer.")
FORMAT_EXAMPLE_FINAL = (
    "A ReAct turn that ends the loop looks like this:\n\n```\nThought: I know it now.\n"
    "Final Answer: 42\n```\n\nAfter it the model calls no more tools.")


@pytest.mark.parametrize("answer", [FORMAT_EXAMPLE_ACTION, FORMAT_EXAMPLE_FINAL],
                         ids=["action", "final"])
async def test_react_a_plain_answer_quoting_the_protocol_in_a_code_block_is_the_answer(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, answer: str
) -> None:
    """A user of an agent service asks how the ReAct format looks, and the model answers in
    prose around a fenced example. docs/architecture.md: "Labels inside a fenced code block
    are code, not protocol (a YAML answer's Action: key), unless the whole turn is one
    fence". ``_unfenced`` (service/agents/react_parser.py) goes further: when nothing outside
    the fences is a label and the fenced text has an ``Action Input:`` or a ``Final Answer:``,
    it searches the text unmasked, whatever prose follows the fence. So the example's
    ``Action: current_time`` is run as a tool call (the answer thrown away, the model asked
    again), and the example's ``Final Answer: 42`` makes the stored answer ``"42\n```\n\n
    After it ..."``: a fragment with a dangling fence. Expected: the turn, prose before and
    after its fence, is the answer, stored whole, with no tool call."""
    backend = ScriptedBackend([Reply(answer), Reply("Final Answer: something else")])
    with trio.fail_after(60):
        async with supervisor_env(tmp_path, backend, tools=TOOLS) as env:
            handle, events, messages = await env.run_to_end("how does a ReAct turn look?",
                                                            "react")
    assert handle.status is RunStatus.succeeded
    assert [e.data for e in events if e.type == "tool.call"] == []
    assert messages[1].content == answer
