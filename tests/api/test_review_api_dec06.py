"""The native REST API reviewed (2026-12-06): each test fails on the code it was written
against, because of a defect a demanding client would hit.

Real server on 127.0.0.1 port 0, the simulator upstream (``tests/e2e.py``); real time, every
wait guarded.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from service.settings import Settings
from service.sim import Reply
from service.store.faults import InjectedFault

from ..e2e import GUARD, EventStream, after_tokens, e2e, read_events


async def _follow_a_bit(env: Any, conv: str, n: int = 2, **body: Any) -> str:
    """Start a streamed ``continue`` run, read its first ``n`` tokens, leave; its id."""
    async with env.post_stream(conv, on_disconnect="continue", **body) as r:
        events = await EventStream(r).read(after_tokens(n))
    return str(events[0].data["run_id"])


# -- 1. SERVICE_MAX_BODY_BYTES on endpoints that do not read their body -------------------------

async def test_a_body_over_the_cap_is_413_also_where_the_endpoint_reads_no_body(
    settings: Settings,
) -> None:
    """API.md: ``SERVICE_MAX_BODY_BYTES`` is the "largest request body; larger gets 413". The
    cap is enforced only when a handler reads the body (Quart's MAX_CONTENT_LENGTH), so a
    request with a body over it to ``POST /api/runs/{id}/cancel`` or ``DELETE
    /api/conversations/{id}`` is answered 202/204 and acted on (the run cancelled, the
    conversation deleted), while the same body to ``POST /api/conversations`` is a 413. A
    declared ``Content-Length`` over the cap is known before anything runs.

    Expected: 413 ``body_too_large`` whatever the endpoint, and the request has no effect.
    """
    capped = settings.model_copy(update={"max_body_bytes": 2048})
    async with e2e(capped, "llamacpp") as env:
        env.sim.script(Reply(tokens=8, hang_after=3))  # a run that goes on until cancelled
        conv = await env.conversation()
        big = b'{"reason": "' + b"x" * 100_000 + b'"}'
        json_type = {"content-type": "application/json"}
        with trio.fail_after(GUARD):
            run_id = await _follow_a_bit(env, conv)
            cancel = await env.client.post(f"/api/runs/{run_id}/cancel", content=big,
                                           headers=json_type)
            run = (await env.client.get(f"/api/runs/{run_id}")).json()
            delete = await env.client.request("DELETE", f"/api/conversations/{conv}",
                                              content=big, headers=json_type)
            still = await env.client.get(f"/api/conversations/{conv}")
            await env.client.post(f"/api/runs/{run_id}/cancel")  # clean up
        assert (cancel.status_code, delete.status_code) == (413, 413), (
            f"cancel {cancel.status_code} {cancel.text[:80]!r}, "
            f"delete {delete.status_code} {delete.text[:80]!r}")
        assert cancel.json()["error"]["type"] == "body_too_large"
        assert run["status"] == "running"
        assert still.status_code == 200


# -- 2. X-Keepalive-Interval for a listed origin ------------------------------------------------

async def test_a_listed_origin_can_read_the_streams_keepalive_interval(
    settings: Settings,
) -> None:
    """docs/api.md: an idle stream gets a keep-alive comment every ``SERVICE_SSE_KEEPALIVE``
    seconds, "which its ``X-Keepalive-Interval`` header states: a few of them missed is a
    service that stopped answering". A streamed ``POST .../messages`` can only be read in a
    browser with ``fetch`` (an EventSource cannot POST), and a page on an origin listed in
    ``SERVICE_CORS_ORIGINS`` sees only the CORS-safelisted headers and the exposed ones:
    ``Access-Control-Expose-Headers`` names ``X-Request-ID, Retry-After, WWW-Authenticate,
    X-Should-Retry`` but not ``X-Keepalive-Interval``, so ``resp.headers.get(...)`` is null
    there (the chat page's code then assumes 15 s, and with a longer setting takes a quiet run
    for a dead service).

    Expected: the header is exposed to a listed origin.
    """
    listed = settings.model_copy(update={"cors_origins": ("http://app.example",),
                                         "sse_keepalive": 40.0})
    async with e2e(listed, "llamacpp") as env:
        env.sim.script(Reply(tokens=3))
        conv = await env.conversation()
        with trio.fail_after(GUARD):
            async with env.client.stream(
                "POST", f"/api/conversations/{conv}/messages",
                json={"content": "hi", "stream": True},
                headers={"Origin": "http://app.example"},
            ) as r:
                await read_events(r)
        assert r.headers["X-Keepalive-Interval"] == "40"
        assert r.headers["Access-Control-Allow-Origin"] == "http://app.example"
        exposed = {h.strip().lower()
                   for h in r.headers.get("Access-Control-Expose-Headers", "").split(",")}
        assert exposed & {"x-keepalive-interval", "*"}, (
            r.headers.get("Access-Control-Expose-Headers"))


# -- 3. GET /api/conversations/{id}: updated_at and messages from two different moments ---------

async def test_a_conversations_updated_at_never_covers_a_change_its_messages_do_not_show(
    settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docs/api.md: a conversation's ``updated_at`` "moves with each new message and each
    run's end ... never backwards: a client syncing what changed since a time finds an answer
    that landed after its question". ``GET /api/conversations/{id}`` reads the messages, then
    (in another read) the conversation with its ``updated_at``: a run that ends between the two
    reads is answered with its reply still ``pending`` (empty) next to an ``updated_at`` that
    already counts its end. A client that syncs by ``updated_at`` (refetch when it moved)
    stores the empty reply as the state at that time and never fetches the answer: nothing
    changes after it, so ``updated_at`` never moves past what it holds.

    The window is made deterministic by letting the run's end land right after the
    messages' read (a real run ends there whenever its final write lands in between).

    Expected: one answer is one moment: an ``updated_at`` at or after the run's end comes with
    the reply as stored at its end.
    """
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(tokens=8, hang_after=2))  # goes on until it is stopped
        conv = await env.conversation()
        store = env.server.services.require_store()
        supervisor = env.server.services.require_supervisor()
        with trio.fail_after(GUARD):
            run_id = await _follow_a_bit(env, conv)
            read_messages = store.get_messages
            armed = [True]

            async def messages_then_the_run_ends(conversation_id: str) -> Any:
                found = await read_messages(conversation_id)
                if armed and conversation_id == conv:
                    armed.clear()
                    handle = supervisor.get(run_id)
                    assert handle is not None
                    handle.cancel("stopped by its user")  # as POST .../cancel would
                    await handle.finished.wait()  # its end is stored
                return found

            monkeypatch.setattr(store, "get_messages", messages_then_the_run_ends)
            got = (await env.client.get(f"/api/conversations/{conv}")).json()
            monkeypatch.setattr(store, "get_messages", read_messages)
            if armed:  # not read that way: the run ends now, after the answer
                handle = supervisor.get(run_id)
                assert handle is not None
                handle.cancel("stopped by its user")
                await handle.finished.wait()
            run = (await env.client.get(f"/api/runs/{run_id}")).json()
            now = (await env.client.get(f"/api/conversations/{conv}")).json()
        assert run["status"] == "cancelled"
        (reply,) = [m for m in got["messages"] if m["role"] == "assistant"]
        (stored,) = [m for m in now["messages"] if m["role"] == "assistant"]
        assert stored["status"] == "cancelled"
        assert stored["content"]
        if got["updated_at"] >= run["finished_at"]:  # an answer from after the run's end
            assert reply == stored, (
                f"updated_at {got['updated_at']} (the run ended {run['finished_at']}; now "
                f"{now['updated_at']}) came with the reply {reply['status']} "
                f"{reply['content']!r}; the store has {stored['status']} {stored['content']!r}")


# -- 4. a reply's end stored late moves no updated_at ------------------------------------------

async def test_a_reply_stored_after_a_newer_message_still_moves_updated_at(
    settings: Settings,
) -> None:
    """docs/api.md: a conversation's ``updated_at`` "moves with each new message and each
    run's end ... never backwards: a client syncing what changed since a time finds an answer
    that landed after its question". A run's end is stamped with the time it ended in memory
    (``finished_at``), also when the store took it only later (its final write refused, then
    tried again, backing off up to 2 s). Meanwhile another message lands and moves
    ``updated_at`` past that stamp; the late end then lands under it: the reply changes
    (pending -> cancelled, with its text) and ``updated_at`` does not move. A client that
    synced in between (reply pending, ``updated_at`` T) and refetches when ``updated_at``
    moves past T never sees the answer.

    Expected: after the late end lands, ``updated_at`` is later than it was before it landed.
    """
    async with e2e(settings, "llamacpp") as env:
        conv = await env.conversation()
        store = env.server.services.require_store()
        supervisor = env.server.services.require_supervisor()
        with trio.fail_after(GUARD + 10):
            env.sim.script(Reply(tokens=8, hang_after=2))
            first = await _follow_a_bit(env, conv)
            handle = supervisor.get(first)
            assert handle is not None

            def refuse() -> None:
                raise InjectedFault("disk I/O error")

            store.faults.before_commit = refuse
            handle.cancel("stopped by its user")
            # Its final write is refused and tried again at 0.1, 0.3, 0.7, 1.5, 3.1 and
            # 5.1 s: the store is back at 3.3 s, and the next try comes at 5.1 s.
            await trio.sleep(3.3)
            store.faults.before_commit = None
            # A new message lands meanwhile: written by another instance sharing the store
            # (this one refuses new runs and conversations while its writes are held: 503, as
            # ``/readyz`` says).
            refused = await env.client.post(f"/api/conversations/{conv}/messages",
                                            json={"content": "q"})
            assert refused.status_code == 503, refused.text
            await store.append_message(conv, role="user", content="a question from elsewhere")
            before = (await env.client.get(f"/api/conversations/{conv}")).json()
            (early,) = [m for m in before["messages"]
                        if m["role"] == "assistant" and m["run_id"] == first]
            assert early["status"] == "pending", f"set-up: the end landed already: {early}"
            await handle.finished.wait()  # its end is stored now (the try at 5.1 s)
            after = (await env.client.get(f"/api/conversations/{conv}")).json()
        (late,) = [m for m in after["messages"]
                   if m["role"] == "assistant" and m["run_id"] == first]
        assert late["status"] == "cancelled"
        assert late["content"]
        assert after["updated_at"] > before["updated_at"], (
            f"the reply went pending -> {late['status']} {late['content']!r} and updated_at "
            f"stayed {after['updated_at']}")
