"""Bursts are visible, not silent (issue 13, item 5), end to end on real sockets: the server
on port 0 with one backend slot (``SERVICE_BACKEND_CONCURRENCY=1``), a slow simulated upstream
holding it.

* a native stream waiting for the slot gets a ``queued`` event with its place;
* a ``/v1`` stream starts with keep-alive comments while it waits, not with silence;
* the wait is bounded (``SERVICE_BACKEND_QUEUE_TIMEOUT``): then 503 ``backend_busy`` with
  Retry-After (an error chunk on a ``/v1`` stream that had started).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from service.settings import Settings
from service.sim import Reply

from ..e2e import GUARD, Env, EventStream, after_tokens, e2e, tokens

V1 = "/v1/chat/completions"
SLOW = Reply(tokens=100, interval=0.05)  # holds the one slot for about 5 s


@asynccontextmanager
async def slot_taken(env: Env) -> AsyncIterator[EventStream]:
    """A native stream holding the backend's one slot (answering) for the block."""
    conv = await env.conversation(title="holder")
    async with env.post_stream(conv, "hold the slot") as r:
        stream = EventStream(r)
        with trio.fail_after(GUARD):
            await stream.read(after_tokens(1))
        yield stream


async def test_a_native_stream_waiting_for_a_slot_is_told_its_place(settings: Settings) -> None:
    async with e2e(settings, "llamacpp", backend_concurrency=1) as env:
        env.sim.script(Reply(tokens=20, interval=0.05), Reply(text="second answer"),
                       Reply(text="third answer"))
        conv2, conv3 = await env.conversation(), await env.conversation()
        async with slot_taken(env) as holder:
            with trio.fail_after(GUARD):
                async with env.post_stream(conv2, "second") as r2, \
                        env.post_stream(conv3, "third") as r3:
                    s2, s3 = EventStream(r2), EventStream(r3)
                    seen2 = await s2.read(lambda es: es[-1].type == "queued")
                    seen3 = await s3.read(lambda es: es[-1].type == "queued")
                    # Told while the first still holds the slot: nothing else went upstream.
                    assert len(env.sim.streams) == 1
                    places = {seen2[-1].data["position"], seen3[-1].data["position"]}
                    assert places == {1, 2}
                    rest1 = await holder.read()
                    rest2, rest3 = await s2.read(), await s3.read()
        assert rest1[-1].data["status"] == "succeeded"
        for seen, rest, text in ((seen2, rest2, "second answer"), (seen3, rest3, "third answer")):
            events = seen + rest
            assert [e.type for e in events][:2] == ["run.started", "queued"]
            assert events[-1].data["status"] == "succeeded"
            assert "".join(tokens(events)) == text
            # The one ahead moved on: the one that was second is told it is next.
            later = [e.data["position"] for e in rest if e.type == "queued"]
            assert later in ([], [1])
        assert len(env.sim.streams) == 3


async def test_a_v1_stream_waiting_for_a_slot_starts_with_keepalive_comments(
    settings: Settings,
) -> None:
    async with e2e(settings, "llamacpp", backend_concurrency=1) as env:
        env.sim.script(Reply(tokens=20, interval=0.05), Reply(text="the answer"))
        body = {"model": "sim-model", "stream": True,
                "messages": [{"role": "user", "content": "hi"}]}
        async with slot_taken(env) as holder:
            with trio.fail_after(GUARD):
                async with env.client.stream("POST", V1, json=body) as r:
                    assert r.status_code == 200
                    lines = r.aiter_lines()
                    first = await anext(lines)
                    # The response began while the run waits for the slot.
                    assert first == ": queued, position 1"
                    assert len(env.sim.streams) == 1
                    rest = [line async for line in lines]
                await holder.read()
        data = [json.loads(x[6:]) for x in rest if x.startswith("data: {")]
        assert data[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in data
                       if c.get("choices"))
        assert text == "the answer"
        assert rest[-2:] == ["data: [DONE]", ""]


async def test_a_wait_past_the_queue_timeout_is_503_with_retry_after(settings: Settings) -> None:
    async with e2e(settings, "llamacpp", backend_concurrency=1,
                   backend_queue_timeout=0.5) as env:
        env.sim.script(SLOW)
        conv = await env.conversation()
        v1: dict[str, Any] = {"model": "sim-model",
                              "messages": [{"role": "user", "content": "hi"}]}
        async with slot_taken(env):
            with trio.fail_after(GUARD):
                r = await env.client.post(f"/api/conversations/{conv}/messages",
                                          json={"content": "hi"})
                assert r.status_code == 503, r.text
                assert r.json()["error"]["type"] == "backend_busy"
                assert r.headers["retry-after"] == "5"

                r = await env.client.post(V1, json=v1)
                assert r.status_code == 503, r.text
                error = r.json()["error"]
                assert (error["type"], error["code"]) == ("backend_busy", "backend_busy")
                assert r.headers["retry-after"] == "5"

                # A /v1 stream had begun (its keep-alive comments): it ends with an error
                # chunk, without [DONE].
                async with env.client.stream("POST", V1, json={**v1, "stream": True}) as s:
                    assert s.status_code == 200
                    lines = [line async for line in s.aiter_lines()]
            assert lines[0] == ": queued, position 1"
            chunks = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
            assert chunks[-1]["error"]["type"] == "backend_busy"
            assert "data: [DONE]" not in lines

            # Waiting for the queue never reached the upstream.
            assert len(env.sim.streams) == 1
            calls = (await env.client.get("/api/llm-calls")).json()["data"]
            busy = [c for c in calls if c["error"] and "BackendBusy" in c["error"]]
            assert len(busy) == 3
