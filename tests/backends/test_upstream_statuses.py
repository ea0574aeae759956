"""What a client is told when the upstream fails, end to end (issue 13, item 3): the real server
on port 0, its real adapters, the simulator on loopback.

* an upstream that answered and then broke is a bad answer (502 ``upstream_broken``), not "no
  backend reachable" (503);
* an upstream 429 or 503 is passed on with its ``Retry-After``;
* a prompt over the model's context is the request's fault: 400 ``context_length_exceeded``,
  never failed over or counted against the backend;
* ``/v1`` errors carry OpenAI's ``code`` and ``param`` (and keep ``field``).
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from service.settings import Settings
from service.sim import Reply

from ..e2e import GUARD, KINDS, e2e, read_events

V1 = "/v1/chat/completions"


def _v1(content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "sim-model", "messages": [{"role": "user", "content": content}], **extra}


@pytest.mark.parametrize("kind", KINDS)
async def test_an_upstream_that_breaks_mid_answer_is_a_502(settings: Settings, kind: str) -> None:
    async with e2e(settings, kind) as env:
        conv = await env.conversation()
        with trio.fail_after(GUARD):
            env.sim.script(Reply(tokens=10, die_after=2))
            r = await env.client.post(f"/api/conversations/{conv}/messages",
                                      json={"content": "hi"})
            assert r.status_code == 502, r.text
            assert r.json()["error"]["type"] == "upstream_broken"

            env.sim.script(Reply(tokens=10, die_after=0))  # after the headers, before a token
            r = await env.client.post(V1, json=_v1())
            assert r.status_code == 502, r.text
            assert r.json()["error"]["type"] == "upstream_broken"

            env.sim.script(Reply(tokens=10, die_after=2))
            async with env.post_stream(conv) as s:
                events = await read_events(s)
        assert [e.type for e in events][-2:] == ["error", "run.finished"]
        assert events[-2].data["type"] == "upstream_broken"

        # Nobody there at all is still 503.
        await env.stop_sim()
        with trio.fail_after(GUARD):
            r = await env.client.post(f"/api/conversations/{conv}/messages",
                                      json={"content": "hi"})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "backend_unavailable"


@pytest.mark.parametrize("kind", KINDS)
async def test_an_upstream_429_or_503_is_passed_on_with_its_retry_after(
    settings: Settings, kind: str
) -> None:
    async with e2e(settings, kind) as env:
        conv = await env.conversation()
        native = f"/api/conversations/{conv}/messages"
        cases: list[tuple[str, dict[str, Any], Reply, int]] = [
            (native, {"content": "hi"}, Reply(status=429, retry_after="7"), 429),
            (V1, _v1(), Reply(status=429, retry_after="7"), 429),
            (V1, _v1(stream=True), Reply(status=429, retry_after="7"), 429),
            (native, {"content": "hi"}, Reply(status=503, retry_after="12"), 503),
            (V1, _v1(stream=True), Reply(status=503, retry_after="12"), 503),
        ]
        for path, body, reply, status in cases:
            env.sim.script(reply)
            with trio.fail_after(GUARD):
                r = await env.client.post(path, json=body)
            assert r.status_code == status, (path, body, r.text)
            assert r.headers["content-type"].startswith("application/json")
            assert r.headers["retry-after"] == reply.retry_after, (path, body)
            error = r.json()["error"]
            assert error["type"] == ("backend_rate_limited" if status == 429
                                     else "backend_unavailable")

        # A native stream cannot change its status once started: its error event says when.
        env.sim.script(Reply(status=429, retry_after="7"))
        with trio.fail_after(GUARD):
            async with env.post_stream(conv) as s:
                events = await read_events(s)
        error = events[-2].data
        assert (error["type"], error["retry_after"]) == ("backend_rate_limited", 7)

        # Without a Retry-After there is none to pass on.
        env.sim.script(Reply(status=429))
        with trio.fail_after(GUARD):
            r = await env.client.post(native, json={"content": "hi"})
        assert r.status_code == 429
        assert "retry-after" not in r.headers


async def test_auto_with_every_backend_rate_limited_is_503_with_the_soonest_retry_after(
    settings: Settings,
) -> None:
    async with e2e(settings, "auto") as env:
        env.sim.script(Reply(status=429, retry_after="30"), Reply(status=429, retry_after="4"))
        with trio.fail_after(GUARD):
            r = await env.client.post(V1, json=_v1())
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "all_backends_failed"
        assert r.headers["retry-after"] == "4"


@pytest.mark.parametrize("kind", [*KINDS, "auto"])
async def test_a_prompt_over_the_context_is_400_context_length_exceeded(
    settings: Settings, kind: str
) -> None:
    async with e2e(settings, kind) as env:
        env.sim.default = Reply(context=20)  # the simulator's tokens: words, +1 per message
        long = " ".join(["word"] * 40)
        conv = await env.conversation()
        with trio.fail_after(GUARD):
            r = await env.client.post(f"/api/conversations/{conv}/messages",
                                      json={"content": long})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["type"] == "context_length_exceeded"
            assert "context" in error["message"]

            for stream in (False, True):
                r = await env.client.post(V1, json=_v1(long, stream=stream))
                assert r.status_code == 400, r.text
                error = r.json()["error"]
                assert (error["type"], error["code"], error["param"]) == (
                    "context_length_exceeded", "context_length_exceeded", "messages")

            # It fits: answered as usual.
            r = await env.client.post(V1, json=_v1("short question"))
            assert r.status_code == 200, r.text

        # Never held against a backend. Each member is asked once per completion (auto's two
        # servers here: a fleet's members may have different contexts), the one that fits
        # once.
        assert len(env.sim.streams) == (7 if kind == "auto" else 4)
        backends = (await env.client.get("/api/backends")).json()["data"]
        assert all(not b["failures"] and b["cooldown"] is None for b in backends), backends


async def test_v1_errors_carry_openai_code_and_param(settings: Settings) -> None:
    async with e2e(settings, "llamacpp") as env:
        c = env.client
        with trio.fail_after(GUARD):
            r = await c.post(V1, json={"model": "sim-model", "messages": []})
            assert r.status_code == 422, r.text
            error = r.json()["error"]
            assert (error["code"], error["param"], error["field"]) == (
                "invalid_request", "messages", "messages")

            r = await c.post(V1, json=_v1(temperature=9))
            assert r.status_code == 422, r.text
            assert r.json()["error"]["param"] == "temperature"

            r = await c.post(V1, json={**_v1(), "model": "ghost"})
            assert r.status_code == 404, r.text
            error = r.json()["error"]
            assert (error["type"], error["code"], error["param"]) == (
                "model_not_found", "model_not_found", None)

            r = await c.get("/v1/models/ghost")
            assert r.status_code == 404
            assert r.json()["error"]["code"] == "model_not_found"

            r = await c.get("/v1/nothing-here")
            assert r.status_code == 404
            assert r.json()["error"]["code"] == "not_found"

            # The native API's errors are as they were.
            r = await c.get("/api/conversations/conv_nope")
            assert r.status_code == 404
            assert "code" not in r.json()["error"]
