"""Found by a review of 453fd6f and dae9b3f (2026-12-05); each test failed before its fix: an
abandoned async tool whose cleanup failed as it was cancelled stopped the supervisor (the
failure came out of its task in a group with the Cancelled), and a tool's SystemExit in a group
failed its run as an internal error instead of being the model's observation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
import trio.testing

from service.backends.base import ChatRequest, ToolCall
from service.runs import RunHandle, RunSpec, RunStatus
from service.store import RunEvent
from service.tools import BUILTIN_TOOLS, tool

from .fakes import Env, Reply, ScriptedBackend, supervisor_env


async def _run(env: Env, content: str, agent: str) -> tuple[RunHandle, list[RunEvent]]:
    conv = await env.conversation()
    handle = await env.supervisor.start(RunSpec(conv, content, agent=agent))
    await handle.finished.wait()
    return handle, await env.store.list_run_events(handle.id)


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
    # ends with BaseExceptionGroup([Cancelled, ConnectionResetError]). _holds_cancelled says
    # "Cancelled": re-raised; the call's scope takes the Cancelled out and the rest,
    # ExceptionGroup([ConnectionResetError]), escapes the task into the supervisor's nursery.
    def reply(req: ChatRequest) -> Reply:
        q = req.messages[-1]
        if q.role == "tool":
            return Reply("Final Answer: no page")
        if q.content.startswith("fetch"):
            return Reply("", tool_calls=[ToolCall("c1", "fetch_with_helper", {})])
        return Reply("tick " * 20, gap=1.0)  # another client's run, 20 s long

    crashed: BaseException | None = None
    other: RunHandle | None = None
    failure: Any = None
    fetched: RunHandle | None = None
    try:
        async with supervisor_env(tmp_path, ScriptedBackend(reply), tool_timeout=5,
                                  tools=(*BUILTIN_TOOLS, fetch_with_helper)) as env:
            other = await env.supervisor.start(RunSpec(await env.conversation(), "hello",
                                                       agent="chat"))
            await trio.sleep(2)
            fetched, _ = await _run(env, "fetch the page", "react")
            await other.finished.wait()
            await trio.sleep(1)
            failure = env.supervisor.failure
    except BaseException as exc:  # noqa: ASYNC103 (what escaped the supervisor, reported below)
        crashed = exc
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
