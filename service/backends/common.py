"""What the HTTP adapters share: identity, the injected client, budgets, default-model lookup."""

from __future__ import annotations

import base64
import json
import math
import uuid
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx
import trio

from ..errors import BackendProtocolError, ModelNotFound, register_upstream_secret
from .base import BackendHealth, ChatRequest, ChatResult, ModelInfo, collect_chat
from .http import BodyTooLarge, Budgets, request_small, tls_reason

__all__ = ["HTTPBackend", "milliseconds", "new_call_id", "parse_arguments", "token_count"]

_FIRST_MODEL_TTL = 30.0  # seconds the first listed model stands in for a missing one


def new_call_id() -> str:
    """An id for a tool call whose backend gives none (Ollama)."""
    return f"call_{uuid.uuid4().hex[:16]}"


def token_count(value: Any) -> int | None:
    """A token count from an upstream's usage fields: a non-negative int, else None (unknown;
    a malformed count is not worth failing an answer for, and must not reach the metrics).
    One past ``TOKENS_MAX`` is malformed too: no context holds it, and the store's columns
    (PostgreSQL's ``integer``; SQLite's 64 bits) refused the call's whole record."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= TOKENS_MAX:
        return value
    return None


TOKENS_MAX = 2**31 - 1


def milliseconds(value: Any, per: float = 1.0) -> float | None:
    """An upstream's timing (``value / per``) as a finite float, else None: a timing is not
    worth failing an answer for, and an integer of thousands of digits (valid JSON) does not
    fit a float (OverflowError)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        ms = value / per
    except OverflowError:
        return None
    return ms if math.isfinite(ms) else None


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: past a float
        raise ValueError(f"{text[:40]} is past a float's range")
    return value


def _not_json(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")  # NaN, Infinity: Python's json takes them


def _all_finite(value: Any) -> bool:
    """No NaN or infinity anywhere in ``value`` (a parsed JSON document; walked without
    recursion: a model's arguments may nest deeply)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def parse_arguments(raw: Any, *, backend: str, name: str) -> dict[str, Any]:
    """Tool-call arguments as a dict: a JSON object, or a string holding one. Numbers must be
    JSON's: a NaN or an infinity (which Python's json reads and writes, but no strict parser
    takes, nor httpx when it sends them on) makes the arguments invalid, as any bad JSON."""
    if isinstance(raw, dict):
        # Parsed with the stream's line (Ollama's NDJSON, by Python's json).
        if not _all_finite(raw):
            raise BackendProtocolError(
                f"tool call {name!r}: arguments hold a number that is not finite",
                backend=backend)
        return raw
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            value = json.loads(raw, parse_float=_finite_float, parse_constant=_not_json)
        except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." nesting
            raise BackendProtocolError(
                f"tool call {name!r}: arguments are not valid JSON: {raw[:200]!r}", backend=backend
            ) from exc
        if isinstance(value, dict):
            return value
    raise BackendProtocolError(
        f"tool call {name!r}: arguments are not a JSON object: {raw!r:.200}", backend=backend
    )


class HTTPBackend:
    """Base of the HTTP adapters. The client is injected and owned by the caller (not closed)."""

    kind = "http"

    def __init__(
        self,
        name: str,
        url: str,
        client: httpx.AsyncClient,
        budgets: Budgets | None = None,
        *,
        default_model: str | None = None,
        health_timeout: float = 2.0,
    ) -> None:
        self.name = name
        self.headers: dict[str, str] = {}
        # Credentials in the URL ("http://user:pass@host", a proxy in front of the model) go
        # into an Authorization header: the URL is shown (/api/backends, error messages, the
        # LLM-call table) and must not carry them.
        self.url, auth = split_credentials(url.rstrip("/"))
        if auth is not None:
            self.headers["Authorization"] = auth
        self.client = client
        self.budgets = budgets or Budgets()
        self.default_model = default_model
        self._first_model: tuple[str, float] | None = None  # (id, valid until)
        self.health_timeout = health_timeout

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.url} default_model={self.default_model}>"

    async def list_models(self) -> list[ModelInfo]:  # pragma: no cover - overridden
        raise NotImplementedError

    async def health(self) -> BackendHealth:  # pragma: no cover - overridden
        raise NotImplementedError

    async def chat(self, request: ChatRequest) -> ChatResult:
        return await collect_chat(self, request)  # type: ignore[arg-type]

    async def model_for(self, request: ChatRequest) -> str:
        """:meth:`resolve_model` for ``request``, told to its ``on_model``."""
        model = await self.resolve_model(request.model)
        if request.on_model is not None:
            request.on_model(model)
        return model

    async def resolve_model(self, model: str | None) -> str:
        """The request's model, else the configured default, else the first listed model."""
        if model:
            return model
        if self.default_model:
            return self.default_model
        # Cached briefly: without it every LLM call (every ReAct step) cost a /models request.
        now = trio.current_time()
        if self._first_model is not None and now < self._first_model[1]:
            return self._first_model[0]
        models = await self.list_models()
        if not models:
            raise ModelNotFound("the backend lists no models", backend=self.name)
        self._first_model = (models[0].id, now + _FIRST_MODEL_TTL)
        return models[0].id

    async def _probe(self, path: str) -> tuple[httpx.Response | None, float, str | None]:
        """GET ``path`` within ``health_timeout``: (response or None, latency, error)."""
        started = trio.current_time()
        response: httpx.Response | None = None
        error: str | None = None
        with trio.move_on_after(self.health_timeout) as scope:
            try:
                response = await request_small(self.client, "GET", self.url + path,
                                               headers=self.headers)
            except BodyTooLarge as exc:
                error = str(exc)
            except (httpx.HTTPError, httpx.InvalidURL) as exc:  # InvalidURL is not an HTTPError
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if (reason := tls_reason(exc)) is not None:
                    error = f"TLS handshake failed: {reason}"
        if scope.cancelled_caught:
            error = f"no answer within {self.health_timeout:g}s"
        return response, trio.current_time() - started, error

    def _unreachable(self, latency: float, error: str) -> BackendHealth:
        return BackendHealth(self.name, self.url, reachable=False, ready=False,
                             latency=latency, error=error)

    async def inventory(self) -> tuple[frozenset[str], frozenset[str] | None]:
        """The models it serves, and those loaded now (None: it cannot tell)."""
        models = frozenset(m.id for m in await self.list_models())
        return models, models

    async def preload(self, model: str) -> None:
        return None

    async def aclose(self) -> None:
        return None  # the shared client belongs to whoever made it


def split_credentials(url: str) -> tuple[str, str | None]:
    """``url`` without its user:password, and the Basic Authorization value they make."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    user, password = unquote(parts.username or ""), unquote(parts.password or "")
    host = parts.netloc.rpartition("@")[2]
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    # With no password the user name is the credential (``http://sk-TOKEN@proxy``, a
    # gateway's key given as the user): never shown either.
    for secret in (password or user, f"{user}:{password}", f"Basic {token}"):
        register_upstream_secret(secret)
    return urlunsplit(parts._replace(netloc=host)), f"Basic {token}"
