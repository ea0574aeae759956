"""What an upstream's error answer says: its message and kind, its Retry-After, and the
service error it becomes (``error_from_status``), llama.cpp's numbers for a prompt over its
context (``context_numbers``); and ``loads_json``, the JSON reader of every upstream body."""

from __future__ import annotations

import json
import math
import time
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from ..errors import (
    BackendAuthFailed,
    BackendError,
    BackendRateLimited,
    BackendRejectedRequest,
    BackendResponseError,
    BackendUnavailable,
    ContextLengthExceeded,
    ModelNotFound,
)

__all__ = ["RETRY_AFTER_MAX", "context_numbers", "error_from_status", "error_kind",
           "loads_json", "retry_after_seconds"]


def loads_json(data: str | bytes) -> Any:
    """``json.loads``, where a document nested too deeply for the parser (``[[[[...``: 200 KB
    of it, well inside a line's bound, raises RecursionError) is malformed JSON like any other
    (``ValueError``), so an upstream sending it is a protocol error, not a crash."""
    try:
        return json.loads(data)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc



def _error_message(body: bytes) -> tuple[str, str | None]:
    """The upstream's message, and its error kind if it gives one: Ollama ``{"error": str}``,
    OpenAI ``{"error": {"message", "type", "code"}}`` (``error_kind``)."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        obj = loads_json(text)
    except ValueError:
        return text[:500], None
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            return str(err.get("message") or err)[:500], error_kind(err)
        return str(err)[:500], None
    return text[:500], None


def context_numbers(body: bytes | dict[str, Any]) -> tuple[int, int] | None:
    """llama.cpp's refusal of a prompt over its context, ``{"error": {"n_prompt_tokens": N,
    "n_ctx": M}}``: (N, the most a prompt may have, M - 1), else None."""
    try:
        obj = loads_json(body) if isinstance(body, bytes) else body
    except ValueError:
        return None
    err = obj.get("error", obj) if isinstance(obj, dict) else None
    if not isinstance(err, dict):
        return None
    n_prompt, n_ctx = err.get("n_prompt_tokens"), err.get("n_ctx")
    if (isinstance(n_prompt, int) and isinstance(n_ctx, int) and not isinstance(n_prompt, bool)
            and not isinstance(n_ctx, bool) and 0 < n_ctx <= n_prompt):
        return n_prompt, n_ctx - 1
    return None


def error_kind(err: dict[str, Any]) -> str | None:
    """An OpenAI-style error's kind: its ``code`` when that is a name (OpenAI's
    ``"context_length_exceeded"``), else its ``type`` (llama.cpp's, whose code is a status)."""
    code, kind = err.get("code"), err.get("type")
    if isinstance(code, str) and code:
        return code
    return kind if isinstance(kind, str) else None


RETRY_AFTER_MAX = 3600  # seconds: a Retry-After further off is passed on as this


def retry_after_seconds(value: str | None, *, now: float | None = None) -> int | None:
    """A Retry-After header as whole seconds from now (delay-seconds or an HTTP date), bounded
    to ``RETRY_AFTER_MAX``; None if absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(int(value[:8]), RETRY_AFTER_MAX)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    delta = when.timestamp() - (time.time() if now is None else now)
    return min(max(0, math.ceil(delta)), RETRY_AFTER_MAX)


def error_from_status(
    status: int, body: bytes, *, backend: str, model: str | None = None,
    headers: httpx.Headers | None = None,
) -> BackendError:
    """Map an upstream error status (with the protocol's error body) to a service error.

    429 and 503 keep the upstream's Retry-After (``retry_after``) for the client; a prompt
    over the model's context is the request's fault (400 ``context_length_exceeded``).
    """
    message, kind = _error_message(body)
    message = message or f"HTTP {status}"
    if status == 404 and "model" in message.lower():
        return ModelNotFound(message, backend=backend, upstream_status=status, model=model)
    # A 500 too, said plainly: Ollama's runner refusing an over-long prompt is a 500 in some
    # versions ("input exceeds context length"); the same prompt fails on every server.
    if 400 <= status <= 500 and ContextLengthExceeded.said(message, kind, fault=status == 500):
        too_long = ContextLengthExceeded(message, backend=backend, upstream_status=status,
                                         param="messages")
        too_long.tokens = context_numbers(body)
        return too_long
    kind_of: dict[int, type[BackendError]] = {
        429: BackendRateLimited, 503: BackendUnavailable, 400: BackendRejectedRequest,
        422: BackendRejectedRequest, 401: BackendAuthFailed, 403: BackendAuthFailed}
    error = kind_of.get(status, BackendResponseError)(message, backend=backend,
                                                      upstream_status=status)
    if status in (429, 503):  # the load's: when to come back, as the upstream said
        error.retry_after = retry_after_seconds(headers.get("retry-after") if headers else None)
    return error
