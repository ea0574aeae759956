"""Where the service did not do what API.md says (found in a contract review, 2026-12-01);
each test failed before its fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionRejected, open_websocket_url

from service.runs import RunSpec, RunStatus
from service.settings import Settings, load_settings
from service.tools import BUILTIN_TOOLS

from ..fakes import Reply, ScriptedBackend, supervisor_env
from ..servers import running_server

pytestmark = pytest.mark.both_stores  # the end-to-end tests run on both stores


def test_llamacpp_url_may_end_with_v1(tmp_path: Path) -> None:
    # As OpenAI clients are configured; it became /v1/v1/...: ready, every completion a 404.
    for url in ("http://127.0.0.1:8080/v1", "http://127.0.0.1:8080/v1/", "http://127.0.0.1:8080"):
        assert load_settings(db=tmp_path / "s.db", llamacpp_url=url).llamacpp_url == (
            "http://127.0.0.1:8080")


async def test_service_tool_timeout_caps_every_tool(settings: Settings) -> None:
    # "seconds one tool call may take": the built-ins' own 5 s won over a smaller setting.
    s = settings.model_copy(update={"tool_timeout": 2.0})
    async with running_server(s) as srv, srv.client() as c:
        tools = (await c.get("/api/tools")).json()["data"]
    assert {t["name"]: t["timeout"] for t in tools} == {t.name: 2.0 for t in BUILTIN_TOOLS}


async def test_a_request_timeout_cannot_outlast_service_run_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # "seconds a whole agent run may take": a message's timeout of 60 ran past a setting of 3.
    backend = ScriptedBackend([Reply("slow answer " * 10, gap=1.0)] * 2)
    async with supervisor_env(tmp_path, backend, run_timeout=3.0) as env:
        conv = await env.conversation()
        start = trio.current_time()
        handle = await env.supervisor.start(RunSpec(conv, "x", timeout=60.0))
        await handle.finished.wait()
        assert handle.status is RunStatus.timed_out
        assert trio.current_time() - start == 3.0
        short = await env.supervisor.start(RunSpec(conv, "y", timeout=1.0))
        await short.finished.wait()
        assert short.status is RunStatus.timed_out  # a shorter one still applies


async def test_v1_models_retrieve(settings: Settings) -> None:
    # The OpenAI SDK's models.retrieve(id) was a 404 for every model.
    backend = ScriptedBackend([])
    async with running_server(settings, backend) as srv, srv.client() as c:
        listed: list[dict[str, Any]] = (await c.get("/v1/models")).json()["data"]
        assert listed
        r = await c.get(f"/v1/models/{listed[0]['id']}")
        assert r.status_code == 200
        assert r.json() == listed[0]
        r = await c.get("/v1/models/no-such-model")
        assert r.status_code == 404
        assert r.json()["error"]["type"] == "model_not_found"


async def test_a_plain_get_on_the_websocket_endpoint_asks_for_an_upgrade(
    settings: Settings,
) -> None:
    # It was a 400 "malformed_json: the body is not valid JSON" (a request without a body).
    async with running_server(settings) as srv, srv.client() as c:
        r = await c.get("/api/ws")
        assert r.status_code == 426
        assert r.headers["Upgrade"] == "websocket"
        assert r.json()["error"]["type"] == "websocket_required"
        # A body that is not JSON still is malformed_json.
        r = await c.post("/api/conversations", content=b"{",
                         headers={"Content-Type": "application/json"})
        assert (r.status_code, r.json()["error"]["type"]) == (400, "malformed_json")
        # And the other way round: a WebSocket handshake on an HTTP endpoint.
        with pytest.raises(ConnectionRejected) as refused:
            async with open_websocket_url(srv.url.replace("http://", "ws://") + "/healthz"):
                pass
        assert refused.value.status_code == 400
        assert refused.value.body is not None
        assert json.loads(refused.value.body)["error"]["type"] == "bad_request"


async def test_openapi_document_is_valid_and_lists_every_endpoint(settings: Settings) -> None:
    # Found in review: five operations had no responses (not valid OpenAPI 3.1), and /metrics
    # and /api/ws were missing, though API.md says the document covers all of them.
    from openapi_spec_validator import validate

    async with running_server(settings) as srv, srv.client() as client:
        spec = (await client.get("/openapi.json")).json()
    validate(spec)
    documented = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    for method, path in [
        ("GET", "/v1/models"), ("GET", "/v1/models/{model_id}"),
        ("POST", "/v1/chat/completions"), ("POST", "/api/conversations"),
        ("GET", "/api/conversations"), ("GET", "/api/conversations/{conversation_id}"),
        ("DELETE", "/api/conversations/{conversation_id}"),
        ("POST", "/api/conversations/{conversation_id}/messages"),
        ("GET", "/api/runs/{run_id}"), ("GET", "/api/runs/{run_id}/events"),
        ("POST", "/api/runs/{run_id}/cancel"), ("GET", "/api/ws"), ("GET", "/healthz"),
        ("GET", "/readyz"), ("GET", "/api/tools"), ("GET", "/api/backends"),
        ("GET", "/api/llm-calls"), ("GET", "/metrics"),
    ]:
        assert (method, path) in documented, (method, path)


@pytest.mark.parametrize(("extra", "field"), [
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]},
     "messages.0.content"),
    # OpenAI's ranges and types, refused there with a 400: passed on, the model's server took
    # them or failed its template on them (a 5xx that OpenAI SDKs retry).
    ({"logit_bias": {"1234": 500}}, "logit_bias"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": 7}}]},
     "tools"),
])
async def test_v1_refuses_what_it_would_not_honour(settings: Settings, extra: dict[str, Any],
                                                   field: str) -> None:
    # Found in review: n=2 got one choice, logprobs none, an image was dropped and the model
    # answered about a picture it never saw, all with a 200.
    from ..fakes import Reply, ScriptedBackend

    backend = ScriptedBackend(lambda req: Reply("ok"))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}
    async with running_server(settings, backend) as srv, srv.client() as client:
        r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field
    assert backend.streams == []


async def test_v1_passes_parallel_tool_calls_on(settings: Settings) -> None:
    from ..fakes import Reply, ScriptedBackend

    backend = ScriptedBackend(lambda req: Reply("ok"))
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    async with running_server(settings, backend) as srv, srv.client() as client:
        r = await client.post("/v1/chat/completions", json={
            "model": "m", "tools": [tool], "parallel_tool_calls": False,
            "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    assert ("parallel_tool_calls", False) in backend.streams[0].request.options


async def test_v1_takes_an_assistant_refusal_part_in_the_history(settings: Settings) -> None:
    # OpenAI allows assistant content parts "text" and "refusal"; the check that refuses images
    # refused those too (found in a review of that change).
    from ..fakes import Reply, ScriptedBackend

    backend = ScriptedBackend(lambda req: Reply("ok"))
    async with running_server(settings, backend) as srv, srv.client() as client:
        r = await client.post("/v1/chat/completions", json={"model": "m", "messages": [
            {"role": "user", "content": "do X"},
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't do X"}]},
            {"role": "user", "content": "ok, then Y"}]})
    assert r.status_code == 200, r.text
    assert [m.content for m in backend.streams[0].request.messages][-2:] == [
        "I can't do X", "ok, then Y"]


async def test_events_retention_reaches_the_supervisor(tmp_path: Path) -> None:
    settings = load_settings(db=tmp_path / "s.db", events_retention_days=2)
    async with running_server(settings) as srv:
        assert srv.services.require_supervisor().events_retention == 2 * 86_400
    assert load_settings(db=tmp_path / "s.db").events_retention_days == 0  # kept for ever


@pytest.mark.parametrize("kind", ["llamacpp", "ollama"])
async def test_a_run_with_no_model_named_stores_the_model_that_answered(
    settings: Settings, kind: str,
) -> None:
    """No model in the request, the conversation or the settings: the backend answers with the
    first model its server lists, and the completion says so (``model: "sim-model"``), as do
    the run's LLM calls, but the run was stored with ``model: null``: what the client was told
    and what the store says differed. Right: the run (live and stored) names that model."""
    from ..e2e import GUARD, e2e

    async with e2e(settings, kind) as env:
        c = env.client
        with trio.fail_after(GUARD):
            r = await c.post("/v1/chat/completions",
                             json={"messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text
            assert r.json()["model"] == "sim-model"
            run_id = r.json()["id"].removeprefix("chatcmpl-")
            run = (await c.get(f"/api/runs/{run_id}")).json()
            assert run["model"] == "sim-model"
            calls = (await c.get("/api/llm-calls", params={"run_id": run_id})).json()["data"]
            assert [call["model"] for call in calls] == ["sim-model"]

            conv = (await c.post("/api/conversations", json={})).json()["id"]
            r = await c.post(f"/api/conversations/{conv}/messages", json={"content": "hi"})
            assert r.status_code == 200, r.text
            assert r.json()["run"]["model"] == "sim-model"
            run = (await c.get(f"/api/runs/{r.json()['run']['id']}")).json()
            assert (run["status"], run["model"]) == ("succeeded", "sim-model")
