"""A contract audit (2026-12-06) of the "OpenAI-compatible" and "Operations" sections of
/work/shared/API.md and the December additions for them, as the author of an OpenAI SDK client
would read them: the real server on 127.0.0.1:0, its backend built by the lifespan from the
settings, the simulated llama.cpp / Ollama upstream on loopback (tests/e2e.py).

Each test fails on the code as reviewed, because of the deviation its docstring names: what a
client is told contradicts what the store then holds, or what the service documents of itself.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from service.settings import Settings
from service.sim import Reply

from .e2e import GUARD, KINDS, EventStream, e2e

V1 = "/v1/chat/completions"


def _chunks(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_queued_v1_stream_that_fails_names_no_placeholder_model(
    settings: Settings, kind: str,
) -> None:
    """What is wrong: a ``/v1`` stream naming no model (and no ``SERVICE_DEFAULT_MODEL``) that
    waits for a backend slot (``SERVICE_BACKEND_CONCURRENCY=1``, the slot held by another
    stream) starts at once with ``: queued`` comments. When its call then fails before its
    first token (here the model's server refuses the prompt as over its context, once the
    slot frees), the stream sends a role chunk ``{"model": "default", "delta": {"role":
    "assistant", ...}}`` and then the error chunk. There is no model "default" (it is not in
    ``GET /v1/models``): the call went to ``sim-model``, as ``GET /api/llm-calls`` records it
    (``model: "sim-model"``) and as the run's own events would say. An SDK client that keeps
    ``chunk.model`` (for its logs, its cost accounting, a retry with the same model) is told
    a model the store contradicts. (On success the chunks name the model that answered: the
    suspected "default" shows only on this failure path.)

    What is right: every chunk that names a model names the one the store records for the
    call (or one the backend lists); an error after the queue needs no role chunk at all
    (docs/api.md: a stream cut later "ends with an ``{"error": ...}`` chunk").

    Root cause: service/api/openai.py ``chat_completions`` sets ``shown_model = model or
    "default"``, and ``_stream``'s ``frame`` opens the stream with a role chunk before the first
    shown frame even when that frame is an ``error`` / ``run.finished`` one, naming
    ``handle.result_extra.get("model", model)``: no call has answered, so the placeholder. The
    same happens for a queued stream cancelled, or ended ``backend_busy``, before its call ran,
    and for any stream started by the keep-alive hold (a model loading) that then fails."""
    async with e2e(settings, kind, backend_concurrency=1, default_model=None) as env:
        # The holder's answer hangs after one token; the queued call is refused as too long.
        env.sim.script(Reply(text="busy answer here", hang_after=1),
                       Reply(text="unused", context=1))
        holder = await env.conversation()
        with trio.fail_after(GUARD):
            async with env.post_stream(holder, "hold the slot") as busy:
                held = EventStream(busy)
                seen = await held.read(lambda es: any(e.type == "token" for e in es))
                holder_run = next(e for e in seen if e.type == "run.started").data["run_id"]
                body = {"stream": True,
                        "messages": [{"role": "user", "content": "a b c d e f"}]}
                async with env.client.stream("POST", V1, json=body) as r:
                    assert r.status_code == 200
                    lines = r.aiter_lines()
                    assert await anext(lines) == ": queued, position 1"
                    # The slot frees: the queued call goes upstream and is refused.
                    cancel = await env.client.post(f"/api/runs/{holder_run}/cancel")
                    assert cancel.status_code == 202, cancel.text
                    rest = [line async for line in lines]
            chunks = _chunks(rest)
            assert chunks, rest
            assert chunks[-1].get("error", {}).get("code") == "context_length_exceeded", rest
            calls = (await env.client.get("/api/llm-calls")).json()["data"]
            (call,) = [c for c in calls if c["run_id"] != holder_run]
            listed = {m["id"] for m in (await env.client.get("/v1/models")).json()["data"]}
    assert call["model"] == "sim-model", call
    named = {c["model"] for c in chunks if "model" in c}
    assert named <= {call["model"]} & listed, (
        f"the chunks name {named}; /api/llm-calls records {call['model']!r}; "
        f"/v1/models lists {listed}")


async def test_openapi_documents_the_503_of_models_retrieve(settings: Settings) -> None:
    """What is wrong: API.md: "``GET /openapi.json`` -> the OpenAPI document of all of the
    above", and the project's own rule (README: schemathesis checks "no undocumented
    status"). ``GET /v1/models/{id}`` answers 503 ``backend_unavailable`` while no backend can
    list its models (docs/api.md says so: "it is 503 ``backend_unavailable`` (the SDKs retry
    it), not a 404"), but the OpenAPI document lists only 200 and 404 for it (and 401 with
    keys set). A client
    generated from the document (or a gateway validating responses against it) meets a status
    the contract says cannot happen.

    What is right: the operation's responses include 503 (and 502, for the
    ``backend_auth_failed`` it also passes on), with the error body's schema.

    Root cause: service/api/openai.py ``retrieve_model`` is decorated with
    ``document_response`` for 200 and 404 only, and service/factory.py ``_truthful`` adds the
    statuses the decorators cannot tell for the message endpoints, not for this one."""
    async with e2e(settings, "llamacpp") as env:
        with trio.fail_after(GUARD):
            assert (await env.client.get("/v1/models/sim-model")).status_code == 200
            await env.stop_sim()
            r = await env.client.get("/v1/models/sim-model")
            spec = (await env.client.get("/openapi.json")).json()
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "backend_unavailable", r.text
    documented = sorted(spec["paths"]["/v1/models/{model_id}"]["get"]["responses"])
    assert str(r.status_code) in documented, (
        f"answered {r.status_code}; the OpenAPI document lists {documented}")
    # The same gap elsewhere: a store that cannot write (POST /api/conversations' 503
    # store_unavailable) and a foreign Origin's 403, answered by every endpoint.
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert "403" in op["responses"], (method, path)
            if path.startswith(("/api/conversations", "/api/runs", "/api/llm-calls")):
                assert "503" in op["responses"], (method, path)
