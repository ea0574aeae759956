"""Review (dec07aa): state that grows without bound over a long-lived process.

Reviewed (code read first): ``service/runs/`` (the supervisor's ``_runs``, ``_starting``,
``_starting_on``, ``_cancel_at_launch``, ``_abandoned`` (capped), the committer's ``_ended``
and ``_final_retries`` (capped at ``_UNSTORED_ENDS_MAX``), ``_pending``; ``Wakeups._runs``
and ``_last`` (cleared at ``_MARKS_MAX``); ``BatchedReads._asks``; ``CallRecords._kept``
(capped)), ``service/api/`` (WebSocket ``_Session.runs``/``forwarding``/``keyed`` (per
socket, swept and dropped with it), ``owned.py`` (a per-request ContextVar list),
idempotency keys (stored rows, nothing in memory)), ``service/metrics.py`` and every
``.labels(`` call (``http_requests``: the route RULE, a method out of a fixed set, the
status; ``tool_calls``: a tool name only if registered, else ``unknown``; ``llm_*``: the
backend's configured name; ``backend_model``: what the configured servers list, not what a
client names; ``store_seconds``: fixed op names), ``service/backends/`` (the fleet's
``_affinity`` is an LRU capped at ``_AFFINITY_MAX``; per-tool limiters keyed by registered
tool names), ``service/connections.py`` (keyed by exception type names).

Measured on the real server (hypercorn on 127.0.0.1:0, default SQLite store) over a scripted
model, by GROWTH between checkpoints after a warm-up and ``gc.collect()``: mixed cycles of
plain runs, SSE streams left after the first token, keyed re-sends, /v1 streams, 404s and
422s (unknown model, bad content type, missing run, unknown path), WebSocket runs (keyed,
and a socket dropped mid-run) and cancel + re-join over SSE. Found sound: every suspect
container is back to 0, the trio task tree, file descriptors and threads do not grow, and no
RunHandle, Task, Nursery, RunEvent or memory channel outlives its run. ``/metrics`` gains no
series from 1,000 client-chosen model names, agent names, paths, methods and header values.

Notes (not defects of ``service/``): ``tests/fakes.py``'s ``ScriptedBackend.streams`` keeps a
record of every stream, and through its request each run's whole ``RunHandle`` (all its
events): a soak over it "leaks" one handle per run; the soak below uses a subclass that drops
each record once its stream closes. ``CancelScope`` objects grow for a while in trio's
``Deadlines`` heap (scopes with long deadlines that ended early); trio prunes it lazily once
it is over twice the active deadlines plus 1,000 entries: bounded.

No DEFECT found on this angle. Runtime about 13 s (the soak is marked slow).
"""

from __future__ import annotations

import collections
import gc
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from service.backends.base import ChatRequest
from service.settings import load_settings

from .fakes import Reply, ScriptedBackend
from .servers import RunningServer, running_server, task_count
from .streams import ws_send, ws_until, ws_url


def _reply(req: ChatRequest) -> Reply:
    if req.messages[-1].content.startswith("slow"):
        return Reply("tick " * 40, gap=0.01)
    return Reply("a b c")


class _Forgetful(ScriptedBackend):
    """The scripted model without its record of every stream (which holds each run)."""

    @asynccontextmanager
    async def stream(self, request: ChatRequest) -> AsyncIterator[Any]:
        async with super().stream(request) as chunks:
            record = self.streams[-1]
            try:
                yield chunks
            finally:
                if record in self.streams:
                    self.streams.remove(record)


WATCHED = ("RunHandle", "Task", "Nursery", "RunEvent", "MemoryChannelState", "_Session",
           "EventReader", "AgentContext", "StreamRecord")


def _snapshot(srv: RunningServer) -> dict[str, int]:
    sup: Any = srv.services.supervisor
    c = sup.committer
    gc.collect()
    counts = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
    snap = {
        "runs": len(sup._runs), "starting": len(sup._starting),
        "starting_on": len(sup._starting_on), "cancel_at_launch": len(sup._cancel_at_launch),
        "abandoned": len(sup._abandoned), "ended": len(c._ended),
        "final_retries": len(c._final_retries), "pending": len(c._pending),
        "wakeup_runs": len(sup.wakeups._runs), "wakeup_marks": len(sup.wakeups._last),
        "read_asks": len(sup.reads._asks), "kept_calls": sup.call_records.kept,
        "tasks": task_count(), "fds": len(os.listdir("/proc/self/fd")),
        "threads": threading.active_count(),
    }
    snap.update({f"obj:{name}": counts[name] for name in WATCHED})
    return snap


async def _cycle(c: httpx.AsyncClient, srv: RunningServer, i: int) -> None:
    conv = (await c.post("/api/conversations", json={})).json()["id"]
    k = i % 8
    if k == 0:
        r = await c.post(f"/api/conversations/{conv}/messages", json={"content": "hi"})
        assert r.status_code == 200, r.text
    elif k == 1:  # an SSE stream left after its first token (the run is cancelled)
        async with c.stream("POST", f"/api/conversations/{conv}/messages",
                            json={"content": "slow", "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("event: token"):
                    break
    elif k == 2:  # a keyed request sent twice
        h = {"Idempotency-Key": f"key-{i}"}
        for _ in range(2):
            r = await c.post(f"/api/conversations/{conv}/messages", json={"content": "hi"},
                             headers=h)
            assert r.status_code == 200, r.text
    elif k == 3:
        r = await c.post("/v1/chat/completions", json={
            "model": "fake-model", "stream": True,
            "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
    elif k == 4:  # a made-up model, refusals: 422 body, 404 run, 404 path
        r = await c.post("/v1/chat/completions", json={
            "model": f"nope-{i}", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code in (200, 404), r.text  # (the scripted model answers any name)
        r = await c.post(f"/api/conversations/{conv}/messages", json={"content": 5})
        assert r.status_code == 422, r.text
        assert (await c.get(f"/api/runs/run_missing{i}")).status_code == 404
        assert (await c.get(f"/no/such/{i}")).status_code == 404
    elif k == 5:  # a keyed WebSocket run, to its end
        async with open_websocket_url(ws_url(srv)) as ws:
            await ws_send(ws, conversation_id=conv, content="hi", idempotency_key=f"w{i}")
            await ws_until(ws)
    elif k == 6:  # a WebSocket dropped mid-run
        async with open_websocket_url(ws_url(srv)) as ws:
            await ws_send(ws, conversation_id=conv, content="slow")
            with trio.fail_after(10):
                await ws.get_message()
    else:  # a cancel of an ended run, and a re-join of its events
        run = (await c.post(f"/api/conversations/{conv}/messages",
                            json={"content": "hi"})).json()["run"]["id"]
        assert (await c.post(f"/api/runs/{run}/cancel")).status_code in (200, 202, 204)
        async with c.stream("GET", f"/api/runs/{run}/events") as s:
            async for _ in s.aiter_lines():
                pass


@pytest.mark.slow
async def test_many_mixed_cycles_come_back_to_the_baseline(tmp_path: Path) -> None:
    """Warm-up of 80 cycles, then checkpoints after 240 and 560 cycles: between them (320
    cycles, about 280 runs) every container is empty again and nothing of a run survives.
    Measured: all containers 0 at both checkpoints, tasks 22 -> 22, fds and threads flat,
    RunHandle/Task/Nursery/RunEvent counts flat (+-a few in-flight)."""
    backend = _Forgetful(_reply)
    async with running_server(load_settings(db=tmp_path / "s.db"), backend) as srv, \
            srv.client() as c:
        i = 0

        async def run(n: int) -> dict[str, int]:
            nonlocal i
            with trio.fail_after(120):
                for _ in range(n):
                    await _cycle(c, srv, i)
                    i += 1
                await trio.sleep(0.5)  # cancelled runs' ends land
            return _snapshot(srv)

        await run(80)
        first = await run(160)
        second = await run(320)
    for name in ("runs", "starting", "starting_on", "cancel_at_launch", "abandoned", "ended",
                 "final_retries", "pending", "wakeup_runs", "wakeup_marks", "read_asks",
                 "kept_calls"):
        assert second[name] == 0, (name, first, second)
    grown = {k: second[k] - first[k] for k in second if second[k] - first[k] > 0}
    allowed = {"tasks": 2, "fds": 2, "threads": 2}
    bad = {k: v for k, v in grown.items() if v > allowed.get(k, 10)}
    assert not bad, (bad, first, second)
    assert second["obj:RunHandle"] <= 3, second
    assert not backend.streams


async def test_client_chosen_values_add_no_metrics_series(tmp_path: Path) -> None:
    """1,000 requests naming made-up models (/v1, and a conversation's ``model``), agents,
    paths, methods and header values (Idempotency-Key, X-Request-ID, Origin-less custom
    headers): ``/metrics`` has the same series after as after one request of each kind
    (measured: no new series but the store's own fixed ops; no label holds a client's text)."""
    async with running_server(load_settings(db=tmp_path / "s.db"), _Forgetful(_reply)) as srv, \
            srv.client() as c:
        conv = (await c.post("/api/conversations", json={})).json()["id"]

        async def round_of(j: int) -> None:
            await c.post("/v1/chat/completions", json={
                "model": f"made-up-{j}", "messages": [{"role": "user", "content": "x"}]})
            await c.post(f"/api/conversations/{conv}/messages",
                         json={"content": "x", "agent": f"agent-{j}"},
                         headers={"Idempotency-Key": f"k{j}", "X-Request-ID": f"r{j}"})
            await c.post(f"/api/conversations/{conv}/messages",
                         json={"content": "x", "model": f"model-{j}"})
            await c.get(f"/made/up/path/{j}", headers={f"X-Made-Up-{j}": "v"})
            await c.request(f"M{j}X", "/api/conversations")

        def series(text: str) -> set[str]:
            return {line.rsplit(" ", 1)[0] for line in text.splitlines()
                    if line and not line.startswith("#")}

        with trio.fail_after(60):
            for j in range(2):
                await round_of(j)
            await c.get("/metrics")
            before = series((await c.get("/metrics")).text)
            for j in range(2, 202):
                await round_of(j)
            after = series((await c.get("/metrics")).text)
    # (The store's own periodic ops, e.g. ``cancel_requests``, appear once with time: fixed
    # names, not a client's.)
    new = {line for line in after - before if not line.startswith("service_store_seconds")}
    assert not new, sorted(new)[:20]
    assert len(after) - len(before) <= 40, sorted(after - before)[:20]
    client = ("made-up", "agent-", "model-", "/made/up", "M5X", "r17", "k17")
    assert not [line for line in after if any(t in line for t in client)]
