"""Adversarial review: the parsing of model / upstream output on the event loop.

The model's text is untrusted (prompt injection, a broken or hostile upstream). Everything
here is parsed on the one trio thread, so a parse that grows worse than linearly with its
input stalls every run of the process. Each test feeds a parser growing inputs and checks the
growth ratio of its time (doubling the input should about double the time; a ratio near 4 is
quadratic), never an absolute speed. Tests that pass found the parser bounded; tests that
failed before their fix say so ("Fixed (was: DEFECT: ...)").
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from service.agents.auto import _parse_choice, classify_by_rule
from service.agents.plan_execute import parse_plan
from service.agents.react_parser import (
    InvalidInput,
    answer_so_far,
    parse_react,
    up_to_the_action,
)
from service.backends.common import parse_arguments
from service.backends.openai_compat import OpenAIChunks
from service.backends.stream_parsers import NDJSONSplitter, SSEParser
from service.backends.upstream_errors import loads_json
from service.errors import BackendProtocolError
from service.settings import load_settings
from service.text import TextJoiner

from .fakes import Reply, ScriptedBackend
from .growth import assert_linear, best, gaps_around
from .servers import running_server

# -- ReAct text protocol: inputs found linear ------------------------------------------------------

REACT_LINEAR_CASES: dict[str, Callable[[int], str]] = {
    "Action: repeated": lambda n: "Action:" * n,
    "Action lines": lambda n: "Action: a\n" * n,
    "Thought lines then Action Input": lambda n: "Thought: t\n" * n + "Action Input: {}",
    "newlines": lambda n: "\n" * (10 * n),
    "spaces then label": lambda n: " " * (10 * n) + "x",
    "bold markers": lambda n: "**" * (5 * n) + "Action",
    "label prefixes": lambda n: "> - # " * (2 * n) + "Actio",
    "unclosed fence": lambda n: "```json\n" + "Action: a\n" * n,
    "fence lines": lambda n: "```\n" * n,
    "backticks": lambda n: "`" * (10 * n),
    "tildes and dashes": lambda n: "~~~-" * (3 * n),
    "action with open paren": lambda n: "Action: a(" + ")x" * (5 * n),
    "action with spaces": lambda n: "Action: a" + " " * (10 * n) + "b",
    "Action Input open brace": lambda n: "Action: a\nAction Input: " + "{" * (10 * n),
    "Action Input trailing commas": lambda n: 'Action: a\nAction Input: {"a": [1' + ",  " * (3 * n),
    "Action Input unclosed string": lambda n: 'Action: a\nAction Input: {"a": "' + "\\" * (10 * n),
    "Final Answer lines": lambda n: "Final Answer: x\n" * n,
    "Final then Thought lines": lambda n: "Final Answer: x\n" + "Thought: t\n" * n,
}


@pytest.mark.parametrize("case", list(REACT_LINEAR_CASES))
def test_parse_react_is_linear_on_hostile_shapes(case: str) -> None:
    make = REACT_LINEAR_CASES[case]
    assert_linear(parse_react, make, 4000, f"parse_react[{case}]")
    assert_linear(up_to_the_action, make, 4000, f"up_to_the_action[{case}]")


def test_react_input_nesting_and_giant_numbers_are_invalid_input_not_a_crash() -> None:
    deep = "Action: calc\nAction Input: " + "{\"a\": " * 100_000 + "1" + "}" * 100_000
    step = parse_react(deep)
    assert step.action == "calc"
    assert isinstance(step.action_input, InvalidInput)
    digits = "Action: calc\nAction Input: {\"a\": " + "9" * 100_000 + "}"
    step = parse_react(digits)
    assert isinstance(step.action_input, InvalidInput)
    py = "Action: calc\nAction Input: {'a': " + "[" * 5000 + "]" * 5000 + "}"
    assert parse_react(py).action == "calc"  # literal_eval's nesting error caught


def test_answer_so_far_on_plain_hostile_shapes_is_linear() -> None:
    assert_linear(answer_so_far, lambda n: "Thought: t\n" * n, 4000, "answer_so_far[thoughts]")
    assert_linear(answer_so_far, lambda n: "x\n" * (5 * n), 4000, "answer_so_far[plain]")


# -- ReAct: the final answer's run-on scan ---------------------------------------------------------

def _final_then_actions(n: int) -> str:
    return "Final Answer: x\n" + "Action: a\n" * n


def _final_then_cycles(n: int) -> str:
    return "Final Answer: x\n" + "Action: a\nThought: b\n" * n + "Action Input: {}\n"


def test_final_answer_followed_by_action_lines_is_linear() -> None:
    """Fixed (was: DEFECT: ``parse_react`` (and ``answer_so_far``, the cut-short path) are
    quadratic in the number of plain ``Action:`` lines after a ``Final Answer:``. Input:
    ``"Final Answer: x\\n" + "Action: a\\n" * n`` (no ``Action Input:`` anywhere). Measured here
    (2 cores, shared): n=2,000 (20 KB) 0.16 s, 4,000 (40 KB) 0.62 s, 8,000 (80 KB) 2.5 s: a
    ratio of ~4 per doubling. A variant with the input label at the end, ``"Final Answer: x\\n"
    + "Action: a\\nThought: b\\n" * n + "Action Input: {}"``, is ~5x worse per line: 42 KB 1.8
    s, 84 KB 6.9 s, 168 KB 27 s (see the next test). At fault: service/agents/react_parser.py
    ``_answer_section`` (lines 148-152): for EVERY ``_PLAIN_ACTION`` match after the answer it
    runs ``_PLAIN_INPUT.search(scan, m.end())`` to the end of the text (and, when one is found,
    ``_input_of`` runs five more searches over the whole remaining span) and only breaks on a
    full match; n actions x O(text) each. Why it matters: a model reply is bounded only by
    MAX_CALL_CHARS (8 MiB) and its max_tokens; a prompt-injected or runaway model that repeats
    "Action: ..." lines after its final answer (small models loop like that) blocks the single
    event loop for seconds to minutes when its turn is parsed (react.py ``loop`` ->
    ``parse_react``) or when a cut-short run's partial answer is taken
    (``RunHandle.partial_text`` -> ``answer_so_far``): every other user's stream, heartbeat and
    lease renewal on the process stalls with it.)"""
    assert_linear(parse_react, _final_then_actions, 2000, "parse_react[final, actions]")
    assert_linear(answer_so_far, _final_then_actions, 2000, "answer_so_far[final, actions]")


def test_final_answer_with_run_on_cycles_is_linear_in_answer_so_far() -> None:
    """Fixed (was: DEFECT: the same quadratic scan as above, on the cut-short path and its worst
    shape. Input: ``"Final Answer: x\\n" + "Action: a\\nThought: b\\n" * n + "Action Input:
    {}\\n"`` (every Action is followed by a Thought, so ``_input_of`` rejects the far Action
    Input each time, after scanning the whole span between them for Final/Observation labels).
    Measured: n=2,000 (42 KB) 1.8 s, n=4,000 (84 KB) 6.9 s, n=8,000 (168 KB) 27 s of one blocked
    event loop; here n=800 -> n=1,600. At fault: service/agents/react_parser.py
    ``_answer_section`` (the ``for m in _PLAIN_ACTION.finditer`` loop, lines 148-152) together
    with ``_input_of`` (lines 308-313: ``_INPUT.search`` to the end, then four ``rx.search``
    over the span), reached from ``answer_so_far`` (``RunHandle.partial_text`` when a ReAct run
    is cancelled, times out or its stream dies) and from ``parse_react`` for every completed
    ReAct turn. Why it matters: 168 KB of model text (~40k tokens, far below MAX_CALL_CHARS)
    freezes the whole process for ~27 s; see the end-to-end test below for another run's stalled
    tokens.)"""
    assert_linear(answer_so_far, _final_then_cycles, 800, "answer_so_far[final, cycles]")
    assert_linear(parse_react, _final_then_cycles, 800, "parse_react[final, cycles]")


# -- Plan JSON, routing ---------------------------------------------------------------------------

PLAN_CASES: dict[str, Callable[[int], str]] = {
    "open braces": lambda n: "{" * (10 * n),
    "fence openers": lambda n: "```json {" * n,
    "fence no brace": lambda n: "```json\n" * n,
    "unclosed object": lambda n: '{"steps": [' + '{"id": 1, "task": "t"},' * n,
    "chatter": lambda n: "blah " * (2 * n) + "{",
}


@pytest.mark.parametrize("case", list(PLAN_CASES))
def test_parse_plan_is_linear_on_hostile_shapes(case: str) -> None:
    def parse(text: str) -> None:
        with contextlib.suppress(ValueError):
            parse_plan(text)
    assert_linear(parse, PLAN_CASES[case], 4000, f"parse_plan[{case}]")


def test_parse_plan_nesting_and_giant_numbers_are_clear_value_errors() -> None:
    with pytest.raises(ValueError, match="nested too deeply"):
        parse_plan("[" * 200_000)
    # Python's int-from-string limit: a ValueError (make_plan catches ValueError: re-ask, then
    # one step), not a traceback.
    with pytest.raises(ValueError, match=r"digits|limit"):
        parse_plan('{"steps": [{"id": ' + "9" * 100_000 + ', "task": "t"}]}')


def test_routing_reply_parse_is_linear() -> None:
    assert_linear(_parse_choice, lambda n: "plan_execute " * n, 4000, "_parse_choice")
    assert_linear(_parse_choice, lambda n: "a" * (10 * n), 4000, "_parse_choice[word]")
    for q in ("first " * 20_000, "\n" * 50_000, "1. " * 20_000, "2+" * 30_000):
        t = best(lambda q=q: classify_by_rule(q, ["calculator"]), 1)
        assert t < 1.0, t  # bounded: it reads the first 8,000 characters only


# -- Upstream wire formats, tool-call arguments ---------------------------------------------------

def test_sse_parser_is_linear_in_a_long_line_fed_in_small_reads() -> None:
    def feed(line: str) -> None:
        p = SSEParser()
        data = ("data: " + line + "\n\n").encode()
        items = []
        for i in range(0, len(data), 16):
            items += p.feed(data[i:i + 16])
        assert len(items) == 1
    assert_linear(feed, lambda n: "x" * (20 * n), 4000, "SSEParser long line")


def test_sse_parser_is_linear_in_many_lines_of_one_read() -> None:
    def feed(text: str) -> None:
        SSEParser().feed(text.encode())
    assert_linear(feed, lambda n: "data: x\r" * (5 * n) + "\n", 4000, "SSEParser CR lines")
    assert_linear(feed, lambda n: "\r" * (20 * n), 4000, "SSEParser CRs")
    assert_linear(feed, lambda n: ": k\n" * (5 * n), 4000, "SSEParser comments")


def test_ndjson_splitter_is_linear() -> None:
    def feed(text: str) -> None:
        s = NDJSONSplitter()
        data = text.encode()
        for i in range(0, len(data), 16):
            s.feed(data[i:i + 16])
        s.flush()
    assert_linear(feed, lambda n: "x" * (20 * n), 4000, "NDJSON long line")
    assert_linear(feed, lambda n: "{}\n" * (7 * n), 4000, "NDJSON many lines")


def test_openai_tool_call_arguments_in_thousands_of_fragments_are_linear() -> None:
    def assemble(args: str) -> None:
        chunks = OpenAIChunks(None, "b", "m")  # type: ignore[arg-type]  # (no reading here)
        first = {"index": 0, "id": "c1", "function": {"name": "f", "arguments": ""}}
        chunks._add_call_delta(first)
        for i in range(0, len(args), 3):
            chunks._add_call_delta({"index": 0, "function": {"arguments": args[i:i + 3]}})
        final = chunks._final()
        assert final.tool_calls[0].name == "f"
    assert_linear(assemble, lambda n: json.dumps({"a": "x" * (20 * n)}), 4000,
                   "tool-call argument assembly")


def test_openai_stream_event_parse_is_linear_per_token() -> None:
    def stream(text: str) -> None:
        chunks = OpenAIChunks(None, "b", "m")  # type: ignore[arg-type]
        for c in text:
            chunks._event('{"choices":[{"index":0,"delta":{"content":' + json.dumps(c) + "}}]}")
    assert_linear(stream, lambda n: "ab" * n, 4000, "per-token content events")


def test_hostile_arguments_and_error_bodies_are_protocol_errors() -> None:
    with pytest.raises(BackendProtocolError):
        parse_arguments("[" * 200_000, backend="b", name="f")
    with pytest.raises(BackendProtocolError):
        parse_arguments('{"a": ' + "9" * 100_000 + "}", backend="b", name="f")
    with pytest.raises(BackendProtocolError):
        parse_arguments('{"a": NaN}', backend="b", name="f")
    with pytest.raises(ValueError, match="nested too deeply"):
        loads_json("[" * 200_000)
    chunks = OpenAIChunks(None, "b", "m")  # type: ignore[arg-type]
    with pytest.raises(BackendProtocolError):
        chunks._event('{"a": ' + "9" * 100_000 + "}")
    with pytest.raises(BackendProtocolError):
        chunks._event("[" * 200_000)


def test_text_joiner_per_token_is_linear() -> None:
    def feed(text: str) -> None:
        j = TextJoiner()
        for c in text:
            j.feed(c)
        j.flush()
    assert_linear(feed, lambda n: "\ud83d\ude00a\x00" * n, 4000, "TextJoiner")


# -- End to end: one hostile run stalls another run's stream --------------------------------------

HOSTILE = _final_then_cycles(3000)  # ~63 KB: ~4 s of parse before the fix, ms after it
VICTIM_TOKENS = 600
VICTIM_GAP = 0.005


async def test_a_hostile_react_reply_does_not_stall_another_users_token_stream(
        tmp_path: Path) -> None:
    """Fixed (was: DEFECT: end to end, one run's model text stalls ANOTHER run's live tokens.
    Setup: the real app under hypercorn (127.0.0.1:0) over a scripted model. Run A (chat)
    streams 600 tokens 5 ms apart to its client (``POST .../messages``, ``stream: true``). At
    A's 300th token, run B (react) gets the reply ``"Final Answer: x\\n" + "Action: a\\nThought:
    b\\n" * 1500 + "Action Input: {}\\n"`` (~32 KB). A's largest gap between two tokens before B
    is compared with its largest gap while B's reply is parsed. Assertion: A's largest gap while
    B runs < 5x its largest live gap before B (floor 1 s). Measured: A's tokens arrive a few ms
    apart, then stop for ~0.9 s (the time of one ``parse_react`` of B's 31.5 KB reply; 4x per
    doubling of B's reply, ~27 s at 168 KB) and resume. Control: the same test with a benign
    reply of the same size (``"Final Answer: x\n" + "Thought: b\n" * 2800``) passes, so the
    stall is the parse, not the reply's size. At fault: service/agents/react_parser.py
    ``_answer_section`` / ``_input_of`` (quadratic run-on scan), called synchronously on the
    event loop by service/agents/react.py ``ReActAgent.loop`` (line 102,
    ``parse_react(reply.content, ...)``).)"""
    def model(req: Any) -> Reply:
        if req.messages[-1].content.startswith("victim"):
            return Reply("tok " * VICTIM_TOKENS, gap=VICTIM_GAP)
        return Reply(HOSTILE, chunks=30)

    settings = load_settings(db=tmp_path / "s.db")
    async with running_server(settings, ScriptedBackend(model)) as srv, \
            srv.client() as client, srv.client() as other:
        with trio.fail_after(60):
            victim_conv = (await client.post("/api/conversations",
                                             json={"agent": "chat"})).json()["id"]
            hostile_conv = (await other.post("/api/conversations",
                                             json={"agent": "react"})).json()["id"]

            async def hostile() -> None:
                r = await other.post(f"/api/conversations/{hostile_conv}/messages",
                                     json={"content": "hostile"})
                assert r.status_code in (200, 201, 202), r.text

            baseline, stall = await gaps_around(client, victim_conv, hostile)
    assert stall < max(5 * baseline, 1.0), (
        f"run A's largest token gap: {baseline:.3f}s before run B, {stall:.3f}s while B's "
        f"{len(HOSTILE)}-char ReAct reply was parsed ({stall / baseline:.0f}x)")
