"""Found by a review of the 2026-12-05 fixes (21d9d05..8dc2154); each test failed before its fix
(1 and 5 were regressions of those fixes, 2-4 gaps they left).

1. call_abandonable runs an async tool in a task of the supervisor's nursery: a tool failing
   with a BaseException that is neither an Exception nor SystemExit (a BaseExceptionGroup: an
   argparse/click entry point run in a nursery child) escapes into that nursery and stops the
   supervisor, with every other run. Inline (before), it failed its own run only.
2. An async tool behind a plain wrapper (no functools.wraps) still runs inline: the fix does not
   reach the ``inspect.isawaitable`` path, so one that shields itself still holds its run.
3. Abandoned async tool calls are not bounded at all (sync tools' abandoned threads are: 16 per
   tool); the run held by the tool used to count against max_runs, its abandoned task counts
   against nothing.
4. The stream's store-read retry covers one of the reader's store reads: the ``run_in_progress``
   read of a run followed on another worker ends the stream on the same passing failure.
5. wsping drops a WebSocket client that reads, slowly: its pong waits behind the bytes queued
   before the ping (a large message), so "nothing heard for four intervals" holds although the
   client takes data the whole time (sendstall's progress rule would never drop it); its
   ``cancel`` run is cancelled.

A review of those fixes (453fd6f and dae9b3f) then found:

6. An abandoned async tool whose cleanup failed as it was cancelled stopped the supervisor (the
   failure came out of its task in a group with the Cancelled).
7. A tool's SystemExit in a group failed its run as an internal error instead of being the
   model's observation.

And a review of that fix (4052557):

8. A KeyboardInterrupt (SIGINT) raised while an abandoned call unwound was boxed for a caller
   that was gone, and only logged: the process's interrupt was lost.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import trio
import trio.testing

from service.agents import TOOL_THREADS
from service.backends.base import ChatRequest, ToolCall
from service.errors import StoreUnavailable, is_interrupt
from service.runs import RunHandle, RunSpec, RunStatus
from service.runs.reader import EventReader, Keepalive
from service.settings import load_settings
from service.store import RunEvent, SQLiteStore
from service.tools import BUILTIN_TOOLS, Tool, tool

from .fakes import Env, Reply, ScriptedBackend, supervisor_env

GUARD = 20  # seconds (wall clock) any single wait of the real-server tests may take


async def _run(env: Env, content: str, agent: str) -> tuple[RunHandle, list[RunEvent]]:
    conv = await env.conversation()
    handle = await env.supervisor.start(RunSpec(conv, content, agent=agent))
    await handle.finished.wait()
    return handle, await env.store.list_run_events(handle.id)


async def _beside_another_run(
    tmp_path: Path, the_tool: Tool, question: str, **env: Any,
) -> tuple[BaseException | None, Any, RunHandle | None, RunHandle | None]:
    """A react run whose model calls ``the_tool`` (then answers), 2 s into another client's
    20 s chat run: what escaped the supervisor (None), its failure, the other run, the tool's
    run."""
    def reply(req: ChatRequest) -> Reply:
        q = req.messages[-1]
        if q.role == "tool":
            return Reply("Final Answer: done")
        if q.content == question:
            return Reply("", tool_calls=[ToolCall("c1", the_tool.name, {})])
        return Reply("tick " * 20, gap=1.0)  # another client's run, 20 s long

    crashed: BaseException | None = None
    other = called = None
    failure: Any = None
    try:
        async with supervisor_env(tmp_path, ScriptedBackend(reply),
                                  tools=(*BUILTIN_TOOLS, the_tool), **env) as e:
            other = await e.supervisor.start(RunSpec(await e.conversation(), "hello",
                                                     agent="chat"))
            await trio.sleep(2)
            called, _ = await _run(e, question, "react")
            await other.finished.wait()
            await trio.sleep(1)
            failure = e.supervisor.failure
    except BaseException as exc:  # noqa: ASYNC103 (what escaped the supervisor, reported)
        crashed = exc
    return crashed, failure, other, called


# -- 1. a tool's BaseExceptionGroup stops the supervisor --------------------------------------


@tool("run_two_clis", "Run two command-line checks at once.", {"type": "object", "properties": {}})
async def run_two_clis() -> str:
    async def check() -> None:
        await trio.lowlevel.checkpoint()
        sys.exit(2)  # what argparse and click do on bad input

    # trio wraps it: BaseExceptionGroup([SystemExit])
    async with trio.open_nursery() as nursery:  # noqa: ASYNC112 (the group is the point)
        nursery.start_soon(check)
    return "both passed"


async def test_a_tool_failing_with_a_base_exception_group_fails_only_its_run(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    crashed, failure, other, _ = await _beside_another_run(
        tmp_path, run_two_clis, "check the config")
    # HEAD: call_abandonable's task lets the BaseExceptionGroup escape into the supervisor's
    # nursery: "the run supervisor stopped: SystemExit: 2"; the other client's run is
    # cancelled (shutdown) and the group ends the supervisor's owner. Before (awaited inline)
    # the tool's run failed and the supervisor went on.
    assert crashed is None, f"the supervisor stopped: {crashed!r}"
    assert failure is None, failure
    assert other is not None
    assert other.status is RunStatus.succeeded, other.status


# -- 2. an async tool behind a plain wrapper is still awaited inline --------------------------


async def _flush_forever() -> str:
    with trio.CancelScope(shield=True):  # an SDK protecting its flush
        await trio.sleep(1000)
    return "flushed"


def _timed(fn: Any) -> Any:
    def wrapper(**kwargs: Any) -> Any:  # a deployer's wrapper without functools.wraps
        return fn(**kwargs)
    return wrapper


wrapped_flush = Tool("wrapped_flush", "Flush the audit log.",
                     {"type": "object", "properties": {}}, _timed(_flush_forever))


async def test_a_shielding_async_tool_behind_a_plain_wrapper_is_held_to_the_tool_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # call_tool supports it ("async behind a plain wrapper": the sync path's result is
    # awaited), but awaits that coroutine inline in the run's task, not via run_async.
    backend = ScriptedBackend([
        Reply("", tool_calls=[ToolCall("c1", "wrapped_flush", {})]),
        Reply("Final Answer: not flushed"),
    ])
    async with supervisor_env(tmp_path, backend, tools=(*BUILTIN_TOOLS, wrapped_flush),
                              tool_timeout=30) as env:
        start = trio.current_time()
        handle, events = await _run(env, "flush the audit log", "react")
        took = trio.current_time() - start
    (result,) = [e.data for e in events if e.type == "tool.result"]
    # HEAD: 1000 s (virtual), {'output': 'flushed'}: the 30 s tool timeout never applied.
    assert result.get("error") == "tool wrapped_flush timed out after 30s", (result, took)
    assert took <= 31, took
    assert handle.status is RunStatus.succeeded


# -- 3. abandoned async tool calls pile up without bound ---------------------------------------

_LIVE: list[int] = [0]  # calls of hang_forever running now


@tool("hang_forever", "Flush to a server that never answers.",
      {"type": "object", "properties": {}})
async def hang_forever() -> str:
    _LIVE[0] += 1
    try:
        with trio.CancelScope(shield=True):
            await trio.sleep(10_000)
    finally:
        _LIVE[0] -= 1
    return "flushed"


async def test_abandoned_async_tool_calls_are_bounded_like_abandoned_sync_ones(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Before, such a call held its run, and the runs held max_runs slots (2 here): at most 2
    # calls at once, the rest refused 429. Sync tools' abandoned threads are bounded per tool
    # (TOOL_THREADS, docs/architecture.md). An abandoned async call now holds nothing: each run
    # that calls the tool leaves one more task (and whatever the tool holds: a socket, a
    # buffer) in the supervisor's nursery, for as long as the tool takes.
    _LIVE[0] = 0
    runs = 3 * TOOL_THREADS

    def reply(req: ChatRequest) -> Reply:
        if req.messages[-1].role == "tool":
            return Reply("Final Answer: could not flush")
        return Reply("", tool_calls=[ToolCall("c1", "hang_forever", {})])

    async with supervisor_env(tmp_path, ScriptedBackend(reply), max_runs=2, tool_timeout=1,
                              tools=(*BUILTIN_TOOLS, hang_forever)) as env:
        most = 0
        for _ in range(runs):
            await _run(env, "flush", "react")
            most = max(most, _LIVE[0])
        env.nursery.cancel_scope.cancel()  # the shielded tasks would hold the test's end
        # (they are shielded: the supervisor's end waits for them; the clock jumps past them)
    # HEAD: 48 calls of one tool in flight at once, 2 runs allowed.
    assert most <= max(2, TOOL_THREADS), f"{most} abandoned calls of one tool at once"


# -- 4. the reader's other store read still ends the stream on a passing failure ---------------


async def test_a_passing_store_failure_on_a_followed_runs_owner_lookup_does_not_end_the_stream(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # A run stored as running by another live worker sharing the store (a re-join landing on
    # another worker of ``--workers``) is followed by reading the store; each pass looks up
    # where the run runs (Store.run_in_progress, every _WHERE_TTL). ef94c42 retries a
    # list_run_events refused for a moment (StoreUnavailable: "a blip is not the stream's
    # end"); the same blip on run_in_progress, a read of the same store in the same loop, ends
    # the stream (an error frame; /v1 would cancel the run).
    async with supervisor_env(tmp_path, ScriptedBackend()) as env:
        conv = await env.conversation()
        other = SQLiteStore(env.store.path, threaded=False,  # type: ignore[attr-defined]
                            process_id=f"{os.getppid()}:1")  # a live process: "elsewhere"
        await other.open()
        try:
            begun = await other.begin_run(conv, content="q", agent="chat", model=None)
        finally:
            await other.aclose()
        run_id = begun.run.id
        reader = EventReader(run_id, after=0, store=env.store, supervisor=env.supervisor,
                             keepalive=1.0)
        lookups: list[str] = []

        def blip(op: str) -> None:
            if op == "run_in_progress":
                lookups.append(op)
                if len(lookups) == 3:  # once, mid-stream
                    raise StoreUnavailable("store read failed: the connection was lost")

        env.store.faults.before_read = blip
        got: list[Any] = []
        error: Exception | None = None
        try:
            with trio.move_on_after(10):
                async for item in reader:
                    got.append(item)
        except StoreUnavailable as exc:
            error = exc
        finally:
            env.store.faults.before_read = None
    assert len(lookups) >= 3, lookups  # the blip was reached
    # HEAD: StoreUnavailable('store read failed: the connection was lost') after ~2 s.
    assert error is None, f"the stream ended on a passing failure: {error!r}"
    assert sum(isinstance(i, Keepalive) for i in got) >= 5, got


# -- 5. wsping drops a client that reads, slowly ------------------------------------------------

BIG_TOKEN = "y" * 300_000  # one token event of 300 kB (a pasted document echoed, a long tool
# output shown as a thought): one WebSocket message, one write of hypercorn's


async def test_a_ws_client_reading_slowly_through_a_large_message_is_not_dropped(
    tmp_path: Path,
) -> None:
    # docs/architecture.md: "a slow client never slows a run", and only a client "that has
    # taken nothing for four keep-alive intervals" is dropped (sendstall: the write's deadline
    # moves on with each 64 kB piece taken). This client takes a piece every 0.8 s (80 kB/s:
    # 8 kB each 0.1 s) and answers every ping as soon as it reads it. But the server's ping
    # waits for the send lock behind the 300 kB message (3.75 s at that pace), so its pong
    # comes ~4 s after the last one: wsping's "nothing heard for four ping intervals" (2 s
    # here, its minimum) closes the socket (no close frame) and cancels the client's run.
    from wsproto.events import CloseConnection, Message, Ping

    from .api.test_ws_and_v1_faults import RawWS, _conversation
    from .servers import running_server

    keepalive = 0.25  # pings every 0.25 s; wsping's and sendstall's bounds: their minimum, 2 s
    backend = ScriptedBackend(lambda req: Reply(BIG_TOKEN + " a b c d e f g h", gap=0.5))
    settings = load_settings(db=tmp_path / "s.db", sse_keepalive=keepalive)
    end: Any = "open"
    got: list[dict[str, Any]] = []
    async with running_server(settings, backend, websocket_ping_interval=keepalive) as srv:
        conv = await _conversation(srv)
        ws = await RawWS.open(srv)
        try:
            await ws.send({"type": "message", "conversation_id": conv, "content": "q"})
            text = ""
            with trio.fail_after(GUARD):
                while end == "open":
                    data = await ws.stream.receive_some(8192)
                    if not data:
                        end = None  # cut without a close frame (a browser's 1006)
                        break
                    ws.conn.receive_data(data)
                    for e in ws.conn.events():
                        if isinstance(e, Ping):  # answered at once, as every client does
                            await ws.stream.send_all(ws.conn.send(e.response()))
                        elif isinstance(e, CloseConnection):
                            end = e
                        elif isinstance(e, Message):
                            text += e.data
                            if e.message_finished:
                                got.append(json.loads(text))
                                text = ""
                                if got[-1].get("type") == "run.finished":
                                    end = "finished"
                    await trio.sleep(0.1)  # a slow link: 80 kB/s
            run_id = next((m["run_id"] for m in got if "run_id" in m), None)
            assert run_id is not None, got
            handle = srv.services.require_supervisor().get(run_id)
            if handle is not None:
                with trio.fail_after(GUARD):
                    await handle.finished.wait()
            async with srv.client() as client:
                run = (await client.get(f"/api/runs/{run_id}")).json()
        finally:
            await ws.stream.aclose()
    tokens = sum(1 for m in got if m.get("type") == "token")
    # HEAD: end None (cut, no close frame) after the big token; the run cancelled ("client
    # disconnected") while the client was reading it.
    assert end == "finished", (end, tokens, run.get("status"), run.get("error"))
    assert run["status"] == "succeeded", run


# -- 6. and 7. (a review of 453fd6f and dae9b3f) -----------------------------------------

# -- 1. an abandoned tool whose helper fails in its cleanup stops the supervisor ---------------


@tool("fetch_with_helper", "Fetch a page while a helper keeps the session alive.",
      {"type": "object", "properties": {}})
async def fetch_with_helper() -> str:
    async def keep_alive() -> None:
        try:
            await trio.sleep_forever()
        finally:
            # its cleanup fails as it is cancelled (a session close on a dead socket)
            raise ConnectionResetError("the session could not be closed")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_alive)
        await trio.sleep(1000)  # the page never comes
    return "page"


async def test_an_abandoned_tool_whose_cleanup_fails_does_not_stop_the_supervisor(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # The tool times out (5 s): call_abandonable cancels the call's scope. The tool's nursery
    # ends with BaseExceptionGroup([Cancelled, ConnectionResetError]). _holds_cancelled said
    # "Cancelled": re-raised; the call's scope took the Cancelled out and the rest,
    # ExceptionGroup([ConnectionResetError]), escaped the task into the supervisor's nursery.
    crashed, failure, other, fetched = await _beside_another_run(
        tmp_path, fetch_with_helper, "fetch the page", tool_timeout=5)
    assert crashed is None, f"the supervisor stopped: {crashed!r}"
    assert failure is None, failure
    assert other is not None
    assert other.status is RunStatus.succeeded, other
    assert fetched is not None
    assert fetched.status is RunStatus.succeeded, fetched.status



# -- 2. a tool's SystemExit in a group is taken for the run's cancellation ---------------------


@tool("check_two_configs", "Validate two config files at once.",
      {"type": "object", "properties": {}})
async def check_two_configs() -> str:
    async def check() -> None:
        await trio.lowlevel.checkpoint()
        raise SystemExit(2)  # what argparse and click do on bad input

    async with trio.open_nursery() as nursery:  # noqa: ASYNC112 (the group is the point)
        nursery.start_soon(check)
    return "both valid"


async def test_a_tools_exit_in_a_group_is_its_observation_not_a_cancellation(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # call_tool: "SystemExit too: tools built on argparse or click exit on bad input, and a
    # tool's failure is the model's observation, never the run's". call_abandonable now boxes
    # the tool's BaseExceptionGroup([SystemExit]) and raises it in the caller, where call_tool
    # has no clause for it but "except BaseException: the run is cancelled mid-call": counted
    # as a "cancelled" call, no tool.result, and the run fails.
    def reply(req: ChatRequest) -> Reply:
        if req.messages[-1].role == "tool":
            return Reply("Final Answer: the configs are invalid")
        return Reply("", tool_calls=[ToolCall("c1", "check_two_configs", {})])

    async with supervisor_env(tmp_path, ScriptedBackend(reply),
                              tools=(*BUILTIN_TOOLS, check_two_configs)) as env:
        handle, events = await _run(env, "check the configs", "react")
        cancelled = env.metrics.tool_calls.labels(
            "check_two_configs", "cancelled")._value.get()
    results = [e.data for e in events if e.type == "tool.result"]
    assert len(results) == 1, (handle.status, handle.error, results)
    assert "error" in results[0], results
    assert handle.status is RunStatus.succeeded, (handle.status, handle.error)
    assert cancelled == 0, cancelled


# -- 8. (a review of 4052557): a SIGINT in an abandoned call's unwinding ---------------------


@tool("fetch_interrupted", "Fetch a page while a helper keeps the session alive.",
      {"type": "object", "properties": {}})
async def fetch_interrupted() -> str:
    async def keep_alive() -> None:
        try:
            await trio.sleep_forever()
        finally:
            # SIGINT lands while the abandoned call unwinds (trio raises it in the running task)
            raise KeyboardInterrupt

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_alive)
        await trio.sleep(1000)
    return "page"


async def test_a_keyboard_interrupt_in_an_abandoned_tools_unwinding_is_not_swallowed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # The call times out (5 s) and is abandoned: its task ends with
    # BaseExceptionGroup([Cancelled, KeyboardInterrupt]). Before 4052557 the whole group was
    # re-raised, the call's scope took the Cancelled out and the KeyboardInterrupt reached the
    # supervisor (which, like its runs, lets an interrupt through: errors.is_interrupt). Now
    # _split_cancelled boxes the KeyboardInterrupt for a caller that is gone: only logged.
    def reply(req: ChatRequest) -> Reply:
        if req.messages[-1].role == "tool":
            return Reply("Final Answer: no page")
        return Reply("", tool_calls=[ToolCall("c1", "fetch_interrupted", {})])

    crashed: BaseException | None = None
    status: Any = None
    try:
        async with supervisor_env(tmp_path, ScriptedBackend(reply), tool_timeout=5,
                                  tools=(*BUILTIN_TOOLS, fetch_interrupted)) as env:
            handle = await env.supervisor.start(
                RunSpec(await env.conversation(), "fetch the page", agent="react"))
            await handle.finished.wait()
            status = handle.status
            await trio.sleep(60)  # the service goes on serving as if no interrupt came
    except BaseException as exc:  # noqa: ASYNC103 (what escaped, checked below)
        crashed = exc
    assert is_interrupt(crashed), (
        f"the KeyboardInterrupt was swallowed (escaped: {crashed!r}; run: {status})")
