"""Outside review (2026-12-07, pass h): what a client is told must be what the store says, for
the plan-and-execute, auto and ReAct agents under faults (cancel, deadline, upstream death,
shutdown). Failing tests show a defect each (their docstrings: told, stored, why API.md says
otherwise); passing ones pin a promise nobody pinned yet (their docstrings say which)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from service.runs import RunSpec
from service.settings import Settings
from service.sim import Reply, Simulator
from service.store import MessageStatus

from .agents.test_agents import TOOLS
from .agents.test_agents_on_simulator import sim_env
from .e2e import GUARD, EventStream, e2e, tokens
from .streams import parse_sse

# A plan of a tool step (calculator, no model call) and a step the model works out (ReAct).
PLAN = json.dumps({"steps": [
    {"id": 1, "task": "compute 6*7", "tool": "calculator", "arguments": {"expression": "6*7"}},
    {"id": 2, "task": "explain it", "depends_on": [1]},
]})


async def _run_on_sim(tmp_path: Path, sim: Simulator, spec: dict[str, Any], *,
                      cancel_at: float | None = None, protocol: str = "openai",
                      **env_kw: Any) -> dict[str, Any]:
    """A run on the simulator (real adapters and interceptor, virtual time); what is stored."""
    async with sim_env(tmp_path, sim, protocol, tools=TOOLS, **env_kw) as env:
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, **spec))
        if cancel_at is not None:
            await trio.sleep(cancel_at)
            handle.cancel()
        with trio.fail_after(3600):
            await handle.finished.wait()
        return {
            "handle": handle,
            "events": await env.store.list_run_events(handle.id),
            "reply": (await env.store.get_messages(conv))[1],
            "run": await env.store.get_run(handle.id),
            "calls": await env.store.list_llm_calls(run_id=handle.id),
        }


# -- 1. a /v1 client's stop sequence and an answer cut short -----------------------------------


@pytest.mark.parametrize("agent", ["plan_execute", "react", "auto"])
@pytest.mark.parametrize("how", ["upstream_death", "cancel"])
async def test_an_answer_cut_short_is_stored_without_what_follows_the_clients_stop(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, agent: str, how: str
) -> None:
    """A ``/v1`` completion (the run it makes, in virtual time: ``RunSpec(stop=...)`` comes
    only from ``/v1``; over HTTP in the next test) with ``agent`` ``plan_execute`` (or
    ``react``, or ``auto`` routing to ``chat``) and ``stop: ["END"]``. For these agents the
    stop is not sent upstream (it would cut their formats); the answer is cut at it
    afterwards (make_runner's ``_cut_at_stop``). Completed, the answer is stored and told
    ``"The answer is 42. "``. But cut short after the model wrote past the
    stop (its stream dies, or the run is cancelled), the stored reply, and the ``content`` of
    the ``run.finished`` a re-joining client is told, is ``"The answer is 42. END and then
    the rest"``: the client's stop sequence and what follows it, text no answer of this
    completion may hold (API.md: ``/v1`` takes ``stop``; OpenAI: the returned text does not
    contain the stop sequence), and that the same answer completed would not have kept. With
    the ``chat`` agent named it cannot happen (the stop goes upstream); under ``auto`` the
    chat call gets no stop (``stop=spec.stop if agent.name == "chat"``: the agent is auto).
    API.md: a run stopped by a cancel or an upstream's death "keeps what was produced so
    far" — of its answer, which ended at the stop. (The stored ``token`` events, which a
    re-join of the run is told, run past the stop even when it succeeds.)

    Likely spot: service/runs/supervisor.py ``_finish`` stores ``handle.partial_text``, which
    the stop cut of service/agents/__init__.py ``make_runner.run`` (applied to a returned
    answer only) never reaches."""
    final = "The answer is 42. END and then the rest of a long digression here"
    cut = Reply(text=f"Final Answer: {final}" if agent == "react" else final,
                interval=1.0, **({"die_after": 12} if how == "upstream_death" else {}))
    sim = Simulator(strict_models=False)
    if agent == "plan_execute":
        sim.script(Reply(text=PLAN), Reply(text="Final Answer: it is 42"), cut)
    elif agent == "auto":  # the router says chat (whose call, under auto, gets no stop either)
        sim.script(Reply(text="chat"), cut)
    else:
        sim.script(cut)
    got = await _run_on_sim(tmp_path, sim, {"content": "6*7, explained", "agent": agent,
                                            "stop": ("END",)},
                            cancel_at=11.5 if how == "cancel" else None)
    assert got["run"].status in ("failed", "cancelled"), got["run"]
    told = got["events"][-1].data["content"]
    stored = got["reply"].content
    assert told == stored  # told as stored: the defect is in both
    assert "END" not in stored, (
        f"stored and told {stored!r}: the client's stop sequence and what follows it")


async def test_a_v1_plan_cut_short_over_http_stores_text_past_its_stop(
    settings: Settings,
) -> None:
    """The same over HTTP. ``POST /v1/chat/completions`` ``{"agent": "plan_execute", "stop":
    ["END"]}``; the synthesis' stream dies after the model wrote past ``END``. The client is
    told 502 ``upstream_broken``; ``GET /api/conversations/{id}`` then holds the reply
    ``"The answer is 42. END and then the"`` (status ``error``), and the run's events told to
    a re-join end with ``run.finished`` ``content`` the same: the stop sequence and what
    follows it, which the same completion, had it ended, would never have stored (its reply
    is stored cut: ``"The answer is 42. "``)."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(text=PLAN), Reply(text="Final Answer: it is 42"),
                       Reply(text="The answer is 42. END and then the rest", die_after=8))
        with trio.fail_after(GUARD):
            r = await env.client.post("/v1/chat/completions", json={
                "model": "sim-model", "agent": "plan_execute", "stop": ["END"],
                "messages": [{"role": "user", "content": "compute 6*7 and explain"}]})
        assert r.status_code == 502, r.text
        run_id = r.json()["error"]["run_id"]
        run = (await env.client.get(f"/api/runs/{run_id}")).json()
        conv = (await env.client.get(f"/api/conversations/{run['conversation_id']}")).json()
        events = await env.run_events(run_id)
    (reply,) = [m for m in conv["messages"] if m["role"] == "assistant"]
    assert reply["status"] == "error"
    assert events[-1].data["content"] == reply["content"]
    assert "END" not in reply["content"], (
        f"stored {reply['content']!r}: the client's stop sequence and what follows it")


# -- 2. pins: usage told = usage stored = the LLM-call records, under faults --------------------


def _usage_vs_calls(got: dict[str, Any]) -> None:
    """The run's usage as told (``run.finished``), as stored (the run) and as its LLM calls
    were recorded (``/api/llm-calls``): the same calls, the same tokens, the same estimate."""
    told = got["events"][-1].data["usage"]
    run, calls = got["run"], got["calls"]
    assert told == run.usage
    assert told.get("llm_calls", 0) == len(calls), (told, calls)
    assert told.get("prompt_tokens", 0) == sum(c.prompt_tokens or 0 for c in calls)
    assert told.get("completion_tokens", 0) == sum(c.completion_tokens or 0 for c in calls)
    assert bool(told.get("tokens_estimated")) == any(c.tokens_estimated for c in calls)


_REPLAN = json.dumps({"steps": [{"id": 1, "task": "explain it again"}]})
_USAGE_CASES: dict[str, tuple[list[Reply], dict[str, Any], dict[str, Any]]] = {
    # step 2's model call dies mid-answer: the step fails, a re-plan runs, the run succeeds
    "plan_step_dies_then_replan": (
        [Reply(text=PLAN), Reply(tokens=10, interval=1.0, die_after=3), Reply(text=_REPLAN),
         Reply(text="Final Answer: again"), Reply(text="The answer is 42.")],
        {"agent": "plan_execute"}, {}),
    # the synthesis dies mid-answer: the run fails with the partial answer
    "plan_synthesis_dies": (
        [Reply(text=PLAN), Reply(text="Final Answer: it is 42"),
         Reply(tokens=10, interval=1.0, die_after=4)],
        {"agent": "plan_execute"}, {}),
    # a deadline in step 2's model call
    "plan_deadline_in_a_step": (
        [Reply(text=PLAN), Reply(tokens=20, interval=1.0)],
        {"agent": "plan_execute", "timeout": 5.5}, {}),
    # auto's routing call fails (500): the rule decides, chat answers
    "auto_routing_fails": (
        [Reply(status=500), Reply(text="a story for you")], {"agent": "auto"}, {}),
    # auto's routing call goes silent mid-answer (the idle budget ends it): the rule decides
    "auto_routing_goes_silent": (
        [Reply(tokens=5, hang_after=2), Reply(text="a story for you")], {"agent": "auto"}, {}),
    # ReAct: a tool round, then a cancel mid-answer
    "react_cancel_after_a_tool": (
        [Reply(tool_calls=({"name": "calculator", "arguments": {"expression": "6*7"}},)),
         Reply(tokens=20, interval=1.0)],
        {"agent": "react"}, {"cancel_at": 5.5}),
}


@pytest.mark.parametrize("protocol", ["openai", "ollama"])
@pytest.mark.parametrize("case", list(_USAGE_CASES))
async def test_usage_told_is_the_llm_calls_recorded_under_faults(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, case: str, protocol: str
) -> None:
    """PASSING pin. API.md: ``run.finished`` says ``usage``; ``GET /api/llm-calls?run_id=``
    lists what the interceptor recorded; docs/api.md: "A run's ``usage.llm_calls`` counts its
    agent's calls, and its tokens those the backends reported or, for a call cut before its
    usage came, its content chunks so far (``tokens_estimated``)". Pinned for the agents that
    make several calls (a plan step whose call dies and the re-plan after it, a synthesis
    that dies, a deadline in a step, auto's failed or silent routing call, a ReAct run
    cancelled after a tool round), on both protocols: the usage told is the usage stored,
    call for call and token for token the LLM-call records."""
    script, spec, kw = _USAGE_CASES[case]
    sim = Simulator(strict_models=False)
    sim.script(*script)
    got = await _run_on_sim(tmp_path, sim, {"content": "compute 6*7 and explain", **spec},
                            protocol=protocol, **kw)
    expected = {"plan_step_dies_then_replan": "succeeded", "plan_synthesis_dies": "failed",
                "plan_deadline_in_a_step": "timed_out", "auto_routing_fails": "succeeded",
                "auto_routing_goes_silent": "succeeded",
                "react_cancel_after_a_tool": "cancelled"}[case]
    assert got["run"].status == expected, (got["run"], [e.type for e in got["events"]])
    _usage_vs_calls(got)
    # and the reply told is the reply stored
    end = got["events"][-1].data
    told = (next(e.data["content"] for e in got["events"] if e.type == "message")
            if expected == "succeeded" else end["content"])
    assert told == got["reply"].content


# -- 3. pin: a shutdown mid-plan ---------------------------------------------------------------

_SLOW_PLAN = json.dumps({"steps": [
    {"id": 1, "task": "look a up", "tool": "slow_lookup", "arguments": {"key": "a"}},
    {"id": 2, "task": "explain it", "depends_on": [1]},
]})


@pytest.mark.parametrize("where", ["in_a_step_tool", "in_the_synthesis"])
async def test_a_shutdown_mid_plan_keeps_what_it_told(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, where: str
) -> None:
    """PASSING pin. API.md: a run stopped by a shutdown "keeps what was produced so far", and
    "Every stream ends with run.finished"; docs/api.md: ``shutdown`` is told while the
    service drains. A ``plan_execute`` run drained (2 s of grace) while a step's tool runs, or
    while its synthesis streams: ``shutdown`` is told first, the run ends ``cancelled``
    (error ``shutdown``), every ``step.started`` has its ``step.finished`` and every
    ``tool.call`` its ``tool.result``, and the reply stored is the synthesis' text told so far
    (``run.finished``'s ``content`` too)."""
    sim = Simulator(strict_models=False)
    if where == "in_a_step_tool":
        sim.script(Reply(text=_SLOW_PLAN), Reply(text="never reached"))
    else:
        sim.script(Reply(text=PLAN), Reply(text="Final Answer: it is 42"),
                   Reply(tokens=40, interval=1.0))
    async with sim_env(tmp_path, sim, tools=TOOLS) as env:
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, "look a up", agent="plan_execute"))
        await trio.sleep(5.5)  # the tool runs 10 s; the synthesis streams a word a second
        with trio.fail_after(60):
            await env.supervisor.drain(2.0)
            await handle.finished.wait()
        events = await env.store.list_run_events(handle.id)
        reply = (await env.store.get_messages(conv))[1]
        run = await env.store.get_run(handle.id)
    types = [e.type for e in events]
    assert (run.status, run.error) == ("cancelled", "shutdown"), types
    assert "shutdown" in types, types
    assert types[-1] == "run.finished", types
    started = sorted(e.data["id"] for e in events if e.type == "step.started")
    finished = sorted(e.data["id"] for e in events if e.type == "step.finished")
    assert started == finished, types
    calls = sorted(e.data["call_id"] for e in events if e.type == "tool.call")
    results = sorted(e.data["call_id"] for e in events if e.type == "tool.result")
    assert calls == results, types
    last_step = max(i for i, e in enumerate(events) if e.type in (
        "thought", "tool.call", "tool.result", "plan", "step.started", "step.finished"))
    told = "".join(e.data["text"] for e in events[last_step:] if e.type == "token")
    assert (events[-1].data["content"], reply.content, reply.status) == (
        told, told, MessageStatus.cancelled)
    if where == "in_the_synthesis":
        assert told.startswith("tok0 tok1 "), told


# -- 4. pins over HTTP: a re-join mid-plan, a /v1 plan streamed ---------------------------------


async def test_a_rejoin_mid_plan_from_its_last_event_id_has_no_gap_and_no_duplicate(
    settings: Settings,
) -> None:
    """PASSING pin. API.md: ``GET /api/runs/{id}/events`` "Resumes after the Last-Event-ID
    header"; docs/api.md: "the store is read, then live events follow with no gap and no
    duplicate". A client follows a ``plan_execute`` run (``on_disconnect: continue``) and
    leaves as step 2 starts (its model call still streaming); it re-joins from the last id it
    saw. What it saw and then got is the run's stored events exactly, and the re-join's
    tokens are the stored reply."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(text=PLAN), Reply(text="Final Answer: it is 42", interval=0.2),
                       Reply(tokens=20, interval=0.02))
        conv = await env.conversation()
        async with env.post_stream(conv, "compute 6*7 and explain", agent="plan_execute",
                                   on_disconnect="continue") as r:
            with trio.fail_after(GUARD):
                seen = await EventStream(r).read(
                    lambda ev: ev[-1].type == "step.started" and ev[-1].data["id"] == 2)
        run_id = seen[0].data["run_id"]
        rest = await env.run_events(run_id, **{"Last-Event-ID": str(seen[-1].id)})
        stored = await env.run_events(run_id)
        reply = await env.reply_of(conv, run_id)
    assert rest
    assert rest[0].id == seen[-1].id + 1
    assert seen + rest == stored
    assert (reply["status"], reply["content"]) == ("complete", "".join(tokens(rest)))


async def test_a_v1_plan_execute_stream_tells_the_stored_reply_and_usage(
    settings: Settings,
) -> None:
    """PASSING pin. API.md: ``/v1`` with ``agent`` runs that agent "and streams its answer";
    docs/api.md: with another agent than chat the stream "carries the answer only, sent whole
    at the end". The answer streamed (whitespace and newlines included) is the reply the
    conversation stores, its ``finish_reason`` the ``message``'s, and the usage chunk is the
    stored run's usage, which is the sum of the run's LLM-call records."""
    answer = "The answer  is\n 42.\n"
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(text=PLAN), Reply(text="Final Answer: it is 42"),
                       Reply(text=answer))
        with trio.fail_after(GUARD):
            r = await env.client.post("/v1/chat/completions", json={
                "model": "sim-model", "agent": "plan_execute", "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "compute 6*7 and explain"}]})
        assert r.status_code == 200, r.text
        frames = [f["data"] for f in parse_sse(r.text)]
        assert frames[-1] == "[DONE]"
        run_id = frames[0]["id"].removeprefix("chatcmpl-")
        run = (await env.client.get(f"/api/runs/{run_id}")).json()
        conv = (await env.client.get(f"/api/conversations/{run['conversation_id']}")).json()
        calls = await env.llm_calls(run_id)
    text = "".join(c["delta"].get("content") or "" for f in frames[:-2] for c in f["choices"])
    (reply,) = [m for m in conv["messages"] if m["role"] == "assistant"]
    assert (text, reply["content"], reply["status"]) == (answer, answer, "complete")
    assert [c["finish_reason"] for f in frames[:-2] for c in f["choices"]
            if c["finish_reason"]] == ["stop"]
    usage = frames[-2]["usage"]
    assert usage == {k: run["usage"][k] for k in ("prompt_tokens", "completion_tokens",
                                                   "total_tokens")}
    assert run["usage"]["llm_calls"] == len(calls) == 3
    assert usage["completion_tokens"] == sum(c["completion_tokens"] for c in calls)
    assert usage["prompt_tokens"] == sum(c["prompt_tokens"] for c in calls)


# -- 5. pin: a deadline during the planner's call ----------------------------------------------


@pytest.mark.parametrize("protocol", ["openai", "ollama"])
async def test_a_deadline_in_the_planners_call_is_told_and_stored_alike(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, protocol: str
) -> None:
    """PASSING pin. API.md: ``timeout`` is the run's deadline; ``run_timeout`` (504) when it
    runs out; ``/api/llm-calls`` outcomes include ``timed_out``. A ``plan_execute`` run whose
    planner call is still streaming its JSON at the deadline (5 s): told ``error``
    ``run_timeout`` then ``run.finished`` ``timed_out``; stored the same (run ``timed_out``
    with the same error, no ``plan`` event, the reply empty and not complete); the planner's
    call recorded ``timed_out`` at the deadline, its chunks counted as estimated tokens in
    the usage told."""
    sim = Simulator(strict_models=False)
    sim.script(Reply(text=PLAN, interval=1.0))
    got = await _run_on_sim(tmp_path, sim, {"content": "compute 6*7 and explain",
                                            "agent": "plan_execute", "timeout": 5.0},
                            protocol=protocol)
    events, run = got["events"], got["run"]
    assert [e.type for e in events] == ["run.started", "error", "run.finished"]
    assert events[1].data["type"] == "run_timeout"
    end = events[-1].data
    assert (end["status"], end["error"], end["content"]) == ("timed_out", run.error, "")
    assert run.status == "timed_out"
    assert (got["reply"].content, got["reply"].status) == ("", MessageStatus.cancelled)
    (call,) = got["calls"]
    assert call.outcome.value == "timed_out"
    _usage_vs_calls(got)
