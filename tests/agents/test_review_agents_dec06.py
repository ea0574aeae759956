# ruff: noqa: RUF001, RUF002 (full-width punctuation on purpose: what the models write)
"""Review of the agents and tools (2026-12-06): each test fails on the code as reviewed, for the
defect its docstring names."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import trio
import trio.testing

from service.backends.base import ChatChunk, ChatRequest
from service.runs import RunSpec, RunStatus

from ..fakes import Reply, ScriptedBackend, supervisor_env
from ..servers import ROOT
from .test_agents import TOOLS

# -- tools ------------------------------------------------------------------------------------

def test_calculator_round_with_a_huge_negative_ndigits_is_refused() -> None:
    """``calculate("round(1, -10**9)")`` (16 characters, every operand inside the calculator's
    bounds: 10**9 is a small power) makes CPython compute ``10**1000000000`` inside
    ``int.__round__``: a 3-gigabit integer, computed holding the GIL for hours (measured here:
    ``round(1, -10**7)`` alone takes 6 s). The calculator runs as a sync tool in an abandoned
    worker thread, so its 5 s timeout cannot stop it and every task of the process (every
    user's stream, /healthz) freezes: the exact denial of service ``_MAX_BITS`` in
    service/tools/builtin.py is there to prevent, reachable by any model output or prompt
    injection. Expected: refused at once with a ValueError (an observation for the model)."""
    code = ("from service.tools import calculate\n"
            "try: calculate('round(1, -10**9)')\n"
            "except ValueError as e: print('refused:', e)\n")
    try:
        out = subprocess.run([sys.executable, "-c", code], timeout=10, check=True,
                             capture_output=True, text=True,
                             env={"PYTHONPATH": str(ROOT)}).stdout
    except subprocess.TimeoutExpired:
        pytest.fail("calculate('round(1, -10**9)') still computing (GIL held) after 10 s")
    assert out.startswith("refused:")


# -- the ReAct text protocol ------------------------------------------------------------------

async def test_react_final_answer_in_bold_is_stored_without_a_dangling_marker(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A model that writes ``Final Answer: **42**`` (Markdown bold around the answer: common)
    gets ``42**`` stored and sent as the answer: the label pattern in
    service/agents/react_parser.py (``_LABEL``'s trailing ``[ \\t*]*``, meant for
    ``**Final Answer:** 42``) eats the opening ``**`` of the answer itself, leaving the closing
    one. The ``message`` event, GET /api/conversations/{id} and /v1 all show broken Markdown.
    Expected: ``**42**`` (or ``42``), never half a marker."""
    backend = ScriptedBackend([Reply("Thought: easy.\nFinal Answer: **42**")])
    with trio.fail_after(60):
        async with supervisor_env(tmp_path, backend, tools=TOOLS) as env:
            handle, events, messages = await env.run_to_end("what is 6*7?", "react")
    assert handle.status is RunStatus.succeeded
    assert messages[1].content in ("**42**", "42"), messages[1].content
    message = next(e.data for e in events if e.type == "message")
    assert message["content"] in ("**42**", "42"), message["content"]


YAML_ANSWER = (
    "Here is a policy that lets the role read the bucket:\n\n"
    "```yaml\n"
    "Version: '2012-10-17'\n"
    "Statement:\n"
    "  - Effect: Allow\n"
    "    Action: s3:GetObject\n"
    "    Resource: arn:aws:s3:::my-bucket/*\n"
    "```\n\n"
    "Attach it to the role and you are done."
)


async def test_react_an_action_line_inside_a_code_block_is_not_a_tool_call(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A plain answer (no protocol labels: taken whole as the answer, per the parser's own
    docstring) that holds a YAML code block with an ``Action:`` key (an IAM policy, a
    CloudFormation template) is read as a call of a tool named ``s3:GetObject``:
    ``parse_react`` matches ``_ACTION`` on any line, inside a fenced code block too. The run
    emits a ``tool.call`` of an unknown tool, throws the user's answer away and asks the model
    again (here the second reply is whatever comes next: the answer stored is not the one the
    model gave). Expected: text inside a ``` fence is not protocol; the answer is stored whole,
    in one LLM call, with no tool.call event."""
    backend = ScriptedBackend([Reply(YAML_ANSWER), Reply("Final Answer: something else")])
    with trio.fail_after(60):
        async with supervisor_env(tmp_path, backend, tools=TOOLS) as env:
            handle, events, messages = await env.run_to_end(
                "write an IAM policy in YAML to read my bucket", "react")
    assert handle.status is RunStatus.succeeded
    assert [e.data for e in events if e.type == "tool.call"] == []
    assert messages[1].content == YAML_ANSWER
    assert len(backend.streams) == 1


async def test_react_full_width_colons_are_read_as_protocol_labels(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Models answering in Chinese or Japanese (Qwen, GLM, DeepSeek) write the protocol's labels
    with a full-width colon: ``Action：calculator``. ``_LABEL`` in
    service/agents/react_parser.py accepts only ``:``, so the turn has "neither label" and the
    whole protocol text (``Thought：...`` / ``Action：...`` / ``Action Input：{...}``) is stored
    as the user's answer, the tool never called. Expected: the calculator is called with the
    input and the answer is the one given after the observation."""
    backend = ScriptedBackend([
        Reply('Thought：我需要计算。\nAction：calculator\nAction Input：{"expression": "6*7"}'),
        Reply("Thought：我知道了。\nFinal Answer：42"),
    ])
    with trio.fail_after(60):
        async with supervisor_env(tmp_path, backend, tools=TOOLS) as env:
            handle, events, messages = await env.run_to_end("6乘以7等于多少？", "react")
    assert handle.status is RunStatus.succeeded
    results = [e.data for e in events if e.type == "tool.result"]
    assert results, events
    assert results[0].get("output") == 42, results
    assert messages[1].content == "42"


def test_text_stats_does_not_count_a_trailing_newline_as_a_line() -> None:
    """``text_stats`` (service/tools/builtin.py) counts lines as ``text.count("\\n") + 1``, so a
    text that ends with a newline (any file, most pasted text) gets one line too many:
    ``"first line\\nsecond line\\n"`` is reported as 3 lines. ``wc -l``, ``str.splitlines()``
    and every editor say 2; a user asking "how many lines" gets a wrong number, with the
    tool's authority. Expected: 2."""
    from service.tools.builtin import text_stats

    assert text_stats.fn(text="first line\nsecond line\n")["lines"] == 2


def test_text_stats_does_not_split_sentences_at_decimal_points() -> None:
    """``text_stats`` splits sentences on every ``.``, so ``"Pi is 3.14 and e is 2.72."`` (one
    sentence) is counted as 3: any number with a decimal point adds a sentence. Expected: 1
    (a ``.`` between two digits ends no sentence)."""
    from service.tools.builtin import text_stats

    assert text_stats.fn(text="Pi is 3.14 and e is 2.72.")["sentences"] == 1


def test_calculator_does_not_answer_a_real_question_with_a_complex_number() -> None:
    """``calculate("(-8)**(1/3)")`` (what a model writes for "the cube root of -8") returns the
    Python complex ``(1.0000000000000002+1.7320508075688772j)``, which ``call_tool`` turns
    into the string ``"(1.0000000000000002+1.7320508075688772j)"`` and reports as a
    successful ``tool.result``: the model is handed a wrong "answer" for an arithmetic
    question (the tool's description says arithmetic; ``sqrt(-1)`` on the other hand is
    refused with a ValueError). Expected: a real result (-2) or a ValueError the model sees
    as an error, never a complex number passed off as the output."""
    from service.tools.builtin import calculate

    try:
        result = calculate("(-8)**(1/3)")
    except ValueError:
        return
    assert not isinstance(result, complex), result


class _LengthBackend(ScriptedBackend):
    """A scripted backend whose every answer ends ``finish_reason: "length"`` (the model ran
    to ``max_tokens``)."""

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


async def test_an_answer_cut_at_the_clients_stop_sequence_finishes_stop_not_length(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """For an agent other than ``chat`` the client's ``stop`` sequences are not sent upstream
    (make_runner in service/agents/__init__.py: they would cut the ReAct protocol); the answer
    is cut at the first of them afterwards (``_cut_at_stop``). So the model runs on past the
    stop to ``max_tokens`` and its call ends ``length``, and ``finish_reason`` is taken from
    that call (``result_extra.setdefault("finish_reason", ctx.last_finish_reason)``): the
    answer the client gets ended at its stop sequence, yet is reported ``"length"``, which
    OpenAI defines as "cut by max_tokens" (SDKs raise ``LengthFinishReasonError`` on it;
    API.md: /v1 honours ``stop``). Expected: an answer cut at a stop sequence says
    ``finish_reason: "stop"``, in the ``message`` event (what /v1 sends) as in the result."""
    backend = _LengthBackend([Reply("Final Answer: 42\n\nAnd now a long digression that "
                                    "runs on until the token limit")])
    with trio.fail_after(60):
        async with supervisor_env(tmp_path, backend, tools=TOOLS) as env:
            conv = await env.conversation()
            handle = await env.supervisor.start(
                RunSpec(conv, "6*7?", agent="react", stop=("\n\n",), max_tokens=40))
            await handle.finished.wait()
            events = await env.store.list_run_events(handle.id)
    assert handle.status is RunStatus.succeeded
    message = next(e.data for e in events if e.type == "message")
    assert message["content"] == "42"
    assert message["finish_reason"] == "stop", message


PLAN = json.dumps({"steps": [
    {"id": 1, "task": "compute 6*7", "tool": "calculator", "arguments": {"expression": "6*7"}},
    {"id": 2, "task": "compute 8*9", "tool": "calculator", "arguments": {"expression": "8*9"}},
]})


def _honours_max_tokens(req: ChatRequest) -> Reply:
    """A model server: an answer is cut at ``max_tokens`` (a word a token here)."""
    planning = req.messages[0].content.startswith("Break the user's request")
    text = PLAN if planning else "42 and 72."
    words = text.split(" ")
    if req.max_tokens is not None:
        words = words[:req.max_tokens]
    return Reply(" ".join(words))


async def test_plan_execute_plans_whole_under_a_clients_small_max_tokens(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A client's ``max_tokens`` (API.md: a /v1 field; here 20) bounds its answer, but
    ``AgentContext.call_llm`` applies it to every call of the run, the plan-and-execute agent's
    JSON plan included (service/agents/plan_execute.py ``make_plan``: ``call_llm`` without
    ``max_tokens``, so ``ctx.max_tokens``). The plan is cut mid-JSON, the re-ask is cut the
    same way, and the run silently falls back to a one-step plan ("no valid plan ...; using
    one step"): the user asked for plan-and-execute and gets none of it, only because it
    wanted a short answer. The same reasoning that keeps a client's ``stop`` out of the
    agents' internal calls (make_runner) applies. Expected: the model's two-step plan is
    executed (the ``plan`` event lists both steps, both calculator calls run)."""
    backend = ScriptedBackend(_honours_max_tokens)
    with trio.fail_after(60):
        async with supervisor_env(tmp_path, backend, tools=TOOLS) as env:
            conv = await env.conversation()
            handle = await env.supervisor.start(
                RunSpec(conv, "compute 6*7 and then 8*9", agent="plan_execute", max_tokens=20))
            await handle.finished.wait()
            events = await env.store.list_run_events(handle.id)
    assert handle.status is RunStatus.succeeded
    plan = next(e.data for e in events if e.type == "plan")
    assert [s["id"] for s in plan["steps"]] == [1, 2], plan
    outputs = sorted(e.data.get("output") for e in events if e.type == "tool.result")
    assert outputs == [42, 72]


async def test_react_an_answer_action_with_a_json_input_keeps_its_text_readable(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """LangChain-style models give their answer as an action: ``Action: Final Answer`` /
    ``Action Input: {"answer": "東京は日本の首都です。"}``. ``parse_react``
    (service/agents/react_parser.py) accepts that as the answer but turns a JSON object
    input back into text with ``json.dumps(action_input)`` (ASCII escapes), so what is stored
    and sent as the user's answer is ``{"answer": "\\u6771\\u4eac\\u306f..."}``: every
    non-ASCII character an escape sequence, unreadable for a Japanese, Chinese or
    accented-language user (``Observation.text`` avoids exactly this: "not \\u escapes").
    Expected: the answer's text readable as written (its one string value, or at least the
    JSON with ``ensure_ascii=False``)."""
    backend = ScriptedBackend([Reply(
        'Thought: I know it.\nAction: Final Answer\n'
        'Action Input: {"answer": "東京は日本の首都です。"}')])
    with trio.fail_after(60):
        async with supervisor_env(tmp_path, backend, tools=TOOLS) as env:
            handle, _events, messages = await env.run_to_end("日本の首都は？", "react")
    assert handle.status is RunStatus.succeeded
    assert "東京は日本の首都です。" in messages[1].content, messages[1].content


async def test_react_a_cancelled_plain_answer_with_an_observation_line_keeps_its_text(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """API.md: a cancelled run ends ``cancelled`` "its partial answer stored". A first turn
    that is a plain answer whose first line happens to start ``Observation:`` (an analysis:
    "Observation: sales fell ..." / "Recommendation: ...") is, whole, the answer:
    ``parse_react`` takes text with neither Action nor Final Answer as the answer. Cut short
    (a cancel, a deadline), ``answer_so_far`` (service/agents/react_parser.py) sees a protocol
    label and, finding no Final Answer, no action and no prose action, returns ``""``: the
    client watched the words stream and the run ends with empty ``content`` in
    ``run.finished`` and an empty stored reply. Expected: the text streamed so far is kept,
    as the whole turn would have been."""
    text = ("Observation: sales fell 10% in the third quarter while costs rose. "
            "Recommendation: cut the marketing budget and renegotiate the supplier contracts.")
    backend = ScriptedBackend([Reply(text, gap=1.0)])
    with trio.fail_after(60):
        async with supervisor_env(tmp_path, backend, tools=TOOLS) as env:
            conv = await env.conversation()
            handle = await env.supervisor.start(RunSpec(conv, "analyse Q3", agent="react"))
            await trio.sleep(8.5)
            handle.cancel("client went away")
            await handle.finished.wait()
            events = await env.store.list_run_events(handle.id)
            messages = await env.store.get_messages(conv)
    assert handle.status is RunStatus.cancelled
    streamed = "".join(e.data["text"] for e in events if e.type == "token")
    assert streamed.startswith("Observation: sales fell")
    assert messages[1].content == streamed, messages[1].content
    assert events[-1].data.get("content") == streamed
