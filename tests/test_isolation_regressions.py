"""Keys, tokens and origins at their edges (a review of authentication and tenant isolation
with several SERVICE_API_KEYS, 2026-12-05; isolation held everywhere it probed; each test here
failed before its fix): a WebSocket opened with a token starts no run past its expiry, an
expired token is refused saying so, and with no keys a page under a non-loopback host name is
not the service's own origin (DNS rebinding). Real servers on 127.0.0.1, port 0."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from service import factory
from service import tokens as tokens_mod
from service.api import ws as ws_api
from service.settings import Settings

from .fakes import ScriptedBackend, by_content
from .servers import RunningServer, running_server

KEYS = ("key-a", "key-b")
A = {"Authorization": "Bearer key-a"}


def _ws(srv: RunningServer, query: str = "") -> str:
    return srv.url.replace("http://", "ws://") + "/api/ws" + query


async def _ws_json(ws: Any) -> dict[str, Any]:
    with trio.fail_after(10):
        return json.loads(await ws.get_message())  # type: ignore[no-any-return]


def _keyed(settings: Settings) -> Settings:
    return settings.model_copy(update={"api_keys": KEYS})


class _Later:
    """The ``time`` module as the service sees it, ``shift`` seconds later by its wall clock
    (a token's expiry is wall-clock time; trio's clock is untouched)."""

    def __init__(self, shift: float) -> None:
        self.shift = shift

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def time(self) -> float:
        return time.time() + self.shift


def _tokens_expired(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every token issued so far is past its expiry, as far as the service can tell."""
    later = _Later(tokens_mod.TOKEN_TTL + 1)
    monkeypatch.setattr(factory, "time", later)
    monkeypatch.setattr(ws_api, "time", later)


async def test_an_expired_token_is_refused_saying_that_it_expired(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A page whose token ran out must be told so (to fetch a new one), not that its key is
    # wrong: RFC 6750's WWW-Authenticate: Bearer error="invalid_token", and a message.
    async with running_server(_keyed(settings), ScriptedBackend(by_content)) as srv, \
            srv.client() as client:
        conv = (await client.post("/api/conversations", json={}, headers=A)).json()["id"]
        run = (await client.post(f"/api/conversations/{conv}/messages", headers=A,
                                 json={"content": "hi"})).json()["run"]["id"]
        token = (await client.post("/api/tokens", headers=A)).json()["token"]
        q = {"access_token": token}
        assert (await client.get(f"/api/runs/{run}/events", params=q)).status_code == 200
        _tokens_expired(monkeypatch)
        r = await client.get(f"/api/runs/{run}/events", params=q)
        assert r.status_code == 401
        assert "expired" in r.json()["error"]["message"].lower(), r.json()
        assert 'error="invalid_token"' in r.headers["www-authenticate"]
        # A forged one, expired or not, is just a wrong key (nothing about it is told).
        forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        r = await client.get(f"/api/runs/{run}/events", params={"access_token": forged})
        assert r.status_code == 401
        assert r.json()["error"]["message"] == "missing or wrong API key"


async def test_a_websocket_opened_with_a_token_starts_no_run_once_it_expired(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "valid 5 minutes" (operations.md): a socket opened with a token (a URL a proxy may log)
    # went on starting runs for that key for as long as it stayed open.
    async with running_server(_keyed(settings), ScriptedBackend(by_content)) as srv, \
            srv.client() as client:
        conv = (await client.post("/api/conversations", json={}, headers=A)).json()["id"]
        token = (await client.post("/api/tokens", headers=A)).json()["token"]
        async with open_websocket_url(_ws(srv, f"?access_token={token}")) as ws:
            _tokens_expired(monkeypatch)
            # The token is refused everywhere else by now.
            run = await client.get("/api/runs/run_x/events", params={"access_token": token})
            assert run.status_code == 401
            try:
                await ws.send_message(json.dumps(
                    {"type": "message", "conversation_id": conv, "content": "after expiry"}))
                first = await _ws_json(ws)
            except ConnectionClosed:
                first = {"type": "closed"}
            assert first["type"] in ("error", "closed"), first
        convs = await client.get(f"/api/conversations/{conv}", headers=A)
        assert convs.json()["messages"] == []


async def test_a_page_on_another_host_cannot_pass_as_the_services_own_origin(
    server: RunningServer,
) -> None:
    # Keys unset (the default, loopback bind). DNS rebinding: evil.example resolved to
    # 127.0.0.1 after the page loaded; the browser sends Origin and Host both as
    # evil.example:PORT, and "own origin" is taken from the Host header, so the other
    # origin drives the service (service/origins.py promises it cannot, keys or not).
    port = server.url.rsplit(":", 1)[1]
    async with server.client() as client:
        r = await client.post("/api/conversations", json={}, headers={
            "Origin": f"http://evil.example:{port}", "Host": f"evil.example:{port}"})
        assert r.status_code == 403, r.text
        assert (await client.get("/api/conversations")).json()["data"] == []
