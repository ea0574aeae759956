"""Ollama adapter: ``POST /api/chat`` streamed as NDJSON, ``GET /api/tags`` for models.

Wire shapes (ollama/ollama docs/api.md): each line is ``{"model", "created_at", "message":
{"role", "content", "tool_calls"?}, "done": false}``; the last has ``done: true``,
``done_reason`` and ``prompt_eval_count``/``eval_count`` with nanosecond durations
(``total_duration``, ``load_duration``, ``prompt_eval_duration``, ``eval_duration``). Tool-call
arguments arrive as a JSON object and carry no id (we make one). An error after the 200 status
arrives as a line ``{"error": "..."}``. Errors before it: 404 unknown model, 503 busy, 400/500.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypedDict

import trio

from ..errors import (
    BackendError,
    BackendProtocolError,
    BackendResponseError,
    ContextLengthExceeded,
)
from ..text import TextJoiner
from .base import (
    SAMPLING_OPTIONS,
    BackendHealth,
    ChatChunk,
    ChatMessage,
    ChatRequest,
    ModelInfo,
    ToolCall,
    Usage,
)
from .common import HTTPBackend, milliseconds, new_call_id, parse_arguments, token_count
from .http import NDJSONReader, loads_json, open_stream, request_json

if TYPE_CHECKING:
    import httpx

    from .http import Budgets

__all__ = ["OllamaBackend", "ollama_messages"]

_PS_MARGIN = 0.05  # seconds of the caller's bound kept for handing over what /api/tags gave
_NS_PER_MS = 1_000_000
_DURATIONS = {
    "total_duration": "total_ms",
    "load_duration": "load_ms",
    "prompt_eval_duration": "prompt_ms",
    "eval_duration": "predicted_ms",
}


class OllamaToolCall(TypedDict, total=False):
    function: dict[str, Any]


class OllamaMessage(TypedDict, total=False):
    role: str
    content: str
    tool_calls: list[OllamaToolCall]
    tool_name: str


def ollama_messages(messages: tuple[ChatMessage, ...]) -> list[OllamaMessage]:
    """Ollama's messages. A tool result is tied to its call by the tool's name (Ollama's calls
    have no ids): its own ``name``, or the name of the call its ``tool_call_id`` answers (an
    OpenAI client sends only that id)."""
    out: list[OllamaMessage] = []
    called: dict[str, str] = {}  # call id -> tool name
    for m in messages:
        msg: OllamaMessage = {"role": m.role, "content": m.content}
        if m.tool_calls:
            msg["tool_calls"] = [
                {"function": {"name": c.name, "arguments": c.arguments}} for c in m.tool_calls
            ]
            called.update((c.id, c.name) for c in m.tool_calls if c.id)
        if m.role == "tool":
            name = m.name or called.get(m.tool_call_id or "")
            if name:
                msg["tool_name"] = name
        out.append(msg)
    return out


def _timings(obj: dict[str, Any]) -> dict[str, float] | None:
    timings = {
        key: ms for field, key in _DURATIONS.items()
        if (ms := milliseconds(obj.get(field), per=_NS_PER_MS)) is not None
    }
    return timings or None


class OllamaChunks:
    """Async iterator of ChatChunk over an Ollama NDJSON body."""

    def __init__(self, reader: NDJSONReader, backend: str, model: str) -> None:
        self.reader = reader
        self.backend = backend
        self.model = model
        self.done = False
        self._saw_tool_calls = False
        self._text = TextJoiner()  # surrogate halves split across lines
        self._thinking = TextJoiner()

    def __repr__(self) -> str:
        return f"<OllamaChunks {self.backend} model={self.model} done={self.done}>"

    def __aiter__(self) -> OllamaChunks:
        return self

    async def __anext__(self) -> ChatChunk:
        # One deadline for this chunk: lines that carry nothing (empty content) are not
        # progress, so an upstream sending only those still hits its first-chunk / gap budget.
        deadline = self.reader.timed.next_deadline()
        while not self.done:
            obj = await self.reader.next(deadline)
            if obj is None:
                raise BackendProtocolError(
                    "stream ended before a done message", backend=self.backend
                )
            chunk = self._chunk(obj)
            if chunk is not None:
                return chunk
        await self.reader.drain()  # the end of the body, so the connection can be reused
        raise StopAsyncIteration

    def _chunk(self, obj: dict[str, Any]) -> ChatChunk | None:
        if "error" in obj:
            said = str(obj["error"])[:500]  # (as every upstream error is cut)
            if ContextLengthExceeded.said(said):  # the request's fault (400), as a status
                raise ContextLengthExceeded(said, backend=self.backend, param="messages")
            raise BackendResponseError(said, backend=self.backend, mid_stream=True)
        message = obj.get("message") or {}
        if not isinstance(message, dict):
            raise BackendProtocolError(f"message is not an object: {obj!r:.200}",
                                       backend=self.backend)
        text = message.get("content") or ""
        if not isinstance(text, str):
            raise BackendProtocolError("message.content is not a string", backend=self.backend)
        # A thinking model's reasoning (``think``; gpt-oss and others think by default): not
        # the answer, but progress: a model that thinks longer than the idle budget is working.
        thinking = message.get("thinking") or ""
        if not isinstance(thinking, str):
            raise BackendProtocolError("message.thinking is not a string", backend=self.backend)
        text, thinking = self._text.feed(text), self._thinking.feed(thinking)
        raw_calls = message.get("tool_calls") or ()
        if not isinstance(raw_calls, list | tuple):
            raise BackendProtocolError(f"message.tool_calls is not a list: {raw_calls!r:.200}",
                                       backend=self.backend)
        calls = tuple(self._tool_call(c) for c in raw_calls)
        self._saw_tool_calls = self._saw_tool_calls or bool(calls)
        model = obj.get("model") if isinstance(obj.get("model"), str) and obj["model"] else (
            self.model)
        if obj.get("done"):
            self.done = True
            text, thinking = text + self._text.flush(), thinking + self._thinking.flush()
            reason = obj.get("done_reason") if isinstance(obj.get("done_reason"), str) else None
            reason = reason or "stop"
            if reason == "stop" and self._saw_tool_calls:
                reason = "tool_calls"  # OpenAI's name for "stopped to call tools"
            usage = Usage(
                prompt_tokens=token_count(obj.get("prompt_eval_count")),
                completion_tokens=token_count(obj.get("eval_count")),
            )
            return ChatChunk(text=text, tool_calls=calls, thinking=thinking, done=True,
                             finish_reason=reason, usage=usage, timings=_timings(obj),
                             model=model, backend=self.backend)
        if not text and not calls and not thinking:
            return None
        return ChatChunk(text=text, tool_calls=calls, thinking=thinking, model=model,
                         backend=self.backend)

    def _tool_call(self, raw: Any) -> ToolCall:
        function = raw.get("function") if isinstance(raw, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BackendProtocolError(f"malformed tool call: {raw!r:.200}", backend=self.backend)
        name = function["name"]
        raw_args = function.get("arguments")
        invalid: str | None = None
        try:
            args = parse_arguments(raw_args, backend=self.backend, name=name)
        except BackendProtocolError:
            args = {}
            invalid = raw_args if isinstance(raw_args, str) else json.dumps(raw_args)
        return ToolCall(id=str(raw.get("id") or new_call_id()), name=name, arguments=args,
                        invalid_arguments=invalid)


class OllamaBackend(HTTPBackend):
    """An Ollama server. ``stream`` is Ollama's default for ``/api/chat``; we say it anyway."""

    kind = "ollama"

    def __init__(
        self,
        name: str,
        url: str,
        client: httpx.AsyncClient,
        budgets: Budgets | None = None,
        *,
        default_model: str | None = None,
        health_timeout: float = 2.0,
        num_ctx: int | None = None,
    ) -> None:
        super().__init__(name, url, client, budgets, default_model=default_model,
                         health_timeout=health_timeout)
        # The context window each request asks for (``SERVICE_OLLAMA_NUM_CTX``); the preload
        # asks the same, or the first request would load the model a second time.
        self.num_ctx = num_ctx

    def chat_body(self, request: ChatRequest, model: str) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.num_ctx is not None:
            options["num_ctx"] = self.num_ctx
        if request.temperature is not None:
            options["temperature"] = request.temperature
        if request.max_tokens is not None:
            options["num_predict"] = request.max_tokens
        if request.stop:
            options["stop"] = list(request.stop)
        extra = dict(request.options)
        options.update({k: extra[k] for k in SAMPLING_OPTIONS if k in extra})
        body: dict[str, Any] = {
            "model": model,
            "messages": ollama_messages(request.messages),
            "stream": True,
        }
        if options:
            body["options"] = options
        fmt = extra.get("response_format") or {}
        if fmt.get("type") == "json_object":
            body["format"] = "json"
        elif fmt.get("type") == "json_schema":
            body["format"] = (fmt.get("json_schema") or {}).get("schema") or "json"
        # Ollama has no tool_choice: "none" is no tools; a named tool is the only one offered
        # (no other can be called); "required" cannot be forced (docs/api.md).
        choice = extra.get("tool_choice")
        if request.tools and choice != "none":
            tools = list(request.tools)
            named = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
            if isinstance(named, str):
                tools = [t for t in tools if (t.get("function") or {}).get("name") == named]
            body["tools"] = tools
        return body

    @asynccontextmanager
    async def stream(self, request: ChatRequest) -> AsyncIterator[OllamaChunks]:
        model = await self.model_for(request)
        body = self.chat_body(request, model)
        http_request = self.client.build_request(
            "POST", f"{self.url}/api/chat", json=body, headers=self.headers,
        )
        # Offered tools, the model may write a call, which Ollama sends only once it is whole:
        # nothing comes meanwhile, for as long as the model takes to write it.
        budgets = self.budgets.withholding_tool_calls() if "tools" in body else self.budgets
        async with open_stream(
            self.client, http_request, budgets, backend=self.name, model=model
        ) as timed:
            yield OllamaChunks(NDJSONReader(timed), self.name, model)

    async def list_models(self) -> list[ModelInfo]:
        deadline = trio.current_time() + self.budgets.first_chunk
        body = await request_json(self.client, "GET", f"{self.url}/api/tags",
                                  backend=self.name, deadline=deadline, headers=self.headers)
        models = body.get("models") if isinstance(body, dict) else None
        if not isinstance(models, list):
            raise BackendProtocolError("/api/tags: no models list", backend=self.name)
        out = []
        for m in models:
            if isinstance(m, dict) and isinstance(m.get("name") or m.get("model"), str):
                details = {k: v for k, v in m.items() if k not in ("name", "model")}
                out.append(ModelInfo(id=m.get("name") or m["model"], backend=self.name,
                                     details=details, ollama=True))
        return out

    async def inventory(self) -> tuple[frozenset[str], frozenset[str] | None]:
        """``/api/tags`` (what it has) and ``/api/ps`` (what is in memory now). ``/api/ps``
        gets what is left of the caller's bound (less a margin), not a bound of its own past
        it: cut from outside, the models ``/api/tags`` gave were lost with it, and a server
        whose ``/api/ps`` was slow was marked unreachable at every refresh."""
        models = frozenset(m.id for m in await self.list_models())
        deadline = min(trio.current_time() + self.health_timeout,
                       trio.current_effective_deadline() - _PS_MARGIN)
        try:
            body = await request_json(self.client, "GET", f"{self.url}/api/ps", backend=self.name,
                                      deadline=deadline, headers=self.headers)
            listed = body.get("models") if isinstance(body, dict) else None
            loaded = frozenset(
                name for m in listed or () if isinstance(m, dict)
                and isinstance(name := m.get("name") or m.get("model"), str))
        except BackendError:
            return models, None
        return models, loaded

    async def health(self) -> BackendHealth:
        response, latency, error = await self._probe("/api/tags")
        if response is None:
            return self._unreachable(latency, error or "unreachable")
        if response.status_code != 200:
            return BackendHealth(self.name, self.url, reachable=True, ready=False,
                                 latency=latency, error=f"HTTP {response.status_code}")
        try:
            models = tuple(m.get("name") or m.get("model")
                           for m in loads_json(response.content)["models"])
        except (ValueError, KeyError, TypeError, AttributeError):
            return BackendHealth(self.name, self.url, reachable=True, ready=False,
                                 latency=latency, error="/api/tags: malformed body")
        return BackendHealth(self.name, self.url, reachable=True, ready=True,
                             latency=latency, models=models)

    async def preload(self, model: str) -> None:
        """Load ``model`` into memory: ``/api/chat`` with no messages (Ollama's documented way)."""
        deadline = trio.current_time() + self.budgets.call
        body: dict[str, Any] = {"model": model, "messages": [], "stream": False,
                                "keep_alive": "10m"}
        if self.num_ctx is not None:
            body["options"] = {"num_ctx": self.num_ctx}
        answer = await request_json(self.client, "POST", f"{self.url}/api/chat", backend=self.name,
                                    deadline=deadline, json_body=body, model=model,
                                    headers=self.headers)
        if isinstance(answer, dict) and "error" in answer:
            raise BackendResponseError(str(answer["error"])[:500], backend=self.name)

