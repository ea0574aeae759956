"""A review of ``/v1`` as a demanding OpenAI SDK user sees it (2026-12-06): the official
``openai`` SDK and raw HTTP against the real server on 127.0.0.1:0, its backend built by the
lifespan from the settings, the simulated llama.cpp / Ollama upstream on loopback behind it
(tests/e2e.py). Each test fails on the code as reviewed, because of the defect its docstring
names: what a client sent is not what the model is given, or a request the service cannot
honour is answered 200 as if it had been.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
import trio

from service.settings import Settings
from service.sim import Reply

from .e2e import GUARD, KINDS, e2e

WEATHER: Any = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
NOW: Any = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {}}}}
MSG: Any = [{"role": "user", "content": "weather in Oslo?"}]


def _sdk(base: str, **kwargs: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base + "/v1", api_key="k", **kwargs)


def _text_of(message: dict[str, Any]) -> str:
    """An upstream message's text: a string, or its text parts (as the server would read)."""
    content = message.get("content")
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content or "")


@pytest.mark.parametrize("part", [{"type": "text"}, {"type": "text", "text": 42},
                                  {"type": "text", "text": None}])
async def test_a_text_part_without_string_text_is_refused_not_dropped(
    settings: Settings, part: dict[str, Any],
) -> None:
    """What a user sees: a user message whose content is a list of parts, one of which is a
    ``text`` part with no string ``text`` (missing, a number, null: a client bug, or a
    template variable left unfilled), is answered 200. The part is dropped silently
    (``_text`` in service/api/openai.py keeps only parts whose ``text`` is a str), so here the
    model is sent a user message ``""``: it answers a question it never saw.

    What should happen: OpenAI refuses it (400 ``invalid_request_error``, "Invalid type for
    'messages[0].content[0].text': expected a string"); llama.cpp's server refuses it too
    (``part.at("text")``). The service's own rule (docs/api.md: "Refused with 422 naming the
    field rather than half done: ... content parts other than text") is that what it cannot
    give the model is refused: ``ChatMessageIn._text_parts`` checks the part's ``type`` only.
    Expected: 422 naming ``messages.0.content``, and nothing sent to the model."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(text="I see no question."))
        with trio.fail_after(GUARD):
            r = await env.client.post("/v1/chat/completions", json={
                "model": "sim-model",
                "messages": [{"role": "user", "content": [part]}]})
        sent = [_text_of(m) for s in env.sim.streams for m in s.body["messages"]]
    told = (r.status_code, r.text[:300], "the model was sent", sent)
    assert 400 <= r.status_code < 500, told
    assert "messages" in str(r.json()["error"].get("param")), told
    assert not sent, told


@pytest.mark.parametrize("kind", KINDS)
async def test_text_parts_are_not_glued_into_one_word(settings: Settings, kind: str) -> None:
    """What a user sees: a user message sent as several text parts (LangChain, LlamaIndex and
    the Vercel AI SDK send a prompt built from pieces this way) reaches the model with the
    parts joined by nothing: ``["Add these two numbers: 12", "34"]`` becomes ``"Add these two
    numbers: 1234"``, one number. The answer is about another question, with a 200.

    What should happen: the parts stay apart, as the model's own servers keep them.
    llama.cpp's server joins a message's text parts with a newline
    (common/chat.cpp ``common_chat_msg::to_json_oaicompat``: ``if (!text.empty()) text +=
    "\\n"``); Ollama's ``/v1`` makes each part a message of its own. Root cause:
    ``_text`` in service/api/openai.py: ``"".join(...)``. Expected: the text the model is given
    still holds "12" and "34" as two numbers (a newline between the parts, or the parts passed
    on as parts)."""
    async with e2e(settings, kind) as env:
        env.sim.script(Reply(text="46"))
        with trio.fail_after(GUARD):
            r = await env.client.post("/v1/chat/completions", json={
                "model": "sim-model", "messages": [{"role": "user", "content": [
                    {"type": "text", "text": "Add these two numbers: 12"},
                    {"type": "text", "text": "34"}]}]})
        assert r.status_code == 200, r.text
        (record,) = env.sim.streams
        users = [_text_of(m) for m in record.body["messages"] if m.get("role") == "user"]
    prompt = "\n".join(users)
    assert "1234" not in prompt, f"the model was asked {users!r}"
    assert "12" in prompt, users
    assert "34" in prompt, users


@pytest.mark.parametrize("kind", KINDS)
async def test_models_retrieve_while_the_backend_is_down_is_a_5xx_not_a_404(
    settings: Settings, kind: str,
) -> None:
    """What a user sees: ``client.models.retrieve("sim-model")`` works while the model's
    server is up; while it is down (restarting, a network blip) the same call raises
    ``openai.NotFoundError`` (404 ``model_not_found``: "no reachable backend has model"). The
    SDK does not retry a 404, and a client that checks its model at start-up (LangChain's
    and many tools' "validate model" step, health checks) concludes the model does not exist
    and gives up, or reconfigures, for what is a passing outage. A chat completion to the
    same model meanwhile gets the right answer: 503 ``backend_unavailable`` (retried).

    What should happen: API.md: "404 unknown id or model ... 503 no backend reachable".
    Root cause: ``_models`` in service/api/openai.py turns a backend that cannot list its
    models into an empty list (``except Exception: models = []``) and ``retrieve_model``
    then answers 404 for every name. Expected: a 5xx (503 ``backend_unavailable``), which the
    SDK retries, when no backend could be asked."""
    async with e2e(settings, kind) as env:
        c = _sdk(env.server.url, max_retries=0)
        with trio.fail_after(GUARD):
            assert (await c.models.retrieve("sim-model")).id == "sim-model"
            await env.stop_sim()
            with pytest.raises(openai.APIStatusError) as got:
                await c.models.retrieve("sim-model")
    error = got.value
    assert error.status_code >= 500, (error.status_code, type(error).__name__, error.body)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_history_tool_call_with_empty_arguments_is_sent_as_no_arguments(
    settings: Settings, kind: str,
) -> None:
    """What a user sees: the follow-up request of a tool round trip carries the assistant's
    earlier call of a function without parameters with ``"arguments": ""`` (what several
    OpenAI-compatible servers and client libraries give for "no arguments"). The model is
    sent that call as ``{"input": ""}``: it is told it called ``get_time`` with an ``input``
    parameter the function does not have, and may keep passing it (or its server's template
    renders an argument that never existed).

    What should happen: empty arguments are no arguments, ``{}``: the service reads a
    model's own ``""`` that way (service/backends/common.py ``parse_arguments``: ``raw == ""``
    -> ``{}``), and so does its own tool runner ("no input: no arguments"). Root cause:
    ``_loads`` in service/api/openai.py wraps any text that is not a JSON object as
    ``{"input": text}``, the empty text included. Expected: the upstream call's arguments
    are ``{}``."""
    async with e2e(settings, kind) as env:
        env.sim.script(Reply(text="It is noon."))
        messages: Any = [
            {"role": "user", "content": "what time is it?"},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "get_time", "arguments": ""}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
        ]
        c = _sdk(env.server.url, max_retries=0)
        with trio.fail_after(GUARD):
            r = await c.chat.completions.create(model="sim-model", messages=messages,
                                                tools=[NOW])
        assert r.choices[0].message.content == "It is noon."
        (record,) = env.sim.streams
    (call,) = [c for m in record.body["messages"] for c in m.get("tool_calls") or ()]
    arguments = call["function"]["arguments"]
    if isinstance(arguments, str):  # the OpenAI protocol: a JSON text
        arguments = json.loads(arguments) if arguments else {}
    assert arguments == {}, f"the model was told it called get_time with {arguments!r}"


async def test_reasoning_effort_is_passed_on_or_refused(settings: Settings) -> None:
    """What a user sees: ``create(..., reasoning_effort="low")`` (an OpenAI chat completions
    parameter, typed by the SDK: "Constrains effort on reasoning for reasoning models") is
    answered 200, but the OpenAI-compatible upstream is never told: the reasoning model
    thinks at its default effort (slower and costlier than asked, or, with ``"minimal"`` /
    ``"none"``, thinking the client turned off). vLLM, SGLang and other OpenAI-compatible
    servers (SERVICE_LLAMACPP_URL: "or any OpenAI-compatible server's") honour the field.

    What should happen: as the brief for every parameter says and docs/api.md practises for
    the others: honoured, passed on, or refused (422 naming it); never accepted and dropped.
    Root cause: ``_PASSED_ON`` in service/api/openai.py lists the fields passed to the model;
    ``reasoning_effort`` is not in it, and ``_Lenient`` (extra="allow") accepts it silently.
    Expected: the upstream request carries ``reasoning_effort: "low"``, or a 4xx names it."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(text="4"))
        c = _sdk(env.server.url, max_retries=0)
        refused: openai.APIStatusError | None = None
        with trio.fail_after(GUARD):
            try:
                await c.chat.completions.create(model="sim-model", messages=MSG,
                                                reasoning_effort="low")
            except openai.APIStatusError as exc:
                refused = exc
        records = list(env.sim.streams)
    if refused is not None:  # refused: fine, if it says why (and is no 5xx the SDK retries)
        assert 400 <= refused.status_code < 500, refused
        assert "reasoning_effort" in str(refused.body), refused.body
        return
    (record,) = records
    assert record.body.get("reasoning_effort") == "low", (
        f"answered 200; the model's server was sent {sorted(record.body)}")


async def test_ollama_a_named_tool_choice_is_not_answered_as_auto(settings: Settings) -> None:
    """What a user sees: with two tools and ``tool_choice={"type": "function", "function":
    {"name": "get_time"}}`` (forcing a call: the common way to get structured output from a
    function's arguments), an Ollama backend is sent both tools and no word of the choice
    (``OllamaBackend.chat_body`` keeps ``tool_choice`` only for ``"none"``). The model is
    free to call the other tool, or none: here it calls ``get_weather``, and the client,
    which forced ``get_time``, gets a ``get_weather`` call with a 200 and reads its
    arguments as ``get_time``'s.

    What should happen: OpenAI: "Specifying a particular tool via {"type": "function",
    "function": {"name": "my_function"}} forces the model to call that tool." docs/api.md
    says ``tool_choice`` is passed on to the model of a ``chat`` run (only ``logit_bias`` is
    named as dropped on Ollama). Ollama has no ``tool_choice``, but the service can give the
    model only the named tool (no other can then be called), or refuse the request (4xx
    naming ``tool_choice``). Expected: one of those two."""
    async with e2e(settings, "ollama") as env:
        env.sim.script(Reply(text="", tool_calls=(
            {"name": "get_weather", "arguments": {"city": "Oslo"}},)))
        with trio.fail_after(GUARD):
            r = await env.client.post("/v1/chat/completions", json={
                "model": "sim-model", "messages": MSG, "tools": [WEATHER, NOW],
                "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
        sent = [s.body for s in env.sim.streams]
    if 400 <= r.status_code < 500:
        assert "tool_choice" in str(r.json()["error"].get("param")), r.text
        return
    offered = [[t["function"]["name"] for t in body.get("tools") or ()] for body in sent]
    assert offered == [["get_time"]], (
        f"tool_choice forced get_time; the model was offered {offered} and the client got "
        f"{r.status_code} {r.text[:300]}")


async def test_ollama_parallel_tool_calls_false_gives_at_most_one_call(
    settings: Settings,
) -> None:
    """What a user sees: ``parallel_tool_calls=False`` (the client's loop runs one tool at a
    time: e.g. each call's result decides the next) on an Ollama backend is answered with two
    tool calls in one message. The field is never sent to Ollama
    (``OllamaBackend.chat_body`` keeps only SAMPLING_OPTIONS, ``response_format`` and
    ``tool_choice: "none"``) and nothing after it holds the answer to it; a client that runs
    only ``tool_calls[0]`` then sends a history with an unanswered call (OpenAI refuses such
    a history: "An assistant message with 'tool_calls' must be followed by tool messages
    responding to each 'tool_call_id'").

    What should happen: OpenAI: ``parallel_tool_calls`` "Whether to enable parallel function
    calling during tool use"; false: at most one call. docs/api.md lists it among the fields
    "passed on to the model of a chat run" (only ``logit_bias`` is named as dropped on
    Ollama). Expected: at most one tool call in the answer (the first), or a 4xx naming
    ``parallel_tool_calls``."""
    async with e2e(settings, "ollama") as env:
        env.sim.script(Reply(text="", tool_calls=(
            {"name": "get_weather", "arguments": {"city": "Oslo"}},
            {"name": "get_time", "arguments": {}})))
        c = _sdk(env.server.url, max_retries=0)
        refused: openai.APIStatusError | None = None
        with trio.fail_after(GUARD):
            try:
                r = await c.chat.completions.create(
                    model="sim-model", messages=MSG,
                    tools=[WEATHER, NOW], parallel_tool_calls=False)
            except openai.APIStatusError as exc:
                refused = exc
    if refused is not None:  # refused: fine, if it says why (and is no 5xx the SDK retries)
        assert 400 <= refused.status_code < 500, refused
        assert "parallel_tool_calls" in str(refused.body), refused.body
        return
    calls = r.choices[0].message.tool_calls or []
    assert len(calls) <= 1, [c.model_dump() for c in calls]


async def test_a_tool_choice_naming_a_tool_not_offered_is_refused(settings: Settings) -> None:
    """``tool_choice`` forcing a function that is not in ``tools``: OpenAI answers 400 ("not
    found in 'tools'"); the service answers 422 naming ``tool_choice``, and nothing is sent to
    the model (on Ollama, where only the named tool is offered, the model was offered none)."""
    async with e2e(settings, "ollama") as env:
        with trio.fail_after(GUARD):
            r = await env.client.post("/v1/chat/completions", json={
                "model": "sim-model", "messages": MSG, "tools": [WEATHER],
                "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
        sent = list(env.sim.streams)
    assert r.status_code == 422, r.text
    assert "tool_choice" in str(r.json()["error"].get("param")), r.text
    assert not sent


@pytest.mark.parametrize("status", [401, 403])
async def test_an_upstream_refusing_the_services_credentials_is_not_retried(
    settings: Settings, status: int,
) -> None:
    """The model's server refuses the service's credentials (a wrong or expired
    ``SERVICE_LLAMACPP_API_KEY``): the same on every try. The client got a 502, which the
    OpenAI SDKs retry twice: three runs stored for one request, three calls refused, and the
    client waiting for the back-off. Now the answer says ``x-should-retry: false`` (the SDKs
    obey it before the status), and its type names the cause, ``backend_auth_failed``."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(status=status, error="invalid api key"),
                       Reply(status=status, error="invalid api key"),
                       Reply(status=status, error="invalid api key"))
        c = _sdk(env.server.url, max_retries=2)
        with trio.fail_after(GUARD), pytest.raises(openai.APIStatusError) as got:
            await c.chat.completions.create(model="sim-model", messages=MSG)
        tries = len(env.sim.streams)
    assert got.value.status_code == 502, got.value
    assert got.value.response.headers.get("x-should-retry") == "false"
    assert (got.value.body or {}).get("type") == "backend_auth_failed", got.value.body
    assert tries == 1, f"the SDK tried {tries} times"
