"""The simulator's state: models, scripted replies, health, and a record of every stream.

Routing is plain code; ``server.py`` (real sockets) and ``mock.py`` (in-memory httpx transport)
call :meth:`Simulator.route` and execute the steps it returns, updating the :class:`StreamRecord`.

Choosing a reply for a chat request, first match wins:
1. an ``X-Sim-Scenario`` header holding a JSON :class:`Reply`;
2. the script: replies queued with :meth:`Simulator.script`, consumed in order;
3. ``replies_by_model[model]``;
4. ``default``.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import trio

from .scenario import (
    Reply,
    Send,
    SimResponse,
    context_error,
    error_response,
    json_response,
    render_ollama,
    render_openai,
)

__all__ = ["Simulator", "StreamRecord"]


@dataclass(eq=False)
class StreamRecord:
    """What happened to one chat request. Times are ``trio.current_time()``."""

    seq: int
    protocol: str  # "ollama" | "openai"
    path: str
    model: str | None
    body: dict[str, Any]
    reply: Reply | None
    status: int
    started_at: float
    chunks_sent: int = 0
    first_chunk_at: float | None = None
    finished_at: float | None = None
    completed: bool = False  # the whole response was sent
    died: bool = False  # the scenario closed the connection on purpose
    client_gone: bool = False  # the client went away before the end (EOF or failed send)
    client_gone_at: float | None = None
    closed: trio.Event = field(default_factory=trio.Event)  # set when the server is done with it
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # the request's

    def __repr__(self) -> str:
        return (
            f"<StreamRecord #{self.seq} {self.protocol} {self.model} status={self.status} "
            f"chunks={self.chunks_sent} completed={self.completed} died={self.died} "
            f"client_gone={self.client_gone}>"
        )

    def mark_client_gone(self) -> None:
        if not self.client_gone and not self.completed:
            self.client_gone = True
            self.client_gone_at = trio.current_time()

    def finish(self) -> None:
        if self.finished_at is None:
            self.finished_at = trio.current_time()
        self.closed.set()


class Simulator:
    """A fake LLM server speaking Ollama's and the OpenAI-compatible (llama.cpp) protocols."""

    def __init__(
        self,
        models: tuple[str, ...] = ("sim-model",),
        *,
        default: Reply | None = None,
        strict_models: bool = True,
    ) -> None:
        self.models = list(models)
        self.loaded: list[str] | None = None  # Ollama's /api/ps; None: every model
        self.default = default or Reply()
        self.replies_by_model: dict[str, Reply] = {}
        self.strict_models = strict_models
        self.streams: list[StreamRecord] = []
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self.preloads: list[str] = []
        self.loading_probes = 0  # /health answers 503 "Loading model" this many more times
        self.url = ""
        self.port = 0
        self._script: deque[Reply] = deque()
        self._changed = trio.Event()

    def __repr__(self) -> str:
        return (
            f"<Simulator {self.url or 'unbound'} models={self.models} streams={len(self.streams)}"
            f" scripted={len(self._script)} loading_probes={self.loading_probes}>"
        )

    # -- scripting -------------------------------------------------------------------------

    def script(self, *replies: Reply | str) -> None:
        """Queue replies (a str is a plain text reply) for the next chat requests, in order."""
        self._script.extend(Reply(text=r) if isinstance(r, str) else r for r in replies)

    @property
    def scripted(self) -> int:
        return len(self._script)

    def set_loading(self, probes: int) -> None:
        """Pretend the model loads: /health and chat answer 503 for the next ``probes`` probes."""
        self.loading_probes = probes

    async def wait_streams(self, count: int) -> list[StreamRecord]:
        """Wait until at least ``count`` chat requests have been received."""
        while len(self.streams) < count:
            await self._changed.wait()
        return self.streams

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _choose(self, headers: dict[str, str], model: str | None) -> Reply:
        if "x-sim-scenario" in headers:
            return Reply.from_json(headers["x-sim-scenario"])
        if self._script:
            return self._script.popleft()
        if model in self.replies_by_model:
            return self.replies_by_model[model]
        return self.default

    # -- routing ---------------------------------------------------------------------------

    def route(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[SimResponse, StreamRecord | None]:
        """The response to one request (and its stream record, for chat requests)."""
        path = path.split("?", 1)[0]
        self.requests.append((method, path))
        if method == "GET":
            return self._get(path), None
        if method != "POST" or path not in ("/api/chat", "/v1/chat/completions"):
            return json_response(404, {"error": f"no route for {method} {path}"}), None
        openai = path == "/v1/chat/completions"
        try:
            payload = json.loads(body or b"{}")
            if not isinstance(payload, dict):
                raise ValueError("not an object")
        except ValueError:
            return error_response(400, "invalid JSON body", openai=openai), None
        model = payload.get("model")
        record = StreamRecord(
            seq=len(self.streams), protocol="openai" if openai else "ollama", path=path,
            model=model, body=payload, reply=None, status=200, started_at=trio.current_time(),
            headers=dict(headers),
        )
        response = self._chat(openai, payload, model, headers, record)
        record.status = response.status
        self.streams.append(record)
        self._notify()
        return response, record

    def _chat(self, openai: bool, payload: dict[str, Any], model: str | None,
              headers: dict[str, str], record: StreamRecord) -> SimResponse:
        if openai and self.loading_probes > 0:
            return error_response(503, "Loading model", openai=True)
        if not model and not openai:
            return error_response(400, "model is required", openai=False)
        # Ollama reads a name without a tag (no ``:`` in its last path part) as its
        # ``:latest`` (``llama3.2`` is ``llama3.2:latest``); llama.cpp's server matches
        # names as given.
        if self.strict_models and model not in self.models and (
                openai or ":" in str(model).rsplit("/", 1)[-1]
                or f"{model}:latest" not in self.models):
            message = (f"model '{model}' not found" if openai
                       else f'model "{model}" not found, try pulling it first')
            return error_response(404, message, openai=openai)
        if not openai and payload.get("messages") == []:
            self.preloads.append(str(model))  # Ollama's documented "load a model" request
            return render_ollama(Reply(text="", finish_reason="load"), payload)
        reply = self._choose(headers, model)
        record.reply = reply
        if reply.status is not None:
            response = error_response(reply.status, reply.error, openai=openai)
            if reply.retry_after is not None:
                response.headers = (("retry-after", reply.retry_after),)
            return response
        if (too_long := context_error(reply, payload, openai=openai)) is not None:
            return too_long
        if openai:
            return render_openai(reply, payload, seq=record.seq)
        return render_ollama(reply, payload)

    def _get(self, path: str) -> SimResponse:
        if path == "/":
            return SimResponse(200, "text/plain; charset=utf-8", body=[Send(b"Ollama is running")],
                               streaming=False)
        if path == "/api/version":
            return json_response(200, {"version": "0.0.0-sim"})
        if path == "/api/tags":
            return json_response(200, {"models": [
                {"name": m, "model": m, "modified_at": "2024-01-01T00:00:00Z", "size": 1000,
                 "digest": f"sha256:{i:064x}",
                 "details": {"format": "gguf", "family": "llama", "families": ["llama"],
                             "parameter_size": "1M", "quantization_level": "F32"}}
                for i, m in enumerate(self.models)]})
        if path == "/api/ps":
            loaded = self.models if self.loaded is None else self.loaded
            return json_response(200, {"models": [
                {"name": m, "model": m, "size": 1000, "digest": f"sha256:{i:064x}",
                 "expires_at": "2099-01-01T00:00:00Z", "size_vram": 1000}
                for i, m in enumerate(loaded)]})
        if path in ("/v1/models", "/models"):
            return json_response(200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 1700000000, "owned_by": "llamacpp",
                 "meta": None} for m in self.models]})
        if path in ("/health", "/v1/health"):
            if self.loading_probes > 0:
                self.loading_probes -= 1
                return error_response(503, "Loading model", openai=True)
            return json_response(200, {"status": "ok"})
        return json_response(404, {"error": f"no route for GET {path}"})
