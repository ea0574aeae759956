"""What a client is told about a run against what the store holds, at a run's edges: re-joins
(``Last-Event-ID``, ``?after=``), the event retention (``SERVICE_EVENTS_RETENTION_DAYS``),
deletes while a run is followed, the model a run names and its error's text. From two reviews
of 2026-12-05; each test failed before its fix.

Real servers on 127.0.0.1 (the app under hypercorn on port 0), with the in-memory scripted
backend or the real simulator upstream the lifespan builds from the settings (tests/e2e.py);
another worker sharing the SQLite file is a supervisor of its own in this process
(tests/fakes.py), as in tests/api/test_conversation_delete_races.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from service.runs import RunSpec
from service.settings import Settings, load_settings
from service.sim import Reply as SimReply
from service.store import RunEvent

from .e2e import e2e, read_events
from .fakes import Reply, ScriptedBackend, supervisor_env
from .servers import running_server
from .streams import parse_sse

pytestmark = pytest.mark.both_stores

GUARD = 30  # seconds any wait may take before the test fails


async def _prune_everything(store: Any) -> None:
    """What ``upkeep.prune_loop`` does once a finished run is older than the retention: its
    events pruned (the loop's own cutoff is ``time.time() - retention``)."""
    while await store.prune_events(time.time() + 1):
        pass


async def test_a_rejoin_of_a_pruned_run_is_told_its_answer_or_a_clear_error(
    settings: Settings,
) -> None:
    """A run whose events the retention pruned (SERVICE_EVENTS_RETENTION_DAYS), re-joined from
    the start, streams ``run.started`` then ``run.finished`` ``{"status": "succeeded"}``, and
    nothing else: no ``token``, no ``message``, no ``error``. A client that builds the answer
    from the stream (API.md: ``message`` is "the final assistant message") is told the run
    succeeded with an empty answer, although the store still has the answer (the reply's
    message) and the run is a 200 ``succeeded``.

    Right: the re-join carries the final answer (the run's ``message`` event, one row, kept
    with ``run.started`` and ``run.finished``), or says clearly that the events are gone (an
    ``error`` frame). Never a success with no answer.

    Root cause: service/store/sqlite_queries.py (and postgres_queries.py) ``prune_events``
    deletes every event but ``run.started`` and ``run.finished``, the ``message`` (and
    ``error``) of the run's end included; service/runs/reader.py ``EventReader`` then streams
    what is left as if it were the whole run.
    """
    backend = ScriptedBackend(lambda req: Reply("the answer the store keeps"))
    async with running_server(settings, backend) as srv, srv.client() as client:
        conv = (await client.post("/api/conversations", json={})).json()["id"]
        r = await client.post(f"/api/conversations/{conv}/messages", json={"content": "hi"})
        assert r.status_code == 200, r.text
        run_id, answer = r.json()["run"]["id"], r.json()["message"]["content"]
        assert answer == "the answer the store keeps"
        await _prune_everything(srv.services.require_store())
        with trio.fail_after(GUARD):
            async with client.stream("GET", f"/api/runs/{run_id}/events") as resp:
                assert resp.status_code == 200
                frames = parse_sse((await resp.aread()).decode())
        # The store still has the answer, and says the run succeeded.
        reply = [m for m in (await client.get(f"/api/conversations/{conv}")).json()["messages"]
                 if m["role"] == "assistant"]
        assert [m["content"] for m in reply] == [answer]
        assert (await client.get(f"/api/runs/{run_id}")).json()["status"] == "succeeded"
    types = [f["event"] for f in frames]
    assert types[-1] == "run.finished", types
    assert types == ["run.started", "message", "run.finished"], types
    told = [f["data"].get("content") for f in frames if f["event"] == "message"]
    assert told == [answer], (
        f"the re-join of a pruned run streamed {types}: succeeded, with no answer")


async def test_a_last_event_id_past_a_finished_runs_end_is_refused_not_a_204(
    settings: Settings,
) -> None:
    """``Last-Event-ID: 999`` on a finished run of a handful of events answers 204 No Content,
    which the docs give "a client that has seen a finished run's ``run.finished``" and which
    stops a browser's EventSource for good: the client never gets the run's events, and is
    told it has seen them all. No client can have seen event 999 of this run (an id of another
    run, a stale or corrupted id). The same id on a run still going is a 422 ``Last-Event-ID``
    ("event 999 is past this run's events so far").

    Right: 422 ``invalid_request`` naming ``Last-Event-ID``, as for a live run; 204 only for
    an id at (or of) the run's ``run.finished``.

    Root cause: service/api/runs.py ``run_events``: the "past this run's events" check
    (``_has_event``) is made only while the run is in progress; for a finished run
    ``_seen_to_the_end`` takes any id with no event after it as "seen to the end".
    """
    async with running_server(settings, ScriptedBackend()) as srv, srv.client() as client:
        conv = (await client.post("/api/conversations", json={})).json()["id"]
        r = await client.post(f"/api/conversations/{conv}/messages", json={"content": "hi"})
        run_id = r.json()["run"]["id"]
        with trio.fail_after(GUARD):
            async with client.stream("GET", f"/api/runs/{run_id}/events") as resp:
                frames = parse_sse((await resp.aread()).decode())
            last = int(frames[-1]["id"])
            assert frames[-1]["event"] == "run.finished"
            seen = await client.get(f"/api/runs/{run_id}/events",
                                    headers={"Last-Event-ID": str(last)})
            assert seen.status_code == 204  # seen to its end: right
            r = await client.get(f"/api/runs/{run_id}/events",
                                 headers={"Last-Event-ID": str(last + 990)})
            q = await client.get(f"/api/runs/{run_id}/events", params={"after": last + 990})
    assert r.status_code == 422, (
        f"Last-Event-ID {last + 990} of a run whose last event is {last}: {r.status_code}")
    assert r.json()["error"]["field"] == "Last-Event-ID", r.text
    assert q.status_code == 422, f"?after={last + 990}: {q.status_code}"
    assert q.json()["error"]["field"] == "after", q.text


async def test_a_rejoin_at_run_finished_of_a_run_that_ends_as_it_is_read_is_a_204(
    settings: Settings,
) -> None:
    """A client that saw a run's ``run.finished`` re-joins just as the run's final write lands:
    the run is read as running, then its event is found in the store (the final write landed
    between the two reads). It was followed as a live run: an empty 200 (or, for a run no
    process here runs, a stream that waited), and an EventSource reconnected. Now a 204, as
    for a run read as finished. (Between the two reads here: the run's row left running, its
    events written with the store's own calls.)"""
    async with running_server(settings, ScriptedBackend()) as srv, srv.client() as client:
        store = srv.services.require_store()
        conv = await store.create_conversation()
        begun = await store.begin_run(conv.id, content="q", agent="chat", model="m")
        await store.append_run_events([
            RunEvent(begun.run.id, 2, "token", {"text": "a"}, 0.0),
            RunEvent(begun.run.id, 3, "run.finished", {"status": "succeeded", "usage": {}}, 0.0),
        ])
        assert (await store.get_run(begun.run.id)).status == "running"
        with trio.fail_after(GUARD):
            r = await client.get(f"/api/runs/{begun.run.id}/events",
                                 headers={"Last-Event-ID": "3"})
    assert r.status_code == 204, (r.status_code, r.text[:200])


async def test_a_rejoin_following_another_workers_run_ends_clearly_when_it_is_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client re-joins (``GET /api/runs/{id}/events``) a run that another worker sharing the
    store runs (``--workers N``: the re-join and the run land on different processes as often
    as not); the stream follows it through the store. The conversation is then deleted: the
    DELETE asks the other worker to cancel the run, waits for its end, deletes the rows, and
    answers 204. The re-joined stream then just stops: a 200 body of ``run.started`` and
    nothing more, no ``run.finished``, no ``error`` frame (API.md: "Every stream ends with
    ``run.finished``, whatever happened"). The client cannot tell a deleted run from a
    connection the network cut; an EventSource reconnects, and gets a 404 only then.

    The follower's next poll of the store (every 0.1 s backing off to 1 s) comes after the
    delete here (held until the DELETE answered, as a 1 s poll does by itself most of the
    time: the delete lands within about 0.1 s of the run's end).

    Right: the stream ends with ``run.finished`` (``cancelled``, "the conversation was
    deleted", as a client following the run on its own worker is told) or an ``error`` frame
    saying the run is gone.

    Root cause: service/runs/reader.py ``EventReader.__anext__``: a run not live here whose
    rows are gone takes the "over (or gone)" branch; ``_in_progress`` answers False on
    ``NotFound`` and the reader finishes (``self._finished = True``) with no end event and no
    error. Raise ``NotFound`` (the stream's ``ServiceError`` handler sends an ``error`` frame),
    or emit a ``run.finished`` ``cancelled`` for a run that vanished.
    """
    backend_b = ScriptedBackend(lambda req: Reply("a late answer", first_delay=30.0))
    async with supervisor_env(tmp_path, backend_b, process_id=f"{os.getppid()}:1") as b:
        settings = load_settings(db=tmp_path / "runs.db", sse_keepalive=0.5)
        async with running_server(settings, ScriptedBackend()) as a, a.client() as client:
            conv = (await client.post("/api/conversations", json={})).json()["id"]
            handle = await b.supervisor.start(RunSpec(conv, "hi"))
            await backend_b.wait_stream(0)  # B's run has begun: stored, its upstream open
            reads = a.services.require_supervisor().reads
            real_read = reads.read
            deleting, deleted = trio.Event(), trio.Event()

            async def read(run_id: str, after: int) -> Any:
                if deleting.is_set():
                    await deleted.wait()
                return await real_read(run_id, after)

            monkeypatch.setattr(reads, "read", read)
            body: list[str] = []
            ended = trio.Event()
            started = trio.Event()

            async def follow() -> None:
                async with client.stream("GET", f"/api/runs/{handle.id}/events") as r:
                    assert r.status_code == 200
                    async for chunk in r.aiter_text():
                        body.append(chunk)
                        if "run.started" in "".join(body):
                            started.set()
                ended.set()

            with trio.fail_after(GUARD):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(follow)
                    await started.wait()
                    deleting.set()
                    async with a.client() as other:
                        d = await other.delete(f"/api/conversations/{conv}")
                    deleted.set()
                    with trio.move_on_after(5):
                        await ended.wait()
                    nursery.cancel_scope.cancel()
                assert d.status_code == 204, d.text
                assert (await client.get(f"/api/runs/{handle.id}")).status_code == 404
            assert handle.finished.is_set()  # the delete stopped the run on B
    frames = parse_sse("".join(body))
    sent = [f["event"] for f in frames]
    assert ended.is_set(), f"the re-joined stream has not ended 5 s after the delete: {sent}"
    assert sent[-1:] == ["error"], (
        f"the re-joined stream of the deleted run ended with {sent}: no run.finished, no error")
    assert frames[-1]["data"]["type"] == "not_found", frames[-1]
    assert "deleted" in frames[-1]["data"]["message"], frames[-1]


async def test_deleting_a_conversation_leaves_no_llm_call_rows_of_its_runs(
    settings: Settings,
) -> None:
    """DELETE /api/conversations/{id} answers 204 and its runs are gone (GET of a run is 404,
    ``/api/llm-calls?run_id=`` of it is 404), yet every LLM call its runs made stays in the
    store, naming the deleted run: listed by ``GET /api/llm-calls`` (model, backend, tokens,
    timings, the upstream's error text) for a conversation the user deleted, and with
    ``SERVICE_API_KEYS`` set invisible to everyone (the owner comes from the run) but never
    removed: orphan rows that only grow.

    Right: a conversation's delete removes its runs' LLM-call rows with its runs, messages and
    events (the listing and the ``run_id`` filter then agree: nothing of the run is left).

    Root cause: service/store/schema.py ``llm_calls.run_id`` has no foreign key (messages,
    runs and run_events cascade from the conversation), and service/store/sqlite_queries.py
    (and postgres_queries.py) ``delete_conversation`` deletes only the conversation row.
    """
    async with e2e(settings, "llamacpp") as env:
        c = env.client
        with trio.fail_after(GUARD):
            conv = await env.conversation()
            r = await c.post(f"/api/conversations/{conv}/messages", json={"content": "hi"})
            assert r.status_code == 200, r.text
            run_id = r.json()["run"]["id"]
            assert [call["run_id"] for call in (await env.llm_calls(run_id))] == [run_id]
            assert (await c.delete(f"/api/conversations/{conv}")).status_code == 204
            assert (await c.get(f"/api/runs/{run_id}")).status_code == 404
            assert (await c.get("/api/llm-calls", params={"run_id": run_id})).status_code == 404
            listed = [call["run_id"] for call in (await c.get("/api/llm-calls")).json()["data"]]
            stored = await env.server.services.require_store().list_llm_calls(run_id=run_id)
    assert listed == [], f"GET /api/llm-calls still lists the deleted run's calls: {listed}"
    assert stored == [], f"the store keeps {len(stored)} LLM-call row(s) of the deleted run"


MSG = [{"role": "user", "content": "hi"}]


async def test_a_v1_stream_names_the_model_the_run_is_stored_with_when_its_first_token_is_slow(
    settings: Settings,
) -> None:
    """``POST /v1/chat/completions`` with ``stream: true`` and no ``model`` (no
    ``SERVICE_DEFAULT_MODEL``: "first model the backend lists"). The upstream takes longer than
    the SSE keep-alive interval for its first token (a model loading, a long prompt). Every
    chunk of the stream says ``"model": "default"``, a name no backend has, while the run is
    stored with the model that answered (GET /api/runs/{id}) and the same request non-streamed
    answers with that name. A client (or a proxy billing by ``chunk.model``) is told a model the
    store contradicts.

    Right: the chunks name the model that answered, as the stored run and the non-stream answer
    do."""
    async with e2e(settings, "llamacpp", default_model=None, sse_keepalive=0.3) as env:
        env.sim.script(SimReply(text="hello there", first_delay=1.0))
        with trio.fail_after(GUARD):
            async with env.client.stream(
                "POST", "/v1/chat/completions", json={"messages": MSG, "stream": True},
            ) as r:
                assert r.status_code == 200
                body = (await r.aread()).decode()
            chunks = [f["data"] for f in parse_sse(body) if f["data"] != "[DONE]"]
            run_id = chunks[0]["id"].removeprefix("chatcmpl-")
            stored = (await env.client.get(f"/api/runs/{run_id}")).json()
        assert stored["status"] == "succeeded"
        assert stored["model"] == "sim-model", stored
        told = {c["model"] for c in chunks}
        assert told == {stored["model"]}, (told, stored["model"])


async def test_a_run_that_named_no_model_is_told_the_model_it_is_stored_with(
    settings: Settings,
) -> None:
    """A run that names no model, on a conversation that names none, with no
    ``SERVICE_DEFAULT_MODEL``: the backend picks its first listed model, and the run is stored
    with it (GET /api/runs/{id} ``model``).

    Wrong: ``run.started`` says ``"model": null`` (nothing named one: the backend chooses only
    when it is called; in a fleet, the server that answers), and no event of a run that did not
    succeed named the model the store says it ran with.

    Right (docs/api.md): ``run.started``'s model is the one asked for (null here), and
    ``run.finished`` names the model that answered, live and re-joined, as the run is stored."""
    async with e2e(settings, "llamacpp", default_model=None) as env:
        env.sim.script(SimReply(text="hello there"))
        conv = await env.conversation()
        with trio.fail_after(GUARD):
            async with env.post_stream(conv, "hi") as r:
                live = await read_events(r)
            run_id = live[0].data["run_id"]
            rejoined = await env.run_events(run_id)
            stored = (await env.client.get(f"/api/runs/{run_id}")).json()
        assert stored["status"] == "succeeded"
        assert stored["model"] == "sim-model", stored
        for events in (live, rejoined):
            assert events[0].type == "run.started"
            assert events[0].data["model"] is None  # asked for: none
            assert events[-1].type == "run.finished"
            assert events[-1].data["model"] == stored["model"], events[-1].data
            assert [e.data["model"] for e in events if e.type == "message"] == [stored["model"]]


async def test_a_failed_runs_error_is_told_as_the_store_holds_it(settings: Settings) -> None:
    """The upstream answers an error whose message holds a NUL (``"\\u0000"``: valid JSON; a
    server echoing bytes it was given, or a C string cut short). The store cleans a run's error
    as it writes it (``finish_run``: NUL and lone surrogates become U+FFFD; PostgreSQL's text
    cannot hold a NUL), but the error was told before that, raw: the non-stream answer's
    ``error.message`` and the stream's ``error`` / ``run.finished`` events say ``"\\u0000"``
    while GET /api/runs/{id} says ``"\\ufffd"``. A client comparing the error it was given
    with the run's stored error (or de-duplicating failures by it) finds two texts.

    Right: one text, cleaned where the run's error is decided, told and stored alike."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(SimReply(status=500, error="upstream says \x00 no"))
        conv = await env.conversation()
        with trio.fail_after(GUARD):
            r = await env.client.post(f"/api/conversations/{conv}/messages",
                                      json={"content": "hi"})
            assert r.status_code == 502, r.text
            told = r.json()["error"]
            stored = (await env.client.get(f"/api/runs/{told['run_id']}")).json()
            events = await env.run_events(told["run_id"])
        assert stored["status"] == told["run_status"] == "failed"
        assert events[-1].type == "run.finished"
        assert (told["message"], events[-1].data["error"]) == (stored["error"], stored["error"])
