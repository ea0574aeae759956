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
