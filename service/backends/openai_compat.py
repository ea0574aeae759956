"""OpenAI-compatible adapter (llama.cpp's ``llama-server`` and any OpenAI-compatible server).

``POST /v1/chat/completions`` with ``stream: true`` and ``stream_options.include_usage`` always.
The body is SSE: ``data: {chat.completion.chunk}`` events, ``:`` comment keep-alives, and
``data: [DONE]`` last. ``choices[0].delta`` carries ``content`` and ``tool_calls`` fragments
(joined by ``index``: id and name come first, ``arguments`` is a JSON string cut into pieces);
``choices[0].finish_reason`` ends the choice; a last chunk with ``choices: []`` carries ``usage``
(and, from llama.cpp, a ``timings`` object, passed through). If usage never arrives, completion
tokens are counted from the content chunks seen and marked ``estimated``.

``GET /health`` is llama.cpp's readiness: 200 ready, 503 ``{"error": {"message": "Loading
model"}}`` reachable but not ready. ``GET /v1/models`` lists models.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, TypedDict

import httpx
import trio

from ..errors import (
    BackendError,
    BackendProtocolError,
    BackendResponseError,
    ContextLengthExceeded,
    ModelNotFound,
)
from ..text import TextJoiner
from .base import BackendHealth, ChatChunk, ChatMessage, ChatRequest, ModelInfo, ToolCall, Usage
from .common import HTTPBackend, milliseconds, new_call_id, parse_arguments, token_count
from .http import (
    Budgets,
    SSEReader,
    context_numbers,
    error_kind,
    loads_json,
    open_stream,
    request_json,
)
from .room import ContextRoom
from .stream_parsers import DEFAULT_MAX_LINE

__all__ = ["OpenAICompatBackend", "openai_messages"]


class OpenAIMessage(TypedDict, total=False):
    role: str
    content: str
    tool_calls: list[dict[str, Any]]
    tool_call_id: str
    name: str


def openai_messages(messages: tuple[ChatMessage, ...]) -> list[OpenAIMessage]:
    out: list[OpenAIMessage] = []
    for m in messages:
        msg: OpenAIMessage = {"role": m.role, "content": m.content}
        if m.tool_calls:
            msg["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
                }
                for c in m.tool_calls
            ]
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        if m.name:  # a tool's result's, or a participant's (a /v1 client's "alice")
            msg["name"] = m.name
        out.append(msg)
    return out


# A streamed tool call's arguments, all of a call's together, are bounded as a line of the
# stream is (Ollama sends a call whole, in one line): fragments add up without end otherwise.
MAX_ARGUMENTS = DEFAULT_MAX_LINE
MAX_TOOL_CALLS = 128  # distinct tool calls in one answer


class _PartialCall:
    __slots__ = ("arguments", "id", "name")

    def __init__(self) -> None:
        self.id: str | None = None
        self.name: str | None = None
        self.arguments: list[str] = []


class OpenAIChunks:
    """Async iterator of ChatChunk over an OpenAI-style SSE body."""

    def __init__(self, reader: SSEReader, backend: str, model: str, *,
                 on_output: Callable[[], None] | None = None) -> None:
        self.reader = reader
        self._on_output = on_output  # told at a tool call's first piece (ChatRequest's)
        self.backend = backend
        self.model = model
        self.done = False
        self.content_chunks = 0  # content deltas seen: the estimate when usage never comes
        self._finish_reason: str | None = None
        self._usage: Usage | None = None
        self._timings: dict[str, float] | None = None
        self._calls: dict[int, _PartialCall] = {}
        self._arguments = 0  # characters of tool-call arguments so far (MAX_ARGUMENTS)
        self._call_progress = False  # the last event added to a tool call: progress
        self._text = TextJoiner()  # surrogate halves split across events
        self._thinking = TextJoiner()

    def __repr__(self) -> str:
        return (
            f"<OpenAIChunks {self.backend} model={self.model} chunks={self.content_chunks} "
            f"finish={self._finish_reason} done={self.done}>"
        )

    def __aiter__(self) -> OpenAIChunks:
        return self

    async def __anext__(self) -> ChatChunk:
        # One deadline for this chunk: events that carry nothing (a role-only or empty delta)
        # are not progress, so an upstream sending only those still hits its budget.
        deadline = self.reader.timed.next_deadline()
        while not self.done:
            event = await self.reader.next(deadline)
            if event is None:
                if self._finish_reason is None:
                    raise BackendProtocolError(
                        "stream ended before a finish_reason", backend=self.backend
                    )
                return self._final()  # finished but no [DONE]: tolerate
            if event.event == "error":
                raise self._stream_error(event.data)
            if event.data.strip() == "[DONE]":
                if self._finish_reason is None and not self._calls and self._usage is None:
                    raise BackendProtocolError("[DONE] before any finish_reason",
                                               backend=self.backend)
                return self._final()
            chunk = self._event(event.data)
            if chunk is not None:
                return chunk
            if self._call_progress:
                # A tool call's fragment is progress (its arguments, a file's content say, may
                # stream for longer than the gap budget): the next wait is a new one.
                self._call_progress = False
                deadline = self.reader.timed.next_deadline()
        await self.reader.drain()  # the end of the body, so the connection can be reused
        raise StopAsyncIteration

    def _stream_error(self, data: str) -> BackendError:
        """llama.cpp's ``error: {"code", "message", "type"}`` line (see ``SSEParser``): a
        prompt over the model's context is the request's fault there too (400, never failed
        over), as when it comes as an HTTP 400."""
        try:
            obj = loads_json(data)
        except ValueError:
            obj = None
        return self._error_of(obj, data)

    def _error_of(self, obj: Any, data: str) -> BackendError:
        """An error said in the stream, ``{"error": {...}}`` or its inside; cut as every
        upstream error is (one can be a whole line of 4 MB, and it goes into the call's record
        and the run's error)."""
        err = obj.get("error", obj) if isinstance(obj, dict) else None
        details: dict[str, Any] = {}
        kind = None
        if isinstance(err, dict):
            code = err.get("code")
            if isinstance(code, int) and not isinstance(code, bool):
                details["upstream_status"] = code
            message, kind = str(err.get("message") or err)[:500], error_kind(err)
        elif isinstance(err, str) and err:
            message = err[:500]
        else:
            message = data[:500] or "the upstream reported an error"
        if ContextLengthExceeded.said(message, kind):
            too_long = ContextLengthExceeded(message, backend=self.backend, param="messages",
                                             **details)
            if isinstance(err, dict):
                too_long.tokens = context_numbers(err)
            return too_long
        return BackendResponseError(message, backend=self.backend, mid_stream=True, **details)

    def _event(self, data: str) -> ChatChunk | None:
        self._call_progress = False  # set again if this event adds to a tool call
        try:
            obj = loads_json(data)
        except ValueError as exc:
            raise BackendProtocolError(f"malformed SSE data: {data[:200]!r}",
                                       backend=self.backend) from exc
        if not isinstance(obj, dict):
            raise BackendProtocolError(f"SSE data is not an object: {data[:200]!r}",
                                       backend=self.backend)
        if "error" in obj:  # vLLM's, OpenAI-style gateways': as llama.cpp's ``error:`` line
            raise self._error_of(obj, data)
        if isinstance(obj.get("model"), str) and obj["model"]:
            self.model = obj["model"]
        if isinstance(obj.get("usage"), dict):
            u = obj["usage"]
            self._usage = Usage(token_count(u.get("prompt_tokens")),
                                token_count(u.get("completion_tokens")))
        if isinstance(obj.get("timings"), dict):
            self._timings = {
                k: ms for k, v in obj["timings"].items()
                if (ms := milliseconds(v)) is not None
            }
        choices = obj.get("choices") or []
        if not isinstance(choices, list):
            raise BackendProtocolError("choices is not a list", backend=self.backend)
        text = thinking = ""
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if not isinstance(delta, dict):
                raise BackendProtocolError(f"delta is not an object: {delta!r:.200}",
                                           backend=self.backend)
            content = delta.get("content")
            if isinstance(content, str):
                text += content
            # A reasoning model's thinking: llama.cpp's ``reasoning_content`` (its default
            # reasoning format), ``reasoning`` elsewhere. Not the answer, but progress.
            for key in ("reasoning_content", "reasoning"):
                if isinstance(delta.get(key), str):
                    thinking += delta[key]
                    break  # a server sending both sends the same text twice
            parts = delta.get("tool_calls") or ()
            if not isinstance(parts, list | tuple):
                raise BackendProtocolError(f"tool_calls is not a list: {parts!r:.200}",
                                           backend=self.backend)
            for part in parts:
                self._add_call_delta(part)
            reason = choice.get("finish_reason")
            if reason:
                if not isinstance(reason, str):
                    raise BackendProtocolError(f"finish_reason is not a string: {reason!r:.200}",
                                               backend=self.backend)
                self._finish_reason = reason
        text, thinking = self._text.feed(text), self._thinking.feed(thinking)
        if not text and not thinking:
            return None
        self.content_chunks += 1
        return ChatChunk(text=text, thinking=thinking, model=self.model, backend=self.backend)

    def _add_call_delta(self, part: Any) -> None:
        if not isinstance(part, dict):
            raise BackendProtocolError(f"malformed tool call delta: {part!r:.200}",
                                       backend=self.backend)
        index = part.get("index", len(self._calls))
        function = part.get("function") or {}
        if not isinstance(index, int) or not isinstance(function, dict):
            raise BackendProtocolError(f"malformed tool call delta: {part!r:.200}",
                                       backend=self.backend)
        call = self._calls.get(index)
        if call is None:
            if len(self._calls) >= MAX_TOOL_CALLS:
                raise BackendProtocolError(f"more than {MAX_TOOL_CALLS} tool calls in one answer",
                                           backend=self.backend)
            call = self._calls[index] = _PartialCall()
            if self._on_output is not None:
                # The answer has begun (its calls come whole with the last chunk).
                self._on_output()
                self._on_output = None
        if part.get("id"):
            call.id = str(part["id"])
        name = function.get("name")
        if isinstance(name, str) and name:
            if call.name is None:  # its first name is progress; another one adds nothing
                self._call_progress = True
            call.name = name
        if isinstance(function.get("arguments"), str) and function["arguments"]:
            self._arguments += len(function["arguments"])
            if self._arguments > MAX_ARGUMENTS:
                raise BackendProtocolError(
                    f"tool call arguments longer than {MAX_ARGUMENTS:,} characters",
                    backend=self.backend)
            call.arguments.append(function["arguments"])
            self._call_progress = True

    def _final(self) -> ChatChunk:
        self.done = True
        calls = []
        for index in sorted(self._calls):
            partial = self._calls[index]
            # A call without a name is the model's slip, passed on as Ollama's adapter does: an
            # agent tells the model "unknown tool ''" (it failed the whole run here).
            name = partial.name or ""
            raw = "".join(partial.arguments)
            try:
                args, invalid = parse_arguments(raw, backend=self.backend, name=name), None
            except BackendProtocolError:
                args, invalid = {}, raw
            # A server that gives no id gets a unique one: "call_<index>" repeated in every step
            # of a ReAct run, which made call_id ambiguous in its events.
            calls.append(ToolCall(partial.id or new_call_id(), name, args, invalid))
        usage = self._usage or Usage(completion_tokens=self.content_chunks, estimated=True)
        return ChatChunk(text=self._text.flush(), thinking=self._thinking.flush(), done=True,
                         tool_calls=tuple(calls),
                         finish_reason=self._finish_reason or ("tool_calls" if calls else "stop"),
                         usage=usage, timings=self._timings, model=self.model,
                         backend=self.backend)


class OpenAICompatBackend(HTTPBackend):
    """llama.cpp's server or any OpenAI-compatible server. ``url`` is the base, without /v1."""

    kind = "llamacpp"

    def __init__(
        self,
        name: str,
        url: str,
        client: httpx.AsyncClient,
        budgets: Budgets | None = None,
        *,
        default_model: str | None = None,
        health_timeout: float = 2.0,
        api_key: str | None = None,
        only_model: str | None = None,
        answer_cap: int | None = None,
    ) -> None:
        super().__init__(name, url, client, budgets, default_model=default_model,
                         health_timeout=health_timeout)
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        # A server that answers any model name with its one model (llama.cpp's, embedded):
        # a request naming another is refused here (404, and auto moves on), not answered by it.
        self.only_model = only_model
        # ``answer_cap``: the server's own cap on an answer (--n-predict), when it is known.
        self.room = ContextRoom(name, self.url, client, self.headers, cap=answer_cap)

    def chat_body(self, request: ChatRequest, model: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "messages": openai_messages(request.messages),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.stop:
            body["stop"] = list(request.stop)
        if request.tools:
            body["tools"] = list(request.tools)
        body.update(request.options)  # OpenAI's own names: as they came
        return body

    async def check_room(self, request: ChatRequest) -> ChatRequest:
        """Refuse (ContextLengthExceeded) a call flagged ``refuse_without_room`` whose prompt
        leaves its answer no room in the server's slot (``room``); else the call, checked.
        The interceptor asks it before the call waits for a slot."""
        if not request.refuse_without_room:
            return request
        model = await self.resolve_model(request.model)
        await self.room.refuse_without_room(self.chat_body(request, model), request.max_tokens)
        return replace(request, refuse_without_room=False)

    @asynccontextmanager
    async def stream(self, request: ChatRequest) -> AsyncIterator[OpenAIChunks]:
        if self.only_model and request.model and request.model != self.only_model:
            raise ModelNotFound(f"model {request.model!r} not found (this backend serves "
                                f"{self.only_model!r})", backend=self.name, model=request.model)
        if request.refuse_without_room:  # not checked by an interceptor
            request = await self.check_room(request)
        model = await self.model_for(request)
        http_request = self.client.build_request(
            "POST", f"{self.url}/v1/chat/completions", json=self.chat_body(request, model),
            headers={"Accept": "text/event-stream", **self.headers},
        )
        async with open_stream(
            self.client, http_request, self.budgets, backend=self.name, model=model
        ) as timed:
            yield OpenAIChunks(SSEReader(timed), self.name, model, on_output=request.on_output)

    async def list_models(self) -> list[ModelInfo]:
        deadline = trio.current_time() + self.budgets.first_chunk
        body = await request_json(self.client, "GET", f"{self.url}/v1/models", backend=self.name,
                                  deadline=deadline, headers=self.headers)
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise BackendProtocolError("/v1/models: no data list", backend=self.name)
        return [
            ModelInfo(id=m["id"], backend=self.name,
                      details={k: v for k, v in m.items() if k != "id"})
            for m in data
            if isinstance(m, dict) and isinstance(m.get("id"), str)
        ]

    async def health(self) -> BackendHealth:
        response, latency, error = await self._probe("/health")
        if response is not None and response.status_code == 404:
            # Not llama.cpp: an OpenAI-compatible server without /health. Ready if it lists models.
            response, latency, error = await self._probe("/v1/models")
        if response is None:
            return self._unreachable(latency, error or "unreachable")
        if response.status_code != 200:
            message = f"HTTP {response.status_code}"
            try:
                err = loads_json(response.content).get("error")
                message = (err.get("message") if isinstance(err, dict) else err) or message
            except (ValueError, AttributeError):
                pass
            return BackendHealth(self.name, self.url, reachable=True, ready=False,
                                 latency=latency, error=str(message))
        return BackendHealth(self.name, self.url, reachable=True, ready=True, latency=latency)
