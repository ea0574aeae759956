"""The chat agent: one streamed LLM call over the conversation's history."""

from __future__ import annotations

from .base import Agent, AgentContext

__all__ = ["ChatAgent"]


class ChatAgent(Agent):
    name = "chat"

    async def run(self, ctx: AgentContext) -> str:
        reply = await ctx.call_llm(ctx.history)
        return reply.content
