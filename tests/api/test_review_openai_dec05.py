"""A review of ``POST /v1/chat/completions`` (2026-12-05): what an OpenAI client sends is not
what the model is given, and a malformed option is a 500. Each test fails on the code as
reviewed. Real hypercorn server on 127.0.0.1:0, its backend built by the lifespan from the
settings, the simulator (llama.cpp / Ollama protocols) on loopback behind it (tests/e2e.py)."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from service.settings import Settings
from service.sim import Reply

from ..e2e import GUARD, KINDS, e2e


def _sent(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in messages]


@pytest.mark.parametrize("kind", KINDS)
async def test_v1_earlier_turns_of_a_long_request_reach_the_model(
    settings: Settings, kind: str,
) -> None:
    """The client's ``messages`` are the prompt: OpenAI (and llama.cpp's or Ollama's own
    ``/v1``) give the model every one of them, or refuse the request (400
    ``context_length_exceeded``, as API.md says for a prompt over the model's context). The
    service runs the request's history through ``trim_history`` with the budget meant for its
    own stored conversations (``SERVICE_HISTORY_CHARS``, 24,000 characters:
    service/agents/__init__.py ``run``), so older turns past it are dropped silently: here a
    document the client sent in an earlier turn (~32,000 characters, ~8k tokens, a fraction of
    any current model's context) never reaches the model, which is asked about it and answers
    200 without it; and what it is sent starts with an assistant message (templates that need
    user/assistant alternation refuse that). docs/architecture.md: "the request's messages are
    the history the agent sees". Expected: the model is sent all the messages, as they came."""
    async with e2e(settings, kind) as env:
        document = "lorem ipsum dolor sit amet " * 1200 + "The secret word is PINEAPPLE."
        messages = [
            {"role": "user", "content": "Read this document:\n" + document},
            {"role": "assistant", "content": "I have read it."},
            {"role": "user", "content": "What is the secret word in the document?"},
        ]
        env.sim.script(Reply(text="PINEAPPLE"))
        with trio.fail_after(GUARD):
            r = await env.client.post("/v1/chat/completions", json={
                "model": "sim-model", "messages": messages})
        assert r.status_code == 200, r.text
        (record,) = env.sim.streams
        sent = _sent(record.body["messages"])
    assert sent == _sent(messages), (
        f"the model was sent {[(role, len(text)) for role, text in sent]} "
        f"(role, characters) of {[(m['role'], len(m['content'])) for m in messages]}")


async def test_v1_a_system_message_keeps_its_place_in_the_conversation(
    settings: Settings,
) -> None:
    """A system (or developer) message sent mid-conversation (an instruction that applies from
    that turn on, as agent frameworks insert them before the last user turn) is moved ahead of
    every other message: ``trim_history`` returns ``system + kept`` whatever the order the
    client sent. The model is given another conversation than the client's: here "answer in
    French from now on" becomes the conversation's opening instruction, so the model sees its
    own earlier English answer as having broken it. OpenAI, llama.cpp's server and Ollama keep
    the messages in the order sent (and a template that refuses a late system message says
    so, rather than the prompt being rewritten silently). Expected: the upstream request has
    the messages in the client's order."""
    async with e2e(settings, "llamacpp") as env:
        messages = [
            {"role": "user", "content": "Say hello."},
            {"role": "assistant", "content": "Hello!"},
            {"role": "system", "content": "From now on, answer in French."},
            {"role": "user", "content": "Say goodbye."},
        ]
        env.sim.script(Reply(text="Au revoir !"))
        with trio.fail_after(GUARD):
            r = await env.client.post("/v1/chat/completions", json={
                "model": "sim-model", "messages": messages})
        assert r.status_code == 200, r.text
        (record,) = env.sim.streams
    assert _sent(record.body["messages"]) == _sent(messages)


@pytest.mark.parametrize("stream", [False, True])
async def test_v1_a_malformed_json_schema_response_format_is_not_a_500(
    settings: Settings, stream: bool,
) -> None:
    """``response_format`` is passed on to the model (docs/api.md); to an Ollama backend it is
    turned into ``format`` by ``OllamaBackend.chat_body``, which reads
    ``(fmt.get("json_schema") or {}).get("schema")`` from the client's object unchecked. A
    ``json_schema`` that is not an object (a string: a client passing the schema's name, or a
    JSON text) raises AttributeError inside the run: the client gets 500 ``internal_error``
    ("a bug"), which the OpenAI SDKs retry twice (three failed runs stored for one bad
    request), instead of a 4xx saying what is wrong with the field (API.md: "422 invalid
    fields (naming the field)"; OpenAI answers 400 ``invalid_request_error`` with
    ``param: "response_format..."``; the llama.cpp backend's server refuses it with a 400,
    which the service passes on as 400). Expected: not a 5xx; a 4xx names ``response_format``
    (or the option is taken as Ollama's JSON mode: a 200)."""
    async with e2e(settings, "ollama") as env:
        env.sim.script(Reply(text='{"a": 1}'))
        with trio.fail_after(GUARD):
            r = await env.client.post("/v1/chat/completions", json={
                "model": "sim-model", "stream": stream,
                "messages": [{"role": "user", "content": "give me JSON"}],
                "response_format": {"type": "json_schema", "json_schema": "my_schema"}})
    told = (r.status_code, r.text[:300])
    assert r.status_code < 500, f"a malformed response_format was answered {told}"
    if r.status_code >= 400:
        error = r.json()["error"]
        assert "response_format" in str(error.get("param") or error.get("field")), told
