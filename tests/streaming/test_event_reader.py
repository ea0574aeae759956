"""Reading a run's events: store then live, keep-alives when idle, resume after a gap."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from service.api.sse import sse_event
from service.runs import RunSpec
from service.runs import reads as reads_mod
from service.runs.reader import EventReader, Keepalive
from service.store import MessageStatus, RunEvent, SQLiteStore
from service.store.sqlite import process_tag

from ..fakes import Reply, ScriptedBackend, supervisor_env


async def test_keepalive_when_idle_then_events(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    backend = ScriptedBackend([Reply("late answer", first_delay=12.0)])
    async with supervisor_env(tmp_path, backend) as env:
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, "x"))
        reader = EventReader(handle.id, after=0, store=env.store, supervisor=env.supervisor,
                             keepalive=5.0)
        got: list[tuple[float, str]] = []
        start = trio.current_time()
        async for item in reader:
            kind = "keepalive" if isinstance(item, Keepalive) else item.type
            got.append((trio.current_time() - start, kind))
        assert got[:3] == [(0.0, "run.started"), (5.0, "keepalive"), (10.0, "keepalive")]
        assert [k for _, k in got[3:]] == ["token", "token", "message", "run.finished"]


async def test_rejoin_after_the_run_reads_the_store(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    backend = ScriptedBackend([Reply("a b c d")])
    async with supervisor_env(tmp_path, backend) as env:
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, "x"))
        await handle.finished.wait()
        assert env.supervisor.get(handle.id) is None
        reader = EventReader(handle.id, after=3, store=env.store, supervisor=env.supervisor,
                             keepalive=5.0)
        seqs = [e.seq async for e in reader if not isinstance(e, Keepalive)]
        assert seqs == list(range(4, handle.emitted_seq + 1))


def test_sse_frames_split_multiline_data() -> None:
    assert sse_event(3, "token", {"text": "a"}) == b'id: 3\nevent: token\ndata: {"text":"a"}\n\n'
    assert sse_event(None, None, "x\ny") == b"data: x\ndata: y\n\n"


def test_openai_token_fast_path_is_byte_identical() -> None:
    from service.api.openai import _chunk, _Framer
    from service.api.sse import sse_data
    from service.runs import RunEvent

    for text in ["plain", 'quote " and \\ back', "new\nline", "ünïcødé ✓", ""]:
        event = RunEvent.make("run_x", 2, "token", {"text": text}, 0.0)
        fast = _Framer("chatcmpl-x", 7, "m").frame(event)
        assert fast == sse_data(_chunk("chatcmpl-x", 7, "m", {"content": text}))


async def test_a_rejoin_in_the_moment_before_a_run_is_launched_follows_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Between a run's first write landing (the store has the run and run.started) and its
    # handle being registered, a re-joiner found no live run and nothing more in the store,
    # and its stream ended after run.started, without run.finished.
    backend = ScriptedBackend([Reply("a b c")])
    async with supervisor_env(tmp_path, backend) as env:
        conv = await env.conversation()
        got: list[str] = []
        read_all = trio.Event()
        begin_run = env.store.begin_run

        async def read(run_id: str) -> None:
            got.extend([e.type async for e in _reader(env, run_id)
                        if not isinstance(e, Keepalive)])
            read_all.set()

        async def begin_run_then_rejoin(*args: Any, **kwargs: Any) -> Any:
            begun = await begin_run(*args, **kwargs)
            env.nursery.start_soon(read, begun.run.id)
            await trio.testing.wait_all_tasks_blocked()  # the reader has had its look
            return begun

        monkeypatch.setattr(env.store, "begin_run", begin_run_then_rejoin)
        handle = await env.supervisor.start(RunSpec(conv, "x"))
        await handle.finished.wait()
        with trio.fail_after(5):
            await read_all.wait()
        assert got == ["run.started", "token", "token", "token", "message", "run.finished"]


async def test_a_run_launched_while_the_reader_asks_the_store_is_followed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found in review: the launch landed while the reader's "is it in progress?" read was in
    # flight; the answer ("here") then came with the run no longer starting, and the stream
    # ended after run.started although the run went on.
    async with supervisor_env(tmp_path, ScriptedBackend([Reply("a b c", first_delay=1.0)])
                              ) as env:
        conv = await env.conversation()
        got: list[str] = []
        read_all, asked, launched = trio.Event(), trio.Event(), trio.Event()
        begin_run, run_in_progress = env.store.begin_run, env.store.run_in_progress

        async def read(run_id: str) -> None:
            got.extend([e.type async for e in _reader(env, run_id)
                        if not isinstance(e, Keepalive)])
            read_all.set()

        async def answer_after_the_launch(run_id: str) -> Any:
            where = await run_in_progress(run_id)
            asked.set()
            await launched.wait()
            return where

        async def begin_run_then_rejoin(*args: Any, **kwargs: Any) -> Any:
            begun = await begin_run(*args, **kwargs)
            env.nursery.start_soon(read, begun.run.id)
            await asked.wait()
            return begun

        monkeypatch.setattr(env.store, "begin_run", begin_run_then_rejoin)
        monkeypatch.setattr(env.store, "run_in_progress", answer_after_the_launch)
        handle = await env.supervisor.start(RunSpec(conv, "x"))
        launched.set()
        await handle.finished.wait()
        with trio.fail_after(5):
            await read_all.wait()
        assert got == ["run.started", "token", "token", "token", "message", "run.finished"]


async def _stored_elsewhere(env: Any) -> tuple[Any, SQLiteStore]:
    """A run stored as running by another live worker sharing the store (here: our parent
    process stands for it), and that worker's store (open until the test's supervisor stops):
    only the instance that holds a run writes its events and its end."""
    other = SQLiteStore(env.store.path, threaded=False, process_id=process_tag(os.getppid()))
    await other.open()

    async def close_at_exit() -> None:
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await other.aclose()

    env.nursery.start_soon(close_at_exit)
    conv = await env.conversation()
    begun = await other.begin_run(conv, content="q", agent="chat", model=None)
    return begun, other


async def _finished_elsewhere(other: SQLiteStore, begun: Any, seq: int) -> None:
    """The other worker's final write: the run's end, with run.finished as event ``seq``."""
    assert await other.finish_run(
        begun.run.id, status="succeeded", message_id=begun.reply.id, content="done",
        message_status=MessageStatus.complete, error=None, usage={},
        events=[RunEvent(begun.run.id, seq, "run.finished", {"status": "succeeded"}, 0.0)])


def _reader(env: Any, run_id: str) -> EventReader:
    return EventReader(run_id, after=0, store=env.store, supervisor=env.supervisor,
                       keepalive=5.0)


async def test_a_run_stored_by_another_live_worker_is_followed_until_its_end(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with supervisor_env(tmp_path, ScriptedBackend([])) as env:
        begun, other = await _stored_elsewhere(env)
        run_id = begun.run.id
        got: list[tuple[float, str]] = []
        start = trio.current_time()

        async def read() -> None:
            async for e in _reader(env, run_id):
                kind = "keepalive" if isinstance(e, Keepalive) else e.type
                got.append((round(trio.current_time() - start, 1), kind))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.sleep(12.0)
            await _finished_elsewhere(other, begun, 2)
        assert [k for _, k in got] == ["run.started", "keepalive", "keepalive", "run.finished"]
        assert 12.0 <= got[-1][0] <= 13.0  # polled at most 1 s apart


async def test_a_follower_woken_by_announcements_reads_the_store_once_per_commit(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # With notifications (PostgreSQL's listener; fed by hand here), a follower reads when the
    # run's commit is announced, and only then: it used to read again at once after every
    # read that returned events (two reads per commit, the second empty).
    async with supervisor_env(tmp_path, ScriptedBackend([])) as env:
        begun, other = await _stored_elsewhere(env)
        rid = begun.run.id
        wakeups = env.supervisor.wakeups
        wakeups.notified("*")  # the listener is up
        got: list[tuple[float, int]] = []
        start = trio.current_time()

        async def read() -> None:
            async for e in _reader(env, rid):
                if not isinstance(e, Keepalive):
                    got.append((round(trio.current_time() - start, 3), e.seq))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.sleep(0.05)
            before = env.supervisor.reads.reads
            for seq in range(2, 12):
                await trio.sleep(0.5)
                await other.append_run_events(
                    [RunEvent(rid, seq, "token", {"text": str(seq)}, 0.0)])
                wakeups.notified(f"{rid},run_other")
            await trio.sleep(0.25)
            reads = env.supervisor.reads.reads - before
            await _finished_elsewhere(other, begun, 12)
            wakeups.notified(rid)
        assert [seq for _, seq in got] == list(range(1, 13))
        # Each event as its commit is announced (not at the next poll), one read for each.
        assert [t for t, _ in got[1:-1]] == [round(0.05 + 0.5 * i, 3) for i in range(1, 11)]
        assert reads == 10, f"{reads} store reads for 10 commits"


async def test_a_follower_through_the_store_waits_for_a_missing_event(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Found in review: the other worker's batch with event 3 failed (it is retried up to 2 s
    # later) while event 4 landed; a follower took 4 and never read 3.
    async with supervisor_env(tmp_path, ScriptedBackend([])) as env:
        begun, other = await _stored_elsewhere(env)
        rid = begun.run.id

        def ev(seq: int) -> RunEvent:
            return RunEvent(rid, seq, "token", {"text": str(seq)}, 0.0)

        await other.append_run_events([ev(2)])
        got: list[int] = []

        async def read() -> None:
            async for e in _reader(env, rid):
                if not isinstance(e, Keepalive):
                    got.append(e.seq)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.sleep(0.5)
            await other.append_run_events([ev(4)])  # 3's batch failed
            await trio.sleep(2.0)
            assert got == [1, 2]  # 4 waits for 3
            await other.append_run_events([ev(3)], retry=True)
            await _finished_elsewhere(other, begun, 5)
        assert got == [1, 2, 3, 4, 5]


async def test_a_gap_left_when_a_run_is_over_is_skipped(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Events never stored (the store dropped them past its backlog bound) leave a gap for
    # good once the run is over: the reader goes past it rather than waiting forever.
    async with supervisor_env(tmp_path, ScriptedBackend([])) as env:
        begun, other = await _stored_elsewhere(env)
        await _finished_elsewhere(other, begun, 4)
        reader = _reader(env, begun.run.id)
        with trio.fail_after(1):
            assert [e.seq async for e in reader if not isinstance(e, Keepalive)] == [1, 4]


async def test_a_follower_through_the_store_backs_off_and_leaves_at_shutdown(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Found in review: three store reads per 0.1 s for each such follower (304 in 10 s), and
    # a shutdown waited for them until hypercorn's graceful timeout cut them.
    from service.errors import ShuttingDown

    async with supervisor_env(tmp_path, ScriptedBackend([])) as env:
        begun, _ = await _stored_elsewhere(env)
        def store_calls() -> float:  # every read and write, the upkeep loops' too
            return sum(s.value for m in env.metrics.store_latency.collect()
                       for s in m.samples if s.name.endswith("_count"))

        before = store_calls()
        reader = _reader(env, begun.run.id)
        with trio.move_on_after(10):
            async for _ in reader:
                pass
        assert store_calls() - before <= 40  # ~26: 1 s apart once nothing comes (was 300+)
        env.supervisor.draining = True
        with trio.fail_after(1.5), pytest.raises(ShuttingDown):
            await reader.__anext__()


async def test_a_run_left_running_by_a_dead_process_ends_the_stream(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Not waited for: its process is gone. The reader closes it as a start's recovery would,
    # so the stream ends with its run.finished ("every stream ends with run.finished"; it
    # ended without one before).
    async with supervisor_env(tmp_path, ScriptedBackend([])) as env:
        run_id = await env.run_of_a_dead_process(await env.conversation())
        reader = _reader(env, run_id)
        with trio.fail_after(1):
            events = [e async for e in reader if not isinstance(e, Keepalive)]
        assert [e.type for e in events] == ["run.started", "run.finished"]
        assert events[-1].data["status"] == "failed"
        assert (await env.store.get_run(run_id)).status == "failed"


# Found by a review (each failed before its fix): BatchedReads and the wake-up marks.


async def _followed_from(env: Any, rid: str, afters: tuple[int, ...], seconds: float
                         ) -> dict[int, list[tuple[float, int]]]:
    """The events (trio time, seq) each of several readers of ``rid`` got, one per cursor of
    ``afters``, all started at once and stopped after ``seconds``."""
    got: dict[int, list[tuple[float, int]]] = {after: [] for after in afters}

    async def follow(after: int) -> None:
        r = EventReader(rid, after=after, store=env.store, supervisor=env.supervisor,
                        keepalive=5.0)
        async for e in r:
            if not isinstance(e, Keepalive):
                got[after].append((trio.current_time(), e.seq))

    async with trio.open_nursery() as nursery:
        for after in afters:
            nursery.start_soon(follow, after)
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel()
    return got


async def test_a_reader_batched_with_a_lower_cursor_is_not_taken_as_drained(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # READ_LIMIT made small so the test stays cheap (the same happens at 10,000).
    monkeypatch.setattr(reads_mod, "READ_LIMIT", 10)
    async with supervisor_env(tmp_path, ScriptedBackend([])) as env:
        begun, other = await _stored_elsewhere(env)  # a run another live instance holds
        rid = begun.run.id
        await other.append_run_events(
            [RunEvent(rid, s, "token", {"text": str(s)}, 0.0) for s in range(2, 26)])
        env.supervisor.wakeups.notified("*")  # the listener is up; nothing more is committed
        # Both ask in the same batch: read from cursor 0.
        got = await _followed_from(env, rid, (0, 5), 3.0)
        assert [s for _, s in got[0]] == list(range(1, 26))
        assert [s for _, s in got[5]] == list(range(6, 26))
        # All 25 events were in the store from the start: nobody should wait a poll for them.
        late = [(t, s) for t, s in got[5] if t > 0.0]
        assert late == [], f"reader after=5 got these only after a poll: {late[:3]}..."


async def test_a_reader_far_past_another_readers_cursor_gets_the_runs_end(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reads_mod, "READ_LIMIT", 10)  # as 10,000, only cheaper
    async with supervisor_env(tmp_path, ScriptedBackend([])) as env:
        begun, other = await _stored_elsewhere(env)
        rid = begun.run.id
        await other.append_run_events(
            [RunEvent(rid, s, "token", {"text": str(s)}, 0.0) for s in range(2, 26)])
        await _finished_elsewhere(other, begun, 26)  # over: the store has all 26 events

        # Each batched query waits for the test's go, so that the test decides what is asked
        # together (in production: whatever readers happen to ask while a read is in flight).
        calls: list[tuple[dict[str, int], trio.Event]] = []
        query = env.store.list_events_of_runs

        async def gated(cursors: Any, **bounds: Any) -> Any:
            go = trio.Event()
            calls.append((dict(cursors), go))
            await go.wait()
            return await query(cursors, **bounds)

        monkeypatch.setattr(env.store, "list_events_of_runs", gated)
        reads = env.supervisor.reads
        got: list[int] = []
        ended = trio.Event()

        async def follow_from_15() -> None:
            r = EventReader(rid, after=15, store=env.store, supervisor=env.supervisor,
                            keepalive=5.0)
            got.extend([e.seq async for e in r if not isinstance(e, Keepalive)])
            ended.set()

        async def replay_from_start() -> None:  # another client reading the run from 0
            await reads.read(rid, 0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reads.read, "run_other", 0)  # a read in flight
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(follow_from_15)
            nursery.start_soon(replay_from_start)
            await trio.testing.wait_all_tasks_blocked()
            calls[0][1].set()  # batch 2: {rid: cursors 15 and 0}
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(reads.read, "run_other", 0)  # asked while batch 2 is read
            await trio.testing.wait_all_tasks_blocked()
            calls[1][1].set()
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(replay_from_start)  # another replay asks with the reader
            await trio.testing.wait_all_tasks_blocked()
            for _, go in calls[2:]:
                go.set()
            while not ended.is_set():
                await trio.testing.wait_all_tasks_blocked()
                for _, go in calls:
                    go.set()
                await trio.sleep(0.01)
            assert [c for c, _ in calls] == [{"run_other": 0}, {rid: 0}, {"run_other": 0},
                                             {rid: 0}]
        # The reader asked for everything after 15: 16..25 and run.finished (26).
        assert got == list(range(16, 27))


async def test_a_read_in_flight_when_the_listener_comes_back_is_followed_by_another(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with supervisor_env(tmp_path, ScriptedBackend([])) as env:
        begun, other = await _stored_elsewhere(env)  # a run another live instance holds
        rid = begun.run.id
        wakeups = env.supervisor.wakeups
        wakeups.notified("*")
        wakeups.notified("!")  # the listening connection is lost: readers poll

        # The reader's first store read: its rows are read, then its answer is held until
        # the test lets it go (a read that takes a moment).
        query = env.store.list_events_of_runs
        read_done, go = trio.Event(), trio.Event()

        async def slow(cursors: Any, **bounds: Any) -> Any:
            rows = await query(cursors, **bounds)
            if not go.is_set():
                read_done.set()
                await go.wait()
            return rows

        monkeypatch.setattr(env.store, "list_events_of_runs", slow)
        got: list[tuple[float, int]] = []

        async def follow() -> None:
            r = EventReader(rid, after=1, store=env.store, supervisor=env.supervisor,
                            keepalive=5.0)
            async for e in r:
                if not isinstance(e, Keepalive):
                    got.append((trio.current_time(), e.seq))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            await read_done.wait()  # the reader's read has its rows (none after 1)
            start = trio.current_time()
            # Meanwhile: the other instance commits event 2 (its notification is lost: no
            # listener), then the listener is back and says "*": every reader reads again.
            await other.append_run_events([RunEvent(rid, 2, "token", {"text": "x"}, 0.0)])
            wakeups.notified("*")
            go.set()
            await trio.sleep(2.0)
            nursery.cancel_scope.cancel()
        assert [s for _, s in got] == [2]
        waited = got[0][0] - start
        assert waited < 0.2, f"event 2 (committed while the listener was away) after {waited} s"


async def test_a_cancelled_read_does_not_make_the_next_one_skip_an_announced_commit(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with supervisor_env(tmp_path, ScriptedBackend([])) as env:
        begun, other = await _stored_elsewhere(env)  # a run another live instance holds
        rid = begun.run.id
        wakeups = env.supervisor.wakeups
        wakeups.notified("*")  # the listener is up
        reader = EventReader(rid, after=0, store=env.store, supervisor=env.supervisor,
                             keepalive=5.0)
        assert (await reader.__anext__()).seq == 1  # a read that returned all there was

        await other.append_run_events([RunEvent(rid, 2, "token", {"text": "x"}, 0.0)])
        wakeups.notified(rid)  # ... announced

        query = env.store.list_events_of_runs
        go = trio.Event()

        async def slow(cursors: Any, **bounds: Any) -> Any:
            await go.wait()
            return await query(cursors, **bounds)

        monkeypatch.setattr(env.store, "list_events_of_runs", slow)
        with trio.move_on_after(0.01):  # the caller's own deadline ends this __anext__
            await reader.__anext__()
        go.set()
        start = trio.current_time()
        item = await reader.__anext__()
        assert getattr(item, "seq", None) == 2
        assert trio.current_time() - start < 0.2, (
            f"event 2, committed and announced, came after {trio.current_time() - start} s")


async def test_reads_cut_by_size_are_not_taken_as_drained(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store read stops once its events' JSON passes ``READ_CHARS`` (a follower holds one
    page, not the whole run): a reader cut short so reads on at once, alone or batched with
    another from a lower cursor, and never waits a poll for what the store already had."""
    monkeypatch.setattr(reads_mod, "READ_CHARS", 300)  # as 1 Mi characters, only cheaper
    async with supervisor_env(tmp_path, ScriptedBackend([])) as env:
        begun, other = await _stored_elsewhere(env)  # a run another live instance holds
        rid = begun.run.id
        await other.append_run_events(
            [RunEvent(rid, s, "token", {"text": "x" * 100}, 0.0) for s in range(2, 26)])
        env.supervisor.wakeups.notified("*")  # the listener is up; nothing more is committed
        page = await env.store.list_run_events(rid, max_chars=300)
        assert [e.seq for e in page] == [1, 2, 3]  # up to the one past 300 characters
        got = await _followed_from(env, rid, (0, 5), 3.0)
        assert [s for _, s in got[0]] == list(range(1, 26))
        assert [s for _, s in got[5]] == list(range(6, 26))
        late = [(t, s) for who in got.values() for t, s in who if t > 0.0]
        assert late == [], f"got these only after a poll: {late[:3]}..."
