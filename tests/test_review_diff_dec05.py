"""A review of the commits of 2026-12-05 (0c7166c, 683d533, cc87a94): what a run is told and
stored with when its owner dies, and what a cut answer keeps. Each test shows a defect those
commits introduced or left, and fails on the code it was written against.

Real servers on 127.0.0.1 with the real simulator upstream, the backend built from the settings
(tests/e2e.py). An owner that dies is a real ``python -m service`` process killed with SIGKILL
(tests/servers.py ``start_service``); the instance that closes its run is the app under
hypercorn on port 0 in this process, sharing the store. Every test runs on SQLite and on
PostgreSQL.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from service.settings import Settings
from service.sim import Reply, Simulator, open_simulator

from .e2e import EventStream, after_tokens, e2e, read_events, tokens
from .servers import RunningServer, running_server, start_service

pytestmark = pytest.mark.both_stores

GUARD = 60  # seconds any wait may take before the test fails (a process start included)


@asynccontextmanager
async def _owner(settings: Settings, cwd: Path, **env: str
                 ) -> AsyncIterator[tuple[trio.Process, httpx.AsyncClient]]:
    """The run's owner: ``python -m service`` on the test's store, in a process of its own
    (so that it can die as a process dies: SIGKILL, no ``finally``)."""
    proc, base = await start_service(settings.db, env.pop("SERVICE_LLAMACPP_URL"), cwd,
                                     name="owner", env_extra=env)
    try:
        async with httpx.AsyncClient(base_url=base, timeout=GUARD) as http:
            yield proc, http
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.move_on_after(GUARD, shield=True):
            await proc.wait()


async def _shown_then_owner_killed(
    owner: tuple[trio.Process, httpx.AsyncClient], survivor: RunningServer, agent: str,
    shown: int,
) -> tuple[str, str, dict[str, Any]]:
    """A run (``on_disconnect: continue``) streamed on the owner until ``shown`` tokens; its
    live ``GET /api/runs/{id}``; then, once the survivor's store holds those tokens, the owner
    is killed. Returns (conversation id, run id, the live run as the owner told it)."""
    proc, a = owner
    conv = (await a.post("/api/conversations", json={})).json()["id"]
    async with a.stream("POST", f"/api/conversations/{conv}/messages", json={
            "content": "what happened last night?", "stream": True, "agent": agent,
            "on_disconnect": "continue"}) as r:
        seen = await EventStream(r).read(after_tokens(shown))
    run_id = seen[0].data["run_id"]
    live = (await a.get(f"/api/runs/{run_id}")).json()
    store = survivor.services.require_store()
    # (another process's commits: polled)
    while sum(e.type == "token" for e in await store.list_run_events(run_id)) < shown:  # noqa: ASYNC110
        await trio.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    return conv, run_id, live


async def _closed_by_survivor(c: httpx.AsyncClient, run_id: str) -> list[Any]:
    """A re-join on the surviving instance: it closes the dead owner's run and tells its end."""
    async with c.stream("GET", f"/api/runs/{run_id}/events") as r:
        events = await read_events(r)
    assert events[-1].type == "run.finished", events
    return events


# -- 1. the model of a run closed by a survivor vs what its live owner told -------------------


async def test_a_dead_owners_run_keeps_the_model_its_live_owner_told(
    settings: Settings, tmp_path: Path,
) -> None:
    """``SERVICE_BACKEND=auto`` (an Ollama server tried first, a llama.cpp one), no model named:
    an ``auto`` run's router call is answered by ``olla-model:latest``; for the answer the
    Ollama server is busy (503) and the fleet fails over to ``cpp-model``, which streams it.
    Since 683d533 the live owner names the model of its last streaming call: ``GET
    /api/runs/{id}`` says ``cpp-model`` while the answer streams. Then the owner dies
    (SIGKILL) and another instance closes the run (0c7166c).

    Told vs stored: the client was told ``cpp-model``; the store (``GET /api/runs/{id}``, and
    the ``run.finished`` every follower is told) says ``olla-model:latest``, the router's
    model, which wrote none of the answer. Had the owner lived, it would have stored
    ``cpp-model``; the two commits of one session disagree on which call names a run.

    Root cause: service/store/ownership.py:218-230 ``_model_that_answered`` takes the run's
    *first* recorded LLM call (``ORDER BY seq LIMIT 1``), while service/agents/base.py:310-323
    ``_answered_by`` names the *last call that streamed*; the store cannot tell which calls
    streamed (an LLM-call row does not say; the answer's own call, still streaming at the
    death, is not recorded at all). Fix: have the owner persist the model it names when it
    changes (a write of ``runs.model`` beside the committer's events when ``handle.model``
    changes on a run that named none, or a ``model`` field on the event stream), and have
    ``close_interrupted`` take that; failing that, mark the LLM-call rows that streamed to
    the run's clients and take the last of them."""
    ollama = Simulator(("olla-model:latest",))
    llamacpp = Simulator(("cpp-model",))
    ollama.script(Reply(text="chat"),  # the router's classification
                  Reply(status=503, error="server busy"))  # the answer: failed over
    llamacpp.script(Reply(text="the disk filled up at three and the service stopped", hang_after=4))
    async with (open_simulator(ollama), open_simulator(llamacpp),
                running_server(settings) as survivor, survivor.client() as b):
        with trio.fail_after(GUARD):
            async with _owner(settings, tmp_path, SERVICE_BACKEND="auto",
                              SERVICE_OLLAMA_URL=ollama.url,
                              SERVICE_LLAMACPP_URL=llamacpp.url) as owner:
                _, run_id, live = await _shown_then_owner_killed(owner, survivor, "auto", 3)
            events = await _closed_by_survivor(b, run_id)
            stored = (await b.get(f"/api/runs/{run_id}")).json()
    assert live["model"] == "cpp-model", live  # what the live owner told
    assert stored["status"] == "failed", stored
    assert (stored["model"], events[-1].data.get("model")) == ("cpp-model", "cpp-model"), (
        f"the live owner told model {live['model']!r} (the answer's); once it died the run "
        f"is stored with {stored['model']!r} and its run.finished says "
        f"{events[-1].data.get('model')!r}")


# -- 2. an auto run routed to chat, cut by its owner's death -----------------------------------

INCIDENT = ("Incident report\n"
            "- **Observation:** the disk filled up at 03:00 with 93 GB of logs\n"
            "- **Impact:** the API was down for forty minutes\n")


async def test_a_dead_owners_auto_run_routed_to_chat_keeps_the_answer_it_showed(
    settings: Settings, tmp_path: Path,
) -> None:
    """An ``auto`` run's router picks ``chat`` (the ``decision`` event says so); the chat
    answer, an incident report with a ``- **Observation:** ...`` bullet, streams; the owner
    dies mid-answer and another instance closes the run.

    Told vs stored: the client was shown every token of the report so far; the store keeps the
    reply as ``""``. The live owner would have kept the text (the ``chat`` agent sets no
    ``answer_of``: its whole text is its answer), and so does the survivor for a ``chat`` run;
    only ``auto`` runs are read as ReAct turns, whichever agent the router chose.

    Root cause: service/store/ownership.py:200-204: ``close_interrupted`` applies
    ``react_parser.answer_so_far`` to every ``auto`` run (``_TEXT_PROTOCOL_AGENTS``), which
    takes the ``Observation:`` bullet for a protocol label (a first turn without an "Action:"
    is no prose either) and keeps nothing. The stored ``decision`` event names the agent that
    actually answered. Fix: for an ``auto`` run, read its ``decision`` event and judge the cut
    text by that agent (ReAct's reading only for ``react``), as the live owner does."""
    sim = Simulator(("sim-model",))
    sim.script(Reply(text="chat"),  # the router's classification
               Reply(text=INCIDENT, hang_after=14))
    async with (open_simulator(sim), running_server(settings) as survivor,
                survivor.client() as b):
        with trio.fail_after(GUARD):
            async with _owner(settings, tmp_path, SERVICE_LLAMACPP_URL=sim.url) as owner:
                conv, run_id, _ = await _shown_then_owner_killed(owner, survivor, "auto", 14)
            await _closed_by_survivor(b, run_id)
            events = await survivor.services.require_store().list_run_events(run_id)
            messages = (await b.get(f"/api/conversations/{conv}")).json()["messages"]
    decisions = [e.data for e in events if e.type == "decision"]
    assert [d["agent"] for d in decisions] == ["chat"], decisions
    shown = "".join(e.data["text"] for e in events if e.type == "token")
    assert shown.startswith("Incident report\n- **Observation:**"), shown
    (reply,) = [m for m in messages if m["run_id"] == run_id and m["role"] == "assistant"]
    assert reply["status"] == "error", reply
    assert reply["content"] == shown, (
        f"the client was shown {shown!r} (a chat answer); the store keeps {reply['content']!r}")


# -- 3. a ReAct answer in LangChain's style, cut mid-way --------------------------------------

LANGCHAIN_ANSWER = ("Thought: I know this without a tool.\n"
                    "Action: Final Answer\n"
                    "Action Input: The capital of France is Paris, a city of about two million")


async def test_a_react_answer_given_as_the_final_answer_action_keeps_what_was_shown(
    settings: Settings,
) -> None:
    """A ``react`` run's model answers in LangChain's style: ``Action: Final Answer`` with the
    answer as its ``Action Input``. Whole, that turn is the run's answer
    (``react_parser.parse_react``: an action named "Final Answer" with an input is the final
    answer). Here the upstream dies mid-answer (a Stop or a deadline cuts it the same way).

    Told vs stored: the client was shown "... Action Input: The capital of France is Paris,
    a city of"; the store keeps the reply ``""``: the partial answer is lost, although
    683d533 says a cut turn is "judged as a whole one".

    Root cause: service/agents/react_parser.py:192-207 ``answer_so_far`` looks only for a
    "Final Answer:" *label*; a turn with labels but none of them "Final Answer:" and no prose
    "Action:" keeps nothing, where ``parse_react`` (lines 136-139, ``_ANSWER_ACTION``) reads
    the same text as a final answer. Fix: judge the cut text with ``parse_react`` itself: when
    it reads as a final answer given through the answer action (``Action: Final Answer`` /
    ``finish`` / ``answer`` with an input), keep that input so far."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(text=LANGCHAIN_ANSWER, die_after=20))
        conv = await env.conversation()
        with trio.fail_after(GUARD):
            async with env.post_stream(conv, "what is the capital of France?",
                                       agent="react") as r:
                events = await read_events(r)
            run_id = events[0].data["run_id"]
            reply = await env.reply_of(conv, run_id)
    shown = "".join(tokens(events))
    assert "Action Input: The capital of France is Paris" in shown, shown
    assert reply["status"] == "error", reply
    answer_so_far = shown[shown.index("Action Input:") + len("Action Input:"):].strip()
    assert reply["content"] == answer_so_far, (
        f"the client was shown {shown!r}; the store keeps the reply {reply['content']!r}")


# -- 4. a ReAct run after native tool calls, cut by its owner's death -------------------------

AFTER_TOOLS = ("Thought: the calculator says 1564, so the total cost of the order is 1564 "
               "euros, shipping included, which is")


async def test_a_dead_owners_react_run_after_native_tool_calls_keeps_the_answer_it_showed(
    settings: Settings, tmp_path: Path,
) -> None:
    """A ``react`` run's model calls the calculator natively (OpenAI ``tool_calls``), then
    streams its answer, which starts with a ``Thought:`` label; the owner dies mid-answer and
    another instance closes the run.

    Told vs stored: the client was shown the answer so far; the store keeps ``""``. The live
    owner would have kept it: after native tool calls "the model's text is its answer" (683d533,
    ``answer_so_far(native=True)``; docs/api.md: "unless the turn reads as prose ... or a turn
    after native tool calls"). A cut by a Stop and a cut by the owner's death store different
    replies for the same stream.

    Root cause: service/store/ownership.py:204 ``answer_so_far(partial, first=not stepped)``:
    the survivor passes neither ``native`` nor ``tools``, so it judges a turn after native
    calls as a text-protocol one (a ``Thought:`` label and no final answer: nothing). Fix:
    record on the event stream how the run called its tools (e.g. ``"native": true`` on the
    ``tool.call`` events of native calls) and pass ``native`` to ``answer_so_far`` when a
    native call came before the cut turn."""
    sim = Simulator(("sim-model",))
    sim.script(Reply(text="", tool_calls=({"name": "calculator",
                                            "arguments": {"expression": "23 * 68"}},)),
               Reply(text=AFTER_TOOLS, hang_after=12))
    async with (open_simulator(sim), running_server(settings) as survivor,
                survivor.client() as b):
        with trio.fail_after(GUARD):
            async with _owner(settings, tmp_path, SERVICE_LLAMACPP_URL=sim.url) as owner:
                conv, run_id, _ = await _shown_then_owner_killed(owner, survivor, "react", 12)
            await _closed_by_survivor(b, run_id)
            events = await survivor.services.require_store().list_run_events(run_id)
            messages = (await b.get(f"/api/conversations/{conv}")).json()["messages"]
    assert [e.data.get("name") for e in events if e.type == "tool.call"] == ["calculator"]
    shown = "".join(e.data["text"] for e in events if e.type == "token")
    assert shown.startswith("Thought: the calculator says 1564"), shown
    (reply,) = [m for m in messages if m["run_id"] == run_id and m["role"] == "assistant"]
    assert reply["status"] == "error", reply
    assert reply["content"] == shown, (
        f"the client was shown {shown!r} (an answer after native tool calls, which the live "
        f"owner keeps whole); the store keeps {reply['content']!r}")
