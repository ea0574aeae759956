"""Review of 8969f80..HEAD: defects the change set introduced, each a test that fails on it.
Real servers on 127.0.0.1 (in this process), a real SQLite store; faults through the store's
own hooks (service/store/faults.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from service.errors import StoreUnavailable
from service.runs import upkeep
from service.settings import load_settings

from .e2e import GUARD
from .fakes import Reply, ScriptedBackend
from .servers import running_server


async def _until(cond: Any) -> None:
    with trio.fail_after(GUARD):
        while not cond():  # noqa: ASYNC110 (state of another task, no event to wait on)
            await trio.sleep(0.01)


async def test_lease_check_after_a_lapse_stops_a_run_whose_first_write_is_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The lease loop, on renewing after a lapse, asks the store where each live run runs and
    # stops every one the store does not say is "here" (upkeep._stop_runs_taken_over). A run
    # of /v1/chat/completions is live (registered, working) while its first write is still
    # queued (supervisor._start_new): the store has no row for it yet, run_in_progress says
    # None, and the run is stopped as "closed by another instance" although no other
    # instance ever saw it. After a lapse (a process resumed after a stop, a store that was
    # slow) requests queued meanwhile arrive exactly then.
    # The lapse is made with the store's own hook: the batch holding the lease renewal is
    # held past a lease (LEASE shortened so that this takes a second, not 15 s).
    lease = 0.6
    monkeypatch.setattr(upkeep, "LEASE", lease)
    backend = ScriptedBackend([Reply("one two three", hang_after=1)])
    settings = load_settings(db=tmp_path / "service.db")
    async with running_server(settings, backend) as srv, srv.client() as client:
        store = srv.services.require_store()
        sup = srv.services.require_supervisor()
        faults = store.faults
        renew_held, gate_a, gate_b, checked = (trio.Event() for _ in range(4))
        state = {"armed": False}
        renew = store.renew_lease

        async def hold_renewal() -> None:
            faults.before_batch = None
            renew_held.set()
            await gate_a.wait()

        async def hold_next() -> None:
            await gate_b.wait()

        async def renew_lease(seconds: float) -> None:
            if state["armed"]:
                state["armed"] = False
                faults.before_batch = hold_renewal  # the batch this renewal goes in
            await renew(seconds)

        check = upkeep._stop_runs_taken_over

        async def stop_runs_taken_over(*args: Any) -> None:
            try:
                await check(*args)
            finally:
                checked.set()

        monkeypatch.setattr(store, "renew_lease", renew_lease)
        monkeypatch.setattr(upkeep, "_stop_runs_taken_over", stop_runs_taken_over)

        async def complete() -> None:
            await client.post("/v1/chat/completions", json={
                "model": "m", "messages": [{"role": "user", "content": "hi"}]})

        async with trio.open_nursery() as nursery:
            state["armed"] = True
            with trio.fail_after(GUARD):
                await renew_held.wait()
            await trio.sleep(2 * lease)  # the renewal is held past the lease: a lapse
            nursery.start_soon(complete)
            await _until(lambda: sup.live() and faults.queued_writes >= 1)
            (handle,) = sup.live()
            faults.before_batch = hold_next  # the run's first write waits (a batch in flight)
            gate_a.set()
            with trio.fail_after(GUARD):
                await checked.wait()
            observed = {"cancel_reason": handle.cancel_reason, "closed": handle.closed}
            gate_b.set()
            faults.clear()
            nursery.cancel_scope.cancel()
    assert observed == {"cancel_reason": None, "closed": False}


def _close_as_another_instance(db: Path, run_id: str) -> None:
    """What a survivor's recovery does to a run whose owner's lease lapsed (another process,
    another connection to the file)."""
    import sqlite3

    with sqlite3.connect(db, timeout=10) as conn:
        conn.execute("UPDATE runs SET status = 'failed', error = 'interrupted', "
                     "process = 'another-instance' WHERE id = ?", (run_id,))


async def test_a_lease_check_whose_read_fails_once_is_never_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # _stop_runs_taken_over runs once, on the first renewal after a lapse, and reads the store
    # once per live run. The store that just came back (or the one that was slow: that is why
    # the lease lapsed) fails one of those reads: the StoreError leaves the loop (logged as
    # "could not renew this instance's lease", though it was renewed), the runs not looked at
    # yet are never looked at, since the next renewal is not "after a lapse". The run another
    # instance closed goes on here, shown "running" (GET, re-join) against a store that says
    # "failed", until its next write - never, with a silent model: the defect the lease check
    # was added to fix.
    lease = 0.6
    monkeypatch.setattr(upkeep, "LEASE", lease)
    backend = ScriptedBackend([Reply("one two three", hang_after=1)])
    db = tmp_path / "service.db"
    async with running_server(load_settings(db=db), backend) as srv, srv.client() as client:
        store = srv.services.require_store()
        sup = srv.services.require_supervisor()
        faults = store.faults
        renew_held, gate_a, checked = trio.Event(), trio.Event(), trio.Event()
        state = {"armed": False, "renewed": 0, "failed_reads": 0}
        renew = store.renew_lease

        async def hold_renewal() -> None:
            faults.before_batch = None
            renew_held.set()
            await gate_a.wait()

        async def renew_lease(seconds: float) -> None:
            if state["armed"]:
                state["armed"] = False
                faults.before_batch = hold_renewal
            await renew(seconds)
            state["renewed"] += 1

        def flaky_read(name: str) -> None:
            if name == "run_in_progress" and not state["failed_reads"]:
                state["failed_reads"] += 1
                raise StoreUnavailable("injected: the store answered one read with an error")

        check = upkeep._stop_runs_taken_over

        async def stop_runs_taken_over(*args: Any) -> None:
            try:
                await check(*args)
            finally:
                checked.set()

        monkeypatch.setattr(store, "renew_lease", renew_lease)
        monkeypatch.setattr(upkeep, "_stop_runs_taken_over", stop_runs_taken_over)
        conv = (await client.post("/api/conversations", json={})).json()["id"]

        async def ask() -> None:
            async with client.stream("POST", f"/api/conversations/{conv}/messages", json={
                    "content": "hi", "stream": True, "on_disconnect": "continue"}) as r:
                async for _ in r.aiter_bytes():
                    pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await _until(lambda: sup.live() and backend.streams
                         and backend.streams[0].chunks_sent >= 1)
            (handle,) = sup.live()
            state["armed"] = True
            with trio.fail_after(GUARD):
                await renew_held.wait()
            # Meanwhile (this instance stalled past its lease) a survivor closes the run.
            await trio.to_thread.run_sync(_close_as_another_instance, db, handle.id)
            await trio.sleep(2 * lease)  # the renewal is held past the lease: a lapse
            faults.before_read = flaky_read
            gate_a.set()
            with trio.fail_after(GUARD):
                await checked.wait()
            faults.before_read = None
            # Several more renewals: the instance has every chance to look again.
            done = state["renewed"] + 4
            await _until(lambda: state["renewed"] >= done)
            shown = (await client.get(f"/api/runs/{handle.id}")).json()["status"]
            observed = {"stopped here": handle.cancel_reason is not None, "GET": shown}
            nursery.cancel_scope.cancel()
    assert observed == {"stopped here": True, "GET": "failed"}


async def test_a_write_probe_that_succeeded_is_reported_stopped_to_its_waiters() -> None:
    # /readyz's write probe (api/ops.py _WriteProbe) now sets its shared result to "stopped"
    # when it begins. A probe that has just answered wakes its waiters (done.set()); a
    # /readyz arriving in the same scheduler pass finds no probe running and starts the next
    # one, whose first step overwrites the answer the waiters are about to read: they report
    # "down: the write probe was stopped" although their probe wrote. Two probes in a row
    # (an orchestrator's and a load balancer's) make /readyz flap. Driven with the real class
    # on a stand-in store whose write answers when told; each round is the one interleaving.
    from types import SimpleNamespace

    from service.api.ops import _WriteProbe
    from service.errors import ServiceError

    wrong = 0
    for _ in range(40):
        gate = trio.Event()

        async def probe_write(gate: trio.Event = gate) -> None:
            await gate.wait()

        store = SimpleNamespace(probe_write=probe_write)
        results: list[str] = []
        async with trio.open_nursery() as nursery:
            svc = SimpleNamespace(require_store=lambda store=store: store,
                                  supervisor=SimpleNamespace(nursery=nursery))
            probe = _WriteProbe()

            async def ready(svc: Any = svc, probe: _WriteProbe = probe,
                            results: list[str] = results) -> None:
                try:
                    await probe.check(svc)
                    results.append("ok")
                except ServiceError as exc:
                    results.append(exc.message)

            async def second(gate: trio.Event = gate, svc: Any = svc,
                             probe: _WriteProbe = probe) -> None:
                await gate.wait()  # comes in as the first probe answers
                with trio.move_on_after(0):
                    await probe.check(svc)

            nursery.start_soon(ready)
            await _until(lambda probe=probe: probe._current is not None)
            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
        wrong += results != ["ok"]
    assert wrong == 0, f"{wrong} of 40 waiters of a probe that wrote were told it stopped"
