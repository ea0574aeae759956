"""Client-facing streaming endpoints against API.md and docs/api.md (a review of 2026-12-04):
the WebSocket's cancel, error replies and idle pings, /v1/models and /v1's refused fields.
Each test failed before its fix."""

from __future__ import annotations

import json
import os
from typing import Any

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from service.server import build_config
from service.settings import BackendKind, Settings
from service.sim import Simulator, open_simulator
from service.store import open_store
from service.store.ownership import process_tag

from ..fakes import Reply, ScriptedBackend
from ..servers import ROOT, running_server
from ..streams import ws_reply, ws_url


async def _ws_replies(ws: WebSocketConnection, seconds: float) -> list[dict[str, Any]]:
    """Every message the socket gets within ``seconds``."""
    out: list[dict[str, Any]] = []
    with trio.move_on_after(seconds):
        while True:
            out.append(json.loads(await ws.get_message()))
    return out


# -- WebSocket cancel -------------------------------------------------------------------------


async def test_ws_cancel_reaches_a_run_of_another_instance_sharing_the_store(
    settings: Settings,
) -> None:
    # API.md: "Any instance sharing a store serves any conversation and run: reads, re-joins,
    # cancels." POST /api/runs/{id}/cancel passes a cancel for another worker's run on through
    # the store (test_errors.py); the WebSocket's cancel only looks in this process's
    # supervisor and answers not_found. With --workers N a browser's socket lands on any worker,
    # so Stop on a run its earlier socket (or a POST) started on another worker does nothing.
    async with running_server(settings) as srv, srv.client() as c, open_store(
            settings.db, process_id=process_tag(os.getppid())) as other:
        conv = (await c.post("/api/conversations", json={})).json()["id"]
        begun = await other.begin_run(conv, content="q", agent="chat", model=None)
        run_id = begun.run.id
        assert (await c.get(f"/api/runs/{run_id}")).json()["status"] == "running"
        async with open_websocket_url(ws_url(srv)) as ws:
            await ws.send_message(json.dumps({"type": "cancel", "run_id": run_id}))
            replies = await _ws_replies(ws, 1.0)
        errors = [m for m in replies if m.get("type") == "error"]
        assert not errors, f"the cancel of a live run was refused: {errors}"
        # Asked of the run's own process through the store, as the HTTP cancel does.
        assert await other.cancel_requests() == [(run_id, "cancelled by request")]


async def test_ws_cancel_of_a_run_that_has_just_ended_is_not_an_error(settings: Settings) -> None:
    # A client's Stop racing the run's end: POST /api/runs/{id}/cancel is idempotent (202 with
    # the run's status); the same cancel over the WebSocket is an error frame "not_found: no
    # live run" for a run that exists, is the caller's, and was started on this very socket.
    backend = ScriptedBackend([Reply("a short answer")])
    async with running_server(settings, backend) as srv, srv.client() as c:
        conv = (await c.post("/api/conversations", json={})).json()["id"]
        async with open_websocket_url(ws_url(srv)) as ws:
            await ws.send_message(json.dumps(
                {"type": "message", "conversation_id": conv, "content": "hi"}))
            with trio.fail_after(10):
                while (msg := (await ws_reply(ws))[1])["type"] != "run.finished":
                    pass
            run_id = msg["run_id"]
            await ws.send_message(json.dumps({"type": "cancel", "run_id": run_id}))
            replies = await _ws_replies(ws, 1.0)
        r = await c.post(f"/api/runs/{run_id}/cancel")
        assert (r.status_code, r.json()["status"]) == (202, "succeeded")  # HTTP: fine
        errors = [m for m in replies if m.get("type") == "error"]
        assert not errors, f"WebSocket cancel of a finished run: {errors}"


# -- WebSocket error replies ------------------------------------------------------------------


async def test_ws_error_replies_do_not_echo_a_huge_id_back(settings: Settings) -> None:
    # docs/api.md: "error replies echo only the request's type, conversation_id and run_id, cut
    # short" (ws.py: "never the whole of it: a content of a megabyte ... would come back"). The
    # `request` echo is cut to 200 characters, but the NotFound error itself carries the whole
    # id twice (in `message` and in `id`): a 0.4 MB run_id comes back as 0.8 MB, past what
    # many clients take in one frame (trio-websocket's default 1 MiB closes with 1009 on it).
    big = "r" * 400_000
    async with running_server(settings) as srv, srv.client() as c:
        conv = (await c.post("/api/conversations", json={})).json()["id"]
        assert conv
        async with open_websocket_url(ws_url(srv), max_message_size=2**24) as ws:
            sizes = {}
            for request in ({"type": "cancel", "run_id": big},
                            {"type": "message", "conversation_id": big, "content": "x"}):
                await ws.send_message(json.dumps(request))
                text, reply = await ws_reply(ws)
                assert reply["type"] == "error"
                assert reply["error"]["type"] == "invalid_request"  # no id is that long
                sizes[request["type"]] = len(text)
    assert max(sizes.values()) < 10_000, f"error reply sizes for a 400,000-char id: {sizes}"


# -- WebSocket idle ---------------------------------------------------------------------------


async def test_a_quiet_run_keeps_its_websocket_alive(
    settings: Settings, monkeypatch: Any
) -> None:
    # An SSE stream gets a keep-alive comment every SERVICE_SSE_KEEPALIVE seconds of silence,
    # so proxies (nginx's proxy_read_timeout is 60 s) and browsers do not drop it while a model
    # loads, thinks before its first token, or a tool runs. The WebSocket gets nothing at all
    # meanwhile: no message (the forwarder's keep-alive is 3600 s and dropped) and no ping
    # (hypercorn's websocket_ping_interval is unset, in hypercorn.toml too). A browser cannot
    # send a ping itself, and any message it could send for that is an error reply. A socket cut
    # by a proxy then cancels the run (on_disconnect: cancel, the default).
    from trio_websocket import _impl

    pings: list[float] = []
    handle_ping = _impl.WebSocketConnection._handle_ping_event

    async def record_ping(self: Any, event: Any) -> None:
        pings.append(trio.current_time())
        await handle_ping(self, event)

    monkeypatch.setattr(_impl.WebSocketConnection, "_handle_ping_event", record_ping)
    keepalive = 0.5
    quiet = settings.model_copy(update={"sse_keepalive": keepalive})
    production = build_config(ROOT / "hypercorn.toml", ["127.0.0.1:0"],
                              max_body_bytes=quiet.max_body_bytes, keepalive=quiet.sse_keepalive)
    backend = ScriptedBackend([Reply("late answer", first_delay=8 * keepalive)])
    async with running_server(
        quiet, backend, websocket_ping_interval=production.websocket_ping_interval,
    ) as srv, srv.client() as c:
        conv = (await c.post("/api/conversations", json={})).json()["id"]
        async with open_websocket_url(ws_url(srv)) as ws:
            await ws.send_message(json.dumps(
                {"type": "message", "conversation_id": conv, "content": "think long"}))
            _, started = await ws_reply(ws)
            assert started["type"] == "run.started"
            start = trio.current_time()
            got = await _ws_replies(ws, 4 * keepalive)  # the model has not answered yet
    assert got or [p for p in pings if p >= start], (
        f"{4 * keepalive} s of a live run without a byte on its WebSocket "
        f"(SSE would have had {4} keep-alives)")


# -- /v1/models -------------------------------------------------------------------------------


async def test_v1_models_lists_each_model_once_across_a_fleet(settings: Settings) -> None:
    # API.md's fleets: SERVICE_LLAMACPP_URL may list several servers, typically of one model
    # (for capacity). /v1/models then lists the model once per server ("m" owned by
    # llamacpp-1, and again by llamacpp-2): OpenAI's list has unique ids, and clients that
    # build a picker from it show duplicates (the service's own chat page does:
    # service/web/chat.js loadModels). The same with SERVICE_BACKEND=auto when Ollama and
    # llama.cpp both serve a model of one name.
    async with open_simulator(Simulator(("m",))) as a, open_simulator(Simulator(("m",))) as b:
        fleet = settings.model_copy(update={
            "backend": BackendKind("llamacpp"), "llamacpp_url": f"{a.url},{b.url}"})
        async with running_server(fleet, from_settings=True) as srv, srv.client() as c:
            r = await c.get("/v1/models")
    assert r.status_code == 200
    ids = [m["id"] for m in r.json()["data"]]
    assert ids == ["m"], f"/v1/models ids: {ids}"



# -- /v1 request fields -----------------------------------------------------------------------


async def test_v1_does_not_silently_drop_legacy_functions(settings: Settings) -> None:
    # The OpenAI API (and the SDK's create(functions=..., function_call=...)) still takes the
    # legacy `functions`; clients written against it expect a function_call back. The endpoint
    # accepts the field (extra="allow") and drops it: the model never sees the function and
    # the client gets a 200 text answer, the "less than was asked" that docs/api.md says /v1
    # refuses with a 422 naming the field (as for n > 1 and logprobs).
    backend = ScriptedBackend([Reply("a plain text answer")])
    fn = {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}
    async with running_server(settings, backend) as srv, srv.client() as c:
        r = await c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "weather in Paris?"}],
            "functions": [fn], "function_call": {"name": "get_weather"}})
    if r.status_code == 422:
        assert r.json()["error"]["param"] in ("functions", "function_call"), r.text
        return
    assert r.status_code == 200, r.text
    sent = backend.streams[0].request.tools
    names = [t.get("function", t).get("name") for t in sent]
    assert "get_weather" in names, f"200, but the model was sent no function (tools: {sent})"


# -- SSE re-join ------------------------------------------------------------------------------


async def test_a_rejoin_past_a_live_runs_events_is_refused_not_left_hanging(
    settings: Settings,
) -> None:
    # API.md: every stream ends with run.finished. A re-join of a live run with an id it has
    # not reached (no client can have seen it: events are shown once stored) waited for the
    # run's end, then closed empty: its run.finished came before that id.
    backend = ScriptedBackend([Reply("a slow answer", first_delay=30)])
    async with running_server(settings, backend) as srv, srv.client() as c:
        conv = (await c.post("/api/conversations", json={})).json()["id"]
        async with open_websocket_url(ws_url(srv)) as ws:
            await ws.send_message(json.dumps(
                {"type": "message", "conversation_id": conv, "content": "think long"}))
            _, started = await ws_reply(ws)
            run_id = started["run_id"]
            events = f"/api/runs/{run_id}/events"
            with trio.fail_after(10):
                late = await c.get(events, headers={"Last-Event-ID": "1000"})
                query = await c.get(f"{events}?after=1000")
                async with c.stream("GET", events, headers={"Last-Event-ID": "1"}) as seen:
                    status = seen.status_code  # an id it has: followed as before
        assert (late.status_code, late.json()["error"]["field"]) == (422, "Last-Event-ID")
        assert (query.status_code, query.json()["error"]["field"]) == (422, "after")
        assert status == 200


async def test_v1_refuses_a_malformed_tool_before_any_model_is_called(
    settings: Settings,
) -> None:
    # A tool without a function name went on to the model's server, whose 400 came back a
    # 502 backend_response_error, which the OpenAI SDKs retry: three stored runs for one bad
    # request. OpenAI refuses it itself (400 naming the field); so does /v1 now (422).
    backend = ScriptedBackend([Reply("never")])
    bad_tools: list[Any] = [
        [{"type": "function", "function": {"parameters": {}}}],  # no name
        [{"type": "function", "function": {"name": "has space"}}],
        [{"type": "function", "function": {"name": "f", "parameters": "{}"}}],
        [{"type": "retrieval"}],
    ]
    async with running_server(settings, backend) as srv, srv.client() as c:
        for tools in bad_tools:
            r = await c.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "tools": tools})
            assert r.status_code == 422, (tools, r.text)
            assert r.json()["error"]["param"] == "tools", r.text
        ok = await c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "get_weather-2"}}]})
    assert ok.status_code == 200, ok.text
    assert len(backend.streams) == 1  # only the good request reached a model
