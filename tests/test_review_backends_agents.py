"""A review of what a client is told against what the store holds when the upstream LLM
misbehaves mid-run, across the backends (Ollama, llama.cpp, the ``auto`` fleet's failover) and
the agents (chat, react, plan_execute, auto). Each test shows a defect and fails on the code it
was written against (2026-12-05).

Real servers on 127.0.0.1 (the app under hypercorn on port 0) with the real simulator upstream,
the backend built by the lifespan from the settings (adapters, fleet, interceptors recording
into the server's store), as in production (tests/e2e.py); every test runs on SQLite and on
PostgreSQL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio

from service.settings import BackendKind, Settings
from service.sim import Reply, Simulator

from .e2e import _serve_sim, e2e, read_events, tokens
from .servers import RunningServer, running_server

pytestmark = pytest.mark.both_stores

GUARD = 30  # seconds any wait may take before the test fails


@asynccontextmanager
async def _auto_on_two_sims(
    settings: Settings, **update: Any,
) -> AsyncIterator[tuple[Simulator, Simulator, RunningServer, httpx.AsyncClient]]:
    """``SERVICE_BACKEND=auto`` with no default model, as the lifespan builds it: an Ollama
    simulator (``olla-model:latest``, tried first) and a llama.cpp one (``cpp-model``)."""
    ollama, llamacpp = Simulator(("olla-model:latest",)), Simulator(("cpp-model",))
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


# -- 1. the model a multi-call run is told and stored with ---------------------------------


@pytest.mark.parametrize("agent", ["auto", "plan_execute"])
async def test_a_run_whose_answer_failed_over_names_the_model_that_answered(
    settings: Settings, agent: str,
) -> None:
    """Under ``auto`` with no model named, an ``auto`` (or ``plan_execute``) run makes several
    LLM calls: the router's token-silent classification (or the plan and its steps), then the
    answer. The Ollama server serves the first calls; for the answer it is busy (503 before any
    chunk) and the fleet fails over to llama.cpp's server, which writes the whole answer as
    ``cpp-model`` (its ``ok`` LLM-call row says so).

    Told and stored: the completion's ``model``, the ``message`` event, ``run.finished`` and
    ``GET /api/runs/{id}`` all say ``olla-model:latest``, a model that wrote not one token of
    the answer. docs/api.md: "``run.finished`` (and a ``message``) then name the model that
    answered, as the run is stored with it ... (in a fleet, the server that answers)"; the
    single-call case was fixed (tests/test_model_names_regressions.py) but any earlier call
    of the run still decides.

    Root cause: service/agents/base.py ``AgentContext.call_llm`` (lines 290-298): the first
    chunk of the run's *first* LLM call, whatever it is for (``emit_tokens=False``: the
    classification, the plan), sets ``handle.result_extra["model"]`` and ``handle.model``;
    every later call, the answer's included, is skipped by ``"model" not in result_extra``.
    Fix: let the call that makes the answer (a call with ``emit_tokens``, or the last call)
    name the model, e.g. overwrite ``result_extra["model"]`` (and ``handle.model`` when the
    run named none) on each call's first chunk rather than only on the run's first."""
    async with _auto_on_two_sims(settings) as (ollama, llamacpp, _server, c):
        if agent == "auto":
            ollama.script(Reply(text="chat"),  # the router's classification
                          Reply(status=503, error="server busy"))  # the answer
        else:
            ollama.script(Reply(text='{"steps": [{"id": 1, "task": "greet the user"}]}'),
                          Reply(text="Final Answer: said hello"),  # the step's ReAct turn
                          Reply(status=503, error="server busy"))  # the synthesis
        llamacpp.script(Reply(text="hello from the llama.cpp server"))
        with trio.fail_after(GUARD):
            r = await c.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "agent": agent})
            assert r.status_code == 200, r.text
            run_id = r.json()["id"].removeprefix("chatcmpl-")
            calls = (await c.get("/api/llm-calls", params={"run_id": run_id})).json()["data"]
            run = (await c.get(f"/api/runs/{run_id}")).json()
    assert r.json()["choices"][0]["message"]["content"] == "hello from the llama.cpp server"
    # The answer's call: the last one recorded ok, on llama.cpp's server.
    answered = [(x["backend"], x["model"]) for x in calls if x["outcome"] == "ok"]
    assert ("llamacpp", "cpp-model") in answered, calls
    assert run["status"] == "succeeded", run
    told = r.json()["model"]
    assert (told, run["model"]) == ("cpp-model", "cpp-model"), (
        f"the answer was written by cpp-model (LLM calls {answered}); the client was told "
        f"{told!r} and the run is stored with {run['model']!r}")


# -- 2. the usage of a call cut mid-answer ---------------------------------------------------


@pytest.mark.parametrize("kind", ["llamacpp", "ollama"])
async def test_a_run_cut_mid_answer_counts_the_tokens_it_streamed_in_its_usage(
    settings: Settings, kind: str,
) -> None:
    """A chat run streams three tokens of its answer; then the upstream dies (the connection
    closes mid-answer). The client was shown the three tokens; the store keeps them as the
    reply (status ``error``), and the interceptor's LLM-call row counts them
    (``completion_tokens: 3``, ``tokens_estimated: true``: "a call cut short still records the
    tokens seen so far").

    Told and stored: the run's ``usage`` (``run.finished`` and ``GET /api/runs/{id}``) is
    ``{"llm_calls": 1}``: no completion tokens at all for an answer the client was shown and
    the store keeps. The same holds for a run the client cancels (the page's Stop) or whose
    deadline cuts it, and for the cut last call of a ReAct or plan run (its earlier calls'
    tokens count, the cut one's do not): a client (or a quota) reading a run's usage is told
    the generation it watched cost nothing, while ``/api/llm-calls`` says otherwise.

    Root cause: service/agents/base.py ``AgentContext.call_llm``: ``usage`` is taken only
    from a chunk that carries it (the adapters' last one, lines 286-287), so a call that ends
    early passes ``None`` to ``_add_usage`` (lines 228-240), which then adds only
    ``llm_calls``. Fix: count the call's content chunks in ``call_llm`` and, when no usage
    arrived, add that estimate (as the interceptor's ``_Call.record`` does), or take the
    interceptor's figures for the run."""
    async with e2e(settings, kind) as env:
        env.sim.script(Reply(text="alpha beta gamma delta epsilon", die_after=3))
        conv = await env.conversation()
        with trio.fail_after(GUARD):
            async with env.post_stream(conv, "hello") as r:
                events = await read_events(r)
            run_id = events[0].data["run_id"]
            reply = await env.reply_of(conv, run_id)
            run = (await env.client.get(f"/api/runs/{run_id}")).json()
            calls = await env.llm_calls(run_id)
    shown = "".join(tokens(events))
    assert shown == "alpha beta gamma ", shown
    assert (reply["content"], reply["status"]) == (shown, "error"), reply
    [call] = calls
    assert (call["outcome"], call["completion_tokens"]) == ("error", 3), call
    finished = events[-1]
    assert finished.type == "run.finished", finished
    assert finished.data["usage"] == run["usage"], (finished.data, run)
    assert run["usage"].get("completion_tokens") == call["completion_tokens"], (
        f"3 tokens were streamed to the client and stored as its reply, and the LLM call is "
        f"recorded with {call['completion_tokens']} completion tokens; the run's usage (told "
        f"in run.finished, stored) is {run['usage']}")


# -- 3. a ReAct prose answer cut mid-way ------------------------------------------------------

PROSE = ("Incident summary:\n"
         "- **Cause:** the disk was full (93 GB of logs)\n"
         "- **Action:** rotate the logs daily\n"
         "- **Owner:** ops")


async def test_a_react_prose_answer_cut_mid_way_keeps_what_the_client_was_shown(
    settings: Settings,
) -> None:
    """A ``react`` run whose model needs no tool answers at once in prose: an incident summary
    with a ``- **Action:** rotate the logs daily`` bullet. Whole, that is the run's answer
    (``ReActAgent.loop``'s ``_prose``: "Not the text protocol's action ... but prose: the
    answer"; tests/agents/test_agent_protocol_and_tool_faults.py). Here the upstream dies
    after "... - **Action:** rotate the " (the same happens to a Stop or a deadline).

    Told: every token of the summary so far, on the run's SSE stream (and the WebSocket).
    Stored: the reply is ``""`` (status ``error``): the partial answer the client was shown is
    lost, and the next turn's history leaves the reply out (``build_history`` skips an empty
    assistant message).

    Root cause: service/text.py:118-130 ``protocol_answer_so_far`` (``RunHandle.answer_of``,
    set by ``ReActAgent.run``, service/agents/react.py:61) takes any line that looks like a
    protocol label (``_REACT_LABEL``: "Action:", "Thought:", "Observation:", bold or not) for
    a text-protocol turn and keeps nothing, where the finished turn is read as prose by
    ``_prose``. Fix: judge a cut turn as ``loop`` judges a whole one: when its "Action:" is
    prose (no thought before it, no "Action Input:", not a tool name; or the run called tools
    natively), the text so far is the answer."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(text=PROSE, die_after=16))
        conv = await env.conversation()
        with trio.fail_after(GUARD):
            async with env.post_stream(conv, "write the incident summary",
                                       agent="react") as r:
                events = await read_events(r)
            run_id = events[0].data["run_id"]
            reply = await env.reply_of(conv, run_id)
    shown = "".join(tokens(events))
    assert shown == PROSE[:PROSE.index("logs daily")], shown
    assert [e.type for e in events if e.type not in ("token", "run.started")] == [
        "error", "run.finished"], events
    assert reply["status"] == "error", reply
    assert reply["content"] == shown, (
        f"the client was shown {shown!r}; the store keeps the reply {reply['content']!r}")
