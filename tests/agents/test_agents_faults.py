"""Agents and tools, from a review (2026-12-04): each test failed before its fix.

Scripted models (tests/fakes.py) and the real simulator (service/sim) in virtual time.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from service.agents.auto import classify_by_rule
from service.backends.base import ChatRequest, ToolCall
from service.errors import ConfigError
from service.runs import RunHandle, RunSpec, RunStatus
from service.sim import Reply as SimReply
from service.sim import Simulator
from service.store import RunEvent
from service.tools import BUILTIN_TOOLS, ToolRegistry, load_tool_modules, tool

from ..fakes import Env, Reply, ScriptedBackend, supervisor_env
from .test_agents_on_simulator import sim_env


async def _run(env: Env, content: str, agent: str, **kw: Any) -> tuple[RunHandle, list[RunEvent]]:
    conv = await env.conversation()
    handle = await env.supervisor.start(RunSpec(conv, content, agent=agent, **kw))
    await handle.finished.wait()
    return handle, await env.store.list_run_events(handle.id)


# -- 1. an async tool behind a plain decorator is run in a thread and its coroutine stringified --


def _logged(fn):  # type: ignore[no-untyped-def]
    """The usual logging/timing decorator a deployer puts on a tool (sync wrapper)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        return fn(*args, **kwargs)

    return wrapper


@tool("lookup_price", "The price of an item.",
      {"type": "object", "properties": {"item": {"type": "string"}}, "required": ["item"]})
@_logged
async def lookup_price(item: str) -> dict[str, Any]:
    await trio.lowlevel.checkpoint()
    return {"item": item, "price": 3}


async def test_an_async_tool_behind_a_sync_decorator_is_awaited(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    backend = ScriptedBackend([
        Reply("", tool_calls=[ToolCall("c1", "lookup_price", {"item": "tea"})]),
        Reply("Final Answer: tea costs 3"),
    ])
    async with supervisor_env(tmp_path, backend, tools=(*BUILTIN_TOOLS, lookup_price)) as env:
        _, events = await _run(env, "price of tea?", "react")
    (result,) = [e.data for e in events if e.type == "tool.result"]
    # Now: {"call_id": "c1", "output": "<coroutine object lookup_price at 0x...>"}, outcome ok,
    # and that text is what the model is given as the tool's answer.
    assert result == {"call_id": "c1", "output": {"item": "tea", "price": 3}}, result


# -- 2. a tool's structured output reaches the model with its non-ASCII text as \\uXXXX escapes -


@tool("city_info", "Facts about a city.",
      {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
def city_info(city: str) -> dict[str, str]:
    return {"city": city, "name_local": "東京", "note": "Zürich is not in Japan"}


async def test_a_tools_structured_output_reaches_the_model_as_text_not_escapes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    backend = ScriptedBackend([
        Reply("", tool_calls=[ToolCall("c1", "city_info", {"city": "Tokyo"})]),
        Reply("Final Answer: 東京"),
    ])
    async with supervisor_env(tmp_path, backend, tools=(*BUILTIN_TOOLS, city_info)) as env:
        await _run(env, "Tokyo's name in Japanese?", "react")
    (tool_msg,) = [m.content for m in backend.streams[1].request.messages if m.role == "tool"]
    # Now: '{"city": "Tokyo", "name_local": "\\u6771\\u4eac", ... "Z\\u00fcrich ..."}': the model
    # must decode JSON escapes to read the answer (and pays ~6 tokens per CJK character).
    assert "東京" in tool_msg, tool_msg
    assert "Zürich" in tool_msg, tool_msg


# -- 3. a tool's huge output goes to the model whole: the run dies on the context ---------------


@tool("fetch_page", "Fetch a web page's text.",
      {"type": "object", "properties": {"url": {"type": "string"}}, "required": ["url"]})
async def fetch_page(url: str) -> str:
    await trio.lowlevel.checkpoint()
    return "lorem " * 200_000  # a 1.2 MB page: an ordinary web page's text, or a log file


async def test_a_tools_huge_output_is_an_observation_not_a_failed_run(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # The model's context is 8,192 tokens (the demo's); the conversation is a few words.
    sim = Simulator(strict_models=False, default=SimReply(text="Final Answer: a long page",
                                                          context=8192))
    sim.script(SimReply(tool_calls=({"name": "fetch_page", "arguments": {"url": "http://x"}},),
                        context=8192))
    async with sim_env(tmp_path, sim, tools=(*BUILTIN_TOOLS, fetch_page)) as env:
        handle, events = await _run(env, "summarise http://x", "react")
    # Now: the 1.2 MB observation is sent whole (SERVICE_HISTORY_CHARS bounds only the history
    # read at the start), the model's server answers 400 and the run fails
    # context_length_exceeded: one big tool result loses the whole answer.
    errors = [e.data for e in events if e.type == "error"]
    assert handle.status is RunStatus.succeeded, (handle.status, errors)


# -- 4. a native-tools model's plain answer is read as the text protocol ------------------------


async def test_a_plain_answer_after_native_tool_calls_is_not_parsed_as_an_action(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    answer = ("Incident summary:\n"
              "- **Cause:** the disk was full (93 GB of logs)\n"
              "- **Action:** rotate the logs daily\n"
              "- **Owner:** ops")
    backend = ScriptedBackend([
        Reply("", tool_calls=[ToolCall("c1", "calculator", {"expression": "100-7"})]),
        Reply(answer),
        Reply(answer),
        Reply(answer),
    ])
    async with supervisor_env(tmp_path, backend) as env:
        _, events = await _run(env, "write the incident summary", "react")
    calls = [e.data["name"] for e in events if e.type == "tool.call"]
    # Now: "- **Action:** rotate the logs daily" is taken for a call of a tool named "rotate the
    # logs daily"; the model, told the tool is unknown, answers the same; the stored answer is
    # whatever the loop ends on.
    assert calls == ["calculator"], calls
    assert events[-2].data["content"] == answer


# -- 5. /v1 finish_reason of a react / plan_execute answer cut at max_tokens ---------------------


async def test_a_react_answer_cut_at_max_tokens_says_length(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sim = Simulator(strict_models=False)
    sim.script(SimReply(text="Final Answer: The three largest cities are Tokyo, Delhi and",
                        finish_reason="length"))
    async with sim_env(tmp_path, sim) as env:
        _, events = await _run(env, "three largest cities?", "react", max_tokens=12)
    message = events[-2].data
    # Now: no finish_reason in the message, so /v1 answers finish_reason "stop" (service/api/
    # openai.py: extra.get("finish_reason", "stop")) for an answer cut mid-sentence; the chat
    # agent says "length" for the same cut.
    assert message.get("finish_reason") == "length", message


# -- 6. the model's made-up observation is kept in its history as if it had happened -----------


async def test_a_made_up_observation_is_not_fed_back_to_the_model(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Models run on past their Action into an invented "Observation:" and answer from it
    # (why ReAct implementations stop generation at "Observation:"). Nothing stops it here.
    backend = ScriptedBackend([
        Reply('Thought: compute it\nAction: calculator\nAction Input: {"expression": "17*23"}\n'
              "Observation: 381\nThought: I know the answer\nFinal Answer: 381"),
        Reply("Final Answer: 391"),
    ])
    async with supervisor_env(tmp_path, backend) as env:
        _, events = await _run(env, "17*23?", "react")
    assert [e.data.get("output") for e in events if e.type == "tool.result"] == [391]
    # Either generation stops at "Observation:" (a stop sequence on the ReAct calls), or what the
    # model invented after its action is not sent back as its own turn.
    stopped = any("Observation:" in s for s in backend.streams[0].request.stop)
    said = [m.content for m in backend.streams[1].request.messages if m.role == "assistant"]
    # Now: no stop sequence, and the assistant turn sent back holds the invented "Observation:
    # 381 ... Final Answer: 381" followed by the real "Observation: 391": the model is shown two
    # contradicting results, one its own invention (the client was streamed both, too).
    assert stopped or not any("Observation: 381" in s for s in said), said


# -- 7. a tool shared between two SERVICE_TOOLS modules stops the service ----------------------


def test_a_tool_imported_by_another_tool_module_is_loaded_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "rv_weather.py").write_text(
        "from service.tools import tool\n"
        "@tool('get_weather', 'Weather of a city.', {'type': 'object', 'properties': "
        "{'city': {'type': 'string'}}, 'required': ['city']})\n"
        "def get_weather(city):\n    return 'sunny'\n")
    (tmp_path / "rv_travel.py").write_text(
        "from service.tools import tool\n"
        "from rv_weather import get_weather  # reused by a travel tool\n"
        "@tool('plan_trip', 'Plan a trip.', {'type': 'object', 'properties': "
        "{'city': {'type': 'string'}}, 'required': ['city']})\n"
        "def plan_trip(city):\n    return 'go, it is ' + get_weather.fn(city)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        # SERVICE_TOOLS=rv_weather,rv_travel: what lifespan.py builds at start. Now: ConfigError
        # "two tools are named 'get_weather'" (naming neither SERVICE_TOOLS nor a module): the
        # module scan takes the imported Tool for a second one, and the service will not start.
        registry = ToolRegistry([*BUILTIN_TOOLS,
                                 *load_tool_modules(["rv_weather", "rv_travel"])])
        assert {"get_weather", "plan_trip"} <= {t.name for t in registry}
    finally:
        sys.modules.pop("rv_weather", None)
        sys.modules.pop("rv_travel", None)


# -- 8. a deployer's tool named "answer" or "finish" can never run under the text protocol ----


@tool("answer", "Look up the FAQ's answer to a question.",
      {"type": "object", "properties": {"question": {"type": "string"}}, "required": ["question"]})
def faq_answer(question: str) -> str:
    return "Refunds take 5 days."


async def test_a_tool_named_answer_is_called_under_the_text_protocol(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    backend = ScriptedBackend([
        Reply('Thought: check the FAQ\nAction: answer\nAction Input: {"question": "refunds"}'),
        Reply("Final Answer: Refunds take 5 days."),
    ])
    async with supervisor_env(tmp_path, backend, tools=(*BUILTIN_TOOLS, faq_answer)) as env:
        _, events = await _run(env, "how long do refunds take?", "react")
    # Now: "Action: answer" is read as LangChain's "this is the answer" whatever the tools are:
    # no tool runs and the stored answer is the JSON text '{"question": "refunds"}'.
    assert [e.data["name"] for e in events if e.type == "tool.call"] == ["answer"]
    assert events[-2].data["content"] == "Refunds take 5 days.", events[-2].data


# -- 9. a tool's bad timeout is found at its first call, by the model --------------------------


def test_a_tool_with_a_negative_timeout_is_refused_at_definition() -> None:
    # Now: accepted; /api/tools lists "timeout": -1 (NaN: a bare NaN) and every call is the
    # observation "ValueError: `seconds` must be non-negative" (trio.fail_after's), shown to
    # the model, never a start-up error naming the tool.
    with pytest.raises((ConfigError, ValueError)):
        tool("neg", "A tool.", {"type": "object", "properties": {}}, timeout=-1)(lambda: "x")


# -- 10. the auto agent's fallback rule is quadratic in the question: the event loop stops ------


async def test_the_auto_rule_on_a_long_question_does_not_block_the_event_loop(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # The rule decides when the classifier's reply names no agent, or its call fails: a long
    # question overflows the model's context (400), so the rule sees it. _MULTI_STEP's
    # "^\s*\d+[.)]" (\s crosses newlines, re.M tries every line) and "first\b.*\bthen" are
    # quadratic: measured 3.2 s for 20,000 newlines, 13 s for 40,000, 2.8 s for "first " * 8,000;
    # a message may hold 1,000,000 characters (hours). The event loop, so every run and request
    # of the process, waits meanwhile.
    def reply(req: ChatRequest) -> Reply:
        if req.messages[0].content.startswith("Decide how to handle"):
            return Reply("hmm")  # names no agent: the rule decides
        return Reply("ok")

    # 60,000 newlines: about 29 s before (quadratic), a few ms now; the bound below is 10 s, so
    # no machine is too slow for it.
    question = "\n" * 60_000 + "hello"
    async with supervisor_env(tmp_path, ScriptedBackend(reply)) as env:
        started = time.perf_counter()
        handle, events = await _run(env, question, "auto")
        spent = time.perf_counter() - started
    assert handle.status is RunStatus.succeeded
    assert [e.data for e in events if e.type == "decision"] == [{"agent": "chat", "method": "rule"}]
    assert spent < 10.0, f"the event loop was blocked for {spent:.1f} s"
    started = time.perf_counter()
    assert classify_by_rule("first " * 200_000, ["calculator"]) == "chat"
    assert time.perf_counter() - started < 10.0  # hours before


# -- 11. the ReAct parser raises on a long integer in the Action Input: the run crashes --------


async def test_a_long_integer_in_an_action_input_is_an_observation_not_a_crash(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # parse_react promises "Never raises"; json's int parsing raises a plain ValueError past
    # 4,300 digits (Python's int_max_str_digits), and _parse_input catches JSONDecodeError
    # only. Now: the run fails "internal error (ValueError)".
    big = "9" * 5000
    backend = ScriptedBackend([
        Reply('Thought: convert\nAction: unit_convert\nAction Input: {"value": ' + big
              + ', "from_unit": "m", "to_unit": "km"}', chunks=1),
        Reply("Final Answer: too big to convert"),
    ])
    async with supervisor_env(tmp_path, backend) as env:
        handle, events = await _run(env, "convert it", "react")
    errors = [e.data for e in events if e.type == "error"]
    assert handle.status is RunStatus.succeeded, (handle.status, errors)


# -- 12. a tool's own TooSlowError, tool names, hundreds of calls in one step --------------------


@tool("inner_deadline", "A tool with a deadline of its own.",
      {"type": "object", "properties": {}})
async def inner_deadline() -> str:
    with trio.fail_after(0.5):
        await trio.sleep(1)
    return "never"


async def test_a_tools_own_too_slow_error_is_its_error_not_the_tool_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # It was reported "tool inner_deadline timed out after 30s", outcome timeout: the tool's
    # own 0.5 s deadline taken for the service's.
    backend = ScriptedBackend([
        Reply("", tool_calls=[ToolCall("c1", "inner_deadline", {})]),
        Reply("Final Answer: it failed"),
    ])
    async with supervisor_env(tmp_path, backend, tools=(*BUILTIN_TOOLS, inner_deadline)) as env:
        _, events = await _run(env, "try it", "react")
    (result,) = [e.data for e in events if e.type == "tool.result"]
    assert result["error"].startswith("TooSlowError"), result


def test_a_tool_name_a_strict_server_would_refuse_is_refused_at_definition() -> None:
    # Sent to the model with every react/plan call: a server that checks names as OpenAI does
    # refused each of them.
    for name in ("get.weather", "has space", "x" * 65, ""):
        with pytest.raises(ConfigError):
            tool(name, "A tool.", {"type": "object", "properties": {}})(lambda: "x")


async def test_hundreds_of_tool_calls_in_one_step_run_at_most_sixteen(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    calls = [ToolCall(f"c{i}", "calculator", {"expression": f"{i}+1"}) for i in range(200)]
    backend = ScriptedBackend([Reply("", tool_calls=calls), Reply("Final Answer: done")])
    async with supervisor_env(tmp_path, backend) as env:
        handle, events = await _run(env, "add them all", "react")
    results = [e.data for e in events if e.type == "tool.result"]
    assert handle.status is RunStatus.succeeded
    assert len(results) == 200  # every call answered, in one piece
    assert sum("output" in r for r in results) == 16
    assert all(r["error"].startswith("not run: at most 16") for r in results if "error" in r)
