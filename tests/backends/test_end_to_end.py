"""End to end: the real server on port 0, its real backend adapters, the simulator on loopback.

The lifespan builds the backend from the settings (``SERVICE_BACKEND=llamacpp`` or ``ollama``
pointed at the simulator), so the interceptor records into the server's own store, as in
production. Real time and real sockets: every wait is guarded with ``trio.fail_after``; no test
asserts a wall-clock duration.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import httpx
import pytest
import trio

from service.settings import Settings
from service.sim import Reply

from ..e2e import GUARD, KINDS, TERMINAL, Env, EventStream, after_tokens, e2e, read_events, tokens
from ..servers import commits_of

pytestmark = pytest.mark.both_stores  # the end-to-end tests run on both stores


# -- a streamed run through each protocol -------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_streamed_run_over_sse(settings: Settings, kind: str) -> None:
    async with e2e(settings, kind) as env:
        env.sim.script(Reply(text="Hello there brave new world"))
        conv = await env.conversation(title="e2e")
        with trio.fail_after(GUARD):
            async with env.post_stream(conv, "say hello") as r:
                assert r.headers["cache-control"] == "no-cache"
                events = await read_events(r)

        assert [e.id for e in events] == list(range(1, len(events) + 1))
        types = [e.type for e in events]
        assert types[0] == "run.started"
        assert types[-2:] == ["message", "run.finished"]
        assert set(types[1:-2]) == {"token"}
        assert tokens(events) == ["Hello ", "there ", "brave ", "new ", "world"]
        run_id = events[0].data["run_id"]
        assert events[0].data["conversation_id"] == conv
        assert events[-2].data["content"] == "Hello there brave new world"
        finished = events[-1].data
        assert finished["status"] == "succeeded"
        assert finished["usage"]["completion_tokens"] == 5

        # The upstream saw the question, in the protocol of its kind, and sent all of it.
        (record,) = env.sim.streams
        assert record.protocol == ("openai" if kind == "llamacpp" else "ollama")
        assert record.body["messages"][-1] == {"role": "user", "content": "say hello"}
        assert record.completed
        assert not record.client_gone

        run = (await env.client.get(f"/api/runs/{run_id}")).json()
        assert run["status"] == "succeeded"
        assert run["usage"]["completion_tokens"] == 5
        reply = await env.reply_of(conv, run_id)
        assert (reply["status"], reply["content"]) == ("complete", "Hello there brave new world")

        (call,) = await env.llm_calls(run_id)
        assert call["outcome"] == "ok"
        assert call["backend"] == kind
        assert call["model"] == "sim-model"
        assert call["run_id"] == run_id
        assert call["completion_tokens"] == 5
        assert call["prompt_tokens"] == 3  # the simulator's count: 2 words + 1 per message
        assert call["tokens_estimated"] is False
        assert call["error"] is None
        assert call["started_at"].endswith("Z")
        assert call["ttft"] is not None
        assert call["duration"] is not None

        r = await env.client.get("/api/backends")
        assert r.status_code == 200
        (backend,) = r.json()["data"]
        assert backend["name"] == kind
        assert backend["url"] == env.sim.url
        assert backend["reachable"] is True
        assert backend["ready"] is True
        assert backend["models"] == ["sim-model"]
        assert backend["last_error"] is None
        assert (backend["failures"], backend["last_call_error"], backend["cooldown"]) == (
            None, None, None)  # not a member of auto: nothing tracked

        r = await env.client.get("/readyz")
        assert r.status_code == 200
        assert r.json()["checks"]["backend"] == "ok"


@pytest.mark.parametrize("kind", KINDS)
async def test_readyz_and_backends_when_the_upstream_is_down(settings: Settings, kind: str) -> None:
    async with e2e(settings, kind) as env:
        assert (await env.client.get("/readyz")).status_code == 200
        await env.stop_sim()
        with trio.fail_after(GUARD):
            r = await env.client.get("/readyz")
        assert r.status_code == 503
        body = r.json()
        assert body["down"] == ["backend"]
        assert body["checks"]["store"] == "ok"
        assert body["checks"]["backend"].startswith("down:")

        with trio.fail_after(GUARD):
            r = await env.client.get("/api/backends")
        assert r.status_code == 200
        (backend,) = r.json()["data"]
        assert backend["name"] == kind
        assert backend["reachable"] is False
        assert backend["ready"] is False
        assert backend["models"] == []
        assert backend["last_error"]


async def test_readyz_503_while_llamacpp_loads(settings: Settings) -> None:
    async with e2e(settings, "llamacpp") as env:
        env.sim.set_loading(1)  # the next /health answers 503 "Loading model"
        r = await env.client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["down"] == ["backend"]
        assert "Loading model" in r.json()["checks"]["backend"]
        (backend,) = (await env.client.get("/api/backends")).json()["data"]
        assert backend["reachable"] is True  # it answered: loading, not gone
        assert (await env.client.get("/readyz")).status_code == 200


async def test_backends_lists_each_member_of_auto(settings: Settings) -> None:
    # The simulator speaks both protocols, so both members of "auto" find it.
    async with e2e(settings, "auto") as env:
        r = await env.client.get("/api/backends")
        assert r.status_code == 200
        data = r.json()["data"]
        assert [b["name"] for b in data] == ["ollama", "llamacpp"]
        assert all(b["reachable"] and b["ready"] for b in data)
        assert all(b["models"] == ["sim-model"] for b in data)
        assert all(b["url"] == env.sim.url for b in data)


async def test_backends_shows_the_failures_that_auto_routed_around(settings: Settings) -> None:
    # The first member answers its health probe but fails calls: /api/backends must say so
    # (its last call error, the count, and the cool-down once it is set aside), not "healthy".
    async with e2e(settings, "auto") as env:
        for i in range(3):
            env.sim.script(Reply(status=500, error=f"out of memory {i}"), Reply(text="fine"))
            r = await env.client.post("/v1/chat/completions", json={
                "model": "sim-model", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200  # failed over to the second member
            assert r.json()["choices"][0]["message"]["content"] == "fine"
            ollama, llamacpp = (await env.client.get("/api/backends")).json()["data"]
            assert ollama["name"] == "ollama"
            assert ollama["reachable"] is True  # its probe still answers
            assert ollama["last_error"] is None
            assert ollama["failures"] == i + 1
            assert f"out of memory {i}" in ollama["last_call_error"]
            assert (llamacpp["failures"], llamacpp["last_call_error"], llamacpp["cooldown"]) == (
                0, None, None)
            if i < 2:
                assert ollama["cooldown"] is None
        assert 0 < ollama["cooldown"] <= 30  # set aside after the third failure in a row
        # Only members of auto are tracked; the fields are null elsewhere (see the test above).


async def test_tools_are_listed_and_documented(settings: Settings) -> None:
    async with e2e(settings, "llamacpp", tool_timeout=7.0) as env:
        r = await env.client.get("/api/tools")
        assert r.status_code == 200
        data = r.json()["data"]
        assert data
        for t in data:
            assert set(t) == {"name", "description", "parameters", "timeout"}
            assert t["parameters"]["type"] == "object"
        assert len({t["name"] for t in data}) == len(data)
        tools = env.server.services.tools
        assert tools is not None
        # Tools without a timeout of their own take SERVICE_TOOL_TIMEOUT.
        assert data == [t.spec(7.0) for t in tools]

        paths = (await env.client.get("/openapi.json")).json()["paths"]
        for path in ("/api/tools", "/api/backends", "/api/llm-calls"):
            assert "200" in paths[path]["get"]["responses"], path
        params = {p["name"] for p in paths["/api/llm-calls"]["get"]["parameters"]}
        assert params == {"run_id", "limit"}


# -- /api/llm-calls: validation and owner scoping -----------------------------------------------


async def test_llm_calls_query_is_validated(settings: Settings) -> None:
    async with e2e(settings, "ollama") as env:
        cases: list[tuple[dict[str, str | int], str]] = [
            ({"limit": 0}, "limit"), ({"limit": 501}, "limit"), ({"limit": "x"}, "limit"),
        ]
        for params, field in cases:
            r = await env.client.get("/api/llm-calls", params=params)
            assert r.status_code == 422, params
            assert r.json()["error"]["field"] == field
        r = await env.client.get("/api/llm-calls", params={"limit": 500})
        assert r.json() == {"data": []}
        # Unknown parameters are ignored (API.md), as on every list endpoint.
        r = await env.client.get("/api/llm-calls", params={"nope": 1})
        assert (r.status_code, r.json()) == (200, {"data": []})


async def test_llm_calls_are_newest_first_and_limited(settings: Settings) -> None:
    async with e2e(settings, "llamacpp") as env:
        env.sim.script("one", "two", "three")
        conv = await env.conversation()
        runs = []
        for text in ("a", "b", "c"):
            r = await env.client.post(f"/api/conversations/{conv}/messages", json={"content": text})
            assert r.status_code == 200, r.text
            runs.append(r.json()["run"]["id"])
        data = (await env.client.get("/api/llm-calls")).json()["data"]
        assert [c["run_id"] for c in data] == runs[::-1]
        data = (await env.client.get("/api/llm-calls", params={"limit": 2})).json()["data"]
        assert [c["run_id"] for c in data] == runs[:0:-1]
        # An unknown run is a 404, with or without auth (it was [] without).
        r = await env.client.get("/api/llm-calls", params={"run_id": "run_unknown"})
        assert r.status_code == 404, r.text


async def test_a_v1_call_that_fails_before_any_event_is_recorded_with_its_run(
    settings: Settings,
) -> None:
    # A call that ends before its run emitted anything (the upstream refused it) is recorded
    # after the run's own write: the record names its run, which the store holds (a record
    # queued before it would be stored with run_id null).
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(status=400, error="bad request from the upstream"))
        with trio.fail_after(GUARD):
            r = await env.client.post("/v1/chat/completions", json={
                "model": "m", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code >= 400, r.text
            (call,) = (await env.client.get("/api/llm-calls")).json()["data"]
            assert call["outcome"] == "error"
            assert call["run_id"] is not None
            run = await env.client.get(f"/api/runs/{call['run_id']}")
        assert (run.status_code, run.json()["status"]) == (200, "failed")


async def test_llm_calls_are_scoped_to_the_callers_runs(settings: Settings) -> None:
    async with e2e(settings, "ollama", api_keys=("key-a", "key-b")) as env:
        a = {"Authorization": "Bearer key-a"}
        b = {"Authorization": "Bearer key-b"}
        r = await env.client.post("/api/conversations", json={}, headers=a)
        conv = r.json()["id"]
        r = await env.client.post(f"/api/conversations/{conv}/messages",
                                  json={"content": "hi"}, headers=a)
        assert r.status_code == 200, r.text
        run_id = r.json()["run"]["id"]

        r = await env.client.get("/api/llm-calls", params={"run_id": run_id}, headers=a)
        assert [c["run_id"] for c in r.json()["data"]] == [run_id]
        r = await env.client.get("/api/llm-calls", headers=a)
        assert [c["run_id"] for c in r.json()["data"]] == [run_id]

        r = await env.client.get("/api/llm-calls", params={"run_id": run_id}, headers=b)
        assert r.status_code == 404
        r = await env.client.get("/api/llm-calls", headers=b)
        assert r.json() == {"data": []}
        assert (await env.client.get("/api/llm-calls")).status_code == 401


# -- the client goes away ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_sse_disconnect_cancels_run_and_upstream(settings: Settings, kind: str) -> None:
    async with e2e(settings, kind) as env:
        env.sim.script(Reply(tokens=50, hang_after=3))  # 3 tokens, then nothing
        conv = await env.conversation()
        with trio.fail_after(GUARD):
            async with env.post_stream(conv) as r:
                seen = await read_events(r, stop=after_tokens(3))
        # The client is gone (default on_disconnect=cancel): the run stops, and so does the
        # upstream generation.
        run_id = seen[0].data["run_id"]
        record = env.sim.streams[0]
        with trio.fail_after(GUARD):
            await record.closed.wait()
        assert record.client_gone
        assert not record.completed
        assert record.chunks_sent == 3

        run = await env.finished_run(run_id)
        assert run["status"] == "cancelled"
        assert run["error"] == "client disconnected"
        reply = await env.reply_of(conv, run_id)
        assert (reply["status"], reply["content"]) == ("cancelled", "tok0 tok1 tok2 ")
        (call,) = await env.llm_calls(run_id)
        assert call["outcome"] == "cancelled"
        assert call["completion_tokens"] == 3
        assert call["tokens_estimated"] is True

        # The stored events end with exactly one run.finished saying so.
        events = await env.run_events(run_id)
        assert [e.type for e in events].count("run.finished") == 1
        assert events[-1].data["status"] == "cancelled"


@pytest.mark.parametrize("kind", KINDS)
async def test_continue_run_survives_disconnect_and_rejoin_has_no_gap(
    settings: Settings, kind: str
) -> None:
    async with e2e(settings, kind) as env:
        env.sim.script(Reply(tokens=12, interval=0.02))
        conv = await env.conversation()
        with trio.fail_after(GUARD):
            async with env.post_stream(conv, on_disconnect="continue") as r:
                first = await read_events(r, stop=after_tokens(2))
        assert first[-1].type == "token"
        last_seen = first[-1].id
        run_id = first[0].data["run_id"]

        # Re-join at once (the run is most likely still going), after what the client saw.
        rest = await env.run_events(run_id, **{"Last-Event-ID": str(last_seen)})
        assert [e.id for e in rest] == list(range(last_seen + 1, last_seen + 1 + len(rest)))
        assert rest[-1].type == "run.finished"
        assert rest[-1].data["status"] == "succeeded"

        whole = await env.run_events(run_id)  # one uninterrupted read of the whole run
        assert first + rest == whole
        assert "".join(tokens(whole)) == "".join(f"tok{i} " for i in range(12))

        record = env.sim.streams[0]
        assert record.completed
        assert not record.client_gone
        reply = await env.reply_of(conv, run_id)
        assert reply["status"] == "complete"
        assert reply["content"] == "".join(f"tok{i} " for i in range(12))
        (call,) = await env.llm_calls(run_id)
        assert call["outcome"] == "ok"

        # ?after= is the same as Last-Event-ID; a bad header is refused.
        with trio.fail_after(GUARD):
            async with env.client.stream("GET", f"/api/runs/{run_id}/events",
                                         params={"after": last_seen}) as r:
                assert await read_events(r) == rest
        r = await env.client.get(f"/api/runs/{run_id}/events", headers={"Last-Event-ID": "x"})
        assert r.status_code == 422


@pytest.mark.parametrize("kind", KINDS)
async def test_non_streaming_post_returns_run_and_message(settings: Settings, kind: str) -> None:
    async with e2e(settings, kind) as env:
        env.sim.script("The answer is 42")
        conv = await env.conversation()
        with trio.fail_after(GUARD):
            r = await env.client.post(f"/api/conversations/{conv}/messages",
                                      json={"content": "what is it?"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"run", "message"}
        assert body["run"]["status"] == "succeeded"
        assert body["run"]["conversation_id"] == conv
        assert body["run"]["usage"]["completion_tokens"] == 4
        message = body["message"]
        assert (message["role"], message["status"]) == ("assistant", "complete")
        assert message["content"] == "The answer is 42"
        assert message["run_id"] == body["run"]["id"]


@pytest.mark.parametrize("kind", KINDS)
async def test_non_streaming_client_leaving_cancels_run_and_upstream(
    settings: Settings, kind: str
) -> None:
    async with e2e(settings, kind) as env:
        env.sim.script(Reply(tokens=50, hang_after=2))
        conv = await env.conversation()

        async def post() -> None:
            await env.client.post(f"/api/conversations/{conv}/messages", json={"content": "hi"})
            raise AssertionError("the request should have been cancelled")

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(post)
                (record,) = await env.sim.wait_streams(1)
                messages = (await env.client.get(f"/api/conversations/{conv}")).json()["messages"]
                run_id = messages[-1]["run_id"]
                # Watch the run (a watcher never cancels it) until the model is "generating".
                async with env.client.stream("GET", f"/api/runs/{run_id}/events") as r:
                    await read_events(r, stop=after_tokens(2))
                nursery.cancel_scope.cancel()  # the client gives up: its connection closes
            await record.closed.wait()
        assert record.client_gone

        run = await env.finished_run(run_id)
        assert run["status"] == "cancelled"
        reply = await env.reply_of(conv, run_id)
        assert (reply["status"], reply["content"]) == ("cancelled", "tok0 tok1 ")
        (call,) = await env.llm_calls(run_id)
        assert call["outcome"] == "cancelled"


@pytest.mark.parametrize("kind", KINDS)
async def test_cancel_endpoint_stops_run_and_is_idempotent(settings: Settings, kind: str) -> None:
    async with e2e(settings, kind) as env:
        env.sim.script(Reply(tokens=50, hang_after=2))
        conv = await env.conversation()
        with trio.fail_after(GUARD):
            async with env.post_stream(conv) as r:
                stream = EventStream(r)
                seen = await stream.read(after_tokens(2))
                run_id = seen[0].data["run_id"]
                c = await env.client.post(f"/api/runs/{run_id}/cancel")
                assert c.status_code == 202
                assert c.json() == {"id": run_id, "status": "cancelled"}
                # The stream that was watching ends properly, with the run's end.
                rest = await stream.read()
        assert rest[-1].type == "run.finished"
        assert rest[-1].data["status"] == "cancelled"
        assert [e.id for e in seen + rest] == list(range(1, len(seen) + len(rest) + 1))

        c = await env.client.post(f"/api/runs/{run_id}/cancel")
        assert (c.status_code, c.json()) == (202, {"id": run_id, "status": "cancelled"})
        run = (await env.client.get(f"/api/runs/{run_id}")).json()
        assert run["status"] == "cancelled"
        assert run["error"] == "cancelled by request"
        reply = await env.reply_of(conv, run_id)
        assert (reply["status"], reply["content"]) == ("cancelled", "tok0 tok1 ")
        record = env.sim.streams[0]
        with trio.fail_after(GUARD):
            await record.closed.wait()
        assert record.client_gone
        (call,) = await env.llm_calls(run_id)
        assert call["outcome"] == "cancelled"
        assert (await env.client.post("/api/runs/run_nope/cancel")).status_code == 404


# -- the upstream misbehaves ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_upstream_dying_mid_stream_fails_the_run(settings: Settings, kind: str) -> None:
    async with e2e(settings, kind) as env:
        env.sim.script(Reply(tokens=10, die_after=2))
        conv = await env.conversation()
        with trio.fail_after(GUARD):
            async with env.post_stream(conv) as r:
                events = await read_events(r)
        assert tokens(events) == ["tok0 ", "tok1 "]
        assert [e.type for e in events][-2:] == ["error", "run.finished"]
        error = events[-2].data
        assert error["type"] == "upstream_broken"  # it answered, then broke: 502, not 503
        assert error["message"]
        assert events[-1].data["status"] == "failed"
        run_id = events[0].data["run_id"]

        run = (await env.client.get(f"/api/runs/{run_id}")).json()
        assert run["status"] == "failed"
        assert run["error"]
        reply = await env.reply_of(conv, run_id)
        assert (reply["status"], reply["content"]) == ("error", "tok0 tok1 ")
        (call,) = await env.llm_calls(run_id)
        assert call["outcome"] == "error"
        assert call["error"]
        assert env.sim.streams[0].died


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("hang_after", [-1, 0], ids=["before-headers", "after-headers"])
async def test_upstream_hanging_before_first_token_times_out(
    settings: Settings, kind: str, hang_after: int
) -> None:
    async with e2e(settings, kind, llm_idle_timeout=0.5) as env:
        env.sim.script(Reply(tokens=5, hang_after=hang_after))
        conv = await env.conversation()
        with trio.fail_after(GUARD):
            async with env.post_stream(conv) as r:
                events = await read_events(r)
        assert [e.type for e in events] == ["run.started", "error", "run.finished"]
        assert events[1].data["type"] == "first_chunk_timeout"
        assert events[2].data["status"] == "failed"
        run_id = events[0].data["run_id"]
        reply = await env.reply_of(conv, run_id)
        assert (reply["status"], reply["content"]) == ("error", "")
        (call,) = await env.llm_calls(run_id)
        assert call["outcome"] == "timed_out"
        record = env.sim.streams[0]
        with trio.fail_after(GUARD):
            await record.closed.wait()
        assert record.client_gone  # the service hung up on the silent upstream
        assert record.chunks_sent == 0


@pytest.mark.parametrize("kind", KINDS)
async def test_non_streaming_failures_map_to_statuses(settings: Settings, kind: str) -> None:
    async with e2e(settings, kind, llm_idle_timeout=0.5) as env:
        conv = await env.conversation()
        url = f"/api/conversations/{conv}/messages"
        cases: list[tuple[Reply, dict[str, Any], int, str]] = [
            (Reply(hang_after=0), {}, 504, "first_chunk_timeout"),
            (Reply(status=503, error="Loading model"), {}, 503, ""),
            (Reply(), {"model": "ghost"}, 404, "model_not_found"),
        ]
        for reply, extra, status, type_ in cases:
            env.sim.script(reply)
            with trio.fail_after(GUARD):
                r = await env.client.post(url, json={"content": "hi", **extra})
            assert r.status_code == status, (reply, r.text)
            error = r.json()["error"]
            assert error["run_status"] == "failed"
            if type_:
                assert error["type"] == type_
            run = (await env.client.get(f"/api/runs/{error['run_id']}")).json()
            assert run["status"] == "failed"


async def test_non_streaming_continue_run_outlives_its_client(settings: Settings) -> None:
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(tokens=10, interval=0.02))
        conv = await env.conversation()

        async def post() -> None:
            await env.client.post(f"/api/conversations/{conv}/messages",
                                  json={"content": "hi", "on_disconnect": "continue"})
            raise AssertionError("the request should have been cancelled")

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(post)
                await env.sim.wait_streams(1)
                messages = (await env.client.get(f"/api/conversations/{conv}")).json()["messages"]
                run_id = messages[-1]["run_id"]
                async with env.client.stream("GET", f"/api/runs/{run_id}/events") as r:
                    await read_events(r, stop=after_tokens(2))
                nursery.cancel_scope.cancel()

        run = await env.finished_run(run_id)
        assert run["status"] == "succeeded"
        reply = await env.reply_of(conv, run_id)
        assert (reply["status"], reply["content"]) == (
            "complete", "".join(f"tok{i} " for i in range(10)))
        assert env.sim.streams[0].completed


# -- the other client surfaces: WebSocket and the OpenAI-compatible endpoint ---------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_ws_drop_closes_the_upstream(settings: Settings, kind: str) -> None:
    from trio_websocket import open_websocket_url

    async with e2e(settings, kind) as env:
        env.sim.script(Reply(tokens=500, interval=0.02))
        conv = await env.conversation()
        url = env.server.url.replace("http://", "ws://") + "/api/ws"
        with trio.fail_after(GUARD):
            async with open_websocket_url(url) as ws:
                await ws.send_message(json.dumps(
                    {"type": "message", "conversation_id": conv, "content": "go"}))
                seen = 0
                while seen < 3:
                    msg = json.loads(await ws.get_message())
                    run_id = msg["run_id"]
                    seen += msg["type"] == "token"
            # The socket is gone: the upstream generation must be closed too.
            (record,) = env.sim.streams
            await record.closed.wait()
        assert record.client_gone
        run = await env.finished_run(run_id)
        assert run["status"] == "cancelled"
        reply = await env.reply_of(conv, run_id)
        assert reply["status"] == "cancelled"
        assert reply["content"].startswith("tok0 tok1 tok2")
        (call,) = await env.llm_calls(run_id)
        assert call["outcome"] == "cancelled"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stream", [True, False])
async def test_v1_disconnect_closes_the_upstream(
    settings: Settings, kind: str, stream: bool
) -> None:
    async with e2e(settings, kind) as env:
        env.sim.script(Reply(tokens=500, interval=0.02))
        body = {"model": "sim-model", "stream": stream,
                "messages": [{"role": "user", "content": "go"}]}
        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:

                async def request() -> None:
                    async with env.client.stream(
                        "POST", "/v1/chat/completions", json=body
                    ) as r:
                        assert r.status_code == 200
                        async for _ in r.aiter_bytes():
                            pass

                nursery.start_soon(request)
                await env.sim.wait_streams(1)
                # The simulator counts chunks; it has no event per chunk to wait on.
                while env.sim.streams[0].chunks_sent < 3:  # noqa: ASYNC110
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()  # the client leaves mid-answer
            (record,) = env.sim.streams
            await record.closed.wait()
        assert record.client_gone
        assert not record.completed


async def test_v1_run_that_cannot_be_stored_answers_503_and_closes_its_upstream(
    settings: Settings,
) -> None:
    # A /v1 run's upstream request goes out while its first write commits; if that write
    # fails, the client gets the store's error and the upstream request is closed.
    import threading

    from service.store.faults import InjectedFault

    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(tokens=500, interval=0.02))
        store = env.server.services.require_store()
        upstream_called = threading.Event()

        def failing_commit() -> None:  # in the store's writer thread, before COMMIT
            upstream_called.wait(GUARD)
            raise InjectedFault("disk I/O error")

        store.faults.before_commit = failing_commit
        body = {"model": "sim-model", "stream": True,
                "messages": [{"role": "user", "content": "go"}]}
        responses: list[httpx.Response] = []

        async def post() -> None:
            responses.append(await env.client.post("/v1/chat/completions", json=body))

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(post)
                await env.sim.wait_streams(1)  # the upstream request is out; the write not yet
                upstream_called.set()
        (r,) = responses
        store.faults.before_commit = None
        # A store that cannot write is worth a retry (clients do not retry a 500).
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "store_unavailable"
        assert r.headers["Retry-After"] == "5"
        assert "Traceback" not in r.text
        with trio.fail_after(GUARD):
            (record,) = env.sim.streams
            await record.closed.wait()
        assert record.client_gone
        assert not record.completed
        supervisor = env.server.services.require_supervisor()
        with trio.fail_after(GUARD):
            while supervisor.in_flight:  # noqa: ASYNC110 (no event for it)
                await trio.sleep(0.01)
        r = await env.client.get("/api/conversations")
        assert r.json()["data"] == []  # nothing half-stored


@pytest.mark.parametrize(("endpoint", "on_disconnect"),
                         [("v1", "cancel"), ("native", "cancel"), ("native", "continue")])
async def test_client_gone_while_its_run_is_being_stored(
    settings: Settings, endpoint: str, on_disconnect: str,
) -> None:
    # The client leaves while the run's first write is in the store's thread: the write lands,
    # then the request is cancelled before its response (and the stream that would cancel the
    # run on disconnect) has started. A "cancel" run must still stop, with its upstream call
    # (it went on streaming); a "continue" run must go on (it was recorded as "shutdown").
    import threading

    async with e2e(settings, "llamacpp") as env:
        tokens = 500 if on_disconnect == "cancel" else 5
        env.sim.script(Reply(tokens=tokens, interval=0.02))
        conv = await env.conversation() if endpoint == "native" else ""
        store = env.server.services.require_store()
        in_thread, proceed = threading.Event(), threading.Event()
        # The run's first write's commit only: a commit of the instance's own (its lease's
        # renewal, every 5 s) held instead left the run unwritten (a flake in CI). (Armed once
        # begin_run/write_run was entered, a renewal already in the writer thread could still
        # be the one held.)
        runs_first_write = commits_of(store, "begin_run")

        def held_commit() -> None:  # in the writer thread, before COMMIT
            if not runs_first_write() or in_thread.is_set():
                return
            in_thread.set()
            proceed.wait(GUARD)

        store.faults.before_commit = held_commit
        if endpoint == "v1":
            path, body = "/v1/chat/completions", {
                "model": "sim-model", "stream": True,
                "messages": [{"role": "user", "content": "go"}]}
        else:
            path, body = f"/api/conversations/{conv}/messages", {
                "content": "go", "stream": True, "on_disconnect": on_disconnect}
        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(env.client.post, path, json=body))
                await trio.to_thread.run_sync(in_thread.wait, GUARD)
                nursery.cancel_scope.cancel()  # the client leaves while the write is held
            proceed.set()  # then the write lands
            store.faults.before_commit = None
            while True:  # the run's final state, once it has one
                r = await env.client.get("/api/conversations")
                (c,) = r.json()["data"]
                messages = (await env.client.get(f"/api/conversations/{c['id']}")).json()
                (reply,) = [m for m in messages["messages"] if m["role"] == "assistant"]
                run = (await env.client.get(f"/api/runs/{reply['run_id']}")).json()
                if run["status"] in TERMINAL:
                    break
                await trio.sleep(0.02)
        if on_disconnect == "cancel":
            assert (run["status"], run["error"]) == ("cancelled", "client disconnected")
            for record in env.sim.streams:  # if the upstream was called, it was closed
                await record.closed.wait()
                assert record.client_gone
                assert not record.completed
        else:
            assert run["status"] == "succeeded", run
            final = await env.reply_of(c["id"], run["id"])
            assert (final["status"], final["content"]) == (
                "complete", "".join(f"tok{i} " for i in range(5)))


# -- /v1 endings an OpenAI client can tell from a complete answer (found in a contract review) --


@pytest.mark.parametrize("kind", KINDS)
async def test_v1_stream_failing_before_its_first_token_is_an_http_error(
    settings: Settings, kind: str
) -> None:
    # It was a 200 with an error chunk: the OpenAI SDK raised a generic APIError (status None)
    # instead of NotFoundError / a 5xx it would retry.
    async with e2e(settings, kind, llm_idle_timeout=0.5) as env:
        cases: list[tuple[Reply, str, int, str]] = [
            (Reply(hang_after=0), "sim-model", 504, "first_chunk_timeout"),
            (Reply(), "ghost", 404, "model_not_found"),  # (its script is not consumed)
        ]
        for reply, model, status, type_ in cases:
            env.sim.script(reply)
            with trio.fail_after(GUARD):
                r = await env.client.post("/v1/chat/completions", json={
                    "model": model, "stream": True,
                    "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == status, r.text
            assert r.headers["content-type"].startswith("application/json")
            assert r.json()["error"]["type"] == type_


@pytest.mark.parametrize("ending", ["timeout", "cancel"])
async def test_v1_stream_cut_mid_answer_ends_with_an_error_chunk(
    settings: Settings, ending: str
) -> None:
    # It ended with finish_reason "stop", a usage chunk and [DONE]: a cut answer looked whole.
    update = {"run_timeout": 1.0} if ending == "timeout" else {}
    async with e2e(settings, "llamacpp", **update) as env:
        env.sim.script(Reply(tokens=500, interval=0.05))
        body = {"model": "sim-model", "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "go"}]}
        lines: list[str] = []
        with trio.fail_after(GUARD):
            async with env.client.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    lines.append(line)
                    if ending == "cancel" and sum('"content"' in x for x in lines) == 4:
                        run_id = json.loads(lines[0][6:])["id"].removeprefix("chatcmpl-")
                        c = await env.client.post(f"/api/runs/{run_id}/cancel")
                        assert c.status_code == 202
        data = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        assert not any(x.startswith("data: [DONE]") for x in lines)
        assert not any(c.get("choices") and c["choices"][0]["finish_reason"] for c in data)
        assert not any(c.get("usage") for c in data)  # (every other chunk says "usage": null)
        error = data[-1]["error"]
        assert error["type"] == ("run_timeout" if ending == "timeout" else "cancelled")
        assert sum(bool(c.get("choices") and c["choices"][0]["delta"].get("content"))
                   for c in data) >= 3  # the tokens streamed before it


async def _v1_answer_while(env: Env, action: Callable[[], Awaitable[None]]) -> httpx.Response:
    """A non-stream /v1 completion of a long answer, with ``action`` run once it is answering."""
    env.sim.script(Reply(tokens=500, interval=0.05))
    body = {"model": "sim-model", "messages": [{"role": "user", "content": "go"}]}
    got: list[httpx.Response] = []
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:

            async def request() -> None:
                got.append(await env.client.post("/v1/chat/completions", json=body))

            nursery.start_soon(request)
            await env.sim.wait_streams(1)
            await action()
    (r,) = got
    return r


async def test_v1_non_stream_cancelled_is_409_not_a_retryable_502(settings: Settings) -> None:
    # The OpenAI SDK retries 5xx: a cancelled completion was run again, twice.
    async with e2e(settings, "llamacpp") as env:

        async def cancel() -> None:
            # The run is answering; its write may still be in flight (/v1 overlaps the two).
            convs: list[dict[str, Any]] = []
            while not convs:  # noqa: ASYNC110 (the store has no event to wait on)
                convs = (await env.client.get("/api/conversations")).json()["data"]
                await trio.sleep(0.01)
            (conv,) = convs
            messages = (await env.client.get(f"/api/conversations/{conv['id']}")).json()
            run_id = messages["messages"][-1]["run_id"]
            assert (await env.client.post(f"/api/runs/{run_id}/cancel")).status_code == 202

        r = await _v1_answer_while(env, cancel)
        assert r.status_code == 409, r.text
        assert r.json()["error"]["type"] == "cancelled"


@pytest.mark.parametrize("kind", KINDS)
async def test_v1_passes_the_clients_other_openai_options_on(settings: Settings, kind: str) -> None:
    # Found in a contract review: JSON mode, tool_choice and sampling options were dropped.
    async with e2e(settings, kind) as env:
        env.sim.script(Reply(tokens=2), Reply(tokens=2))
        tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
        base = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}],
                "tools": [tool], "top_p": 0.5, "seed": 7, "presence_penalty": 0.1,
                "frequency_penalty": 0.2}
        for extra in ({"response_format": {"type": "json_object"}, "tool_choice": "auto"},
                      {"response_format": {"type": "json_schema", "json_schema": {
                          "name": "x", "schema": {"type": "object"}}}, "tool_choice": "none"}):
            with trio.fail_after(GUARD):
                r = await env.client.post("/v1/chat/completions", json={**base, **extra})
            assert r.status_code == 200, r.text
        first, second = (s.body for s in env.sim.streams)
        if kind == "llamacpp":  # OpenAI's names, as they came
            for key in ("top_p", "seed", "presence_penalty", "frequency_penalty"):
                assert first[key] == base[key]
            assert first["response_format"] == {"type": "json_object"}
            assert (first["tool_choice"], second["tool_choice"]) == ("auto", "none")
        else:  # Ollama's: options, format; no tools for tool_choice "none"
            assert first["options"]["top_p"] == 0.5
            assert first["options"]["seed"] == 7
            assert first["format"] == "json"
            assert second["format"] == {"type": "object"}
            assert "tools" in first
            assert "tools" not in second
        r = await env.client.post("/v1/chat/completions", json={**base, "top_p": 3})
        assert r.status_code == 422
        # A ReAct run's calls parse their own text format: JSON mode is not theirs. (A
        # client's tools are refused with react: tests/api/test_v1_client_tools_and_agents.py.)
        env.sim.script(Reply(text="Final Answer: ok"))
        react_base = {k: v for k, v in base.items() if k != "tools"}
        with trio.fail_after(GUARD):
            r = await env.client.post("/v1/chat/completions", json={
                **react_base, "agent": "react", "response_format": {"type": "json_object"}})
        assert r.status_code == 200, r.text
        react = env.sim.streams[-1].body
        assert "response_format" not in react
        assert "format" not in react


async def test_v1_stream_of_a_react_run_is_its_answer_only(settings: Settings) -> None:
    # Found in a contract review: the stream carried every step's text ("Let me compute."
    # before a tool call), the non-stream answer only the final one.
    async with e2e(settings, "llamacpp") as env:
        for _ in range(2):
            env.sim.script(
                Reply(text="Let me compute. ", tool_calls=(
                    {"name": "calculator", "arguments": {"expression": "2+2"}},)),
                Reply(text="The answer is 4"),
            )
        body = {"model": "sim-model", "agent": "react",
                "messages": [{"role": "user", "content": "2+2?"}]}
        with trio.fail_after(GUARD):
            whole = (await env.client.post("/v1/chat/completions", json=body)).json()
            async with env.client.stream("POST", "/v1/chat/completions",
                                         json={**body, "stream": True}) as r:
                lines = [x async for x in r.aiter_lines() if x.startswith("data: {")]
        chunks = [json.loads(x[6:])["choices"][0] for x in lines]
        streamed = "".join(c["delta"].get("content") or "" for c in chunks)
        assert whole["choices"][0]["message"]["content"] == "The answer is 4"
        assert streamed == "The answer is 4"
        assert chunks[-1]["finish_reason"] == "stop"


async def test_v1_stream_of_a_react_run_keeps_the_connection_alive_while_it_works(
    settings: Settings,
) -> None:
    # Found in review: its steps' events are not shown, and they reset the reader's keep-alive
    # timer, so nothing at all was sent until the final answer (4 s here; a proxy's idle
    # timeout in production).
    async with e2e(settings, "llamacpp", sse_keepalive=0.5) as env:
        env.sim.script(Reply(tokens=20, interval=0.2))
        body = {"model": "sim-model", "agent": "react", "stream": True,
                "messages": [{"role": "user", "content": "hello"}]}
        with trio.fail_after(GUARD):
            async with env.client.stream("POST", "/v1/chat/completions", json=body) as r:
                lines = [x async for x in r.aiter_lines() if x]
        before_the_answer = lines[:next(i for i, x in enumerate(lines) if "tok19" in x)]
        assert before_the_answer.count(": keep-alive") >= 2
        assert lines[-1] == "data: [DONE]"


async def test_v1_completion_cut_by_a_shutdown_is_503_worth_a_retry(settings: Settings) -> None:
    # Found in review: it was 409 "cancelled", which clients rightly do not retry; a restart's
    # cut is not the user's cancel.
    from service.lifespan import begin_shutdown

    async with e2e(settings, "llamacpp", shutdown_drain=0.3) as env:
        r = await _v1_answer_while(env, lambda: begin_shutdown(env.server.services))
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "shutting_down"


async def test_v1_reports_the_model_that_answered(settings: Settings) -> None:
    # Found in a contract review: with no model named (and no SERVICE_DEFAULT_MODEL) a
    # completion said "model": "default" although the backend's first model answered.
    async with e2e(settings, "llamacpp", default_model=None) as env:
        env.sim.script(Reply(tokens=2), Reply(tokens=2))
        body = {"messages": [{"role": "user", "content": "hi"}]}
        with trio.fail_after(GUARD):
            whole = (await env.client.post("/v1/chat/completions", json=body)).json()
            async with env.client.stream("POST", "/v1/chat/completions",
                                         json={**body, "stream": True}) as r:
                chunks = [json.loads(x[6:]) async for x in r.aiter_lines()
                          if x.startswith("data: {")]
        assert whole["model"] == "sim-model"
        assert {c["model"] for c in chunks} == {"sim-model"}


async def test_the_openai_sdk_does_not_run_a_cancelled_completion_again(
    settings: Settings
) -> None:
    # Found in review: the SDK retries 409 too ("lock timeout"): after a cancel it sent the
    # request again and returned a fresh answer, the caller never told. The 409 now carries
    # x-should-retry: false, which the SDK obeys.
    import openai

    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(tokens=500, interval=0.05), Reply(tokens=3))
        base = env.server.url + "/v1"

        def sdk() -> Any:
            client = openai.OpenAI(base_url=base, api_key="k")  # default max_retries: 2
            try:
                return client.chat.completions.create(
                    model="sim-model", messages=[{"role": "user", "content": "go"}])
            except openai.APIStatusError as exc:
                return exc
            finally:
                client.close()

        got: list[Any] = []

        async def run_sdk() -> None:
            got.append(await trio.to_thread.run_sync(sdk))

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_sdk)
                await env.sim.wait_streams(1)
                convs: list[dict[str, Any]] = []
                while not convs:  # noqa: ASYNC110 (the store has no event to wait on)
                    convs = (await env.client.get("/api/conversations")).json()["data"]
                    await trio.sleep(0.01)
                conv = (await env.client.get(f"/api/conversations/{convs[0]['id']}")).json()
                run_id = conv["messages"][-1]["run_id"]
                assert (await env.client.post(f"/api/runs/{run_id}/cancel")).status_code == 202
        (result,) = got
        assert isinstance(result, openai.APIStatusError)
        assert result.status_code == 409
        assert len(env.sim.streams) == 1  # not run again
