"""A review of authentication, tenant isolation and input hardening (2026-12-07, the "e"
security review). Real servers on 127.0.0.1, port 0, each shut down by its context manager.

Each failing test here is a defect this review reproduced; the passing ones pin behaviour that
held everywhere it was probed and that no other test pins as strictly (a 404 for another
key's id that is byte for byte a missing id's)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import trio
from trio_websocket import open_websocket_url

from service.settings import Settings

from .fakes import Reply, ScriptedBackend, by_content
from .servers import RunningServer, running_server

KEYS = ("key-a", "key-b")
A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}
SECRET = "my bank PIN is 4321"  # what a user typed: a rebound page must not read it back


def _keyed(settings: Settings) -> Settings:
    return settings.model_copy(update={"api_keys": KEYS})


def _ws(srv: RunningServer) -> str:
    return srv.url.replace("http://", "ws://") + "/api/ws"


def _port(srv: RunningServer) -> str:
    return srv.url.rsplit(":", 1)[1]


async def _ws_json(ws: Any) -> dict[str, Any]:
    with trio.fail_after(10):
        return json.loads(await ws.get_message())  # type: ignore[no-any-return]


def _shape(r: httpx.Response, ident: str) -> tuple[int, str, list[str]]:
    """What a client can tell of an answer apart from the id it asked about: the status, the
    body with that id blanked, and the header names (not the per-request ones)."""
    names = sorted(k for k in r.headers if k not in ("date", "x-request-id", "content-length"))
    return r.status_code, r.text.replace(ident, "ID"), names


# -- DNS rebinding: reads carry no Origin -----------------------------------------------------


async def test_without_keys_a_rebound_host_name_cannot_read_the_conversations(
    settings: Settings,
) -> None:
    """Keys unset (the default; the bind is loopback). operations.md ("Browsers") and
    service/origins.py guard against DNS rebinding: a page of ``http://evil.example:PORT``
    whose name was re-pointed at 127.0.0.1 is not the service's own origin. But that guard is
    only applied to requests that carry an ``Origin`` header (``factory._authorize``:
    ``if origin is not None``), and a browser sends none with a *same-origin* GET or HEAD
    (Fetch: ``Origin`` is added to a GET only when its response tainting is "cors"). For the
    rebound page every request to the service is same-origin, so ``fetch("/api/conversations")``
    and ``fetch("/api/conversations/<id>")`` reach the handlers with ``Host: evil.example:PORT``
    and no Origin, and the page reads every conversation, prompt and answer stored (also
    ``/api/runs/{id}/events``, ``/api/llm-calls``, ``/api/backends``): the rebinding guard
    only stops its writes.

    Expected: with no keys, a request whose ``Host`` is a name another site could point at
    this service (not an IP address, ``localhost`` or ``*.localhost``, nor the host of an
    origin listed in ``SERVICE_CORS_ORIGINS``) is refused (403 or 421) whether or not it
    carries an Origin, as the same rule already refuses its Origin. Fix: in
    ``service/factory.py:_authorize``, when ``keys`` is empty, check ``req.host`` with
    ``origins._not_rebindable`` (or the listed origins' hosts) before anything else."""
    async with running_server(settings, ScriptedBackend(by_content)) as srv, \
            srv.client() as client:
        conv = (await client.post("/api/conversations", json={})).json()["id"]
        r = await client.post(f"/api/conversations/{conv}/messages", json={"content": SECRET})
        assert r.status_code == 200, r.text
        run = r.json()["run"]["id"]
        # The loopback's own names still work (a page at http://127.0.0.1:PORT/).
        assert (await client.get("/api/conversations")).status_code == 200
        rebound = {"Host": f"evil.example:{_port(srv)}"}  # and no Origin: a same-origin GET
        read = {
            path: await client.get(path, headers=rebound)
            for path in ("/api/conversations", f"/api/conversations/{conv}",
                         f"/api/runs/{run}/events")
        }
        shown = {path: (r.status_code, conv in r.text or SECRET in r.text)
                 for path, r in read.items()}
        assert all(status in (403, 421) and not leaked for status, leaked in shown.values()), \
            shown


async def test_without_keys_a_listed_origins_host_and_the_probes_are_still_served(
    settings: Settings,
) -> None:
    """The fix's other side: with no keys, the host of an origin listed in
    ``SERVICE_CORS_ORIGINS`` is served (a page an operator named), and a load balancer's
    ``/healthz`` and ``/readyz`` answer under any name; everything else under another name is
    a 403 naming what to do."""
    # (Its host: the port a browser shows may be a proxy's, not the one the service binds.)
    listed = settings.model_copy(update={"cors_origins": ("https://myhost",)})
    async with running_server(listed, ScriptedBackend(by_content)) as srv, \
            srv.client() as client:
        port = _port(srv)
        mine = await client.get("/api/conversations", headers={"Host": f"myhost:{port}"})
        other = await client.get("/api/conversations", headers={"Host": f"other:{port}"})
        probes = [(await client.get(p, headers={"Host": f"other:{port}"})).status_code
                  for p in ("/healthz", "/readyz")]
    assert mine.status_code == 200, mine.text
    assert other.status_code == 403, other.text
    assert "SERVICE_API_KEYS" in other.json()["error"]["message"]
    assert all(code in (200, 503) for code in probes), probes


# -- another key's ids: indistinguishable from missing ones -------------------------------------


async def test_another_keys_ids_answer_exactly_as_missing_ones_everywhere(
    settings: Settings,
) -> None:
    """Pins what held on every surface probed: key B asking about key A's conversation or run
    (read, re-join with ``?after``/``Last-Event-ID``, cancel, delete, post to it, its LLM
    calls, and over the WebSocket: a message to its conversation, a cancel of its run while it
    is live in this very process) gets the answer a made-up id of the same shape gets: 404
    ``not_found``, the same body but for the id, the same headers. And A's run goes on."""
    def reply(req: Any) -> Reply:
        if req.messages[-1].content == "hang":
            return Reply("tick tock", hang_after=1)  # live until its client leaves
        return by_content(req)

    async with running_server(_keyed(settings), ScriptedBackend(reply)) as srv, \
            srv.client() as client:
        conv = (await client.post("/api/conversations", json={}, headers=A)).json()["id"]
        done = await client.post(f"/api/conversations/{conv}/messages", headers=A,
                                 json={"content": "hi"})
        run = done.json()["run"]["id"]
        missing_conv, missing_run = "conv_" + "0" * 24, "run_" + "0" * 24
        asks: list[tuple[str, str, str, str, dict[str, Any]]] = [
            ("GET", "/api/runs/{}", run, missing_run, {}),
            ("GET", "/api/runs/{}/events", run, missing_run, {}),
            ("GET", "/api/runs/{}/events?after=1", run, missing_run, {}),
            ("GET", "/api/runs/{}/events", run, missing_run, {"headers": {"Last-Event-ID": "2"}}),
            ("POST", "/api/runs/{}/cancel", run, missing_run, {}),
            ("GET", "/api/llm-calls?run_id={}", run, missing_run, {}),
            ("GET", "/api/conversations/{}", conv, missing_conv, {}),
            ("DELETE", "/api/conversations/{}", conv, missing_conv, {}),
            ("POST", "/api/conversations/{}/messages", conv, missing_conv,
             {"json": {"content": "x"}}),
        ]
        for method, path, theirs, missing, kw in asks:
            headers = {**B, **kw.pop("headers", {})}
            got = [_shape(await client.request(method, path.format(ident), headers=headers,
                                               **kw), ident) for ident in (theirs, missing)]
            assert got[0] == got[1], (method, path, got)
            assert got[0][0] == 404, (method, path, got)
        # A run of A's live in this process, cancelled by B over a WebSocket and over HTTP.
        async with client.stream("POST", f"/api/conversations/{conv}/messages", headers=A,
                                 json={"content": "hang", "stream": True}) as stream:
            live_run = stream.headers["x-run-id"]
            async with open_websocket_url(_ws(srv), extra_headers=[
                    (b"Authorization", b"Bearer key-b")]) as ws:
                replies = []
                for ident in (live_run, missing_run):
                    await ws.send_message(json.dumps({"type": "cancel", "run_id": ident}))
                    replies.append(json.dumps(await _ws_json(ws)).replace(ident, "ID"))
                await ws.send_message(json.dumps(
                    {"type": "message", "conversation_id": conv, "content": "x"}))
                msg = await _ws_json(ws)
            assert replies[0] == replies[1], replies
            assert '"not_found"' in replies[0]
            assert msg["error"]["type"] == "not_found", msg
            r = await client.post(f"/api/runs/{live_run}/cancel", headers=B)
            assert r.status_code == 404
            state = (await client.get(f"/api/runs/{live_run}", headers=A)).json()["status"]
            assert state in ("queued", "running"), state
