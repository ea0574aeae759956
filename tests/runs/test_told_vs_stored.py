"""What each client was told versus what the store holds afterwards, at the run lifecycle's
edges (a review; each test fails on the code it was written against).

Real server on 127.0.0.1 (hypercorn's trio worker, as ``hypercorn ... service.app:app`` runs
it), the real simulator upstream, store faults only through ``store.faults``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import httpx
import trio

from service.settings import BackendKind, Settings
from service.sim import Reply, Simulator
from service.store import make_store

from ..e2e import GUARD, EventStream, _serve_sim, after_tokens, e2e
from ..servers import running_server


async def _stored(settings: Settings, run_id: str) -> tuple[Any, list[Any], list[Any]]:
    """The run, its events and its conversation's messages, read from the store file."""
    store = make_store(settings.db)
    await store.open()
    try:
        run = await store.get_run(run_id)
        events = await store.list_run_events(run_id)
        messages = await store.get_messages(run.conversation_id)
    finally:
        await store.aclose()
    return run, events, messages


async def test_a_stream_cut_by_a_hypercorn_shutdown_is_told_its_end_and_not_stored_as_a_disconnect(
    settings: Settings,
) -> None:
    # ``hypercorn --config hypercorn.toml service.app:app`` (API.md: "must work too") stops
    # like this: the shutdown trigger fires, listeners close, in-flight requests get
    # graceful_timeout and are then cancelled; only then does ``after_serving`` drain the runs.
    # A client following its run over SSE is still connected. It must get the run's end
    # (API.md: "Every stream ends with run.finished, whatever happened"), and the store must
    # not say that the client disconnected: it was the shutdown that cut the run.
    sim = Simulator(("sim-model",))
    sim.script(Reply(tokens=2000, interval=0.02))
    stopped = trio.Event()
    seen: list[Any] = []
    ended = trio.Event()
    run_id: list[str] = []
    with trio.fail_after(6 * GUARD):
        async with trio.open_nursery() as nursery:
            scope = await nursery.start(_serve_sim, sim, stopped)
            conf = settings.model_copy(update={"backend": BackendKind.llamacpp,
                                               "llamacpp_url": sim.url,
                                               "shutdown_drain": 0.5})
            async with httpx.AsyncClient(timeout=30) as client:
                async with running_server(conf, from_settings=True) as server:
                    r = await client.post(f"{server.url}/api/conversations", json={})
                    conv = r.json()["id"]
                    first = trio.Event()

                    async def follow() -> None:
                        try:
                            async with client.stream(
                                "POST", f"{server.url}/api/conversations/{conv}/messages",
                                json={"content": "go", "stream": True},
                            ) as resp:
                                stream = EventStream(resp)
                                seen.extend(await stream.read(after_tokens(3)))
                                run_id.append(seen[0].data["run_id"])
                                first.set()
                                # A cut body: what was read so far is what it got.
                                with contextlib.suppress(httpx.HTTPError):
                                    seen.extend(await stream.read())
                        finally:
                            ended.set()

                    nursery.start_soon(follow)
                    await first.wait()
                # The server has stopped (its after_serving drain included).
                await ended.wait()
            scope.cancel()
    run, events, _ = await _stored(conf, run_id[0])
    told = (seen[-1].type, seen[-1].data.get("status"))
    # The client, connected all along, was told the run's end as the store has it; and what
    # the store says ended the run is the shutdown, not a client leaving.
    assert (told, run.status, run.error) == (("run.finished", "cancelled"), "cancelled",
                                            "shutdown"), (told, run.status, run.error,
                                                          events[-1].type)


def _slow_commits() -> None:
    """A store fault (``before_commit``): every commit takes a few milliseconds (a slow
    disk), so a time the service reads before a write and one it reads after it differ."""
    start = time.time()
    while time.time() < start + 0.003:
        pass


async def test_the_run_a_non_stream_answer_shows_is_the_run_the_store_has(
    settings: Settings,
) -> None:
    # POST .../messages (stream: false) answers {run, message}. Its run's times must be those
    # the store has (GET /api/runs/{id} right after): a client comparing the two, or sorting
    # runs by them, is otherwise told times the store contradicts.
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(tokens=3))
        conv = await env.conversation()
        env.server.services.require_store().faults.before_commit = _slow_commits
        with trio.fail_after(GUARD):
            r = await env.client.post(f"/api/conversations/{conv}/messages",
                                      json={"content": "go"})
            assert r.status_code == 200, r.text
            told = r.json()["run"]
            stored = (await env.client.get(f"/api/runs/{told['id']}")).json()
        assert stored["status"] == told["status"] == "succeeded"
        fields = ("created_at", "started_at", "finished_at")
        assert {k: told[k] for k in fields} == {k: stored[k] for k in fields}
