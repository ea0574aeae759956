"""Runs under the supervisor, in virtual time: lifecycle, events, cancel, deadline, shutdown."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from service.agents import Agent, AgentContext
from service.backends.base import ChatRequest
from service.errors import BackendUnavailable, IllegalTransition, TooManyRuns
from service.runs import ResumeFrom, RunEvent, RunSpec, RunStatus, check_transition
from service.runs.handle import RunHandle
from service.store import MessageStatus

from ..fakes import Reply, ScriptedBackend, supervisor_env


async def _events(env, run_id):  # type: ignore[no-untyped-def]
    return await env.store.list_run_events(run_id)


def test_lifecycle_refuses_illegal_transitions() -> None:
    check_transition(RunStatus.queued, RunStatus.running)
    check_transition(RunStatus.running, RunStatus.timed_out)
    for old, new in [
        (RunStatus.succeeded, RunStatus.running),
        (RunStatus.cancelled, RunStatus.succeeded),
        (RunStatus.queued, RunStatus.succeeded),
        (RunStatus.running, RunStatus.queued),
    ]:
        with pytest.raises(IllegalTransition):
            check_transition(old, new)


async def test_chat_run_streams_stores_and_finishes_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    backend = ScriptedBackend([Reply("Hello there, friend", gap=1.0)])
    async with supervisor_env(tmp_path, backend) as env:
        conv = await env.conversation(system="be brief")
        handle = await env.supervisor.start(RunSpec(conv, "hi", agent="chat"))
        seen = [e async for e in handle.subscribe()]
        await handle.finished.wait()
        assert handle.status is RunStatus.succeeded
        assert [e.seq for e in seen] == list(range(1, len(seen) + 1))
        assert seen[0].type == "run.started"
        tokens = [e.data["text"] for e in seen if e.type == "token"]
        assert tokens == ["Hello ", "there, ", "friend"]
        assert seen[-2].type == "message"
        assert seen[-1].type == "run.finished"
        assert seen[-1].data["status"] == "succeeded"
        assert seen[-1].data["usage"]["completion_tokens"] == 3
        assert [e.type for e in seen].count("run.finished") == 1
        # Every event a subscriber saw is in the store, in the same order.
        assert [(e.seq, e.type) for e in await _events(env, handle.id)] == [
            (e.seq, e.type) for e in seen
        ]
        msgs = await env.store.get_messages(conv)
        assert [(m.role, m.content, m.status) for m in msgs] == [
            ("user", "hi", MessageStatus.complete),
            ("assistant", "Hello there, friend", MessageStatus.complete),
        ]
        run = await env.store.get_run(handle.id)
        assert run.status == "succeeded"
        assert run.usage["completion_tokens"] == 3
        # The model saw the system prompt and the question.
        sent = backend.streams[0].request.messages
        assert [(m.role, m.content) for m in sent] == [("system", "be brief"), ("user", "hi")]


async def test_history_carries_earlier_turns(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    backend = ScriptedBackend([Reply("first answer"), Reply("second answer")])
    async with supervisor_env(tmp_path, backend) as env:
        conv = await env.conversation()
        h1 = await env.supervisor.start(RunSpec(conv, "q1"))
        await h1.finished.wait()
        h2 = await env.supervisor.start(RunSpec(conv, "q2"))
        await h2.finished.wait()
        sent = backend.streams[1].request.messages
        assert [(m.role, m.content) for m in sent] == [
            ("user", "q1"), ("assistant", "first answer"), ("user", "q2")
        ]


async def test_late_subscriber_resumes_from_any_seq(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    backend = ScriptedBackend([Reply("a b c d e f", gap=1.0)])
    async with supervisor_env(tmp_path, backend) as env:
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, "go"))
        await trio.sleep(3.5)
        whole = [e async for e in handle.subscribe(0)]
        tail = [e async for e in handle.subscribe(4)]
        assert [e.seq for e in tail] == [e.seq for e in whole if e.seq > 4]


async def test_slow_subscriber_is_told_to_resume_not_kept() -> None:
    events = []
    handle = RunHandle(run_id="run_x", conversation_id="c", agent="chat", model=None,
                       owner=None, message_id="m", sink=events.append, window=10)
    sub = handle.subscribe(0)
    for _ in range(25):
        handle.publish([handle.emit("token", {"text": "x"})])
    # The window kept only the newest events; the subscriber at 0 must re-read from the store.
    with pytest.raises(ResumeFrom) as info:
        await sub.__anext__()
    assert info.value.seq == 0
    assert handle.buffered <= 10


def test_ready_takes_published_events_without_waiting() -> None:
    events: list[RunEvent] = []
    handle = RunHandle(run_id="run_x", conversation_id="c", agent="chat", model=None,
                       owner=None, message_id="m", sink=events.append, window=10)
    sub = handle.subscribe(0)
    assert sub.ready() is None  # nothing published yet: the caller must wait
    first, second = handle.emit("token", {"text": "a"}), handle.emit("token", {"text": "b"})
    assert sub.ready() is None  # emitted is not published (not yet in the store)
    handle.publish([first, second])
    assert [sub.ready(), sub.ready(), sub.ready()] == [first, second, None]
    handle.publish([handle.emit("run.finished", {"status": "succeeded"})])
    assert sub.ready().type == "run.finished"  # type: ignore[union-attr]
    with pytest.raises(StopAsyncIteration):
        sub.ready()
    busy = RunHandle(run_id="run_y", conversation_id="c", agent="chat", model=None,
                     owner=None, message_id="m", sink=events.append, window=10)
    behind = busy.subscribe(0)
    for _ in range(25):
        busy.publish([busy.emit("token", {"text": "x"})])
    with pytest.raises(ResumeFrom):
        behind.ready()  # the window moved past it: re-read the store


def test_events_committed_before_a_reserved_first_event_wait_behind_it() -> None:
    # A /v1 run writes run.started with the run itself and starts working meanwhile: events
    # the committer stores before that write is known to have landed are held, not published
    # ahead of event 1.
    events: list[RunEvent] = []
    handle = RunHandle(run_id="run_x", conversation_id="c", agent="chat", model=None,
                       owner=None, message_id="m", sink=events.append, window=10)
    handle.reserve_first_event()
    sub = handle.subscribe(0)
    token = handle.emit("token", {"text": "a"})
    assert token.seq == 2
    handle.publish([token])
    assert sub.ready() is None
    assert handle.published_seq == 0
    started = RunEvent.make("run_x", 1, "run.started", {"run_id": "run_x"}, 0.0)
    handle.adopt_first_event(started)
    assert [sub.ready(), sub.ready(), sub.ready()] == [started, token, None]
    handle.publish([handle.emit("token", {"text": "b"})])  # no longer held
    assert sub.ready().seq == 3  # type: ignore[union-attr]
    assert [e.seq for e in events] == [2, 3]  # event 1 never went through the committer


@pytest.mark.parametrize("stage", ["before_first_token", "mid_stream"])
async def test_cancel_during_llm_stream(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, stage: str
) -> None:
    reply = Reply("one two three four five", first_delay=10.0, gap=1.0)
    backend = ScriptedBackend([reply])
    async with supervisor_env(tmp_path, backend) as env:
        baseline = len(env.supervisor.nursery.child_tasks)
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, "hi"))
        await trio.sleep(5.0 if stage == "before_first_token" else 12.5)
        cancelled_at = trio.current_time()
        handle.cancel("client went away")
        await handle.finished.wait()
        assert trio.current_time() == cancelled_at  # within one scheduling round
        assert handle.status is RunStatus.cancelled
        (stream,) = backend.streams
        assert stream.closed
        assert stream.cancelled
        assert not stream.completed
        msgs = await env.store.get_messages(conv)
        expected = "" if stage == "before_first_token" else "one two three "
        assert (msgs[1].content, msgs[1].status) == (expected, MessageStatus.cancelled)
        assert msgs[1].error == "client went away"
        run = await env.store.get_run(handle.id)
        assert (run.status, run.error) == ("cancelled", "client went away")
        events = await _events(env, handle.id)
        assert events[-1].type == "run.finished"
        assert events[-1].data["status"] == "cancelled"
        await trio.testing.wait_all_tasks_blocked()
        assert len(env.supervisor.nursery.child_tasks) == baseline
        # Cancel is idempotent and keeps the first reason.
        handle.cancel("again")
        assert handle.cancel_reason == "client went away"


async def test_deadline_times_out_the_run(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    backend = ScriptedBackend([Reply("slow answer here", gap=4.0)])
    async with supervisor_env(tmp_path, backend, run_timeout=6.0) as env:
        baseline = len(env.supervisor.nursery.child_tasks)
        conv = await env.conversation()
        start = trio.current_time()
        handle = await env.supervisor.start(RunSpec(conv, "hi"))
        await handle.finished.wait()
        assert trio.current_time() - start == pytest.approx(6.0)
        assert handle.status is RunStatus.timed_out
        assert backend.streams[0].cancelled
        msgs = await env.store.get_messages(conv)
        assert (msgs[1].content, msgs[1].status) == ("slow answer ", MessageStatus.cancelled)
        assert (await env.store.get_run(handle.id)).status == "timed_out"
        # Its stream says why with the type, as a non-stream answer's 504 run_timeout does
        # (a contract review: the error event was missing, docs/api.md says it carries it).
        events = await env.store.list_run_events(handle.id)
        assert [(e.type, e.data.get("type")) for e in events[-2:]] == [
            ("error", "run_timeout"), ("run.finished", None)]
        await trio.testing.wait_all_tasks_blocked()
        assert len(env.supervisor.nursery.child_tasks) == baseline


async def test_request_timeout_overrides_default(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    backend = ScriptedBackend([Reply("x", first_delay=100.0)])
    async with supervisor_env(tmp_path, backend, run_timeout=300.0) as env:
        conv = await env.conversation()
        start = trio.current_time()
        handle = await env.supervisor.start(RunSpec(conv, "hi", timeout=2.5))
        await handle.finished.wait()
        assert trio.current_time() - start == pytest.approx(2.5)
        assert handle.status is RunStatus.timed_out


class _BuggyAgent(Agent):
    name = "buggy"

    async def run(self, ctx: AgentContext) -> str:
        await trio.sleep(1)
        raise KeyError("oops")


async def test_agent_bug_fails_that_run_only(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    from service.agents import ChatAgent

    backend = ScriptedBackend([Reply("fine answer", gap=1.0)])
    agents = {"chat": ChatAgent(), "buggy": _BuggyAgent()}
    async with supervisor_env(tmp_path, backend, agents=agents) as env:
        conv = await env.conversation()
        bad = await env.supervisor.start(RunSpec(conv, "x", agent="buggy"))
        good = await env.supervisor.start(RunSpec(conv, "y", agent="chat"))
        await bad.finished.wait()
        await good.finished.wait()
        assert bad.status is RunStatus.failed
        assert "KeyError" in (bad.error or "")
        assert good.status is RunStatus.succeeded
        events = await _events(env, bad.id)
        assert [e.type for e in events][-2:] == ["error", "run.finished"]
        msgs = {m.run_id: m for m in await env.store.get_messages(conv) if m.role == "assistant"}
        assert msgs[bad.id].status is MessageStatus.error
        assert msgs[good.id].status is MessageStatus.complete


async def test_backend_error_fails_the_run_with_its_message(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    err = BackendUnavailable("upstream died", backend="fake")
    backend = ScriptedBackend([Reply("a b c d", fail_after=2, error=err)])
    async with supervisor_env(tmp_path, backend) as env:
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, "x"))
        await handle.finished.wait()
        assert handle.status is RunStatus.failed
        assert handle.error == "upstream died"
        msgs = await env.store.get_messages(conv)
        assert (msgs[1].content, msgs[1].status) == ("a b ", MessageStatus.error)
        events = await _events(env, handle.id)
        assert events[-2].data == {"type": "backend_unavailable", "message": "upstream died"}


async def test_max_runs_refuses_past_the_limit(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    backend = ScriptedBackend(lambda req: Reply("x", first_delay=10.0))
    async with supervisor_env(tmp_path, backend, max_runs=2) as env:
        conv = await env.conversation()
        await env.supervisor.start(RunSpec(conv, "1"))
        await env.supervisor.start(RunSpec(conv, "2"))
        with pytest.raises(TooManyRuns):
            await env.supervisor.start(RunSpec(conv, "3"))
        await trio.sleep(11)
        assert env.supervisor.in_flight == 0
        h = await env.supervisor.start(RunSpec(conv, "4"))
        await h.finished.wait()


async def test_shutdown_cancels_runs_and_stores_their_state(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    backend = ScriptedBackend(lambda req: Reply("w1 w2 w3 w4 w5 w6", gap=1.0))
    async with supervisor_env(tmp_path, backend) as env:
        conv = await env.conversation()
        handles = [await env.supervisor.start(RunSpec(conv, f"q{i}")) for i in range(5)]
        await trio.sleep(2.5)
        # Hard shutdown: the supervisor's own scope is cancelled.
        env.nursery.cancel_scope.cancel()
    for h in handles:
        assert h.status is RunStatus.cancelled
        assert h.cancel_reason == "shutdown"
    # The store was closed by supervisor_env: reopen and check every run's final state.
    from service.store import SQLiteStore

    store = SQLiteStore(tmp_path / "runs.db", threaded=False)
    await store.open()
    try:
        for h in handles:
            run = await store.get_run(h.id)
            assert run.status == "cancelled"
            events = await store.list_run_events(h.id)
            assert events[-1].type == "run.finished"
        replies = [m for m in await store.get_messages(conv) if m.role == "assistant"]
        assert all(m.status is MessageStatus.cancelled for m in replies)
        assert all(m.content.startswith("w1 w2") for m in replies)
    finally:
        await store.aclose()
    assert all(s.closed for s in backend.streams)


async def test_drain_lets_short_runs_finish_and_cancels_the_rest(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    def reply(req):  # type: ignore[no-untyped-def]
        slow = req.messages[-1].content == "slow"
        return Reply("a b c", gap=100.0 if slow else 1.0)

    async with supervisor_env(tmp_path, ScriptedBackend(reply)) as env:
        conv = await env.conversation()
        quick = await env.supervisor.start(RunSpec(conv, "quick"))
        slow = await env.supervisor.start(RunSpec(conv, "slow"))
        start = trio.current_time()
        await env.supervisor.drain(grace=5.0)
        assert trio.current_time() - start == pytest.approx(5.0)
        assert quick.status is RunStatus.succeeded
        assert slow.status is RunStatus.cancelled
        assert slow.cancel_reason == "shutdown"
        from service.errors import ShuttingDown

        with pytest.raises(ShuttingDown):
            await env.supervisor.start(RunSpec(conv, "late"))


async def test_500_concurrent_runs(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    def reply(req):  # type: ignore[no-untyped-def]
        n = req.messages[-1].content
        return Reply(f"answer {n}", gap=0.5, first_delay=1.0)

    backend = ScriptedBackend(reply)
    async with supervisor_env(tmp_path, backend) as env:
        convs = [await env.conversation() for _ in range(50)]
        handles = []
        for i in range(500):
            handles.append(await env.supervisor.start(RunSpec(convs[i % 50], str(i))))
        for h in handles:
            await h.finished.wait()
        assert all(h.status is RunStatus.succeeded for h in handles)
        for i, h in enumerate(handles):
            events = await env.store.list_run_events(h.id)
            assert events[-2].data["content"] == f"answer {i}"
        assert env.supervisor.in_flight == 0
        assert backend.open_streams == 0


class _MessyToolAgent(Agent):
    """Starts a 'tool' that raises while it is being cancelled (found in review)."""

    name = "messy"

    async def run(self, ctx: AgentContext) -> str:
        async def tool() -> None:
            try:
                await trio.sleep_forever()
            finally:
                raise ValueError("tool cleanup failed on cancel")

        ctx.nursery.start_soon(tool)
        await trio.sleep_forever()
        return ""


async def test_a_tool_failing_while_cancelled_ends_only_its_run(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    from service.agents import ChatAgent

    agents = {"messy": _MessyToolAgent(), "chat": ChatAgent()}
    backend = ScriptedBackend(lambda req: Reply("slow reply here", gap=5.0))
    async with supervisor_env(tmp_path, backend, agents=agents) as env:
        conv = await env.conversation()
        messy = await env.supervisor.start(RunSpec(conv, "x", agent="messy"))
        other = await env.supervisor.start(RunSpec(conv, "y", agent="chat"))
        await trio.sleep(1)
        messy.cancel("cancelled by request")
        await messy.finished.wait()
        assert messy.status is RunStatus.cancelled
        await other.finished.wait()
        assert other.status is RunStatus.succeeded  # the supervisor survived
        # And at shutdown, a messy run does not turn the cancellation into a crash.
        late = await env.supervisor.start(RunSpec(conv, "z", agent="messy"))
        await trio.sleep(1)
    assert late.status is RunStatus.cancelled
    assert late.cancel_reason == "shutdown"


async def test_a_tool_failing_as_the_deadline_cuts_it_is_still_a_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Suspected by a review: a run whose deadline passed while a tool raised as it unwound
    # was stored (and told) failed "internal_error", as a bug of ours: its deadline ended it.
    agents = {"messy": _MessyToolAgent()}
    async with supervisor_env(tmp_path, ScriptedBackend(), agents=agents) as env:
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, "x", agent="messy", timeout=3))
        await handle.finished.wait()
        assert (handle.status, handle.error_type) == (RunStatus.timed_out, "run_timeout")
        run = await env.store.get_run(handle.id)
        events = await env.store.list_run_events(handle.id)
    assert (run.status, run.error) == ("timed_out", "the run's deadline passed")
    assert events[-1].data["status"] == "timed_out"


async def test_events_are_published_even_when_the_store_is_stuck(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Found in review: a batch whose write ran past its budget was neither stored nor
    # published, and subscribers then skipped events or hung.
    gate = trio.Event()

    class Burst(Agent):
        name = "burst"

        async def run(self, ctx: AgentContext) -> str:
            await gate.wait()
            for i in range(3):
                ctx.emit("token", {"text": f"a{i} "})
            await trio.sleep(30)
            for i in range(3):
                ctx.emit("token", {"text": f"b{i} "})
            await trio.sleep(1)
            return "done"

    async with supervisor_env(tmp_path, ScriptedBackend(), agents={"burst": Burst()}) as env:
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, "q", agent="burst"))
        seen: list[int] = []

        async def follow() -> None:
            async for e in handle.subscribe(0):
                seen.append(e.seq)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            await trio.testing.wait_all_tasks_blocked()
            await env.store.faults.hold_writes()  # the store is stuck for 20 s
            gate.set()
            await trio.sleep(20)
            env.store.faults.release_writes()
            await handle.finished.wait()
        assert seen == list(range(1, handle.emitted_seq + 1))  # no gap, and it ended
        assert handle.status is RunStatus.succeeded


def _refuse_final_writes(env, until: float, error: Exception | None = None) -> None:  # type: ignore[no-untyped-def]
    """The store refuses every ``finish_run`` (a full disk) until ``until`` on trio's clock."""
    from service.errors import StoreUnavailable

    real = env.store.finish_run

    async def flaky(*args, **kwargs):  # type: ignore[no-untyped-def]
        if trio.current_time() < until:
            raise error or StoreUnavailable("store write failed: database or disk is full")
        return await real(*args, **kwargs)

    env.store.finish_run = flaky


async def test_a_refused_final_write_is_retried_before_the_end_is_shown(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Found by a fault suite: run.finished was published before the final state was stored;
    # a kill -9 then left a client told "succeeded" and a store saying "failed".
    backend = ScriptedBackend([Reply("all of it")])
    async with supervisor_env(tmp_path, backend) as env:
        _refuse_final_writes(env, until=trio.current_time() + 3)
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, "x"))
        seen = []
        async for e in handle.subscribe():
            seen.append(e.type)
            if e.type == "run.finished":  # what the store says when the client is told
                assert (await env.store.get_run(handle.id)).status == "succeeded"
                msgs = await env.store.get_messages(conv)
                assert (msgs[1].content, msgs[1].status) == ("all of it",
                                                             MessageStatus.complete)
        assert seen[-2:] == ["message", "run.finished"]
        assert trio.current_time() >= 3
        assert handle.status is RunStatus.succeeded
        assert handle.final_stored
        assert [e.type for e in await env.store.list_run_events(handle.id)][-2:] == [
            "message", "run.finished"]


async def test_a_final_write_refused_past_its_budget_is_not_shown_as_an_end(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    from service.errors import StoreUnavailable
    from service.runs.committer import FINAL_WRITE_BUDGET
    from service.runs.reader import EventReader, Keepalive

    backend = ScriptedBackend([Reply("all of it")])
    async with supervisor_env(tmp_path, backend) as env:
        _refuse_final_writes(env, until=trio.current_time() + 60)
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, "x"))
        seen: list[str] = []

        async def follow() -> None:
            async for e in handle.subscribe():
                seen.append(e.type)

        with pytest.raises(StoreUnavailable):
            await follow()
        assert "run.finished" not in seen
        assert "message" not in seen
        assert FINAL_WRITE_BUDGET <= trio.current_time() < FINAL_WRITE_BUDGET + 3
        # Nobody is told what the store does not say: it has the run running, and so does
        # the service.
        assert (await env.store.get_run(handle.id)).status == "running"
        assert handle.status is RunStatus.running
        assert not handle.final_stored
        assert env.supervisor.unstored == 1
        reader = EventReader(handle.id, after=0, store=env.store, supervisor=env.supervisor,
                             keepalive=5.0)
        with pytest.raises(StoreUnavailable):  # a re-join meanwhile: told so, no end
            [e async for e in reader]
        await trio.sleep(60)  # the store is back: the checkpoint loop's retry lands
        assert (await env.store.get_run(handle.id)).status == "succeeded"
        assert handle.status is RunStatus.succeeded
        assert env.supervisor.unstored == 0
        assert env.supervisor.get(handle.id) is None
        reader = EventReader(handle.id, after=0, store=env.store, supervisor=env.supervisor,
                             keepalive=5.0)
        rejoined = [e for e in [e async for e in reader] if not isinstance(e, Keepalive)]
        assert [e.type for e in rejoined][-2:] == ["message", "run.finished"]
        assert [e.seq for e in rejoined] == list(range(1, len(rejoined) + 1))


def _new_conversation_spec(question: str = "q") -> RunSpec:
    """A run as the OpenAI-compatible endpoint starts it: a new conversation, its own history."""
    from service.backends.base import ChatMessage

    return RunSpec(
        conversation_id=None, content=question, agent="chat", model="m",
        new_conversation={"title": question, "system": None, "model": "m", "agent": "chat"},
        messages=(ChatMessage("user", question),),
    )


async def _hold_writes(store, until: trio.Event, *, task_status=trio.TASK_STATUS_IGNORED):  # type: ignore[no-untyped-def]
    """The store's writer is busy (another task holds it) until ``until`` is set."""
    async with store.faults.writes_held():
        task_status.started()
        await until.wait()


async def test_a_new_conversation_run_calls_the_model_while_its_first_write_commits(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    backend = ScriptedBackend([Reply("one two three", gap=0.5)])
    async with supervisor_env(tmp_path, backend) as env:
        started: list[RunHandle] = []

        async def start() -> None:
            started.append(await env.supervisor.start(_new_conversation_spec()))

        async with trio.open_nursery() as nursery:
            free = trio.Event()
            await nursery.start(_hold_writes, env.store, free)  # busy for 3 s
            nursery.start_soon(start)
            with trio.fail_after(1):  # the model is called before the run is stored...
                await backend.wait_stream(0)
            await trio.sleep(3)
            assert not started  # ... and the caller waits for the write
            (live,) = env.supervisor.live()
            assert live.emitted_seq >= 2
            assert live.published_seq == 0
            free.set()
        (handle,) = started
        assert handle is live
        seen = [e async for e in handle.subscribe()]
        await handle.finished.wait()
        assert handle.status is RunStatus.succeeded
        assert [e.seq for e in seen] == list(range(1, len(seen) + 1))
        assert seen[0].type == "run.started"
        assert seen[0].data == {"run_id": handle.id, "conversation_id": handle.conversation_id,
                                "agent": "chat", "model": "m"}
        # Events emitted while the run's own write was queued landed after it, all of them.
        assert [(e.seq, e.type) for e in await _events(env, handle.id)] == [
            (e.seq, e.type) for e in seen
        ]
        msgs = await env.store.get_messages(handle.conversation_id)
        assert [(m.role, m.content, m.status) for m in msgs] == [
            ("user", "q", MessageStatus.complete),
            ("assistant", "one two three", MessageStatus.complete),
        ]
        assert (await env.store.get_run(handle.id)).status == "succeeded"


async def test_a_new_conversation_run_that_cannot_be_stored_is_cancelled(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    from service.errors import NotFound, StoreError
    from service.store.faults import InjectedFault

    backend = ScriptedBackend([Reply("never finished", first_delay=2.0, gap=5.0)])
    async with supervisor_env(tmp_path, backend) as env:
        async def failing_batch() -> None:  # the run's own write: the first batch
            env.store.faults.before_batch = None
            await trio.sleep(3)  # the upstream stream is open by then
            raise InjectedFault("disk I/O error")

        env.store.faults.before_batch = failing_batch
        with pytest.raises(StoreError):
            await env.supervisor.start(_new_conversation_spec())
        (stream,) = backend.streams
        await stream.closed_event.wait()
        assert stream.cancelled
        assert not stream.completed
        await trio.testing.wait_all_tasks_blocked()
        assert env.supervisor.in_flight == 0
        assert stream.request.run_id is not None
        with pytest.raises(NotFound):  # its later writes (events, final state) changed nothing
            await env.store.get_run(stream.request.run_id)
        assert await env.store.list_conversations() == ([], None)
        # Counted as a failed run (the service could not store it), not as a client's cancel.
        sample = env.metrics.registry.get_sample_value
        assert sample("service_runs_total", {"status": "failed"}) == 1
        assert sample("service_runs_total", {"status": "cancelled"}) is None


async def test_a_caller_gone_before_its_new_run_is_stored_cancels_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    backend = ScriptedBackend([Reply("never finished", gap=5.0)])
    async with supervisor_env(tmp_path, backend) as env:
        async with trio.open_nursery() as nursery:
            free = trio.Event()
            await nursery.start(_hold_writes, env.store, free)
            with trio.move_on_after(1):  # the client leaves while the run's write is queued
                await env.supervisor.start(_new_conversation_spec())
            free.set()
        (stream,) = backend.streams
        await stream.closed_event.wait()
        assert stream.cancelled
        assert not stream.completed
        await trio.testing.wait_all_tasks_blocked()
        assert env.supervisor.in_flight == 0
        assert await env.store.list_conversations() == ([], None)  # its write never ran


async def test_a_run_on_an_unknown_conversation_never_reaches_the_model(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    from service.errors import NotFound

    backend = ScriptedBackend([Reply("never")])
    async with supervisor_env(tmp_path, backend) as env:
        with pytest.raises(NotFound):
            await env.supervisor.start(RunSpec("conv_missing", "q"))
        await trio.testing.wait_all_tasks_blocked()
        assert backend.streams == []
        assert env.supervisor.in_flight == 0


async def test_a_new_run_waiting_for_its_write_counts_once_against_max_runs(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Found in review: it counted twice (registered, and still reserved) until its write landed.
    backend = ScriptedBackend([Reply("a", gap=1.0), Reply("b", gap=1.0)])
    async with supervisor_env(tmp_path, backend, max_runs=2) as env:
        handles: list[RunHandle] = []

        async def start(question: str) -> None:
            handles.append(await env.supervisor.start(_new_conversation_spec(question)))

        async with trio.open_nursery() as nursery:
            free = trio.Event()
            await nursery.start(_hold_writes, env.store, free)
            nursery.start_soon(start, "first")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(start, "second")  # the limit is 2: both fit
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(TooManyRuns):  # a third does not
                await env.supervisor.start(_new_conversation_spec("third"))
            free.set()
        for handle in handles:
            await handle.finished.wait()
        assert sorted(h.status.value for h in handles) == ["succeeded", "succeeded"]


async def test_a_cancel_asked_for_by_another_worker_stops_the_run(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Two workers share one store file; the client's cancel reached the other one, which
    # writes it to the store; the run's own supervisor finds it within _CANCEL_POLL.
    from service.store import SQLiteStore
    from service.store.sqlite import process_tag

    backend = ScriptedBackend([Reply("a long answer " * 50, gap=1.0)])
    async with supervisor_env(tmp_path, backend) as env:
        other = SQLiteStore(tmp_path / "runs.db", threaded=False)
        other.process_id = process_tag(os.getppid())  # another live process
        await other.open()
        try:
            conv = await env.conversation()
            handle = await env.supervisor.start(RunSpec(conv, "x"))
            await trio.sleep(3.0)
            assert await other.run_in_progress(handle.id) == "elsewhere"
            asked = trio.current_time()
            assert await other.request_cancel(handle.id, "cancelled by request")
            await handle.finished.wait()
            assert handle.status is RunStatus.cancelled
            assert handle.cancel_reason == "cancelled by request"
            assert trio.current_time() - asked <= 0.25 + 0.01
            assert (await other.get_run(handle.id)).status == "cancelled"
            assert not await other.request_cancel(handle.id, "again")  # over: nothing to ask
        finally:
            await other.aclose()


class _SteppingAgent(Agent):
    """A ReAct run's shape: a step's text streamed, its step events, then an answer begun."""

    name = "stepping"

    async def run(self, ctx: AgentContext) -> str:
        ctx.emit("token", {"text": "Thought: look it up\nAction: search"})
        ctx.emit("thought", {"text": "look it up"})
        ctx.emit("tool.call", {"name": "search", "arguments": {}, "call_id": "c1"})
        ctx.emit("tool.result", {"call_id": "c1", "output": "found"})
        ctx.emit("token", {"text": "The answer "})
        ctx.emit("token", {"text": "is"})
        await trio.sleep_forever()
        raise AssertionError("not reached")


async def test_a_cancelled_react_run_stores_the_answer_so_far_not_its_steps_text(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Found in review: the stored reply was every token of the run, the finished steps'
    # "Thought: ... Action: ..." included, which the clients had shown as steps (and the next
    # turn's history gave the model as its answer). Stored: the text after the last step.
    agents = {"stepping": _SteppingAgent()}
    async with supervisor_env(tmp_path, ScriptedBackend(lambda req: Reply("x")),
                              agents=agents) as env:
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, "q", agent="stepping"))
        await trio.sleep(1)
        handle.cancel()
        await handle.finished.wait()
        assert handle.status is RunStatus.cancelled
        [_, reply] = await env.store.get_messages(conv)
        assert (reply.status, reply.content) == (MessageStatus.cancelled, "The answer is")


class _ExitingAgent(Agent):
    name = "exiting"

    async def run(self, ctx: AgentContext) -> str:
        ctx.emit("token", {"text": "partial "})
        raise SystemExit(3)


async def test_an_agent_raising_systemexit_fails_its_run_only(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Found in review: anything not an Exception was taken for a shutdown and re-raised into
    # the supervisor's nursery, which ended the supervisor (the process kept answering HTTP).
    from service.agents import ChatAgent

    agents = {"exiting": _ExitingAgent(), "chat": ChatAgent()}
    async with supervisor_env(tmp_path, ScriptedBackend(lambda req: Reply("fine")),
                              agents=agents) as env:
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, "x", agent="exiting"))
        await handle.finished.wait()
        assert handle.status is RunStatus.failed
        assert handle.error_type == "internal_error"
        events = await env.store.list_run_events(handle.id)
        assert [e.type for e in events][-2:] == ["error", "run.finished"]
        assert events[-2].data["message"] == (
            "internal error (SystemExit); the details are in the service's log")
        assert events[-1].data["status"] == "failed"
        other = await env.supervisor.start(RunSpec(conv, "y", agent="chat"))
        await other.finished.wait()
        assert other.status is RunStatus.succeeded
        assert env.supervisor.failure is None


async def test_a_final_write_that_raises_a_non_store_error_still_ends_the_run(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found in review: the final write raising anything but StoreError (a UnicodeEncodeError
    # from text UTF-8 cannot encode) escaped into the supervisor: the run never finished (its
    # request hung) and the supervisor ended, taking every other run with it.
    async with supervisor_env(tmp_path, ScriptedBackend(lambda req: Reply("fine"))) as env:
        conv = await env.conversation()
        real = env.store.finish_run
        calls = 0

        async def finish_run(*args: object, **kwargs: object) -> bool:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise ValueError("a bug in what the store was given")
            return await real(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(env.store, "finish_run", finish_run)
        broken = await env.supervisor.start(RunSpec(conv, "x"))
        await broken.finished.wait()
        assert broken.end_error is not None  # its end is not shown: the store lacks it
        await trio.sleep(3)  # the checkpoint loop's retry stores it
        assert broken.status is RunStatus.succeeded
        assert (await env.store.get_run(broken.id)).status == "succeeded"
        after = await env.supervisor.start(RunSpec(conv, "y"))
        await after.finished.wait()
        assert after.status is RunStatus.succeeded
        assert env.supervisor.failure is None
        assert (await env.store.get_run(after.id)).status == "succeeded"


async def test_a_dead_sibling_workers_runs_are_closed_while_this_one_serves(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Found in review: runs left running by a worker that died (sharing the store file) were
    # only closed at the next start; a live sibling served them as "running" forever (a cancel
    # answered 202 "running", a re-join never got run.finished).
    async with supervisor_env(tmp_path, ScriptedBackend([])) as env:
        conv = await env.conversation()
        run_id = await env.run_of_a_dead_process(conv)
        assert await env.store.run_in_progress(run_id) is None
        await trio.sleep(31)
        run = await env.store.get_run(run_id)
        assert (run.status, run.error) == (
            "failed", "interrupted: the service stopped before the run finished")
        events = await env.store.list_run_events(run_id)
        assert [e.type for e in events][-1] == "run.finished"
        assert (await env.store.get_messages(conv))[-1].status is MessageStatus.error
        # And a second look (or another worker's) changes nothing.
        assert await env.store.recover_interrupted() == []


async def test_two_retry_passes_of_a_final_write_at_once_do_not_crash_the_supervisor(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found in review: the checkpoint loop and a drain both retried the same failed final
    # write; the second pass's list.remove raised ValueError and ended the supervisor.
    from service.errors import StoreError

    async with supervisor_env(tmp_path, ScriptedBackend([Reply("all of it")])) as env:
        conv = await env.conversation()
        real = env.store.finish_run
        calls = 0
        retrying = trio.Event()

        async def flaky(*args: object, **kwargs: object) -> bool:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise StoreError("store write failed: database or disk is full")
            retrying.set()
            await trio.sleep(3)  # a slow store: the other pass starts meanwhile
            return await real(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(env.store, "finish_run", flaky)
        handle = await env.supervisor.start(RunSpec(conv, "x"))
        await handle.finished.wait()
        await retrying.wait()  # the checkpoint loop's pass is inside the retry
        await env.supervisor.drain(0)  # ... and the drain's pass comes too
        await trio.sleep(5)
        assert env.supervisor.failure is None
        assert (await env.store.get_run(handle.id)).status == "succeeded"


async def test_old_runs_events_are_pruned_keeping_their_ends_and_messages(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # SERVICE_EVENTS_RETENTION_DAYS: every token is a row; a finished run's events go after
    # the retention, except run.started, message, error and run.finished (a re-join is still
    # told the answer and the end: it was told "succeeded" with no answer), and its reply
    # stays in its message. Runs still going are never touched.
    from service.runs.reader import EventReader

    def reply(req: ChatRequest) -> Reply:
        if req.messages[-1].content == "slow":
            return Reply("x " * 50, gap=10.0)
        return Reply("a b c d")

    backend = ScriptedBackend(reply)
    async with supervisor_env(tmp_path, backend, events_retention=1e-6) as env:
        conv = await env.conversation()
        done = await env.supervisor.start(RunSpec(conv, "quick"))
        await done.finished.wait()
        going = await env.supervisor.start(RunSpec(conv, "slow"))
        before = len(await env.store.list_run_events(done.id))
        assert before > 2
        await trio.sleep(61)  # one pruning round
        events = await env.store.list_run_events(done.id)
        assert [e.type for e in events] == ["run.started", "message", "run.finished"]
        assert events[1].data["content"] == "a b c d"
        messages = await env.store.get_messages(conv)
        assert [m.content for m in messages if m.run_id == done.id and m.role == "assistant"
                ] == ["a b c d"]
        assert len(await env.store.list_run_events(going.id)) > 2  # not finished: kept
        # A re-join of the pruned run: its start, its answer, then its end.
        reader = EventReader(done.id, after=0, store=env.store, supervisor=env.supervisor,
                             keepalive=15.0)
        assert [e.type async for e in reader] == ["run.started", "message", "run.finished"]
        going.cancel("cancelled by request")
        await going.finished.wait()
        # Bounded by rows: a long run is pruned over several transactions, then marked done.
        while await env.store.prune_events(time.time() + 1, rows=2):
            pass
        assert [e.type for e in await env.store.list_run_events(going.id)] == [
            "run.started", "run.finished"]
        assert await env.store.prune_events(time.time() + 1) == 0  # each run once


async def test_a_drain_while_a_final_write_is_retried_waits_for_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # A run whose end is numbered but not stored yet is closed (nothing can be emitted) though
    # not done: the drain's "shutdown" event must skip it (emitting raised, ending the drain).
    backend = ScriptedBackend([Reply("all of it")])
    async with supervisor_env(tmp_path, backend) as env:
        _refuse_final_writes(env, until=trio.current_time() + 4)
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, "x"))
        await trio.sleep(1)
        assert handle.closed
        assert not handle.done
        await env.supervisor.drain(1.0)
        assert handle.done
        assert (await env.store.get_run(handle.id)).status == "succeeded"
        assert env.supervisor.unstored == 0


async def test_a_run_another_instance_closed_ends_with_the_stored_end(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Issue 14 (fencing): this instance's lease lapsed (a stall) and another instance closed
    # its run as a dead instance's. The run here must stop, write nothing more, and tell its
    # clients the end the store has (failed, interrupted), not an end of its own: one
    # run.finished, and what each client saw is what the store holds.
    from service.store import SQLiteStore

    elsewhere = "999999999:1:another-boot-id:12345:4026531836"  # its lease decides
    backend = ScriptedBackend(lambda req: Reply(" ".join(["word"] * 50), gap=1.0))
    async with supervisor_env(tmp_path, backend, process_id=elsewhere) as env:
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, "x"))
        seen: list[RunEvent] = []

        async def follow() -> None:
            async for e in handle.subscribe():
                seen.append(e)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            while sum(e.type == "token" for e in seen) < 5:  # noqa: ASYNC110
                await trio.sleep(0.5)
            await env.store.renew_lease(-1)  # the lease lapses ...
            other = SQLiteStore(tmp_path / "runs.db", threaded=False)
            await other.open()
            try:
                assert await other.recover_interrupted() == [handle.id]  # ... B closes it
            finally:
                await other.aclose()
            with trio.fail_after(5):
                await handle.finished.wait()

        stored = await env.store.list_run_events(handle.id)
        assert [e.type for e in stored].count("run.finished") == 1
        assert [(e.seq, e.type, e.data) for e in seen] == [
            (e.seq, e.type, e.data) for e in stored]
        assert seen[-1].data["status"] == "failed"
        assert "interrupted" in seen[-1].data["error"]
        run = await env.store.get_run(handle.id)
        assert handle.status is RunStatus.failed
        assert run.status == "failed"
        (_, reply) = await env.store.get_messages(conv)
        assert handle.final_text == reply.content
        assert reply.content.startswith("word word word word word")
        assert not backend.streams[-1].completed  # stopped
        assert backend.streams[-1].closed


def test_the_window_is_bounded_by_its_events_bytes_too() -> None:
    """The in-memory window was bounded by its count of events only (20,000): a run's large
    tool results, or a long answer, were all held in memory for as long as the run lasted
    (20,000 results of 16,000 characters: gigabytes). Past its bytes' bound too, the oldest go,
    and a subscriber behind them re-reads the store."""
    events: list[RunEvent] = []
    handle = RunHandle(run_id="run_x", conversation_id="c", agent="chat", model=None,
                       owner=None, message_id="m", sink=events.append, window_bytes=10_000)
    sub = handle.subscribe(0)
    for _ in range(50):
        handle.publish([handle.emit("tool.result", {"output": "r" * 1_000})])
    kept = handle.buffered
    assert 1 <= kept <= 10, kept
    assert handle.published_seq == 50
    with pytest.raises(ResumeFrom) as info:
        sub.ready()
    assert info.value.seq == 0
    live = handle.subscribe(handle.published_seq - 1)  # the newest is always there
    assert live.ready().seq == 50  # type: ignore[union-attr]
    one = RunHandle(run_id="run_y", conversation_id="c", agent="chat", model=None,
                    owner=None, message_id="m", sink=events.append, window_bytes=100)
    one.publish([one.emit("tool.result", {"output": "r" * 1_000})])
    assert one.buffered == 1  # one event past the bound on its own is still kept
