"""Three suspects of an earlier review (2026-12-06), shown or refuted with the real server on
127.0.0.1:0, its backend built by the lifespan on the simulated llama.cpp / Ollama upstream
(tests/e2e.py), and real sockets.

- A participant's ``name`` on user/assistant messages of ``/v1/chat/completions``: llama.cpp's
  server (and any OpenAI-compatible server) takes it, the service drops it: shown (failing test).
  Ollama's native ``/api/chat`` has no ``name`` for such messages (only ``tool_name``), and
  Ollama's own ``/v1`` drops it too: dropping it there is right (no test asks otherwise).
- ``stream_options: {"include_usage": null}``: 422 where the servers behind the service (and the
  service itself for every top-level field) take null as absent: shown, minor (failing test).
- ``/api/ws`` with a wrong ``Authorization`` and a valid ``?access_token=``: accepted, exactly as
  the only HTTP endpoint taking a token (``GET /api/runs/{id}/events``) accepts it; refuted
  (passing test pinning that the two agree and that the wrong key gains nothing).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from service.settings import Settings, load_settings
from service.sim import Reply

from .e2e import GUARD, e2e
from .fakes import ScriptedBackend, by_content
from .servers import RunningServer, running_server
from .streams import parse_sse

# --- 1. ``name`` on user / assistant messages --------------------------------------------------

async def test_a_participant_name_reaches_llamacpp(settings: Settings) -> None:
    """What a user sees: a multi-party chat sent to ``/v1/chat/completions`` with
    ``{"role": "user", "name": "alice", ...}``, ``{"role": "user", "name": "bob", ...}`` and an
    assistant ``name`` (OpenAI: "An optional name for the participant. Provides the model
    information to differentiate between participants of the same role.") is answered 200, but
    the llama.cpp upstream is sent the messages without their ``name``: the model cannot tell
    alice from bob.

    What should happen: llama.cpp's server reads ``name`` on every message
    (common/chat.cpp ``common_chat_msgs_parse_oaicompat``: ``if (message.contains("name"))
    msg.tool_name = ...``) and hands it to the chat template as ``message.name``; vLLM and OpenAI
    itself (SERVICE_LLAMACPP_URL may be "any OpenAI-compatible server's") honour it too, and
    docs/api.md says "The request's messages go to the model whole". Root cause:
    ``openai_messages`` in service/backends/openai_compat.py sends ``name`` only
    ``if m.role == "tool"`` (``_to_history`` in service/api/openai.py does keep it). Expected:
    each upstream message carries the ``name`` the client gave it.

    (Ollama's native ``/api/chat`` message has no ``name``, only ``tool_name`` for tool results,
    and Ollama's own ``/v1`` drops ``name`` on other roles: there dropping it is right.)"""
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(text="Bob asked second."))
        with trio.fail_after(GUARD):
            r = await env.client.post("/v1/chat/completions", json={
                "model": "sim-model", "messages": [
                    {"role": "user", "name": "alice", "content": "I like tea."},
                    {"role": "assistant", "name": "barista", "content": "Noted."},
                    {"role": "user", "name": "bob", "content": "Who spoke first?"}]})
        assert r.status_code == 200, r.text
        (record,) = env.sim.streams
    sent = [(m.get("role"), m.get("name")) for m in record.body["messages"]]
    assert sent == [("user", "alice"), ("assistant", "barista"), ("user", "bob")], (
        f"the model's server was sent {sent}")


# --- 2. ``stream_options.include_usage: null`` -------------------------------------------------

async def test_include_usage_null_is_taken_as_absent(settings: Settings) -> None:
    """What a user sees: ``"stream_options": {"include_usage": null}`` (a client whose stream
    options are a struct with an optional ``include_usage`` serialized without skipping
    ``None``: several Rust / Python OpenAI clients do) is refused 422 naming
    ``stream_options.include_usage``, a request every server behind the service accepts.

    What should happen: null is absent, i.e. no usage chunk. llama.cpp's server reads it with
    ``json_value`` (null falls back to the default), vLLM's ``StreamOptions.include_usage`` is
    ``Optional[bool]``, Ollama's Go ``bool`` leaves null as false; the service itself takes null
    as absent for every top-level field (``stream: null`` "not streamed", ``stream_options:
    null``). Root cause: ``StreamOptions.include_usage: bool = False`` in
    service/api/openai_request.py (not ``bool | None``). Minor: the official OpenAI SDKs never
    send it (typed ``bool``). Expected: 200, a stream without a usage chunk."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(text="hi"), Reply(text="hi"))
        body: dict[str, Any] = {"model": "sim-model", "stream": True,
                                "messages": [{"role": "user", "content": "hi"}]}
        with trio.fail_after(GUARD):
            control = await env.client.post("/v1/chat/completions",
                                            json={**body, "stream_options": None})
            r = await env.client.post("/v1/chat/completions",
                                      json={**body, "stream_options": {"include_usage": None}})
    assert control.status_code == 200, control.text  # the whole object null: taken as absent
    assert r.status_code == 200, r.text[:300]
    chunks = [f["data"] for f in parse_sse(r.text) if f["data"] != "[DONE]"]
    assert all(c.get("usage") is None for c in chunks), chunks


# --- 3. ``/api/ws``: a wrong Authorization with a valid access_token ---------------------------

KEYS = ("key-a", "key-b")
A = {"Authorization": "Bearer key-a"}
WRONG = {"Authorization": "Bearer not-a-key"}


def _ws(srv: RunningServer, query: str = "") -> str:
    return srv.url.replace("http://", "ws://") + "/api/ws" + query


async def test_ws_wrong_header_with_a_valid_token_is_judged_as_the_sse_stream_is(
    settings: Settings,
) -> None:
    """Refutes the suspect (this test passes): ``/api/ws`` with a wrong ``Authorization`` and a
    valid ``?access_token=`` is accepted, but so is ``GET /api/runs/{id}/events``, the only HTTP
    endpoint that takes a token (every other one ignores ``access_token``, so there no two
    credentials can conflict). Both go through ``_authorize`` in service/factory.py: the header
    first, then the token. The docs (operations.md "Browsers") say nothing of both at once;
    RFC 6750 forbids the *client* to send two and lets a server refuse it (``invalid_request``),
    but does not require it. Nothing is gained by the wrong header: the socket acts for the
    token's key only (key-b's conversation stays out of reach), and without the token the same
    wrong header is refused."""
    keyed = settings.model_copy(update={"api_keys": KEYS})
    async with running_server(keyed, ScriptedBackend(by_content)) as srv, \
            srv.client() as client:
        conv = (await client.post("/api/conversations", json={}, headers=A)).json()["id"]
        other = (await client.post("/api/conversations", json={},
                                   headers={"Authorization": "Bearer key-b"})).json()["id"]
        run = (await client.post(f"/api/conversations/{conv}/messages", headers=A,
                                 json={"content": "hi"})).json()["run"]["id"]
        token = (await client.post("/api/tokens", headers=A)).json()["token"]
        with trio.fail_after(GUARD):
            sse = await client.get(f"/api/runs/{run}/events", headers=WRONG,
                                   params={"access_token": token})
            assert sse.status_code == 200, sse.text  # HTTP: the same combination accepted
            assert (await client.get(f"/api/runs/{run}/events",
                                     headers=WRONG)).status_code == 401
            with pytest.raises(ConnectionRejected) as rejected:
                async with open_websocket_url(_ws(srv), extra_headers=[
                        (b"Authorization", b"Bearer not-a-key")]):
                    pass
            assert rejected.value.status_code == 401
            async with open_websocket_url(_ws(srv, f"?access_token={token}"), extra_headers=[
                    (b"Authorization", b"Bearer not-a-key")]) as ws:
                await ws.send_message(json.dumps(
                    {"type": "message", "conversation_id": other, "content": "not mine"}))
                refused = json.loads(await ws.get_message())
                assert refused["type"] == "error", refused  # key-b's conversation: not found
                await ws.send_message(json.dumps(
                    {"type": "message", "conversation_id": conv, "content": "mine"}))
                while (event := json.loads(await ws.get_message()))["type"] != "run.finished":
                    assert event["type"] != "error", event
        mine = (await client.get(f"/api/conversations/{conv}", headers=A)).json()["messages"]
        assert "mine" in [m["content"] for m in mine]


@pytest.mark.embedded
async def test_participant_names_are_taken_by_the_real_llamacpp_server(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The names now passed on are taken by llama.cpp's real server (the embedded one, on the
    tiny model): answered 200, not refused."""
    pytest.importorskip("xllamacpp", reason="needs the embedded extra")
    for var in ("SERVICE_DEFAULT_MODEL", "SERVICE_EMBEDDED_CTX", "SERVICE_EMBEDDED_MAX_TOKENS"):
        monkeypatch.delenv(var, raising=False)
    settings = load_settings(db=tmp_path / "s.db", backend="embedded", gguf=tiny_model,
                             default_model="tiny", embedded_max_tokens=4)
    async with running_server(settings, from_settings=True) as srv, srv.client() as c:
        c.timeout = httpx.Timeout(120)
        with trio.fail_after(120):
            r = await c.post("/v1/chat/completions", json={"messages": [
                {"role": "user", "name": "alice", "content": "I like tea."},
                {"role": "assistant", "name": "barista", "content": "Noted."},
                {"role": "user", "name": "bob", "content": "Who spoke first?"}]})
    assert r.status_code == 200, r.text
