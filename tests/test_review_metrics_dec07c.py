"""Review of ``GET /metrics`` (2026-12-07, pass c): each number checked against what the store
(``/api/runs/{id}``, ``/api/llm-calls``) and the client (its events) saw, on the real server on
127.0.0.1 with the simulated upstream (``tests/e2e.py``).

The tests named ``test_defect_*`` fail on the code as reviewed, each for the defect its
docstring names (what is wrong, what is right, the root cause); ``test_pin_*`` pass and pin
behaviour that holds (every kind of run end counted once, gauges back to 0, tokens and call
outcomes matching the stored LLM calls, a parseable exposition).
"""

from __future__ import annotations

import os
import signal
import sqlite3
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from service.settings import Settings
from service.sim import Reply, Simulator, open_simulator

from .e2e import GUARD, Env, Event, EventStream, e2e, read_events
from .operations.test_workers import _children, _start, _stop
from .operations.test_workers_faults import _pinned_clients, _reap

WORKERS_GUARD = 60  # seconds a wait on a worker process may take (a start included)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _samples(text: str) -> Samples:
    """Every sample of an exposition, parsed as Prometheus does (fails if it does not parse)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _by(samples: Samples, name: str, label: str) -> dict[str, float]:
    """{value of ``label``: sample} of one series name (labels other than ``label`` summed)."""
    out: dict[str, float] = {}
    for (n, labels), value in samples.items():
        if n == name:
            key = dict(labels).get(label, "")
            out[key] = out.get(key, 0.0) + value
    return out


def _total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


async def _metrics(client: httpx.AsyncClient) -> str:
    r = await client.get("/metrics")
    assert r.status_code == 200, r.text
    return r.text


async def _settled(client: httpx.AsyncClient) -> Samples:
    """/metrics once no run is in flight (a run's counter moves just before its gauge does)."""
    with trio.fail_after(GUARD):
        while True:
            samples = _samples(await _metrics(client))
            if _total(samples, "service_runs_in_flight") == 0:
                return samples
            await trio.sleep(0.05)


async def run_over(client: httpx.AsyncClient, run_id: str) -> dict[str, Any]:
    """The run's stored record once it is over (neither ``queued`` nor ``running``)."""
    with trio.fail_after(WORKERS_GUARD):
        while True:
            run: dict[str, Any] = (await client.get(f"/api/runs/{run_id}")).json()
            if run["status"] not in ("queued", "running"):
                return run
            await trio.sleep(0.05)


def _run_id(events: list[Event]) -> str:
    assert events, events
    assert events[0].type == "run.started", events
    return str(events[0].data["run_id"])


def _has(kind: str) -> Any:
    return lambda events: any(e.type == kind for e in events)


# -- 1. tool calls past the parallel limit: told as tool calls, counted nowhere -----------------


async def test_defect_tool_calls_past_the_parallel_limit_are_not_counted(
    settings: Settings,
) -> None:
    """A model asks for 17 native tool calls in one step (``PARALLEL_TOOL_CALLS`` is 16). The
    client is told 17 ``tool.call`` events, each with its ``tool.result`` (the 17th: an error,
    "not run: at most 16 tool calls in one step"), and the store keeps all 34 events, but
    ``service_tool_calls_total`` counts 16: the 17th call exists in every record of the run
    and in no metric, under no outcome.

    Right: one count per ``tool.call`` told, its outcome matching its ``tool.result`` (this
    one refused, e.g. outcome ``"refused"`` or ``"error"``).

    Root cause: service/agents/base.py ``AgentContext.call_tools_parallel`` emits the
    ``tool.call``/``tool.result`` of the calls past the limit itself, without the
    ``self.metrics.tool_calls.labels(...).inc()`` that ``call_tool`` does for every other
    call."""
    calls = tuple({"name": "calculator", "arguments": {"expression": f"{i} + 1"}}
                  for i in range(17))
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(text="", tool_calls=calls), Reply(text="done"))
        conv = await env.conversation()
        with trio.fail_after(GUARD):
            async with env.post_stream(conv, "add them", agent="react") as r:
                events = await read_events(r)
        samples = await _settled(env.client)
    assert events[-1].type == "run.finished", events[-1]
    told = [e for e in events if e.type == "tool.call"]
    results = [e for e in events if e.type == "tool.result"]
    assert len(told) == len(results) == 17
    counted = _total(samples, "service_tool_calls_total")
    assert counted == len(told), (counted, _by(samples, "service_tool_calls_total", "outcome"))


# -- 2. TTFT of a streamed native tool call: observed at the end of the call -------------------


async def test_defect_ttft_of_a_streamed_tool_call_is_taken_at_the_end_of_the_call(
    settings: Settings,
) -> None:
    """A llama.cpp (OpenAI-compatible) server answers a ReAct step with a native tool call and
    no text: its first delta (the call's id and name) comes 0.2 s after the headers, then the
    arguments stream in four more deltas, 0.4 s apart. ``service_llm_ttft_seconds`` (and the
    call's ``ttft`` in ``/api/llm-calls``) observes about 1.4 s, the call's whole duration,
    not the 0.2 s it took for the model's first token. Every tool-calling step of a ReAct run
    on llama.cpp (every step but the last) is counted as if nothing had been generated until
    the end: a TTFT histogram that moves with the length of the tool arguments, not with the
    prompt processing it is meant to show.

    Right: the first token of a call is its first generated output, text, thinking or a tool
    call delta; here ``ttft`` is at least 1.6 s (four 0.4 s gaps) shorter than the duration.

    Root cause: service/backends/openai_compat.py accumulates tool-call deltas
    (``_add_call_delta``, which only sets ``_call_progress``) and yields them in the final
    chunk (``_final``); the interceptor (service/backends/interceptor.py ``_Call.seen``) sets
    ``first_token_at`` on the first chunk carrying text, thinking, tool_calls or done, so a
    tool-call-only answer's first token is its done chunk."""
    args = {"expression": "1 + 1 + 1 + 1 + 1 + 1 + 1 + 1"}
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(
            Reply(text="", tool_calls=({"name": "calculator", "arguments": args},),
                  first_delay=0.2, interval=0.4),
            Reply(text="eight"),
        )
        conv = await env.conversation()
        with trio.fail_after(GUARD):
            async with env.post_stream(conv, "add", agent="react") as r:
                events = await read_events(r)
        run_id = _run_id(events)
        calls = await env.llm_calls(run_id)
        samples = await _settled(env.client)
    assert [e.type for e in events if e.type.startswith("tool.")] == ["tool.call", "tool.result"]
    assert len(env.sim.streams) == 2, env.sim.streams
    assert env.sim.streams[0].chunks_sent >= 5, env.sim.streams  # the id/name, then arguments
    assert len(calls) == 2, calls
    tool_step = min(calls, key=lambda c: c["started_at"])  # the call that streamed the tool call
    # The argument deltas came at least 4 x 0.4 s after the first one: whatever the machine's
    # speed, a first token taken at the first delta is over a second before the call's end.
    assert tool_step["ttft"] <= tool_step["duration"] - 1.0, tool_step
    ttft = _total(samples, "service_llm_ttft_seconds_sum")
    whole = _total(samples, "service_llm_call_seconds_sum")
    assert ttft <= whole - 1.0, (ttft, whole)


# -- 3. a store read that fails: no latency observed ------------------------------------------


async def test_defect_a_failed_store_read_is_not_observed(settings: Settings) -> None:
    """A store read that fails leaves no trace in ``service_store_seconds``: here a run whose
    stored ``usage`` does not decode (a rotted byte, a case operations.md names): ``GET
    /api/runs/{id}`` answers 500 ``store_error`` after reading the row, and the ``get_run``
    histogram's count does not move. A failing write is observed (``_write`` observes before
    raising; the PostgreSQL lease write says "a failed one too (those matter most)"), a
    failing read never: on PostgreSQL a read cut by ``statement_timeout`` after 30 s, or a
    pool that gives no connection, is exactly the latency an operator needs and is missing.

    Right: every read observed, failed or not (as writes are), e.g. in a ``finally``.

    Root cause: service/store/sqlite.py ``SQLiteStore._read`` (and
    service/store/postgres.py ``PostgresStore._read``) call ``store_latency...observe`` after
    the read returned, so any exception skips it."""
    async with e2e(settings, "llamacpp") as env:
        conv = await env.conversation()
        r = await env.client.post(f"/api/conversations/{conv}/messages", json={"content": "hi"})
        assert r.status_code == 200, r.text
        run_id = r.json()["run"]["id"]
        await run_over(env.client, run_id)
        db = sqlite3.connect(settings.db)
        try:
            db.execute("UPDATE runs SET usage = '{not json' WHERE id = ?", (run_id,))
            db.commit()
        finally:
            db.close()
        key = ("service_store_seconds_count", (("op", "get_run"),))
        before = _samples(await _metrics(env.client)).get(key, 0.0)
        r = await env.client.get(f"/api/runs/{run_id}")
        assert r.status_code == 500, r.text
        assert r.json()["error"]["type"] == "store_error", r.text
        after = _samples(await _metrics(env.client)).get(key, 0.0)
    assert after == before + 1, (before, after)


# -- 4. service_backend_in_flight counts calls waiting for a slot ------------------------------


async def test_defect_backend_in_flight_counts_calls_queued_for_a_slot(
    settings: Settings,
) -> None:
    """A fleet of two servers (a URL list), one slot each (``SERVICE_BACKEND_CONCURRENCY=1``),
    three streaming runs: two stream (one call open on each server: the upstream sees two
    streams), the third waits in the service's queue (its client was told ``queued``; nothing
    was sent upstream). ``service_backend_in_flight`` sums to 3 (2 on one server, whose one
    slot is taken): a call that is not open on any server is shown as open on one, and the
    gauge reads above the server's concurrency. operations.md defines the gauge as "LLM calls
    open on a backend server", and ``SERVICE_BACKEND_CONCURRENCY`` as "LLM calls in flight per
    backend (more wait in a queue)"; ``service_llm_queue_wait_seconds`` is where waiting shows.

    Right: the gauge counts calls open upstream (here 2, at most 1 per server); calls waiting
    for a slot are a separate number (a queued gauge, if one is wanted).

    Root cause: service/backends/auto.py ``AutoBackend.stream`` increments
    ``state.in_flight`` (which ``FleetBackend._in_flight_changed`` exports to the gauge) before
    ``backend.stream(request)``, whose interceptor then waits in its limiter's queue; the
    count covers the wait. (Routing reads the same count; a separate count of open calls, set
    once the interceptor holds its slot, would serve the gauge.)"""
    async with e2e(settings, "llamacpp", backend_concurrency=1) as upstream:
        upstream.sim.default = Reply(tokens=2000, interval=0.05)
        url = upstream.sim.url
        other = settings.model_copy(update={"db": Path(settings.db).with_name("fleet.db")})
        async with e2e(other, "llamacpp", backend_concurrency=1,
                       llamacpp_url=f"{url},{url}") as env, AsyncExitStack() as stack:
            seen: list[list[Event]] = []
            readers: list[EventStream] = []
            with trio.fail_after(GUARD):
                for wait_for in ("token", "token", "queued"):
                    conv = await env.conversation()
                    r = await stack.enter_async_context(env.post_stream(conv, "go"))
                    readers.append(EventStream(r))  # kept: a dropped reader closes its response
                    seen.append(await readers[-1].read(_has(wait_for)))
                open_upstream = [s for s in upstream.sim.streams if not s.closed.is_set()]
                samples = _samples(await _metrics(env.client))
                gauge = _by(samples, "service_backend_in_flight", "backend")
                queued = _by(samples, "service_backend_queued", "backend")
                members = (await env.client.get("/api/backends")).json()["data"]
    assert [_has("queued")(events) for events in seen] == [False, False, True]
    assert len(open_upstream) == 2, upstream.sim.streams
    assert sum(gauge.values()) == len(open_upstream), gauge
    assert max(gauge.values()) <= 1, gauge
    # (Fixed: the call waiting for a slot is shown as such, on the metric and /api/backends.)
    assert sum(queued.values()) == 1, queued
    assert sorted((m["in_flight"], m["queued"]) for m in members) == [(1, 0), (1, 1)], members


# -- pins: every kind of end counted once, gauges back to 0, numbers matching the store -------

_HANG_TOOL = '''
import trio
from service.tools.base import tool


@tool("zz_review_hang", "waits for ever", {"type": "object", "properties": {}})
async def zz_review_hang():
    await trio.sleep_forever()


TOOLS = [zz_review_hang]
'''


async def _client_leaves_and_queued_is_cancelled(env: Env) -> list[str]:
    """Run A streams (holding the one slot); run B waits for the slot and is cancelled there;
    then A's client leaves (A is cancelled: on_disconnect defaults to cancel)."""
    env.sim.script(Reply(tokens=2000, interval=0.05))
    with trio.fail_after(GUARD):
        async with env.post_stream(await env.conversation(), "a") as ra:
            stream_a = EventStream(ra)  # kept: a dropped reader closes its response
            a = await stream_a.read(_has("token"))
            async with env.post_stream(await env.conversation(), "b",
                                       on_disconnect="continue") as rb:
                stream_b = EventStream(rb)
                b = await stream_b.read(_has("queued"))
                r = await env.client.post(f"/api/runs/{_run_id(b)}/cancel")
                assert r.status_code == 202, r.text
                b += await stream_b.read()
    assert b[-1].data["status"] == "cancelled", b[-1]
    return [_run_id(a), _run_id(b)]


async def _tool_hangs_and_is_cancelled(env: Env) -> str:
    env.sim.script(Reply(text="", tool_calls=({"name": "zz_review_hang", "arguments": {}},)))
    with trio.fail_after(GUARD):
        async with env.post_stream(await env.conversation(), "hang", agent="react",
                                   on_disconnect="continue") as r:
            stream = EventStream(r)
            events = await stream.read(_has("tool.call"))
            assert (await env.client.post(f"/api/runs/{_run_id(events)}/cancel")
                    ).status_code == 202
            events += await stream.read()
    assert [e.type for e in events if e.type.startswith("tool.")] == ["tool.call",
                                                                      "tool.result"]
    return _run_id(events)


async def _to_the_end(env: Env, reply: Reply, **body: Any) -> str:
    env.sim.script(reply)
    with trio.fail_after(GUARD):
        async with env.post_stream(await env.conversation(), "x", **body) as r:
            events = await read_events(r)
    assert events[-1].type == "run.finished", events[-1]
    return _run_id(events)


async def test_pin_every_kind_of_end_is_counted_once_and_matches_the_store(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Client gone, cancel while queued for a slot, a hanging tool cancelled, the run's
    deadline, an upstream 500, a connection lost mid-answer, a success: ``service_runs_total``
    by status is the stored statuses, ``service_runs_in_flight`` is back to 0, LLM calls by
    outcome, tokens and TTFT observations are the stored LLM calls', tool calls by outcome are
    the tool events', and the exposition parses with one HELP and TYPE per family."""
    (tmp_path / "zz_review_hang_tool.py").write_text(_HANG_TOOL)
    monkeypatch.syspath_prepend(str(tmp_path))
    async with e2e(settings, "llamacpp", backend_concurrency=1,
                   tools=["zz_review_hang_tool"]) as env:
        runs = await _client_leaves_and_queued_is_cancelled(env)
        runs.append(await _tool_hangs_and_is_cancelled(env))
        runs.append(await _to_the_end(env, Reply(tokens=2000, interval=0.05), timeout=0.5))
        runs.append(await _to_the_end(env, Reply(status=500)))
        runs.append(await _to_the_end(env, Reply(tokens=10, die_after=3)))
        runs.append(await _to_the_end(env, Reply(text="fine")))
        stored = [(await run_over(env.client, run_id))["status"] for run_id in runs]
        calls = (await env.client.get("/api/llm-calls", params={"limit": 100})).json()["data"]
        text = await _metrics(env.client)
        samples = await _settled(env.client)
    assert stored == ["cancelled", "cancelled", "cancelled", "timed_out", "failed", "failed",
                      "succeeded"]
    assert _by(samples, "service_runs_total", "status") == dict(Counter(stored))
    assert _total(samples, "service_runs_in_flight") == 0
    assert _by(samples, "service_llm_calls_total", "outcome") == dict(
        Counter(c["outcome"] for c in calls))
    tokens = _by(samples, "service_llm_tokens_total", "kind")
    assert tokens.get("prompt", 0) == sum(c["prompt_tokens"] or 0 for c in calls)
    assert tokens.get("completion", 0) == sum(c["completion_tokens"] or 0 for c in calls)
    assert _total(samples, "service_llm_ttft_seconds_count") == sum(
        1 for c in calls if c["ttft"] is not None)
    tools = {(dict(labels)["tool"], dict(labels)["outcome"]): v
             for (n, labels), v in samples.items() if n == "service_tool_calls_total"}
    assert tools == {("zz_review_hang", "cancelled"): 1.0}
    for kind in ("HELP", "TYPE"):
        lines = [line.split()[2] for line in text.splitlines() if line.startswith(f"# {kind} ")]
        assert len(lines) == len(set(lines)), kind


# -- pin: --workers 2, a worker killed mid-run and replaced -----------------------------------


async def _run_on(http: httpx.AsyncClient) -> str:
    conv = (await http.post("/api/conversations", json={})).json()["id"]
    r = await http.post(f"/api/conversations/{conv}/messages", json={"content": "hi"})
    assert r.status_code == 200, r.text
    return str(r.json()["run"]["id"])


@pytest.mark.slow
async def test_pin_two_workers_sum_and_survive_a_worker_killed_mid_run(
    tmp_path: Path,
) -> None:
    """``--workers 2``: a run finished on each worker, then a worker SIGKILLed in the middle
    of a run, which a survivor (or the replacement) closes as failed. Whichever worker
    answers, /metrics has both workers' runs (the dead one's too: its counters survive its
    replacement), the closed run once under ``failed``, no run in flight, and LLM calls and
    tokens equal to the stored calls' (the killed call, never recorded, in neither)."""
    sim = Simulator(("sim-model",), default=Reply(tokens=5), strict_models=False)
    async with open_simulator(sim) as running:
        proc, url, log = await _start(tmp_path, running.url, 2)
        pinned: dict[int, httpx.AsyncClient] = {}
        scrapes: list[Samples] = []
        try:
            pinned = await _pinned_clients(url, _children(proc.pid))
            victim, survivor = sorted(pinned)
            for pid in (victim, survivor):
                await run_over(pinned[pid], await _run_on(pinned[pid]))
            sim.default = Reply(tokens=2000, interval=0.05)
            conv = (await pinned[victim].post("/api/conversations", json={})).json()["id"]
            with trio.fail_after(GUARD):
                async with pinned[victim].stream(
                        "POST", f"/api/conversations/{conv}/messages",
                        json={"content": "go", "stream": True,
                              "on_disconnect": "continue"}) as r:
                    events = await EventStream(r).read(_has("token"))
            killed = _run_id(events)
            await pinned.pop(victim).aclose()
            os.kill(victim, signal.SIGKILL)
            run = await run_over(pinned[survivor], killed)
            with trio.fail_after(WORKERS_GUARD):  # the replacement's start (a new interpreter)
                while (await trio.Path(log).read_text()).count(" up (pid") < 3:  # noqa: ASYNC110 (another process)
                    await trio.sleep(0.1)
            calls = (await pinned[survivor].get("/api/llm-calls",
                                                params={"limit": 100})).json()["data"]
            for _ in range(4):  # new connections: both workers answer some
                async with httpx.AsyncClient(base_url=url, timeout=GUARD) as http:
                    scrapes.append(await _settled(http))
        finally:
            with trio.move_on_after(2 * GUARD, shield=True):
                for http in pinned.values():
                    await http.aclose()
                await _stop(proc)
            _reap(proc)
    assert run["status"] == "failed", run
    for samples in scrapes:
        assert _by(samples, "service_runs_total", "status") == {"succeeded": 2, "failed": 1}
        assert _total(samples, "service_runs_in_flight") == 0
        assert _by(samples, "service_llm_calls_total", "outcome") == dict(
            Counter(c["outcome"] for c in calls))
        tokens = _by(samples, "service_llm_tokens_total", "kind")
        assert tokens.get("completion", 0) == sum(c["completion_tokens"] or 0 for c in calls)
        assert tokens.get("prompt", 0) == sum(c["prompt_tokens"] or 0 for c in calls)
