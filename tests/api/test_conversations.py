"""The conversations API and its error model, against the real server on port 0."""

from __future__ import annotations

from typing import Any

import pytest

from service.settings import Settings
from service.store import MessageStatus

from ..servers import RunningServer, running_server

pytestmark = pytest.mark.both_stores  # the end-to-end tests run on both stores


async def test_create_get_list_delete(server: RunningServer) -> None:
    async with server.client() as client:
        r = await client.post("/api/conversations", json={"title": "first", "system": "be nice"})
        assert r.status_code == 201
        conv = r.json()
        assert conv["title"] == "first"
        assert conv["system"] == "be nice"
        assert conv["id"].startswith("conv_")
        assert conv["created_at"].endswith("Z")

        r = await client.get(f"/api/conversations/{conv['id']}")
        assert r.status_code == 200
        assert r.json()["messages"] == []

        await server.services.require_store().append_message(conv["id"], role="user", content="hi")
        r = await client.get(f"/api/conversations/{conv['id']}")
        (msg,) = r.json()["messages"]
        assert (msg["role"], msg["content"], msg["status"]) == ("user", "hi", "complete")

        r = await client.delete(f"/api/conversations/{conv['id']}")
        assert r.status_code == 204
        assert r.content == b""
        r = await client.get(f"/api/conversations/{conv['id']}")
        assert r.status_code == 404
        assert r.json()["error"]["type"] == "not_found"
        r = await client.delete(f"/api/conversations/{conv['id']}")
        assert r.status_code == 404


async def test_list_is_newest_first_with_cursor_pages(server: RunningServer) -> None:
    async with server.client() as client:
        ids = []
        for i in range(7):
            r = await client.post("/api/conversations", json={"title": f"c{i}"})
            ids.append(r.json()["id"])
        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            params: dict[str, str | int] = {"limit": 3}
            if cursor:
                params["before"] = cursor
            r = await client.get("/api/conversations", params=params)
            assert r.status_code == 200
            body = r.json()
            seen += [c["id"] for c in body["data"]]
            pages += 1
            cursor = body["next"]
            if cursor is None:
                break
        assert seen == list(reversed(ids))
        assert pages == 3


async def test_a_message_cursor_is_not_taken_for_a_list_cursor(
        server: RunningServer) -> None:
    # Both are positions in a table of their own: a message cursor passed to the list is a
    # 422 naming what it is, not a page of the wrong table. (A list cursor passed to a message
    # page is read as a position: it has the form message cursors had before the kinds.)
    async with server.client() as client:
        for _ in range(3):
            conv = (await client.post("/api/conversations", json={})).json()["id"]
        await server.services.require_store().append_messages(
            conv, [("user", f"m{i}", MessageStatus.complete, None) for i in range(3)])
        list_cursor = (await client.get("/api/conversations", params={"limit": 1})).json()["next"]
        r = await client.get(f"/api/conversations/{conv}", params={"limit": 1})
        message_cursor = r.json()["messages_next"]
        assert list_cursor
        assert message_cursor
        r = await client.get("/api/conversations", params={"before": message_cursor})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["field"] == "before"
        assert "messages, not of this list" in r.json()["error"]["message"]
        # Each still pages its own list.
        r = await client.get(f"/api/conversations/{conv}",
                             params={"limit": 5, "before": message_cursor})
        assert [m["content"] for m in r.json()["messages"]] == ["m0", "m1"]
        r = await client.get("/api/conversations", params={"before": list_cursor})
        assert len(r.json()["data"]) == 2


async def test_a_conversations_messages_come_in_pages_newest_first(
        server: RunningServer) -> None:
    # Without a limit: every message, as before (messages_next null). With one: the newest N,
    # oldest first within the page, and a cursor for the older ones, until the first.
    async with server.client() as client:
        conv = (await client.post("/api/conversations", json={})).json()["id"]
        await server.services.require_store().append_messages(
            conv, [("user" if i % 2 == 0 else "assistant", f"m{i}", MessageStatus.complete,
                    None) for i in range(7)])
        r = await client.get(f"/api/conversations/{conv}")
        assert [m["content"] for m in r.json()["messages"]] == [f"m{i}" for i in range(7)]
        assert r.json()["messages_next"] is None
        pages: list[list[str]] = []
        params: dict[str, str | int] = {"limit": 3}
        while True:
            r = await client.get(f"/api/conversations/{conv}", params=params)
            assert r.status_code == 200, r.text
            pages.append([m["content"] for m in r.json()["messages"]])
            if r.json()["messages_next"] is None:
                break
            params["before"] = r.json()["messages_next"]
        assert pages == [["m4", "m5", "m6"], ["m1", "m2", "m3"], ["m0"]]
        # A page that ends exactly at the first message says there is no more.
        r = await client.get(f"/api/conversations/{conv}", params={"limit": 7})
        assert (len(r.json()["messages"]), r.json()["messages_next"]) == (7, None)
        for bad in ({"limit": 0}, {"limit": 1001}, {"limit": 2, "before": "not-a-cursor"}):
            r = await client.get(f"/api/conversations/{conv}", params=bad)
            assert r.status_code == 422, (bad, r.text)
            assert r.json()["error"]["type"] == "invalid_request"
        # Another's conversation stays a 404 whatever the paging.
        r = await client.get("/api/conversations/conv_nope", params={"limit": 2})
        assert r.status_code == 404


async def test_json_content_type_is_required(server: RunningServer) -> None:
    # Issue 15: a page's no-cors POST (text/plain) created conversations; test_origins_and_tokens.py
    # covers every type a browser can send without a preflight.
    async with server.client() as client:
        r = await client.post("/api/conversations", content=b'{"title": "x"}')
        assert r.status_code == 415
        r = await client.post("/api/conversations", content=b'{"title": "x"}',
                              headers={"Content-Type": "application/json"})
        assert r.status_code == 201


@pytest.mark.parametrize(
    ("body", "status", "etype"),
    [
        (b'{"title": ', 400, "malformed_json"),
        (b"not json", 400, "malformed_json"),
        (b"[1, 2]", 400, "malformed_json"),
        (b'"a string"', 400, "malformed_json"),
        (b"[" * 100_000, 400, "malformed_json"),  # deeper than the parser goes: it was a 500
    ],
)
async def test_malformed_body_is_400(
    server: RunningServer, body: bytes, status: int, etype: str
) -> None:
    async with server.client() as client:
        r = await client.post(
            "/api/conversations", content=body, headers={"content-type": "application/json"}
        )
        assert r.status_code == status
        assert r.json()["error"]["type"] == etype
        assert "Traceback" not in r.text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"title": 5}, "title"),
        ({"agent": "wizard"}, "agent"),
        ({"titel": "typo"}, "titel"),
        ({"title": "x" * 501}, "title"),
    ],
)
async def test_invalid_field_is_422_naming_it(
    server: RunningServer, body: dict[str, object], field: str
) -> None:
    async with server.client() as client:
        r = await client.post("/api/conversations", json=body)
        assert r.status_code == 422
        err = r.json()["error"]
        assert err["type"] == "invalid_request"
        assert err["field"] == field
        assert field in err["message"]


@pytest.mark.parametrize(
    ("params", "field"),
    [({"limit": 0}, "limit"), ({"limit": "x"}, "limit"), ({"before": "@@"}, "before")],
)
async def test_bad_query_is_422(
    server: RunningServer, params: dict[str, object], field: str
) -> None:
    async with server.client() as client:
        r = await client.get("/api/conversations", params=params)
        assert r.status_code == 422
        assert r.json()["error"]["field"] == field


async def test_an_empty_query_value_is_taken_as_absent(server: RunningServer) -> None:
    # API.md writes the list as ``?limit=&before=``: copied as it is, that was a 422 for the
    # empty limit, while an empty before was taken as absent. Both are now absent, on every
    # query that takes a number (the llm-calls list; a run's events ``?after=``).
    async with server.client() as client:
        ids = [(await client.post("/api/conversations", json={})).json()["id"]
               for _ in range(3)]
        for query in ("?limit=&before=", "?limit=", "?before=", ""):
            r = await client.get(f"/api/conversations{query}")
            assert r.status_code == 200, (query, r.text)
            assert [c["id"] for c in r.json()["data"]][:3] == ids[::-1], query
        r = await client.get("/api/llm-calls?limit=")
        assert (r.status_code, r.json()["data"]) == (200, []), r.text
        r = await client.get("/api/conversations?limit=%20")  # not empty: still refused
        assert (r.status_code, r.json()["error"]["field"]) == (422, "limit"), r.text
        r = await client.post(f"/api/conversations/{ids[0]}/messages", json={"content": "hi"})
        run_id = r.json()["run"]["id"]
        r = await client.get(f"/api/runs/{run_id}/events?after=")
        assert r.status_code == 200, r.text
        assert r.text.startswith("id: 1\n") or "\nid: 1\n" in r.text, r.text[:300]


async def test_unknown_route_and_method(server: RunningServer) -> None:
    async with server.client() as client:
        r = await client.get("/api/nothing-here")
        assert r.status_code == 404
        assert r.json()["error"]["type"] == "not_found"
        r = await client.put("/api/conversations")
        assert r.status_code == 405
        assert r.json()["error"]["type"] == "method_not_allowed"
        assert "POST" in r.headers["allow"]


async def test_body_over_limit_is_413_and_nothing_lost(settings: Settings) -> None:
    small = settings.model_copy(update={"max_body_bytes": 2048})
    async with running_server(small) as srv, srv.client() as client:
        r = await client.post("/api/conversations", json={"title": "kept"})
        kept = r.json()["id"]
        r = await client.post("/api/conversations", json={"system": "x" * 5000})
        assert r.status_code == 413
        assert r.json()["error"]["type"] == "body_too_large"

        # A chunked body (no Content-Length) over the limit is refused as well.
        async def chunks():  # type: ignore[no-untyped-def]
            yield b'{"system": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}'

        r = await client.post("/api/conversations", content=chunks(),
                              headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        r = await client.get("/api/conversations")
        assert [c["id"] for c in r.json()["data"]] == [kept]


async def test_request_id_is_echoed_or_made(server: RunningServer) -> None:
    async with server.client() as client:
        r = await client.get("/healthz", headers={"X-Request-ID": "abc-123"})
        assert r.headers["x-request-id"] == "abc-123"
        r = await client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})
        assert r.headers["x-request-id"].startswith("req_")


async def test_health_ready_metrics_openapi(server: RunningServer) -> None:
    async with server.client() as client:
        r = await client.get("/healthz")
        assert r.status_code == 200
        r = await client.get("/readyz")
        assert r.status_code == 200
        assert r.json()["checks"]["store"] == "ok"
        r = await client.get("/metrics")
        assert r.status_code == 200
        assert "service_store_seconds" in r.text
        r = await client.get("/openapi.json")
        spec = r.json()
        assert spec["openapi"].startswith("3.")
        post = spec["paths"]["/api/conversations"]["post"]
        schema_ref = post["requestBody"]["content"]["application/json"]["schema"]
        assert "CreateConversation" in str(schema_ref)
        assert "/api/conversations/{conversation_id}" in spec["paths"]


async def test_readyz_is_503_naming_the_store_when_it_is_down(server: RunningServer) -> None:
    await server.services.require_store().aclose()
    async with server.client() as client:
        r = await client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["down"] == ["store"]
        r = await client.get("/api/conversations")
        assert r.status_code == 500
        assert r.json()["error"]["type"] == "store_error"
        assert "Traceback" not in r.text


async def test_auth_and_isolation(settings: Settings) -> None:
    keyed = settings.model_copy(update={"api_keys": ("key-a", "key-b")})
    async with running_server(keyed) as srv:
        async with srv.client() as anon:
            assert (await anon.get("/healthz")).status_code == 200
            r = await anon.get("/api/conversations")
            assert r.status_code == 401
            assert r.json()["error"]["type"] == "unauthorized"
            r = await anon.get("/api/conversations", headers={"Authorization": "Bearer nope"})
            assert r.status_code == 401
        a = srv.client(headers={"Authorization": "Bearer key-a"})
        b = srv.client(headers={"Authorization": "Bearer key-b"})
        async with a, b:
            conv = (await a.post("/api/conversations", json={})).json()
            assert (await a.get(f"/api/conversations/{conv['id']}")).status_code == 200
            assert (await b.get(f"/api/conversations/{conv['id']}")).status_code == 404
            assert (await b.delete(f"/api/conversations/{conv['id']}")).status_code == 404
            assert (await b.get("/api/conversations")).json()["data"] == []
            assert len((await a.get("/api/conversations")).json()["data"]) == 1


@pytest.mark.parametrize("on_disconnect", ["continue", "cancel"])
async def test_deleting_a_conversation_stops_its_runs(settings: Settings, on_disconnect: str
                                                      ) -> None:
    # Found in review: the delete removed the rows but the run kept generating (until its
    # deadline, holding a slot), and its cancel was a 404: nothing could stop it any more.
    import trio

    from ..fakes import Reply, ScriptedBackend

    backend = ScriptedBackend(lambda req: Reply("w " * 400, gap=0.05))
    async with running_server(settings, backend) as srv, srv.client() as client:
        conv = (await client.post("/api/conversations", json={})).json()["id"]
        async def post() -> None:
            await client.post(f"/api/conversations/{conv}/messages",
                              json={"content": "hi", "on_disconnect": on_disconnect})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(post)
            stream = await backend.wait_stream(0)
            (run_id,) = await srv.services.require_store().runs_in_progress(conv)
            handle = srv.services.require_supervisor().get(run_id)
            assert handle is not None
            assert (await client.delete(f"/api/conversations/{conv}")).status_code == 204
            # By the time the delete answers, the run has ended and its upstream is closed.
            assert handle.done
            assert handle.cancel_reason == "the conversation was deleted"
            assert stream.closed
            assert srv.services.require_supervisor().in_flight == 0
            nursery.cancel_scope.cancel()
        assert (await client.get(f"/api/conversations/{conv}")).status_code == 404
        assert (await client.get(f"/api/runs/{run_id}")).status_code == 404


def _hold_after_first_write(store: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """Hold each run's start after its first write has landed (the run is stored and its id
    visible, but it is not launched): (landed, release) events."""
    import trio

    landed, release = trio.Event(), trio.Event()
    real = store.begin_run

    async def begin_run(*args: Any, **kwargs: Any) -> Any:
        begun = await real(*args, **kwargs)
        landed.set()
        await release.wait()
        return begun

    monkeypatch.setattr(store, "begin_run", begin_run)
    return landed, release


@pytest.mark.parametrize("action", ["cancel", "delete"])
async def test_a_run_stopped_between_its_first_write_and_its_launch_stays_stopped(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, action: str
) -> None:
    # Found in review: in that window the run is stored (a client can see its id) but not
    # launched; a cancel answered 202 "running" and the run then succeeded, and a delete left
    # it generating a whole answer for a conversation that no longer existed.
    import trio

    from ..fakes import Reply, ScriptedBackend

    backend = ScriptedBackend(lambda req: Reply("a b c d e f", gap=0.2))
    async with running_server(settings, backend) as srv, srv.client() as client:
        store = srv.services.require_store()
        landed, release = _hold_after_first_write(store, monkeypatch)
        conv = (await client.post("/api/conversations", json={})).json()["id"]
        posted: dict[str, Any] = {}

        async def post() -> None:
            posted["r"] = await client.post(f"/api/conversations/{conv}/messages",
                                            json={"content": "hi", "on_disconnect": "continue"})

        async def stop(run_id: str) -> None:
            if action == "cancel":
                r = await client.post(f"/api/runs/{run_id}/cancel")
                posted["cancel"] = (r.status_code, r.json()["status"])
            else:
                assert (await client.delete(f"/api/conversations/{conv}")).status_code == 204

        supervisor = srv.services.require_supervisor()
        asked = trio.Event()
        real = supervisor.cancel_starting

        async def cancel_starting(run_id: str, reason: str) -> Any:
            asked.set()  # the stop has reached the run while it is still starting
            return await real(run_id, reason)

        monkeypatch.setattr(supervisor, "cancel_starting", cancel_starting)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(post)
            await landed.wait()
            (run_id,) = await store.runs_in_progress(conv)
            assert supervisor.starting(run_id)
            nursery.start_soon(stop, run_id)
            with trio.fail_after(10):  # a guard only
                await asked.wait()
            release.set()
        assert not any(s.completed for s in backend.streams)  # no answer was generated
        if action == "cancel":
            assert posted["cancel"] == (202, "cancelled")
            assert (await client.get(f"/api/runs/{run_id}")).json()["status"] == "cancelled"
            assert posted["r"].status_code == 409
        else:
            assert (await client.get(f"/api/conversations/{conv}")).status_code == 404
