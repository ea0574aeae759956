"""The end-to-end environment (not a test module): the real server on port 0, its backend built
by the lifespan from the settings (real adapters, interceptors recording into its store), the
simulator on loopback; and a reader of a run's SSE events.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from service.backends.stream_parsers import SSEEvent, SSEParser
from service.settings import BackendKind, Settings
from service.sim import Simulator, serve

from .servers import RunningServer, running_server

GUARD = 10  # seconds any single wait may take before the test fails
KINDS = ["llamacpp", "ollama"]
TERMINAL = {"succeeded", "failed", "cancelled", "timed_out"}


@dataclass(frozen=True)
class Event:
    id: int
    type: str
    data: dict[str, Any]


class EventStream:
    """Run events read from an SSE response, in as many ``read`` calls as the test wants."""

    def __init__(self, response: httpx.Response) -> None:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        self._chunks = response.aiter_bytes()
        self._parser = SSEParser()
        self._pending: list[Event] = []

    async def read(self, stop: Callable[[list[Event]], bool] | None = None) -> list[Event]:
        """Events until the end of the stream, or until ``stop(events read so far)`` is true."""
        events: list[Event] = []
        while True:
            while self._pending:
                events.append(self._pending.pop(0))
                if stop is not None and stop(events):
                    return events
            try:
                raw = await anext(self._chunks)
            except StopAsyncIteration:
                return events
            for item in self._parser.feed(raw):
                if isinstance(item, SSEEvent):  # not a keep-alive comment
                    assert item.id is not None
                    self._pending.append(Event(int(item.id), item.event, json.loads(item.data)))


async def read_events(
    response: httpx.Response, *, stop: Callable[[list[Event]], bool] | None = None
) -> list[Event]:
    return await EventStream(response).read(stop)


def tokens(events: list[Event]) -> list[str]:
    return [e.data["text"] for e in events if e.type == "token"]


def after_tokens(n: int) -> Callable[[list[Event]], bool]:
    return lambda events: len(tokens(events)) >= n


@dataclass
class Env:
    sim: Simulator
    server: RunningServer
    client: httpx.AsyncClient
    kind: str
    _sim_scope: trio.CancelScope
    _sim_stopped: trio.Event

    async def stop_sim(self) -> None:
        """Take the upstream down (listener and connections closed) while the server runs."""
        self._sim_scope.cancel()
        with trio.fail_after(GUARD):
            await self._sim_stopped.wait()

    async def conversation(self, **fields: Any) -> str:
        r = await self.client.post("/api/conversations", json=fields)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def post_stream(self, conv: str, content: str = "hi there", **body: Any) -> Any:
        return self.client.stream(
            "POST", f"/api/conversations/{conv}/messages",
            json={"content": content, "stream": True, **body},
        )

    async def run_events(self, run_id: str, **headers: str) -> list[Event]:
        """Every event of the run after ``Last-Event-ID`` (if given), until it has finished."""
        with trio.fail_after(GUARD):
            async with self.client.stream(
                "GET", f"/api/runs/{run_id}/events", headers=headers
            ) as r:
                return await read_events(r)

    async def finished_run(self, run_id: str) -> dict[str, Any]:
        """The run once it has ended (its event stream says so first)."""
        events = await self.run_events(run_id)
        assert events[-1].type == "run.finished"
        r = await self.client.get(f"/api/runs/{run_id}")
        assert r.status_code == 200
        run: dict[str, Any] = r.json()
        assert run["status"] in TERMINAL
        return run

    async def reply_of(self, conv: str, run_id: str) -> dict[str, Any]:
        r = await self.client.get(f"/api/conversations/{conv}")
        (reply,) = [m for m in r.json()["messages"]
                    if m["run_id"] == run_id and m["role"] == "assistant"]
        return reply  # type: ignore[no-any-return]

    async def the_reply(self) -> dict[str, Any]:
        """The only conversation's only reply, as stored once its run has ended (a client's
        session in a browser or a terminal made them; the test reads what it was told)."""
        (conv,) = (await self.client.get("/api/conversations")).json()["data"]
        messages = (await self.client.get(f"/api/conversations/{conv['id']}")).json()["messages"]
        (reply,) = [m for m in messages if m["role"] == "assistant"]
        with trio.fail_after(GUARD):
            await self.finished_run(reply["run_id"])
        return await self.reply_of(conv["id"], reply["run_id"])

    async def llm_calls(self, run_id: str) -> list[dict[str, Any]]:
        r = await self.client.get("/api/llm-calls", params={"run_id": run_id})
        assert r.status_code == 200, r.text
        return r.json()["data"]  # type: ignore[no-any-return]


# Only ever started with nursery.start (flake8's startable list is project config).
async def _serve_sim(  # noqa: ASYNC114
    sim: Simulator, stopped: trio.Event,
    *, task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``sim`` until the cancel scope it hands back is cancelled; then set ``stopped``."""
    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve, sim)
                task_status.started(scope)
    finally:
        stopped.set()


@asynccontextmanager
async def e2e(settings: Settings, kind: str, **update: Any) -> AsyncIterator[Env]:
    """The simulator, and the server with a ``kind`` backend on it (built by the lifespan)."""
    sim = Simulator(("sim-model",))
    stopped = trio.Event()
    async with trio.open_nursery() as nursery:
        scope: trio.CancelScope = await nursery.start(_serve_sim, sim, stopped)
        if kind == "auto":
            urls = {"ollama_url": sim.url, "llamacpp_url": sim.url}
        else:
            urls = {f"{kind}_url": sim.url}
        conf = settings.model_copy(update={"backend": BackendKind(kind), **urls, **update})
        try:
            async with running_server(conf, from_settings=True) as server, server.client() as c:
                yield Env(sim, server, c, kind, scope, stopped)
        finally:
            scope.cancel()
