"""A review of PostgreSQL going away and coming back while runs stream, across instances (second
pass, 2026-12-05): what an instance's clients are told against what the store holds when the
database is restarted, stops answering or refuses a batch, and when another instance follows
or re-joins the run. Each test fails on the code it was written against.

Real service processes (``python -m service``, tests/servers.py ``start_service``) on the
session's real PostgreSQL, with the real simulator upstream. PostgreSQL only: a trigger made in
the test's database makes the moment of a slow or refused write deterministic (the trigger
stands for a slow disk, a lock, a server that refuses a write; the service's code paths are the
real ones). An instance "on another host" runs in a PID namespace of its own (``unshare``), so
that the others judge it by its lease, as they judge an instance on another machine.

Probes that held (no test kept): a restart of 4-6.5 s mid-stream (tokens told before vs stored
after; a follower on another instance; a re-join with Last-Event-ID on another instance right
after it); a restart while a run's final write is in its transaction; a batch cut by
statement_timeout once; a restart of 13 s (the runs are stopped ``store_unavailable`` as the
lease runs out, told as stored).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio

from service.sim import Reply, Simulator, open_simulator

from .operations.test_cross_instance_faults import _pg, _stream
from .operations.test_instances import GUARD, instance
from .servers import ROOT
from .streams import parse_sse

pytestmark = pytest.mark.slow

# The first token event written after the flag is set: its statement takes longer than the
# instance's statement_timeout (SERVICE_DB_TIMEOUT=24 below: cut at 24 s; the run ends about 5 s
# into it, and its final state is given 15 s, FINAL_WRITE_BUDGET); written again, that event is
# refused while the flag stays (a server that keeps refusing that batch: another timeout, a lost
# connection). Every other event (the run's later tokens, its message, its run.finished) is
# taken as usual. (Sequences are not transactional: the event's seq outlives the rollback.)
_ONE_TOKEN_HELD = """
CREATE TABLE review_hold (on_ boolean);
CREATE SEQUENCE review_hold_once;
CREATE SEQUENCE review_hold_seq MINVALUE 0 START 0;
CREATE FUNCTION review_hold_token() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.type = 'token' AND EXISTS (SELECT 1 FROM review_hold) THEN
    IF nextval('review_hold_once') = 1 THEN
      PERFORM setval('review_hold_seq', NEW.seq);
      PERFORM pg_sleep(60);
    END IF;
    IF NEW.seq = (SELECT last_value FROM review_hold_seq) THEN
      RAISE EXCEPTION 'review: token % refused for now', NEW.seq;
    END IF;
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER review_hold_token BEFORE INSERT ON run_events
  FOR EACH ROW EXECUTE FUNCTION review_hold_token();
"""


def _frames(text: str) -> list[tuple[int, str]]:
    return [(int(f["id"]), f["event"]) for f in parse_sse(text) if "id" in f]


async def _stored_types(url: str, run_id: str) -> list[tuple[int, str]]:
    return [(int(s), t) for s, t in await trio.to_thread.run_sync(
        _pg, url, "SELECT seq, type FROM run_events WHERE run_id = %s ORDER BY seq", run_id)]


async def test_a_final_state_retried_after_its_budget_lands_before_the_runs_held_tokens(
    tmp_path: Path, pg_url: str,
) -> None:
    """A run on instance A ends while the batch holding its last tokens is in flight and
    slow (a statement the server takes 24 s over, cut by statement_timeout): the run's final
    state waits for that batch (``EventCommitter._with_earlier``: "a batch of them in flight
    is decided first ... and those held go in the final state's transaction. Else a refused
    batch would land after the run's end, and ... a reader on another instance takes a
    finished run's stored events for all there are"). The wait outlasts FINAL_WRITE_BUDGET
    (15 s): the final state is put aside for ``retry_final_writes`` *without* the held
    event, and written on its own at the next upkeep tick (it lands), while the refused batch
    is being written again (refused once more: a flapping server refuses one write and takes
    the next; here a trigger makes it so).

    Told vs stored: the store holds the run's ``message`` and ``run.finished`` (succeeded)
    with a hole (token 5) before them. A client re-joining on instance B then is told
    the whole run (up to ``run.finished``, ids jumping over the hole) without those tokens;
    once the batch lands, the store has them before the end: that client was told a stream
    the store contradicts, and it cannot get them back (a re-join after ``run.finished`` is
    a 204).

    Root cause: service/runs/committer.py:218-219 and 230-231: ``finish`` cuts
    ``_with_earlier`` with the final write's budget and keeps the final state as it was
    (without the run's events still in ``_pending``); ``retry_final_writes``
    (committer.py:322-340) writes it as is, never taking the run's held events first, so
    the end can land ahead of them. Fix: take the run's held events in
    ``retry_final_writes`` too (``take(run_id)`` after the in-flight batch is decided, as
    ``_with_earlier`` does, and write them in the final state's transaction); or never
    write a final state while events of its run are in ``_pending`` or in flight."""
    sim = Simulator(("sim-model",), default=Reply(tokens=12, interval=0.05),
                    strict_models=False)
    async with (open_simulator(sim) as running,
                instance(pg_url, running.url, tmp_path, "b") as (_, b),
                instance(pg_url, running.url, tmp_path, "a",
                         SERVICE_DB_TIMEOUT="24") as (_, a)):
        await trio.to_thread.run_sync(_pg, pg_url, _ONE_TOKEN_HELD)
        on_a: list[dict[str, Any]] = []
        shown = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stream, a, on_a, 3, shown)
            with trio.fail_after(GUARD):
                await shown.wait()
            await trio.to_thread.run_sync(_pg, pg_url, "INSERT INTO review_hold VALUES (true)")
            run_id = on_a[0]["data"]["run_id"]
            # (another process's commits: polled) Past the final state's budget (15 s) and
            # its first retries: the store must never hold the run's end with a hole before
            # it (before the fix: the end landed at once, the held token missing).
            holes: list[list[tuple[int, str]]] = []
            with trio.move_on_after(40):  # the budget, then a few upkeep ticks of retries
                while True:
                    stored = await _stored_types(pg_url, run_id)
                    if any(t == "run.finished" for _, t in stored):
                        if [n for n, _ in stored] != list(range(1, len(stored) + 1)):
                            holes.append(stored)
                        break
                    await trio.sleep(0.2)
            # The held tokens are taken again: they land (with the end, if it is still held).
            await trio.to_thread.run_sync(_pg, pg_url, "DELETE FROM review_hold")
            with trio.fail_after(2 * GUARD):
                while len(await _stored_types(pg_url, run_id)) < 15:  # noqa: ASYNC110
                    await trio.sleep(0.2)
            # A client re-joins the finished run on B.
            with trio.fail_after(GUARD):
                rejoin = await b.get(f"/api/runs/{run_id}/events")
            nursery.cancel_scope.cancel()
        stored = await _stored_types(pg_url, run_id)
    assert not holes, f"the store held the run's end with a hole before it: {holes[0]}"
    told = _frames(rejoin.text)
    assert stored == [(1, "run.started"), *((n, "token") for n in range(2, 14)),
                      (14, "message"), (15, "run.finished")], stored
    assert told[-1] == (15, "run.finished"), told
    assert told == stored, (
        f"the client re-joining on B was told {told} (ending with run.finished); the "
        f"store holds {stored}")


# -- 2. a live owner "on another host" whose lease renewal waits behind a slow write ---------


@asynccontextmanager
async def _on_another_host(url: str, sim_url: str, cwd: Path, **env: str,
                           ) -> AsyncIterator[tuple[trio.Process, httpx.AsyncClient]]:
    """``python -m service`` in a PID namespace of its own (``unshare --pid``): to the other
    instances it is "elsewhere" (ownership.owner_alive: another host or container), alive
    while its lease is, as an instance on another machine sharing the database."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to give the instance a PID namespace")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    environ.update({"SERVICE_DB": url, "SERVICE_BACKEND": "llamacpp",
                    "SERVICE_LLAMACPP_URL": sim_url, "SERVICE_SHUTDOWN_DRAIN": "1", **env})
    log = cwd / "elsewhere.log"
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        proc = await trio.lowlevel.open_process(
            ["unshare", "--pid", "--fork", "--kill-child=SIGTERM", sys.executable, "-m",
             "service", "--bind", "127.0.0.1:0", "--config", str(ROOT / "hypercorn.toml")],
            cwd=cwd, env=environ, stderr=out)
    finally:
        os.close(out)
    try:
        with trio.fail_after(GUARD):
            while not (m := re.search(rb"Running on (http://127\.0\.0\.1:\d+)",
                                      await trio.Path(log).read_bytes())):
                assert proc.returncode is None, log.read_text()
                await trio.sleep(0.05)
        async with httpx.AsyncClient(base_url=m.group(1).decode(), timeout=GUARD) as http:
            yield proc, http
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)  # its child gets SIGTERM (--kill-child)
        with trio.move_on_after(GUARD, shield=True):
            await proc.wait()


def _hold_lock(url: str, table: str, release: threading.Event, held: threading.Event) -> None:
    """A transaction that holds ``table`` in SHARE mode until ``release``, as an operator's
    ``CREATE INDEX`` (not CONCURRENTLY) does while it builds: writes to the table wait;
    reads, and the foreign-key checks of other tables' writes, go on."""
    with psycopg.connect(url) as conn:
        conn.execute(f"LOCK TABLE {table} IN SHARE MODE")  # type: ignore[arg-type]
        held.set()
        release.wait(2 * GUARD)
        conn.rollback()


async def test_a_slow_unrelated_write_does_not_let_a_live_owners_lease_lapse(
    tmp_path: Path, pg_url: str,
) -> None:
    """Instance A ("another host": a PID namespace of its own, so B judges it by its lease)
    serves a run whose model is thinking (3 tokens shown, then a silent upstream). A client of
    A creates a conversation while an operator builds an index on that table (``CREATE
    INDEX``, not CONCURRENTLY: writes to it wait; a slow disk alike), 27 s: the INSERT
    waits, within statement_timeout (SERVICE_DB_TIMEOUT, 30 s by default). A's writes go
    through one group-commit queue, one batch at a time: its lease renewals (every 5 s) wait
    behind that batch, neither failing (the lease loop stops its runs only on a *failed*
    renewal past half a lease) nor landing.
    A's lease runs out in the database although A is alive, answering and streaming; B's
    recovery takes A for dead and closes A's run.

    Told vs stored / loss: the run A serves, healthy, is stored ``failed`` ("interrupted:
    the service stopped before the run finished", which it did not); once the write is
    through, A finds the run closed (``_stop_runs_taken_over``) and tells its client that
    end: a live run killed, its answer lost, because an unrelated write was slow.

    The defect (failing before the fix): ``renew_lease`` was a ``_write``, queued in the
    group commit behind whatever batch held the lock, for up to statement_timeout (30 s) or
    the stall bound (35 s), both longer than LEASE (15 s); ``lease_loop`` only acts on a
    renewal that fails. Fixed: the lease is written on a connection of its own, outside the
    write queue and the pool, bounded to a third of a lease (``PostgresStore._lease_write``),
    so a renewal either lands or fails while the lease still runs."""
    sim = Simulator(("sim-model",), default=Reply(tokens=50, interval=0.05, hang_after=3),
                    strict_models=False)
    release, held = threading.Event(), threading.Event()
    async with (open_simulator(sim) as running,
                instance(pg_url, running.url, tmp_path, "b")):
        before = {r[0] for r in await trio.to_thread.run_sync(
            _pg, pg_url, "SELECT id FROM instances")}
        async with _on_another_host(pg_url, running.url, tmp_path,
                                    SERVICE_LLM_IDLE_TIMEOUT="600") as (_, a):
            (a_id,) = {r[0] for r in await trio.to_thread.run_sync(
                _pg, pg_url, "SELECT id FROM instances")} - before
            on_a: list[dict[str, Any]] = []
            shown = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stream, a, on_a, 3, shown)
                with trio.fail_after(GUARD):
                    await shown.wait()
                run_id = on_a[0]["data"]["run_id"]
                nursery.start_soon(trio.to_thread.run_sync, _hold_lock, pg_url,
                                   "conversations", release, held)
                try:
                    await trio.to_thread.run_sync(held.wait, GUARD)
                    nursery.start_soon(partial(a.post, "/api/conversations", json={}))  # waits
                    # 27 s of an index build (within statement_timeout), polled once a second.
                    lapsed = stored = None
                    for _ in range(27):
                        await trio.sleep(1)
                        ((lapsed,),) = await trio.to_thread.run_sync(
                            _pg, pg_url, "SELECT lease_until < extract(epoch FROM "
                            "clock_timestamp()) FROM instances WHERE id = %s", a_id)
                        ((stored,),) = await trio.to_thread.run_sync(
                            _pg, pg_url, "SELECT status FROM runs WHERE id = %s", run_id)
                        if stored != "running":
                            break
                finally:
                    release.set()
                with trio.fail_after(GUARD):  # A's own client, once A's write is through
                    while not on_a or on_a[-1]["event"] != "run.finished":  # noqa: ASYNC110
                        if stored == "running":
                            break
                        await trio.sleep(0.1)
                nursery.cancel_scope.cancel()
    told = on_a[-1]["data"] if on_a[-1]["event"] == "run.finished" else None
    assert (lapsed, stored, told) == (False, "running", None), (
        f"A was alive and serving the run; its lease lapsed={lapsed} (its renewals queued "
        f"behind one slow write), the store says the run is {stored!r} and A's client was "
        f"told {told}")
