"""LLM backends: Ollama and OpenAI-compatible adapters, failover, and the recording interceptor.

``build_backend(settings, client)`` turns the settings into the one :class:`Backend` the app uses:

* ``ollama`` / ``llamacpp``: that adapter (one server), or a :class:`FleetBackend` over that
  kind's servers (a comma-separated URL list, or ``SERVICE_BACKENDS_FILE``);
* ``embedded``: an :class:`OpenAICompatBackend` on the base URL of the embedded llama.cpp server,
  which ``service.backends.embedded`` starts; pass that URL as ``embedded_url``;
* ``auto``: :class:`FleetBackend` (an :class:`AutoBackend` that routes by model, conversation and
  load) over Ollama's servers, then llama.cpp's, then the embedded server (if a URL is given),
  failing over before the first chunk only.

Given a ``recorder`` and/or ``metrics``, each concrete backend is wrapped in an
:class:`Interceptor` (its own concurrency limiter, one record per upstream attempt). In ``auto``
mode the interceptors sit under the AutoBackend, so a failover shows as an ``error`` row for the
backend that failed and an ``ok`` row for the one that served.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import httpx

from ..errors import ConfigError, register_upstream_secret
from ..metrics import METRICS, Metrics
from ..text import redact_userinfo
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
from .embedded import slots_for
from .fleet import ServerSpec, fleet_from_settings, tls_context
from .http import Budgets, ShardedClient, make_client, make_sharded_client
from .interceptor import Interceptor, LLMCallRecorder
from .ollama import OllamaBackend
from .openai_compat import OpenAICompatBackend
from .router import FleetBackend, Member

if TYPE_CHECKING:
    from ..settings import Settings

log = logging.getLogger(__name__)

__all__ = [
    "AutoBackend",
    "Backend",
    "BackendHealth",
    "Budgets",
    "ChatChunk",
    "ChatMessage",
    "ChatRequest",
    "ChatResult",
    "FleetBackend",
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
        tool_call=settings.llm_tool_call_timeout,
    )


def client_from_settings(
    settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """The shared client: enough connections for every server's limiter (each server of a
    fleet has its own), plus probes."""
    try:
        slots = sum(s.max_concurrency or settings.backend_concurrency
                    for s in fleet_from_settings(settings))
    except ConfigError:  # reported by the backend's build, naming the setting
        slots = 0
    return make_sharded_client(
        budgets_from_settings(settings),
        max_connections=max(slots, settings.backend_concurrency) * 3 + 8,
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

    def wrap(backend: Backend, concurrency: int | None = None) -> Backend:
        if not intercept and concurrency is None:
            return backend
        return Interceptor(backend, recorder, metrics or METRICS,
                           concurrency=concurrency or settings.backend_concurrency,
                           queue_timeout=settings.backend_queue_timeout)

    def embedded() -> Backend:
        if embedded_url is None:
            raise ConfigError(
                "SERVICE_BACKEND=embedded: start service.backends.embedded first and pass its "
                "base URL as embedded_url", variable="SERVICE_BACKEND",
            )
        from ..settings import embedded_alias

        alias = embedded_alias(settings)
        # Limited to its slots: a call past them waits in the service's queue (a ``queued``
        # event, its place told, ``backend_busy`` at SERVICE_BACKEND_QUEUE_TIMEOUT), not
        # silently in llama.cpp's, counted as its time to first token.
        return wrap(OpenAICompatBackend("embedded", embedded_url, client, budgets,
                                        default_model=alias or default, only_model=alias,
                                        answer_cap=settings.embedded_max_tokens or None),
                    min(slots_for(settings.embedded_ctx), settings.backend_concurrency))

    if kind == "embedded":
        return embedded()
    if kind not in ("auto", "ollama", "llamacpp"):
        raise ConfigError(f"unknown backend {kind!r}", variable="SERVICE_BACKEND")
    specs = fleet_from_settings(settings)
    if kind != "auto":
        specs = [s for s in specs if s.kind == kind]
        if not specs:
            raise ConfigError(f"SERVICE_BACKEND={kind}: SERVICE_BACKENDS_FILE lists no {kind} "
                              "server", variable="SERVICE_BACKENDS_FILE")
    owned: list[httpx.AsyncClient] = []
    backends: list[Backend] = []
    members: list[Member] = []
    for spec in specs:
        backends.append(wrap(_server(spec, settings, client, owned, default),
                             spec.max_concurrency))
        members.append(Member(weight=spec.weight, priority=spec.priority,
                              capacity=spec.max_concurrency or settings.backend_concurrency,
                              models=spec.models, kind=spec.kind))
    if kind == "auto" and embedded_url is not None:
        backends.append(embedded())
        members.append(Member(priority=max(m.priority for m in members) + 1,
                              capacity=slots_for(settings.embedded_ctx), kind="embedded"))
    if kind != "auto" and len(backends) == 1 and not owned and settings.backends_file is None:
        return backends[0]  # one server: no routing
    return FleetBackend(backends, members, default_model=default, owned_clients=owned,
                        metrics=metrics, health_ttl=settings.health_ttl,
                        probe_timeout=min(2.0, settings.llm_connect_timeout),
                        # The same endpoint as the health probe (Ollama's /api/tags): the same
                        # bound. With 1 s, a server answering in 1.4 s was healthy by the probe
                        # and marked not ready by its model list, at every refresh.
                        inventory_timeout=min(2.0, settings.llm_connect_timeout))


def _server(spec: ServerSpec, settings: Settings, shared: httpx.AsyncClient,
            owned: list[httpx.AsyncClient], default: str | None) -> Backend:
    """One server's adapter: its own client if it has its own TLS or connect timeout."""
    budgets = Budgets.from_idle(
        spec.idle_timeout or settings.llm_idle_timeout,
        connect=spec.connect_timeout or settings.llm_connect_timeout,
        call=spec.call_timeout or settings.llm_call_timeout,
        tool_call=settings.llm_tool_call_timeout,
    )
    client = shared
    tls = tls_context(spec.tls)
    if not spec.tls.verify:
        log.warning("TLS verification is OFF for backend %s (%s): anyone on the path can "
                    "read and change its traffic", spec.name, redact_userinfo(spec.url))
    if tls is not None or spec.connect_timeout is not None:
        limit = spec.max_concurrency or settings.backend_concurrency
        client = make_client(budgets, max_connections=limit * 2 + 4,
                             verify=tls)
        owned.append(client)
    backend: OllamaBackend | OpenAICompatBackend
    if spec.kind == "ollama":
        backend = OllamaBackend(spec.name, spec.url, client, budgets, default_model=default,
                                num_ctx=spec.num_ctx)
    else:
        backend = OpenAICompatBackend(spec.name, spec.url, client, budgets,
                                      default_model=default, answer_cap=spec.n_predict)
    backend.headers.update(spec.headers)
    for _, value in spec.headers:
        register_upstream_secret(value)
    return backend
