"""LLM backends: Ollama and OpenAI-compatible adapters, failover, and the recording interceptor.

``build_backend(settings, client)`` turns the settings into the one :class:`Backend` the app uses:

* ``ollama`` / ``llamacpp``: that adapter;
* ``embedded``: an :class:`OpenAICompatBackend` on the base URL of the embedded llama.cpp server,
  which ``service.backends.embedded`` starts; pass that URL as ``embedded_url``;
* ``auto``: :class:`AutoBackend` over Ollama, then llama.cpp, then the embedded server (if a URL
  is given), failing over before the first chunk only.

Given a ``recorder`` and/or ``metrics``, each concrete backend is wrapped in an
:class:`Interceptor` (its own concurrency limiter, one record per upstream attempt). In ``auto``
mode the interceptors sit under the AutoBackend, so a failover shows as an ``error`` row for the
backend that failed and an ``ok`` row for the one that served.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx

from ..errors import ConfigError
from ..metrics import METRICS, Metrics
from .auto import AutoBackend
from .base import (
    Backend,
    BackendHealth,
    ChatChunk,
    ChatMessage,
    ChatRequest,
    ChatResult,
    ModelInfo,
    ToolCall,
    Usage,
    collect_chat,
)
from .http import Budgets, ShardedClient, make_client, make_sharded_client
from .interceptor import Interceptor, LLMCallRecorder
from .llamacpp import OpenAICompatBackend
from .ollama import OllamaBackend

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = [
    "AutoBackend",
    "Backend",
    "BackendHealth",
    "Budgets",
    "ChatChunk",
    "ChatMessage",
    "ChatRequest",
    "ChatResult",
    "Interceptor",
    "LLMCallRecorder",
    "ModelInfo",
    "OllamaBackend",
    "OpenAICompatBackend",
    "ShardedClient",
    "ToolCall",
    "Usage",
    "budgets_from_settings",
    "build_backend",
    "client_from_settings",
    "collect_chat",
    "make_client",
    "make_sharded_client",
]


def budgets_from_settings(settings: Settings) -> Budgets:
    return Budgets.from_idle(
        settings.llm_idle_timeout,
        connect=settings.llm_connect_timeout,
        call=settings.llm_call_timeout,
    )


def client_from_settings(
    settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """The shared client: enough connections for every backend's limiter, plus probes."""
    return make_sharded_client(
        budgets_from_settings(settings),
        max_connections=settings.backend_concurrency * 3 + 8,
        shards=max(1, min(16, settings.backend_concurrency // 32)),
        transport=transport,
    )


def build_backend(
    settings: Settings,
    client: httpx.AsyncClient,
    *,
    recorder: LLMCallRecorder | None = None,
    metrics: Metrics | None = None,
    embedded_url: str | None = None,
) -> Backend:
    """The backend the settings ask for (see the module docstring)."""
    budgets = budgets_from_settings(settings)
    kind = str(getattr(settings.backend, "value", settings.backend))
    default = settings.default_model
    intercept = recorder is not None or metrics is not None

    def wrap(backend: Backend) -> Backend:
        if not intercept:
            return backend
        return Interceptor(backend, recorder, metrics or METRICS,
                           concurrency=settings.backend_concurrency,
                           queue_timeout=settings.backend_queue_timeout)

    def ollama() -> Backend:
        return wrap(OllamaBackend("ollama", settings.ollama_url, client, budgets,
                                  default_model=default))

    def llamacpp() -> Backend:
        return wrap(OpenAICompatBackend("llamacpp", settings.llamacpp_url, client, budgets,
                                        default_model=default))

    def embedded() -> Backend:
        if embedded_url is None:
            raise ConfigError(
                "SERVICE_BACKEND=embedded: start service.backends.embedded first and pass its "
                "base URL as embedded_url", variable="SERVICE_BACKEND",
            )
        from ..settings import embedded_alias

        alias = embedded_alias(settings)
        return wrap(OpenAICompatBackend("embedded", embedded_url, client, budgets,
                                        default_model=alias or default, only_model=alias))

    if kind == "ollama":
        return ollama()
    if kind == "llamacpp":
        return llamacpp()
    if kind == "embedded":
        return embedded()
    if kind == "auto":
        members = [ollama(), llamacpp()]
        if embedded_url is not None:
            members.append(embedded())
        return AutoBackend(members, health_ttl=settings.health_ttl,
                           probe_timeout=min(2.0, settings.llm_connect_timeout))
    raise ConfigError(f"unknown backend {kind!r}", variable="SERVICE_BACKEND")
