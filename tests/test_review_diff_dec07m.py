"""Hostile review of ``git diff 8127044..HEAD -- service docs`` (2026-12-07, helper m).

Each failing test names one defect of the diff; the rest pin what was tried and holds.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from service.errors import StoreUnavailable
from service.settings import Settings
from service.store import MessageStatus, open_store

from .fakes import Reply, ScriptedBackend
from .servers import running_server

GUARD = 60  # seconds any single wait may take before the test fails


def _failed_count(store: Any) -> float:
    return store._metrics.runs.labels("failed")._value.get()  # type: ignore[no-any-return]


async def _dead_runs(db: Path | str, runs: int) -> list[str]:
    """``runs`` runs left running by an instance whose lease has lapsed."""
    elsewhere = "999999999:1:another-boot-id:12345:4026531836"  # its lease decides
    async with open_store(db, process_id=elsewhere) as dead:
        await dead.renew_lease(15)
        conv = (await dead.create_conversation()).id
        ids = [(await dead.begin_run(conv, content="q", agent="chat", model=None)).run.id
               for _ in range(runs)]
        await dead.renew_lease(-1)
    return ids


@pytest.mark.parametrize("stopped_by", ["cancel", "store_error"])
async def test_recovery_stopped_between_its_writes_counts_the_runs_it_closed(
        settings: Settings, stopped_by: str) -> None:
    """DEFECT: a dead instance's runs are now closed one write each, and counted in
    ``service_runs_total{status="failed"}`` only after the loop over all of them. When the
    loop stops between two of those writes (the upkeep cancelled at shutdown or by a lease
    lapse; the next write refused: a full disk, a lost PostgreSQL connection), the runs
    already closed stay closed in the store (no later look finds them again) but are never
    counted, by this closer or any other. Before the change the one write landed whole and
    was counted, or did not land at all.

    Code: service/store/sqlite_ownership.py ``recover_interrupted`` (``closed = [rid for rid
    in candidates if await self._write(...)]`` then ``inc(len(closed))``); the same shape in
    service/store/postgres_ownership.py. Fix: count each run as its own write lands."""
    ids = await _dead_runs(settings.db, 3)
    async with open_store(settings.db) as store:
        before = _failed_count(store)
        write = store._write
        writes = [0]
        with trio.CancelScope() as scope:
            async def stopped_after_first(op: str, fn: Any) -> Any:
                if op == "recover_interrupted":
                    writes[0] += 1
                    if writes[0] == 2 and stopped_by == "store_error":
                        raise StoreUnavailable("the store refused the write (injected)")
                result = await write(op, fn)
                if op == "recover_interrupted" and stopped_by == "cancel":
                    scope.cancel()  # (the upkeep's shutdown, as its first close lands)
                return result

            store._write = stopped_after_first  # type: ignore[method-assign]
            with trio.fail_after(GUARD):
                with contextlib.suppress(StoreUnavailable):  # (the upkeep looks again later)
                    await store.recover_interrupted()
        store._write = write  # type: ignore[method-assign]
        closed = [rid for rid in ids if (await store.get_run(rid)).status == "failed"]
        assert closed, "nothing was closed before the stop (test set-up)"
        counted = _failed_count(store) - before
        assert counted == len(closed), (
            f"{len(closed)} dead runs closed in the store, {counted} counted as failed")
        # A later look does not count them either: they are no longer in progress.
        await store.recover_interrupted()
        assert _failed_count(store) - before == len(ids)


async def test_a_run_stopped_before_its_launch_is_stored_and_told_cancelled_once(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Holds: a run whose first write is in flight when ``stop_conversation`` is asked is
    cancelled before its agent's first step: no upstream call, the POST is told
    ``cancelled`` with the delete's reason and an empty partial, the store keeps the same
    (run ``cancelled``, reply ``cancelled`` with ""), its run.finished is stored once, and
    ``service_runs_total{status="cancelled"}`` counts it once."""
    backend = ScriptedBackend(lambda req: Reply("never sent"))
    async with running_server(settings, backend) as srv, srv.client() as client:
        r = await client.post("/api/conversations", json={})
        conv = r.json()["id"]
        store = srv.services.require_store()
        supervisor = srv.services.require_supervisor()
        metrics = srv.services.metrics
        cancelled_before = metrics.runs.labels("cancelled")._value.get()
        landed, launch = trio.Event(), trio.Event()
        real_begin = store.begin_run

        async def begin_run(*args: Any, **kwargs: Any) -> Any:
            begun = await real_begin(*args, **kwargs)
            landed.set()
            await launch.wait()
            return begun

        monkeypatch.setattr(store, "begin_run", begin_run)
        out: dict[str, Any] = {}
        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                async def post() -> None:
                    out["post"] = await client.post(f"/api/conversations/{conv}/messages",
                                                    json={"content": "hi"})

                async def stop() -> None:
                    await supervisor.stop_conversation(conv, "stopped by the review")
                    out["stopped"] = True

                nursery.start_soon(post)
                await landed.wait()
                nursery.start_soon(stop)
                await trio.testing.wait_all_tasks_blocked()
                launch.set()
        assert out.get("stopped")
        assert backend.streams == []  # no upstream call
        assert out["post"].status_code == 409, out["post"].text  # a cancelled run's answer
        told = out["post"].json()["error"]
        assert (told["type"], told["run_status"], told["message"]) == (
            "cancelled", "cancelled", "stopped by the review")
        run_id = told["run_id"]
        run = await store.get_run(run_id)
        assert run.status == "cancelled", run
        assert run.error == "stopped by the review", run
        reply = [m for m in await store.get_messages(conv)
                 if m.run_id == run_id and m.role == "assistant"]
        assert [(m.status.value, m.content) for m in reply] == [("cancelled", "")]
        events = await store.list_run_events(run_id, after=0, limit=100)
        finished = [e for e in events if e.type == "run.finished"]
        assert len(finished) == 1, events
        assert finished[0].data["status"] == "cancelled", finished[0].data
        assert finished[0].data.get("content") == "", finished[0].data
        assert metrics.runs.labels("cancelled")._value.get() - cancelled_before == 1


async def test_the_stores_slices_give_the_history_a_full_read_gives(settings: Settings) -> None:
    """Holds: through the real SQL (``seq < ?  ORDER BY seq DESC LIMIT ?``, slices of 200),
    a run begun with ``history_chars`` gets, once built and trimmed, the history a full read
    gives, for a conversation past two slices with a system prompt, failed, cancelled-empty
    and long turns, at budgets 0, a slice boundary's worth and more."""
    from service.agents import build_history, trim_history

    async with open_store(settings.db) as store:
        conv = await store.create_conversation(system="SYS")
        items: list[tuple[str, str, MessageStatus, None]] = []
        for n in range(230):
            items.append(("user", f"q{n} " + "u" * (n % 7), MessageStatus.complete, None))
            status = (MessageStatus.error if n % 11 == 0 else
                      MessageStatus.cancelled if n % 13 == 0 else MessageStatus.complete)
            text = "" if n % 13 == 0 else "a" * (3000 if n % 17 == 0 else 40 + n)
            items.append(("assistant", text, status, None))
        await store.append_messages(conv.id, items)
        for budget in (0, 50, 1_000, 9_000, 24_000, 200_000):
            whole = await store.begin_run(conv.id, content=f"now {budget}", agent="chat",
                                          model=None)
            part = await store.begin_run(conv.id, content=f"now {budget}", agent="chat",
                                         model=None, history_chars=budget)
            # (the second run sees the first's question and pending reply: compare alike)
            assert part.history[-2:] == [whole.user, whole.reply]
            full = [*whole.history, whole.user, whole.reply]
            assert full[len(full) - len(part.history):] == part.history, budget
            assert budget > 24_000 or len(part.history) < len(full), budget  # (cut short)
            want = trim_history(build_history(part.conversation, [*full, part.user]), budget)
            got = trim_history(build_history(part.conversation, [*part.history, part.user]),
                               budget)
            assert got == want, budget
