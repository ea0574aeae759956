"""Operations views of the backends: ``/api/backends``, ``/api/llm-calls``, ``/api/tools``.

``/api/backends`` probes within one short deadline and reports a backend that is down (or slow)
as unreachable: the endpoint exists to diagnose outages, so it never fails because of one.
"""

from __future__ import annotations

from typing import Any, Literal

import trio
from pydantic import BaseModel, Field
from quart import Blueprint
from quart_schema import validate_querystring, validate_response

from ..backends.auto import AutoBackend
from ..backends.base import Backend, BackendHealth
from ..backends.interceptor import Interceptor
from ..backends.router import FleetBackend
from ..errors import BackendError
from ..logs import get_logger
from ..store import LLMCallRecord
from .models import ErrorBody, _Query, iso
from .state import current_owner, services

__all__ = ["blueprint"]

log = get_logger("service.api")

blueprint = Blueprint("backends", __name__)

# The whole /api/backends answer (health probes, then model lists) fits in this many seconds.
_PROBE_DEADLINE = 3.0


class BackendOut(BaseModel):
    name: str
    url: str
    reachable: bool
    ready: bool
    models: list[str]
    last_error: str | None = Field(description="the health probe's error")
    latency: float | None = Field(description="seconds the health probe took")
    # Only for the members of the auto backend (None elsewhere): what its router saw of calls.
    failures: int | None = Field(default=None, description="consecutive failed calls")
    last_call_error: str | None = Field(
        default=None, description="the error of the latest failed call since the last success")
    cooldown: float | None = Field(
        default=None, description="seconds until calls are routed to it again")
    # Only for a fleet's servers (None elsewhere): what the router routes by.
    in_flight: int | None = Field(default=None, description="LLM calls open on it now")
    queued: int | None = Field(
        default=None, description="LLM calls waiting for one of its slots now")
    loaded: list[str] | None = Field(
        default=None, description="models loaded now (Ollama's /api/ps); null: not known")
    weight: float | None = Field(default=None, description="its share of the load")


class BackendList(BaseModel):
    data: list[BackendOut]


class ListLLMCallsQuery(_Query):
    # Unknown parameters are ignored (API.md), as on the other list endpoints.
    run_id: str | None = Field(None, max_length=200, description="only the calls of this run")
    limit: int = Field(50, ge=1, le=500)


class LLMCallOut(BaseModel):
    id: str
    run_id: str | None
    backend: str
    model: str
    started_at: str
    queue_wait: float | None = Field(description="seconds waiting for the backend's limiter")
    ttft: float | None = Field(description="seconds from the upstream request to the first token")
    duration: float | None = Field(description="seconds from the upstream request to its end")
    prompt_tokens: int | None
    completion_tokens: int | None
    tokens_estimated: bool
    outcome: Literal["ok", "error", "cancelled", "timed_out"]
    error: str | None

    @classmethod
    def of(cls, rec: LLMCallRecord) -> LLMCallOut:
        return cls(
            id=rec.id, run_id=rec.run_id, backend=rec.backend, model=rec.model,
            started_at=iso(rec.started_at) or "", queue_wait=rec.queue_wait, ttft=rec.ttft,
            duration=rec.duration, prompt_tokens=rec.prompt_tokens,
            completion_tokens=rec.completion_tokens, tokens_estimated=rec.tokens_estimated,
            outcome=rec.outcome.value, error=rec.error,
        )


class LLMCallList(BaseModel):
    data: list[LLMCallOut]


class ToolOut(BaseModel):
    name: str
    description: str
    parameters: dict[str, Any] = Field(description="JSON schema of the arguments")
    timeout: float = Field(description="seconds one call may take")


class ToolList(BaseModel):
    data: list[ToolOut]


def _unwrap(backend: Backend) -> Backend:
    while isinstance(backend, Interceptor):
        backend = backend.inner
    return backend


async def _healths(
    backend: Backend, deadline: float
) -> tuple[list[Backend], list[BackendHealth | None]]:
    """The backends to list, and their health (None: no answer before the deadline)."""
    inner = _unwrap(backend)
    if isinstance(inner, AutoBackend):
        members = list(inner.backends)
        healths: list[BackendHealth | None] = [None] * len(members)
        with trio.move_on_at(deadline):
            healths = list(await inner.health_all())
        return members, healths
    health: BackendHealth | None = None
    with trio.move_on_at(deadline):
        health = await backend.health()
    return [backend], [health]


async def _models(
    members: list[Backend], healths: list[BackendHealth | None], deadline: float
) -> list[list[str]]:
    """Each backend's models: from its health probe, else listed (if it is up), bounded."""
    models = [list(h.models) if h is not None else [] for h in healths]

    async def fill(i: int, backend: Backend) -> None:
        try:
            models[i] = [m.id for m in await backend.list_models()]
        except BackendError as exc:
            log.info("listing the models of %s failed: %s", backend.name, exc.message)

    with trio.move_on_at(deadline):
        async with trio.open_nursery() as nursery:
            for i, (backend, health) in enumerate(zip(members, healths, strict=True)):
                if health is not None and health.ready and not health.models:
                    nursery.start_soon(fill, i, backend)
    return models


@blueprint.get("/api/backends")
@validate_response(BackendList, 200)
async def list_backends() -> BackendList:
    """Each backend: url, reachable, ready, models, last error and probe latency."""
    backend = services().backend
    if backend is None:
        return BackendList(data=[])
    deadline = trio.current_time() + _PROBE_DEADLINE
    if isinstance(router := _unwrap(backend), FleetBackend):
        with trio.move_on_at(deadline):
            await router.refresh_if_stale()  # what each server serves and has loaded
    members, healths = await _healths(backend, deadline)
    models = await _models(members, healths, deadline)
    auto = _unwrap(backend)
    data = []
    for member, health, names in zip(members, healths, models, strict=True):
        if health is None:
            out = BackendOut(
                name=member.name, url=member.url, reachable=False, ready=False, models=[],
                last_error=f"no answer within {_PROBE_DEADLINE:g}s", latency=None,
            )
        else:
            out = BackendOut(
                name=health.name, url=health.url, reachable=health.reachable, ready=health.ready,
                models=names, last_error=health.error, latency=health.latency,
            )
        if isinstance(auto, AutoBackend):
            # A member can answer its probe and still fail calls (and be set aside for it).
            st = auto.member_status(member)
            out.failures, out.cooldown = st.failures, st.cooldown
            out.last_call_error = st.last_error
            out.in_flight, out.queued = auto.load(member)
        if isinstance(auto, FleetBackend):
            i = auto.backends.index(member)
            inventory = auto.inventories[i]
            out.weight = auto.members[i].weight
            out.loaded = sorted(inventory.loaded) if inventory.loaded is not None else None
            if inventory.models is not None and not out.models:
                out.models = sorted(inventory.models)
        data.append(out)
    return BackendList(data=data)


@blueprint.get("/api/llm-calls")
@validate_querystring(ListLLMCallsQuery)
@validate_response(LLMCallList, 200)
@validate_response(ErrorBody, 404)
@validate_response(ErrorBody, 422)
async def list_llm_calls(query_args: ListLLMCallsQuery) -> LLMCallList:
    """What the interceptor recorded of each LLM call, newest first (the caller's runs only)."""
    store = services().require_store()
    owner = current_owner()
    if query_args.run_id is not None:
        await store.get_run(query_args.run_id, owner=owner)  # NotFound -> 404
    calls = await store.list_llm_calls(
        run_id=query_args.run_id, limit=query_args.limit, owner=owner
    )
    return LLMCallList(data=[LLMCallOut.of(c) for c in calls])


@blueprint.get("/api/tools")
@validate_response(ToolList, 200)
async def list_tools() -> ToolList:
    """The tools the agents can call, with their JSON-schema parameters and timeouts."""
    svc = services()
    tools = svc.tools or ()
    timeout = svc.settings.tool_timeout
    return ToolList(data=[ToolOut(**t.spec(timeout)) for t in tools])
