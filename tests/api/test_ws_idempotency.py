"""``idempotency_key`` on the WebSocket's ``message``: a message sent again (on a new socket,
after the first was lost mid-answer) gets the run the first began, its events from the first,
not a second run, a second copy of the question and a second generation upstream. As the HTTP
``Idempotency-Key`` (tests/api/test_idempotency.py). The real server on port 0, both stores."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

from service.settings import Settings

from ..fakes import Reply, ScriptedBackend
from ..servers import running_server
from ..streams import new_conversation, stored_messages, ws_reply, ws_send, ws_until, ws_url

pytestmark = pytest.mark.both_stores

GUARD = 20  # seconds any wait may take before the test fails


async def test_a_message_sent_again_after_its_socket_was_lost_gets_the_one_run(
        settings: Settings) -> None:
    # on_disconnect "continue": the run goes on when the first socket is lost mid-answer. The
    # message sent again with its key, on a new socket: the same run, every event from the
    # first to its end, once; one generation upstream; one question and one answer stored.
    words = "one two three four five six"
    backend = ScriptedBackend([Reply(words, gap=0.05), Reply("a second generation")])
    async with running_server(settings, backend) as srv, srv.client() as client:
        conv = await new_conversation(client)
        msg = {"conversation_id": conv, "content": "q", "on_disconnect": "continue",
               "idempotency_key": "retry-me"}
        async with open_websocket_url(ws_url(srv)) as first:
            await ws_send(first, **msg)
            seen: list[dict[str, Any]] = []
            with trio.fail_after(GUARD):
                while not any(m["type"] == "token" for m in seen):
                    seen.append((await ws_reply(first))[1])
        run_id = seen[0]["run_id"]
        async with open_websocket_url(ws_url(srv)) as again:
            await ws_send(again, **msg)
            events = await ws_until(again)
        assert {e["run_id"] for e in events} == {run_id}
        assert [e["id"] for e in events] == list(range(1, len(events) + 1))
        assert events[0]["type"] == "run.started"
        assert events[-1]["data"]["status"] == "succeeded"
        assert "".join(e["data"]["text"] for e in events if e["type"] == "token") == words
        assert len(backend.streams) == 1
        assert await stored_messages(client, conv) == [("user", "q"), ("assistant", words)]

        # Once it has ended: the same again, whole.
        async with open_websocket_url(ws_url(srv)) as later:
            await ws_send(later, **msg)
            assert await ws_until(later) == events
        assert len(backend.streams) == 1


async def test_a_message_whose_run_was_cancelled_with_its_socket_asks_anew(
        settings: Settings) -> None:
    # The default on_disconnect ("cancel"): the first socket's loss cancels its run, which
    # lets its key go; the message sent again asks the question anew (a replay would tell the
    # cancel for ever).
    backend = ScriptedBackend([Reply("tick " * 50, gap=0.05), Reply("the answer")])
    async with running_server(settings, backend) as srv, srv.client() as client:
        conv = await new_conversation(client)
        msg = {"conversation_id": conv, "content": "q", "idempotency_key": "k"}
        async with open_websocket_url(ws_url(srv)) as first:
            await ws_send(first, **msg)
            with trio.fail_after(GUARD):
                while (started := (await ws_reply(first))[1])["type"] != "run.started":
                    pass
                while (await ws_reply(first))[1]["type"] != "token":
                    pass
        stream = await backend.wait_stream(0)
        with trio.fail_after(GUARD):
            await stream.closed_event.wait()  # the upstream generation stopped with the socket
        assert stream.cancelled
        async with open_websocket_url(ws_url(srv)) as again:
            with trio.fail_after(GUARD):
                while True:  # the cancelled run's end is stored before its key is free
                    await ws_send(again, **msg)
                    events = await ws_until(again)
                    if events[0]["run_id"] != started["run_id"]:
                        break
        assert events[-1]["data"]["status"] == "succeeded"
        assert "".join(e["data"]["text"] for e in events if e["type"] == "token") == (
            "the answer")
        assert len(backend.streams) == 2
        stored = await stored_messages(client, conv)
        assert [role for role, _ in stored] == ["user", "assistant", "user", "assistant"]
        assert stored[-1] == ("assistant", "the answer")


async def test_a_message_sent_again_while_the_runs_in_flight_are_full_gets_its_run(
        settings: Settings) -> None:
    # SERVICE_MAX_RUNS 1, taken by the very run the message repeats: it is forwarded, not
    # refused as too_many_runs (another message is).
    limited = settings.model_copy(update={"max_runs": 1})
    backend = ScriptedBackend([Reply("one two three", hang_after=2)])
    async with running_server(limited, backend) as srv, srv.client() as client:
        conv = await new_conversation(client)
        msg = {"conversation_id": conv, "content": "q", "on_disconnect": "continue",
               "idempotency_key": "k"}
        async with open_websocket_url(ws_url(srv)) as first:
            await ws_send(first, **msg)
            _, started = await ws_reply(first)
        async with open_websocket_url(ws_url(srv)) as again:
            await ws_send(again, conversation_id=conv, content="another")
            _, refused = await ws_reply(again)
            assert refused["type"] == "error"
            assert refused["error"]["type"] == "too_many_runs"
            await ws_send(again, **msg)
            assert (await ws_reply(again))[1] == started
            with trio.fail_after(GUARD):
                while (await ws_reply(again))[1]["type"] != "token":
                    pass
            await again.send_message(json.dumps({"type": "cancel",
                                                 "run_id": started["run_id"]}))
            events = await ws_until(again)
        assert events[-1]["data"]["status"] == "cancelled"
        assert len(backend.streams) == 1


async def test_one_socket_sending_a_keyed_message_twice_gets_its_events_once(
        settings: Settings) -> None:
    backend = ScriptedBackend([Reply("only once", gap=0.02), Reply("twice!")])
    async with running_server(settings, backend) as srv, srv.client() as client:
        conv = await new_conversation(client)
        msg = {"conversation_id": conv, "content": "q", "idempotency_key": "same"}
        async with open_websocket_url(ws_url(srv)) as ws:
            await ws_send(ws, **msg)
            await ws_send(ws, **msg)
            events = await ws_until(ws)
            # Nothing more comes (no second copy of the run's events): a message of another
            # conversation is the next the socket hears of.
            other = await new_conversation(client)
            await ws_send(ws, conversation_id=other, content="after")
            after = await ws_until(ws)
        assert [e["id"] for e in events] == list(range(1, len(events) + 1))
        assert after[0]["type"] == "run.started"
        assert after[0]["data"]["conversation_id"] == other
        assert len(backend.streams) == 2
        assert await stored_messages(client, conv) == [("user", "q"), ("assistant", "only once")]


async def test_the_key_again_with_another_message_is_refused_and_nothing_is_written(
        settings: Settings) -> None:
    backend = ScriptedBackend([Reply("the answer")])
    async with running_server(settings, backend) as srv, srv.client() as client:
        conv = await new_conversation(client)
        async with open_websocket_url(ws_url(srv)) as ws:
            await ws_send(ws, conversation_id=conv, content="q", idempotency_key="k")
            run_id = (await ws_until(ws))[0]["run_id"]
            for other in ({"content": "another"}, {"content": "q", "agent": "react"},
                          {"content": "q", "model": "another-model"}):
                await ws_send(ws, conversation_id=conv, idempotency_key="k",
                              **{"content": "q", **other})
                _, reply = await ws_reply(ws)
                assert reply["type"] == "error", reply
                assert reply["error"]["type"] == "idempotency_key_reused"
                assert reply["error"]["run_id"] == run_id
                assert reply["request"] == {"type": "message", "conversation_id": conv,
                                            "idempotency_key": "k"}
        assert await stored_messages(client, conv) == [("user", "q"), ("assistant", "the answer")]
        # The HTTP endpoint shares the key: the same message there is the same run.
        r = await client.post(f"/api/conversations/{conv}/messages", json={"content": "q"},
                              headers={"Idempotency-Key": "k"})
        assert r.headers["Idempotent-Replayed"] == "true"
        assert r.json()["run"]["id"] == run_id


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "tab\there", 7])
async def test_a_key_that_is_not_one_is_refused(settings: Settings, key: object) -> None:
    async with running_server(settings) as srv, srv.client() as client:
        conv = await new_conversation(client)
        async with open_websocket_url(ws_url(srv)) as ws:
            await ws_send(ws, conversation_id=conv, content="q", idempotency_key=key)
            _, reply = await ws_reply(ws)
        assert reply["type"] == "error"
        assert reply["error"]["type"] == "invalid_request"
        assert reply["error"]["message"].startswith("idempotency_key: ")
        assert "printable ASCII" in reply["error"]["message"] or key == 7
        assert await stored_messages(client, conv) == []
