"""Model names (a review of 73619f8, ``GET /v1/models/{id}`` finding ``{id}:latest``, and of
b53d234, a run that named no model stored with the model the backend chose; each test failed
on those commits): the run names the model that answered, as its answer and its LLM call do,
and only an Ollama server's name without a tag is its ``:latest``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio

from service.settings import BackendKind, Settings
from service.sim import Reply, Simulator

from .e2e import GUARD, _serve_sim, e2e
from .servers import RunningServer, running_server

MSG = [{"role": "user", "content": "hi"}]


@asynccontextmanager
async def _auto_on_two_sims(
    settings: Settings, ollama_models: tuple[str, ...], llamacpp_models: tuple[str, ...],
    **update: Any,
) -> AsyncIterator[tuple[Simulator, Simulator, RunningServer, httpx.AsyncClient]]:
    """``SERVICE_BACKEND=auto`` (as in production: the lifespan builds the fleet and its
    interceptors) over an Ollama simulator and a llama.cpp one, each with its own models."""
    ollama, llamacpp = Simulator(ollama_models), Simulator(llamacpp_models)
    async with trio.open_nursery() as nursery:
        scopes = [await nursery.start(_serve_sim, sim, trio.Event())
                  for sim in (ollama, llamacpp)]
        conf = settings.model_copy(update={
            "backend": BackendKind("auto"), "ollama_url": ollama.url,
            "llamacpp_url": llamacpp.url, "default_model": None, **update})
        try:
            async with running_server(conf, from_settings=True) as server, \
                    server.client() as c:
                yield ollama, llamacpp, server, c
        finally:
            for scope in scopes:
                scope.cancel()


async def _completion_naming_no_model(c: httpx.AsyncClient) -> tuple[str, str]:
    """A ``/v1`` completion with no model named: the model it answered with, and its run."""
    r = await c.post("/v1/chat/completions", json={"messages": MSG})
    assert r.status_code == 200, r.text
    return str(r.json()["model"]), str(r.json()["id"].removeprefix("chatcmpl-"))


# -- b53d234: the model a run that named none is stored with ------------------------------


async def test_a_run_that_failed_over_is_stored_with_the_model_that_answered(
    settings: Settings,
) -> None:
    """Under ``auto`` with no model named, the Ollama server is tried first: its adapter picks
    its first listed model and tells ``on_model`` (``AgentContext._model_chosen`` sets
    ``handle.model``) before the upstream request; that request fails (a 503 before any chunk)
    and the fleet fails over to llama.cpp's server, which answers with its own model.
    ``_model_chosen`` keeps the first name it was told, so the run is stored (and shown) with
    the model of the server that did NOT answer, while the completion's ``model`` and the
    ``ok`` LLM call say the other one: the client told one thing, the store another, which
    is what b53d234 set out to end. Right: the run names the model that answered."""
    async with _auto_on_two_sims(settings, ("olla-model:latest",), ("cpp-model",)) as (
            ollama, llamacpp, _server, c):
        ollama.script(Reply(status=503, error="server busy"))
        llamacpp.script(Reply(text="hello"))
        with trio.fail_after(GUARD):
            answered, run_id = await _completion_naming_no_model(c)
            assert answered == "cpp-model"
            calls = (await c.get("/api/llm-calls", params={"run_id": run_id})).json()["data"]
            assert sorted((call["outcome"], call["model"]) for call in calls) == [
                ("error", "olla-model:latest"), ("ok", "cpp-model")]
            run = (await c.get(f"/api/runs/{run_id}")).json()
        assert run["status"] == "succeeded"
        assert run["model"] == answered, run


async def test_a_run_stored_with_the_model_the_upstream_answered_as(
    settings: Settings,
) -> None:
    """An OpenAI-compatible server may answer under another name than the one it lists and
    was asked for (a gateway resolving an alias: the simulator's ``Reply.model``). With no
    model named, the completion's ``model`` and the run's LLM call both say the name the
    server answered with (``chunk.model``: ``result_extra`` and ``_Call.seen``), but the run
    is stored with the listed name ``on_model`` was told before the request. b53d234's own
    claim ("as its LLM calls and /v1's model already said") does not hold. Right: the run
    names the model the call and the answer name."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(text="hello", model="sim-model-2026-12-01"))
        c = env.client
        with trio.fail_after(GUARD):
            answered, run_id = await _completion_naming_no_model(c)
            assert answered == "sim-model-2026-12-01"
            calls = await env.llm_calls(run_id)
            assert [call["model"] for call in calls] == [answered]
            run = (await c.get(f"/api/runs/{run_id}")).json()
        assert run["model"] == answered, run


# -- 73619f8: GET /v1/models/{id} and a name without a tag -------------------------------


async def test_a_tagless_name_is_not_found_as_latest_on_a_llamacpp_server(
    settings: Settings,
) -> None:
    """llama.cpp's server matches names as given (73619f8's own comment in the simulator; the
    fleet's ``_serves`` reads ``:latest`` only for Ollama servers), but ``retrieve_model``
    applies Ollama's reading to every listed model, whoever serves it: ``retrieve("foo")``
    answers 200 for a llama.cpp server that lists ``foo:latest``, and a chat with
    ``model="foo"`` is then a 404. A client that checks its model first is told a model exists
    that it cannot use. Right: only an Ollama server's ``:latest`` stands for a tagless name."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.models[:] = ["foo:latest"]
        c = env.client
        with trio.fail_after(GUARD):
            chat = await c.post("/v1/chat/completions", json={"model": "foo", "messages": MSG})
            assert chat.status_code == 404, chat.text  # the server does not run "foo"
            found = await c.get("/v1/models/foo")
        assert found.status_code == 404, found.text


async def test_a_tagless_name_on_a_registry_with_a_port_is_found_as_latest(
    settings: Settings,
) -> None:
    """Ollama names may start with a registry host that has a port
    (``localhost:5000/library/mymodel``; ``ollama list`` shows such a model as
    ``localhost:5000/library/mymodel:latest``). The tag is what follows a ``:`` after the last
    ``/``; ``retrieve_model`` takes any ``:`` for a tag, so the tagless name, which chat runs
    (the simulator reads it as Ollama does), is still a 404 there."""
    name = "localhost:5000/library/mymodel"
    async with e2e(settings, "ollama") as env:
        env.sim.models[:] = [f"{name}:latest"]
        env.sim.script(Reply(text="sunny"))
        c = env.client
        with trio.fail_after(GUARD):
            chat = await c.post("/v1/chat/completions", json={"model": name, "messages": MSG})
            assert chat.status_code == 200, chat.text
            found = await c.get(f"/v1/models/{name}")
        assert found.status_code == 200, found.text
        assert found.json()["id"] == name
