"""A review of the day's fixes (f299950..e1d77e2): defects they introduced or left, each shown
by a test that failed before its fix: an upstream call of a run never stored is still recorded
(tied to no run), /readyz names the backend down when its health check raises, and a 422 names
the field that gave the position.

Real servers on 127.0.0.1 (the app under hypercorn on port 0), with the real simulator
upstream the lifespan builds from the settings (tests/e2e.py) or the in-memory scripted
backend (tests/fakes.py); every test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from service.backends.base import BackendHealth
from service.errors import BackendUnavailable
from service.settings import Settings
from service.sim import Reply as SimReply
from service.store.faults import InjectedFault

from .e2e import e2e
from .fakes import ScriptedBackend
from .servers import running_server
from .streams import parse_sse

pytestmark = pytest.mark.both_stores

GUARD = 30  # seconds any wait may take before the test fails
MSG = [{"role": "user", "content": "hi"}]


async def test_an_upstream_call_of_a_v1_run_the_store_refused_is_still_recorded(
    settings: Settings,
) -> None:
    """``POST /v1/chat/completions``: the agent's upstream request goes out while the run's
    first write is queued (``RunSupervisor._start_new``). The store refuses that write once (a
    passing fault: "disk I/O error"); the client is told 503 ``store_unavailable`` and the run
    is stopped, its upstream call cancelled. The call happened (the model server did the
    work), and ``_start_new`` says so: "The interceptor's record of an upstream call it made is
    kept: that call happened". ``/metrics`` counts it (``service_llm_calls_total``).

    Wrong: ``GET /api/llm-calls`` lists nothing. The record is written once the store takes
    writes again, and ``record_llm_call`` (since e1d77e2) drops every record whose run row is
    not in the store, taking "never stored" for "deleted". (Before e1d77e2 the call was listed.)

    Right: the call is listed (outcome ``cancelled``), as /metrics counts it, tied to no run
    (none was stored).

    Root cause: service/store/sqlite_queries.py and postgres_queries.py ``record_llm_call``:
    "no run row" is read as "its conversation was deleted"."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(SimReply(text="a slow answer", first_delay=5.0))
        store: Any = env.server.services.require_store()
        refused: list[bool] = []

        def refuse_once() -> None:
            if not refused:
                refused.append(True)
                raise InjectedFault("disk I/O error")

        answer: dict[str, Any] = {}

        async def ask() -> None:
            answer["r"] = await env.client.post("/v1/chat/completions",
                                                json={"messages": MSG})

        with trio.fail_after(GUARD):
            await store.faults.hold_writes()  # the run's first write waits in the queue...
            held = True
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(ask)
                    (upstream,) = await env.sim.wait_streams(1)  # ...its call has gone out
                    store.faults.before_commit = refuse_once
                    store.faults.release_writes()
                    held = False
            finally:
                if held:
                    store.faults.release_writes()
            await upstream.closed.wait()
            calls: list[dict[str, Any]] = []
            with trio.move_on_after(3):  # its record is written once the store takes it
                while not calls:
                    await trio.sleep(0.1)
                    calls = (await env.client.get("/api/llm-calls")).json()["data"]
            metrics = (await env.client.get("/metrics")).text
        r = answer["r"]
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "store_unavailable", r.text
    assert refused == [True]
    counted = [line for line in metrics.splitlines()
               if line.startswith("service_llm_calls_total{")]
    assert any('outcome="cancelled"' in line and line.endswith(" 1.0") for line in counted), \
        counted
    assert [c["outcome"] for c in calls] == ["cancelled"], (
        f"/metrics counts the call ({counted}), GET /api/llm-calls lists {calls}")
    assert calls[0]["run_id"] is None  # tied to no run: none was stored


class _CrashingHealth(ScriptedBackend):
    async def health(self) -> BackendHealth:
        await trio.sleep(0.01)
        raise RuntimeError("health probe crashed")


class _RefusingHealth(ScriptedBackend):
    async def health(self) -> BackendHealth:
        await trio.sleep(0.01)
        raise BackendUnavailable("connection refused", backend="fake")


@pytest.mark.parametrize("backend", [_CrashingHealth, _RefusingHealth])
async def test_readyz_names_the_backend_down_when_its_health_check_raises(
    settings: Settings, backend: type[ScriptedBackend],
) -> None:
    """The backend's ``health()`` raises (a bug in an adapter, or a ``ServiceError`` such as
    ``BackendUnavailable`` from a pluggable backend) while the store is fine.

    Wrong: the exception leaves ``/readyz``'s nursery and the request: a 500
    ``internal_error`` (for a RuntimeError), or the backend's own error body (503
    ``backend_unavailable``, no ``checks``, no ``down``). Neither names what is down, and the
    store's answer is lost (its check is cancelled with the nursery).

    Right (API.md): "503 naming what is down": ``{"status": "not ready", "checks": {"store":
    "ok", "backend": "down: ..."}, "down": ["backend"]}``.

    Root cause: service/api/ops.py ``readyz.backend_check`` catches nothing from
    ``svc.backend.health()`` (the store's check catches ``ServiceError``)."""
    async with running_server(settings, backend()) as srv, srv.client() as c:
        with trio.fail_after(GUARD):
            r = await c.get("/readyz")
    assert r.status_code == 503, r.text
    body = r.json()
    assert body.get("down") == ["backend"], body
    assert body["checks"]["store"] == "ok", body
    assert body["checks"]["backend"].startswith("down"), body


async def test_a_past_after_on_a_finished_run_names_the_after_field(
    settings: Settings,
) -> None:
    """A finished run re-joined with ``?after=`` past its last event, by a client that also
    sends a ``Last-Event-ID`` it did see (an EventSource opened on ``...?after=N``, or a
    client resuming with both; "the later of the two" wins).

    Wrong: 422 with ``"field": "Last-Event-ID"``, naming the header whose value (an event of
    the run) is fine, not the query parameter that is past the end.

    Right (API.md: 422 "naming the field"): ``"field": "after"``.

    Root cause: service/api/runs.py ``run_events``: the field is ``"Last-Event-ID" if header
    else "after"``, whichever of the two gave ``after``."""
    async with running_server(settings, ScriptedBackend()) as srv, srv.client() as client:
        with trio.fail_after(GUARD):
            conv = (await client.post("/api/conversations", json={})).json()["id"]
            r = await client.post(f"/api/conversations/{conv}/messages", json={"content": "hi"})
            run_id = r.json()["run"]["id"]
            async with client.stream("GET", f"/api/runs/{run_id}/events") as resp:
                frames = parse_sse((await resp.aread()).decode())
            assert frames[-1]["event"] == "run.finished"
            last = int(frames[-1]["id"])
            r = await client.get(f"/api/runs/{run_id}/events", params={"after": last + 50},
                                 headers={"Last-Event-ID": "1"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "after", r.text
