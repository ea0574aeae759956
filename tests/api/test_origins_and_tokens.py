"""What a browser meets: another origin refused, CORS for listed origins, tokens for
EventSource and WebSocket, and the small things browsers trip on (issue 15, items 1-4)."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from service.settings import Settings
from service.tokens import TOKEN_TTL, TokenSigner

from ..fakes import ScriptedBackend, by_content
from ..servers import RunningServer, running_server
from ..streams import parse_sse

EVIL = "http://evil.example"
APP = "http://app.example:3000"
KEYS = ("key-a", "key-b")


def _ws(srv: RunningServer, query: str = "") -> str:
    return srv.url.replace("http://", "ws://") + "/api/ws" + query


async def _ws_json(ws: Any) -> dict[str, Any]:
    with trio.fail_after(10):
        return json.loads(await ws.get_message())  # type: ignore[no-any-return]


async def test_another_origin_cannot_drive_the_service(server: RunningServer) -> None:
    async with server.client() as client:
        for origin in (EVIL, "null", server.url.replace("127.0.0.1", "localhost")):
            r = await client.post("/api/conversations", json={}, headers={"Origin": origin})
            assert r.status_code == 403, origin
            assert r.json()["error"]["type"] == "forbidden"
            assert "access-control-allow-origin" not in r.headers
        r = await client.get("/api/conversations", headers={"Origin": EVIL})
        assert r.status_code == 403
        assert (await client.get("/api/conversations")).json()["data"] == []
        # Its own origin (a page it serves) and no Origin at all (curl, SDKs) are fine.
        own = await client.post("/api/conversations", json={}, headers={"Origin": server.url})
        assert own.status_code == 201
        assert (await client.post("/api/conversations", json={})).status_code == 201


async def test_a_websocket_from_another_origin_is_refused(server: RunningServer) -> None:
    with pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(_ws(server), extra_headers=[(b"Origin", EVIL.encode())]):
            pass
    assert info.value.status_code == 403
    async with open_websocket_url(_ws(server),
                                  extra_headers=[(b"Origin", server.url.encode())]) as ws:
        await ws.send_message('{"type": "cancel", "run_id": "run_nope"}')
        assert (await _ws_json(ws))["type"] == "error"  # served: not_found


@pytest.mark.parametrize("content_type", [
    None,  # a Blob without a type: no preflight either
    "text/plain;charset=UTF-8",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/xml",
])
async def test_a_body_not_sent_as_json_is_415(
    server: RunningServer, content_type: str | None
) -> None:
    # A no-cors POST from any page could create conversations (the body was parsed as JSON
    # whatever its type); the Origin check stops a browser, this stops what drops the Origin.
    headers = {"Content-Type": content_type} if content_type else {}
    async with server.client() as client:
        for path in ("/api/conversations", "/v1/chat/completions"):
            r = await client.post(path, content=b'{"messages": []}', headers=headers)
            assert r.status_code == 415, (path, r.text)
            assert r.json()["error"]["type"] == "unsupported_media_type"
        assert (await client.get("/api/conversations")).json()["data"] == []
        ok = await client.post("/api/conversations", content=b"{}",
                               headers={"Content-Type": "application/json; charset=utf-8"})
        assert ok.status_code == 201


async def test_listed_origins_get_cors_on_every_answer_and_preflights_need_no_key(
    settings: Settings,
) -> None:
    keyed = settings.model_copy(update={"api_keys": KEYS, "cors_origins": (APP,)})
    async with running_server(keyed, ScriptedBackend(by_content)) as srv, \
            srv.client() as client:
        pre = await client.options("/api/conversations", headers={
            "Origin": APP, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert pre.status_code == 204
        assert pre.headers["access-control-allow-origin"] == APP
        allowed = pre.headers["access-control-allow-headers"].lower()
        for name in ("authorization", "content-type", "last-event-id"):
            assert name in allowed
        assert "POST" in pre.headers["access-control-allow-methods"]
        # An OpenAI SDK in the page adds headers of its own: allowed (they were refused, so
        # the page could not use the SDK); and it may read X-Should-Retry.
        sdk = await client.options("/v1/chat/completions", headers={
            "Origin": APP, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type,x-stainless-lang,"
                                              "x-stainless-retry-count,bad header"})
        assert sdk.status_code == 204
        allowed = [n.strip().lower() for n in
                   sdk.headers["access-control-allow-headers"].split(",")]
        assert {"x-stainless-lang", "x-stainless-retry-count"} <= set(allowed)
        assert "badheader" not in allowed
        assert "bad header" not in allowed
        assert "x-should-retry" in sdk.headers["access-control-expose-headers"].lower()
        # Another origin's preflight is refused, and gets no CORS headers.
        bad = await client.options("/api/conversations", headers={
            "Origin": EVIL, "Access-Control-Request-Method": "POST"})
        assert bad.status_code == 403
        assert "access-control-allow-origin" not in bad.headers

        key = {"Origin": APP, "Authorization": "Bearer key-a"}
        denied = await client.get("/api/conversations", headers={"Origin": APP})
        assert denied.status_code == 401  # the page can read why
        assert denied.headers["access-control-allow-origin"] == APP
        conv = (await client.post("/api/conversations", json={}, headers=key)).json()["id"]
        r = await client.post(f"/api/conversations/{conv}/messages", headers=key,
                              json={"content": "hi", "stream": True})
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["access-control-allow-origin"] == APP
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        assert parse_sse(r.text)[-1]["data"]["status"] == "succeeded"
        run_id = parse_sse(r.text)[0]["data"]["run_id"]
        again = await client.get(f"/api/runs/{run_id}/events", headers=key)
        assert again.headers["access-control-allow-origin"] == APP
        assert "Origin" in again.headers["vary"]
        # The service's own origin needs no CORS headers; no Origin, none either.
        assert "access-control-allow-origin" not in (await client.get(
            "/api/conversations", headers={"Authorization": "Bearer key-a"})).headers


async def test_tokens_open_the_streams_of_their_keys_data_only(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    keyed = settings.model_copy(update={"api_keys": KEYS})
    async with running_server(keyed, ScriptedBackend(by_content)) as srv, \
            srv.client() as client:
        a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
        assert (await client.post("/api/tokens")).status_code == 401
        r = await client.post("/api/tokens", headers=a)
        assert r.status_code == 200
        token = r.json()["token"]
        assert r.json()["expires_at"].endswith("Z")
        conv_a = (await client.post("/api/conversations", json={}, headers=a)).json()["id"]
        conv_b = (await client.post("/api/conversations", json={}, headers=b)).json()["id"]
        run_a = (await client.post(f"/api/conversations/{conv_a}/messages", headers=a,
                                   json={"content": "hi a"})).json()["run"]["id"]
        run_b = (await client.post(f"/api/conversations/{conv_b}/messages", headers=b,
                                   json={"content": "hi b"})).json()["run"]["id"]
        q = {"access_token": token}
        events = await client.get(f"/api/runs/{run_a}/events", params=q)
        assert events.status_code == 200
        assert parse_sse(events.text)[-1]["event"] == "run.finished"
        # Its key's data only: key-b's run is not found, as with key-a itself.
        assert (await client.get(f"/api/runs/{run_b}/events", params=q)).status_code == 404
        # Nowhere else, and not when tampered with.
        assert (await client.get(f"/api/runs/{run_a}", params=q)).status_code == 401
        assert (await client.get("/api/conversations", params=q)).status_code == 401
        assert (await client.post("/api/tokens", params=q)).status_code == 401
        forged = {"access_token": token[:-2] + ("AA" if token[-2:] != "AA" else "BB")}
        assert (await client.get(f"/api/runs/{run_a}/events", params=forged)).status_code == 401

        with pytest.raises(ConnectionRejected) as info:
            async with open_websocket_url(_ws(srv, "?access_token=nope")):
                pass
        assert info.value.status_code == 401
        async with open_websocket_url(_ws(srv, f"?access_token={token}")) as ws:
            await ws.send_message(json.dumps(
                {"type": "message", "conversation_id": conv_b, "content": "not mine"}))
            assert (await _ws_json(ws))["error"]["type"] == "not_found"
            await ws.send_message(json.dumps(
                {"type": "message", "conversation_id": conv_a, "content": "by token"}))
            seen = []
            while not seen or seen[-1]["type"] != "run.finished":
                seen.append(await _ws_json(ws))
            assert seen[-1]["data"]["status"] == "succeeded"
    # Never logged (the access log has paths, not queries); the clients' own logs do show it.
    ours = [r for r in caplog.records if r.name.startswith(("service", "hypercorn", "quart"))]
    assert any("/events" in r.getMessage() for r in ours)
    assert not [r for r in ours if token in r.getMessage() + str(r.__dict__)]


def test_a_token_expires_names_no_key_and_is_accepted_by_every_worker() -> None:
    keys = tuple(k.encode() for k in KEYS)
    token, expires = TokenSigner(keys).issue(b"key-b", 1000.0)
    assert expires == 1000 + TOKEN_TTL
    assert "key" not in token
    other_worker = TokenSigner(keys)
    assert other_worker.verify(token, 1000.0 + TOKEN_TTL - 1) == b"key-b"
    assert other_worker.verify(token, 1000.0 + TOKEN_TTL) is None  # expired
    assert TokenSigner((b"key-a",)).verify(token, 1000.0) is None  # key-b removed: revoked
    for junk in ("", ".", "x.y.z", "99999999999999.n.s", "1.2.3.4"):
        assert other_worker.verify(junk, 0.0) is None


async def test_unknown_query_parameters_are_ignored(server: RunningServer) -> None:
    async with server.client() as client:
        conv = (await client.post("/api/conversations", json={})).json()["id"]
        r = await client.post(f"/api/conversations/{conv}/messages", json={"content": "x"})
        run_id = r.json()["run"]["id"]
        assert (await client.get("/api/conversations", params={"_": "123"})).status_code == 200
        r = await client.get(f"/api/runs/{run_id}/events", params={"_": "123", "after": "0"})
        assert r.status_code == 200
        last = parse_sse(r.text)[-1]["id"]
        # Resumed past its end: 204, and no text/html body type (EventSource stops).
        done = await client.get(f"/api/runs/{run_id}/events", params={"_": "1"},
                                headers={"Last-Event-ID": last})
        assert done.status_code == 204
        assert "content-type" not in done.headers


async def test_the_api_description_is_open_with_keys_set(settings: Settings) -> None:
    keyed = settings.model_copy(update={"api_keys": KEYS})
    async with running_server(keyed) as srv, srv.client() as client:
        spec = await client.get("/openapi.json")
        assert spec.status_code == 200
        assert spec.json()["paths"]["/api/tokens"]["post"]["security"] == [{"bearer": []}]
        assert (await client.get("/docs")).status_code == 200
        assert (await client.get("/api/conversations")).status_code == 401


async def test_a_no_cors_form_post_from_another_origin_creates_nothing(
    server: RunningServer,
) -> None:
    # What a page's <form> or fetch(..., {mode: "no-cors"}) sends: refused twice over.
    async with httpx.AsyncClient(base_url=server.url) as client:
        r = await client.post("/api/conversations", content=b'{"title": "pwned"}',
                              headers={"Origin": EVIL, "Content-Type": "text/plain"})
        assert r.status_code == 403
        assert (await client.get("/api/conversations")).json()["data"] == []
