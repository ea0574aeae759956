"""The chat agent: one streamed LLM call over the conversation's history."""

from __future__ import annotations

from ..errors import BackendProtocolError
from .base import Agent, AgentContext

__all__ = ["ChatAgent"]


class ChatAgent(Agent):
    name = "chat"

    async def run(self, ctx: AgentContext) -> str:
        # Tools a client sent (OpenAI-style) go to the model as they are; tool calls come back
        # to the client, which runs them (as with any OpenAI-compatible server).
        # The client's other OpenAI options too (JSON mode, tool_choice, sampling): this call's
        # answer is the client's; other agents' calls parse their own formats, so not theirs.
        reply = await ctx.call_llm(ctx.history, raw_tools=ctx.client_tools, options=ctx.options)
        extra = ctx.handle.result_extra
        extra["finish_reason"] = ctx.last_finish_reason or "stop"
        calls = reply.tool_calls
        if any(not c.name for c in calls):
            # A call without a name is the model's slip, which an agent tells the model; a
            # client cannot run it (nor can it name one: tools' names are checked), so it is
            # the model's server answering badly (502), as it was, not a call handed on.
            raise BackendProtocolError("the model made a tool call without a name")
        if len(calls) > 1 and dict(ctx.options).get("parallel_tool_calls") is False:
            # At most one call, as asked: a server that cannot be told (Ollama) may give more,
            # and a client running one call at a time would leave the others unanswered.
            calls = calls[:1]
        if calls:
            if extra["finish_reason"] == "stop":
                # Not "length" (nor "content_filter"): tool calls cut by max_tokens are not
                # whole, and OpenAI SDKs raise LengthFinishReasonError only on "length".
                extra["finish_reason"] = "tool_calls"
            extra["tool_calls"] = [
                # A client's tool gets the model's arguments as they came, even if not JSON
                # (as OpenAI passes them on): the client decides what to do with them.
                {"id": c.id, "name": c.name,
                 "arguments": c.arguments if c.invalid_arguments is None else c.invalid_arguments}
                for c in calls
            ]
        return reply.content
