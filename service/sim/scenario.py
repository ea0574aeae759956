"""What the simulator says, as plain data: a :class:`Reply` is turned into a list of steps.

Pure code (no trio, no sockets): ``render_ollama`` and ``render_openai`` give the bytes of each
protocol, step by step, and the I/O layers (``server.py`` over h11, ``mock.py`` for
``httpx.MockTransport``) only execute the steps. Shapes follow ollama's docs/api.md and
llama.cpp's tools/server/README.md.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "Die",
    "Hang",
    "Reply",
    "Send",
    "SimResponse",
    "Sleep",
    "Step",
    "context_error",
    "error_response",
    "json_response",
    "render_ollama",
    "render_openai",
]


@dataclass(frozen=True, slots=True)
class Reply:
    """One simulated answer and how it misbehaves. Token counts are content chunks.

    ``hang_after``/``die_after``: after N chunks hang forever / close the connection; ``-1`` means
    before the response headers, ``0`` after the headers and before the first chunk.
    """

    text: str | None = None  # the answer; None: ``tokens`` generated words "tok0 tok1 ..."
    tokens: int = 8
    # {"name": str, "arguments": dict}; "raw_arguments": str sends that text as is (malformed)
    tool_calls: tuple[dict[str, Any], ...] = ()
    finish_reason: str | None = None  # default "stop", or "tool_calls" when there are calls
    headers_delay: float = 0.0  # before the status line (Ollama loading a model)
    first_delay: float = 0.0  # after the headers, before the first chunk
    interval: float = 0.0  # between chunks
    # Ollama: before its tool calls' chunk, silent (it sends a call only once the model has
    # written all of it); OpenAI: before a call's first delta.
    tool_delay: float = 0.0
    keepalive: float | None = None  # SSE: ": keep-alive" every N s while waiting (and hanging)
    hang_after: int | None = None
    die_after: int | None = None
    malformed_after: int | None = None  # send an unparsable chunk after N chunks, then stop
    error_after: int | None = None  # error object in the stream after N chunks (after 200)
    status: int | None = None  # answer with this error status and the protocol's error body
    error: str = "simulated failure"
    retry_after: str | None = None  # a Retry-After header on the error status (429, 503)
    # The model's context, in the simulator's tokens (``prompt_tokens``): a longer prompt gets
    # the server's "exceeds the context" error (llama.cpp: 400 exceed_context_size_error).
    context: int | None = None
    usage: bool = True  # OpenAI: send the usage chunk when include_usage asks for it
    model: str | None = None  # answer with this model name instead of the request's

    @classmethod
    def from_json(cls, text: str) -> Reply:
        """From the ``X-Sim-Scenario`` header: a JSON object of these fields."""
        data = json.loads(text)
        if "tool_calls" in data:
            data["tool_calls"] = tuple(data["tool_calls"])
        return cls(**data)

    def pieces(self) -> list[str]:
        if self.text is None:
            return [f"tok{i} " for i in range(self.tokens)]
        return re.findall(r"\S+\s*|\s+", self.text)


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes
    chunk: bool = True  # counts as a chunk in the stream record (keep-alives do not)


@dataclass(frozen=True, slots=True)
class Hang:
    """Send nothing more, ever (but keep-alive comments every ``keepalive`` seconds)."""

    keepalive: float | None = None
    comment: bytes = b""


@dataclass(frozen=True, slots=True)
class Die:
    """Close the connection now, mid-response."""


Step = Sleep | Send | Hang | Die


@dataclass(slots=True)
class SimResponse:
    status: int
    content_type: str
    head: list[Step] = field(default_factory=list)  # before the status line: Sleep, Hang, Die
    body: list[Step] = field(default_factory=list)
    streaming: bool = True  # chunked; else one body with a Content-Length
    headers: tuple[tuple[str, str], ...] = ()  # extra response headers (Retry-After)


def json_response(status: int, obj: Any) -> SimResponse:
    return SimResponse(status, "application/json", body=[Send(json.dumps(obj).encode())],
                       streaming=False)


def error_response(status: int, message: str, *, openai: bool) -> SimResponse:
    """The protocol's error body: Ollama ``{"error": str}``, OpenAI/llama.cpp ``{"error": {}}``."""
    if not openai:
        return json_response(status, {"error": message})
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            503: "unavailable_error"}.get(status, "server_error")
    return json_response(status, {"error": {"code": status, "message": message, "type": kind}})


def context_error(reply: Reply, body: dict[str, Any], *, openai: bool) -> SimResponse | None:
    """The server's answer to a prompt longer than ``reply.context``, else None.

    llama.cpp's server: 400 ``{"error": {"code": 400, "message": "request (N tokens) exceeds
    the available context size (M tokens), try increasing it", "type":
    "exceed_context_size_error", "n_prompt_tokens": N, "n_ctx": M}}``. Ollama (when it does
    not truncate): 400 ``{"error": "the input length exceeds the context length"}``.
    """
    n_prompt = prompt_tokens(body)
    if reply.context is None or n_prompt <= reply.context:
        return None
    if not openai:
        return json_response(400, {"error": "the input length exceeds the context length"})
    return json_response(400, {"error": {
        "code": 400, "type": "exceed_context_size_error",
        "message": f"request ({n_prompt} tokens) exceeds the available context size "
                   f"({reply.context} tokens), try increasing it",
        "n_prompt_tokens": n_prompt, "n_ctx": reply.context}})


def _wait(seconds: float, keepalive: float | None, comment: bytes) -> list[Step]:
    if seconds <= 0:
        return []
    if not keepalive or not comment:
        return [Sleep(seconds)]
    steps: list[Step] = []
    while seconds > keepalive:
        steps += [Sleep(keepalive), Send(comment, chunk=False)]
        seconds -= keepalive
    return [*steps, Sleep(seconds)]


def _now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def prompt_tokens(body: dict[str, Any]) -> int:
    """A deterministic stand-in for a tokenizer: words of every message, plus one per message."""
    messages = body.get("messages") or []
    return sum(len(str(m.get("content") or "").split()) + 1 for m in messages
               if isinstance(m, dict))


def _stream(reply: Reply, chunks: list[bytes], tail: list[bytes], *, comment: bytes,
            error: bytes, malformed: bytes, calls_at: int | None = None) -> list[Step]:
    """Interleave content chunks with the reply's timing and failures; ``tail`` ends it. The
    chunk ``calls_at`` (the first of the tool calls) waits ``tool_delay`` more."""
    steps: list[Step] = []
    for sent in range(len(chunks) + 1):
        if reply.hang_after == sent:
            return [*steps, Hang(reply.keepalive, comment)]
        if reply.die_after == sent:
            return [*steps, Die()]
        if reply.malformed_after == sent:
            return [*steps, Send(malformed)]
        if reply.error_after == sent:
            return [*steps, Send(error)]
        if sent == len(chunks):
            break
        delay = reply.first_delay if sent == 0 else reply.interval
        if sent == calls_at:
            delay += reply.tool_delay
        steps += _wait(delay, reply.keepalive, comment)
        steps.append(Send(chunks[sent]))
    return steps + [Send(t) for t in tail]


def _head(reply: Reply) -> list[Step]:
    if reply.hang_after == -1:
        return [Hang()]
    if reply.die_after == -1:
        return [Die()]
    return [Sleep(reply.headers_delay)] if reply.headers_delay > 0 else []


def render_ollama(reply: Reply, body: dict[str, Any]) -> SimResponse:
    """``POST /api/chat``: NDJSON lines, or one object when ``stream`` is false."""
    model = reply.model or str(body.get("model"))
    pieces = reply.pieces()

    def line(obj: dict[str, Any]) -> bytes:
        return json.dumps({"model": model, "created_at": _now_iso(), **obj}).encode() + b"\n"

    calls = [{"function": {"name": c["name"],
                           "arguments": c.get("raw_arguments", c.get("arguments", {}))}}
             for c in reply.tool_calls]
    n_prompt = prompt_tokens(body)
    final = {
        "done": True,
        "done_reason": reply.finish_reason or "stop",
        "total_duration": 1_500_000 * (len(pieces) + 2),
        "load_duration": 1_000_000,
        "prompt_eval_count": n_prompt,
        "prompt_eval_duration": 500_000 * n_prompt,
        "eval_count": len(pieces) + len(calls),
        "eval_duration": 1_000_000 * (len(pieces) + len(calls)),
    }
    if body.get("stream") is False:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(pieces)}
        if calls:
            message["tool_calls"] = calls
        return json_response(200, {"model": model, "created_at": _now_iso(),
                                   "message": message, **final})
    chunks = [line({"message": {"role": "assistant", "content": p}, "done": False})
              for p in pieces]
    if calls:
        chunks.append(line({"message": {"role": "assistant", "content": "", "tool_calls": calls},
                            "done": False}))
    tail = [line({"message": {"role": "assistant", "content": ""}, **final})]
    steps = _stream(reply, chunks, tail, comment=b"", error=json.dumps(
        {"error": reply.error}).encode() + b"\n", malformed=b'{"model": "' + model.encode()
        + b'", "message": {"content": \n', calls_at=len(pieces) if calls else None)
    return SimResponse(200, "application/x-ndjson", head=_head(reply), body=steps)


def _call_deltas(calls: tuple[dict[str, Any], ...]) -> Iterator[dict[str, Any]]:
    """Tool calls as OpenAI streams them: id and name first, then argument fragments."""
    for index, call in enumerate(calls):
        yield {"index": index, "id": f"call_sim_{index}", "type": "function",
               "function": {"name": call["name"], "arguments": ""}}
        args = call.get("raw_arguments", json.dumps(call.get("arguments", {})))
        third = max(1, len(args) // 3)
        for start in range(0, len(args), third):
            yield {"index": index, "function": {"arguments": args[start:start + third]}}


def render_openai(reply: Reply, body: dict[str, Any], *, seq: int = 0) -> SimResponse:
    """``POST /v1/chat/completions`` as llama.cpp answers it: SSE chunks, or one completion."""
    model = reply.model or str(body.get("model"))
    pieces = reply.pieces()
    created = int(time.time())
    ident = f"chatcmpl-sim{seq}"
    finish = reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop")
    n_prompt = prompt_tokens(body)
    usage = {"completion_tokens": len(pieces) + len(reply.tool_calls), "prompt_tokens": n_prompt,
             "total_tokens": n_prompt + len(pieces) + len(reply.tool_calls)}
    timings = {"cache_n": 0, "prompt_n": n_prompt, "prompt_ms": 0.5 * n_prompt,
               "prompt_per_token_ms": 0.5, "prompt_per_second": 2000.0,
               "predicted_n": len(pieces), "predicted_ms": 1.0 * len(pieces),
               "predicted_per_token_ms": 1.0, "predicted_per_second": 1000.0}
    if body.get("stream") is not True:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(pieces)}
        if reply.tool_calls:
            message["tool_calls"] = [
                {"id": f"call_sim_{i}", "type": "function",
                 "function": {"name": c["name"], "arguments": json.dumps(c.get("arguments", {}))}}
                for i, c in enumerate(reply.tool_calls)]
        return json_response(200, {
            "id": ident, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": usage, "timings": timings})

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        obj = {"id": ident, "object": "chat.completion.chunk", "created": created,
               "model": model, "system_fingerprint": "sim", "choices": choices, **extra}
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    def delta(d: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": d, "logprobs": None, "finish_reason": reason}

    chunks = [event([delta({"content": p})]) for p in pieces]
    if chunks:  # llama.cpp opens with a role-only delta, sent with the first token
        chunks[0] = event([delta({"role": "assistant", "content": None})]) + chunks[0]
    chunks += [event([delta({"tool_calls": [d]})]) for d in _call_deltas(reply.tool_calls)]
    tail = [event([delta({}, finish)])]
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    if include_usage and reply.usage:
        tail.append(event([], usage=usage, timings=timings))
    tail.append(b"data: [DONE]\n\n")
    error = b"data: " + json.dumps(
        {"error": {"code": 500, "message": reply.error, "type": "server_error"}}).encode() + b"\n\n"
    steps = _stream(reply, chunks, tail, comment=b": keep-alive\n\n", error=error,
                    malformed=b'data: {"choices": [{"delta": {"content": \n\n',
                    calls_at=len(pieces) if reply.tool_calls else None)
    return SimResponse(200, "text/event-stream", head=_head(reply), body=steps)
