"""The plan-and-execute agent: plan as JSON, run the steps, re-plan once on failure, synthesise.

1. The model writes a plan: ``{"steps": [{"id", "task", "tool"?, "arguments"?, "depends_on"?}]}``,
   validated; an invalid plan is re-asked once with the error, then falls back to a one-step plan.
2. Steps run in dependency order; steps whose dependencies are done run in parallel (a wave).
   A step naming a tool with arguments calls it directly; any other step is a short ReAct loop.
3. The first failed step triggers one re-plan from what is known; the new plan's steps run.
4. A final streamed call answers the user from the steps' results.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Collection
from dataclasses import replace
from typing import Any

import trio
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..backends.base import ChatMessage
from ..errors import BackendError, ContextLengthExceeded
from ..store import new_id
from .base import TOOL_OUTPUT_CHARS, Agent, AgentContext
from .history import add_user, with_system
from .react import ReActAgent, StepLimitReached

__all__ = ["Plan", "PlanExecuteAgent", "PlanStep", "parse_plan"]

PLAN_SYSTEM = """Break the user's request into a short plan of steps. Reply with JSON only:
{{"steps": [{{"id": 1, "task": "what to do", "tool": "optional tool name", \
"arguments": {{"optional": "tool arguments"}}, "depends_on": [ids of earlier steps it needs]}}]}}
Steps that do not depend on each other will run in parallel. Use at most {max_steps} steps.
Tools: {tools}"""

# A plan's own token budget when a client bounds its answer's (max_tokens below it): room for a
# plan of max_steps steps with their arguments.
PLAN_MAX_TOKENS = 1024
_REASK_CHARS = 4_000  # of an invalid plan, sent back with the re-ask

SYNTH_PROMPT = """Answer the user's request using the results of the steps below.

Request: {question}

Results:
{results}"""


class PlanStep(BaseModel):
    id: int
    task: str = Field(min_length=1)
    tool: str | None = None
    arguments: dict[str, Any] | None = None
    depends_on: list[int] = Field(default_factory=list)


class Plan(BaseModel):
    steps: list[PlanStep] = Field(min_length=1, max_length=12)

    @field_validator("steps")
    @classmethod
    def _unique(cls, steps: list[PlanStep]) -> list[PlanStep]:
        ids = [s.id for s in steps]
        if len(set(ids)) != len(ids):
            raise ValueError("step ids must be unique")
        return steps

    @model_validator(mode="after")
    def _deps(self, info: ValidationInfo) -> Plan:
        ids = {s.id for s in self.steps}
        # A re-plan may build on the steps already done (validated with {"done": their ids}).
        done = set((info.context or {}).get("done", ()))
        for s in self.steps:
            missing = [d for d in s.depends_on if (d not in ids and d not in done) or d == s.id]
            if missing:
                raise ValueError(f"step {s.id} depends on unknown steps {missing}")
        if _waves(self.steps, done - ids) is None:
            raise ValueError("the steps' dependencies form a cycle")
        return self


def _waves(steps: list[PlanStep], before: Collection[int] = ()) -> list[list[PlanStep]] | None:
    """Group steps into waves that can run in parallel; None if there is a cycle. ``before``:
    ids of steps done already (a re-plan's steps may depend on them)."""
    done: set[int] = set(before)
    left = list(steps)
    waves: list[list[PlanStep]] = []
    while left:
        ready = [s for s in left if all(d in done for d in s.depends_on)]
        if not ready:
            return None
        waves.append(ready)
        done |= {s.id for s in ready}
        left = [s for s in left if s.id not in done]
    return waves


_FENCE_OPEN = re.compile(r"```(?:json)?[ \t]*\r?\n?[ \t]*\{")


def parse_plan(text: str, done: Collection[int] = ()) -> Plan:
    """Read a plan from the model's text (JSON, possibly fenced or wrapped in chatter).
    ``done``: ids of steps already done, which its steps may depend on (a re-plan)."""
    # From the first "{" that opens a fenced block, else the first "{" at all; the JSON decoder
    # finds where the object ends. (A regex for the whole fenced block backtracked: 0.3 s of a
    # blocked event loop on 27 KB of "```json {" repeated, quadratic beyond.)
    fence = _FENCE_OPEN.search(text)
    start = fence.end() - 1 if fence else text.find("{")
    raw = text[start:] if start >= 0 else text
    try:
        value, _ = json.JSONDecoder().raw_decode(raw.strip())
    except json.JSONDecodeError as exc:
        raise ValueError(f"the plan is not JSON: {exc.msg}") from None
    except RecursionError:
        raise ValueError("the plan is not JSON: nested too deeply") from None
    if isinstance(value, list):
        value = {"steps": value}
    try:
        return Plan.model_validate(value, context={"done": set(done)})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "plan"
        raise ValueError(f"invalid plan: {where}: {first['msg']}") from None


class StepFailed(Exception):
    pass


class PlanExecuteAgent(Agent):
    name = "plan_execute"

    def __init__(self, max_steps: int = 8, step_react_steps: int = 4) -> None:
        self.max_steps = max_steps
        self.step_agent = ReActAgent(max_steps=step_react_steps)

    async def make_plan(self, ctx: AgentContext, extra: str | None = None,
                        done: Collection[int] = ()) -> Plan:
        system = PLAN_SYSTEM.format(
            max_steps=self.max_steps,
            # Each tool's parameters too: the plan fills in its arguments.
            tools="".join(f"\n- {t.name}: {t.description} Parameters: {_schema(t.parameters)}"
                          for t in ctx.tools) or "none",
        )
        messages = with_system(system, ctx.history)
        if extra:
            add_user(messages, extra)
        # The plan is a format (JSON), not the answer: a client's max_tokens (meant for its
        # answer) cut it mid-JSON, and the run fell back to one step. It gets room for a plan.
        budget = None if ctx.max_tokens is None else max(ctx.max_tokens, PLAN_MAX_TOKENS)
        reply = await ctx.call_llm(messages, emit_tokens=False, max_tokens=budget)
        try:
            return self._parse(reply.content, done)
        except ValueError as first_error:
            # Re-asked with the invalid plan cut short: a runaway one (a small model repeating
            # steps until its context was full) sent back whole made a prompt its server
            # refused, and the run failed where it should fall back to one step.
            shown = reply.content
            if len(shown) > _REASK_CHARS:
                shown = shown[:_REASK_CHARS] + " [... cut]"
            messages += [replace(reply, content=shown), ChatMessage(
                "user", f"That plan was not valid ({first_error}). Reply with the JSON plan only."
            )]
            try:
                reply = await ctx.call_llm(messages, emit_tokens=False, max_tokens=budget)
                return self._parse(reply.content, done)
            except (ValueError, ContextLengthExceeded) as exc:
                ctx.emit("thought", {"text": f"no valid plan ({exc}); using one step"})
                # The question may be empty (a /v1 message with only an image, or "").
                return Plan(steps=[PlanStep(id=1, task=ctx.question.strip() or
                                            "Answer the user's request.")])

    def _parse(self, text: str, done: Collection[int] = ()) -> Plan:
        plan = parse_plan(text, done)
        if len(plan.steps) > self.max_steps:  # the prompt asks for at most max_steps
            raise ValueError(f"the plan has {len(plan.steps)} steps; at most {self.max_steps}")
        return plan

    async def run(self, ctx: AgentContext) -> str:
        plan = await self.make_plan(ctx)
        results: dict[int, str] = {}
        try:
            await self.execute(ctx, plan, results)
        except StepFailed as failure:
            done = _results_text(results, results.keys(), "- step {k}: {v}") or "nothing yet"
            # New ids follow every id of the first plan, run or not: a client tracking steps by
            # id (its plan event listed them all) never sees one id for two steps.
            first_ids = max(s.id for s in plan.steps)
            plan = await self.make_plan(ctx, extra=(
                f"A step failed: {failure}. Results so far:\n{done}\n"
                "Make a new plan for what is left, with new step ids; its steps may depend "
                "on the steps above by their ids."
            ), done=results.keys())
            plan = _renumber(plan, start=max(first_ids, *results, 0) + 1)
            try:
                await self.execute(ctx, plan, results)
            except StepFailed as second:
                ctx.emit("thought", {"text": f"re-plan failed too: {second}"})
        summary = _results_text(results, sorted(results), "Step {k}: {v}")
        # The history without the question, which the synthesis prompt restates, when nothing
        # came after it: a /v1 client's tool calls and their results after it stay, and so does
        # the question (without it, its answer's tool call followed the turn before's answer:
        # two assistant messages in a row, which alternating templates refuse).
        i = ctx.question_index
        history = (ctx.history if i is None or i != len(ctx.history) - 1
                   else ctx.history[:i])
        reply = await ctx.call_llm([
            *history,
            ChatMessage("user", SYNTH_PROMPT.format(question=ctx.question, results=summary)),
        ])
        return reply.content

    async def execute(self, ctx: AgentContext, plan: Plan, results: dict[int, str]) -> None:
        ctx.emit("plan", {"steps": [s.model_dump(exclude_none=True) for s in plan.steps]})
        waves = _waves(plan.steps, results.keys()) or [plan.steps]
        for wave in waves:
            failures: list[str] = []
            async with trio.open_nursery() as nursery:
                # The steps of a wave share one tool-output budget, as one step's parallel
                # calls do (four long pages at once overflowed an 8k context).
                share = TOOL_OUTPUT_CHARS // len(wave)
                for step in wave:
                    nursery.start_soon(self._run_step, ctx, step, results, failures, share)
            if failures:
                raise StepFailed("; ".join(failures))

    async def _run_step(
        self, ctx: AgentContext, step: PlanStep, results: dict[int, str], failures: list[str],
        share: int = TOOL_OUTPUT_CHARS,
    ) -> None:
        ctx.emit("step.started", {"id": step.id, "task": step.task})
        try:
            ok, output = await self._step_output(ctx, step, results, share)
        except BaseException:
            # The run ended under it (a cancel, its deadline, a shutdown) or failed: its end is
            # told too (every step.started of a run has its step.finished), then it goes on.
            ctx.emit("step.finished", {"id": step.id, "error": "not finished: the run ended"})
            raise
        results[step.id] = output
        ctx.emit("step.finished", {"id": step.id, ("output" if ok else "error"): output})
        if not ok:
            failures.append(f"step {step.id} ({step.task}): {output}")

    async def _step_output(self, ctx: AgentContext, step: PlanStep, results: dict[int, str],
                           share: int) -> tuple[bool, str]:
        """A step's outcome: whether it succeeded, and its output (or why it failed)."""
        mine = _in_step(ctx, step.id)
        if step.tool and step.tool in ctx.tools and step.arguments is not None:
            obs = await mine.call_tool(step.tool, step.arguments, new_id("call"), limit=share)
            ok, output = obs.ok, obs.text()
        else:
            context = _results_text(
                results, [k for k in results if k in step.depends_on], "Step {k}: {v}")
            prompt = f"Do this step: {step.task}"
            if context:
                prompt += f"\nKnown so far:\n{context}"
            # The conversation's (or /v1 client's) system prompt too, joined to the step
            # agent's: its rules ("answer in French", "never call X", who the user is) held
            # in the synthesis only, and a step's work ignored them.
            messages = [*with_system(self.step_agent.system_prompt(ctx), list(
                itertools.takewhile(lambda m: m.role == "system", ctx.history))),
                ChatMessage("user", prompt)]
            try:
                output = await self.step_agent.loop(mine, messages, fail_at_limit=True)
                ok = not output.startswith("ERROR:")
            except StepLimitReached as limit:  # a step that could not finish failed
                output, ok = str(limit), False
            except BackendError as exc:
                # Its model call failed (the connection lost, a silent or busy server, an
                # error mid-answer): a failed step, re-planned, not a failed run that drops
                # what the other steps found. (A server that stays down fails the re-plan's
                # call, and with it the run.)
                output, ok = f"its model call failed: {exc}", False
        return ok, output


def _renumber(plan: Plan, start: int) -> Plan:
    mapping = {s.id: start + i for i, s in enumerate(plan.steps)}
    # Validated already (with the steps done before it, which a new Plan would not know).
    return Plan.model_construct(steps=[
        # (a dependency on a step of the first plan keeps its id)
        s.model_copy(update={"id": mapping[s.id],
                             "depends_on": [mapping.get(d, d) for d in s.depends_on]})
        for s in plan.steps
    ])


class _StepContext(AgentContext):
    """A plan step's context: its inner LLM calls stream no tokens (only the final synthesis
    speaks to the user), and every event its work emits (``thought``, ``tool.call``,
    ``tool.result``, ``queued``) names the step (``"step": id``): a wave's steps run at once,
    and their events interleave."""

    step_id: int

    async def call_llm(self, messages, *, tools=(), emit_tokens=True, **kw):  # type: ignore[no-untyped-def,override]
        return await super().call_llm(messages, tools=tools, emit_tokens=False, **kw)

    def emit(self, type_: str, data: dict[str, Any]) -> None:
        super().emit(type_, {**data, "step": self.step_id})


def _in_step(ctx: AgentContext, step_id: int) -> AgentContext:
    q = _StepContext.__new__(_StepContext)
    q.__dict__.update(ctx.__dict__)
    q.step_id = step_id
    return q


def _results_text(results: dict[int, str], keys: Collection[int], line: str) -> str:
    """The steps' results a prompt shows (the synthesis, a re-plan, a step's "Known so far"),
    one ``line`` each, sharing ``TOOL_OUTPUT_CHARS``: each step's result is cut to its share,
    with a note. Eight steps' whole outputs overflowed a model's context, and the run failed
    with all its steps' work."""
    if not keys:
        return ""
    share = TOOL_OUTPUT_CHARS // len(keys)
    out = []
    for k in keys:
        text = results[k]
        if len(text) > share:
            text = (f"{text[:share]}\n[cut here: {len(text) - share:,} more characters]")
        out.append(line.format(k=k, v=text))
    return "\n".join(out)


def _schema(parameters: dict[str, Any]) -> str:
    """A tool's parameters as JSON (the plan is JSON; a Python repr showed True and 'x')."""
    return json.dumps(parameters, ensure_ascii=False)
