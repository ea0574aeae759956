"""The auto agent: decides chat vs ReAct vs plan-and-execute, says so, and delegates.

The model classifies the request (a short, token-silent call). If its reply names no agent, or
the call fails for any reason but cancellation, a deterministic rule decides instead.
"""

from __future__ import annotations

import re

from ..backends.base import ChatMessage
from ..errors import BackendError
from .base import Agent, AgentContext
from .chat import ChatAgent
from .plan_execute import PlanExecuteAgent
from .react import ReActAgent

__all__ = ["AutoAgent", "classify_by_rule"]

CLASSIFY_SYSTEM = """Decide how to handle the user's request. Reply with one word:
chat - a conversational answer needs no tools;
react - one or a few tool calls ({tools}) are needed;
plan_execute - several distinct steps must be planned and combined."""

# Linear in the question's length: no "\s*" after "^" (it crossed newlines, and was tried at
# every line: 20,000 blank lines took 3.2 s on the event loop) and no unbounded ".*" between
# two words ("first " x 8,000: 2.8 s).
_MULTI_STEP = re.compile(
    r"\b(then|after that|afterwards|step[s]? |first\b[^\n]{0,200}?\bthen|finally|plan|compare)\b"
    r"|^[ \t]*\d+[.)](?:\s|$)",  # a numbered list ("1. ", "2) "), not a decimal ("3.5")
    re.I | re.M,
)
_RULE_CHARS = 8_000  # what the rule reads of a question (its start says what kind it is)
_TOOLISH = re.compile(
    r"\d\s*[-+*/^%]\s*\d|\b(calculate|compute|how much|how many|convert|what time|today|date|"
    r"count|sqrt|percent)\b",
    re.I,
)


def classify_by_rule(question: str, tool_names: list[str]) -> str:
    """The fallback decision: deterministic and cheap."""
    if not tool_names:
        return "chat"
    question = question[:_RULE_CHARS]
    mentions_tool = any(name in question for name in tool_names)
    if _MULTI_STEP.search(question) and (mentions_tool or _TOOLISH.search(question)):
        return "plan_execute"
    if mentions_tool or _TOOLISH.search(question):
        return "react"
    return "chat"


def _parse_choice(text: str) -> str | None:
    """The one agent the classifier's reply names; None (the rule decides) if it names none,
    or several ("No plan needed, just chat" named plan_execute, the first word found)."""
    found = set()
    for w in re.findall(r"[a-z_]+", text.lower()):
        if w in ("chat", "react", "plan_execute"):
            found.add(w)
        elif w in ("plan", "planexecute"):
            found.add("plan_execute")
    return found.pop() if len(found) == 1 else None


class AutoAgent(Agent):
    name = "auto"

    def __init__(self) -> None:
        self.agents: dict[str, Agent] = {
            "chat": ChatAgent(), "react": ReActAgent(), "plan_execute": PlanExecuteAgent(),
        }

    async def decide(self, ctx: AgentContext) -> tuple[str, str]:
        tools = [t.name for t in ctx.tools]
        try:
            reply = await ctx.call_llm(
                [ChatMessage("system", CLASSIFY_SYSTEM.format(tools=", ".join(tools) or "none")),
                 ChatMessage("user", ctx.question)],
                emit_tokens=False, max_tokens=8, temperature=0,
            )
            choice = _parse_choice(reply.content)
            if choice is not None:
                return choice, "model"
        except BackendError:
            pass  # the fallback below decides; the real call will surface a lasting failure
        return classify_by_rule(ctx.question, tools), "rule"

    async def run(self, ctx: AgentContext) -> str:
        if ctx.client_tools:
            # A /v1 client's own tools: only chat passes them to the model and their calls
            # back to the client (react and plan_execute would drop them).
            choice, method = "chat", "client_tools"
        else:
            choice, method = await self.decide(ctx)
        ctx.emit("decision", {"agent": choice, "method": method})
        return await self.agents[choice].run(ctx)
