"""Agents: chat, ReAct, plan-and-execute and auto, and the runner the supervisor calls."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio

from ..backends.base import Backend
from ..errors import ServiceError
from ..metrics import Metrics
from ..runs import RunHandle, RunSpec
from ..text import cut_at_stop
from ..tools import ToolRegistry
from .auto import AutoAgent
from .base import Agent, AgentContext, Observation, ToolThunk, call_abandonable
from .chat import ChatAgent
from .history import build_history, trim_history
from .plan_execute import PlanExecuteAgent
from .react import ReActAgent

__all__ = [
    "Agent",
    "AgentContext",
    "AutoAgent",
    "ChatAgent",
    "Observation",
    "PlanExecuteAgent",
    "ReActAgent",
    "build_history",
    "make_runner",
    "trim_history",
]

# Calls of one sync tool running (or abandoned and still running) at once. Per tool: a tool
# whose calls hang holds its own threads, not every other tool's (one shared limiter let one
# user's 16 wedged calls make every sync tool of every user "time out" unstarted).
TOOL_THREADS = 16


def default_agents() -> dict[str, Agent]:
    return {"chat": ChatAgent(), "react": ReActAgent(), "plan_execute": PlanExecuteAgent(),
            "auto": AutoAgent()}


def make_runner(
    *,
    backend: Callable[[], Backend | None],
    tools: ToolRegistry,
    metrics: Metrics,
    tool_timeout: float,
    history_chars: int,
    agents: dict[str, Agent] | None = None,
    run_sync: Callable[..., Awaitable[Any]] | None = None,
    abandon_in: Callable[[], trio.Nursery] | None = None,
) -> Callable[[RunHandle, RunSpec, trio.Nursery], Any]:
    """The function the supervisor calls to run an agent for a run. ``abandon_in``: the
    nursery (the supervisor's) whose tasks run async tools, so that a tool timeout or a
    cancel can leave a call that shields itself (``call_abandonable``); None: awaited inline."""
    table = agents or default_agents()
    # Sync tools get their own thread limiters, one per tool: a cancelled or timed-out sync
    # tool is abandoned but keeps its thread (and its limiter token) until it returns; with
    # trio's default limiter, shared with the store, 40 hung tools stopped every store read
    # and write, and with one limiter for all tools, one tool's hung calls stopped the rest.
    # By the tool's name (tools made by one factory, or two names for one function, each
    # have their own).
    tool_threads: dict[str, trio.CapacityLimiter] = {}

    async def in_tool_thread(fn: Callable[[], Any]) -> Any:
        name = fn.tool.name if isinstance(fn, ToolThunk) else ""
        limiter = tool_threads.get(name)
        if limiter is None:
            limiter = tool_threads[name] = trio.CapacityLimiter(TOOL_THREADS)
        return await trio.to_thread.run_sync(fn, abandon_on_cancel=True, limiter=limiter)

    # Async tools' calls, abandoned or not, are bounded per tool the same way.
    tool_tasks: dict[str, trio.CapacityLimiter] = {}

    async def in_tool_task(nursery: trio.Nursery, name: str,
                           fn: Callable[[], Awaitable[Any]]) -> Any:
        limiter = tool_tasks.get(name)
        if limiter is None:
            limiter = tool_tasks[name] = trio.CapacityLimiter(TOOL_THREADS)
        return await call_abandonable(nursery, limiter, fn)

    async def run(handle: RunHandle, spec: RunSpec, nursery: trio.Nursery) -> str:
        agent = table.get(handle.agent)
        if agent is None:
            raise ServiceError(f"unknown agent {handle.agent!r}")
        the_backend = backend()
        if the_backend is None:
            from ..errors import BackendUnavailable

            raise BackendUnavailable("no backend is configured")
        if spec.messages is not None:
            # The OpenAI-compatible endpoint's own history: the client's prompt, sent whole
            # and in its order (as OpenAI does; one too long for the model is the model's
            # server's 400). Trimmed to SERVICE_HISTORY_CHARS, a document sent in an earlier
            # turn was dropped silently and answered 200 without it.
            history = list(spec.messages)
        else:  # read by the run's first write (Store.begin_run)
            begun = handle.begun
            assert begun is not None, "a run on a stored conversation is begun by the store"
            history = trim_history(
                build_history(begun.conversation, [*begun.history, begun.user]), history_chars
            )
        ctx = AgentContext(
            handle=handle, backend=the_backend, tools=tools, history=history, nursery=nursery,
            metrics=metrics, model=handle.model, tool_timeout=tool_timeout,
            client_tools=spec.client_tools, max_tokens=spec.max_tokens,
            temperature=spec.temperature, options=spec.options,
            # A client's stop sequences end its answer: the chat agent's call is the answer;
            # another agent's calls have formats of their own (a "\n\n" stop cut the ReAct
            # protocol), so its answer is cut after (as /v1 sends it: whole, at the end).
            stop=spec.stop if agent.name == "chat" else (),
            history_trimmable=spec.messages is None,
        )
        ctx.run_sync = run_sync if run_sync is not None else in_tool_thread
        if agent.name != "chat":
            handle.stop = spec.stop  # its answer so far, if cut short, ends there too
        if abandon_in is not None:
            ctx.run_async = partial(in_tool_task, abandon_in())
        answer = await agent.run(ctx)
        if agent.name != "chat" and spec.stop:
            cut = cut_at_stop(answer, spec.stop)
            if (cut != answer  # ended at the client's stop sequence, as its server would
                    and handle.result_extra.get("finish_reason") != "tool_calls"):
                # Set, not defaulted: under auto the chat agent set its call's own (a
                # "length": the stop was not sent upstream, so the model ran on past it).
                handle.result_extra["finish_reason"] = "stop"
            answer = cut
        # The answer's finish_reason is its last call's (chat sets its own): an answer cut
        # at max_tokens says "length", never "stop".
        handle.result_extra.setdefault("finish_reason", ctx.last_finish_reason or "stop")
        return answer

    return run
