"""A review (2026-12-07) of the documents as a new user types them: README.md's "short tour",
docs/api.md, docs/operations.md and the shared contract /work/shared/API.md, executed
literally against the real server on 127.0.0.1:0 with the simulated llama.cpp / Ollama
upstream on loopback (tests/e2e.py).

The tests marked "Failed before its fix" failed on the code as reviewed: ``/v1`` fields that
OpenAI refuses and API.md's "422 invalid fields" covers, passed on instead (a ``tool_choice``
string outside OpenAI's values, a user message without ``content``); a stored history
trimmed to ``SERVICE_HISTORY_CHARS`` that is not "the newest earlier turns" but can open
with a reply whose question was cut (docs/operations.md). The others pin claims
that held and that no other test pinned (each docstring quotes the line it checks). Nothing
here depends on wall-clock time (the ``fail_after`` guards only bound waits).
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import openai
import pytest
import trio

from service.settings import Settings
from service.sim import Reply
from service.tokens import TokenSigner

from .e2e import GUARD, e2e

J = {"content-type": "application/json"}  # the tour's $J
KEY = "k1"


def _sse(text: str) -> list[tuple[int, str, dict[str, Any]]]:
    """(id, event, data) of each frame of an SSE body, in order (comments skipped)."""
    frames = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines()
                      if ": " in line and not line.startswith(":"))
        if "event" in fields:
            frames.append((int(fields["id"]), fields["event"], json.loads(fields["data"])))
    return frames


async def test_the_readme_tour_typed_literally(settings: Settings) -> None:
    """README.md "A short tour": each curl line, with the bodies sent as the tour sends them
    (``-H "$J" -d '...'``: a raw JSON text with ``content-type: application/json``), answers
    what API.md says: a ``/v1`` SSE stream ending ``data: [DONE]``; the OpenAI list shape; a
    201 conversation whose ``id`` the tour's python one-liner reads; a message stream of
    ``id: <seq>\\nevent: <type>\\ndata: <json>`` frames from 1, ``run.started`` with
    ``{"run_id", "conversation_id", "agent", "model"}`` and last ``run.finished``
    ``{"status", "usage"}``; the stored conversation with messages ``[{id, role, content,
    status, created_at, run_id}]`` oldest first; ``/api/llm-calls?limit=5`` rows with the
    interceptor's fields; ``/readyz``, ``/api/backends``, ``/api/tools`` and
    ``/openapi.json``."""
    async with e2e(settings, "llamacpp") as env:
        c = env.client
        with trio.fail_after(GUARD):
            r = await c.post("/v1/chat/completions", headers=J, content=(
                '{"messages": [{"role": "user", "content": "hello"}], "stream": true, '
                '"max_tokens": 16}'))
            assert r.status_code == 200, r.text
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in r.text.splitlines() if line]
            assert lines[-1] == "data: [DONE]"
            chunks = [json.loads(line[6:]) for line in lines[:-1]]
            assert {ch["object"] for ch in chunks} == {"chat.completion.chunk"}
            assert env.sim.streams[-1].body["max_tokens"] == 16

            models = (await c.get("/v1/models")).json()
            assert models["object"] == "list"
            assert models["data"][0]["id"] == "sim-model"

            r = await c.post("/api/conversations", headers=J, content='{"title": "first"}')
            assert r.status_code == 201, r.text
            conv = r.json()
            assert {"id", "title", "created_at", "updated_at"} <= set(conv)
            cid = conv["id"]

            r = await c.post(f"/api/conversations/{cid}/messages", headers=J,
                             content='{"content": "hi", "stream": true}')
            assert r.status_code == 200
            frames = _sse(r.text)
            assert [f[0] for f in frames] == list(range(1, len(frames) + 1))
            first, last = frames[0], frames[-1]
            assert first[1] == "run.started"
            assert set(first[2]) == {"run_id", "conversation_id", "agent", "model"}
            assert first[2]["conversation_id"] == cid
            assert last[1] == "run.finished"
            assert last[2]["status"] == "succeeded"
            assert "usage" in last[2]
            assert r.headers["x-run-id"] == first[2]["run_id"]

            stored = (await c.get(f"/api/conversations/{cid}")).json()
            msgs = stored["messages"]
            assert [m["role"] for m in msgs] == ["user", "assistant"]
            for m in msgs:
                assert {"id", "role", "content", "status", "created_at", "run_id"} <= set(m)
            assert msgs[0]["content"] == "hi"

            calls = (await c.get("/api/llm-calls?limit=5")).json()["data"]
            assert 1 <= len(calls) <= 5
            assert {"backend", "model", "started_at", "ttft", "duration", "prompt_tokens",
                    "completion_tokens", "outcome"} <= set(calls[0])

            ready = await c.get("/readyz")
            assert ready.status_code == 200
            (backend,) = (await c.get("/api/backends")).json()["data"]
            assert {"url", "reachable", "models", "last_error", "latency"} <= set(backend)
            tools = (await c.get("/api/tools")).json()["data"]
            assert tools
            assert {"name", "description", "parameters", "timeout"} <= set(tools[0])
            paths = (await c.get("/openapi.json")).json()["paths"]
            assert {"/v1/chat/completions", "/api/conversations", "/api/runs/{run_id}/events",
                    "/api/ws", "/healthz", "/readyz", "/metrics"} <= set(paths)


async def test_the_bearer_scheme_is_case_insensitive(settings: Settings) -> None:
    """API.md: "401 missing/wrong key" with ``SERVICE_API_KEYS``; the ``Authorization``
    header's scheme is case-insensitive (RFC 7235), so ``bearer KEY`` (as some clients and
    proxies send it) is the key, not a wrong one; a wrong key is 401 with
    ``WWW-Authenticate``."""
    async with e2e(settings, "llamacpp", api_keys=(KEY,)) as env:
        for scheme in ("Bearer", "bearer", "BEARER"):
            r = await env.client.get("/api/tools", headers={"Authorization": f"{scheme} {KEY}"})
            assert r.status_code == 200, (scheme, r.text)
        r = await env.client.get("/api/tools", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "unauthorized"
        assert r.headers["www-authenticate"].startswith("Bearer")


async def test_an_expired_browser_token_is_a_401_saying_so(settings: Settings) -> None:
    """docs/operations.md "Browsers": "An expired token is a 401 saying so
    (``WWW-Authenticate: Bearer error="invalid_token"``), not "wrong key"", and "a token works
    nowhere else" than ``/api/runs/{id}/events`` and ``/api/ws``. The expired token is a
    genuine one, signed for the key as ``POST /api/tokens`` signs it, issued ten minutes ago
    (its life is 5 minutes)."""
    async with e2e(settings, "llamacpp", api_keys=(KEY,)) as env:
        c = env.client
        auth = {"Authorization": f"Bearer {KEY}"}
        cid = (await c.post("/api/conversations", json={}, headers=auth)).json()["id"]
        r = await c.post(f"/api/conversations/{cid}/messages", json={"content": "x"},
                         headers=auth)
        run = r.json()["run"]["id"]
        fresh = (await c.post("/api/tokens", headers=auth)).json()["token"]
        assert (await c.get(f"/api/runs/{run}/events?access_token={fresh}")).status_code == 200
        assert (await c.get(f"/api/runs/{run}?access_token={fresh}")).status_code == 401

        expired, _ = TokenSigner((KEY.encode(),)).issue(KEY.encode(), time.time() - 600)
        r = await c.get(f"/api/runs/{run}/events?access_token={expired}")
        assert r.status_code == 401
        assert 'error="invalid_token"' in r.headers["www-authenticate"]
        assert "expired" in r.json()["error"]["message"]


async def test_model_ids_with_path_parts_are_retrieved_and_used(settings: Settings) -> None:
    """docs/api.md: "``GET /v1/models/{id}`` with a name without a tag also finds an Ollama
    server's ``{id}:latest`` (... the tag follows a ``:`` in the name's last path part),
    answered under the name asked for", through the OpenAI SDK's ``models.retrieve`` (README:
    "any OpenAI SDK works unchanged"): Ollama names such as ``hf.co/org/model:Q4_K_M`` and
    ``library/llama3.2`` carry slashes, which the SDK puts in the path as they are."""
    async with e2e(settings, "ollama") as env:
        env.sim.models[:] = ["hf.co/org/model:Q4_K_M", "library/llama3.2:latest"]
        async with openai.AsyncOpenAI(base_url=env.server.url + "/v1", api_key="unused",
                                      max_retries=0) as sdk:
            with trio.fail_after(GUARD):
                got = await sdk.models.retrieve("hf.co/org/model:Q4_K_M")
                assert got.id == "hf.co/org/model:Q4_K_M"
                got = await sdk.models.retrieve("library/llama3.2")
                assert got.id == "library/llama3.2"
                done = await sdk.chat.completions.create(
                    model="library/llama3.2", messages=[{"role": "user", "content": "x"}])
        assert done.choices[0].message.content
        assert done.model == "library/llama3.2"


async def test_tools_list_the_timeout_that_applies(settings: Settings) -> None:
    """API.md: ``GET /api/tools`` → ``{name, description, parameters, timeout}``;
    docs/operations.md: ``SERVICE_TOOL_TIMEOUT`` is an upper bound ("a tool's own timeout
    applies only when shorter"): with it at 2 s, every built-in tool (5 s of its own) lists
    2."""
    async with e2e(settings, "llamacpp", tool_timeout=2.0) as env:
        tools = (await env.client.get("/api/tools")).json()["data"]
        assert tools
        assert {t["timeout"] for t in tools} == {2.0}


async def test_anonymous_readyz_names_what_is_down_but_not_why(settings: Settings) -> None:
    """API.md: "``GET /readyz`` → ... else 503 naming what is down"; docs/operations.md:
    "the probes say ok/down to anyone and why only to a request with a key (a backend's host
    and error text are not for anonymous callers)"."""
    async with e2e(settings, "llamacpp", api_keys=(KEY,)) as env:
        await env.stop_sim()
        anon = await env.client.get("/readyz")
        assert anon.status_code == 503
        assert anon.json()["down"] == ["backend"]
        assert "127.0.0.1" not in anon.text
        assert "Error" not in anon.text
        keyed = await env.client.get("/readyz", headers={"Authorization": f"Bearer {KEY}"})
        assert keyed.status_code == 503
        assert "127.0.0.1" in keyed.json()["checks"]["backend"]


@pytest.mark.parametrize("kind", ["llamacpp", "ollama"])
async def test_v1_fields_a_client_sends_as_null_or_developer_role(
    settings: Settings, kind: str,
) -> None:
    """API.md "where it is silent, do what a user of an OpenAI-compatible server ... would
    expect": fields OpenAI accepts as ``null`` (``stop``, ``max_tokens``, ``temperature``,
    ``tools``, ``stream_options``, ``n``), a string ``stop``, and the ``developer`` role (the
    OpenAI SDK's name for a system message) are a 200, the developer message reaching the
    model as its system message."""
    async with e2e(settings, kind) as env:
        c = env.client
        base = [{"role": "user", "content": "hello"}]
        for extra in ({"stop": None}, {"max_tokens": None}, {"temperature": None},
                      {"tools": None}, {"stream_options": None}, {"n": None}, {"n": 1},
                      {"stop": "\n"}):
            r = await c.post("/v1/chat/completions", json={"messages": base, **extra})
            assert r.status_code == 200, (extra, r.text)
        r = await c.post("/v1/chat/completions", json={"messages": [
            {"role": "developer", "content": "be brief"}, {"role": "user", "content": "x"}]})
        assert r.status_code == 200, r.text
        assert env.sim.streams[-1].body["messages"][0] == {"role": "system",
                                                            "content": "be brief"}


async def test_bodies_and_queries_as_documented(settings: Settings) -> None:
    """docs/api.md: "Request bodies must be ``Content-Type: application/json`` (or
    ``application/*+json``), else 415"; "a 204 has no ``Content-Type``"; "an empty query value
    ... is taken as absent; a value that is not one is a 422 naming it"; "unknown query
    parameters are ignored"; a body past ``SERVICE_MAX_BODY_BYTES`` on an endpoint that reads
    none (docs/operations.md: "the request then does nothing") leaves the conversation."""
    async with e2e(settings, "llamacpp", max_body_bytes=4096) as env:
        c = env.client
        r = await c.post("/api/conversations", content=b"{}",
                         headers={"content-type": "application/merge-patch+json"})
        assert r.status_code == 201, r.text
        cid = r.json()["id"]
        r = await c.post("/api/conversations", content=b'{"title": "x"}')
        assert r.status_code == 415
        assert r.json()["error"]["type"] == "unsupported_media_type"
        r = await c.get("/api/conversations?limit=&_=123")
        assert r.status_code == 200
        r = await c.get("/api/conversations?limit=abc")
        assert r.status_code == 422
        assert r.json()["error"]["field"] == "limit"
        r = await c.request("DELETE", f"/api/conversations/{cid}", content=b"x" * 8192)
        assert r.status_code == 413
        assert (await c.get(f"/api/conversations/{cid}")).status_code == 200
        r = await c.delete(f"/api/conversations/{cid}")
        assert r.status_code == 204
        assert "content-type" not in r.headers
        assert (await c.delete(f"/api/conversations/{cid}")).status_code == 404


async def test_a_cancelled_runs_stream_ends_with_its_partial_answer(settings: Settings) -> None:
    """API.md: "``POST /api/runs/{id}/cancel`` → 202; the run ends ``cancelled`` promptly, its
    partial answer stored", "Every stream ends with ``run.finished``"; docs/api.md: of a run
    that did not succeed, ``run.finished`` also carries ``content``: its reply as stored."""
    async with e2e(settings, "llamacpp") as env:
        c = env.client
        cid = await env.conversation()
        env.sim.script(Reply(text="one two three four", hang_after=2))
        with trio.fail_after(GUARD):
            async with env.post_stream(cid, "go") as s:
                pieces = s.aiter_bytes()
                body = b""
                while body.count(b"event: token") < 2:
                    body += await anext(pieces)
                run = s.headers["x-run-id"]
                r = await c.post(f"/api/runs/{run}/cancel")
                assert r.status_code == 202
                async for piece in pieces:
                    body += piece
        frames = _sse(body.decode())
        assert frames[-1][1] == "run.finished"
        assert frames[-1][2]["status"] == "cancelled"
        assert frames[-1][2]["content"] == "one two "
        reply = await env.reply_of(cid, run)
        assert reply["content"] == "one two "
        assert (await c.get(f"/api/runs/{run}")).json()["status"] == "cancelled"


@pytest.mark.parametrize("kind", ["llamacpp", "ollama"])
async def test_a_tool_choice_string_outside_openais_values_is_a_422(
    settings: Settings, kind: str,
) -> None:
    """Failed before its fix. API.md "Endpoints": "422 invalid fields (naming the field)";
    docs/api.md
    "OpenAI-compatible endpoint": "Refused with 422 naming the field rather than half done:
    ... a ``tool_choice`` naming a function not in ``tools``", and ``response_format`` "is
    checked for OpenAI's shape first ... 422 naming it otherwise". OpenAI's ``tool_choice`` is
    ``"none"``, ``"auto"``, ``"required"`` or a named function; a typo ``"requried"`` is an
    invalid field.

    What happens: 200. Only an object ``tool_choice`` is checked
    (service/api/openai_request.py ``_a_named_tool_is_offered``); any string goes on. On
    Ollama (service/backends/ollama.py, which maps ``tool_choice`` itself) the typo is taken
    as ``auto``: every tool offered, nothing forced, the client's intent silently dropped.
    On llama.cpp it is sent upstream verbatim (the simulator answers; llama.cpp's own server
    refuses an unknown ``tool_choice``, so the client gets the backend's 400
    ``backend_rejected_request`` instead of the service's 422 naming the field)."""
    async with e2e(settings, kind) as env:
        tools = [{"type": "function", "function": {"name": "f"}}]
        r = await env.client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "tools": tools,
            "tool_choice": "requried"})
        assert r.status_code == 422, (r.status_code, env.sim.streams[-1].body if
                                      env.sim.streams else None)
        assert r.json()["error"]["param"] == "tool_choice"


@pytest.mark.parametrize("message", [{"role": "user"}, {"role": "user", "content": None}])
async def test_a_user_message_without_content_is_a_422(
    settings: Settings, message: dict[str, Any],
) -> None:
    """Failed before its fix. API.md: "422 invalid fields (naming the field)"; docs/api.md
    "OpenAI-compatible endpoint": "Refused with 422 naming the field rather than half done:
    ... (and a text part whose ``text`` is not a string ...)" -- the code's own reason for that
    one (service/api/openai_request.py ``ChatMessageIn._text_parts``): "Dropped, the model was
    asked nothing (OpenAI refuses it too)". OpenAI requires a user message's ``content``.

    What happens: a user message with no ``content`` (or ``null``) is a 200: the model is sent
    ``{"role": "user", "content": ""}`` and its answer to nothing is returned and stored as a
    completion. ``ChatMessageIn.content`` defaults to None for every role; only the assistant
    role (with ``tool_calls``) may lack it in OpenAI's schema."""
    async with e2e(settings, "llamacpp") as env:
        r = await env.client.post("/v1/chat/completions", json={"messages": [message]})
        sent = env.sim.streams[-1].body["messages"] if env.sim.streams else None
        assert r.status_code == 422, (r.status_code, sent)
        assert r.json()["error"]["param"] == "messages.0.content"


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "c1", "type": "function",
            "function": {"name": "calc", "arguments": "{}"}}]},
        {"role": "tool", "content": "4"}]}, "messages.2.tool_call_id"),
    ({"messages": [{"role": "user", "content": "x"}], "seed": 2**64}, "seed"),
], ids=["tool-without-id", "seed-past-int64"])
async def test_a_tool_message_without_its_call_id_or_a_seed_past_64_bits_is_a_422(
    settings: Settings, body: dict[str, Any], param: str,
) -> None:
    """Fixed (helper-140's note): OpenAI refuses a ``tool`` message without ``tool_call_id``
    and a ``seed`` past a 64-bit integer; both were passed on (the result paired with no
    call; the seed overflowing the model server's integer). A 422 naming the field now, the
    model not called."""
    async with e2e(settings, "llamacpp") as env:
        r = await env.client.post("/v1/chat/completions", json=body)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["param"] == param
        assert env.sim.streams == []


async def test_the_stored_history_handed_to_the_model_is_whole_turns(settings: Settings) -> None:
    """Failed before its fix. docs/operations.md "Settings": ``SERVICE_HISTORY_CHARS`` is "a stored
    conversation's history budget handed to an agent: the newest earlier turns that fit" (a
    turn: a question and its reply; ``shorter_history`` in the same module drops "a user
    message and what followed it" together).

    What happens: the budget is spent message by message, so a reply is kept without the
    question it answered. With a 60-character budget, after four short turns the model is
    sent ``system, assistant "answer2 answer2 ", user "question number 3", ...``: the history
    opens with an orphan assistant message. Besides the model reading an answer to a
    question it never sees, the chat templates that require user/assistant alternation
    (Mistral's, Llama 2's, Gemma's: "Conversation roles must alternate user/assistant/...")
    make llama.cpp's server refuse such a prompt, and the conversation's next messages with
    it. Likely spot: service/agents/history.py ``trim_history`` (its units are single
    messages, a tool call's results aside; a user message and its reply are not one unit)."""
    async with e2e(settings, "llamacpp", history_chars=60) as env:
        cid = await env.conversation(system="SYS")
        with trio.fail_after(GUARD):
            for i in range(4):
                env.sim.script(Reply(text=f"answer{i} answer{i} "))
                r = await env.client.post(f"/api/conversations/{cid}/messages",
                                          json={"content": f"question number {i}"})
                assert r.status_code == 200, r.text
            env.sim.script(Reply(text="ok"))
            r = await env.client.post(f"/api/conversations/{cid}/messages",
                                      json={"content": "after"})
            assert r.status_code == 200, r.text
        sent = [(m["role"], m["content"]) for m in env.sim.streams[-1].body["messages"]]
        assert sent[-1] == ("user", "after")
        turns = [m for m in sent if m[0] != "system"]
        assert turns[0][0] == "user", sent
        for before, message in itertools.pairwise(turns):
            if message[0] == "assistant":
                assert before[0] == "user", sent
