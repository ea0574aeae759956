"""Review of the diff 88d6f61..HEAD (2026-12-06, pass u): the ReAct parser's final-answer cut
and trailing-comma repair, and the nameless native tool call passed on. Each test fails on the
code as reviewed, for the defect its docstring names (what is wrong, what is right, the root
cause)."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from service.agents.react_parser import parse_react
from service.runs import RunStatus
from service.settings import Settings
from service.sim import Reply as SimReply

from .agents.test_agents import TOOLS
from .e2e import GUARD, e2e
from .fakes import Reply, ScriptedBackend, supervisor_env

# -- 1. a final answer in Markdown with an "Observation:" bullet -------------------------------


async def test_a_final_answers_observation_bullet_is_not_cut_from_the_stored_answer(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A model finishes with a Markdown report, as real models write them::

        Thought: I have what I need.
        Final Answer: Findings for the server:
        - **Observation:** the disk is 95% full
        - **Cause:** logs are never rotated
        - **Fix:** rotate /var/log daily

    The client is streamed every line of it token by token, but the run's ``message`` and the
    stored reply are only "Findings for the server:": the findings, cause and fix are thrown
    away, and what the client read live contradicts what the conversation holds afterwards.
    (A quoted log line, ``> Observation: connection refused``, is cut the same way.)

    Right: a final answer is the model's text to the end (as before this diff), or at most cut
    at a made-up protocol cycle (an ``Observation:`` that follows an ``Action:``/``Action
    Input:`` pair, or a further ``Final Answer:``), never at a Markdown label inside prose.
    The docstring itself keeps "- **Action:** restart the server" in a summary; the same
    bullet with "Observation" is lost.

    Root cause: service/agents/react_parser.py ``_answer_section`` cuts at the first
    ``_OBSERVATION`` match after "Final Answer:", and ``_LABEL`` matches bullets, bold and
    quoted (``>``) styles of the label: any such line ends the answer."""
    answer = ("Findings for the server:\n- **Observation:** the disk is 95% full\n"
              "- **Cause:** logs are never rotated\n- **Fix:** rotate /var/log daily")
    backend = ScriptedBackend([Reply(f"Thought: I have what I need.\nFinal Answer: {answer}")])
    with trio.fail_after(60):
        async with supervisor_env(tmp_path, backend, tools=TOOLS) as env:
            handle, events, messages = await env.run_to_end("why is the server slow?", "react")
    assert handle.status is RunStatus.succeeded
    streamed = "".join(e.data["text"] for e in events if e.type == "token")
    assert answer in streamed  # what the client was shown live
    (told,) = [e.data["content"] for e in events if e.type == "message"]
    stored = messages[-1].content
    assert told == stored == answer, (
        f"the client was streamed the whole report; the run's message says {told!r} and the "
        f"store holds {stored!r}")


# -- 2. the trailing-comma repair rewrites the inside of strings -------------------------------


def test_the_trailing_comma_repair_does_not_change_a_strings_text() -> None:
    """A text-protocol input with one trailing comma after its last member, whose string holds
    ``,]`` (a regex character class ``[0-9,]``, a list written out ``[red, green,]``)::

        Action: text_stats
        Action Input: {"text": "Tags: [red, green,] and [0-9,]+", }

    is repaired into ``{"text": "Tags: [red, green] and [0-9]+"}``: the tool is given another
    text than the model wrote (for a pattern, another regex), silently, as a success.

    Right: only the commas of the JSON's syntax are dropped; a string's characters are the
    model's and are kept (``{"text": "Tags: [red, green,] and [0-9,]+"}``), or, if that cannot
    be done, the input is reported as malformed (an ``InvalidInput``), never changed.

    Root cause: service/agents/react_parser.py ``_parse_input`` applies ``_TRAILING_COMMA``
    (``,(\\s*[}\\]])``) to the whole raw text with ``re.sub``, blind to JSON strings: every
    ``,]`` and ``,}`` inside a string value is rewritten too."""
    text = "Tags: [red, green,] and [0-9,]+"
    step = parse_react('Thought: count them.\nAction: text_stats\n'
                       f'Action Input: {{"text": "{text}", }}')
    assert step.action == "text_stats"
    assert step.action_input == {"text": text}, (
        f"the model wrote text={text!r}; the tool would be given {step.action_input!r}")


# -- 3. a nameless native call handed to a /v1 client ------------------------------------------


async def test_a_v1_client_is_never_handed_a_tool_call_without_a_name(
    settings: Settings,
) -> None:
    """A /v1 client with its own tools (the chat agent: calls go back to the client) talks to a
    llama.cpp / OpenAI-compatible server whose model emits a tool call with no function name.
    The service now answers 200 ``finish_reason: "tool_calls"`` with ``tool_calls[0].function
    .name == ""``. No client can run a tool named "" (the OpenAI SDK's agents raise "tool not
    found", LangChain "'' is not a valid tool"), and an OpenAI SDK no longer retries as it did on
    the earlier 502; the service itself refuses the name "" in a request's ``tools`` (OpenAI's
    rule ``[A-Za-z0-9_-]{1,64}``). OpenAI never returns such a call.

    Right: a nameless call is passed on as an observation only where the service runs the
    tools (ReAct, plan steps); to a /v1 client's own tools it is a backend error (502
    ``backend_protocol_error``, which SDKs retry) or is dropped, never a call named "".

    Root cause: service/backends/openai_compat.py ``OpenAIChunks`` final chunk now builds
    ``ToolCall(..., name="")`` for every consumer, and service/agents/chat.py ``ChatAgent.run``
    copies every call into ``result_extra["tool_calls"]`` unchecked."""
    tool = {"type": "function", "function": {
        "name": "get_weather", "description": "weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(SimReply(text="", tool_calls=(
            {"name": "", "arguments": {"city": "Oslo"}},)))
        with trio.fail_after(GUARD):
            r = await env.client.post("/v1/chat/completions", json={
                "model": "sim-model", "tools": [tool],
                "messages": [{"role": "user", "content": "weather in Oslo?"}]})
    if r.status_code != 200:
        assert r.status_code == 502, r.text
        return
    calls = r.json()["choices"][0]["message"].get("tool_calls") or []
    names = [c["function"]["name"] for c in calls]
    assert all(names), f"the client was handed tool calls named {names}: {r.text[:400]}"
