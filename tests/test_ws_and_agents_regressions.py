"""A review of be7b997..8b686dd (the WebSocket's non-blocking receive loop, 1008 and 1001 closes;
per-tool thread limiters, the ReAct prose heuristic and the fed-back turn): each test here
failed on 8b686dd, before its fix. Real hypercorn servers on 127.0.0.1:0 where a client meets
the defect (the WebSocket client is tests/api/test_ws_and_v1_faults.py's raw wsproto one); in-
process with the scripted backend for the agents."""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import service.api.ws as ws_mod
from service.agents import make_runner
from service.agents.base import Agent, AgentContext
from service.metrics import Metrics
from service.runs import RunSpec, RunStatus, RunSupervisor
from service.settings import load_settings
from service.store import SQLiteStore
from service.tools import Tool, ToolRegistry

from .api.test_ws_and_v1_faults import BIG, GUARD, RawWS, _conversation, _record_sessions
from .fakes import Reply, ScriptedBackend, supervisor_env
from .servers import running_server

# -- WebSocket ------------------------------------------------------------------------------------



async def test_a_client_that_reads_nothing_but_stays_connected_has_its_runs_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # docs/api.md: "A client that reads nothing of its socket while it sends (its replies find
    # the 256-message send queue full) is closed with 1008 and its cancel runs are cancelled."
    # The client here does exactly that, and stays connected (a wedged tab, a stuck proxy).
    sessions = _record_sessions(monkeypatch)
    backend = ScriptedBackend(lambda req: Reply(BIG, hang_after=3000))
    settings = load_settings(db=tmp_path / "s.db")
    async with running_server(settings, backend) as srv:
        conv = await _conversation(srv)
        ws = await RawWS.open(srv, rcvbuf=4096)
        try:
            await ws.send({"type": "message", "conversation_id": conv, "content": "q"})
            started = await ws.recv()
            assert isinstance(started, dict), started
            assert started["type"] == "run.started", started
            handle = srv.services.require_supervisor().get(started["run_id"])
            assert handle is not None
            (session,) = sessions
            with trio.fail_after(GUARD):  # backed up: the send queue is full
                while session.send.statistics().current_buffer_used < ws_mod._SEND_QUEUE:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            # Requests it must be answered, more than the replies it may leave unsent.
            for _ in range(ws_mod._REPLY_QUEUE + 8):
                with trio.move_on_after(0.1):
                    await ws.send({"type": "dance"})
            # The close (bounded by _CLOSE_WAIT, 5 s) and the runs' cancel are due by now.
            with trio.move_on_after(ws_mod._CLOSE_WAIT + 3):
                await handle.finished.wait()
            status, reason = handle.status.value, handle.cancel_reason
            upstream_open = not backend.streams[0].closed
        finally:
            await ws.stream.aclose()  # (else the server's shutdown waits on it too)
    # Now: ('running', None, True). NotReading cancels the handler's nursery, but the send
    # loop sits in websocket.send -> hypercorn's TCPServer.protocol_send, whose send_all runs
    # under a *shielded* CancelScope: it cannot be cancelled, the nursery never exits, neither
    # the 1008 close nor session.abandon() (in the finally) is reached while the client stays.
    assert (status, reason, upstream_open) == (
        "cancelled", "the client read nothing of its socket (closed)", False)


async def test_a_reading_client_briefly_behind_is_not_closed_for_one_bad_message(
    tmp_path: Path,
) -> None:
    # A healthy client reads its run's stream; it falls briefly behind (a network hiccup, a
    # throttled tab: half a second without reading) while the model streams fast, so the send
    # queue is full - the normal state of any socket slower than its runs, not "reads
    # nothing". It then asks for an agent this deployment does not have: the contract's
    # answer is an error reply, the socket and its runs going on.
    backend = ScriptedBackend(lambda req: Reply(BIG, hang_after=3000))
    settings = load_settings(db=tmp_path / "s.db")
    got: list[Any] = []
    async with running_server(settings, backend) as srv:
        conv = await _conversation(srv)
        ws = await RawWS.open(srv)  # the system's default buffers
        try:
            await ws.send({"type": "message", "conversation_id": conv, "content": "q"})
            started = await ws.recv()
            assert isinstance(started, dict), started
            assert started["type"] == "run.started", started
            handle = srv.services.require_supervisor().get(started["run_id"])
            assert handle is not None
            await trio.sleep(0.5)  # briefly behind
            await ws.send({"type": "message", "conversation_id": conv, "content": "q2",
                           "agent": "no_such_agent"})
            with trio.fail_after(3 * GUARD):  # it reads on, as fast as it can
                while True:
                    m = await ws.recv()
                    if not isinstance(m, dict) or m.get("type") == "error":
                        got.append(m)
                        break
            await trio.sleep(0.2)
            run = (handle.status.value, handle.cancel_reason)
        finally:
            await ws.stream.aclose()
    # Now: CloseConnection(code=1008, reason='the client reads nothing of its replies') after
    # the backlog, and the run cancelled "the client read nothing of its socket (closed)".
    (end,) = got
    assert isinstance(end, dict), end
    assert end["error"]["type"] == "invalid_request", end
    assert run == ("running", None), run


# -- agents: per-tool thread limiters -------------------------------------------------------------

WEDGED = threading.Event()  # set: the wedged calls return


def _fetch(source: str, **_: Any) -> str:
    """One function behind several tools (a deployer's HTTP/MCP tools made by a factory)."""
    if source == "wedged":
        WEDGED.wait(30)  # its host black-holes the connection
    return f"from {source}"


_PARAMS = {"type": "object", "properties": {"n": {"type": "integer"}}}
FEED_WEDGED = Tool("feed_wedged", "Read the wedged feed.", _PARAMS,
                   functools.partial(_fetch, "wedged"))
FEED_OTHER = Tool("feed_other", "Read the other feed.", _PARAMS,
                  functools.partial(_fetch, "other"))


class _HangsThenAsksTheOther(Agent):
    name = "react"

    async def run(self, ctx: AgentContext) -> str:
        async with trio.open_nursery() as nursery:  # 16 calls of the wedged tool time out
            for i in range(16):
                nursery.start_soon(ctx.call_tool, "feed_wedged", {"n": i}, f"w{i}")
        obs = await ctx.call_tool("feed_other", {}, "o1")
        return obs.text()


async def test_tools_made_with_functools_partial_get_a_thread_limiter_each(
    tmp_path: Path,
) -> None:
    # make_runner's in_tool_thread keys its limiters by getattr(fn, "func", fn), where fn is
    # call_tool's partial(tool.fn, **args). When tool.fn is itself a functools.partial, the
    # two partials flatten into one whose .func is the shared function: every tool made that
    # way shares one limiter, and one tool's 16 hung calls stop all of them - what the
    # per-tool limiters were made to end.
    WEDGED.clear()
    metrics = Metrics()
    store = SQLiteStore(tmp_path / "runs.db", threaded=False, metrics=metrics)
    await store.open()
    runner = make_runner(
        backend=lambda: ScriptedBackend(), tools=ToolRegistry((FEED_WEDGED, FEED_OTHER)),
        metrics=metrics, tool_timeout=1.0, history_chars=24_000,
        agents={"react": _HangsThenAsksTheOther()},  # run_sync: the service's own
    )
    supervisor = RunSupervisor(store, runner, metrics=metrics, max_runs=10, run_timeout=60)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            conv = (await store.create_conversation()).id
            handle = await supervisor.start(RunSpec(conv, "read the feeds", agent="react"))
            with trio.fail_after(GUARD):
                await handle.finished.wait()
            nursery.cancel_scope.cancel()
    finally:
        WEDGED.set()
        await store.aclose()
    assert handle.status is RunStatus.succeeded, handle.status
    # Now: 'tool feed_other timed out after 1s' - it never started (its limiter's 16 tokens
    # are held by feed_wedged's abandoned threads).
    assert handle.final_text == "from other", handle.final_text


# -- agents: the ReAct prose heuristic -------------------------------------------------------


@pytest.mark.parametrize("action", ["unit convert", "unit_convert tool"])
async def test_a_text_protocol_call_of_a_misspelt_tool_is_not_taken_as_the_answer(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, action: str,
) -> None:
    # A model that skips "Thought:" and misspells the tool's name (a space for the
    # underscore, a word after it), in the protocol's own shape: Action, then Action Input.
    # Before 8b686dd it was told "unknown tool ... (tools: ... unit_convert)" and corrected
    # itself; _prose (no thought, a space in the name, not a tool) now takes the turn for a
    # prose answer and returns it to the user, protocol labels and JSON included.
    args = '{"value": 5, "from_unit": "km", "to_unit": "mi"}'
    backend = ScriptedBackend([
        Reply(f"Action: {action}\nAction Input: {args}"),
        Reply(f"Thought: the tool is unit_convert\nAction: unit_convert\nAction Input: {args}"),
        Reply("Final Answer: 5 km is about 3.1 miles."),
    ])
    async with supervisor_env(tmp_path, backend) as env:
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, "5 km in miles?", agent="react"))
        await handle.finished.wait()
    # Now: final_text == 'Action: unit convert\nAction Input: {"value": 5, ...}'.
    assert handle.final_text == "5 km is about 3.1 miles.", handle.final_text


# -- agents: the turn fed back after an action --------------------------------------------------


async def test_an_invented_observation_after_an_action_without_input_is_not_fed_back(
    tmp_path: Path, autojump_clock: trio.testing.MockClock,
) -> None:
    # An action with no "Action Input:" line (a tool without parameters), then what the model
    # made up: an observation, and a second action with its input. up_to_the_action looks for
    # the Action Input anywhere after the Action, finds the second action's, and keeps the
    # turn up to it: the invented "Observation: 1999-12-31..." goes back to the model as its
    # own words. (The line-based split it replaced cut the turn at that Observation.)
    backend = ScriptedBackend([
        Reply("Thought: I need the date first\nAction: current_time\n"
              "Observation: 1999-12-31T23:59:00+00:00\nThought: now the days left\n"
              'Action: calculator\nAction Input: {"expression": "365-364"}'),
        Reply("Final Answer: done"),
    ])
    async with supervisor_env(tmp_path, backend) as env:
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, "days left this year?",
                                                    agent="react"))
        await handle.finished.wait()
    said = [m.content for m in backend.streams[1].request.messages if m.role == "assistant"]
    # Now: ['Thought: I need the date first\nAction: current_time\nObservation: 1999-12-31...
    # \nAction: calculator\nAction Input: {"expression": "365-364"}'].
    assert not any("1999" in s for s in said), said
