"""``Idempotency-Key`` on ``POST /api/conversations/{id}/messages``: a request repeated (a retry
after a connection lost, two sends of one click) gets the run the first began, not a second
run, a second copy of the question in the conversation and a second generation upstream. The
real server on port 0, on both stores."""

from __future__ import annotations

import httpx
import pytest
import trio

from service.settings import Settings

from ..fakes import Reply, ScriptedBackend
from ..servers import running_server
from ..streams import new_conversation, parse_sse, stored_messages

pytestmark = pytest.mark.both_stores

GUARD = 20  # seconds any wait may take before the test fails


async def test_a_repeated_request_gets_the_first_ones_result(settings: Settings) -> None:
    backend = ScriptedBackend([Reply("the one answer"), Reply("a second generation")])
    async with running_server(settings, backend) as srv, srv.client() as client:
        conv = await new_conversation(client)
        url, key = f"/api/conversations/{conv}/messages", {"Idempotency-Key": "k-1"}
        first = await client.post(url, json={"content": "q"}, headers=key)
        assert first.status_code == 200, first.text
        assert "Idempotent-Replayed" not in first.headers
        again = await client.post(url, json={"content": "q"}, headers=key)
        assert again.status_code == 200, again.text
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.json()["run"]["id"] == first.json()["run"]["id"]
        assert again.json()["message"] == first.json()["message"]
        assert again.json()["run"]["status"] == "succeeded"
        assert len(backend.streams) == 1  # one generation upstream
        assert await stored_messages(client, conv) == [
            ("user", "q"), ("assistant", "the one answer")]
        # The same key with another message: refused, nothing written.
        for other in ({"content": "another"}, {"content": "q", "agent": "react"},
                      {"content": "q", "model": "another-model"}):
            r = await client.post(url, json=other, headers=key)
            assert r.status_code == 422, r.text
            assert r.json()["error"]["type"] == "idempotency_key_reused"
            assert r.json()["error"]["field"] == "Idempotency-Key"
        # Without a key, or with another, a new run as always.
        r = await client.post(url, json={"content": "q"}, headers={"Idempotency-Key": "k-2"})
        assert r.json()["message"]["content"] == "a second generation"
        assert len(await stored_messages(client, conv)) == 4
        # A key is the conversation's: on another one it begins a run there.
        other = await new_conversation(client)
        r = await client.post(f"/api/conversations/{other}/messages", json={"content": "q"},
                              headers=key)
        assert r.status_code == 200
        assert r.json()["run"]["id"] != first.json()["run"]["id"]


async def test_a_stream_cut_and_asked_again_gets_every_event_of_the_one_run(
        settings: Settings) -> None:
    # The client's connection is lost mid-answer (on_disconnect "continue": the run goes on);
    # it sends the same request again: the same run's events, from the first, to its end.
    backend = ScriptedBackend([Reply("one two three four five six", gap=0.05)])
    body = {"content": "q", "stream": True, "on_disconnect": "continue"}
    headers = {"Idempotency-Key": "retry-me"}
    async with running_server(settings, backend) as srv, srv.client() as client:
        conv = await new_conversation(client)
        url = f"/api/conversations/{conv}/messages"
        with trio.fail_after(GUARD):
            async with client.stream("POST", url, json=body, headers=headers) as resp:
                run_id = resp.headers["X-Run-Id"]
                text = ""
                async for chunk in resp.aiter_text():
                    text += chunk
                    if '"text"' in text:
                        break  # the connection is lost after a token
            again = await client.post(url, json=body, headers=headers)
        assert again.status_code == 200
        assert again.headers["X-Run-Id"] == run_id
        assert again.headers["Idempotent-Replayed"] == "true"
        frames = parse_sse(again.text)
        assert [int(f["id"]) for f in frames] == list(range(1, len(frames) + 1))
        assert frames[0]["event"] == "run.started"
        assert frames[-1]["event"] == "run.finished"
        assert frames[-1]["data"]["status"] == "succeeded"
        tokens = "".join(f["data"]["text"] for f in frames if f["event"] == "token")
        assert tokens == "one two three four five six"
        assert len(backend.streams) == 1
        assert await stored_messages(client, conv) == [
            ("user", "q"), ("assistant", "one two three four five six")]


async def test_two_requests_at_once_with_one_key_share_one_run(settings: Settings) -> None:
    backend = ScriptedBackend([Reply("only once", gap=0.02), Reply("twice!")])
    async with running_server(settings, backend) as srv, srv.client() as client:
        conv = await new_conversation(client)
        url = f"/api/conversations/{conv}/messages"
        answers: list[httpx.Response] = []

        async def send() -> None:
            answers.append(await client.post(url, json={"content": "q"},
                                             headers={"Idempotency-Key": "same"}))

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                nursery.start_soon(send)
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
        assert len({a.json()["run"]["id"] for a in answers}) == 1
        assert {a.json()["message"]["content"] for a in answers} == {"only once"}
        assert len(backend.streams) == 1
        assert await stored_messages(client, conv) == [("user", "q"), ("assistant", "only once")]


async def test_a_request_repeated_after_its_run_ended_without_an_answer_asks_anew(
        settings: Settings) -> None:
    # A run holds its key while it goes on and once it has answered. One that ended without
    # its answer (failed here; also cancelled by a lost connection, a shutdown, or closed when
    # its instance died) lets it go: the retry its end invited asks the question again, where
    # a replay would answer the same failure for ever.
    backend = ScriptedBackend([Reply("par", fail_after=1, error=RuntimeError("boom")),
                               Reply("the answer")])
    async with running_server(settings, backend) as srv, srv.client() as client:
        conv = await new_conversation(client)
        url, key = f"/api/conversations/{conv}/messages", {"Idempotency-Key": "k"}
        first = await client.post(url, json={"content": "q"}, headers=key)
        assert first.status_code >= 500, first.text
        again = await client.post(url, json={"content": "q"}, headers=key)
        assert again.status_code == 200, again.text
        assert "Idempotent-Replayed" not in again.headers
        assert again.json()["message"]["content"] == "the answer"
        assert again.json()["run"]["id"] != first.json()["error"]["run_id"]
        # ... and now the key is that run's: once more, its answer.
        third = await client.post(url, json={"content": "q"}, headers=key)
        assert third.headers["Idempotent-Replayed"] == "true"
        assert third.json()["message"] == again.json()["message"]
        assert len(backend.streams) == 2
        assert [role for role, _ in await stored_messages(client, conv)] == [
            "user", "assistant", "user", "assistant"]


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "tab\there"])
async def test_a_key_that_is_not_one_is_a_422(settings: Settings, key: str) -> None:
    async with running_server(settings) as srv, srv.client() as client:
        conv = await new_conversation(client)
        r = await client.post(f"/api/conversations/{conv}/messages", json={"content": "q"},
                              headers={"Idempotency-Key": key.encode()})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["field"] == "Idempotency-Key"
        assert await stored_messages(client, conv) == []


async def test_another_owners_conversation_is_404_whatever_the_key(settings: Settings) -> None:
    keyed = settings.model_copy(update={"api_keys": ("key-a", "key-b")})
    async with running_server(keyed) as srv:
        a = srv.client(headers={"Authorization": "Bearer key-a", "Idempotency-Key": "k"})
        b = srv.client(headers={"Authorization": "Bearer key-b", "Idempotency-Key": "k"})
        async with a, b:
            conv = await new_conversation(a)
            assert (await a.post(f"/api/conversations/{conv}/messages",
                                 json={"content": "secret"})).status_code == 200
            r = await b.post(f"/api/conversations/{conv}/messages", json={"content": "secret"})
            assert r.status_code == 404
            assert "secret" not in r.text
