"""The backend interface every LLM adapter implements, and its wire-neutral data types.

A backend turns a :class:`ChatRequest` into a stream of :class:`ChatChunk`. ``stream`` is an async
context manager: the upstream HTTP response lives exactly as long as the ``async with`` block, so
leaving the block early (break, error, cancellation) closes the upstream connection.

    async with backend.stream(request) as chunks:
        async for chunk in chunks:
            ...

Adapters map every lower-layer failure to a :mod:`service.errors` type at their boundary.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..errors import scrub_upstream_secrets

__all__ = [
    "Backend",
    "BackendHealth",
    "ChatChunk",
    "ChatMessage",
    "ChatRequest",
    "ChatResult",
    "ModelInfo",
    "ToolCall",
    "Usage",
    "collect_chat",
]


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]
    # The model's arguments when they are not a JSON object ({} in ``arguments``): an error
    # observation for our tools (the model can correct itself), passed as-is to a client's.
    invalid_arguments: str | None = None


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant" | "tool"
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None  # for role == "tool"
    name: str | None = None  # tool name, for role == "tool"


# OpenAI sampling options passed through to a backend (Ollama takes them under ``options``).
SAMPLING_OPTIONS = ("top_p", "seed", "presence_penalty", "frequency_penalty")


@dataclass(frozen=True, slots=True)
class ChatRequest:
    messages: tuple[ChatMessage, ...]
    model: str | None = None  # None: the backend's default model
    tools: tuple[dict[str, Any], ...] = ()  # OpenAI-style {"type": "function", "function": {...}}
    max_tokens: int | None = None
    temperature: float | None = None
    stop: tuple[str, ...] = ()
    run_id: str | None = None  # recorded by the interceptor
    # A fleet keeps a conversation's calls on one server (its prompt cache); never sent upstream.
    conversation_id: str | None = None
    # A client's other OpenAI options, by their OpenAI names (SAMPLING_OPTIONS, response_format,
    # tool_choice); each adapter says them in its protocol.
    options: tuple[tuple[str, Any], ...] = ()
    # Told the call's place in its backend's queue (1: next) while it waits for a slot of the
    # interceptor's limiter: the run shows it (a ``queued`` event). Never sent upstream.
    on_queued: Callable[[int], None] | None = field(default=None, compare=False, repr=False)
    # The run's deadline (trio's clock): a call cut when it has passed is recorded timed_out,
    # not cancelled. Never sent upstream.
    deadline: float | None = field(default=None, compare=False, repr=False)
    # Told the model the backend chose when none was named (its default, or the first its
    # server lists), before the upstream request: the call's record names it even when the
    # call ends before its first chunk. Never sent upstream.
    on_model: Callable[[str], None] | None = field(default=None, compare=False, repr=False)
    # The caller can shorten the prompt (a stored conversation's older turns): an adapter that
    # can tell refuses a prompt that leaves the answer no room in the model's context
    # (ContextLengthExceeded, before it is sent; llama.cpp's, see ``room``), as the server
    # refuses one that does not fit at all. Never sent upstream.
    refuse_without_room: bool = field(default=False, compare=False, repr=False)
    # Told once when the answer's first output arrives that the adapter holds back until it
    # is whole (a streamed tool call's first piece, passed on with the last chunk): the call's
    # time to its first token is then, not at the call's end. Never sent upstream.
    on_output: Callable[[], None] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    estimated: bool = False  # True when counted by us because the stream was cut

    @property
    def total_tokens(self) -> int | None:
        if self.prompt_tokens is None and self.completion_tokens is None:
            return None
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)


@dataclass(frozen=True, slots=True)
class ChatChunk:
    """One piece of a streamed answer. The last chunk has ``done=True``."""

    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()  # complete calls (deltas are joined by the adapter)
    thinking: str = ""  # a reasoning model's thinking (not part of the answer; is progress)
    done: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "tool_calls" | ...
    usage: Usage | None = None  # on the final chunk
    timings: dict[str, float] | None = None  # backend-reported timings, milliseconds
    model: str | None = None
    backend: str | None = None  # name of the backend that produced it (tells which one served)


@dataclass(frozen=True, slots=True)
class ChatResult:
    message: ChatMessage
    model: str
    backend: str
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    timings: dict[str, float] | None = None


@dataclass(frozen=True, slots=True)
class ModelInfo:
    id: str
    backend: str
    details: dict[str, Any] = field(default_factory=dict)
    ollama: bool = False  # listed by an Ollama server: a name without a tag is its ``:latest``


def ollama_latest(model: str) -> str | None:
    """The name Ollama runs for ``model`` when it has no tag (``llama3.2`` ->
    ``llama3.2:latest``), else None. The tag follows a ``:`` in the last path part: a
    registry's port (``localhost:5000/library/m``) is not one."""
    return None if ":" in model.rsplit("/", 1)[-1] else f"{model}:latest"


@dataclass(frozen=True, slots=True)
class BackendHealth:
    name: str
    url: str
    reachable: bool  # answered at all
    ready: bool  # can serve now (e.g. llama.cpp's /health is 200, not 503 "Loading model")
    latency: float | None = None  # seconds for the probe
    error: str | None = None
    models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # The upstream's own error text may echo the credential it was sent (a gateway's 401
        # with the Authorization header): shown in /api/backends and /readyz, never that.
        if self.error:
            object.__setattr__(self, "error", scrub_upstream_secrets(self.error))


@runtime_checkable
class Backend(Protocol):
    """What the agents and the API need from an LLM server."""

    name: str
    url: str

    def stream(self, request: ChatRequest) -> AbstractAsyncContextManager[AsyncIterator[ChatChunk]]:
        """Open a streamed chat; the upstream response lives as long as the context."""
        ...

    async def chat(self, request: ChatRequest) -> ChatResult:
        """A whole (streamed underneath) chat, joined into one result."""
        ...

    async def list_models(self) -> list[ModelInfo]: ...

    async def health(self) -> BackendHealth: ...

    async def preload(self, model: str) -> None: ...

    async def aclose(self) -> None: ...


async def collect_chat(backend: Backend, request: ChatRequest) -> ChatResult:
    """Run ``backend.stream(request)`` to its end and join the chunks into one result."""
    text: list[str] = []
    tool_calls: list[ToolCall] = []
    last: ChatChunk | None = None
    model = request.model
    served_by = backend.name
    async with backend.stream(request) as chunks:
        async for chunk in chunks:
            text.append(chunk.text)
            tool_calls.extend(chunk.tool_calls)
            model = chunk.model or model
            served_by = chunk.backend or served_by
            last = chunk
    return ChatResult(
        message=ChatMessage("assistant", "".join(text), tuple(tool_calls)),
        model=model or "",
        backend=served_by,
        finish_reason=last.finish_reason if last else None,
        usage=(last.usage if last and last.usage else Usage()),
        timings=last.timings if last else None,
    )
