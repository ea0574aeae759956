"""What every agent stands on: the run's context, ``call_llm`` and ``call_tool``.

``call_llm`` streams through the backend (the interceptor, in the app), turning chunks into
``token`` events; ``call_tool`` validates arguments, runs the tool under ``trio.fail_after`` and
turns its failure or timeout into an *observation* the model sees, never a crashed run.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import trio

from ..backends.base import Backend, ChatMessage, ChatRequest, ToolCall, Usage
from ..backends.common import new_call_id
from ..errors import ContextLengthExceeded, ToolArgumentsError
from ..logs import get_logger
from ..metrics import Metrics
from ..runs.handle import RunHandle
from ..store.records import strict_json
from ..text import clean_json, clean_text, not_text_at
from ..tools import Tool, ToolRegistry
from .abandon import call_abandonable  # re-exported
from .history import REFIT_KEEP, fitted_history, sent_chars, shorter_history

__all__ = ["Agent", "AgentContext", "Observation", "call_abandonable",
           "unicode_request"]

log = get_logger("service.agents")


_IN_THREAD = partial(trio.to_thread.run_sync, abandon_on_cancel=True)
# What a tool raising is its failure, seen by the model (``call_tool``).
_TOOL_FAILURES: tuple[type[BaseException], ...] = (Exception, SystemExit, asyncio.CancelledError)
TOOL_OUTPUT_CHARS = 16_000  # what a model (and the run's events) get of one tool's output


def unicode_request(request: ChatRequest) -> ChatRequest:
    """``request`` with every string cleaned (``service.text.clean_text``: a lone surrogate
    becomes U+FFFD): it goes upstream as UTF-8, which cannot encode one. ``request`` itself when
    it holds none (the usual case: only a scan)."""
    if not_text_at([request.stop, request.tools, request.options]) is None and all(
        not_text_at([m.content, m.tool_call_id, m.name]) is None
        and all(_unicode_call(c) is c for c in m.tool_calls)
        for m in request.messages
    ):
        return request
    return replace(
        request,
        messages=tuple(
            replace(m, content=clean_text(m.content),
                    tool_calls=tuple(_unicode_call(c) for c in m.tool_calls),
                    tool_call_id=clean_json(m.tool_call_id), name=clean_json(m.name))
            for m in request.messages
        ),
        stop=clean_json(request.stop), tools=clean_json(request.tools),
        options=clean_json(request.options),
    )


def _unicode_call(call: ToolCall) -> ToolCall:
    """A tool call with its strings cleaned (a model's name, arguments or id may hold a lone
    surrogate: JSON's escapes allow it), or ``call`` itself when they hold none."""
    if not_text_at([call.id, call.name, call.arguments, call.invalid_arguments]) is None:
        return call
    return replace(call, id=clean_text(call.id), name=clean_text(call.name),
                   arguments=clean_json(call.arguments),
                   invalid_arguments=clean_json(call.invalid_arguments))


async def _awaited(name: str, fn: Callable[[], Awaitable[Any]]) -> Any:
    return await fn()


async def _result(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


class ToolThunk:
    """A sync tool's call, for a worker thread: ``run_sync`` can tell which tool it is."""

    def __init__(self, tool: Tool, arguments: dict[str, Any]) -> None:
        self.tool = tool
        self.arguments = arguments

    def __call__(self) -> Any:
        return self.tool.fn(**self.arguments)


@dataclass(frozen=True)
class Observation:
    """What a tool call gave back, as the model will see it."""

    call_id: str
    name: str
    output: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def text(self) -> str:
        if self.error is not None:
            return f"ERROR: {self.error}"
        if isinstance(self.output, str):
            return self.output
        # Text as it is (not \u escapes: 6 tokens a CJK character, and harder to read).
        return json.dumps(self.output, default=str, ensure_ascii=False)


@dataclass
class AgentContext:
    handle: RunHandle
    backend: Backend
    tools: ToolRegistry
    history: list[ChatMessage]  # system prompt, earlier turns, then the new user message
    nursery: trio.Nursery  # the run's own nursery
    metrics: Metrics
    model: str | None = None
    tool_timeout: float = 30.0
    usage: dict[str, int] = field(default_factory=dict)
    client_tools: tuple[dict[str, Any], ...] = ()  # OpenAI-style tools to pass through
    max_tokens: int | None = None
    temperature: float | None = None
    stop: tuple[str, ...] = ()
    options: tuple[tuple[str, Any], ...] = ()  # a client's other OpenAI options (chat agent)
    # A stored conversation's history, trimmed by the service (SERVICE_HISTORY_CHARS): its
    # older turns may be left out of calls whose context it overflows (call_llm, _shorten).
    # A /v1 client's messages are its prompt, sent whole.
    history_trimmable: bool = False
    # The history's messages left out of its calls (ids; see ``_shorten``), the history as
    # the run got it, and how far it was shortened.
    _dropped: set[int] = field(default_factory=set, init=False)
    _call_ids: set[str] = field(default_factory=set, init=False)  # its calls' (unique_calls)
    _history_given: list[ChatMessage] | None = field(default=None, init=False)
    _fit_level: int = field(default=0, init=False)  # of REFIT_KEEP, tried so far
    _last_call_chunks: int = field(default=0, init=False)
    last_finish_reason: str | None = None
    # a call that streams to the run's clients has named the model
    _streamed: bool = field(default=False, init=False)
    # the model the run's next token, thought or tool call names (it named none, and a call
    # streaming to its clients has just named the one that answers it): told and stored
    # with that event
    _tell_model: str | None = field(default=None, init=False)
    _told_model: str | None = field(default=None, init=False)  # the one its tokens last named
    # How sync tools run: a worker thread. Virtual-time tests pass an inline runner, since
    # autojump_clock would jump while a thread works.
    run_sync: Callable[..., Awaitable[Any]] = _IN_THREAD
    # How async tools run: awaited here, or (the supervisor's runner) in a task that a
    # timeout or a cancel abandons (call_abandonable).
    run_async: Callable[[str, Callable[[], Awaitable[Any]]], Awaitable[Any]] = _awaited

    @property
    def question(self) -> str:
        """The user's last message (a /v1 history may end with a client's tool results)."""
        i = self.question_index
        return self.history[i].content if i is not None else ""

    @property
    def question_index(self) -> int | None:
        for i in range(len(self.history) - 1, -1, -1):
            if self.history[i].role == "user":
                return i
        return None

    def emit(self, type_: str, data: dict[str, Any]) -> None:
        if self._tell_model is not None and type_ in _NAMES_THE_MODEL:
            data = {**data, "model": self._tell_model}
            self._told_model, self._tell_model = self._tell_model, None
        self.handle.emit(type_, data)

    def _queued(self, position: int) -> None:
        """The LLM call waits for a backend slot: shown to the run's clients (a burst is
        visible, not silence)."""
        if not self.handle.closed:
            self.emit("queued", {"position": position})

    def _add_usage(self, usage: Usage | None, chunks: int) -> None:
        """Count a call in the run's usage: the tokens its backend reported, or for a call
        cut before its usage came (a stream that died, a cancel, a deadline), its content
        chunks so far, marked ``tokens_estimated``, as its LLM call is recorded."""
        self.usage["llm_calls"] = self.usage.get("llm_calls", 0) + 1
        self.handle.usage = dict(self.usage)  # a call that reports no usage is a call too
        if (usage is None or usage.completion_tokens is None) and chunks:
            usage = Usage(usage.prompt_tokens if usage is not None else None, chunks, True)
        if usage is None:
            return
        if usage.estimated:
            self.usage["tokens_estimated"] = True
        for key, value in (("prompt_tokens", usage.prompt_tokens),
                           ("completion_tokens", usage.completion_tokens)):
            if value is not None:
                self.usage[key] = self.usage.get(key, 0) + value
        self.usage["total_tokens"] = (
            self.usage.get("prompt_tokens", 0) + self.usage.get("completion_tokens", 0)
        )
        self.handle.usage = dict(self.usage)

    async def call_llm(
        self,
        messages: Sequence[ChatMessage],
        *,
        tools: Sequence[Tool] = (),
        raw_tools: Sequence[dict[str, Any]] = (),
        emit_tokens: bool = True,
        max_tokens: int | None = None,
        temperature: float | None = None,
        options: tuple[tuple[str, Any], ...] = (),
    ) -> ChatMessage:
        """One streamed LLM call; returns the assistant message (text and tool calls).

        Every call upstream goes through here, so here it is made Unicode text both ways (see
        ``unicode_request``): the API refuses a client's lone surrogates, but a model's (in a
        tool name) or a tool's output could still hold one, and UTF-8 cannot encode it.

        And here a stored conversation's history is fitted to the model's context: a call the
        model's server refuses as too long (before it streamed anything) is made again with
        the history's oldest turns left out (``_shorten``), and so is every later call of the
        run. SERVICE_HISTORY_CHARS trims by characters and a context is in tokens: with
        figures or code a conversation outgrew the demo's 8,192-token slot well within 24,000
        characters, and each later message was refused; a tool's result could tip a ReAct
        turn's later call over too."""
        before: tuple[int, int] | None = None  # this call's last refused try, by its numbers
        while True:
            sent = [m for m in messages if id(m) not in self._dropped]
            try:
                return await self._call_once(
                    sent, tools=tools, raw_tools=raw_tools, emit_tokens=emit_tokens,
                    max_tokens=max_tokens, temperature=temperature, options=options,
                    # A prompt that fits but leaves the answer no room (llama.cpp then cuts
                    # the answer where its slot ends) is refused while it can be shortened.
                    shortenable=self._shorter(sent) is not None)
            except ContextLengthExceeded as exc:
                if self._last_call_chunks or not self._shorten(sent, exc.tokens, before):
                    raise
                before = (exc.tokens[0], sent_chars(sent)) if exc.tokens else None

    def _shorter(
        self, sent: Sequence[ChatMessage],
    ) -> tuple[int, set[int], list[ChatMessage]] | None:
        """The next level of ``_shorten`` for ``sent``: (level, the ids it leaves out, the
        history it leaves), or None when no level would leave anything more out of it."""
        if not self.history_trimmable:
            return None
        given = self._history_given or self.history
        in_sent = {id(m) for m in sent}
        # A level is used up only by a call it shortened: a refused call without the history
        # (auto's classification of a long question) used them all up, and the chosen
        # agent's call, history and all, was refused for good.
        for level in range(self._fit_level, len(REFIT_KEEP)):
            shorter = shorter_history(given, REFIT_KEEP[level])
            if shorter is None:
                return None
            out = {id(m) for m in given} - {id(m) for m in shorter}
            if (out - self._dropped) & in_sent:
                return level, out, shorter
        return None

    def _shorten(self, sent: Sequence[ChatMessage], tokens: tuple[int, int] | None = None,
                 before: tuple[int, int] | None = None) -> bool:
        """Leave more of the history's older turns out of the run's calls; False when that
        would leave nothing more out of ``sent``. By the refusal's numbers when it said them
        (``tokens``: the prompt's, the most it may have; ``before``: the same call's last
        refused try's tokens and characters): as few of the oldest turns as bring it under
        (``fitted_history``). Else by levels: of the history as the run got it, a half of the
        older turns' text kept, then a quarter, then none."""
        given = self._history_given or self.history
        fitted = (fitted_history(given, sent, *tokens, before=before)
                  if tokens is not None and self.history_trimmable else None)
        if fitted is not None:
            shorter, out = fitted, {id(m) for m in given} - {id(m) for m in fitted}
        else:
            found = self._shorter(sent)
            if found is None:
                return False
            level, out, shorter = found
            self._fit_level = level + 1
        given = self._history_given = self._history_given or list(self.history)
        self._dropped |= out
        log.info("run %s: its history is over the model's context, or leaves its answer no "
                 "room; %d of its %d messages kept, trying again",
                 self.handle.id, len(shorter), len(given))
        self.history = shorter
        self.metrics.history_shortened.inc()
        return True

    async def _call_once(
        self,
        messages: Sequence[ChatMessage],
        *,
        tools: Sequence[Tool],
        raw_tools: Sequence[dict[str, Any]],
        emit_tokens: bool,
        max_tokens: int | None,
        temperature: float | None,
        options: tuple[tuple[str, Any], ...],
        shortenable: bool = False,
    ) -> ChatMessage:
        chosen: list[str] = []
        request = unicode_request(ChatRequest(
            messages=tuple(messages), model=self.model,
            # None named anywhere: the backend picks one (each server it tries tells its own).
            on_model=None if self.model else chosen.append,
            tools=(*(t.openai() for t in tools), *raw_tools),
            max_tokens=max_tokens if max_tokens is not None else self.max_tokens,
            temperature=temperature if temperature is not None else self.temperature,
            stop=self.stop, run_id=self.handle.id, options=options,
            conversation_id=self.handle.conversation_id,
            on_queued=self._queued, refuse_without_room=shortenable,
            deadline=(self.handle.scope.deadline
                      if self.handle.scope.deadline != math.inf else None),
        ))
        parts: list[str] = []
        calls: list[ToolCall] = []
        usage: Usage | None = None
        content_chunks = 0
        named = False  # this call has named the model that answers it
        sent = True
        try:
            async with self.backend.stream(request) as chunks:
                async for chunk in chunks:
                    if not named and (chunk.model or chosen):
                        named = True
                        self._answered_by(chunk.model or chosen[-1], emit_tokens)
                    if chunk.text or chunk.thinking:
                        content_chunks += 1
                    if chunk.thinking and emit_tokens:
                        # A reasoning model's thinking, piece by piece (never in the answer).
                        self.emit("thought", {"text": chunk.thinking, "reasoning": True})
                        if self.handle.agent == "chat":  # (a non-stream /v1 answer's only)
                            # As the event says it (no NUL, no lone surrogate).
                            self.handle.reasoning_parts.append(clean_text(chunk.thinking))
                    if chunk.text:
                        parts.append(chunk.text)
                        if emit_tokens:
                            self.emit("token", {"text": chunk.text})
                    calls.extend(_unicode_call(c) for c in chunk.tool_calls)
                    if chunk.usage is not None:
                        usage = chunk.usage
                    if chunk.finish_reason is not None:
                        self.last_finish_reason = chunk.finish_reason
        except ContextLengthExceeded as exc:
            sent = not exc.unsent  # refused before it was sent: not a call of the run
            raise
        finally:
            self._last_call_chunks = content_chunks
            if sent:
                self._add_usage(usage, content_chunks)
        return ChatMessage("assistant", clean_text("".join(parts)), tuple(calls))

    def _answered_by(self, model: str, answers: bool) -> None:
        """A call's model, as it says (else as the server that answered chose it, the run
        naming none). The run names the model of its last call that streamed to its clients
        (its answer; an earlier call, a router's classification or a plan, may have gone to
        another server of a fleet), or of its first call until one has."""
        # As the upstream's JSON named it: a lone surrogate or a NUL could be stored nowhere.
        model = clean_text(model)
        if answers:
            self._streamed = True
        elif "model" in self.handle.result_extra or self._streamed:
            return
        self.handle.result_extra["model"] = model
        if self.model is None:
            # The run named none: it names this one, live and stored with its end, as its
            # answer and its LLM call do; and with the first token it writes, so that a run
            # closed by another instance (its owner died) names the model its clients saw.
            if answers:
                self._tell_model = model if model != self._told_model else None
            self.handle.model = model

    async def call_tool(self, name: str, arguments: object, call_id: str,
                        invalid_arguments: str | None = None,
                        limit: int = TOOL_OUTPUT_CHARS, *, native: bool = False) -> Observation:
        """Run a tool; any failure or timeout comes back as an error observation.
        ``invalid_arguments``: the model's arguments were not a JSON object (not run).
        ``limit``: the characters of its output (or error) the model and its event get.
        ``native``: the model called it natively (not in the ReAct text protocol): its
        ``tool.call`` says so, for whoever reads the run's text after it (the store closing a
        run whose owner died: the text after native calls is the answer)."""
        mark = {"native": True} if native else {}
        if invalid_arguments is not None:
            self.emit("tool.call", {"name": name, "arguments": {}, "call_id": call_id, **mark})
            refused = Observation(call_id, name, error=(
                f"the arguments are not a valid JSON object: {invalid_arguments[:200]!r}"))
            self.emit("tool.result", {"call_id": call_id, "error": refused.error})
            label = name if self.tools.get(name) is not None else "unknown"
            self.metrics.tool_calls.labels(label, "bad_arguments").inc()
            return refused
        tool = self.tools.get(name)
        if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
            arguments = {}  # no input: no arguments (not "" for the tool's only parameter)
        if not isinstance(arguments, dict):
            # A bare value from the text protocol fills a tool's only parameter.
            props = list((tool.parameters.get("properties") or {}) if tool else ())
            arguments = {props[0] if len(props) == 1 else "input": arguments}
        self.emit("tool.call", {"name": name, "arguments": arguments, "call_id": call_id,
                                **mark})
        timeout = self.tool_timeout
        obs: Observation
        outcome = "ok"
        if tool is None:
            known = ", ".join(t.name for t in self.tools) or "none"
            obs = Observation(call_id, name, error=f"unknown tool {name!r} (tools: {known})")
            outcome = "unknown"
        else:
            timeout = tool.timeout_under(self.tool_timeout)
            try:
                valid = tool.validate(arguments)
                # Its own scope, not fail_after: a TooSlowError a tool raises itself (its own
                # inner deadline) is its error, not this timeout.
                with trio.move_on_after(timeout) as budget:
                    if tool.is_async:
                        output = await self.run_async(name, partial(tool.fn, **valid))
                    else:
                        # A sync tool has no checkpoints: abandon its thread on cancel.
                        output = await self.run_sync(ToolThunk(tool, valid))
                        if inspect.isawaitable(output):  # async behind a plain wrapper
                            output = await self.run_async(name, partial(_result, output))
                if budget.cancelled_caught:
                    obs = Observation(call_id, name,
                                      error=f"tool {name} timed out after {timeout:g}s")
                    outcome = "timeout"
                else:
                    obs = _bounded(Observation(
                        call_id, name, output=clean_json(_jsonable(output))), limit)
            except ToolArgumentsError as exc:
                obs = _bounded(Observation(call_id, name, error=clean_text(exc.message)), limit)
                outcome = "bad_arguments"
            except (*_TOOL_FAILURES,) as exc:
                # SystemExit too: tools built on argparse or click exit on bad input, and a
                # tool's failure is the model's observation, never the run's (or the service's).
                # asyncio's CancelledError too: a sync tool wrapping an asyncio SDK raises it
                # when a request it gathers is cancelled; this run's own cancel is trio's.
                obs = _bounded(Observation(
                    call_id, name, error=clean_text(_describe_failure(exc))), limit)
                outcome = "error"
            except BaseExceptionGroup as group:
                # A tool's SystemExit from a task of its own (argparse or click in a nursery
                # child) comes in a group: the tool's failure too, unless it holds more.
                if group.split(_TOOL_FAILURES)[1] is not None:
                    self._cut_short(name, call_id)
                    raise
                only = group.exceptions[0] if len(group.exceptions) == 1 else group
                obs = _bounded(Observation(
                    call_id, name, error=clean_text(_describe_failure(only))), limit)
                outcome = "error"
            except BaseException:
                # The run is cancelled (by a client, its deadline, a shutdown) mid-call: the
                # call is counted and its end told, then the cancellation goes on.
                self._cut_short(name, call_id)
                raise
        self.metrics.tool_calls.labels(name if tool else "unknown", outcome).inc()
        result: dict[str, Any] = {"call_id": call_id}
        if obs.ok:
            result["output"] = obs.output
        else:
            result["error"] = obs.error
        self.emit("tool.result", result)
        return obs

    def _cut_short(self, name: str, call_id: str) -> None:
        """A call cut by its run's end: counted, and its ``tool.result`` said (every
        ``tool.call`` of a run has one, live and as stored)."""
        self.metrics.tool_calls.labels(name, "cancelled").inc()
        self.emit("tool.result", {"call_id": call_id,
                                  "error": f"tool {name} was stopped: the run ended"})

    def unique_calls(self, reply: ChatMessage) -> ChatMessage:
        """``reply`` with each native tool call's id unique in the run (a plan's steps share
        its ids): a server that numbers its calls per response (``call_0``) gave two parallel
        steps, or two turns, the same ``call_id``, and a client pairing ``tool.call`` with
        ``tool.result`` by id mixed them up. A repeated id is replaced before anything is
        told or sent back: the model sees its call and the result under the new one."""
        if not self._call_ids:  # (the first: the history's ids are taken too)
            # A /v1 client's history holds calls and results of its own: a repeat of one of
            # those ids gave the model two calls and two results under one id.
            for m in self.history:
                self._call_ids.update(c.id for c in m.tool_calls)
                if m.tool_call_id:
                    self._call_ids.add(m.tool_call_id)
        calls, renamed = [], False
        for call in reply.tool_calls:
            if call.id in self._call_ids:
                call, renamed = replace(call, id=new_call_id()), True
            self._call_ids.add(call.id)
            calls.append(call)
        return replace(reply, tool_calls=tuple(calls)) if renamed else reply

    async def call_tools_parallel(self, calls: Sequence[ToolCall]) -> list[Observation]:
        """Run several native tool calls of one step at once; results in the calls' order. Past
        ``PARALLEL_TOOL_CALLS`` in one step, the rest are not run: each is an error
        observation (a model that asked for hundreds at once started them all)."""
        results: list[Observation | None] = [None] * len(calls)
        for i, call in enumerate(calls[PARALLEL_TOOL_CALLS:], PARALLEL_TOOL_CALLS):
            self.emit("tool.call", {"name": call.name, "arguments": call.arguments,
                                    "call_id": call.id, "native": True})
            refused = Observation(call.id, call.name, error=(
                f"not run: at most {PARALLEL_TOOL_CALLS} tool calls in one step"))
            self.emit("tool.result", {"call_id": call.id, "error": refused.error})
            label = call.name if self.tools.get(call.name) is not None else "unknown"
            self.metrics.tool_calls.labels(label, "refused").inc()  # told, so counted
            results[i] = refused
        calls = calls[:PARALLEL_TOOL_CALLS]

        # The step's outputs share one budget: cut one by one, four long pages together still
        # overflowed a model's context (the run failed context_length_exceeded).
        share = TOOL_OUTPUT_CHARS // max(len(calls), 1)

        async def one(i: int, call: ToolCall) -> None:
            results[i] = await self.call_tool(call.name, call.arguments, call.id,
                                              call.invalid_arguments, limit=share, native=True)

        async with trio.open_nursery() as nursery:
            for i, call in enumerate(calls):
                nursery.start_soon(one, i, call)
        return [r for r in results if r is not None]


PARALLEL_TOOL_CALLS = 16  # tool calls of one step run at once; past it, not run
# The events of a call that answers which may carry the model it named (``_tell_model``).
_NAMES_THE_MODEL = frozenset({"token", "thought", "tool.call"})


def _bounded(obs: Observation, limit: int = TOOL_OUTPUT_CHARS) -> Observation:
    """An observation whose text fits ``TOOL_OUTPUT_CHARS``, cut with a note if it did not:
    a 1 MB page from a tool went whole to the model, whose context it overflowed (the run
    failed ``context_length_exceeded``), and whole into one stored event. An error too (an
    exception carrying a server's error page; a schema message quoting a huge argument)."""
    if obs.error is not None:
        if len(obs.error) <= limit:
            return obs
        kept = obs.error[:limit]
        return Observation(obs.call_id, obs.name, error=(
            f"{kept}\n[the tool's error was cut here: {len(obs.error) - len(kept):,} more "
            "characters]"))
    text = obs.text()
    if len(text) <= limit:
        return obs
    kept = text[:limit]
    return Observation(obs.call_id, obs.name, output=(
        f"{kept}\n[the tool's output was cut here: {len(text) - len(kept):,} more characters]"))


def _describe_failure(exc: BaseException) -> str:
    """``Type: message`` of a tool's exception; its type alone if its text cannot be made (a
    ``__str__`` that raises must not fail the run: the failure is the tool's)."""
    try:
        text = str(exc)
    except Exception:
        return f"{type(exc).__name__} (its message could not be read)"
    return f"{type(exc).__name__}: {text}"


def _jsonable(value: Any) -> Any:
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return strict_json(value)  # NaN/Infinity anywhere in it, or non-JSON types
    return json.loads(text) if not isinstance(value, str) else value


class Agent:
    """An agent answers the run's question; ``run`` returns the final answer text."""

    name = "agent"

    async def run(self, ctx: AgentContext) -> str:
        raise NotImplementedError
