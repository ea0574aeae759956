"""``{"type": "join", "run_id", "after"}`` on the WebSocket: a client whose socket was lost
resumes its runs on a new one from the last event it was shown, as ``GET
/api/runs/{id}/events`` re-joins over SSE: no gap, no duplicate, never cancelled by the joining
socket. The real server on port 0, both stores."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from service.settings import Settings

from ..fakes import Reply, ScriptedBackend
from ..servers import running_server
from ..streams import new_conversation, stored_messages, ws_reply, ws_send, ws_until, ws_url

pytestmark = pytest.mark.both_stores

GUARD = 20  # seconds any wait may take before the test fails


async def _join(ws: WebSocketConnection, run_id: str, after: Any = None) -> None:
    msg: dict[str, Any] = {"type": "join", "run_id": run_id}
    if after is not None:
        msg["after"] = after
    await ws.send_message(json.dumps(msg))


async def _next_is_a_reply_to_the_marker(ws: WebSocketConnection) -> None:
    """Nothing came for what was sent before: the next message is the reply to a marker (a
    join of a run that does not exist), which the socket answers in order."""
    await _join(ws, "run_marker")
    _, reply = await ws_reply(ws)
    assert reply["type"] == "error", reply
    assert reply["request"]["run_id"] == "run_marker", reply


async def test_a_run_resumed_on_a_new_socket_after_the_last_event_shown(
        settings: Settings) -> None:
    words = "one two three four five six seven eight"
    backend = ScriptedBackend([Reply(words, gap=0.05)])
    async with running_server(settings, backend) as srv, srv.client() as client:
        conv = await new_conversation(client)
        async with open_websocket_url(ws_url(srv)) as first:
            await ws_send(first, conversation_id=conv, content="q", on_disconnect="continue")
            shown = await ws_until(first, lambda m: m["type"] == "token" and m["id"] >= 3)
        run_id = shown[0]["run_id"]
        async with open_websocket_url(ws_url(srv)) as again:
            await _join(again, run_id, after=shown[-1]["id"])
            rest = await ws_until(again)
            events = shown + rest
            assert [e["id"] for e in events] == list(range(1, len(events) + 1))
            assert {e["run_id"] for e in events} == {run_id}
            assert rest[-1]["type"] == "run.finished"
            assert rest[-1]["data"]["status"] == "succeeded"
            text = "".join(e["data"]["text"] for e in events if e["type"] == "token")
            assert text == words
            assert await stored_messages(client, conv) == [("user", "q"), ("assistant", words)]

            # Once it has ended: from the start (no ``after``), the same events again; after
            # its run.finished, nothing.
            await _join(again, run_id)
            assert await ws_until(again) == events
            await _join(again, run_id, after=events[-1]["id"])
            await _next_is_a_reply_to_the_marker(again)
        assert len(backend.streams) == 1


async def test_a_joining_socket_never_cancels_the_run_and_sees_how_it_ended(
        settings: Settings) -> None:
    # The run belongs to the socket that started it (on_disconnect "cancel"): the joining
    # socket leaving changes nothing; the owner leaving cancels it, and a joiner sees that end.
    backend = ScriptedBackend([Reply("tick " * 200, gap=0.05)])
    async with running_server(settings, backend) as srv, srv.client() as client:
        conv = await new_conversation(client)
        async with open_websocket_url(ws_url(srv)) as owner:
            await ws_send(owner, conversation_id=conv, content="q")
            started = (await ws_reply(owner))[1]
            run_id = started["run_id"]
            async with open_websocket_url(ws_url(srv)) as joiner:
                await _join(joiner, run_id)
                assert (await ws_reply(joiner))[1] == started
                await ws_until(joiner, lambda m: m["type"] == "token")
            # The joiner left: the run goes on for its owner.
            await ws_until(owner, lambda m: m["type"] == "token")
            stream = await backend.wait_stream(0)
            assert not stream.closed
            async with open_websocket_url(ws_url(srv)) as joiner:
                await _join(joiner, run_id)
                await ws_until(joiner, lambda m: m["type"] == "token")
                await owner.aclose()  # the owner leaves: its run is cancelled
                end = (await ws_until(joiner))[-1]
        assert end["type"] == "run.finished"
        assert end["data"]["status"] == "cancelled"
        with trio.fail_after(GUARD):
            await stream.closed_event.wait()
        assert stream.cancelled


async def test_a_join_the_socket_cannot_follow_is_an_error_reply(settings: Settings) -> None:
    keyed = settings.model_copy(update={"api_keys": ("key-a", "key-b")})
    backend = ScriptedBackend([Reply("the answer")])
    async with running_server(keyed, backend) as srv:
        a = srv.client(headers={"Authorization": "Bearer key-a"})
        async with a:
            conv = await new_conversation(a)
            r = await a.post(f"/api/conversations/{conv}/messages", json={"content": "q"})
            run_id = r.json()["run"]["id"]
        url = ws_url(srv)
        async with open_websocket_url(url, extra_headers=[
                ("Authorization", "Bearer key-a")]) as ws:
            for after, says in ((99, "after: event 99 is past this run's last event"),
                                (-1, "after: "), ("2", "after: "), (2**63, "after: ")):
                await _join(ws, run_id, after)
                _, reply = await ws_reply(ws)
                assert reply["type"] == "error", reply
                assert reply["error"]["type"] == "invalid_request"
                assert reply["error"]["message"].startswith(says), reply
                assert reply["request"]["run_id"] == run_id
            # The socket goes on serving.
            await _join(ws, run_id)
            assert (await ws_until(ws))[-1]["data"]["status"] == "succeeded"
        # Another key's run: not found, as over HTTP.
        async with open_websocket_url(url, extra_headers=[
                ("Authorization", "Bearer key-b")]) as ws:
            await _join(ws, run_id)
            _, reply = await ws_reply(ws)
            assert reply["error"]["type"] == "not_found", reply
            assert "the answer" not in json.dumps(reply)


@pytest.mark.parametrize("stops", [True, False], ids=["stops_when_told", "sends_on"])
async def test_joins_sent_on_through_a_shutdown_do_not_hold_the_socket_open(
        settings: Settings, stops: bool) -> None:
    # Once the runs are drained, the socket is closed with 1001 when its joins in flight have
    # ended. A client re-joining its runs from their start again and again (a reconnect loop
    # gone wrong) kept a join in flight at every moment: the 1001 never came, and hypercorn's
    # graceful timeout cut the connection (a 1006, which a client takes for a network failure).
    # Now a join (or message) once the runs are drained is refused as shutting_down, and the
    # socket is closed once the joins already in flight have ended.
    # A client that sends on even then (``sends_on``) got a 1006 all the same: the handler
    # returned right after its close frame, hypercorn closed the connection under the client's
    # data, and the TCP reset took the close frame with it. Now the client's close is waited
    # for (RFC 6455's closing handshake), up to a second.
    backend = ScriptedBackend(lambda req: Reply("tick " * 300))
    refused: list[dict[str, Any]] = []
    closed: list[int | None] = []
    with trio.fail_after(GUARD):
        # The nursery outlives the server: it shuts down while the client joins on.
        async with trio.open_nursery() as nursery, running_server(  # noqa: ASYNC112
                settings, backend, graceful_timeout=8) as srv, srv.client() as client:
            runs = []
            for _ in range(20):
                conv = await new_conversation(client)
                r = await client.post(f"/api/conversations/{conv}/messages",
                                      json={"content": "q"})
                runs.append(r.json()["run"]["id"])

            async def rejoiner(  # noqa: ASYNC114
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                async with open_websocket_url(ws_url(srv)) as ws:
                    for run_id in runs:
                        await _join(ws, run_id)
                    task_status.started()
                    try:
                        while True:
                            m = json.loads(await ws.get_message())
                            if m["type"] == "error":
                                refused.append(m)
                            if m["type"] in ("run.finished", "error") and not (
                                    stops and refused):
                                await _join(ws, m["run_id"] if m["type"] == "run.finished"
                                            else m["request"]["run_id"])  # and again
                    except ConnectionClosed as exc:
                        closed.append(exc.reason.code if exc.reason else None)

            await nursery.start(rejoiner)
    assert closed == [1001], (closed, refused[-1:])
    assert refused, "no join was refused"
    assert {m["error"]["type"] for m in refused} == {"shutting_down"}, refused[-1]
    assert {m["request"]["run_id"] for m in refused} <= set(runs)
