"""The ReAct agent: think, act with tools, observe, until a final answer or the step limit.

Native tool calling is used whenever the backend returns tool calls (several calls of one step
run in parallel); otherwise the model's text is read with the ReAct text protocol
(:mod:`service.agents.react_parser`). Tokens stream as the model writes; each parsed thought is
also emitted as a ``thought`` event.
"""

from __future__ import annotations

import json
from functools import partial

from ..backends.base import ChatMessage, ToolCall
from ..errors import BackendRejectedRequest
from ..store import new_id
from .base import Agent, AgentContext, Observation
from .history import add_user, with_system
from .react_parser import (
    InvalidInput,
    answer_so_far,
    parse_react,
    prose_action,
    up_to_the_action,
)

__all__ = ["REACT_SYSTEM", "ReActAgent", "StepLimitReached"]

REACT_SYSTEM = """You can use tools to answer. If your interface supports tool calls, call them \
directly. Otherwise answer in exactly this format:

Thought: what you think about next
Action: the tool name, one of [{tool_names}]
Action Input: the tool's arguments as a JSON object

You will then get "Observation: <result>". Repeat as needed, then finish with:

Thought: I know the answer
Final Answer: the answer for the user

Tools:
{tool_list}"""

LIMIT_PROMPT = (
    "You have reached the limit of {steps} steps. Do not call any more tools. Answer the user now "
    "with what you found so far, and say plainly what is still unknown."
)


class ReActAgent(Agent):
    name = "react"

    def __init__(self, max_steps: int = 8) -> None:
        self.max_steps = max_steps

    def system_prompt(self, ctx: AgentContext) -> str:
        tools = list(ctx.tools)
        return REACT_SYSTEM.format(
            tool_names=", ".join(t.name for t in tools),
            tool_list="\n".join(f"- {t.name}: {t.description} "
                                 f"Parameters: {json.dumps(t.parameters, ensure_ascii=False)}"
                                for t in tools),
        )

    async def run(self, ctx: AgentContext) -> str:
        messages = with_system(self.system_prompt(ctx), ctx.history)
        return await self.loop(ctx, messages, answers=True)

    async def loop(self, ctx: AgentContext, messages: list[ChatMessage], *,
                   fail_at_limit: bool = False, answers: bool = False) -> str:
        """The ReAct loop. At the step limit, one last call without tools; if that gives no
        answer, the "could not finish" text is the answer, or with ``fail_at_limit`` (a plan's
        step) ``StepLimitReached`` is raised. ``answers``: its answer is the run's, so a turn
        cut short keeps what the loop would have taken for an answer (``answer_so_far``)."""
        tools = list(ctx.tools)
        names = {t.name for t in tools}
        native = False  # the model called tools natively: its plain text is its answer
        offered = tools  # sent as native tools, until the model's server refuses them
        for turn in range(self.max_steps):
            if answers:
                ctx.handle.answer_of = partial(answer_so_far, tools=names, first=turn == 0,
                                               native=native)
            try:
                reply = await ctx.call_llm(messages, tools=offered)
            except BackendRejectedRequest:
                if not offered or native:  # tools were taken before: not about them
                    raise
                # The model's server takes no tools (Ollama: "... does not support tools"):
                # the text protocol, which the system prompt describes, from here on. The
                # run failed 400 with a model that could have answered.
                offered = []
                reply = await ctx.call_llm(messages)
            if reply.tool_calls:
                native = True
                reply = ctx.unique_calls(reply)
                if reply.content.strip():
                    ctx.emit("thought", {"text": reply.content.strip()})
                messages.append(reply)
                observations = await ctx.call_tools_parallel(reply.tool_calls)
                messages += [_tool_message(o) for o in observations]
                continue
            step = parse_react(reply.content, tools=names)
            prose = turn == 0 and prose_action(step, names, reply.content)
            if not step.is_final and (native or prose):
                # Not the text protocol's action ("- **Action:** rotate the logs" in a
                # summary) but prose: the answer.
                return reply.content.strip()
            if step.thought:
                ctx.emit("thought", {"text": step.thought})
            if step.is_final:
                return step.final_answer or ""
            call = ToolCall(new_id("call"), step.action or "", _as_arguments(step.action_input))
            # An input that opens a JSON object and is not one: the model's malformed
            # arguments (its observation says so), not a text for the tool's one parameter.
            invalid = step.action_input if isinstance(step.action_input, InvalidInput) else None
            obs = await ctx.call_tool(call.name, step.action_input, call.id, invalid)
            # Its turn up to the action: what a model runs on to after it ("Observation: ..."
            # it made up, an answer from that) never happened, and is not shown to it again.
            messages.append(ChatMessage("assistant", up_to_the_action(reply.content)))
            messages.append(ChatMessage("user", f"Observation: {obs.text()}"))
        # Step limit: one last call without tools for a clear answer from what was found.
        add_user(messages, LIMIT_PROMPT.format(steps=self.max_steps))
        ctx.emit("thought", {"text": f"step limit of {self.max_steps} reached"})
        if answers:
            ctx.handle.answer_of = partial(answer_so_far, tools=names, first=False,
                                           native=native)
        reply = await ctx.call_llm(messages)
        # No tool runs any more: a final answer anywhere in the reply is the answer.
        step = parse_react(reply.content, final_first=True, tools=names)
        if step.final_answer:  # a final answer, or a plain one without the protocol's labels
            return step.final_answer
        if native and reply.content.strip():
            # After native calls its text is prose, never an action ("- **Action:** ..." in a
            # summary): the answer, as the loop's turns and ``answer_so_far`` take it.
            return reply.content.strip()
        # Another action, an empty "Final Answer:", or nothing: not an answer to store as one.
        last = f" Last thought: {step.thought}" if step.thought else ""
        unfinished = f"I could not finish this within {self.max_steps} steps.{last}"
        if fail_at_limit:
            raise StepLimitReached(unfinished)
        return unfinished


class StepLimitReached(Exception):
    """A ReAct loop run as a plan's step ended at its step limit without an answer."""


def _tool_message(obs: Observation) -> ChatMessage:
    return ChatMessage("tool", obs.text(), tool_call_id=obs.call_id, name=obs.name)


def _as_arguments(value: object) -> dict[str, object]:
    return value if isinstance(value, dict) else {"input": value}
