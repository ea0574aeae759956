"""A review of e029c25 (the router keeps a named model to its servers; gauges kept fresh; the
worker pool's give-up rule and its kill bound). Each test failed on e029c25 (and passed on
9b36272) before its fix. Real processes, real sockets on 127.0.0.1."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from service.sim import Reply, Simulator

from .backend_helpers import killable, until_refused
from .operations.test_workers_faults import _env, _reap, _spawn, _start
from .servers import running_server

GUARD = 60





async def _calls(c: httpx.AsyncClient, body: dict[str, Any], n: int) -> list[tuple[int, str]]:
    out = []
    for _ in range(n):
        r = await c.post("/v1/chat/completions", json=body)
        data = r.json()
        out.append((r.status_code, data.get("model") or data.get("error", {}).get("type")))
    return out


# -- 1. route: auto's llama.cpp tier no longer serves while the model's Ollama is down -----


async def test_auto_llamacpp_tier_serves_ollamas_model_while_ollama_is_down(
    settings: Any,
) -> None:
    # SERVICE_BACKEND=auto: Ollama (priority 0) lists "llama3:8b"; an external llama.cpp
    # server (priority 1) answers any model name with its one model (docs/architecture.md:
    # "llama.cpp's server answers any `model` name with its one model: ... an external
    # llama.cpp server still answers them, and the response's `model` says which answered";
    # "a lower tier is a fallback"). The simulator does so with strict_models=False. Before
    # e029c25 a call for Ollama's model failed over to llama.cpp once Ollama was known down;
    # route() now keeps the call to "the model's servers, up or not": 503 for every call for
    # as long as Ollama is down, with the llama.cpp tier idle.
    ollama = Simulator(("llama3:8b",), default=Reply(tokens=3))
    llamacpp = Simulator(("model.gguf",), default=Reply(tokens=3), strict_models=False)
    async with killable(ollama, llamacpp) as scopes:
        conf = settings.model_copy(update={
            "backend": "auto", "ollama_url": ollama.url, "llamacpp_url": llamacpp.url,
            "health_ttl": 60.0})
        async with running_server(conf, from_settings=True) as srv, srv.client() as c:
            body = {"model": "llama3:8b", "messages": [{"role": "user", "content": "hi"}]}
            with trio.fail_after(GUARD):
                assert (await c.post("/v1/chat/completions", json=body)).status_code == 200
                scopes[0].cancel()
                await until_refused(ollama.port)
                outcomes = await _calls(c, body, 3)
    assert [s for s, _ in outcomes[1:]] == [200, 200], outcomes


# -- 2. workers: the kill bound is never set once the pool stopped itself ---------------------

_SLOT_1_FAILS = """\
import multiprocessing, time
if multiprocessing.current_process().name == "service-worker-1":
    time.sleep(2)
    raise RuntimeError("worker 1 cannot start (review)")
TOOLS = []
"""


@pytest.mark.slow
async def test_sigterm_still_bounds_the_stop_after_a_failed_start(tmp_path: Path) -> None:
    # Worker 1's first start fails: the pool stops itself (pool.stop(): stopping = True, no
    # deadline) and waits for worker 0, which does not exit (here: frozen with SIGSTOP; in
    # life a worker stuck in a thread it cannot abandon - a SQLite call on a stalled disk - or
    # in D state). The operator (or systemd) sends SIGTERM: on_signal now sets the kill
    # deadline only `if not pool.stopping`, and the pool's own stop already set stopping, so
    # no deadline is ever set and the parent waits for ever (before: killed after 60 s,
    # exit 1). The new give-up rule stops the pool the same way.
    (tmp_path / "review_tools.py").write_text(_SLOT_1_FAILS)
    bound = 1 + 3 * 15 + 10 + 5 + 10  # _stop_timeout: drain 1, finals, close, graceful 5, margin
    proc, log = await _spawn(tmp_path, _env(tmp_path, "http://127.0.0.1:9",
                                            SERVICE_TOOLS="review_tools"), 2)
    try:
        with trio.fail_after(GUARD):
            pattern = r"worker 0 up \(pid (\d+)\)"
            while not (m := re.search(pattern, await trio.Path(log).read_text())):  # noqa: ASYNC110
                await trio.sleep(0.05)
        os.kill(int(m.group(1)), signal.SIGSTOP)  # worker 0 will not exit
        with trio.fail_after(GUARD):
            while "worker 1 cannot start" not in await trio.Path(log).read_text():  # noqa: ASYNC110
                await trio.sleep(0.1)
        await trio.sleep(2)
        text = await trio.Path(log).read_text()
        assert proc.returncode is None, text[-3000:]
        proc.send_signal(signal.SIGTERM)
        began = time.monotonic()
        with trio.move_on_after(bound + 20):
            await proc.wait()
        took = time.monotonic() - began
        text = await trio.Path(log).read_text()
        assert proc.returncode is not None, (
            f"parent still running {took:.0f}s after SIGTERM (bound {bound}s)\n{text[-2000:]}")
        assert proc.returncode == 1, text[-2000:]
    finally:
        _reap(proc)


# -- 3. workers: the give-up rule counts a worker in its (good) restart as "none up" ----------

_SLOT_FAULTS = """\
import multiprocessing, pathlib, time
_here = pathlib.Path(__file__).parent
_name = multiprocessing.current_process().name
if _name == "service-worker-0" and (_here / "fail-0").exists():
    raise RuntimeError("worker 0 cannot start (review)")
if _name == "service-worker-1" and (_here / "slow-1").exists():
    time.sleep(25)  # a slow start, as an embedded model's load (180 s are allowed)
TOOLS = []
"""


@pytest.mark.slow
async def test_one_crash_of_the_last_worker_does_not_stop_a_service_it_restarts(
    tmp_path: Path,
) -> None:
    # Worker 0 has been failing to start for a while (5 times: its slot is at 5, and keeps
    # counting while worker 1 serves). Worker 1 then crashes once; its replacement starts
    # fine but takes a while (a model's load). Worker 0's next failure lands in that window:
    # "no worker is up" (self.up holds only listening slots), so the whole service stops,
    # exit 1, and kills worker 1's replacement that was about to serve. Nothing said that
    # "nothing can" serve: a worker was starting.
    (tmp_path / "review_tools.py").write_text(_SLOT_FAULTS)
    sim = Simulator(("sim-model",), default=Reply(tokens=3), strict_models=False)
    async with killable(sim):
        proc, url, log = await _start(tmp_path, sim.url, 2, SERVICE_TOOLS="review_tools")
        outcome = "?"
        try:
            text = await trio.Path(log).read_text()
            pids = {int(m.group(1)): int(m.group(2))
                    for m in re.finditer(r"worker (\d) up \(pid (\d+)\)", text)}
            (tmp_path / "fail-0").write_text("")
            os.kill(pids[0], signal.SIGKILL)
            # Its death, then 5 failed starts (9b36272 said "died" for those too).
            failed = re.compile(r"worker 0 \(pid \d+\) (?:could not start|died)")
            with trio.fail_after(GUARD):
                while len(failed.findall(await trio.Path(log).read_text())) < 6:  # noqa: ASYNC110
                    await trio.sleep(0.1)
            (tmp_path / "slow-1").write_text("")
            os.kill(pids[1], signal.SIGKILL)  # one crash of the worker that serves
            with trio.move_on_after(40):
                while True:
                    text = await trio.Path(log).read_text()
                    if proc.returncode is not None or text.count("worker 1 up (pid") >= 2:
                        break
                    await trio.sleep(0.2)
            with trio.move_on_after(1):
                await proc.wait()
            if proc.returncode is not None:
                outcome = f"parent exited {proc.returncode}"
            else:
                try:
                    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                        outcome = f"answered {(await http.get('/healthz')).status_code}"
                except httpx.HTTPError as exc:
                    outcome = f"{type(exc).__name__}"
        finally:
            _reap(proc)
        text = await trio.Path(log).read_text()
    assert outcome == "answered 200", f"{outcome}\n{text[-2500:]}"
