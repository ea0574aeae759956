"""Review of dd311a5 (the lease loop's renewals every third of a lease counted from sends, the
watchdog's two thirds, ``Lease.lapsing`` and ``/readyz``), with 237da12 and 36d2482 for context.
A real PostgreSQL (``pg_url``); the locks are real transactions of other connections; real time
(the store's lease writes run in threads)."""

from __future__ import annotations

import threading
from functools import partial

import psycopg
import trio

from service.runs.handle import RunHandle
from service.runs.upkeep import Lease, lease_loop
from service.settings import load_settings
from service.store import open_store
from service.store.ownership import LEASE

from .fakes import Reply, ScriptedBackend
from .servers import running_server
from .store.test_pg_lease import _lease_left

GUARD = 40  # seconds any wait may take before the test fails (a lease is 15 s)


def _handle(run_id: str) -> RunHandle:
    return RunHandle(run_id=run_id, conversation_id="conv", agent="a", model=None,
                     owner=None, message_id="msg", sink=lambda event: None)


def _hold_lease_row(url: str, process_id: str, held: threading.Event,
                    release: threading.Event) -> None:
    """Another transaction holds this instance's lease row (FOR UPDATE) until ``release``: a
    renewal (INSERT ... ON CONFLICT DO UPDATE) waits on it; plain reads do not."""
    with psycopg.connect(url) as conn:
        conn.execute("SELECT 1 FROM instances WHERE id = %s FOR UPDATE", (process_id,))
        held.set()
        release.wait(2 * GUARD)
        conn.rollback()


def _cancel_waiting_renewal(url: str) -> int:
    """Cancel the statement waiting on the lease row's lock (the renewal, on the lease's own
    connection): it fails at once with QueryCanceled, as any error of the server would."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND wait_event_type = 'Lock' AND query ILIKE '%%instances%%'").fetchall()
    return len(rows)


def _backdate_lease(url: str, process_id: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE instances SET lease_until = extract(epoch FROM clock_timestamp()) - 1 "
                     "WHERE id = %s", (process_id,))


async def test_a_failed_renewal_stops_every_run_while_readyz_says_ready(pg_url: str) -> None:
    """Defect: on PostgreSQL a renewal that fails more than half a lease after the last landed
    one was sent stops every run at once, through the loop's failure branch, bypassing the
    watchdog: ``Lease.lapsing`` is not set there, so ``/readyz`` answers 200 "ready" while
    the instance has just stopped all its runs (for up to LEASE/6 = 2.5 s, until the
    watchdog's own deadline sets it), which is what dd311a5 claims to have fixed ("it said
    ready while every run was being stopped"). The stop also breaks the rule dd311a5
    documents for PostgreSQL (docs/deploy.md, docs/operations.md: runs stop "once no renewal
    sent in the last 10 s has landed"): here one sent ~8 s before has landed and the
    database's lease still has ~7 s to run.

    Consequence: a load balancer keeps routing new runs to an instance that stops its runs
    (``failed``, ``store_unavailable``) while its probe says ready; runs are stopped ~2 s
    earlier than the documented rule allows, with the stored lease nowhere near its end.

    Root cause: service/runs/upkeep.py:116-120 (the ``except StoreError`` branch still stops
    the runs once ``trio.current_time() - lease.sent > LEASE / 2``, the pre-dd311a5 half
    lease, on PostgreSQL too, and never sets ``lease.lapsing``); only
    service/runs/upkeep.py:159-161 (the watchdog, at 2 * LEASE / 3) sets it."""
    backend = ScriptedBackend(lambda req: Reply("tick " * 600, gap=0.05))  # 30 s
    async with running_server(load_settings(db=pg_url), backend) as srv, \
            srv.client() as client:
        store = srv.services.require_store()
        supervisor = srv.services.supervisor
        assert supervisor is not None
        lease = supervisor.lease
        first = lease.sent
        with trio.fail_after(GUARD):  # a renewal of the loop lands: the schedule is known
            while lease.sent == first:  # noqa: ASYNC110 (set by another task)
                await trio.sleep(0.01)
        sent = lease.sent  # the next renewal goes at sent + 5
        held, release = threading.Event(), threading.Event()
        stopped_at: float | None = None
        ready_status: int | None = None
        ready_body: object = None
        left = 0.0
        async with trio.open_nursery() as nursery:
            conv = (await client.post("/api/conversations", json={})).json()["id"]
            nursery.start_soon(partial(client.post, f"/api/conversations/{conv}/messages",
                                       json={"content": "go", "stream": False},
                                       timeout=GUARD))
            with trio.fail_after(GUARD):
                while not supervisor.live():  # noqa: ASYNC110 (set by another task)
                    await trio.sleep(0.01)
            handle = supervisor.live()[0]
            await trio.sleep_until(sent + 2)
            nursery.start_soon(trio.to_thread.run_sync, _hold_lease_row, pg_url,
                               store.process_id, held, release)
            try:
                await trio.to_thread.run_sync(held.wait, GUARD)
                # The renewal sent at sent + 5 waits on the lock; it fails at sent + 8.2.
                await trio.sleep_until(sent + LEASE / 3 + 3.2)
                assert await trio.to_thread.run_sync(_cancel_waiting_renewal, pg_url) == 1
                with trio.move_on_after(1.5):  # before the watchdog's sent + 10
                    while handle.cancel_reason is None:  # noqa: ASYNC110 (a sync call sets it)
                        await trio.sleep(0.01)
                    stopped_at = trio.current_time() - sent
                    ready = await client.get("/readyz")
                    ready_status, ready_body = ready.status_code, ready.json()
                    left = await trio.to_thread.run_sync(_lease_left, pg_url, store.process_id)
            finally:
                release.set()
            nursery.cancel_scope.cancel()
    # Fixed: the failed renewal no longer stops the runs before the watchdog's two thirds
    # (stopped_at stays None); had it stopped them, /readyz must have said so.
    assert stopped_at is None or ready_status == 503, (
        f"the run was stopped {stopped_at:.1f} s after the last landed renewal was sent "
        f"(the stored lease still had {left:.1f} s) while /readyz said {ready_status}: "
        f"{ready_body}")


async def test_a_failed_start_up_renewal_is_taken_for_one_that_landed(pg_url: str) -> None:
    """Defect: ``lease_loop`` sets ``lease.sent`` to its start before the start-up renewal and
    keeps it when that renewal fails, so the watchdog counts two thirds of a lease from a
    renewal that never landed. The code's own comment says why the start-up renewal exists:
    "the lease written at start-up may be old (a model's load came in between)" (lifespan.py
    renews it before ``_maybe_start_embedded`` loads a GGUF, then starts the supervisor). With
    that lease already lapsed in the database and the start-up renewal failing at its bound,
    the loop reports started (serving begins), ``Lease.lapsing`` stays False and a run
    taken then is not stopped until ~10 s after the start.

    Consequence: for ~5 s after serving begins, ``/readyz`` says ready and runs are accepted
    and served by an instance that the database holds dead (no renewal landed since the old
    lease lapsed): another instance's recovery (which judges by the lease) closes those runs
    as interrupted while this one still serves them and their tools still act; two instances
    finish one run, which the lease loop's docstring says must never happen.

    Root cause: service/runs/upkeep.py:96-102 (``lease.sent = trio.current_time()`` before
    ``store.renew_lease``, kept in the ``except StoreError`` / timeout path), read by
    service/runs/upkeep.py:158-159 (``_stop_runs_when_lapsing``) and by the loop's failure
    branch (upkeep.py:118) as the send time of a renewal that landed."""
    async with open_store(pg_url) as store:
        await store.renew_lease(LEASE)  # the lifespan's, before the model's load
        # The model's load took longer than a lease: that lease has lapsed.
        await trio.to_thread.run_sync(_backdate_lease, pg_url, store.process_id)
        held, release = threading.Event(), threading.Event()
        lease = Lease()
        runs: dict[str, RunHandle] = {}
        handle = _handle("run-served")
        seen_lapsing = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, _hold_lease_row, pg_url,
                               store.process_id, held, release)
            try:
                await trio.to_thread.run_sync(held.wait, GUARD)
                with trio.fail_after(GUARD):  # the start-up renewal fails at its 5 s bound
                    await nursery.start(partial(lease_loop, store, lambda: runs, lease=lease))
                left = await trio.to_thread.run_sync(_lease_left, pg_url, store.process_id)
                runs[handle.id] = handle  # a run taken once serving began
                with trio.move_on_after(2):
                    while not (seen_lapsing := lease.lapsing):  # noqa: ASYNC110
                        await trio.sleep(0.01)
                left_after = await trio.to_thread.run_sync(_lease_left, pg_url,
                                                           store.process_id)
            finally:
                release.set()
            nursery.cancel_scope.cancel()
    assert left < 0, (left, left_after)  # the database holds it dead
    assert left_after < 0, (left, left_after)
    assert seen_lapsing or handle.cancel_reason is not None, (
        f"no renewal has landed and the stored lease lapsed {-left_after:.1f} s ago, yet for "
        "2 s after serving began the lease was not lapsing (/readyz ready) and the run taken "
        "then went on")
