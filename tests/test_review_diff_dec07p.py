"""Review of dd83b5f (a plan step's call carries the conversation's system prompt), b01af2b
(``unique_calls``), d9c08a9 (``pid`` with ``--workers N``), 52ad772 (probe successes at
DEBUG), ce9457c (a refused batch's runs) and 4895bac (/v1 422s) -- 2026-12-07 (p).

Tests marked "Fixed (was: DEFECT)" failed before their fix (the same session); the others pin
behaviour found correct.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from service.settings import Settings, load_settings
from service.sim import Reply

from .e2e import GUARD, e2e
from .servers import ROOT, running_server
from .test_review_logs_dec07n import log_lines  # noqa: F401  (a fixture)

SLOW_GUARD = 30


def _plan(*steps: dict[str, Any]) -> str:
    return json.dumps({"steps": list(steps)})


def _calc(expr: str) -> Reply:
    return Reply(tool_calls=({"name": "calculator", "arguments": {"expression": expr}},))


# -- b01af2b: unique_calls ------------------------------------------------------------------


async def test_a_v1_historys_call_id_is_not_given_again_to_the_runs_own_call(
    settings: Settings,
) -> None:
    """Fixed (was: DEFECT): ``AgentContext.unique_calls`` (service/agents/base.py; ``_call_ids``
    starts empty) knows only the run's own calls, not the ids already in the messages it sends:
    a ``/v1`` ``agent: react`` request whose history holds an earlier turn's tool call
    (``call_sim_0`` -- llama.cpp, as the simulator, numbers each response's calls from 0, so the
    client's previous answer from this very service had that id) gets the run's first native
    call ``call_sim_0`` again. The model is then sent two assistant calls and two tool results
    under one id: the pairing the commit fixes for two turns of one run is broken for the
    history's turn and the run's first. Fix: seed ``_call_ids`` with the ids of
    ``ctx.history``'s tool calls (and its tool messages' ``tool_call_id``) when the context is
    made (or in ``unique_calls``: ``self._call_ids |= ids in self.history``)."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(_calc("2+2"), "4 and 4")
        with trio.fail_after(GUARD):
            r = await env.client.post("/v1/chat/completions", json={
                "model": "sim-model", "agent": "react", "messages": [
                    {"role": "user", "content": "1+1?"},
                    {"role": "assistant", "content": None, "tool_calls": [{
                        "id": "call_sim_0", "type": "function",
                        "function": {"name": "calculator",
                                     "arguments": '{"expression": "1+1"}'}}]},
                    {"role": "tool", "tool_call_id": "call_sim_0", "content": "2"},
                    {"role": "assistant", "content": "2"},
                    {"role": "user", "content": "and 2+2?"}]})
        assert r.status_code == 200, r.text
        last = env.sim.streams[1].body["messages"]
        asked = [c["id"] for m in last if m["role"] == "assistant"
                 for c in m.get("tool_calls") or ()]
        answered = [m["tool_call_id"] for m in last if m["role"] == "tool"]
        assert len(asked) == 2, last
        assert answered == asked, last
        assert len(set(asked)) == 2, f"one id for two calls sent to the model: {asked}"


async def test_parallel_plan_steps_native_calls_get_unique_ids(settings: Settings) -> None:
    """Pinned (correct): two parallel plan steps (no tool named: each a small ReAct loop)
    whose servers both number their call ``call_sim_0``: the run's ``tool.call`` ids differ,
    each ``tool.result`` has its call's id, and each step's model is sent back its call
    under the id its result names."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(
            _plan({"id": 1, "task": "add one"}, {"id": 2, "task": "add two"}),
            _calc("1+1"), _calc("2+2"), "two", "four", "done")
        conv = await env.conversation(agent="plan_execute")
        with trio.fail_after(GUARD):
            r = await env.client.post(f"/api/conversations/{conv}/messages",
                                      json={"content": "add"})
        assert r.status_code == 200, r.text
        assert r.json()["run"]["status"] == "succeeded", r.text
        run = r.json()["run"]["id"]
        from .streams import parse_sse

        ev = await env.client.get(f"/api/runs/{run}/events")
        frames = [(f["event"], f["data"]) for f in parse_sse(ev.text)]
        calls = [d["call_id"] for t, d in frames if t == "tool.call"]
        results = [d["call_id"] for t, d in frames if t == "tool.result"]
        assert len(calls) == 2, frames
        assert len(set(calls)) == 2, frames
        assert sorted(results) == sorted(calls)
        for s in env.sim.streams:
            msgs = s.body["messages"]
            asked = [c["id"] for m in msgs if m["role"] == "assistant"
                     for c in m.get("tool_calls") or ()]
            answered = [m["tool_call_id"] for m in msgs if m["role"] == "tool"]
            assert asked == answered, msgs


# -- dd83b5f: a step's system prompt --------------------------------------------------------


async def test_a_v1_plan_step_gets_the_leading_system_only_once_and_not_a_middle_one(
    settings: Settings,
) -> None:
    """Pinned (correct): a ``/v1`` plan_execute request with two leading system messages and
    one in the middle: the step's call is ``[system, user]``, its one system message holding
    the step agent's prompt and the two leading ones once each; the middle one is not a
    step's (it is the history's, in its place, for the plan and the synthesis)."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(_plan({"id": 1, "task": "say hello"}),
                       "Thought: easy\nFinal Answer: bonjour", "bonjour")
        with trio.fail_after(GUARD):
            r = await env.client.post("/v1/chat/completions", json={
                "model": "sim-model", "agent": "plan_execute", "messages": [
                    {"role": "system", "content": "LEAD-ONE"},
                    {"role": "developer", "content": "LEAD-TWO"},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                    {"role": "system", "content": "MIDDLE"},
                    {"role": "user", "content": "say hello"}]})
        assert r.status_code == 200, r.text
        step = env.sim.streams[1].body["messages"]
        assert [m["role"] for m in step] == ["system", "user"], step
        system = step[0]["content"]
        assert system.count("LEAD-ONE") == 1, system
        assert system.count("LEAD-TWO") == 1, system
        assert "MIDDLE" not in json.dumps(step), step


# -- d9c08a9: pid ---------------------------------------------------------------------------


def test_the_workers_parents_first_lines_name_its_pid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """Fixed (was: DEFECT): docs/operations.md: "With ``--workers N`` each line also names its
    process". service/server.py ``main`` configures logging without ``pid`` first (line ~395),
    logs the unknown ``SERVICE_*`` variables' warnings (the line an operator most needs at
    start) and only then, once it knows ``workers > 1`` (line ~423), configures it again with
    ``pid=True``: those warnings have no ``pid``, unlike every line after. Fix: read the config
    and the worker count first and configure logging once, with ``pid=workers > 1``, before the
    warnings (or log them after the second ``configure_logging``)."""
    for k in [k for k in os.environ if k.startswith("SERVICE_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("SERVICE_DB", str(tmp_path / "s.db"))
    monkeypatch.setenv("SERVICE_LOG_FORMAT", "json")
    monkeypatch.setenv("SERVICE_API_KEY", "meant-as-the-key")  # a typo of SERVICE_API_KEYS
    monkeypatch.setattr("service.workers.serve_workers", lambda *a: 0)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    from service.server import main

    try:
        assert main(["--workers", "2", "--bind", "127.0.0.1:0"]) == 0
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    typo = [x for x in lines if "SERVICE_API_KEY" in str(x["msg"])]
    assert typo, lines
    assert all(x.get("pid") == os.getpid() for x in typo), typo


@pytest.mark.slow
async def test_hypercorn_cli_workers_lines_name_their_pid(tmp_path: Path) -> None:
    """Fixed (was: DEFECT): under ``hypercorn --config hypercorn.toml -w 2 service.app:app`` (the
    other entry point docs/operations.md documents, with ``workers`` > 1 discussed under
    "Metrics") the two workers write to one stream as ``--workers 2``'s do, but no line names
    its process: service/app.py ``_app_from_env`` calls ``configure_logging`` without ``pid``.
    Fix: in ``_app_from_env`` pass ``pid=multiprocessing.parent_process() is not None``
    (hypercorn's workers are spawned children; its ``workers = 0`` single process is not), or
    always name the pid there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    env.update({"SERVICE_DB": str(tmp_path / "s.db"), "SERVICE_LOG_FORMAT": "json",
                "SERVICE_BACKEND": "llamacpp", "SERVICE_LLAMACPP_URL": "http://127.0.0.1:9"})
    log = tmp_path / "h.log"
    with log.open("wb") as sink:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "hypercorn", "--config", str(ROOT / "hypercorn.toml"),
             "-w", "2", "--bind", "127.0.0.1:0", "service.app:app"],
            cwd=ROOT, env=env, stdout=sink, stderr=sink)
    try:
        with trio.fail_after(SLOW_GUARD):
            while len(re.findall(rb"Running on http://127\.0\.0\.1:\d+",
                                 await trio.Path(log).read_bytes())) < 2:
                assert proc.returncode is None, await trio.Path(log).read_text()
                await trio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(SLOW_GUARD):
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.CancelScope(shield=True), trio.move_on_after(SLOW_GUARD):
                await proc.wait()
    text = await trio.Path(log).read_text()
    lines = [json.loads(x) for x in text.splitlines() if x.startswith("{")]
    running = [x for x in lines if "Running on" in str(x["msg"])]
    assert len(running) == 2, text
    assert all("pid" in x for x in running), running


# -- 52ad772: quiet access lines ------------------------------------------------------------


async def test_a_refused_metrics_scrape_and_probe_stay_info(
        tmp_path: Path, log_lines: list[dict[str, object]],  # noqa: F811
) -> None:
    """Pinned (correct): with keys, a ``/metrics`` scrape without one (401) is an INFO
    access line; its success with the key is not; ``/healthz`` succeeds quietly."""
    settings = load_settings(db=tmp_path / "s.db", backend="ollama",
                             ollama_url="http://127.0.0.1:1", api_keys="k1")
    async with running_server(settings, from_settings=True) as srv, srv.client() as client:
        assert (await client.get("/metrics")).status_code == 401
        ok = await client.get("/metrics", headers={"Authorization": "Bearer k1"})
        assert ok.status_code == 200
        await client.get("/healthz")
    access = [str(x["msg"]) for x in log_lines if x["logger"] == "service.app"
              and str(x["msg"]).startswith("GET ")]
    assert access == ["GET /metrics 401"], access


# -- 4895bac: the /v1 422s ------------------------------------------------------------------


async def test_an_ollama_style_tool_message_naming_its_tool_is_not_refused(
    settings: Settings,
) -> None:
    """Fixed (was: DEFECT): service/api/openai_request.py ``ChatMessageIn._answers_a_call`` refuses
    (422) every ``tool`` message without ``tool_call_id``, also one that names its tool
    (``name``): the shape Ollama's own clients send (Ollama's calls have no ids) and which
    worked until this commit -- service/backends/ollama.py ``ollama_messages`` was written to
    pair exactly it ("its own ``name``, or the name of the call its ``tool_call_id`` answers"),
    and is now unreachable from ``/v1``. A client pointed at this service instead of Ollama
    broke on its second turn. Fix: refuse a tool message only when it has neither
    ``tool_call_id`` nor ``name`` (or only on an OpenAI-compatible backend)."""
    async with e2e(settings, "ollama") as env:
        env.sim.script("4")
        with trio.fail_after(GUARD):
            r = await env.client.post("/v1/chat/completions", json={
                "model": "sim-model", "messages": [
                    {"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": "", "tool_calls": [{
                        "type": "function", "id": "c1",
                        "function": {"name": "calc", "arguments": "{}"}}]},
                    {"role": "tool", "name": "calc", "content": "4"}]})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "user", "content": "x"}], "seed": 2**63 - 1},
    {"messages": [{"role": "user", "content": "x"}], "seed": -(2**63)},
    {"messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "c1", "type": "function", "function": {"name": "calc", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "4"}]},
], ids=["seed-max", "seed-min", "tool-with-id"])
async def test_what_openai_takes_is_still_taken(settings: Settings, body: dict[str, Any]) -> None:
    """Pinned (correct): the int64 bounds themselves and a tool message with its id (the
    OpenAI SDK's and LangChain's shape) are answered 200."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.script("ok")
        with trio.fail_after(GUARD):
            r = await env.client.post("/v1/chat/completions",
                                      json={"model": "sim-model", **body})
        assert r.status_code == 200, r.text


async def test_openapi_documents_the_seeds_bounds(settings: Settings) -> None:
    """Pinned (correct): the OpenAPI document's request schema gives ``seed`` its int64
    bounds, as the 422 enforces."""
    async with running_server(settings) as srv, srv.client() as client:
        spec = (await client.get("/openapi.json")).json()
    text = json.dumps(spec)
    assert "9223372036854775807" in text, "seed's maximum is not documented"
