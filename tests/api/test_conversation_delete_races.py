"""A conversation deleted while a run on it begins (a review of 2026-12-05; each test failed
before its fix).

A DELETE of a conversation reads the conversation's runs in progress, stops them, then deletes
the rows (service/api/conversations.py). A run begun on the conversation in between (a second
tab posting a message, another worker) is not among those stopped, and the delete cascades over
it while it runs. These tests widen that window deterministically: the DELETE's read of the runs
in progress is held until the racing POST's run has begun (its first write landed, its upstream
call opened), then let go.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from service.runs import RunSpec
from service.settings import Settings, load_settings

from ..fakes import Reply, ScriptedBackend, supervisor_env
from ..servers import RunningServer, running_server
from ..streams import parse_sse

GUARD = 15  # seconds any test may take before it fails


def _hold_the_deletes_look(srv: RunningServer, monkeypatch: pytest.MonkeyPatch,
                           ) -> tuple[trio.Event, trio.Event]:
    """(looked, go): a DELETE's read of the runs in progress sets ``looked`` and waits for
    ``go`` before the delete goes on."""
    store = srv.services.require_store()
    looked, go = trio.Event(), trio.Event()
    real = store.runs_in_progress

    async def runs_in_progress(conversation_id: str) -> list[str]:
        ids = await real(conversation_id)
        looked.set()
        await go.wait()
        return ids

    monkeypatch.setattr(store, "runs_in_progress", runs_in_progress)
    return looked, go


@asynccontextmanager
async def _delete_racing_a_post(
    srv: RunningServer, backend: ScriptedBackend, conv: str,
    monkeypatch: pytest.MonkeyPatch, post: Callable[[], Any],
) -> AsyncIterator[dict[str, Any]]:
    """DELETE the conversation while ``post`` starts a run on it: the DELETE has read the runs
    in progress (none) when the POST's run begins; the DELETE then goes on. Yields, once the
    DELETE has answered, ``{"delete": response}``; ``post`` runs on in the background until the
    block ends (then it is cancelled: the client leaves)."""
    looked, go = _hold_the_deletes_look(srv, monkeypatch)
    out: dict[str, Any] = {}
    deleted = trio.Event()

    async def delete() -> None:
        async with srv.client() as other:
            out["delete"] = await other.delete(f"/api/conversations/{conv}")
        deleted.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(delete)
        await looked.wait()
        nursery.start_soon(post)
        await backend.wait_stream(0)  # the POST's run has begun: stored, its upstream open
        go.set()
        await deleted.wait()
        yield out
        nursery.cancel_scope.cancel()  # what the test did not wait for (a stream that hangs)


async def test_a_run_begun_while_a_delete_is_under_way_is_left_running(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DELETE /api/conversations/{id} answered 204 while a run on that conversation, begun
    during the delete, kept going: it holds a run slot and its upstream generation goes on
    (here a model that is silent for a while, then answers whole; a run whose events come
    sooner is stopped only by its next event write, one whose model or tool is silent runs
    up to its deadline), for a conversation and run that no longer exist: GET and cancel of
    it are 404, so nothing can stop it.

    Right: as for the runs the delete found (tests/api/test_conversations.py::
    test_deleting_a_conversation_stops_its_runs), by the time the delete answers, no run of
    the conversation is going and its upstream is closed.

    Root cause: service/api/conversations.py delete_conversation reads ``runs_in_progress``,
    stops those, then deletes; a run begun between the read and the delete's write is not
    stopped (and nothing stops a live run whose rows were deleted until it writes an event).
    """
    backend = ScriptedBackend(lambda req: Reply("a late answer", first_delay=4.0))
    async with running_server(settings, backend) as srv, srv.client() as client:
        conv = (await client.post("/api/conversations", json={})).json()["id"]
        supervisor = srv.services.require_supervisor()

        async def post() -> None:
            await client.post(f"/api/conversations/{conv}/messages",
                              json={"content": "hi", "on_disconnect": "continue"})

        with trio.fail_after(GUARD):
            async with _delete_racing_a_post(srv, backend, conv, monkeypatch, post) as out:
                # The delete has answered: nothing of the conversation may still be going.
                still = [h.id for h in supervisor.live() if h.conversation_id == conv]
                (stream,) = backend.streams
                upstream_closed = stream.closed
                run = await client.get(f"/api/runs/{stream.request.run_id}")
        assert out["delete"].status_code == 204
        assert run.status_code == 404  # gone from the store: no client can reach it
        assert still == [], f"runs of the deleted conversation still going: {still}"
        assert upstream_closed, "the run's upstream generation goes on after the delete"


async def test_a_post_racing_a_delete_is_told_its_answer_was_stored(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-stream POST .../messages whose conversation is deleted while its run goes on
    answered 200 ``{"run": {"status": "succeeded"}, "message": {"status": "complete", ...}}``,
    yet the store has neither: GET /api/runs/{id} and GET /api/conversations/{id} are 404.
    The client is told its answer was stored when it was not.

    Right: the run's end the store refused because its rows are gone is not reported as
    stored; the POST gets an error (404 ``not_found`` for the conversation, or 409
    ``cancelled`` as when the delete finds the run), never a 200 success.

    Root cause: service/runs/committer.py ``_adopt_stored_end``, its ``NotFound`` branch:
    when ``finish_run`` changed nothing because the run is gone, the run is marked stored
    (``handle.stored_as(final.status, ...)``) with the status it would have had, so
    ``handle.status`` is ``succeeded`` and service/api/runs.py post_message answers 200.
    """
    backend = ScriptedBackend(lambda req: Reply("a late answer", first_delay=1.0))
    async with running_server(settings, backend) as srv, srv.client() as client:
        conv = (await client.post("/api/conversations", json={})).json()["id"]
        posted: dict[str, Any] = {}
        done = trio.Event()

        async def post() -> None:
            posted["r"] = await client.post(f"/api/conversations/{conv}/messages",
                                            json={"content": "hi"})
            done.set()

        with trio.fail_after(GUARD):
            async with _delete_racing_a_post(srv, backend, conv, monkeypatch, post) as out:
                assert out["delete"].status_code == 204
                await done.wait()
        r = posted["r"]
        run_id = backend.streams[0].request.run_id
        stored = await client.get(f"/api/runs/{run_id}")
        assert stored.status_code == 404  # what the store holds: no such run
        assert (await client.get(f"/api/conversations/{conv}")).status_code == 404
        assert r.status_code != 200, (
            f"told {r.json()['run']['status']!r} with message {r.json()['message']['id']} "
            "stored as complete, but the store has no such run or conversation")
        # As when the delete finds the run going: cancelled, by the delete.
        assert (r.status_code, r.json()["error"]["type"]) == (409, "cancelled"), r.text
        assert "deleted" in r.json()["error"]["message"], r.text


async def test_a_stream_racing_a_delete_never_ends(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A streamed POST .../messages whose conversation is deleted while its run streams got
    ``run.started`` and then only keep-alive comments, for ever: no token, no ``error``, no
    ``run.finished``, although the run has ended (the supervisor has no run in flight). API.md:
    "Every stream ends with ``run.finished``, whatever happened."

    Right: the stream ends promptly with ``run.finished`` (or an ``error`` frame), as a stream
    whose run the delete found does.

    Root cause: the run's token events are written after the delete, find no run and are
    dropped (service/runs/committer.py ``_write_batch``: ``not_held``, never published); its
    final write then finds no run, and ``_adopt_stored_end``'s ``NotFound`` branch publishes
    only the final events (``error``, ``run.finished``), numbered after the dropped ones.
    RunHandle.publish (service/runs/handle.py) holds events that come after a gap until the
    gap is filled, which never happens: ``published_final`` stays False, the handle stays in
    the committer's ``_ended`` (served to readers for ever), and every subscriber waits.
    """
    backend = ScriptedBackend(lambda req: Reply("one two three four five six", first_delay=0.5,
                                                gap=0.1))
    settings = settings.model_copy(update={"sse_keepalive": 0.5})
    async with running_server(settings, backend) as srv, srv.client() as client:
        conv = (await client.post("/api/conversations", json={})).json()["id"]
        body: list[str] = []
        ended = trio.Event()

        async def post() -> None:
            async with client.stream("POST", f"/api/conversations/{conv}/messages",
                                     json={"content": "hi", "stream": True}) as r:
                async for chunk in r.aiter_text():
                    body.append(chunk)
            ended.set()

        with trio.fail_after(GUARD):
            async with _delete_racing_a_post(srv, backend, conv, monkeypatch, post) as out:
                with trio.move_on_after(5):
                    await ended.wait()
                in_flight = srv.services.require_supervisor().in_flight
        assert out["delete"].status_code == 204
        assert in_flight == 0  # the run has ended
        run_id = backend.streams[0].request.run_id
        frames = parse_sse("".join(body))
        sent = [f["event"] for f in frames]
        assert ended.is_set(), (f"the stream of run {run_id} has not ended 5 s after its run "
                                f"did; it sent {sent} and keep-alives since")
        assert sent[-1] in ("run.finished", "error"), sent
        assert frames[-1]["data"]["status"] == "cancelled", frames[-1]


async def test_get_conversation_racing_a_delete_shows_it_without_its_messages(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GET /api/conversations/{id} racing a DELETE of it answered 200 with the conversation and
    ``"messages": []``: a state the store never held (the conversation had its messages until
    it was deleted with them). A client syncing it takes the history for emptied.

    Right: one consistent answer, the conversation with all its messages (read before the
    delete) or 404 (after it).

    Root cause: service/api/conversations.py get_conversation reads the conversation
    (``store.get_conversation``) and its messages (``store.get_messages``) in two separate
    reads; a delete landing between them leaves the first answer standing with no messages.
    Read both in one read transaction (or 404 when the second read finds the conversation
    gone).
    """
    async with running_server(settings) as srv, srv.client() as client:
        conv = (await client.post("/api/conversations", json={})).json()["id"]
        r = await client.post(f"/api/conversations/{conv}/messages", json={"content": "hi"})
        assert r.status_code == 200
        store = srv.services.require_store()
        assert len(await store.get_messages(conv)) == 2
        read, go = trio.Event(), trio.Event()
        real = store.get_messages

        async def get_messages(conversation_id: str) -> Any:
            read.set()  # the GET is reading
            await go.wait()
            return await real(conversation_id)

        monkeypatch.setattr(store, "get_messages", get_messages)
        got: dict[str, Any] = {}

        async def get() -> None:
            got["r"] = await client.get(f"/api/conversations/{conv}")

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(get)
                await read.wait()
                async with srv.client() as other:
                    assert (await other.delete(f"/api/conversations/{conv}")).status_code == 204
                go.set()
        r = got["r"]
        assert r.status_code == 404 or len(r.json()["messages"]) == 2, (
            f"{r.status_code}: the conversation with messages {r.json().get('messages')}")


async def test_a_run_begun_on_another_worker_while_a_delete_is_under_way_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The delete stopped a run begun during it only in its own process. With ``--workers N``
    or several instances the POST and the DELETE land on different processes as often as
    not, and there the run went on: its rows gone (its id 404, no client could cancel it),
    holding a run slot and its upstream generation until its next event write, a silent
    model's until its deadline. Now the worker running it finds its row gone (the upkeep's
    cancel loop, every GONE_POLL) and stops it."""
    backend_b = ScriptedBackend(lambda req: Reply("a late answer", first_delay=15.0))
    # B: another worker on the same SQLite file (its own process tag, a live process).
    async with supervisor_env(tmp_path, backend_b, process_id=f"{os.getppid()}:1") as b:
        settings = load_settings(db=tmp_path / "runs.db")
        async with running_server(settings, ScriptedBackend()) as a, a.client() as client:
            conv = (await client.post("/api/conversations", json={})).json()["id"]
            looked, go = _hold_the_deletes_look(a, monkeypatch)
            out: dict[str, Any] = {}
            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:

                    async def delete() -> None:
                        out["delete"] = await client.delete(f"/api/conversations/{conv}")

                    nursery.start_soon(delete)
                    await looked.wait()
                    handle = await b.supervisor.start(RunSpec(conv, "hi"))
                    await backend_b.wait_stream(0)  # B's run has begun: stored, upstream open
                    go.set()
                assert out["delete"].status_code == 204
                assert (await client.get(f"/api/runs/{handle.id}")).status_code == 404
                with trio.move_on_after(3):  # a dozen cancel polls
                    await handle.finished.wait()
            still_going = not handle.finished.is_set()
            upstream_open = not backend_b.streams[0].closed
            handle.cancel("test over")
    assert not still_going, (
        "3 s after DELETE answered 204, the run begun on another worker is still going "
        f"({handle!r}), unreachable (its id 404)")
    assert not upstream_open, "its upstream generation goes on"
