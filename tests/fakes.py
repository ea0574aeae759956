"""In-memory fakes for virtual-time tests: a scripted backend and a supervisor environment.

The scripted backend speaks the Backend protocol with ``trio.sleep`` for pacing, so it works under
``autojump_clock``; every stream it opens is recorded (completed, or closed early).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from service.agents import Agent, make_runner
from service.backends.base import (
    Backend,
    BackendHealth,
    ChatChunk,
    ChatMessage,
    ChatRequest,
    ChatResult,
    ModelInfo,
    ToolCall,
    Usage,
)
from service.metrics import Metrics
from service.runs import RunEvent, RunHandle, RunSpec, RunSupervisor
from service.store import Message, SQLiteStore, Store
from service.tools import BUILTIN_TOOLS, Tool, ToolRegistry


@dataclass
class Reply:
    """One scripted answer: text split into ``chunks`` pieces, optional tool calls, pacing."""

    text: str = ""
    tool_calls: Sequence[ToolCall] = ()
    chunks: int | None = None  # None: one chunk per word
    first_delay: float = 0.0
    gap: float = 0.0
    hang_after: int | None = None  # hang forever after this many chunks
    fail_after: int | None = None  # raise ``error`` after this many chunks
    error: Exception | None = None
    thinking: Sequence[str] = ()  # a reasoning model's thinking: chunks before the text


def by_content(req: ChatRequest) -> Reply:
    """A reply picked by the last message: ``slow...`` (50 paced words), ``tools broken...`` (a
    tool call whose arguments are not JSON), ``tools...`` (a get_weather call), else an echo."""
    q = req.messages[-1].content
    if q.startswith("slow"):
        return Reply("tick " * 50, gap=0.05)
    if q.startswith("tools broken"):
        return Reply("", tool_calls=[ToolCall("call_1", "get_weather", {},
                                              invalid_arguments='{"city": Paris')])
    if q.startswith("tools"):
        return Reply("", tool_calls=[ToolCall("call_1", "get_weather", {"city": "Paris"})])
    return Reply(f"echo: {q}")


@dataclass
class StreamRecord:
    request: ChatRequest
    chunks_sent: int = 0
    completed: bool = False
    closed: bool = False
    cancelled: bool = False
    closed_event: trio.Event = field(default_factory=trio.Event)


def _split(text: str, n: int | None) -> list[str]:
    if not text:
        return []
    if n is None:
        words = text.split(" ")
        return [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)]
    size = max(1, -(-len(text) // n))
    return [text[i:i + size] for i in range(0, len(text), size)]


class _Chunks:
    def __init__(self, reply: Reply, record: StreamRecord) -> None:
        self._reply = reply
        self._record = record
        self._thinking = list(reply.thinking)
        self._pieces = _split(reply.text, reply.chunks)
        self._i = 0
        self._done = False

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> ChatChunk:
        r, i = self._reply, self._i
        if self._done:
            raise StopAsyncIteration
        try:
            await trio.sleep(r.first_delay if i == 0 else r.gap)
            if r.hang_after is not None and i >= r.hang_after:
                await trio.sleep_forever()
            if r.fail_after is not None and i >= r.fail_after:
                assert r.error is not None
                raise r.error
        except trio.Cancelled:
            self._record.cancelled = True
            raise
        self._i += 1
        self._record.chunks_sent = self._i
        if self._thinking:
            return ChatChunk(thinking=self._thinking.pop(0))
        if (i := i - len(self._reply.thinking)) < len(self._pieces):
            return ChatChunk(text=self._pieces[i])
        self._done = True
        self._record.completed = True
        return ChatChunk(
            tool_calls=tuple(r.tool_calls), done=True,
            finish_reason="tool_calls" if r.tool_calls else "stop",
            usage=Usage(prompt_tokens=10, completion_tokens=len(self._pieces)),
        )


Responder = Callable[[ChatRequest], Reply]


class ScriptedBackend:
    """Answers from a script: a list consumed in order, or a function of the request."""

    name = "fake"
    url = "mem://fake"

    def __init__(self, script: Sequence[Reply] | Responder = ()) -> None:
        self._script: list[Reply] = [] if callable(script) else list(script)
        self._responder: Responder | None = script if callable(script) else None
        self.streams: list[StreamRecord] = []
        self._opened = trio.Event()

    def _next(self, request: ChatRequest) -> Reply:
        if self._responder is not None:
            return self._responder(request)
        if not self._script:
            return Reply("(script exhausted)")
        return self._script.pop(0)

    async def wait_stream(self, index: int = 0) -> StreamRecord:
        """The index-th stream opened, once it is (trio-time polling; tests only)."""
        while len(self.streams) <= index:
            await self._opened.wait()
            self._opened = trio.Event()
        return self.streams[index]

    @property
    def open_streams(self) -> int:
        return sum(1 for s in self.streams if not s.closed)

    @asynccontextmanager
    async def stream(self, request: ChatRequest) -> AsyncIterator[_Chunks]:
        record = StreamRecord(request)
        self.streams.append(record)
        self._opened.set()
        try:
            await trio.lowlevel.checkpoint()
            yield _Chunks(self._next(request), record)
        finally:
            record.closed = True
            record.closed_event.set()

    async def chat(self, request: ChatRequest) -> ChatResult:
        parts: list[str] = []
        calls: list[ToolCall] = []
        async with self.stream(request) as chunks:
            async for c in chunks:
                parts.append(c.text)
                calls.extend(c.tool_calls)
        return ChatResult(ChatMessage("assistant", "".join(parts), tuple(calls)), "fake", "fake")

    async def list_models(self) -> list[ModelInfo]:
        await trio.lowlevel.checkpoint()
        return [ModelInfo("fake-model", "fake")]

    async def health(self) -> BackendHealth:
        await trio.lowlevel.checkpoint()
        return BackendHealth("fake", self.url, reachable=True, ready=True, latency=0.0)

    async def preload(self, model: str) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


@dataclass
class Env:
    store: Store
    supervisor: RunSupervisor
    backend: ScriptedBackend
    tools: ToolRegistry
    nursery: trio.Nursery
    metrics: Metrics
    extra: dict[str, Any] = field(default_factory=dict)

    async def conversation(self, **kwargs: Any) -> str:
        return (await self.store.create_conversation(**kwargs)).id

    async def run_to_end(self, content: str, agent: str) -> tuple[RunHandle, list[RunEvent],
                                                                  list[Message]]:
        """Ask ``content`` of ``agent`` on a new conversation; once the run has ended: its
        handle, its stored events and the conversation's stored messages."""
        conv = await self.conversation()
        handle = await self.supervisor.start(RunSpec(conv, content, agent=agent))
        await handle.finished.wait()
        return (handle, await self.store.list_run_events(handle.id),
                await self.store.get_messages(conv))

    async def run_of_a_dead_process(self, conversation_id: str) -> str:
        """A run stored as running by a process that is gone (a killed worker): its id."""
        dead = SQLiteStore(self.store.path, threaded=False, process_id="999999999:1")
        await dead.open()
        try:
            begun = await dead.begin_run(conversation_id, content="q", agent="chat", model=None)
        finally:
            await dead.aclose()
        return begun.run.id


async def _inline(fn: Callable[[], Any]) -> Any:
    await trio.lowlevel.checkpoint()
    return fn()


@asynccontextmanager
async def supervisor_env(
    tmp_path: Path,
    backend: ScriptedBackend | Callable[[Store], Backend],
    *,
    tools: Sequence[Tool] = BUILTIN_TOOLS,
    run_timeout: float = 300.0,
    tool_timeout: float = 30.0,
    max_runs: int = 1000,
    agents: dict[str, Agent] | None = None,
    events_retention: float = 0.0,
    process_id: str | None = None,
) -> AsyncIterator[Env]:
    """A store (inline sqlite, for virtual time) and a serving supervisor over ``backend``.

    ``backend`` may be a function of the store, to build an interceptor that records into it.
    """
    metrics = Metrics()
    store = SQLiteStore(tmp_path / "runs.db", threaded=False, metrics=metrics,
                        process_id=process_id)
    await store.open()
    registry = ToolRegistry(tools)
    the_backend = backend if isinstance(backend, ScriptedBackend) else backend(store)
    runner = make_runner(
        backend=lambda: the_backend, tools=registry, metrics=metrics,
        tool_timeout=tool_timeout, history_chars=24_000, agents=agents, run_sync=_inline,
        abandon_in=lambda: supervisor.nursery,
    )
    supervisor = RunSupervisor(
        store, runner, metrics=metrics, max_runs=max_runs, run_timeout=run_timeout,
        events_retention=events_retention,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            yield Env(store, supervisor, the_backend, registry, nursery, metrics)  # type: ignore[arg-type]
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()
