"""Reading a run's events: store then live, keep-alives when idle, resume after a gap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from service.api.sse import sse_event
from service.api.streams import EventReader, Keepalive
from service.runs import RunSpec
from service.store import MessageStatus, RunEventRecord

from .fakes import Reply, ScriptedBackend, supervisor_env


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
    from service.api.openai import _chunk, _frame, _token_prefix
    from service.api.sse import sse_data
    from service.runs import RunEvent

    for text in ["plain", 'quote " and \\ back', "new\nline", "ünïcødé ✓", ""]:
        event = RunEvent.make("run_x", 2, "token", {"text": text}, 0.0)
        fast = _frame(event, "chatcmpl-x", 7, "m", _token_prefix("chatcmpl-x", 7, "m"))
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
            reader = EventReader(run_id, after=0, store=env.store, supervisor=env.supervisor,
                                 keepalive=5.0)
            got.extend([e.type async for e in reader if not isinstance(e, Keepalive)])
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


async def test_a_run_stored_by_another_live_worker_is_followed_until_its_end(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Another worker sharing the store file runs it (here: stored, never live in this process).
    async with supervisor_env(tmp_path, ScriptedBackend([])) as env:
        conv = await env.conversation()
        begun = await env.store.begin_run(conv, content="q", agent="chat", model=None)
        run_id = begun.run.id
        got: list[tuple[float, str]] = []
        start = trio.current_time()

        async def read() -> None:
            reader = EventReader(run_id, after=0, store=env.store, supervisor=env.supervisor,
                                 keepalive=5.0)
            async for e in reader:
                kind = "keepalive" if isinstance(e, Keepalive) else e.type
                got.append((round(trio.current_time() - start, 1), kind))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.sleep(12.0)
            await env.store.finish_run(
                run_id, status="succeeded", message_id=begun.reply.id, content="done",
                message_status=MessageStatus.complete, error=None, usage={},
                events=[RunEventRecord(run_id, 2, "run.finished", {"status": "succeeded"}, 0.0)])
        assert [k for _, k in got] == ["run.started", "keepalive", "keepalive", "run.finished"]
        assert got[-1][0] == pytest.approx(12.0, abs=0.2)


async def test_a_run_left_running_by_a_dead_process_ends_the_stream(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Not waited for: nothing will finish it before the next start's recovery.
    async with supervisor_env(tmp_path, ScriptedBackend([])) as env:
        conv = await env.conversation()
        begun = await env.store.begin_run(conv, content="q", agent="chat", model=None)
        env.store._writer.execute(  # type: ignore[union-attr]
            "UPDATE runs SET process = '999999999:1' WHERE id = ?", (begun.run.id,))
        reader = EventReader(begun.run.id, after=0, store=env.store,
                             supervisor=env.supervisor, keepalive=5.0)
        with trio.fail_after(1):
            assert [e.type async for e in reader if not isinstance(e, Keepalive)] == [
                "run.started"]
