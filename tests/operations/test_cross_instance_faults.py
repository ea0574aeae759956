"""Review: what clients of one instance are told about runs another instance owns or closed,
against what the store holds. Real service processes on a real PostgreSQL, real signals.
Each test failed on the tree it was written against."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio

from service.sim import Reply, Simulator, open_simulator

from ..pg import PostgresServer, pg_url, postgres  # noqa: F401 (fixtures)
from ..streams import parse_sse
from .test_instances import GUARD, instance

# -- helpers ----------------------------------------------------------------------------------


async def _stream(http: httpx.AsyncClient, into: list[dict[str, Any]], shown: int,
                  ready: trio.Event) -> None:
    """A native run streamed on ``http`` (on_disconnect: continue); every whole frame goes into
    ``into`` as it comes; ``ready`` once ``shown`` tokens came. Ends with the stream."""
    conv = (await http.post("/api/conversations", json={})).json()["id"]
    buf = ""
    try:
        async with http.stream("POST", f"/api/conversations/{conv}/messages",
                               json={"content": "go", "stream": True,
                                     "on_disconnect": "continue"}) as r:
            async for chunk in r.aiter_text():
                buf += chunk
                if "\n\n" in buf:
                    whole, buf = buf[: buf.rfind("\n\n") + 2], buf[buf.rfind("\n\n") + 2:]
                    into.extend(f for f in parse_sse(whole) if "id" in f)
                if sum(f["event"] == "token" for f in into) >= shown:
                    ready.set()
    except httpx.HTTPError:
        pass


def _pg(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql, args or None)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


async def _pg_lease_lapsed(url: str, pid: int) -> None:
    """Until the lease of the instance with ``pid`` has run out, in the database's clock."""
    sql = ("SELECT bool_and(lease_until < extract(epoch FROM clock_timestamp())) "
           "FROM instances WHERE pid = %s")
    with trio.fail_after(GUARD):
        while not (await trio.to_thread.run_sync(_pg, url, sql, pid))[0][0]:  # noqa: ASYNC110
            await trio.sleep(0.25)


async def _status(http: httpx.AsyncClient, run_id: str) -> str:
    return str((await http.get(f"/api/runs/{run_id}")).json()["status"])


# -- PostgreSQL: an owner stalled past its lease --------------------------------------------


@pytest.mark.slow
async def test_a_stalled_owner_still_says_running_after_another_instance_closed_its_run(
    tmp_path: Path, pg_url: str,  # noqa: F811 (fixture)
) -> None:
    # A is stopped (SIGSTOP) past its lease while its run waits for the model; B closes the
    # run (failed, "interrupted") and announces it. A is continued. The store, and B, say
    # "failed"; A goes on telling its clients "running" (GET /api/runs/{id} answers from its
    # live handle), a re-join on A follows that handle and never ends, and A's own streaming
    # client is never told the end - until A's run next writes something (here: never, the
    # model is silent), however long that is. A hears B's notification for the run, but it
    # only wakes readers; nothing looks at whether A still holds its live runs.
    sim = Simulator(("sim-model",), default=Reply(tokens=50, interval=0.05, hang_after=3),
                    strict_models=False)
    async with (open_simulator(sim) as running,
                instance(pg_url, running.url, tmp_path, "b") as (_, b),
                instance(pg_url, running.url, tmp_path, "a",
                         SERVICE_LLM_IDLE_TIMEOUT="600") as (proc_a, a)):
        on_a: list[dict[str, Any]] = []
        ready = trio.Event()
        observed: dict[str, Any] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stream, a, on_a, 3, ready)
            with trio.fail_after(GUARD):
                await ready.wait()
            run_id = on_a[0]["data"]["run_id"]
            os.kill(proc_a.pid, signal.SIGSTOP)
            try:
                await _pg_lease_lapsed(pg_url, proc_a.pid)
                with trio.fail_after(GUARD):
                    r = await b.post(f"/api/runs/{run_id}/cancel")  # A is dead: B closes it
                observed["cancel on B"] = (r.status_code, r.json()["status"])
            finally:
                os.kill(proc_a.pid, signal.SIGCONT)
            stored = (await trio.to_thread.run_sync(
                _pg, pg_url, "SELECT status FROM runs WHERE id = %s", run_id))[0][0]
            observed["stored"] = stored
            # A is running again: give it ample time to learn what the store says.
            with trio.move_on_after(10):
                while await _status(a, run_id) == "running":  # noqa: ASYNC110 (another process)
                    await trio.sleep(0.2)
            observed["GET /api/runs on A"] = await _status(a, run_id)
            observed["GET /api/runs on B"] = await _status(b, run_id)
            rejoin: list[str] = []
            with trio.move_on_after(5):
                async with a.stream("GET", f"/api/runs/{run_id}/events?after=3") as resp:
                    async for chunk in resp.aiter_text():
                        rejoin.append(chunk)
            frames = [f for f in parse_sse("".join(rejoin)) if "id" in f]
            observed["re-join on A ends"] = bool(frames) and frames[-1]["event"] == "run.finished"
            observed["A's client got the end"] = any(f["event"] == "run.finished" for f in on_a)
            nursery.cancel_scope.cancel()
    assert observed == {
        "cancel on B": (202, "failed"),
        "stored": "failed",
        "GET /api/runs on A": "failed",
        "GET /api/runs on B": "failed",
        "re-join on A ends": True,
        "A's client got the end": True,
    }


_SLOW_TOKEN = """
CREATE FUNCTION review_slow_token() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.type = 'token' AND NEW.seq = 8 THEN PERFORM pg_sleep(3); END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER review_slow_token BEFORE INSERT ON run_events
  FOR EACH ROW EXECUTE FUNCTION review_slow_token();
"""
_IN_SLOW_BATCH = ("SELECT pid FROM pg_stat_activity WHERE wait_event = 'PgSleep' "
                  "AND query LIKE '%INSERT INTO run_events%'")


@pytest.mark.slow
async def test_an_owner_stalled_inside_its_event_batch_cannot_be_closed_by_a_survivor(
    tmp_path: Path, pg_url: str,  # noqa: F811 (fixture)
) -> None:
    # An owner that stalls (SIGSTOP here; a paused VM, a partition alike) while its event
    # batch's transaction is open keeps that transaction open on the server for ever: its
    # FOR SHARE lock on the run's row (and its uncommitted events) with it. Past its lease,
    # B's recovery UPDATE of the run waits on that lock until statement_timeout, fails, and
    # tries again 5 s later, for as long as A is stopped: the run is never closed "within
    # lease + 5 s", a client re-joining on B gets a store_unavailable error frame instead of
    # the end, and meanwhile B's whole write queue (its own runs' events, its lease) waits
    # behind each blocked recovery batch. The service sets no
    # idle_in_transaction_session_timeout, and recovery takes the lock without a lock_timeout.
    # The trigger only makes the moment of the stall deterministic (batch with token 8 takes
    # 3 s on the server, and A is stopped during it).
    sim = Simulator(("sim-model",), default=Reply(tokens=400, interval=0.05),
                    strict_models=False)
    async with (open_simulator(sim) as running,
                instance(pg_url, running.url, tmp_path, "b", SERVICE_DB_TIMEOUT="10") as (_, b),
                instance(pg_url, running.url, tmp_path, "a") as (proc_a, a)):
        await trio.to_thread.run_sync(_pg, pg_url, _SLOW_TOKEN)
        on_a: list[dict[str, Any]] = []
        ready = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stream, a, on_a, 1, ready)
            with trio.fail_after(GUARD):
                await ready.wait()
                while not await trio.to_thread.run_sync(_pg, pg_url, _IN_SLOW_BATCH):  # noqa: ASYNC110
                    await trio.sleep(0.05)
            os.kill(proc_a.pid, signal.SIGSTOP)  # inside the batch's transaction
            try:
                run_id = on_a[0]["data"]["run_id"]
                await _pg_lease_lapsed(pg_url, proc_a.pid)
                # A is dead to B now: a re-join on B should close the run and end with it.
                with trio.fail_after(2 * GUARD):
                    r = await b.get(f"/api/runs/{run_id}/events", params={"after": 1})
                frames = parse_sse(r.text)
                status_on_b = await _status(b, run_id)
            finally:
                os.kill(proc_a.pid, signal.SIGCONT)
            nursery.cancel_scope.cancel()
    ends = [(f["event"], f["data"].get("status") or f["data"].get("type")) for f in frames
            if f.get("event") in ("run.finished", "error")]
    assert (ends, status_on_b) == ([("run.finished", "failed")], "failed")
