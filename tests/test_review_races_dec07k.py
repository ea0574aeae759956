"""Concurrent actions on one conversation: what each client is told versus what the store holds
afterwards (a review of 2026-12-07).

Races are made deterministic with a backend whose replies are held until the test lets them go
(``Gated``) and with store reads held by the test (monkeypatched), never with wall-clock sleeps.
"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from service.backends.base import ChatChunk, ChatRequest
from service.settings import Settings
from service.sim import Reply as SimReply
from service.sim import Simulator, open_simulator

from .e2e import e2e
from .fakes import Reply, ScriptedBackend
from .servers import RunningServer, running_server, start_service
from .streams import parse_sse, ws_url

GUARD = 20  # seconds any test may take before it fails


class _Held:
    """A reply's chunks, with a wait for ``gate`` before chunk number ``at`` (0: the first)."""

    def __init__(self, chunks: Any, gate: trio.Event, at: int) -> None:
        self._chunks, self._gate, self._at, self._i = chunks, gate, at, 0

    def __aiter__(self) -> _Held:
        return self

    async def __anext__(self) -> ChatChunk:
        if self._i == self._at:
            await self._gate.wait()
        self._i += 1
        chunk: ChatChunk = await self._chunks.__anext__()
        return chunk


class Gated(ScriptedBackend):
    """Answers ``answer to <question>``; a question with a gate (``hold``) streams ``at``
    chunks, then waits for ``release(question)``."""

    def __init__(self, reply: Any = None) -> None:
        super().__init__(reply or (lambda req: Reply(f"answer to {req.messages[-1].content}")))
        self._gates: dict[str, tuple[trio.Event, int]] = {}

    def hold(self, question: str, at: int = 0) -> None:
        self._gates[question] = (trio.Event(), at)

    def release(self, question: str) -> None:
        self._gates[question][0].set()

    @asynccontextmanager
    async def stream(self, request: ChatRequest) -> AsyncIterator[Any]:
        gate = self._gates.get(request.messages[-1].content)
        async with super().stream(request) as chunks:
            yield chunks if gate is None else _Held(chunks, gate[0], gate[1])


def _sent(request: ChatRequest) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in request.messages]


async def _conv(client: httpx.AsyncClient) -> str:
    r = await client.post("/api/conversations", json={})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def _stream_into(client: httpx.AsyncClient, conv: str, content: str,
                       out: list[dict[str, Any]], done: trio.Event) -> None:
    async with client.stream("POST", f"/api/conversations/{conv}/messages",
                             json={"content": content, "stream": True}) as r:
        assert r.status_code == 200
        body = [chunk async for chunk in r.aiter_text()]
    out.extend(parse_sse("".join(body)))
    done.set()


def _ends(frames: list[dict[str, Any]]) -> dict[str, Any]:
    """What a stream told of its run's end: its ``message`` (if any) and ``run.finished``."""
    told: dict[str, Any] = {}
    for f in frames:
        if f.get("event") in ("message", "run.finished", "run.started"):
            told[f["event"]] = f["data"]
    return told


# --------------------------------------------------------------------------------------------
# Two messages on one conversation at once
# --------------------------------------------------------------------------------------------


async def test_two_streams_at_once_on_one_conversation_are_told_what_is_stored(
    settings: Settings,
) -> None:
    """Pin: two messages posted at once on one conversation, both streaming, the second
    finishing first. Each client's ``message`` and ``run.finished`` are what the store then
    holds for its run; the messages are stored in the order the runs began (question, its
    reply, question, its reply), whatever order they ended in; the second run's model was not
    sent the first's unanswered question (docs/api.md: "a question whose reply said nothing
    ... still being written by another run" is left out: two user turns in a row); and a
    third message, once both are over, is sent both turns in their stored order."""
    backend = Gated()
    backend.hold("alpha")
    backend.hold("beta")
    async with running_server(settings, backend) as srv, srv.client() as client:
        conv = await _conv(client)
        a: list[dict[str, Any]] = []
        b: list[dict[str, Any]] = []
        a_done, b_done = trio.Event(), trio.Event()
        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stream_into, client, conv, "alpha", a, a_done)
                first = await backend.wait_stream(0)
                nursery.start_soon(_stream_into, client, conv, "beta", b, b_done)
                second = await backend.wait_stream(1)
                backend.release("beta")
                await b_done.wait()
                backend.release("alpha")
                await a_done.wait()
            r = await client.post(f"/api/conversations/{conv}/messages",
                                  json={"content": "gamma"})
            assert r.status_code == 200, r.text
            third = backend.streams[2]
            stored = (await client.get(f"/api/conversations/{conv}")).json()["messages"]
            runs = {}
            for told in (_ends(a), _ends(b)):
                run_id = told["run.started"]["run_id"]
                runs[run_id] = (await client.get(f"/api/runs/{run_id}")).json()
        assert _sent(first.request) == [("user", "alpha")]
        assert _sent(second.request) == [("user", "beta")], (
            "the second run's model was sent the first run's unanswered question")
        assert [(m["role"], m["content"], m["status"]) for m in stored] == [
            ("user", "alpha", "complete"), ("assistant", "answer to alpha", "complete"),
            ("user", "beta", "complete"), ("assistant", "answer to beta", "complete"),
            ("user", "gamma", "complete"), ("assistant", "answer to gamma", "complete")]
        for frames in (a, b):
            told = _ends(frames)
            run_id = told["run.started"]["run_id"]
            (reply,) = [m for m in stored if m["run_id"] == run_id and m["role"] == "assistant"]
            assert told["message"]["content"] == reply["content"]
            assert told["message"]["id"] == reply["id"]
            assert told["run.finished"]["status"] == runs[run_id]["status"] == "succeeded"
            assert told["run.finished"]["usage"] == runs[run_id]["usage"]
        assert _sent(third.request) == [
            ("user", "alpha"), ("assistant", "answer to alpha"),
            ("user", "beta"), ("assistant", "answer to beta"), ("user", "gamma")]


# --------------------------------------------------------------------------------------------
# A re-join (Last-Event-ID) racing the delete
# --------------------------------------------------------------------------------------------


def _hold_next_event_read(srv: RunningServer, monkeypatch: pytest.MonkeyPatch,
                          ) -> tuple[trio.Event, trio.Event]:
    """(looked, go): the next ``list_run_events`` (the re-join's check of its id) sets
    ``looked`` and waits for ``go`` before it reads."""
    store = srv.services.require_store()
    looked, go = trio.Event(), trio.Event()
    real = store.list_run_events

    async def list_run_events(*args: Any, **kwargs: Any) -> Any:
        if not looked.is_set():
            looked.set()
            await go.wait()
        return await real(*args, **kwargs)

    monkeypatch.setattr(store, "list_run_events", list_run_events)
    return looked, go


@pytest.mark.parametrize("run_state", ["finished", "finished-at-its-end", "live"])
async def test_a_rejoin_racing_the_delete_is_not_told_its_event_id_is_bad(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, run_state: str
) -> None:
    """``GET /api/runs/{id}/events`` with ``Last-Event-ID: 1`` (a client that saw
    ``run.started`` and lost its connection; or the id of the run's ``run.finished``, an
    EventSource reconnecting after the end) racing ``DELETE /api/conversations/{cid}``:
    the route reads the run (there), then the delete lands, then it checks where the id is
    among the run's events, finds none, and answers 422 ``invalid_request`` "event 1 is past
    this run's last event" (finished) or "... past this run's events so far" (live). The
    client is told its id is bad, for a run whose event 1 it was shown and which the store no
    longer holds at all (GET of the run is 404). A client (the page, the terminal) that
    treats a 422 as its own bug starts over from a bad cursor; it was never told the run is
    gone.

    Right: what any other read of a deleted run says: 404 ``not_found`` (or, the stream
    begun, the ``error`` frame ``not_found`` docs/api.md promises: "A stream following a run
    that is deleted ... ends with an ``error`` frame ``not_found``"). docs/api.md gives 422
    only for "an id past a run's last event (another run's, a stale one)".

    Likely spot: service/api/runs.py ``run_events``: ``_where_in_the_end`` / ``_event_type``
    take "no such event" for "past the run's events" without telling it from "no such run"
    (re-read the run, or check the run still exists, when the events read is empty).
    """
    backend = Gated()
    backend.hold("hi")
    if run_state != "live":
        backend.release("hi")
    async with running_server(settings, backend) as srv, srv.client() as client:
        conv = await _conv(client)
        out: dict[str, Any] = {}
        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:

                posted = trio.Event()

                async def post() -> None:
                    out["post"] = await client.post(
                        f"/api/conversations/{conv}/messages",
                        json={"content": "hi", "on_disconnect": "continue"})
                    posted.set()

                nursery.start_soon(post)
                stream = await backend.wait_stream(0)
                run_id = stream.request.run_id
                seen = "1"
                if run_state != "live":
                    await posted.wait()
                if run_state == "finished-at-its-end":  # the client saw run.finished
                    last = (await srv.services.require_store().list_run_events(run_id))[-1]
                    assert last.type == "run.finished"
                    seen = str(last.seq)
                looked, go = _hold_next_event_read(srv, monkeypatch)

                async def rejoin() -> None:
                    async with srv.client() as other:
                        out["rejoin"] = await other.get(f"/api/runs/{run_id}/events",
                                                        headers={"Last-Event-ID": seen})

                nursery.start_soon(rejoin)
                await looked.wait()  # the route has read the run: it is there
                async with srv.client() as other:
                    assert (await other.delete(f"/api/conversations/{conv}")).status_code == 204
                go.set()
            gone = await client.get(f"/api/runs/{run_id}")
        assert gone.status_code == 404  # the store: no such run
        r = out["rejoin"]
        if r.status_code == 200:
            frames = parse_sse(r.text)
            assert frames
            assert frames[-1]["event"] in ("error", "run.finished"), frames
            if frames[-1]["event"] == "error":
                assert frames[-1]["data"]["type"] == "not_found", frames[-1]
        elif run_state == "finished-at-its-end" and r.status_code == 204:
            pass  # it saw the end: told so, as an EventSource is told to stop
        else:
            assert r.status_code == 404, (
                f"the re-join of a deleted run was told {r.status_code} {r.text}: "
                "its event id is bad, not that the run is gone")


# --------------------------------------------------------------------------------------------
# A cancel racing the run's natural end
# --------------------------------------------------------------------------------------------


async def test_a_cancel_racing_the_final_write_is_told_the_end_the_store_keeps(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pin: ``POST /api/runs/{id}/cancel`` arriving while the run's final write (succeeded,
    its whole answer) is in flight. The 202's ``status``, the streaming client's
    ``run.finished`` and ``message``, GET of the run and of the conversation all say the same
    end (docs/api.md: "one that has just ended is left as it is ... a Stop racing the end is
    no error"): nobody is told ``cancelled`` for a run stored ``succeeded``."""
    backend = Gated()
    async with running_server(settings, backend) as srv, srv.client() as client:
        conv = await _conv(client)
        store = srv.services.require_store()
        writing, go = trio.Event(), trio.Event()
        real = store.finish_run

        async def finish_run(*args: Any, **kwargs: Any) -> Any:
            writing.set()
            await go.wait()
            return await real(*args, **kwargs)

        monkeypatch.setattr(store, "finish_run", finish_run)
        frames: list[dict[str, Any]] = []
        done = trio.Event()
        out: dict[str, Any] = {}
        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stream_into, client, conv, "hi", frames, done)
                run_id = (await backend.wait_stream(0)).request.run_id
                await writing.wait()
                handle = srv.services.require_supervisor().get(run_id)
                assert handle is not None
                asked = trio.Event()
                real_cancel = handle.cancel

                def cancel(reason: str = "cancelled by request") -> None:
                    real_cancel(reason)
                    asked.set()

                handle.cancel = cancel  # type: ignore[method-assign]

                async def stop() -> None:
                    async with srv.client() as other:
                        out["cancel"] = await other.post(f"/api/runs/{run_id}/cancel")

                nursery.start_soon(stop)
                await asked.wait()
                go.set()
                await done.wait()
            run = (await client.get(f"/api/runs/{run_id}")).json()
            stored = (await client.get(f"/api/conversations/{conv}")).json()["messages"]
        told = _ends(frames)
        assert out["cancel"].status_code == 202
        (reply,) = [m for m in stored if m["role"] == "assistant"]
        assert (out["cancel"].json()["status"], told["run.finished"]["status"],
                run["status"]) == ("succeeded",) * 3
        assert told["message"]["content"] == reply["content"] == "answer to hi"
        assert reply["status"] == "complete"


# --------------------------------------------------------------------------------------------
# A DELETE while a run streams: the streaming client, a lagging WebSocket, a re-joiner
# --------------------------------------------------------------------------------------------


async def _published(handle: Any, seq: int) -> None:
    """Until the run's events up to ``seq`` are stored and published."""
    while handle.published_seq < seq:
        await handle._changed.wait()


async def _ws_until_end(ws: Any, run_id: str) -> list[dict[str, Any]]:
    """The socket's messages about ``run_id`` until its ``run.finished`` or an error frame."""
    got: list[dict[str, Any]] = []
    while True:
        msg = json.loads(await ws.get_message())
        if msg.get("run_id") != run_id:
            continue
        got.append(msg)
        if msg["type"] in ("run.finished", "error"):
            return got


async def test_a_delete_while_a_run_streams_tells_every_follower_an_end(
    settings: Settings,
) -> None:
    """Pin: a run started over a WebSocket whose client reads nothing for a while, followed
    by an SSE re-joiner too, when its conversation is deleted mid-answer (the run found by
    the delete). Each is told an end that matches the store (no run, no conversation): the
    socket, read late, and the re-joiner get ``run.finished`` ``cancelled`` saying the
    conversation was deleted (or the ``error`` frame ``not_found`` docs/api.md allows), no
    ``message`` and no ``succeeded``; neither waits for ever."""
    backend = Gated()
    backend.hold("hi", at=2)
    settings = settings.model_copy(update={"sse_keepalive": 0.5})
    async with running_server(settings, backend) as srv, srv.client() as client:
        conv = await _conv(client)
        with trio.fail_after(GUARD):
            async with open_websocket_url(ws_url(srv)) as ws:
                await ws.send_message(json.dumps(
                    {"type": "message", "conversation_id": conv, "content": "hi"}))
                run_id = (await backend.wait_stream(0)).request.run_id
                rejoin: list[dict[str, Any]] = []
                rejoined = trio.Event()

                async def follow() -> None:
                    async with srv.client() as other, other.stream(
                            "GET", f"/api/runs/{run_id}/events") as r:
                        body = [chunk async for chunk in r.aiter_text()]
                    rejoin.extend(parse_sse("".join(body)))
                    rejoined.set()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(follow)
                    handle = srv.services.require_supervisor().get(run_id)
                    assert handle is not None
                    await _published(handle, 3)  # run.started and two tokens stored
                    r = await client.delete(f"/api/conversations/{conv}")
                    assert r.status_code == 204
                    await rejoined.wait()
                told_ws = await _ws_until_end(ws, run_id)
            assert (await client.get(f"/api/runs/{run_id}")).status_code == 404
            assert (await client.get(f"/api/conversations/{conv}")).status_code == 404
        for name, frames in (("ws", told_ws), ("rejoin", [
                {"type": f["event"], "data": f["data"]} for f in rejoin])):
            types = [f["type"] for f in frames]
            assert "message" not in types, (name, types)
            end = frames[-1]
            if end["type"] == "error":
                assert end["data" if "data" in end else "error"]["type"] == "not_found", end
            else:
                assert end["type"] == "run.finished", (name, types)
                assert end["data"]["status"] == "cancelled", (name, end)
                assert "deleted" in end["data"].get("error", ""), (name, end)


async def test_a_websocket_behind_the_window_when_its_run_is_deleted_is_told_an_end(
    settings: Settings,
) -> None:
    """Pin of the known gap's edge: a WebSocket client that stops reading while its run
    streams more than the handle's in-memory window holds (4 MB of events) past it, then
    the conversation is deleted. Its forwarder, resumed, re-reads the store for the gap and
    finds the run gone. docs/api.md: "A stream following a run that is deleted ... before it
    has read the run's end ends with an ``error`` frame ``not_found``". The socket must get
    that (or ``run.finished``), not silence: a page waiting for the end would spin for
    ever."""
    words = 600
    big = "x" * 20_000
    backend = Gated(lambda req: Reply(" ".join([big] * words)))
    backend.hold("hi", at=words)  # every word sent; the end held
    async with running_server(settings, backend) as srv, srv.client() as client:
        conv = await _conv(client)
        with trio.fail_after(3 * GUARD):
            async with open_websocket_url(ws_url(srv), max_message_size=2**24) as ws:
                await ws.send_message(json.dumps(
                    {"type": "message", "conversation_id": conv, "content": "hi"}))
                run_id = (await backend.wait_stream(0)).request.run_id
                handle = srv.services.require_supervisor().get(run_id)
                assert handle is not None
                await _published(handle, words + 1)
                behind = handle.covers(1)  # the window still holds event 2 on
                r = await client.delete(f"/api/conversations/{conv}")
                assert r.status_code == 204
                with trio.fail_after(GUARD):
                    told = await _ws_until_end(ws, run_id)
            assert (await client.get(f"/api/runs/{run_id}")).status_code == 404
        assert not behind, "the test did not push the socket's run past the window"
        end = told[-1]
        if end["type"] == "error":
            assert end["error"]["type"] == "not_found", end
        else:
            assert end["data"]["status"] == "cancelled", end
        assert "message" not in [m["type"] for m in told]


# --------------------------------------------------------------------------------------------
# /api/llm-calls of a run begun while its conversation is being deleted
# --------------------------------------------------------------------------------------------


async def test_a_run_begun_during_a_delete_leaves_no_llm_call_row(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run begun on a conversation while a DELETE of it is under way (a second tab posting;
    the delete stops it: tests/api/test_conversation_delete_races.py) leaves its LLM call in
    the store after the DELETE's 204: ``GET /api/llm-calls`` lists a call (its model, backend,
    timings, outcome ``cancelled``) with ``run_id: null``, for a conversation the user deleted.
    With ``SERVICE_API_KEYS`` set the row is nobody's (the owner comes from the run): never
    listed, never removed. A delete whose run was found first leaves none
    (tests/test_told_and_rejoin_regressions.py::
    test_deleting_a_conversation_leaves_no_llm_call_rows_of_its_runs: "a conversation's
    delete removes its runs' LLM-call rows with its runs"): the race breaks that promise.

    Right: by the time DELETE answers 204, no LLM-call row of the conversation's runs is
    left, whether the delete found the run or stopped it as a late one.

    Likely spot: service/api/conversations.py ``delete_conversation`` stops the late runs
    only after ``store.delete_conversation`` has deleted the rows (and their calls); the
    late run's call is recorded after that, and service/store/sqlite_queries.py
    ``record_llm_call`` (postgres_queries.py alike) keeps a call of a run that is not stored
    with ``run_id`` NULL ("deleted with its conversation since. Kept, tied to no run").
    Deleting the late runs' calls after they have ended (or not keeping a call of a run that
    was stored and deleted) would hold the promise.
    """
    async with e2e(settings, "llamacpp") as env:
        c = env.client
        env.sim.script(SimReply(text="never said", hang_after=0))
        store = env.server.services.require_store()
        with trio.fail_after(GUARD):
            conv = await env.conversation()
            looked, go = trio.Event(), trio.Event()
            real = store.runs_in_progress

            async def runs_in_progress(conversation_id: str) -> list[str]:
                ids = await real(conversation_id)
                looked.set()
                await go.wait()
                return ids

            monkeypatch.setattr(store, "runs_in_progress", runs_in_progress)
            out: dict[str, Any] = {}
            async with trio.open_nursery() as nursery:

                async def delete() -> None:
                    async with env.server.client() as other:
                        out["delete"] = await other.delete(f"/api/conversations/{conv}")

                async def post() -> None:
                    out["post"] = await c.post(f"/api/conversations/{conv}/messages",
                                               json={"content": "hi",
                                                     "on_disconnect": "continue"})

                nursery.start_soon(delete)
                await looked.wait()
                nursery.start_soon(post)
                await env.sim.wait_streams(1)  # the late run has begun: its upstream open
                go.set()
            assert out["delete"].status_code == 204
            run_id = out["post"].json()["error"]["run_id"]
            assert (await c.get(f"/api/runs/{run_id}")).status_code == 404
            listed = (await c.get("/api/llm-calls")).json()["data"]
        assert listed == [], (
            f"after DELETE answered 204, GET /api/llm-calls lists {len(listed)} call(s) of its "
            f"run {run_id}: {[(x.get('run_id'), x.get('outcome')) for x in listed]}")


# --------------------------------------------------------------------------------------------
# A run whose first write lands just before the delete's, launched just after it
# --------------------------------------------------------------------------------------------


async def test_a_run_still_starting_when_the_delete_lands_is_not_launched_after_the_204(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DELETE whose look at the runs in progress comes before a POST's first write, and
    whose own write comes after it, stops the runs it then finds live (``supervisor.live()``:
    tests/api/test_conversation_delete_races.py pins a run launched by then). A run whose
    first write has landed but which is not launched yet (``supervisor.starting``: the two
    writes share a group commit and the DELETE's task resumes first) is not among them: the
    DELETE answers 204, then the run launches and calls the model for a conversation that no
    longer exists, going on (a slot, an upstream generation, a tool) until the upkeep's next
    look for deleted runs (``GONE_POLL``) or its next event write. What the client was told
    (204: the conversation and its runs are gone, "runs still going are cancelled first")
    is not what the service does after it. The window is real without the test's hold: the
    POST's ``begin_run`` and the DELETE's write can land in one group commit
    (service/store/sqlite.py batches writes), both tasks woken at once, the DELETE's first.

    Right: as for a run still starting that the delete's look finds
    (tests/api/test_conversations.py::
    test_a_run_stopped_between_its_first_write_and_its_launch_stays_stopped[delete]): it is
    cancelled as it launches, and no upstream call is made.

    Likely spot: service/api/conversations.py ``delete_conversation``: after
    ``store.delete_conversation`` it cancels ``supervisor.live()`` of the conversation only;
    the runs in ``supervisor._starting`` (their first write landed, their launch to come)
    need ``cancel_starting`` too (their conversation id is not kept there: keep it, or mark
    them by run id from a read made in the delete's own transaction).
    """
    backend = Gated()
    backend.hold("hi")  # never answers: the run goes on until something stops it
    async with running_server(settings, backend) as srv, srv.client() as client:
        conv = await _conv(client)
        store = srv.services.require_store()
        supervisor = srv.services.require_supervisor()
        looked, go = trio.Event(), trio.Event()
        landed, launch = trio.Event(), trio.Event()
        real_look, real_begin = store.runs_in_progress, store.begin_run

        async def runs_in_progress(conversation_id: str) -> list[str]:
            ids = await real_look(conversation_id)
            looked.set()
            await go.wait()
            return ids

        async def begin_run(*args: Any, **kwargs: Any) -> Any:
            begun = await real_begin(*args, **kwargs)
            landed.set()
            await launch.wait()
            return begun

        monkeypatch.setattr(store, "runs_in_progress", runs_in_progress)
        monkeypatch.setattr(store, "begin_run", begin_run)
        out: dict[str, Any] = {}
        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:

                deleted = trio.Event()

                async def delete() -> None:
                    async with srv.client() as other:
                        out["delete"] = await other.delete(f"/api/conversations/{conv}")
                    deleted.set()

                async def post() -> None:
                    out["post"] = await client.post(f"/api/conversations/{conv}/messages",
                                                    json={"content": "hi",
                                                          "on_disconnect": "continue"})

                nursery.start_soon(delete)
                await looked.wait()  # the delete has looked: no run in progress
                nursery.start_soon(post)
                await landed.wait()  # the POST's run is stored, not launched
                go.set()
                # The delete goes on; the run launches when it may (before the fix, only
                # after the 204: the delete did not wait for it).
                with trio.move_on_after(1):
                    await deleted.wait()
                launch.set()
                await deleted.wait()
                starting_at_204 = [h for h in supervisor.live() if h.conversation_id == conv]
            opened_after_204 = len(backend.streams)
        assert out["delete"].status_code == 204
        assert starting_at_204 == []
        assert out["post"].status_code == 409, out["post"].text
        assert opened_after_204 == 0, (
            "DELETE answered 204, then the conversation's run launched and called the model "
            f"({opened_after_204} upstream call(s)) until the upkeep found its row gone")


# --------------------------------------------------------------------------------------------
# The same races through two instances sharing one SQLite file
# --------------------------------------------------------------------------------------------


@asynccontextmanager
async def _instance(db: Path, sim_url: str, cwd: Path, name: str,
                    ) -> AsyncIterator[httpx.AsyncClient]:
    proc, base = await start_service(db, sim_url, cwd, name=name,
                                     env_extra={"SERVICE_SHUTDOWN_DRAIN": "1"})
    try:
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            yield http
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(60, shield=True):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()


async def _stream_until(http: httpx.AsyncClient, conv: str, content: str,
                        out: list[dict[str, Any]], tokens: int, seen: trio.Event) -> None:
    """A streamed message on ``http``; ``seen`` once ``tokens`` tokens came; frames in ``out``."""
    buf = ""
    async with http.stream("POST", f"/api/conversations/{conv}/messages",
                           json={"content": content, "stream": True,
                                 "on_disconnect": "continue"}) as r:
        async for chunk in r.aiter_text():
            buf += chunk
            if buf.count("event: token") >= tokens:
                seen.set()
    out.extend(parse_sse(buf))


def _sim_sent(record: Any) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in record.body["messages"]]


@pytest.mark.slow
async def test_two_instances_racing_on_one_conversation_tell_what_the_store_holds(
    tmp_path: Path,
) -> None:
    """Pin, through two service processes on one SQLite file: a message streaming on A (its
    model hangs after three tokens) while B answers another on the same conversation; B
    cancels A's run; A answers a third; then a fourth streams on A while B follows it
    (re-join) and deletes the conversation. Each client is told what the store then holds:
    B's model is not sent A's unanswered question; A's stream ends ``cancelled`` with the
    partial answer the store keeps (and which the third message's model is sent, in stored
    order); the delete ends A's stream ``cancelled`` (the conversation deleted) and B's
    re-join with that end or ``not_found``; afterwards neither instance has the run, the
    conversation or an LLM call of them."""
    sim = Simulator(("sim-model",), strict_models=False)
    sim.script(SimReply(tokens=10, hang_after=3), SimReply(text="beta answer"),
               SimReply(text="gamma answer"), SimReply(tokens=10, hang_after=2))
    db = tmp_path / "shared.db"
    async with (open_simulator(sim) as running,
                _instance(db, running.url, tmp_path, "a") as a,
                _instance(db, running.url, tmp_path, "b") as b):
        with trio.fail_after(90):
            conv = await _conv(a)
            on_a: list[dict[str, Any]] = []
            seen = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stream_until, a, conv, "alpha", on_a, 3, seen)
                await seen.wait()
                r = await b.post(f"/api/conversations/{conv}/messages", json={"content": "beta"})
                assert r.status_code == 200, r.text
                told_b = r.json()
                msgs = (await b.get(f"/api/conversations/{conv}")).json()["messages"]
                run_a = msgs[1]["run_id"]
                r = await b.post(f"/api/runs/{run_a}/cancel")
                assert r.status_code == 202, r.text
                cancel_said = r.json()["status"]
            r = await a.post(f"/api/conversations/{conv}/messages", json={"content": "gamma"})
            assert r.status_code == 200, r.text
            stored = (await b.get(f"/api/conversations/{conv}")).json()["messages"]
            run_a_stored = (await a.get(f"/api/runs/{run_a}")).json()

            on_a2: list[dict[str, Any]] = []
            seen = trio.Event()
            rejoin: dict[str, Any] = {}
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stream_until, a, conv, "delta", on_a2, 2, seen)
                await seen.wait()
                msgs = (await b.get(f"/api/conversations/{conv}")).json()["messages"]
                run_d = msgs[-1]["run_id"]
                got = trio.Event()

                async def follow() -> None:
                    rejoin["r"] = await b.get(f"/api/runs/{run_d}/events")
                    got.set()

                nursery.start_soon(follow)
                r = await b.delete(f"/api/conversations/{conv}")
                assert r.status_code == 204, r.text
                await got.wait()
            gone = [(await x.get(f"/api/runs/{run_d}")).status_code for x in (a, b)]
            calls = [(await x.get("/api/llm-calls")).json()["data"] for x in (a, b)]
        assert _sim_sent(sim.streams[0]) == [("user", "alpha")]
        assert _sim_sent(sim.streams[1]) == [("user", "beta")]
        told_a = _ends(on_a)
        assert cancel_said == told_a["run.finished"]["status"] == run_a_stored["status"] \
            == "cancelled"
        partial = told_a["run.finished"]["content"]
        assert partial
        assert [(m["role"], m["content"], m["status"]) for m in stored] == [
            ("user", "alpha", "complete"), ("assistant", partial, "cancelled"),
            ("user", "beta", "complete"),
            ("assistant", told_b["message"]["content"], "complete"),
            ("user", "gamma", "complete"), ("assistant", "gamma answer", "complete")]
        assert _sim_sent(sim.streams[2]) == [
            ("user", "alpha"), ("assistant", partial), ("user", "beta"),
            ("assistant", "beta answer"), ("user", "gamma")]
        end = _ends(on_a2)["run.finished"]
        assert end["status"] == "cancelled", end
        assert "deleted" in end.get("error", ""), end
        frames = parse_sse(rejoin["r"].text)
        assert frames[-1]["event"] in ("run.finished", "error"), frames
        if frames[-1]["event"] == "error":
            assert frames[-1]["data"]["type"] == "not_found", frames[-1]
        else:
            assert frames[-1]["data"]["status"] == "cancelled", frames[-1]
        assert gone == [404, 404]
        assert calls == [[], []], calls


async def test_a_v1_stream_whose_conversation_is_deleted_is_not_told_a_complete_answer(
    settings: Settings,
) -> None:
    """Pin: a ``/v1`` completion is a stored run on a conversation of its own, listed by
    ``GET /api/conversations`` and deletable mid-answer (a page's "delete" on it). The
    streaming ``/v1`` client is then told an error chunk (docs/api.md: "one cut later ends
    with an ``{"error": ...}`` chunk and no ``finish_reason``, usage or ``[DONE]``"), never a
    ``finish_reason`` and ``[DONE]`` that read as a complete answer the store does not
    have."""
    backend = Gated()
    backend.hold("hi", at=2)
    async with running_server(settings, backend) as srv, srv.client() as client:
        body: list[str] = []
        done = trio.Event()

        async def complete() -> None:
            async with client.stream("POST", "/v1/chat/completions", json={
                    "model": "fake-model", "stream": True,
                    "messages": [{"role": "user", "content": "hi"}]}) as r:
                assert r.status_code == 200
                body.extend([chunk async for chunk in r.aiter_text()])
            done.set()

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(complete)
                run_id = (await backend.wait_stream(0)).request.run_id
                handle = srv.services.require_supervisor().get(run_id)
                assert handle is not None
                await _published(handle, 3)
                (conv,) = (await client.get("/api/conversations")).json()["data"]
                assert (await client.delete(f"/api/conversations/{conv['id']}")).status_code \
                    == 204
                await done.wait()
            assert (await client.get(f"/api/runs/{run_id}")).status_code == 404
        frames = parse_sse("".join(body))
        datas = [f["data"] for f in frames]
        assert "[DONE]" not in datas, datas
        assert not any(isinstance(d, dict) and d.get("choices")
                       and d["choices"][0].get("finish_reason") for d in datas), datas
        assert isinstance(datas[-1], dict), datas
        assert "error" in datas[-1], datas
