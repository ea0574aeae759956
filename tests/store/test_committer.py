"""The committer under store faults, found by a review (each failed before its fix)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from service.errors import BackendUnavailable, StoreUnavailable
from service.runs import RunHandle, RunSpec
from service.runs import committer as committer_mod
from service.store import RunEvent
from service.store.faults import InjectedFault

from ..fakes import Env, Reply, ScriptedBackend, supervisor_env


async def test_a_final_write_stuck_in_the_stores_thread_still_tells_subscribers_at_the_budget(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # committer.finish: `with trio.move_on_after(FINAL_WRITE_BUDGET, shield=True)` around
    # _store_final's `move_on_after(WRITE_BUDGET)`. Once the store has *taken* the write, its
    # `_write` runs the transaction under its own `CancelScope(shield=True)`: neither bound can
    # interrupt it. A transaction that takes 40 s (busy_timeout 10 s on BEGIN IMMEDIATE + 10 s
    # on the TRUNCATE checkpoint, twice; a stalled volume: unbounded) keeps the run's end,
    # its subscribers and `handle.finished` waiting far past the 15 s the README promises.
    async with supervisor_env(tmp_path, ScriptedBackend([Reply("all of it")])) as env:
        real_finish = env.store.finish_run
        stall = {"on": False}

        async def finish_run(*a, **k):  # type: ignore[no-untyped-def]
            stall["on"] = True
            return await real_finish(*a, **k)

        async def stuck_writer() -> None:
            if stall["on"]:
                stall["on"] = False
                await trio.sleep(40)  # the writer is stuck this long, the batch taken

        env.store.finish_run = finish_run  # type: ignore[method-assign]
        env.store.faults.before_batch = stuck_writer
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, "x"))
        t0 = trio.current_time()
        told = None
        with trio.move_on_after(committer_mod.FINAL_WRITE_BUDGET + 3):
            try:
                async for _ in handle.subscribe():
                    pass
                told = "end"
            except StoreUnavailable:
                told = "store_unavailable"
        took = trio.current_time() - t0
        assert told is not None, (
            f"after {took:.0f}s the subscriber has neither an end nor store_unavailable; "
            f"finished={handle.finished.is_set()}")


async def test_get_run_on_an_unstored_end_shows_no_error_the_store_does_not_have(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # supervisor._finish sets handle.error (and final_text) before the final write; api/runs.py
    # run_out(live) shows live.error. While the final state is refused, GET /api/runs/{id} says
    # status "running" with the run's error, which the store does not have (README: "GET
    # /api/runs/{id} on a live run says what the store says").
    from service.api.runs import run_out

    err = BackendUnavailable("upstream died", backend="fake")
    backend = ScriptedBackend([Reply("a b c d", fail_after=2, error=err)])
    async with supervisor_env(tmp_path, backend) as env:
        real = env.store.finish_run

        async def refuse(*a, **k):  # type: ignore[no-untyped-def]
            if trio.current_time() < 1000:
                raise StoreUnavailable("store write failed: database or disk is full")
            return await real(*a, **k)

        env.store.finish_run = refuse  # type: ignore[method-assign]
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, "x"))
        await handle.finished.wait()
        assert handle.end_error is not None
        stored = await env.store.get_run(handle.id)
        shown = run_out(stored, env.supervisor.get(handle.id))
        assert (shown.status, shown.error) == (stored.status, stored.error), (
            shown.status, shown.error, stored.status, stored.error)


async def test_a_run_whose_tokens_batch_is_refused_ends_with_them_stored_and_shown(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two runs' tokens go in one batch, in flight while both end, then refused (a full
    # volume) until t=40. Before: each final state landed without its tokens (the store held
    # an end with a hole until the retry), both runs were kept in _ended for _flush to
    # publish the batch later, and the bound (1 here) let one go (its subscriber told
    # store_unavailable). Now each final state waits for the batch to be decided and carries
    # the run's held tokens: both are stored whole and shown whole, nobody is let go.
    monkeypatch.setattr(committer_mod, "_UNSTORED_ENDS_MAX", 1)

    class Gate:
        until = 40.0

    # Both answer at t=0.5: their tokens go in one batch (a run starts working as soon as
    # it is launched, so without the delay the first run's tokens would go alone).
    backend = ScriptedBackend(lambda req: Reply("one two three", first_delay=0.5, gap=0.0))
    async with supervisor_env(tmp_path, backend) as env:
        real_append = env.store.append_run_events

        async def slow_refusing_append(events, *, retry=False):  # type: ignore[no-untyped-def]
            # In flight 1 s, refused until `until`: the runs end while it is in flight.
            await trio.sleep(1)
            if trio.current_time() < Gate.until:
                raise StoreUnavailable("store write failed: database or disk is full")
            return await real_append(events, retry=retry)

        env.store.append_run_events = slow_refusing_append  # type: ignore[method-assign]
        conv, conv2 = await env.conversation(), await env.conversation()
        a = await env.supervisor.start(RunSpec(conv, "x"))
        b = await env.supervisor.start(RunSpec(conv2, "y"))
        seen: dict[str, list[RunEvent]] = {a.id: [], b.id: []}
        told: dict[str, BaseException] = {}

        async def follow(handle) -> None:  # type: ignore[no-untyped-def]
            try:
                async for e in handle.subscribe():
                    seen[handle.id].append(e)
            except StoreUnavailable as exc:
                told[handle.id] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow, a)
            nursery.start_soon(follow, b)
            await a.finished.wait()
            await b.finished.wait()
        assert trio.current_time() < Gate.until  # ended without waiting for the retries
        assert told == {}
        from service.runs.reader import EventReader, Keepalive

        for h in (a, b):
            assert h.final_stored
            shown = seen[h.id]
            assert shown[-1].type == "run.finished"
            assert "".join(e.data["text"] for e in shown if e.type == "token") == (
                "one two three")
            reader = EventReader(h.id, after=0, store=env.store, supervisor=env.supervisor,
                                 keepalive=5.0)
            stored = [e for e in [e async for e in reader] if not isinstance(e, Keepalive)]
            assert [(e.seq, e.type) for e in stored] == [(e.seq, e.type) for e in shown]


async def test_a_rejoin_of_a_run_let_go_with_its_end_unstored_is_told_so(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Past _UNSTORED_ENDS_MAX runs whose final state the store refused, the oldest is let go:
    # its row stays "running" under this process, with no handle left here. A re-join then
    # read the store, found no more events and no process to wait for, and ended its stream
    # without an end (and without an error): it must be told store_unavailable, as the run's
    # own subscribers were.
    monkeypatch.setattr(committer_mod, "_UNSTORED_ENDS_MAX", 1)
    backend = ScriptedBackend(lambda req: Reply("one two", first_delay=1.0))
    async with supervisor_env(tmp_path, backend) as env:
        a = await env.supervisor.start(RunSpec(await env.conversation(), "x"))
        b = await env.supervisor.start(RunSpec(await env.conversation(), "y"))
        await trio.sleep(0.5)  # both stored and started; their tokens come at t=1

        def refuse() -> None:
            raise InjectedFault("disk I/O error")

        env.store.faults.before_commit = refuse
        with trio.fail_after(60):
            await a.finished.wait()
            await b.finished.wait()
        assert not a.final_stored
        assert not b.final_stored
        (gone,) = [h for h in (a, b) if env.supervisor.get(h.id) is None]
        (kept,) = [h for h in (a, b) if h is not gone]
        assert await env.store.run_in_progress(gone.id) == "here"

        from service.runs.reader import EventReader, Keepalive

        async def rejoin(run_id: str) -> tuple[list[str], BaseException | None]:
            reader = EventReader(run_id, after=0, store=env.store, supervisor=env.supervisor,
                                 keepalive=5.0)
            seen: list[str] = []
            try:
                with trio.fail_after(30):
                    async for e in reader:
                        if not isinstance(e, Keepalive):
                            seen.append(e.type)
            except StoreUnavailable as exc:
                return seen, exc
            return seen, None

        seen, told = await rejoin(gone.id)
        assert isinstance(told, StoreUnavailable), seen
        assert "run.finished" not in seen
        # The run still held here is served from memory: the same answer, not an end.
        seen, told = await rejoin(kept.id)
        assert isinstance(told, StoreUnavailable), seen
        env.store.faults.clear()


async def test_held_events_are_bounded_by_their_size_not_only_their_count(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the store refuses batches the held events are bounded: past the bound, the runs
    making them are stopped ``failed`` (``store_unavailable``). The bound counted events
    only (100,000): a few hundred large ones (a tool's result is up to 16,000 characters)
    went on growing memory. Here events of 10 kB pass a 100 kB size bound, far below
    the count one, and the run is stopped; what it made is still stored once the store is
    back."""
    monkeypatch.setattr(committer_mod, "_PENDING_BYTES_MAX", 100_000)
    word = "w" * 10_000
    backend = ScriptedBackend(lambda req: Reply(" ".join([word] * 200), first_delay=1.0,
                                                gap=0.01))
    async with supervisor_env(tmp_path, backend) as env:
        handle = await env.supervisor.start(RunSpec(await env.conversation(), "x"))
        await trio.sleep(0.5)  # stored and started; its tokens come from t=1

        def refuse() -> None:
            raise InjectedFault("disk I/O error")

        env.store.faults.before_commit = refuse
        with trio.fail_after(120):
            await handle.finished.wait()
            env.store.faults.clear()  # back: the held events and the end are stored
            await handle.wait_published()  # its end stored (on a retry), then published
        assert handle.final_stored
        run = await env.store.get_run(handle.id)
        assert run.status == "failed", run
        assert "store" in (run.error or ""), run
        tokens = [e for e in await env.store.list_run_events(handle.id) if e.type == "token"]
        # Stopped early (within the lease: a lapsed lease stops runs too), and nothing it made
        # was dropped.
        assert 10 <= len(tokens) < 200
        assert [e.seq for e in tokens] == list(range(tokens[0].seq, tokens[0].seq + len(tokens)))


def _refuse() -> None:
    raise InjectedFault("disk I/O error")


async def _ends_kept(env: Env, n: int) -> list[RunHandle]:
    """``n`` runs whose ends the store refused (kept for the retry pass); the store then
    still refuses every write. (The backend's tokens come 1 s after each run starts.)"""
    handles = [await env.supervisor.start(RunSpec(await env.conversation(), str(i)))
               for i in range(n)]
    await trio.sleep(0.5)  # all stored and started
    env.store.faults.before_commit = _refuse
    with trio.fail_after(60):
        for h in handles:
            await h.finished.wait()
    assert env.supervisor.unstored == n
    return handles


async def test_a_retry_pass_over_kept_final_states_ends_at_the_first_refusal(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # retry_final_writes went through every kept final state one by one, each bounded by
    # WRITE_BUDGET: against a store that refuses (a full volume) a pass wrote N times for one
    # answer, and against a store that hangs it took N x 10 s (and held the retry lock, so
    # a drain's store_everything waited that long). The store's refusal is the store's, not
    # the run's: the pass ends at the first one.
    from service.runs.upkeep import MAINTAIN_EVERY

    backend = ScriptedBackend(lambda req: Reply("one two", first_delay=1.0))
    async with supervisor_env(tmp_path, backend) as env:
        handles = await _ends_kept(env, 5)
        caplog.clear()
        ticks = 5
        await trio.sleep(MAINTAIN_EVERY * ticks)
        # (the store's commits also carry the lease's renewals: the retries are counted by
        # what they log, one line per final write refused)
        tries = [r for r in caplog.records if "still not stored" in r.getMessage()]
        assert len(tries) <= ticks + 1, len(tries)
        assert env.supervisor.unstored == 5  # nothing let go meanwhile

        # A store that hangs instead: one pass is bounded by one write's wait, not N. (A
        # write its batch took is waited for up to BATCH_WAIT past its caller's budget.)
        from service.store.group_commit import BATCH_WAIT

        env.store.faults.before_commit = None

        back = trio.Event()

        async def hang() -> None:
            await back.wait()

        env.store.faults.before_batch = hang
        t0 = trio.current_time()
        await env.supervisor.committer.retry_final_writes()
        one_write = committer_mod.WRITE_BUDGET + BATCH_WAIT
        assert trio.current_time() - t0 < 2 * one_write, trio.current_time() - t0

        env.store.faults.before_batch = None  # the store is back: every end is stored
        back.set()
        await trio.sleep(MAINTAIN_EVERY * 5)
        assert env.supervisor.unstored == 0
        for h in handles:
            assert (await env.store.get_run(h.id)).status == "succeeded"


async def test_one_kept_end_the_store_is_slow_to_take_does_not_hold_back_the_others(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three runs' ends kept (the store refused them), then the store takes writes again but
    one of those ends always takes longer than a write's budget (a row locked elsewhere, a
    huge answer on a slow volume). A retry pass ends at a write past its budget; the others
    must still be stored by the next passes. That one was first in every pass, so the pass
    ended on it every time and the others were never tried: their clients waited for an end
    the store could take."""
    from service.runs.upkeep import MAINTAIN_EVERY

    backend = ScriptedBackend(lambda req: Reply("one two", first_delay=1.0))
    async with supervisor_env(tmp_path, backend) as env:
        handles = await _ends_kept(env, 3)

        slow: list[str] = []  # the first end a retry tries: slow from then on
        write = committer_mod.FinalState.write

        async def slow_write(self: committer_mod.FinalState, store: object) -> bool:
            if not slow:
                slow.append(self.run_id)
            if self.run_id == slow[0]:
                await trio.sleep(committer_mod.WRITE_BUDGET * 2)
            return await write(self, store)  # type: ignore[arg-type]

        monkeypatch.setattr(committer_mod.FinalState, "write", slow_write)
        env.store.faults.before_commit = None
        await trio.sleep(MAINTAIN_EVERY * 5 + committer_mod.WRITE_BUDGET * 5)
        assert env.supervisor.unstored == 1, "the others waited behind the slow one"
        for h in handles:
            status = (await env.store.get_run(h.id)).status
            assert status == ("running" if h.id == slow[0] else "succeeded"), (h.id, status)
