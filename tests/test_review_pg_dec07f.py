"""Review of several instances sharing one PostgreSQL (issue 14), 2026-12-07 (f).

Real ``python -m service`` processes on 127.0.0.1, the session's real PostgreSQL 15
(``tests/pg.py``) and the real simulator upstream. What each client was told is compared with
what the store holds afterwards.

An instance "whose clock is off" runs with a ``sitecustomize`` on its ``PYTHONPATH`` that
moves ``time.time`` (the wall clock the service stamps its rows with) back by ``SKEW``
seconds; everything else in it is as usual (its monotonic clock, its lease: that one is in the
database's clock). docs/deploy.md: "in the database's clock, so hosts' clocks need not agree".

Failing (a defect each):

1. ``test_a_new_message_through_an_instance_whose_clock_is_behind_moves_updated_at``: a
   question posted through an instance whose clock is behind the one that wrote the
   conversation's last change is listed, but the conversation's ``updated_at`` does not move
   (docs/api.md: it "moves with each new message ... never backwards"). ``begin_run``
   (service/store/postgres_queries.py, ``UPDATE conversations SET updated_at = %s`` with the
   instance's own ``time.time()``, and the new messages stamped with it) does not do what
   ``changed_at`` (service/store/ownership.py) does for a reply's end.
2. ``test_a_run_closed_by_a_survivor_whose_clock_is_behind_does_not_finish_before_it_started``:
   a dead instance's run closed by a survivor whose clock is behind is stored (and shown by
   ``GET /api/runs/{id}``) as finished before it started: ``recover_interrupted``'s
   ``finished_at`` is the closer's ``time.time()`` (service/store/postgres_ownership.py,
   ``_CLAIM`` / ``now``), never held to the run's own ``started_at``.

Passing (pins of promises of the issue that no other test holds with real processes):

3. every connection of two instances cut at once (``pg_terminate_backend``: the listening
   connections, the pools', the leases') while one follows the other's run: both listeners
   come back (a new ``LISTEN``), the follower's stream has every event once, as stored, and a
   cancel asked through the other instance afterwards still ends the next run ``cancelled``.
4. an owner "on another host" (a PID namespace of its own, so the others judge it by its
   lease) killed with SIGKILL mid-run with three runs: two survivors close each run once
   (one ``run.finished``, one count in ``service_runs_total``), a follower on a survivor gets
   the end with no gap, and every token a client was shown is in the stored reply.
"""

from __future__ import annotations

import os
import signal
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio

from service.bench.procs import children
from service.runs.upkeep import RECOVER_EVERY
from service.sim import Reply, Simulator, open_simulator
from service.store.ownership import LEASE

from .operations.test_instances import GUARD, instance
from .streams import parse_sse
from .test_review_pg_restart import _on_another_host

pytestmark = pytest.mark.slow

SKEW = 120.0  # seconds the skewed instance's wall clock is behind

_SKEWED = f"""
import time as _time
_real_time = _time.time
_time.time = lambda: _real_time() - {SKEW}
"""

Frames = list[dict[str, Any]]


def _skewed_path(tmp_path: Path) -> str:
    """A directory for ``PYTHONPATH`` whose ``sitecustomize`` sets the wall clock back."""
    where = tmp_path / "skewed"
    where.mkdir(exist_ok=True)
    (where / "sitecustomize.py").write_text(_SKEWED)
    return str(where)


async def _collect(http: httpx.AsyncClient, method: str, url: str, into: Frames, *,
                   headers: dict[str, str] | None = None, json: Any = None,
                   until: trio.Event | None = None, tokens: int = 1) -> None:
    """An SSE response's frames into ``into`` as they come; ``until`` is set once ``tokens``
    token frames came. A connection broken (its instance killed) ends it quietly."""
    buf = ""
    try:
        async with http.stream(method, url, headers=headers, json=json) as r:
            async for chunk in r.aiter_text():
                buf += chunk
                if "\n\n" in buf:
                    cut = buf.rfind("\n\n") + 2
                    into.extend(parse_sse(buf[:cut]))
                    buf = buf[cut:]
                if until is not None and sum(f.get("event") == "token" for f in into) >= tokens:
                    until.set()
    except httpx.HTTPError:
        pass


def _numbered(frames: Frames) -> Frames:
    return [f for f in frames if "id" in f]


def _told(frames: Frames) -> list[tuple[int, str, Any]]:
    return [(int(f["id"]), f["event"], f["data"]) for f in _numbered(frames)]


async def _stored(http: httpx.AsyncClient, run_id: str) -> list[tuple[int, str, Any]]:
    with trio.fail_after(GUARD):
        r = await http.get(f"/api/runs/{run_id}/events")
    assert r.status_code == 200, r.text
    return _told(parse_sse(r.text))


def _when(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def _pg(url: str, sql: str, *args: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql, args)  # type: ignore[call-overload]
        return cur.fetchall() if cur.description else []


# -- 1. a new message through an instance whose clock is behind moves no updated_at ---------

async def test_a_new_message_through_an_instance_whose_clock_is_behind_moves_updated_at(
    tmp_path: Path, pg_url: str,
) -> None:
    """docs/api.md: a conversation's ``updated_at`` "moves with each new message and each
    run's end ..., never backwards: a client syncing what changed since a time finds an
    answer that landed after its question"; docs/deploy.md: instances on several hosts behind
    any load balancer, "hosts' clocks need not agree".

    A conversation's first run goes through instance A; a client notes its ``updated_at``.
    The next question goes through instance B, whose clock is 120 s behind A's. While that
    run streams, the conversation lists the new question (and its pending reply), and its
    ``updated_at`` is exactly what it was: a client syncing by ``updated_at`` sees no change
    until the reply ends. (The reply's end does move it: ``changed_at`` holds it past the
    conversation's latest change, the fix of an earlier review; the new message does not.)

    Root cause: ``PostgresQueries.begin_run`` (service/store/postgres_queries.py, the
    ``UPDATE conversations SET updated_at = %s`` with ``now = time.time()`` of the instance
    that writes, and the new messages' ``updated_at`` = that ``now``); SQLite's the same.
    Fix: stamp the conversation and the new messages past its latest change, as
    ``changed_at`` does for a reply's end (``max(now, latest + 0.001)``), or take the time
    from the database (``clock_timestamp()``) on PostgreSQL."""
    sim = Simulator(("sim-model",), default=Reply(tokens=40, interval=0.05),
                    strict_models=False)
    async with (open_simulator(sim) as running,
                instance(pg_url, running.url, tmp_path, "a") as (_, a),
                instance(pg_url, running.url, tmp_path, "b",
                         PYTHONPATH=_skewed_path(tmp_path)) as (_, b)):
        conv = (await a.post("/api/conversations", json={})).json()["id"]
        with trio.fail_after(GUARD):
            r = await a.post(f"/api/conversations/{conv}/messages", json={"content": "one"})
        assert r.status_code == 200, r.text
        synced = (await a.get(f"/api/conversations/{conv}")).json()
        assert synced["messages"][0]["content"] == "one"

        on_b: Frames = []
        streaming = trio.Event()
        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: _collect(
                    b, "POST", f"/api/conversations/{conv}/messages", on_b,
                    json={"content": "two", "stream": True}, until=streaming))
                await streaming.wait()
                now = (await a.get(f"/api/conversations/{conv}")).json()
                listed = (await a.get("/api/conversations")).json()["data"]
        assert [m["content"] for m in now["messages"]][2] == "two"  # the new question, listed
        assert listed[0]["id"] == conv
        assert _when(now["updated_at"]) > _when(synced["updated_at"]), (
            f"a new message is listed but updated_at stayed {now['updated_at']} (a client "
            f"that synced at {synced['updated_at']} sees no change)")
        assert _when(listed[0]["updated_at"]) > _when(synced["updated_at"])


# -- 2. a survivor whose clock is behind closes a run before it started ---------------------

async def test_a_run_closed_by_a_survivor_whose_clock_is_behind_does_not_finish_before_it_started(
    tmp_path: Path, pg_url: str,
) -> None:
    """Instance A runs a run and is killed (SIGKILL); instance B, whose clock is 120 s behind
    A's, closes it (here at once: a cancel asked of B finds the owner dead). The run is
    stored, and ``GET /api/runs/{id}`` answers, with ``finished_at`` two minutes before its
    ``started_at`` (and its ``run.finished`` event stamped before its ``run.started``).

    Root cause: ``PostgresOwnership.recover_interrupted`` (service/store/postgres_ownership.py:
    ``now = time.time()``, written by ``_CLAIM`` as ``finished_at`` and by
    ``ownership.close_interrupted`` as the end's ``created_at``): the closer's own clock,
    never held to the run's. Fix: ``finished_at = GREATEST(%s, started_at, created_at)`` in
    ``_CLAIM`` (SQLite: ``MAX``), or the database's clock on PostgreSQL, as the lease is."""
    sim = Simulator(("sim-model",), default=Reply(tokens=4000, interval=0.02),
                    strict_models=False)
    async with (open_simulator(sim) as running,
                instance(pg_url, running.url, tmp_path, "b",
                         PYTHONPATH=_skewed_path(tmp_path)) as (_, b)):
        on_a: Frames = []
        async with instance(pg_url, running.url, tmp_path, "a") as (proc_a, a):
            conv = (await a.post("/api/conversations", json={})).json()["id"]
            shown = trio.Event()
            with trio.fail_after(GUARD):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(lambda: _collect(
                        a, "POST", f"/api/conversations/{conv}/messages", on_a,
                        json={"content": "go", "stream": True}, until=shown, tokens=5))
                    await shown.wait()
                    proc_a.kill()
        run_id = _numbered(on_a)[0]["data"]["run_id"]
        with trio.fail_after(GUARD):
            r = await b.post(f"/api/runs/{run_id}/cancel")
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "failed"  # closed by B (its owner is gone)
        run = (await b.get(f"/api/runs/{run_id}")).json()
        stored = await _stored(b, run_id)
        shown_text = "".join(d["text"] for _, e, d in _told(on_a) if e == "token")
        reply = (await b.get(f"/api/conversations/{conv}")).json()["messages"][-1]
        assert reply["content"].startswith(shown_text)  # what was shown is kept
        assert [e for _, e, _ in stored].count("run.finished") == 1
        assert _when(run["finished_at"]) >= _when(run["started_at"]), (
            f"the run finished at {run['finished_at']}, before it started at "
            f"{run['started_at']}")


# -- 3. every connection cut: the listeners come back, the follower misses nothing ----------

_SERVICE_BACKENDS = ("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                     "AND application_name = 'service' AND pid <> pg_backend_pid()")
_FRESH_LISTENERS = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name = 'service' AND query LIKE 'LISTEN %%' "
                    "AND backend_start > %s")


async def test_every_connection_cut_mid_stream_the_listeners_come_back_and_nothing_is_missed(
    tmp_path: Path, pg_url: str,
) -> None:
    sim = Simulator(("sim-model",), default=Reply(tokens=200, interval=0.03),
                    strict_models=False)
    async with (open_simulator(sim) as running,
                instance(pg_url, running.url, tmp_path, "a") as (_, a),
                instance(pg_url, running.url, tmp_path, "b") as (_, b)):
        conv = (await a.post("/api/conversations", json={})).json()["id"]
        on_a: Frames = []
        on_b: Frames = []
        started, following = trio.Event(), trio.Event()
        with trio.fail_after(2 * GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: _collect(
                    a, "POST", f"/api/conversations/{conv}/messages", on_a,
                    json={"content": "go", "stream": True}, until=started))
                await started.wait()
                run_id = _numbered(on_a)[0]["data"]["run_id"]
                nursery.start_soon(lambda: _collect(
                    b, "GET", f"/api/runs/{run_id}/events", on_b, until=following, tokens=5))
                await following.wait()
                cut_at = (await trio.to_thread.run_sync(_pg, pg_url, "SELECT now()"))[0][0]
                pids = await trio.to_thread.run_sync(_pg, pg_url, _SERVICE_BACKENDS)
                assert len(pids) >= 4  # two listeners and two leases at least
                for (pid,) in pids:
                    await trio.to_thread.run_sync(
                        _pg, pg_url, "SELECT pg_terminate_backend(%s)", pid)
                # Each process listens again (one LISTEN each, on a new connection).
                while (await trio.to_thread.run_sync(  # noqa: ASYNC110 (polls the server)
                        _pg, pg_url, _FRESH_LISTENERS, cut_at))[0][0] < 2:
                    await trio.sleep(0.1)
        told_a, told_b = _told(on_a), _told(on_b)
        assert told_a[-1][1] == "run.finished"
        assert told_a[-1][2]["status"] == "succeeded"
        assert [n for n, _, _ in told_b] == list(range(1, len(told_b) + 1))  # no gap, no dup
        stored = await _stored(b, run_id)
        assert told_b == stored == told_a

        # Wake-ups across the instances still work: a cancel through B of A's next run.
        on_a2: Frames = []
        shown = trio.Event()
        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: _collect(
                    a, "POST", f"/api/conversations/{conv}/messages", on_a2,
                    json={"content": "again", "stream": True}, until=shown, tokens=3))
                await shown.wait()
                run2 = _numbered(on_a2)[0]["data"]["run_id"]
                r = await b.post(f"/api/runs/{run2}/cancel")
                assert r.status_code == 202, r.text
        assert _told(on_a2)[-1][1] == "run.finished"
        assert _told(on_a2)[-1][2]["status"] == "cancelled"
        assert await _stored(a, run2) == _told(on_a2)


# -- 4. an owner on another host killed: two survivors close each run once ------------------

async def test_an_owner_killed_on_another_host_is_closed_once_by_two_survivors(
    tmp_path: Path, pg_url: str,
) -> None:
    sim = Simulator(("sim-model",), default=Reply(tokens=100_000, interval=0.02),
                    strict_models=False)
    async with (open_simulator(sim) as running,
                instance(pg_url, running.url, tmp_path, "b") as (_, b),
                instance(pg_url, running.url, tmp_path, "c") as (_, c)):
        clients: list[Frames] = [[], [], []]
        follower: Frames = []
        async with _on_another_host(pg_url, running.url, tmp_path) as (proc_a, a):
            shown = [trio.Event() for _ in clients]
            following = trio.Event()
            with trio.fail_after(2 * (LEASE + RECOVER_EVERY) + GUARD):
                async with trio.open_nursery() as nursery:
                    for frames, event in zip(clients, shown, strict=True):
                        conv = (await a.post("/api/conversations", json={})).json()["id"]
                        nursery.start_soon(lambda conv=conv, frames=frames, event=event: _collect(
                            a, "POST", f"/api/conversations/{conv}/messages", frames,
                            json={"content": "go", "stream": True, "on_disconnect": "continue"},
                            until=event, tokens=10))
                    for event in shown:
                        await event.wait()
                    first = _numbered(clients[0])[0]["data"]["run_id"]
                    nursery.start_soon(lambda: _collect(
                        b, "GET", f"/api/runs/{first}/events", follower, until=following))
                    await following.wait()
                    for pid in children(proc_a.pid):  # the service itself, not unshare
                        os.kill(pid, signal.SIGKILL)
                    # The follower on B gets the run's end once a survivor closed it (its
                    # owner's lease lapsed: it is "on another host").
                    while not any(f.get("event") == "run.finished"  # noqa: ASYNC110
                                  for f in follower):
                        await trio.sleep(0.2)
                    nursery.cancel_scope.cancel()
        for frames in clients:
            run_id = _numbered(frames)[0]["data"]["run_id"]
            with trio.fail_after(2 * (LEASE + RECOVER_EVERY)):
                while (await b.get(f"/api/runs/{run_id}")).json()["status"] == "running":  # noqa: ASYNC110
                    await trio.sleep(0.2)
            told = _told(frames)
            for http in (b, c):
                stored = await _stored(http, run_id)
                assert [e for _, e, _ in stored].count("run.finished") == 1
                assert stored[-1][1] == "run.finished"
                assert stored[-1][2]["status"] == "failed"
                assert stored[: len(told)] == told  # what A's client was shown is stored
            conv_id = told[0][2]["conversation_id"]
            reply = (await b.get(f"/api/conversations/{conv_id}")).json()["messages"][-1]
            text = "".join(d["text"] for _, e, d in told if e == "token")
            assert reply["content"].startswith(text)
        told_b = _told(follower)
        assert [n for n, _, _ in told_b] == list(range(1, len(told_b) + 1))
        assert told_b == await _stored(b, told_b[0][2]["run_id"])
        failed = 0.0
        for http in (b, c):
            for line in (await http.get("/metrics")).text.splitlines():
                if line.startswith('service_runs_total{status="failed"}'):
                    failed += float(line.split()[-1])
        assert failed == len(clients)  # each closed once, by one of the two
