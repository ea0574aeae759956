"""A /v1 client's own `tools` with an agent other than chat (found by a review, 2026-12-05; each
test failed before its fix): react and plan_execute dropped them silently, so the client waited
for tool calls that never came; auto did too whenever it chose one of them. Real hypercorn
server on 127.0.0.1:0 with the scripted backend."""

from __future__ import annotations

import pytest

from service.backends.base import ToolCall
from service.settings import Settings

from ..fakes import Reply, ScriptedBackend
from ..servers import running_server

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.mark.parametrize("agent", ["react", "plan_execute"])
async def test_tools_with_an_agent_that_cannot_pass_them_on_are_refused(
    settings: Settings, agent: str,
) -> None:
    backend = ScriptedBackend([Reply("never")])
    async with running_server(settings, backend) as srv, srv.client() as c:
        r = await c.post("/v1/chat/completions", json={
            "agent": agent, "tools": [WEATHER],
            "messages": [{"role": "user", "content": "weather in Oslo?"}]})
        runs = (await c.get("/api/conversations")).json()["data"]
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == "agent", r.text
    assert "chat agent" in r.json()["error"]["message"]
    assert not backend.streams  # nothing ran
    assert not runs  # nothing stored


async def test_auto_answers_a_request_with_tools_with_chat(settings: Settings) -> None:
    # "What's the weather" looks like a tool task: auto's classifier would have chosen react,
    # which called the service's tools and dropped the client's. The model asks for the
    # client's tool; the call comes back to the client, as with chat.
    backend = ScriptedBackend(lambda req: Reply(
        "", tool_calls=[ToolCall("c1", "get_weather", {"city": "Oslo"})]
    ) if req.tools else Reply("react"))
    async with running_server(settings, backend) as srv, srv.client() as c:
        r = await c.post("/v1/chat/completions", json={
            "agent": "auto", "tools": [WEATHER],
            "messages": [{"role": "user", "content": "use a tool: what's the weather in Oslo?"}]})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert [s.request.tools for s in backend.streams] == [(WEATHER,)]  # one call: chat's
