"""Review of the built-in tools as a hostile or confused model drives them (2026-12-07, z).

Unit-level fuzzing of the calculator, then real runs: the service under hypercorn on
127.0.0.1:0, its llama.cpp adapter on the simulator (``tests/e2e.py``), the model's tool calls
scripted. A deployer's slow tool (``slow_tool`` below, loaded by ``SERVICE_TOOLS`` naming this
module) holds a worker thread until the test lets it go: the behaviour checked is what happens
while it runs (other runs stream; a cancel ends the run), never how long anything takes.
"""

from __future__ import annotations

import json
import math
import threading
from typing import Any

import pytest
import trio

from service.settings import Settings
from service.sim import Reply
from service.tools import Tool, calculate

from .e2e import GUARD, Event, EventStream, e2e, tokens

# ---- a deployer's slow sync tool (this module is named in SERVICE_TOOLS) -----------------------

_RELEASE = threading.Event()
_STARTED = threading.Event()


def _slow(label: str) -> str:
    """Holds its worker thread (no checkpoint, as a CPU-bound tool) until the test releases it."""
    _STARTED.set()
    _RELEASE.wait(30)  # bounded: a test that failed leaves no thread behind for long
    return f"done {label}"


slow_tool = Tool("slow_tool", "Work a while.", {
    "type": "object", "properties": {"label": {"type": "string"}},
    "required": ["label"], "additionalProperties": False}, _slow)
TOOLS = [slow_tool]


def _with_slow_tool(settings: Settings) -> Settings:
    _RELEASE.clear()
    _STARTED.clear()
    return settings.model_copy(update={"tools": (__name__,)})


# ---- helpers ------------------------------------------------------------------------------------

def _call(name: str, arguments: Any = None, raw: str | None = None) -> dict[str, Any]:
    if raw is not None:
        return {"name": name, "raw_arguments": raw}
    return {"name": name, "arguments": arguments if arguments is not None else {}}


async def _run(env: Any, content: str, agent: str = "react") -> tuple[dict[str, Any], list[Event]]:
    conv = await env.conversation()
    r = await env.client.post(f"/api/conversations/{conv}/messages",
                              json={"content": content, "agent": agent})
    body = r.json()
    assert r.status_code == 200, body
    return body, await env.run_events(body["run"]["id"])


def _pairs(events: list[Event]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each ``tool.call`` with its ``tool.result`` (by ``call_id``), in the calls' order."""
    calls = [e.data for e in events if e.type == "tool.call"]
    results = {e.data["call_id"]: e.data for e in events if e.type == "tool.result"}
    assert len(results) == len([e for e in events if e.type == "tool.result"])
    assert set(results) == {c["call_id"] for c in calls}, "a tool.call without its tool.result"
    return [(c, results[c["call_id"]]) for c in calls]


def _no_traceback(events: list[Event]) -> None:
    text = json.dumps([e.data for e in events])
    assert "Traceback" not in text, text[:2000]
    assert 'File "' not in text, text[:2000]


# ---- the calculator, unit level ---------------------------------------------------------------

BOMBS = [
    "9**9**9", "2**10**8", "((9**999)**999)**999", "(9**999)**2",
    "floor(1e308)**4*floor(1e308)", "-2**1000 * -2**1000 * -2**1000 * -2**1000 * 2**1000",
    "ceil(1e308)*ceil(1e308)*ceil(1e308)*ceil(1e308)*ceil(1e308)",
    "10**1000*10**233", "round(1, -10**9)", "2**4000/1", "(10**1000)**1.0", "exp(1000)",
    "10.0**1000", "pi**1000", "1e308*10", "1e400", "1/0", "1%0", "0**-1", "sqrt(-1)", "log(0)",
    "(-8)**(1/3)", "9" * 501, "(" * 201 + "1" + ")" * 201, "-" * 499 + "1",
    "max()", "min(1)", "", "1\x00",
]
REFUSED = [
    "__import__('os')", "().__class__", "().__class__.__bases__[0].__subclasses__()",
    "[x for x in (1,)]", "(lambda: 1)()", "x", "True", "'a'*10", "1j", "divmod(1, 2)",
    "float('inf')", "abs(x=1)", "sqrt.__self__", "{1: 2}", "(1, 2)", "1 if 1 else 2",
    "1 << 10000", "1 < 2", "not 1",
]


@pytest.mark.parametrize("expression", BOMBS)
def test_calculator_resource_bombs_are_refused_with_an_error(expression: str) -> None:
    """Each resource bomb (huge powers, chains of products, float overflow, deep nesting) ends
    with an ordinary exception (the model's observation), never a result nor a hang."""
    with pytest.raises(Exception):  # noqa: B017,PT011 (any Exception: call_tool's observation)
        calculate(expression)


@pytest.mark.parametrize("expression", REFUSED)
def test_calculator_refuses_names_attributes_and_other_syntax(expression: str) -> None:
    with pytest.raises((ValueError, SyntaxError)):
        calculate(expression)


@pytest.mark.parametrize("expression", [
    "floor(1e308)**4", "17**1000+17**1000", "9**999", "(2**1000)**4", "9" * 500,
])
def test_calculator_largest_integers_convert_to_text(expression: str) -> None:
    """The largest results allowed stay under Python's int-to-str limit (4,300 digits): the
    observation can be written and parsed back."""
    result = calculate(expression)
    assert isinstance(result, int)
    assert json.loads(json.dumps(result)) == result


def test_calculator_still_answers_ordinary_arithmetic() -> None:
    assert calculate("2 * (3 + 4) ** 2") == 98
    assert calculate("2^10") == 1024
    assert calculate("((((((((1+1))))))))") == 2
    assert math.isclose(calculate("sqrt(2)"), math.sqrt(2))


# ---- through real runs ------------------------------------------------------------------------

async def test_react_run_survives_a_turn_of_calculator_bombs(settings: Settings) -> None:
    """16 native calls of one turn (the most run at once), each a bomb: each gets an error
    ``tool.result``, the model is called again and its answer is the run's, no traceback."""
    bombs = [*BOMBS[:8], "-" * 499 + "1", "__import__('os').system('true')", "().__class__",
             "(" * 201 + "1" + ")" * 201, "1e308*10", "1/0", "max()", "١٢٣+1"]
    assert len(bombs) == 16
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(
            Reply(tool_calls=tuple(_call("calculator", {"expression": b}) for b in bombs)),
            Reply(text="Those were all refused."))
        body, events = await _run(env, "break the calculator")
        calls = await env.llm_calls(body["run"]["id"])
    pairs = _pairs(events)
    assert sorted(c["arguments"]["expression"] for c, _ in pairs) == sorted(bombs)
    for call, result in pairs:
        assert "error" in result, (call, result)
        assert "output" not in result, (call, result)
    assert events[-1].type == "run.finished"
    assert events[-1].data["status"] == "succeeded"
    assert body["message"]["content"] == "Those were all refused."
    assert len(calls) == 2
    _no_traceback(events)


async def test_react_run_bad_arguments_and_bad_inputs_are_observations(
        settings: Settings) -> None:
    """Missing, extra and wrongly typed arguments, arguments that are not an object, an
    unknown tool, bad time zones, impossible conversions: each an error ``tool.result`` in a
    run that goes on to its answer; a lone surrogate reaches text_stats as text."""
    first = [
        _call("calculator", {}),
        _call("calculator", {"expression": "1+1", "extra": 1}),
        _call("calculator", {"expression": ["1+1"]}),
        _call("calculator", raw="[1, 2]"),
        _call("calculator", raw='"2+2"'),
        _call("calculator", raw="{not json"),
        _call("rm_rf", {"path": "/"}),
        _call("current_time", {"timezone": "../../etc/passwd"}),
        _call("current_time", {"timezone": ""}),
        _call("current_time", {"timezone": "x" * 5000}),
        _call("current_time", {"timezone": "UTC\u0000"}),
        _call("current_time", {"timezone": 7}),
        _call("unit_convert", {"value": 1, "from_unit": "m", "to_unit": "kg"}),
        _call("unit_convert", {"value": 1, "from_unit": "parsec", "to_unit": "m"}),
        _call("unit_convert", {"value": "1", "from_unit": "m", "to_unit": "km"}),
        _call("unit_convert", {"value": 1e308, "from_unit": "mi", "to_unit": "in"}),
    ]
    second = [
        _call("unit_convert", raw='{"value": 1' + "0" * 400 + ', "from_unit": "m", '
                                  '"to_unit": "km"}'),
        _call("unit_convert", raw='{"value": 1' + "0" * 5000 + ', "from_unit": "m", '
                                  '"to_unit": "km"}'),
        _call("unit_convert", raw='{"value": NaN, "from_unit": "m", "to_unit": "km"}'),
        _call("text_stats", {"text": None}),
        _call("text_stats", raw='{"text": "\\ud800 lone. Two"}'),
        _call("current_time", {"timezone": "Europe/Paris"}),
    ]
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(tool_calls=tuple(first)), Reply(tool_calls=tuple(second)),
                       Reply(text="Final Answer: done"))
        body, events = await _run(env, "use the tools badly")
    pairs = _pairs(events)
    assert len(pairs) == len(first) + len(second)
    (stats,) = [p for p in pairs if p[0]["name"] == "text_stats" and "\ufffd" in str(p[0])]
    (paris,) = [p for p in pairs if p[0]["arguments"].get("timezone") == "Europe/Paris"]
    for call, result in pairs:
        if call is not stats[0] and call is not paris[0]:
            assert "error" in result, (call, result)
    (rm,) = [r for c, r in pairs if c["name"] == "rm_rf"]
    assert "unknown tool 'rm_rf'" in rm["error"]
    assert stats[1].get("output", {}).get("words") == 3, stats
    assert "iso" in paris[1].get("output", {}), paris
    assert events[-1].data["status"] == "succeeded"
    assert body["message"]["content"] == "done"
    _no_traceback(events)


async def test_one_hundred_calls_in_one_turn_are_bounded_and_each_answered(
        settings: Settings) -> None:
    """100 native calls in one turn: 16 run, the others are refused, every ``tool.call`` has its
    ``tool.result`` with a unique ``call_id``, and the run answers."""
    calls = tuple(_call("calculator", {"expression": f"{i}+1"}) for i in range(100))
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(tool_calls=calls), Reply(text="Final Answer: counted"))
        body, events = await _run(env, "count")
    pairs = _pairs(events)
    assert len(pairs) == 100
    assert len({c["call_id"] for c, _ in pairs}) == 100
    ran = [r for _, r in pairs if "output" in r]
    assert sorted(r["output"] for r in ran) == list(range(1, 17))
    assert all("at most 16" in r["error"] for _, r in pairs if "output" not in r)
    assert body["message"]["content"] == "counted"


async def test_the_same_call_repeated_forever_stops_at_the_documented_step_limit(
        settings: Settings) -> None:
    """A model that calls ``calculator("1+1")`` at every turn: the ReAct loop runs 8 steps (the
    documented "8-step limit ending in a plain answer"), then one call without tools, whose
    reply (another tool call) is no answer: the run succeeds with the "could not finish" text."""
    loop_call = Reply(text="", tool_calls=(_call("calculator", {"expression": "1+1"}),))
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(*([loop_call] * 20))
        body, events = await _run(env, "loop")
        llm = await env.llm_calls(body["run"]["id"])
    pairs = _pairs(events)
    assert len(pairs) == 8
    assert all(r.get("output") == 2 for _, r in pairs)
    assert len(llm) == 9
    assert events[-1].data["status"] == "succeeded"
    assert "within 8 steps" in body["message"]["content"]
    assert any(e.type == "thought" and "step limit of 8" in e.data["text"] for e in events)


async def test_plan_execute_steps_with_bombs_fail_and_the_run_replans(settings: Settings) -> None:
    """A plan whose steps call tools directly with bombs and bad inputs: each step's call gets
    its error ``tool.result`` (with its step), the run re-plans once and answers."""
    plan = {"steps": [
        {"id": 1, "task": "power", "tool": "calculator", "arguments": {"expression": "9**9**9"}},
        {"id": 2, "task": "deep", "tool": "calculator",
         "arguments": {"expression": "-" * 499 + "1"}},
        {"id": 3, "task": "zone", "tool": "current_time",
         "arguments": {"timezone": "../../etc/passwd"}},
        {"id": 4, "task": "convert", "tool": "unit_convert",
         "arguments": {"value": 1, "from_unit": "m", "to_unit": "kg"}},
    ]}
    replan = {"steps": [{"id": 1, "task": "add", "tool": "calculator",
                         "arguments": {"expression": "2+2"}}]}
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(text=json.dumps(plan)), Reply(text=json.dumps(replan)),
                       Reply(text="It is 4."))
        body, events = await _run(env, "plan it", agent="plan_execute")
    pairs = _pairs(events)
    assert len(pairs) == 5, pairs
    for call, result in pairs[:4]:
        assert "error" in result, (call, result)
        assert "step" in result, (call, result)
    assert pairs[4][1].get("output") == 4
    assert events[-1].data["status"] == "succeeded"
    assert body["message"]["content"] == "It is 4."
    _no_traceback(events)


# ---- a sync tool in its thread: the loop goes on; a cancel ends the run -------------------------

async def _until_tool_call(stream: EventStream) -> list[Event]:
    return await stream.read(lambda evs: evs[-1].type == "tool.call")


async def test_other_runs_stream_while_a_sync_tool_computes(settings: Settings) -> None:
    """Run A's model calls ``slow_tool``, which holds its thread until released. Run B (chat,
    another conversation, same server) streams its tokens meanwhile: all of B's tokens arrive
    between A's ``tool.call`` and ``tool.result`` (the tool is only released once B ended), so
    the tool did not hold the event loop."""
    conf = _with_slow_tool(settings)
    try:
        async with e2e(conf, "llamacpp") as env:
            env.sim.script(
                Reply(tool_calls=(_call("slow_tool", {"label": "a"}),)),
                Reply(text="b " * 12, interval=0.01),
                Reply(text="Final Answer: a finished"))
            conv_a, conv_b = await env.conversation(), await env.conversation()
            with trio.fail_after(GUARD * 2):
                async with env.post_stream(conv_a, "run a", agent="react") as ra:
                    a = EventStream(ra)
                    before = await _until_tool_call(a)
                    assert before[-1].data["name"] == "slow_tool"
                    assert await trio.to_thread.run_sync(_STARTED.wait, 10)
                    async with env.post_stream(conv_b, "run b", agent="chat") as rb:
                        b_events = await EventStream(rb).read()
                    assert not _RELEASE.is_set()
                    _RELEASE.set()
                    rest = await a.read()
    finally:
        _RELEASE.set()
    assert "".join(tokens(b_events)) == "b " * 12
    assert b_events[-1].data["status"] == "succeeded"
    (result,) = [e.data for e in rest if e.type == "tool.result"]
    assert result.get("output") == "done a"
    assert rest[-1].data["status"] == "succeeded"


async def _cancel_during_tool(settings: Settings, how: str) -> tuple[list[Event], list[Event],
                                                                    dict[str, Any], bool]:
    conf = _with_slow_tool(settings)
    try:
        async with e2e(conf, "llamacpp") as env:
            env.sim.script(Reply(tool_calls=(_call("slow_tool", {"label": "c"}),)),
                           Reply(text="Final Answer: never"))
            conv = await env.conversation()
            with trio.fail_after(GUARD * 2):
                async with env.post_stream(conv, "run c", agent="react") as r:
                    run_id = r.headers["x-run-id"]
                    stream = EventStream(r)
                    seen = await _until_tool_call(stream)
                    assert await trio.to_thread.run_sync(_STARTED.wait, 10)
                    if how == "cancel":
                        c = await env.client.post(f"/api/runs/{run_id}/cancel")
                        assert c.status_code == 202, c.text
                        seen += await stream.read()
                # "disconnect": the stream is closed here, the tool still running
                stored = await env.run_events(run_id)
                run = (await env.client.get(f"/api/runs/{run_id}")).json()
            released_early = _RELEASE.is_set()
    finally:
        _RELEASE.set()
    return seen, stored, run, released_early


@pytest.mark.parametrize("how", ["cancel", "disconnect"])
async def test_a_run_cancelled_during_a_sync_tool_ends_cancelled_at_once(
        settings: Settings, how: str) -> None:
    """A cancel (``POST /api/runs/{id}/cancel``) or the client leaving, while the tool's thread
    still works: the run ends ``cancelled`` without waiting for the tool (it is abandoned, still
    unreleased), its ``tool.call`` has a ``tool.result`` saying it was stopped, and the stored
    events are those the client saw (live, for the cancel)."""
    seen, stored, run, released_early = await _cancel_during_tool(settings, how)
    assert not released_early
    assert run["status"] == "cancelled", run
    assert stored[-1].type == "run.finished"
    assert stored[-1].data["status"] == "cancelled"
    (result,) = [e.data for e in stored if e.type == "tool.result"]
    assert "was stopped" in result["error"], result
    assert not any(e.type == "message" for e in stored)
    if how == "cancel":
        assert [(e.id, e.type, e.data) for e in seen] == [(e.id, e.type, e.data) for e in stored]
    else:
        assert [(e.id, e.type) for e in stored[:len(seen)]] == [(e.id, e.type) for e in seen]


# ---- fixed defects -----------------------------------------------------------------------------

async def test_calculator_answers_a_cheap_float_power_with_a_large_exponent(
        settings: Settings) -> None:
    """Fixed (was: DEFECT: the calculator refuses ordinary float powers whose exponent passes
    1,000. docs/architecture.md ("Tools") says integers are bounded at 4,096 bits before each
    power or product, since big-integer work holds the GIL; a float power costs nothing and is
    bounded by the float's range (an overflow is already an error). But
    ``service/tools/builtin.py`` ``_check_size`` (line 57: ``if abs(right) > _MAX_EXPONENT``)
    refuses any power whose exponent passes 1,000, floats included: the textbook compound
    interest question ``(1+0.05/365)**(365*30)`` (= 4.4812...) is answered "ValueError: exponent
    too large", as are ``1.0001**5000`` and ``0.5**2000`` (= 0.0, tiny, not large). Reproduce: a
    ReAct run whose model calls ``calculator({"expression": "(1+0.05/365)**(365*30)"})``: its
    ``tool.result`` is ``{"error": "ValueError: exponent too large"}``; or
    ``calculate("(1+0.05/365)**(365*30)")``. Expected: 4.481228688522581.)"""
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(text="", tool_calls=(
            _call("calculator", {"expression": "(1+0.05/365)**(365*30)"}),)),
            Reply(text="Final Answer: about 4.48"))
        _, events = await _run(env, "what does 1 grow to in 30 years at 5% compounded daily?")
    ((_, result),) = _pairs(events)
    assert "output" in result, f"a cheap float power was refused: {result}"
    assert math.isclose(result["output"], (1 + 0.05 / 365) ** (365 * 30))
    # Tiny results too (a float's underflow, computed at once).
    for expression, value in (("1.0001**5000", 1.0001**5000), ("0.5**2000", 0.0),
                              ("2**-1075", 0.0), ("10**-10**9", 0.0)):
        assert math.isclose(calculate(expression), value), expression


@pytest.mark.parametrize(("value", "unit"), [(-500, "C"), (-1, "K"), (-1000, "F")])
def test_unit_convert_refuses_a_temperature_below_absolute_zero(value: float, unit: str) -> None:
    """Fixed (was: DEFECT: ``unit_convert`` converts temperatures below absolute zero as if they
    existed: ``unit_convert(value=-500, from_unit="C", to_unit="K")`` returns ``-226.85`` (a
    negative kelvin), ``(-1, "K", "C")`` returns ``-274.15``. The tool refuses non-numbers and
    values past a float ("a tool's output should never be a non-number dressed as a number", the
    same reasoning), yet hands the model an impossible temperature to relay as the answer.
    Reproduce: ``service.tools.builtin.unit_convert.fn(-500, "C", "K")``; through a run, a
    model's call ``unit_convert({"value": -500, "from_unit": "C", "to_unit": "K"})`` has
    ``tool.result`` ``{"output": -226.85}``. Fault: ``service/tools/builtin.py``
    ``unit_convert`` (the ``temps`` branch, lines 201-204) has no check that the value is at or
    above absolute zero. Expected: an error the model sees (below absolute zero).)"""
    from service.tools.builtin import unit_convert

    other = "K" if unit != "K" else "C"
    with pytest.raises(ValueError, match=r"(?i)absolute zero"):
        unit_convert.fn(value, unit, other)
