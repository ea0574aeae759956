"""SSE, WebSocket and the OpenAI-compatible endpoint against the real server on port 0."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from service.backends.base import ChatRequest, ToolCall
from service.settings import Settings

from ..fakes import Reply, ScriptedBackend, by_content
from ..servers import RunningServer, running_server
from ..streams import parse_sse, ws_url

pytestmark = pytest.mark.both_stores  # the end-to-end tests run on both stores


async def _conv(client: httpx.AsyncClient) -> str:
    r = await client.post("/api/conversations", json={})
    return str(r.json()["id"])


async def test_sse_stream_of_a_run(settings: Settings) -> None:
    async with running_server(settings, ScriptedBackend(by_content)) as srv, \
            srv.client() as client:
        conv = await _conv(client)
        r = await client.post(f"/api/conversations/{conv}/messages",
                              json={"content": "hello", "stream": True})
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        frames = parse_sse(r.text)
        assert [int(f["id"]) for f in frames] == list(range(1, len(frames) + 1))
        assert frames[0]["event"] == "run.started"
        assert frames[-1]["event"] == "run.finished"
        assert frames[-1]["data"]["status"] == "succeeded"
        assert "".join(f["data"]["text"] for f in frames if f["event"] == "token") == "echo: hello"
        # Non-streaming: the run and the stored reply.
        r = await client.post(f"/api/conversations/{conv}/messages", json={"content": "again"})
        body = r.json()
        assert body["run"]["status"] == "succeeded"
        assert body["message"]["content"] == "echo: again"
        assert body["message"]["status"] == "complete"


async def test_too_many_runs_is_429_with_retry_after(settings: Settings) -> None:
    limited = settings.model_copy(update={"max_runs": 1})
    async with running_server(limited, ScriptedBackend(by_content)) as srv, \
            srv.client() as client:
        conv = await _conv(client)
        async with client.stream("POST", f"/api/conversations/{conv}/messages",
                                 json={"content": "slow", "stream": True}) as first:
            assert first.status_code == 200
            r = await client.post(f"/api/conversations/{conv}/messages", json={"content": "x"})
            assert r.status_code == 429
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "too_many_runs"
            # A WebSocket's refused start says when to retry too (it said nothing before).
            async with open_websocket_url(ws_url(srv)) as ws:
                await ws.send_message(json.dumps(
                    {"type": "message", "conversation_id": conv, "content": "x"}))
                refused = await _ws_recv(ws)
            assert refused["type"] == "error", refused
            assert refused["error"]["type"] == "too_many_runs", refused
            assert refused["error"]["retry_after"] == 1, refused


async def test_bad_message_requests(server: RunningServer) -> None:
    async with server.client() as client:
        r = await client.post("/api/conversations/conv_nope/messages", json={"content": "x"})
        assert r.status_code == 404
        conv = await _conv(client)
        for body, field in [({"content": ""}, "content"), ({}, "content"),
                            ({"content": "x", "agent": "nope"}, "agent"),
                            ({"content": "x", "on_disconnect": "maybe"}, "on_disconnect"),
                            ({"content": "x", "timeout": -1}, "timeout")]:
            r = await client.post(f"/api/conversations/{conv}/messages", json=body)
            assert r.status_code == 422, body
            assert r.json()["error"]["field"] == field
        r = await client.get("/api/runs/run_nope")
        assert r.status_code == 404
        r = await client.post("/api/runs/run_nope/cancel")
        assert r.status_code == 404
        r = await client.get("/api/runs/run_nope/events")
        assert r.status_code == 404
        # Out-of-range numbers are 422s, not 500s (found in review).
        r = await client.post(f"/api/conversations/{conv}/messages", json={"content": "ok"})
        run_id = r.json()["run"]["id"]
        r = await client.get(f"/api/runs/{run_id}/events", params={"after": 10**30})
        assert r.status_code == 422
        for bad in (b"\xb2", str(10**30).encode(), b"-1", b"x"):
            r = await client.get(f"/api/runs/{run_id}/events",
                                 headers=[(b"Last-Event-ID", bad)])
            assert r.status_code == 422, bad
        r = await client.get("/api/conversations", params={"before": "czk5" + "OTk5" * 10})
        assert r.status_code == 422


async def _first_frames(resp: httpx.Response) -> list[dict[str, Any]]:
    """The first complete frames of an endless SSE body (keep-alive comments dropped)."""
    text = ""
    with trio.fail_after(10):
        async for chunk in resp.aiter_text():
            text += chunk
            frames = parse_sse(text.rpartition("\n\n")[0])
            if frames:
                return frames
    return parse_sse(text)


async def test_rejoin_with_both_after_and_last_event_id_resumes_after_the_later(
    settings: Settings,
) -> None:
    # A browser's EventSource opened on ".../events?after=2" (it cannot set headers) reconnects
    # to the same URL adding "Last-Event-ID: <last seen>"; ?after won, so it got events again.
    async with running_server(settings, ScriptedBackend(by_content)) as srv, \
            srv.client() as client:
        conv = await _conv(client)
        r = await client.post(f"/api/conversations/{conv}/messages",
                              json={"content": "a b c d e"})
        run_id = r.json()["run"]["id"]
        url = f"/api/runs/{run_id}/events"
        last = int(parse_sse((await client.get(url)).text)[-1]["id"])
        assert last > 6
        for after, seen in ((2, "5"), (5, "2")):
            r = await client.get(url, params={"after": after}, headers={"Last-Event-ID": seen})
            assert r.status_code == 200
            assert [int(f["id"]) for f in parse_sse(r.text)] == list(range(6, last + 1))
        # The header is checked even when ?after is there.
        r = await client.get(url, params={"after": 2}, headers={"Last-Event-ID": "x"})
        assert r.status_code == 422
        assert r.json()["error"]["field"] == "Last-Event-ID"


async def test_rejoin_after_the_end_of_a_finished_run_is_204(settings: Settings) -> None:
    # An EventSource reconnects whenever its stream ends, and only a 204 stops it (HTML spec):
    # a client that has seen run.finished got an empty 200, and came back every few seconds.
    backend = ScriptedBackend(lambda req: Reply("a b c", hang_after=1))
    async with running_server(settings, backend) as srv, srv.client() as client:
        conv = await _conv(client)
        body = {"content": "q", "stream": True, "on_disconnect": "continue"}
        async with client.stream("POST", f"/api/conversations/{conv}/messages",
                                 json=body) as r:
            run_id = (await _first_frames(r))[0]["data"]["run_id"]
        url = f"/api/runs/{run_id}/events"
        # Live, with nothing after the client's position yet: the stream, as before.
        async with client.stream("GET", url, headers={"Last-Event-ID": "1"}) as r:
            assert r.status_code == 200
            assert (await _first_frames(r))[0]["id"] == "2"
        r = await client.post(f"/api/runs/{run_id}/cancel")
        assert r.json()["status"] == "cancelled"
        frames = parse_sse((await client.get(url)).text)
        assert frames[-1]["event"] == "run.finished"
        last = int(frames[-1]["id"])
        for position in ({"headers": {"Last-Event-ID": str(last)}},
                         {"params": {"after": last}}):
            r = await client.get(url, **position)
            assert (r.status_code, r.content) == (204, b""), position
        # Past the end: no client saw that id (another run's, a stale one): a 422 naming it,
        # as on a live run; a 204 would stop its EventSource for good without the events.
        for position, field in (({"headers": {"Last-Event-ID": str(last + 1)}}, "Last-Event-ID"),
                                ({"params": {"after": last + 10}}, "after")):
            r = await client.get(url, **position)
            assert r.status_code == 422, position
            assert r.json()["error"]["field"] == field, r.text
        # Not yet at the end: a 200 with the rest.
        r = await client.get(url, headers={"Last-Event-ID": str(last - 1)})
        assert r.status_code == 200
        assert [(f["id"], f["event"]) for f in parse_sse(r.text)] == [
            (str(last), "run.finished")]


async def _ws_recv(ws: Any) -> dict[str, Any]:
    with trio.fail_after(10):
        return json.loads(await ws.get_message())  # type: ignore[no-any-return]


async def test_ws_two_runs_cancel_one_and_bad_messages(settings: Settings) -> None:
    backend = ScriptedBackend(by_content)
    async with running_server(settings, backend) as srv, srv.client() as client:
        conv = await _conv(client)
        url = srv.url.replace("http://", "ws://") + "/api/ws"
        async with open_websocket_url(url) as ws:
            await ws.send_message("{not json")
            err = await _ws_recv(ws)
            assert err["type"] == "error"
            assert err["error"]["type"] == "malformed_json"
            await ws.send_message(json.dumps({"type": "dance"}))
            assert (await _ws_recv(ws))["error"]["type"] == "invalid_request"
            await ws.send_message(json.dumps({"type": "message", "conversation_id": conv}))
            assert "content" in (await _ws_recv(ws))["error"]["message"]
            await ws.send_message(json.dumps(
                {"type": "message", "conversation_id": "conv_nope", "content": "x"}))
            err = await _ws_recv(ws)
            assert err["error"]["type"] == "not_found"
            assert err["request"]["conversation_id"] == "conv_nope"

            await ws.send_message(json.dumps(
                {"type": "message", "conversation_id": conv, "content": "slow one"}))
            await ws.send_message(json.dumps(
                {"type": "message", "conversation_id": conv, "content": "quick one"}))
            runs: dict[str, list[dict[str, Any]]] = {}
            slow_id = None
            finished: dict[str, str] = {}
            while len(finished) < 2:
                msg = await _ws_recv(ws)
                runs.setdefault(msg["run_id"], []).append(msg)
                if msg["type"] == "token" and msg["data"]["text"] == "tick " and slow_id is None:
                    slow_id = msg["run_id"]
                    await ws.send_message(json.dumps({"type": "cancel", "run_id": slow_id}))
                if msg["type"] == "run.finished":
                    finished[msg["run_id"]] = msg["data"]["status"]
            assert slow_id is not None
            quick_id = next(r for r in runs if r != slow_id)
            assert finished == {slow_id: "cancelled", quick_id: "succeeded"}
            assert [m["id"] for m in runs[quick_id]] == list(range(1, len(runs[quick_id]) + 1))
            # The socket is still usable after all that.
            await ws.send_message(json.dumps({"type": "cancel", "run_id": "run_nope"}))
            assert (await _ws_recv(ws))["error"]["type"] == "not_found"
        r = await client.get(f"/api/runs/{slow_id}")
        assert r.json()["status"] == "cancelled"


async def test_ws_drop_cancels_its_runs_but_not_continue_runs(settings: Settings) -> None:
    backend = ScriptedBackend(by_content)
    async with running_server(settings, backend) as srv, srv.client() as client:
        conv = await _conv(client)
        url = srv.url.replace("http://", "ws://") + "/api/ws"
        ids: dict[str, str] = {}
        async with open_websocket_url(url) as ws:
            for mode in ("cancel", "continue"):
                await ws.send_message(json.dumps({
                    "type": "message", "conversation_id": conv, "content": f"slow {mode}",
                    "on_disconnect": mode}))
            while len(ids) < 2:
                msg = await _ws_recv(ws)
                if msg["type"] == "run.started":
                    ids[msg["data"]["run_id"]] = msg["data"]["run_id"]
        with trio.fail_after(20):
            while True:
                statuses = [
                    (await client.get(f"/api/runs/{rid}")).json()["status"] for rid in ids
                ]
                if "running" not in statuses:
                    break
                await trio.sleep(0.05)
        got = {rid: (await client.get(f"/api/runs/{rid}")).json()["status"] for rid in ids}
        assert sorted(got.values()) == ["cancelled", "succeeded"]


async def test_ws_needs_the_key_when_auth_is_on(settings: Settings) -> None:
    keyed = settings.model_copy(update={"api_keys": ("k1",)})
    async with running_server(keyed) as srv:
        url = srv.url.replace("http://", "ws://") + "/api/ws"
        with pytest.raises(ConnectionRejected) as info:
            async with open_websocket_url(url):
                pass
        assert info.value.status_code == 401
        async with open_websocket_url(url, extra_headers=[(b"Authorization", b"Bearer k1")]) as ws:
            await ws.send_message("{}")
            assert (await _ws_recv(ws))["type"] == "error"


def _sdk_calls(base_url: str) -> dict[str, Any]:
    """The official openai SDK, sync client, in a worker thread."""
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    out: dict[str, Any] = {}
    done = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi sdk"}])
    out["text"] = done.choices[0].message.content
    out["finish"] = done.choices[0].finish_reason
    out["usage"] = done.usage.total_tokens if done.usage else None
    stream = client.chat.completions.create(
        model="fake-model", messages=[{"role": "system", "content": "be kind"},
                                      {"role": "user", "content": "hi stream"}],
        stream=True, stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage.completion_tokens
    out["streamed"] = "".join(parts)
    out["stream_usage"] = usage
    tooled = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "tools please"}],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}}}}])
    call = tooled.choices[0].message.tool_calls[0]  # type: ignore[index]
    out["tool"] = (tooled.choices[0].finish_reason, call.function.name,  # type: ignore[union-attr]
                   json.loads(call.function.arguments))  # type: ignore[union-attr]
    out["models"] = [m.id for m in client.models.list()]
    client.close()
    return out


async def test_openai_sdk_chat_stream_tools_models(settings: Settings) -> None:
    backend = ScriptedBackend(by_content)
    async with running_server(settings, backend) as srv:
        out = await trio.to_thread.run_sync(_sdk_calls, srv.url)
    assert out["text"] == "echo: hi sdk"
    assert out["finish"] == "stop"
    assert out["usage"] > 0
    assert out["streamed"] == "echo: hi stream"
    assert out["stream_usage"] == 3  # "echo: " "hi " "stream"
    assert out["tool"] == ("tool_calls", "get_weather", {"city": "Paris"})
    assert out["models"] == ["fake-model"]
    # The model saw the request's system prompt; the client's tools were passed through.
    sent = [s.request for s in backend.streams]
    assert sent[1].messages[0].content == "be kind"
    assert sent[2].tools[0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize("stream", [True, False])
async def test_v1_client_disconnect_cancels_the_run(settings: Settings, stream: bool) -> None:
    backend = ScriptedBackend(by_content)
    async with running_server(settings, backend) as srv, srv.client() as client:
        body = {"model": "m", "messages": [{"role": "user", "content": "slow v1"}],
                "stream": stream}
        with trio.move_on_after(0.5):
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                async for _ in r.aiter_bytes():
                    pass
        with trio.fail_after(10):
            await (await backend.wait_stream(0)).closed_event.wait()
        assert backend.streams[0].cancelled
        assert not backend.streams[0].completed
        store = srv.services.require_store()
        convs, _ = await store.list_conversations(limit=1)
        msgs = await store.get_messages(convs[0].id)
        with trio.fail_after(10):
            while msgs[-1].status.value == "pending":
                await trio.sleep(0.01)
                msgs = await store.get_messages(convs[0].id)
        assert msgs[-1].status.value == "cancelled"
        assert msgs[-1].content.startswith("tick")


async def test_v1_bad_requests(server: RunningServer) -> None:
    async with server.client() as client:
        r = await client.post("/v1/chat/completions", json={"model": "m", "messages": []})
        assert r.status_code == 422
        assert r.json()["error"]["field"] == "messages"
        r = await client.post("/v1/chat/completions",
                              json={"messages": [{"role": "wizard", "content": "x"}]})
        assert r.status_code == 422
        r = await client.post("/v1/chat/completions", content=b"{",
                              headers={"Content-Type": "application/json"})
        assert r.status_code == 400


async def test_runs_are_invisible_to_other_keys(settings: Settings) -> None:
    keyed = settings.model_copy(update={"api_keys": ("key-a", "key-b")})
    async with running_server(keyed, ScriptedBackend(by_content)) as srv:
        a = srv.client(headers={"Authorization": "Bearer key-a"})
        b = srv.client(headers={"Authorization": "Bearer key-b"})
        async with a, b:
            conv = await _conv(a)
            r = await a.post(f"/api/conversations/{conv}/messages", json={"content": "mine"})
            run_id = r.json()["run"]["id"]
            assert (await a.get(f"/api/runs/{run_id}")).status_code == 200
            for call in (b.get(f"/api/runs/{run_id}"), b.get(f"/api/runs/{run_id}/events"),
                         b.post(f"/api/runs/{run_id}/cancel"),
                         b.post(f"/api/conversations/{conv}/messages", json={"content": "x"})):
                r = await call
                assert r.status_code == 404, r.request.url
            r = await b.post("/v1/chat/completions",
                             json={"messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200
            assert (await srv.client().get("/v1/models")).status_code == 401


async def test_metrics_count_runs_tools_and_store(settings: Settings) -> None:
    def reply(req: ChatRequest) -> Reply:
        if any(m.role == "tool" for m in req.messages):
            return Reply("Final Answer: 4")
        return Reply("", tool_calls=[ToolCall("c", "calculator", {"expression": "2+2"})])

    async with running_server(settings, ScriptedBackend(reply)) as srv, srv.client() as client:
        conv = await _conv(client)
        r = await client.post(f"/api/conversations/{conv}/messages",
                              json={"content": "2+2?", "agent": "react"})
        assert r.json()["message"]["content"] == "4"
        text = (await client.get("/metrics")).text
        assert 'service_runs_total{status="succeeded"} 1.0' in text
        assert "service_runs_in_flight 0.0" in text
        assert 'service_tool_calls_total{outcome="ok",tool="calculator"} 1.0' in text
        assert 'service_store_seconds_count{op="finish_run"}' in text
        assert 'service_http_requests_total{method="POST"' in text
        for name in ("service_llm_call_seconds", "service_llm_ttft_seconds",
                     "service_llm_tokens_total", "service_llm_queue_wait_seconds"):
            assert f"# TYPE {name.removesuffix('_total')}" in text


@pytest.mark.parametrize("stream", [True, False])
async def test_v1_client_tool_arguments_that_are_not_json_are_passed_on_as_they_came(
    settings: Settings, stream: bool
) -> None:
    # They failed the completion (502); OpenAI passes them on as a string, and so do we.
    async with running_server(settings, ScriptedBackend(by_content)) as srv, \
            srv.client() as client:
        body = {"model": "m", "stream": stream,
                "messages": [{"role": "user", "content": "tools broken"}],
                "tools": [{"type": "function", "function": {"name": "get_weather"}}]}
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        if stream:
            frames = [f["data"] for f in parse_sse(r.text) if f["data"] != "[DONE]"]
            calls = [c for f in frames for ch in f["choices"]
                     for c in ch["delta"].get("tool_calls", [])]
        else:
            calls = r.json()["choices"][0]["message"]["tool_calls"]
        assert [c["function"]["arguments"] for c in calls] == ['{"city": Paris']
