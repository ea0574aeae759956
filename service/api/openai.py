"""The OpenAI-compatible surface: ``POST /v1/chat/completions`` and ``GET /v1/models``.

Every completion is a run (agent ``chat`` unless the ``agent`` extension field names another) on
a new conversation, so it is recorded, cancellable and stored like any other; the request's own
messages are the history the agent sees. A client that disconnects cancels the run, and with it
the upstream generation.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import trio
from quart import Blueprint, Response, jsonify, request
from quart_schema import document_response, validate_request

from ..backends.base import ChatMessage, ToolCall, ollama_latest
from ..errors import (
    BackendAuthFailed,
    BackendUnavailable,
    RunCancelled,
    RunTimeout,
    ServiceError,
)
from ..runs import RunEvent, RunHandle, RunSpec, RunStatus
from ..runs.reader import EventReader, Keepalive
from .errors import json_error
from .models import (
    ChatCompletionOut,
    ErrorBody,
    OpenAIModel,
    OpenAIModelList,
    strict_json_loads,
    too_deep,
)
from .openai_request import ChatCompletionRequest, ChatMessageIn
from .owned import own_run
from .runs import run_error, sse_response
from .sse import sse_data
from .state import current_owner, services

__all__ = ["blueprint"]

blueprint = Blueprint("openai", __name__)


# The request field an error is about when it does not name one (as OpenAI answers it).
_PARAMS = {"context_length_exceeded": "messages"}


def openai_error(error: dict[str, Any]) -> dict[str, Any]:
    """An error object with OpenAI's ``code`` (the error's type) and ``param`` (the field it is
    about, or null) added: the OpenAI SDKs read ``e.code`` and ``e.param``. ``field`` stays."""
    code = error.get("code") or error.get("type")
    return {**error, "code": code,
            "param": error.get("param") or error.get("field") or _PARAMS.get(str(code))}


@blueprint.after_app_request
async def _openai_error_fields(response: Response) -> Response:
    """Every JSON error under ``/v1/`` (ours, a validation's, a 401's or a 404's) in OpenAI's
    shape."""
    if (response.status_code >= 400 and request.path.startswith("/v1/")
            and response.mimetype == "application/json"):
        body = await response.get_json(silent=True)
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            response.set_data(json.dumps({**body, "error": openai_error(body["error"])}))
    return response

_LIST_MODELS_DEADLINE = 5.0

# Passed on to the model as they came (the chat agent's call): ChatRequest.options.
_PASSED_ON = ("top_p", "seed", "presence_penalty", "frequency_penalty", "response_format",
              "tool_choice", "parallel_tool_calls", "logit_bias", "reasoning_effort")


def _text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    # Content parts: text, or an assistant's refusal (others are refused by ChatMessageIn),
    # apart, as llama.cpp's server joins them ("12", "34" are not "1234").
    return "\n".join(t for p in content if isinstance(
        t := p.get("refusal" if p.get("type") == "refusal" else "text"), str))


def _to_history(messages: list[ChatMessageIn]) -> tuple[ChatMessage, ...]:
    out = []
    unanswered: list[ToolCall] = []  # the calls of the last assistant message not answered yet
    numbered = itertools.count()
    for m in messages:
        calls = tuple(
            ToolCall(
                # (Without an id: numbered across the history, not per message.)
                c.id or f"call_{next(numbered)}", c.function.name,
                c.function.arguments if isinstance(c.function.arguments, dict)
                else _loads(c.function.arguments),
            )
            for c in m.tool_calls or ()
        )
        if calls:
            unanswered = list(calls)
        answers = m.tool_call_id
        if m.role == "tool" and not answers:
            # A result paired by its tool's name (Ollama's clients' shape): the id of the
            # first call of that name not answered yet, which an OpenAI-compatible server
            # pairs by (sent with none, it went to no call).
            answers = next((c.id for c in unanswered if c.name == m.name), None)
        unanswered = [c for c in unanswered if c.id != answers]
        role = "system" if m.role == "developer" else m.role
        out.append(ChatMessage(role, _text(m.content), calls, answers, m.name))
    return tuple(out)


def _loads(text: str) -> dict[str, Any]:
    """A history tool call's ``arguments`` text as an object. Text that is not strict JSON
    (NaN, Infinity: the model's server would refuse them), nests too deeply, or is no object,
    is passed on as ``{"input": text}``. No text is no arguments (as a model's own ``""``)."""
    if not text.strip():
        return {}
    try:
        value = strict_json_loads(text)
    except (ValueError, RecursionError):
        return {"input": text}
    if too_deep(value, text):
        return {"input": text}
    return value if isinstance(value, dict) else {"input": value}


def _usage(handle: RunHandle) -> dict[str, int]:
    u = handle.usage
    prompt, completion = u.get("prompt_tokens", 0), u.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _tool_calls_out(calls: list[dict[str, Any]], *, with_index: bool) -> list[dict[str, Any]]:
    return [
        {**({"index": i} if with_index else {}), "id": c["id"], "type": "function",
         "function": {"name": c["name"], "arguments": c["arguments"]
                      if isinstance(c["arguments"], str) else json.dumps(c["arguments"])}}
        for i, c in enumerate(calls)
    ]


@blueprint.post("/v1/chat/completions")
@validate_request(ChatCompletionRequest)
@document_response(ChatCompletionOut, 200)
@document_response(ErrorBody, 404)
@document_response(ErrorBody, 409)
@document_response(ErrorBody, 429)
@document_response(ErrorBody, 502)
@document_response(ErrorBody, 503)
@document_response(ErrorBody, 504)
async def chat_completions(data: ChatCompletionRequest) -> Response:
    """OpenAI chat completions, non-streamed or streamed (``chat.completion.chunk`` + [DONE])."""
    svc = services()
    store = svc.require_store()
    history = _to_history(data.messages)
    question = next((m.content for m in reversed(history) if m.role == "user"), "")
    system = "\n\n".join(m.content for m in history if m.role == "system") or None
    model = data.model or svc.settings.default_model
    stop = (data.stop,) if isinstance(data.stop, str) else tuple(data.stop or ())
    # The conversation is created with the run, in one write.
    new_conversation: dict[str, str | None] = {
        "title": question[:80] or "chat completion", "system": system, "model": model,
        "agent": data.agent or "chat",
    }
    spec = RunSpec(
        conversation_id=None, new_conversation=new_conversation, content=question,
        agent=data.agent or "chat", model=model,
        owner=current_owner(), messages=history, client_tools=tuple(data.tools or ()),
        max_tokens=data.max_completion_tokens or data.max_tokens,
        temperature=data.temperature, stop=stop,
        options=tuple((k, v) for k in _PASSED_ON if (v := getattr(data, k)) is not None),
        # Cancelled if this request ends (or its client leaves) while it still runs: owned
        # from before its first write lands.
        on_handle=own_run,
    )
    handle = await svc.require_supervisor().start(spec)
    created = int(time.time())
    cid = f"chatcmpl-{handle.id}"
    shown_model = model or "default"
    if data.stream:
        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        reader = EventReader(handle.id, after=0, store=store,
                             supervisor=svc.require_supervisor(),
                             keepalive=svc.settings.sse_keepalive)
        # The response waits for the answer to start (at most a keep-alive interval): a run
        # that fails before its first token (an unknown model, a backend down) is then an HTTP
        # error with its status, as OpenAI clients expect, not a 200 carrying an error chunk.
        answer_tokens = handle.agent == "chat"
        try:
            first = await _until_the_answer_starts(reader, svc.settings.sse_keepalive,
                                                   answer_tokens=answer_tokens)
        except ServiceError as exc:
            # Its client is told the error (an HTTP error) and cannot re-join a /v1 stream:
            # the run stops, for what happened (not "client disconnected").
            handle.cancel(_stream_failed(exc))
            raise
        if first and first[-1].type in ("error", "run.finished"):
            await _finished(handle)
        if handle.finished.is_set() and handle.status is not RunStatus.succeeded:
            return _run_error(handle)
        return sse_response(
            _stream(reader, handle, cid, created, shown_model, include_usage, first,
                    answer_tokens=answer_tokens, keepalive=svc.settings.sse_keepalive)
        )
    await _finished(handle)
    if handle.status is not RunStatus.succeeded:
        return _run_error(handle)
    extra = handle.result_extra
    message: dict[str, Any] = {"role": "assistant", "content": handle.final_text}
    if handle.agent == "chat" and handle.reasoning_parts:
        # A reasoning model's thinking, as the stream's chunks carry it (and llama.cpp's
        # server puts it in its answer): never in the content.
        message["reasoning_content"] = "".join(handle.reasoning_parts)
    if extra.get("tool_calls"):
        message["tool_calls"] = _tool_calls_out(extra["tool_calls"], with_index=False)
        # OpenAI's: a message of tool calls and no text has content null (a client may tell
        # the two kinds of answer apart by it).
        message["content"] = handle.final_text or None
    return jsonify({
        "id": cid, "object": "chat.completion", "created": created,
        "model": extra.get("model", shown_model),
        "choices": [{"index": 0, "message": message,
                     "finish_reason": extra.get("finish_reason", "stop")}],
        "usage": _usage(handle),
    })


async def _finished(handle: RunHandle) -> None:
    try:
        await handle.finished.wait()
    finally:
        if not handle.done:
            handle.cancel("client disconnected")


def _run_error(handle: RunHandle) -> Response:
    resp = run_error(handle)
    if resp.status_code == 409 or handle.status is RunStatus.timed_out:
        # A cancel is final. OpenAI SDKs retry 409 too ("lock timeout"), which would start
        # the cancelled completion again; they obey this header before the status. So is a
        # run's deadline (504): a retry would run the whole completion again, to the same
        # deadline.
        resp.headers["x-should-retry"] = "false"
    return resp


# Events that put something in an OpenAI stream (``_Framer``): the answer has started.
_FRAMED = frozenset({"token", "message", "error", "run.finished"})


async def _until_the_answer_starts(reader: EventReader, hold: float, *, answer_tokens: bool
                                   ) -> list[RunEvent]:
    """The run's events up to the first that shows in the stream (within ``hold`` seconds)."""
    shown = _FRAMED | {"thought"} if answer_tokens else _FRAMED - {"token"}
    first: list[RunEvent] = []
    with trio.move_on_after(hold):
        while True:
            try:
                item = await reader.__anext__()
            except StopAsyncIteration:
                break
            if isinstance(item, Keepalive):
                continue
            first.append(item)
            if item.type == "queued":
                # Waiting for a backend slot: the stream starts now, with a comment per place
                # in the queue (SSE keep-alives), instead of no byte until a slot frees.
                break
            if item.type in shown and (item.type != "thought" or item.data.get("reasoning")):
                break
    return first


def _chunk(cid: str, created: int, model: str, delta: dict[str, Any],
           finish: str | None = None, *, usage: bool = False) -> dict[str, Any]:
    """A chunk; with ``usage`` (``stream_options.include_usage``) it says ``"usage": null``, as
    OpenAI's every chunk before the usage chunk does."""
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage:
        out["usage"] = None
    return out


async def _stream(
    reader: EventReader, handle: RunHandle, cid: str, created: int, model: str,
    include_usage: bool, first: list[RunEvent], *, answer_tokens: bool, keepalive: float,
) -> AsyncIterator[bytes]:
    """The run's events as OpenAI chunks. Every chunk names one model: the one that answered
    (known with the answer's first chunk), or ``model`` (the one asked for) if none did. A
    stream that must start before the answer does (a keep-alive interval passed: a model
    loading, a queue) starts with a comment and sends its role chunk with the first frame:
    it was sent at once with the placeholder model ("default"), and every later chunk said
    "default" while the run was stored with the model that answered. A run that fails before
    its answer starts sends the error chunk alone (no role chunk naming the placeholder)."""
    try:
        framer = _Framer(cid, created, model, answer_tokens=answer_tokens, usage=include_usage)
        opened = False

        def frame(event: RunEvent) -> bytes | None:
            nonlocal opened
            if opened or event.type == "queued":
                return framer.frame(event)
            framer.name(handle.result_extra.get("model", model))
            out = framer.frame(event)
            if out is None:
                return None
            opened = True
            if framer.failed:
                # An error before anything was said (a stream that started early, for a queue
                # or a model loading): the error chunk alone. A role chunk would name a model
                # no call answered with (the placeholder, a request naming none).
                return out
            # The role chunk and the first frame go out as one write (each write to
            # hypercorn costs a round of the event loop before its bytes leave). An answer of
            # tool calls alone has content null, as OpenAI's and the non-stream one have.
            calls_only = (event.type == "message" and event.data.get("tool_calls")
                          and not (not framer.answer_tokens and event.data.get("content")))
            role = {"role": "assistant", "content": None if calls_only else ""}
            return sse_data(framer.chunk(role)) + out

        opening = [out for event in first if (out := frame(event)) is not None]
        yield b"".join(opening) if opened else b"".join(opening) + b": keep-alive\n\n"
        sent = trio.current_time()
        try:
            async for item in reader:
                if isinstance(item, Keepalive):
                    out = b": keep-alive\n\n"
                elif (out := frame(item)) is None:
                    # Not shown (another agent's steps): the reader's keep-alives count only
                    # silence, so a run busy with steps sends one here, or nothing would flow.
                    if trio.current_time() - sent < keepalive:
                        continue
                    out = b": keep-alive\n\n"
                sent = trio.current_time()
                yield out
        except ServiceError as exc:  # the store failed under a re-read: an error, not a reset
            handle.cancel(_stream_failed(exc))  # told the error; a /v1 client cannot re-join
            yield sse_data({"error": openai_error(exc.to_event())})
            return
        if framer.failed:
            return  # an error chunk ended it: no usage, no [DONE] that would read as success
        if include_usage:
            yield sse_data({"id": cid, "object": "chat.completion.chunk", "created": created,
                            "model": framer.model, "choices": [], "usage": _usage(handle)})
        yield b"data: [DONE]\n\n"
    finally:
        if not handle.done:
            handle.cancel("client disconnected")


def _stream_failed(exc: ServiceError) -> str:
    return f"the stream failed: {exc.type}: {exc.message}"


def _token_prefix(cid: str, created: int, model: str) -> bytes:
    """A token chunk up to its content; the hot path only appends the content and a suffix."""
    return (
        f'data: {{"id":{json.dumps(cid)},"object":"chat.completion.chunk","created":{created},'
        f'"model":{json.dumps(model)},"choices":[{{"index":0,"delta":{{"content":'
    ).encode()


_TOKEN_SUFFIX = b'},"finish_reason":null}]}\n\n'
_TOKEN_SUFFIX_USAGE = b'},"finish_reason":null}],"usage":null}\n\n'


class _Framer:
    """A run's events as OpenAI chunks. A run that does not succeed ends with an error chunk
    (its ``error`` event's, or one for a timeout or a cancel), never with a ``finish_reason``
    that would read as a complete answer.

    ``answer_tokens``: the run's tokens are its answer (the ``chat`` agent). Other agents also
    stream their steps' text (thoughts, plans, text before a tool call), which is not the
    answer: their answer is sent whole, from the final message, as the non-stream one is."""

    def __init__(self, cid: str, created: int, model: str, *, answer_tokens: bool = True,
                 usage: bool = False) -> None:
        self.cid, self.created, self.model = cid, created, model
        self.prefix = _token_prefix(cid, created, model)
        self.suffix = _TOKEN_SUFFIX_USAGE if usage else _TOKEN_SUFFIX
        self.answer_tokens = answer_tokens
        self.usage = usage
        self.failed = False

    def name(self, model: str) -> None:
        """The model the chunks name from now on."""
        if model != self.model:
            self.model, self.prefix = model, _token_prefix(self.cid, self.created, model)

    def frame(self, event: RunEvent) -> bytes | None:
        if event.type == "queued":
            return _queued_comment(event)
        if event.type == "token":
            if not self.answer_tokens:
                return None
            # Same bytes as sse_data(_chunk(..., {"content": text})), without re-encoding.
            return self.prefix + json.dumps(event.data["text"]).encode() + self.suffix
        if event.type == "thought":
            if self.answer_tokens and event.data.get("reasoning"):
                # A reasoning model's thinking, as llama.cpp's server and DeepSeek send it.
                return sse_data(self.chunk({"reasoning_content": event.data["text"]}))
            return None
        if event.type == "message":
            out = b""
            if not self.answer_tokens and event.data.get("content"):
                out += sse_data(self.chunk({"content": event.data["content"]}))
            calls = event.data.get("tool_calls")
            if calls:
                out += sse_data(self.chunk({"tool_calls": _tool_calls_out(calls,
                                                                         with_index=True)}))
            return out + sse_data(self.chunk({}, event.data.get("finish_reason", "stop")))
        if event.type == "error":
            self.failed = True
            return sse_data({"error": openai_error(event.data)})
        if event.type == "run.finished" and event.data["status"] != "succeeded":
            if self.failed:
                return None
            self.failed = True
            status = event.data["status"]
            if status == "cancelled" and event.data.get("error") == "shutdown":
                status = "shutting_down"
            return sse_data({"error": openai_error({
                "type": _END_TYPES.get(status, status),
                "message": event.data.get("error") or f"the run ended {status}"})})
        return None

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return _chunk(self.cid, self.created, self.model, delta, finish, usage=self.usage)


# The error code of a run that ended so (as a non-stream answer has it: api/runs.py).
_END_TYPES = {RunStatus.timed_out.value: RunTimeout.type,
              RunStatus.cancelled.value: RunCancelled.type}


def _queued_comment(event: RunEvent) -> bytes:
    """A keep-alive comment saying the run's place in its backend's queue (clients skip it)."""
    position = event.data.get("position")
    return f": queued, position {position}\n\n".encode()


@blueprint.get("/v1/models")
@document_response(OpenAIModelList, 200)
async def list_models() -> Response:
    """Models of every reachable backend, in OpenAI's list shape."""
    return jsonify({"object": "list", "data": [m for m, _ in await _models()]})


@blueprint.get("/v1/models/<path:model_id>")
@document_response(OpenAIModel, 200)
@document_response(ErrorBody, 404)
async def retrieve_model(model_id: str) -> Response:
    """One model (the OpenAI SDK's ``models.retrieve``); 404 if no reachable backend has it.

    A name without a tag is also an Ollama server's ``:latest`` (Ollama's reading of a name:
    chat with ``llama3.2`` runs ``llama3.2:latest``), answered under the name asked for. While
    no backend can list its models, 503 (retried by the SDKs), not a 404 that says the model
    does not exist."""
    answered: list[bool] = []
    models = await _models(answered=answered)
    for model, _ in models:
        if model["id"] == model_id:
            return jsonify(model)
    latest = ollama_latest(model_id)
    for model, ollama in models:
        if ollama and model["id"] == latest:
            return jsonify({**model, "id": model_id})
    if not answered:
        raise BackendUnavailable("no backend answered: the model's server cannot be asked now")
    return json_error(404, "model_not_found", f"no reachable backend has model {model_id!r}")


async def _models(*, answered: list[bool] | None = None) -> list[tuple[dict[str, Any], bool]]:
    """Each model once, in OpenAI's shape, and whether an Ollama server lists it. ``answered``
    gets whether the backend could say (a backend down lists nothing: an empty list, not a
    500)."""
    backend = services().backend
    data: list[tuple[dict[str, Any], bool]] = []
    if backend is not None:
        with trio.move_on_after(_LIST_MODELS_DEADLINE):
            try:
                models = await backend.list_models()
            except BackendAuthFailed:
                if answered is not None:  # models.retrieve: said, not taken for "not found"
                    raise
                models = []
            except Exception:
                models = []
            else:
                if answered is not None:
                    answered.append(True)
            # Each model once (OpenAI's list has unique ids), as its first server names it: a
            # fleet's servers, or Ollama and llama.cpp under auto, may serve one of one name.
            for m in models:
                if all(d["id"] != m.id for d, _ in data):
                    data.append(({"id": m.id, "object": "model", "created": 0,
                                  "owned_by": m.backend}, m.ollama))
    return data
