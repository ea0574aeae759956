"""A review of backend fleets and ``--workers N`` (2026-12-04): each test failed before its fix
(see its comment). Real processes, real signals, real sockets on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import trio

from service.settings import Settings
from service.sim import Reply, Simulator

from ..backend_helpers import killable
from ..servers import running_server
from .test_workers import _children
from .test_workers_faults import (
    _reap,
    _samples,
    _serving_pid,
    _start,
    _stop,
)

GUARD = 60







async def _pinned_clients(url: str, pids: set[int]) -> dict[int, httpx.AsyncClient]:
    """A client on each worker: one connection, kept however long it idles (httpx closes an
    idle one after 5 s by default, and its next connection may land on another worker)."""
    pinned: dict[int, httpx.AsyncClient] = {}
    for _ in range(200):
        if set(pinned) == pids:
            break
        http = httpx.AsyncClient(base_url=url, timeout=GUARD, limits=httpx.Limits(
            max_connections=1, max_keepalive_connections=1, keepalive_expiry=None))
        pid = _serving_pid(await http.get("/healthz"), pids)
        if pid is None or pid in pinned:
            await http.aclose()
        else:
            pinned[pid] = http
    assert set(pinned) == pids, (pinned, pids)
    return pinned


async def _get_on(pinned: dict[int, httpx.AsyncClient], pid: int, path: str) -> httpx.Response:
    """GET ``path`` on worker ``pid`` (checked: served by that very process)."""
    r = await pinned[pid].get(path)
    assert _serving_pid(r, set(pinned)) == pid
    return r


async def _backends(http: httpx.AsyncClient) -> dict[str, dict]:
    r = await http.get("/api/backends")
    assert r.status_code == 200, r.text
    return {b["name"]: b for b in r.json()["data"]}


async def _backends_on(pinned: dict[int, httpx.AsyncClient], pid: int) -> dict[str, dict]:
    r = await _get_on(pinned, pid, "/api/backends")
    return {b["name"]: b for b in r.json()["data"]}


# -- fleets -----------------------------------------------------------------------------------


async def test_a_model_whose_only_server_is_down_is_503_not_model_not_found(
    settings: Settings,
) -> None:
    # "big" is served by one server of the fleet only (its inventory says so, /api/backends
    # lists it). That server goes down. The first call tries it: 503, right. From then on
    # the router skips it (known not ready for SERVICE_HEALTH_TTL, or cooling down), keeps
    # only the servers "known to serve" the model among the usable ones, finds none, and
    # falls back to every *usable* server - the ones that do not have the model - whose 404
    # is passed on: 404 model_not_found, a permanent error an OpenAI client does not retry,
    # for a model the fleet does serve and whose server is only down (the rule "nobody
    # usable: everyone" is applied to the whole fleet, not to the model's servers).
    big = Simulator(("big",), default=Reply(tokens=3))
    small = Simulator(("small",), default=Reply(tokens=3))
    async with killable(big, small) as scopes:
        conf = settings.model_copy(update={
            "backend": "llamacpp", "llamacpp_url": f"{big.url},{small.url}",
            "health_ttl": 60.0})
        async with running_server(conf, from_settings=True) as server, server.client() as c:
            body = {"model": "big", "messages": [{"role": "user", "content": "hi"}]}
            with trio.fail_after(GUARD):
                assert (await c.post("/v1/chat/completions", json=body)).status_code == 200
                scopes[0].cancel()  # the only server of "big" goes down
                while True:  # until its port refuses
                    try:
                        await (await trio.open_tcp_stream("127.0.0.1", big.port)).aclose()
                    except OSError:
                        break
                    await trio.sleep(0.05)
                statuses = []
                for _ in range(3):
                    r = await c.post("/v1/chat/completions", json=body)
                    statuses.append((r.status_code, r.json()["error"]["type"]))
                listed = (await _backends(c))["llamacpp-1"]["models"]
    assert listed == ["big"]  # the fleet knows which server serves it
    assert [s for s, _ in statuses] == [503, 503, 503], statuses


# -- /metrics across workers --------------------------------------------------------------------


@pytest.mark.slow
async def test_backend_up_is_not_a_stale_sibling_value(tmp_path: Path) -> None:
    # service_backend_up is "livemax" over the workers, and each worker sets its own value
    # only when it renders /metrics. A worker that rendered while a server was up keeps
    # saying 1 in its file for ever after: once every worker has the server down (not ready;
    # /api/backends on each says so), /metrics still says up=1 for it, whichever worker
    # answers it, until that sibling happens to render again.
    one = Simulator(("sim-model",), default=Reply(tokens=3), strict_models=False)
    two = Simulator(("sim-model",), default=Reply(tokens=3), strict_models=False)
    async with killable(one, two) as scopes:
        proc, url, log = await _start(tmp_path, f"{one.url},{two.url}", 2,
                                      SERVICE_HEALTH_TTL="600")
        pinned: dict[int, httpx.AsyncClient] = {}
        try:
            pinned = await _pinned_clients(url, _children(proc.pid))
            a, b = sorted(pinned)
            for pid in (a, b):  # both render while llamacpp-1 is up
                text = (await _get_on(pinned, pid, "/metrics")).text
                assert _samples(text, "service_backend_up")['{backend="llamacpp-1"}'] == 1.0
            scopes[0].cancel()  # llamacpp-1 goes down
            views = {}
            with trio.fail_after(GUARD):
                for pid in (a, b):
                    while (await _backends_on(pinned, pid))["llamacpp-1"]["ready"]:  # noqa: ASYNC110 (another process)
                        await trio.sleep(0.2)
                    views[pid] = (await _backends_on(pinned, pid))["llamacpp-1"]["ready"]
            text = (await _get_on(pinned, a, "/metrics")).text
            up = _samples(text, "service_backend_up")['{backend="llamacpp-1"}']
            # Once the stale sibling renders too, both files say 0: what was shown was B's
            # old value, not anybody's state.
            text = (await _get_on(pinned, b, "/metrics")).text
            up_after_b = _samples(text, "service_backend_up")['{backend="llamacpp-1"}']
        finally:
            code = None
            with trio.move_on_after(2 * GUARD, shield=True):
                for http in pinned.values():
                    await http.aclose()
                code = await _stop(proc)
            _reap(proc)
        assert code == 0, (await trio.Path(log).read_text())[-3000:]
    assert views == {a: False, b: False}  # every worker has it down
    assert up_after_b == 0.0
    assert up == 0.0, "service_backend_up says 1 for a server every worker has down"


@pytest.mark.slow
async def test_backend_cooldown_seconds_counts_down_and_ends(tmp_path: Path) -> None:
    # service_backend_cooldown_seconds (livemax) is the time left, computed when a worker
    # renders /metrics and written to that worker's file. A worker that put a server in its
    # cool-down and rendered once leaves "29.x seconds" in its file: /metrics answered by a
    # sibling shows that same number, frozen, and still shows it after the cool-down ended in
    # every worker (/api/backends on each says cooldown null and calls go to it again).
    failing = Simulator(("sim-model",), default=Reply(status=500), strict_models=False)
    good = Simulator(("sim-model",), default=Reply(tokens=3), strict_models=False)
    async with killable(failing, good):
        proc, url, log = await _start(tmp_path, f"{failing.url},{good.url}", 2)
        pinned: dict[int, httpx.AsyncClient] = {}
        try:
            pinned = await _pinned_clients(url, _children(proc.pid))
            a, b = sorted(pinned)
            with trio.fail_after(GUARD):
                for _ in range(60):  # runs on worker a until llamacpp-1 cools down there
                    conv = (await pinned[a].post("/api/conversations", json={})).json()["id"]
                    r = await pinned[a].post(f"/api/conversations/{conv}/messages",
                                             json={"content": "hi"})
                    assert r.status_code == 200, r.text
                    assert _serving_pid(r, set(pinned)) == a
                    if (await _backends_on(pinned, a))["llamacpp-1"]["cooldown"] is not None:
                        break
            text = (await _get_on(pinned, a, "/metrics")).text
            shown_by_a = _samples(text, "service_backend_cooldown_seconds")[
                '{backend="llamacpp-1"}']
            assert shown_by_a > 20
            failing.default = Reply(tokens=3)  # it recovers
            began = time.monotonic()
            await trio.sleep(shown_by_a + 1.5)  # the cool-down is over in worker a
            views = {pid: (await _backends_on(pinned, pid))["llamacpp-1"]["cooldown"]
                     for pid in (a, b)}
            text = (await _get_on(pinned, b, "/metrics")).text
            shown_by_b = _samples(text, "service_backend_cooldown_seconds")[
                '{backend="llamacpp-1"}']
            waited = time.monotonic() - began
        finally:
            code = None
            with trio.move_on_after(2 * GUARD, shield=True):
                for http in pinned.values():
                    await http.aclose()
                code = await _stop(proc)
            _reap(proc)
        assert code == 0, (await trio.Path(log).read_text())[-3000:]
    assert views == {a: None, b: None}  # no worker has it cooling down
    assert shown_by_b <= max(0.0, shown_by_a - waited), (
        f"{shown_by_b:.1f}s of cool-down shown {waited:.0f}s after "
        f"{shown_by_a:.1f}s were left, with none left in any worker")


# -- --workers: supervision -----------------------------------------------------------------


@pytest.mark.slow
async def test_workers_that_cannot_start_again_do_not_leave_the_port_hanging(
    tmp_path: Path,
) -> None:
    # Both workers die (killed, the OOM killer) and their replacements cannot start (a bad
    # deploy on disk: here a tool module that no longer imports). The parent restarts them
    # for ever (0.5 s, doubling, up to 30 s between tries) and keeps the listening socket
    # open: the kernel accepts every connection into its backlog and nobody ever answers.
    # Clients and load balancers hang until their own timeouts instead of being refused, and
    # the parent never exits, so a process manager (Restart=on-failure) never sees a failure.
    (tmp_path / "review_tools.py").write_text("TOOLS = []\n")
    one = Simulator(("sim-model",), default=Reply(tokens=3), strict_models=False)
    async with killable(one):
        proc, url, log = await _start(tmp_path, one.url, 2, SERVICE_TOOLS="review_tools")
        outcome = "?"
        try:
            (tmp_path / "review_tools.py").write_text("raise RuntimeError('bad deploy')\n")
            with contextlib.suppress(FileNotFoundError):
                for f in (tmp_path / "__pycache__").iterdir():
                    f.unlink()
            for pid in _children(proc.pid):
                os.kill(pid, signal.SIGKILL)
            with trio.fail_after(GUARD):  # the replacements fail as they start
                while (await trio.Path(log).read_text()).count("bad deploy") < 4:  # noqa: ASYNC110
                    await trio.sleep(0.1)
            # Given time to give up (or to stop taking connections):
            with trio.move_on_after(20):
                await proc.wait()
            if proc.returncode is not None:
                outcome = f"parent exited {proc.returncode}"
            else:
                try:
                    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
                        outcome = f"answered {(await http.get('/healthz')).status_code}"
                except httpx.ConnectError:
                    outcome = "refused"
                except httpx.TimeoutException as exc:
                    outcome = f"hung ({type(exc).__name__})"
        finally:
            with trio.move_on_after(2 * GUARD, shield=True):
                await _stop(proc)
            _reap(proc)
    text = (await trio.Path(log).read_text())
    gave_up = outcome.startswith("parent exited ") and outcome != "parent exited 0"
    assert gave_up or outcome in ("refused", "answered 503"), (
        f"{outcome}; no worker serves and none can start\n{text[-1500:]}")


@pytest.mark.slow
async def test_sigterm_lets_the_workers_drain_as_long_as_the_setting_says(
    tmp_path: Path,
) -> None:
    # SERVICE_SHUTDOWN_DRAIN is the seconds runs in flight may finish at shutdown; one
    # process honours it (and bounds its whole shutdown by it plus the final writes' 45 s).
    # With --workers the parent gives its workers a fixed 60 s (workers._STOP_TIMEOUT), then
    # SIGKILLs them: a run that would end within the drain is cut (its client gets no
    # run.finished, the store keeps it "running" until some process closes it as
    # interrupted) and the parent exits 1. Here: drain 100 s, a run ending ~70 s after the
    # SIGTERM.
    sim = Simulator(("sim-model",), default=Reply(tokens=3, interval=35),
                    strict_models=False)
    async with killable(sim):
        proc, url, log = await _start(tmp_path, sim.url, 2, SERVICE_SHUTDOWN_DRAIN="100")
        buf = ""
        cut: str | None = None
        try:
            async with httpx.AsyncClient(base_url=url, timeout=2 * GUARD) as http:
                conv = (await http.post("/api/conversations", json={})).json()["id"]
                with trio.fail_after(3 * GUARD):
                    async with http.stream("POST", f"/api/conversations/{conv}/messages",
                                           json={"content": "go", "stream": True}) as r:
                        assert r.status_code == 200
                        try:
                            async for chunk in r.aiter_text():
                                if "event: token" in chunk and "event: token" not in buf:
                                    proc.send_signal(signal.SIGTERM)  # one token out
                                buf += chunk
                        except httpx.HTTPError as exc:
                            cut = f"{type(exc).__name__}: {exc}"
            with trio.move_on_after(2 * GUARD):
                await proc.wait()
            code = proc.returncode
        finally:
            _reap(proc)
    text = await trio.Path(log).read_text()
    assert cut is None, f"stream cut ({cut}) before its end:\n{buf[-600:]}\n{text[-1500:]}"
    assert '"status":"succeeded"' in buf.split("run.finished")[-1].replace(" ", ""), buf[-600:]
    assert code == 0, text[-1500:]
