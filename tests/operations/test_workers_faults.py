"""Faults of the multi-process operations found by a review (each test failed before its fix):
``--workers N`` (a stop during the start, a port in use or shared, a parent killed), instances
sharing a store (an owner alive with its lease run out), /metrics across workers. Real
processes, real signals, real sockets on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio

from service.sim import Reply, Simulator, open_simulator

from ..servers import ROOT, pid_serving_port
from .test_workers import _children

GUARD = 60


def _env(tmp_path: Path, sim_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    env.update({"SERVICE_DB": str(tmp_path / "s.db"), "SERVICE_BACKEND": "llamacpp",
                "SERVICE_LLAMACPP_URL": sim_url, "SERVICE_SHUTDOWN_DRAIN": "1", **extra})
    return env


async def _spawn(tmp_path: Path, env: dict[str, str], workers: int | None,
                 name: str = "service") -> tuple[trio.Process, Path]:
    log = tmp_path / f"{name}.log"
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    argv = [sys.executable, "-m", "service", "--bind", "127.0.0.1:0", "--config",
            str(ROOT / "hypercorn.toml")]
    if workers is not None:
        argv += ["--workers", str(workers)]
    try:
        proc = await trio.lowlevel.open_process(argv, cwd=tmp_path, env=env, stderr=out)
    finally:
        os.close(out)
    return proc, log


async def _wait_url(proc: trio.Process, log: Path, pattern: str) -> str:
    with trio.fail_after(GUARD):
        while True:
            text = await trio.Path(log).read_text()
            m = re.search(pattern, text)
            if m:
                return m.group(1)
            assert proc.returncode is None, text
            await trio.sleep(0.05)


async def _start(tmp_path: Path, sim_url: str, workers: int,
                 **extra: str) -> tuple[trio.Process, str, Path]:
    proc, log = await _spawn(tmp_path, _env(tmp_path, sim_url, **extra), workers)
    url = await _wait_url(proc, log, r"Running on (http://127\.0\.0\.1:\d+) with")
    return proc, url, log


async def _stop(proc: trio.Process, bound: float = GUARD) -> int | None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    with trio.move_on_after(bound, shield=True):
        await proc.wait()
    return proc.returncode


def _alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` that still run (not zombies)."""
    out = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in (b"Z", b"X"):
            out.add(pid)
    return out


def _reap(proc: trio.Process) -> None:
    """Kill whatever the test left (the parent and its workers)."""
    for pid in _children(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if proc.returncode is None:
        proc.kill()


# -- --workers: signals ---------------------------------------------------------------------


@pytest.mark.slow
async def test_sigterm_while_the_first_worker_starts_stops_promptly_and_exits_0(
    tmp_path: Path,
) -> None:
    # The parent starts the slots one after the other (each once the one before listens). A
    # SIGTERM while worker 0 is still starting stops worker 0, but the loop goes on and starts
    # worker 1 after the stop, and nothing ever tells that one to stop: the parent waits out
    # its 60 s bound, kills it and exits 1.
    proc, log = await _spawn(tmp_path, _env(tmp_path, "http://127.0.0.1:9"), 2)
    try:
        with trio.fail_after(GUARD):
            while not _children(proc.pid):  # noqa: ASYNC110 (another process)
                await trio.sleep(0.01)
        assert "worker 0 up" not in await trio.Path(log).read_text()
        proc.send_signal(signal.SIGTERM)  # worker 0 is still importing / starting
        began = time.monotonic()
        with trio.move_on_after(20, shield=True):
            await proc.wait()
        took = time.monotonic() - began
        text = await trio.Path(log).read_text()
        leftover = _children(proc.pid)
        assert proc.returncode is not None, f"parent still running after {took:.0f}s; " \
            f"workers {leftover}\n{text[-3000:]}"
        assert proc.returncode == 0, text[-3000:]
        assert took < 30, text[-3000:]
    finally:
        _reap(proc)


@pytest.mark.parametrize("after", [0.0, 0.05, 0.2, 0.5])
async def test_sigterm_at_any_moment_of_the_start_ends_the_service_with_nothing_left(
    tmp_path: Path, after: float,
) -> None:
    # Before the parent has imported trio it has no handler of its own: a SIGTERM then ends it
    # as the default does (-15, which systemd counts as a clean stop); it has started nothing.
    # From then on it drains what it started and exits 0. Either way nothing is left running.
    proc, log = await _spawn(tmp_path, _env(tmp_path, "http://127.0.0.1:9"), 2)
    seen: set[int] = set()
    try:
        with trio.move_on_after(after):
            while True:
                seen |= _children(proc.pid)
                await trio.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(GUARD, shield=True):
            while proc.returncode is None:
                seen |= _children(proc.pid)
                await trio.sleep(0.005)
        text = await trio.Path(log).read_text()
        assert proc.returncode in (0, -signal.SIGTERM), text[-3000:]
        with trio.fail_after(GUARD):
            while _alive(seen):  # noqa: ASYNC110 (other processes)
                await trio.sleep(0.05)
    finally:
        _reap(proc)


# -- /metrics across workers ----------------------------------------------------------------


async def _detached_run(http: httpx.AsyncClient) -> str:
    """A native run that goes on after its client leaves (on_disconnect: continue); its id
    once its first token is out."""
    conv = (await http.post("/api/conversations", json={})).json()["id"]
    buf = ""
    async with http.stream("POST", f"/api/conversations/{conv}/messages",
                           json={"content": "go", "stream": True,
                                 "on_disconnect": "continue"}) as r:
        assert r.status_code == 200
        async for chunk in r.aiter_text():
            buf += chunk
            if "event: token" in buf:
                break
    m = re.search(r'"run_id": ?"([^"]+)"', buf)
    assert m is not None, buf
    return m.group(1)


def _samples(text: str, name: str) -> dict[str, float]:
    """{labels: value} of one metric in a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, value = line.rpartition(" ")
            out[key[len(name):]] = float(value)
    return out


async def _metrics(url: str) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=GUARD) as http:  # a new connection
        r = await http.get("/metrics")
    assert r.status_code == 200
    return r.text


def _serving_pid(response: httpx.Response, pids: set[int]) -> int | None:
    """Which of ``pids`` holds the server end of the connection ``response`` came on."""
    client_port = response.extensions["network_stream"].get_extra_info("client_addr")[1]
    return pid_serving_port(client_port, pids)


async def _pinned_clients(url: str, pids: set[int]) -> dict[int, httpx.AsyncClient]:
    """A client (one kept-alive connection) on each worker: new connections until each has
    one (the kernel spreads them); the caller closes them."""
    pinned: dict[int, httpx.AsyncClient] = {}
    for _ in range(200):
        if set(pinned) == pids:
            break
        http = httpx.AsyncClient(base_url=url, timeout=GUARD,
                                 limits=httpx.Limits(max_connections=1))
        pid = _serving_pid(await http.get("/healthz"), pids)
        if pid is None or pid in pinned:
            await http.aclose()
        else:
            pinned[pid] = http
    assert set(pinned) == pids, (pinned, pids)
    return pinned


def _owner_pid(db: Path, run_id: str) -> int:
    conn = sqlite3.connect(db)
    try:
        (owner,) = conn.execute("SELECT process FROM runs WHERE id = ?", (run_id,)).fetchone()
    finally:
        conn.close()
    return int(owner.split(":")[0])


@pytest.mark.slow
async def test_backend_in_flight_covers_every_worker(tmp_path: Path) -> None:
    # The fleet's per-server gauges (service_backend_in_flight, livesum over the workers) are
    # set only when a worker routes a call (to the count before it) or renders /metrics (its
    # collectors): another worker's value is whatever it last set. /metrics answered by the
    # worker that does not hold the call says no call is open while one streams; once the
    # owner rendered, the other says one is open after it has ended.
    slow = Reply(tokens=400, interval=0.05)
    sim1 = Simulator(("sim-model",), default=slow, strict_models=False)
    sim2 = Simulator(("sim-model",), default=slow, strict_models=False)
    async with open_simulator(sim1) as one, open_simulator(sim2) as two:
        proc, url, log = await _start(tmp_path, f"{one.url},{two.url}", 2)
        pinned: dict[int, httpx.AsyncClient] = {}
        try:
            pinned = await _pinned_clients(url, _children(proc.pid))
            async with httpx.AsyncClient(base_url=url, timeout=GUARD) as http:
                run_id = await _detached_run(http)
            owner = _owner_pid(tmp_path / "s.db", run_id)
            (other,) = set(pinned) - {owner}

            async def calls(pid: int) -> tuple[float, float]:
                text = (await pinned[pid].get("/metrics")).text
                return (sum(_samples(text, "service_runs_in_flight").values()),
                        sum(_samples(text, "service_backend_in_flight").values()))

            during = [await calls(other), await calls(owner), await calls(other)]
            await pinned[other].post(f"/api/runs/{run_id}/cancel")
            with trio.fail_after(GUARD):
                while (await pinned[other].get(f"/api/runs/{run_id}")).json()["status"] in (  # noqa: ASYNC110 (another process)
                        "queued", "running"):
                    await trio.sleep(0.1)
            await trio.sleep(0.5)
            after = [await calls(other)]
        finally:
            code = None
            with trio.move_on_after(2 * GUARD, shield=True):
                for http in pinned.values():
                    await http.aclose()
                code = await _stop(proc)
            _reap(proc)
        assert code == 0, (await trio.Path(log).read_text())[-3000:]
    # (runs in flight, LLM calls open), whichever worker answers /metrics.
    assert (during, after) == ([(1, 1)] * 3, [(0, 0)])


@pytest.mark.slow
async def test_runs_closed_after_a_worker_dies_are_counted(tmp_path: Path) -> None:
    # A worker killed mid-run: its run is closed by a survivor (or its replacement) as
    # failed ("interrupted"), in the store; /metrics counts finished runs by status, but the
    # closing instance does not count the runs it closes, so that run is in no status.
    sim = Simulator(("sim-model",), default=Reply(tokens=400, interval=0.05),
                    strict_models=False)
    async with open_simulator(sim) as running:
        proc, url, log = await _start(tmp_path, running.url, 2)
        try:
            async with httpx.AsyncClient(base_url=url, timeout=GUARD) as http:
                run_id = await _detached_run(http)
                conn = sqlite3.connect(tmp_path / "s.db")
                try:
                    (owner,) = conn.execute("SELECT process FROM runs WHERE id = ?",
                                            (run_id,)).fetchone()
                finally:
                    conn.close()
                os.kill(int(owner.split(":")[0]), signal.SIGKILL)
                with trio.fail_after(GUARD):
                    while (await http.get(f"/api/runs/{run_id}")).json()["status"] in (  # noqa: ASYNC110 (another process)
                            "queued", "running"):
                        await trio.sleep(0.2)
                run = (await http.get(f"/api/runs/{run_id}")).json()
            text = await _metrics(url)
        finally:
            code = None
            with trio.move_on_after(2 * GUARD, shield=True):
                code = await _stop(proc)
            _reap(proc)
        assert code == 0, (await trio.Path(log).read_text())[-3000:]
    assert run["status"] == "failed"
    counted = _samples(text, "service_runs_total")
    assert counted.get('{status="failed"}') == 1.0, counted


# -- instances sharing a store: leases ------------------------------------------------------


@pytest.mark.slow
async def test_a_run_whose_owner_lease_expired_is_closed_by_a_sibling(tmp_path: Path) -> None:
    # A worker that is stopped (SIGSTOP) stops renewing its lease. Past the lease the contract
    # has the other instances close its runs, and a cancel asked elsewhere close the run at
    # once. Before, on one host owner_alive asked the PID "whatever its lease says": the PID
    # lived, so the run stayed "running" for ever, a cancel sent to the sibling answered 202
    # "running", and re-joins on the sibling never ended. (A running process is still judged
    # by its PID: a step of the wall clock, which SQLite's leases are in, must not kill it.)
    from service.store.ownership import LEASE

    sim = Simulator(("sim-model",), default=Reply(tokens=2000, interval=0.05),
                    strict_models=False)
    async with open_simulator(sim) as running:
        proc, url, log = await _start(tmp_path, running.url, 2)
        pinned: dict[int, httpx.AsyncClient] = {}
        owner = 0
        try:
            pinned = await _pinned_clients(url, _children(proc.pid))
            async with httpx.AsyncClient(base_url=url, timeout=GUARD) as http:
                run_id = await _detached_run(http)
            owner = _owner_pid(tmp_path / "s.db", run_id)
            (other,) = set(pinned) - {owner}
            await pinned[owner].aclose()
            os.kill(owner, signal.SIGSTOP)
            with trio.fail_after(GUARD):  # its lease runs out
                while True:
                    conn = sqlite3.connect(tmp_path / "s.db")
                    try:
                        (until,) = conn.execute(
                            "SELECT lease_until FROM instances WHERE pid = ?", (owner,)
                        ).fetchone()
                    finally:
                        conn.close()
                    if until < time.time() - 1:
                        break
                    await trio.sleep(0.5)
            # Past the lease, and past the survivors' recovery look (every 5 s).
            await trio.sleep(6)
            stored = (await pinned[other].get(f"/api/runs/{run_id}")).json()["status"]
            r = await pinned[other].post(f"/api/runs/{run_id}/cancel")
            cancel = (r.status_code, r.json()["status"])
        finally:
            if owner:
                os.kill(owner, signal.SIGCONT)
            code = None
            with trio.move_on_after(2 * GUARD, shield=True):
                for http in pinned.values():
                    await http.aclose()
                code = await _stop(proc)
            _reap(proc)
        assert code == 0, (await trio.Path(log).read_text())[-3000:]
    assert LEASE <= 15
    assert (stored, cancel) == ("failed", (202, "failed"))


# -- --workers: the listening socket and the parent's death ----------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
async def test_workers_on_a_port_in_use_say_so_in_one_line(tmp_path: Path) -> None:
    # One process says "service: cannot listen on ...: Address already in use" (exit 1);
    # with --workers the parent binds in serve_workers, outside that handling: a traceback.
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with trio.fail_after(GUARD):
            done = await trio.run_process(
                [sys.executable, "-m", "service", "--bind", f"127.0.0.1:{port}", "--workers",
                 "2", "--config", str(ROOT / "hypercorn.toml")],
                cwd=tmp_path, env=_env(tmp_path, "http://127.0.0.1:9"), capture_stderr=True,
                check=False)
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert "Traceback" not in err, err[-2000:]
    assert "cannot listen" in err, err[-2000:]


@pytest.mark.slow
async def test_a_second_service_cannot_share_the_port_of_one_with_workers(
    tmp_path: Path,
) -> None:
    # With ``workers = 2`` in hypercorn.toml, hypercorn's create_sockets sets SO_REUSEPORT
    # (made for its own workers, each binding its socket). The parent binds once and hands
    # the socket over, so the option is of no use, but it lets a second service - an old
    # copy still running, another database - bind the same port and take half the
    # connections, silently, where a single process is refused ("cannot listen").
    config = tmp_path / "hypercorn.toml"
    config.write_text((ROOT / "hypercorn.toml").read_text().replace("workers = 1",
                                                                    "workers = 2"))
    assert "workers = 2" in config.read_text()
    port = _free_port()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    argv = [sys.executable, "-m", "service", "--bind", f"127.0.0.1:{port}", "--config",
            str(config)]
    procs = []
    try:
        for name in ("a", "b"):
            log = tmp_path / f"{name}.log"
            out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                procs.append(await trio.lowlevel.open_process(
                    argv, cwd=tmp_path / name, env=_env(tmp_path / name, "http://127.0.0.1:9"),
                    stderr=out))
            finally:
                os.close(out)
            if name == "a":
                await _wait_url(procs[0], log, r"Running on (http://127\.0\.0\.1:\d+) with")
        second = procs[1]
        with trio.move_on_after(GUARD):
            while second.returncode is None:  # noqa: ASYNC110 (another process)
                if "with 2 workers" in (tmp_path / "b.log").read_text():
                    break
                await trio.sleep(0.1)
        text = (tmp_path / "b.log").read_text()
        code = second.returncode  # before the stop below
    finally:
        with trio.move_on_after(2 * GUARD, shield=True):
            for proc in procs:
                await _stop(proc)
        for proc in procs:
            _reap(proc)
    assert code == 1, f"a second service serves port {port}:\n{text[-1500:]}"


@pytest.mark.slow
async def test_workers_do_not_outlive_their_parent(tmp_path: Path) -> None:
    # The parent killed (SIGKILL, the OOM killer, a crash): nothing tells its workers. They
    # go on serving the port and holding the store, unsupervised (a death is not replaced, a
    # SIGTERM to the service's pid no longer reaches them), for ever.
    sim = Simulator(("sim-model",), default=Reply(tokens=5), strict_models=False)
    async with open_simulator(sim) as running:
        proc, url, _ = await _start(tmp_path, running.url, 2)
        workers = _children(proc.pid)
        try:
            proc.kill()
            await proc.wait()
            await trio.sleep(10)
            alive = _alive(workers)
            serving = None
            try:
                async with httpx.AsyncClient(base_url=url, timeout=5) as http:
                    serving = (await http.get("/healthz")).status_code
            except httpx.HTTPError:
                pass
        finally:
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert (alive, serving) == (set(), None), "workers left serving after the parent died"


async def spawn_with_site(tmp_path: Path, site_code: str,
                          mark_var: str) -> tuple[trio.Process, Path]:
    """``python -m service --workers 2`` in a session of its own (a Ctrl+C reaches its whole
    group), with ``site_code`` as a ``sitecustomize`` on its PYTHONPATH (its spawned workers
    run it, before anything of theirs); once that code has touched the file named by the
    ``mark_var`` variable, (the process, its log)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(site_code)
    mark = tmp_path / "mark"
    env = _env(tmp_path, "http://127.0.0.1:9", PYTHONPATH=str(site), **{mark_var: str(mark)})
    log = tmp_path / "service.log"
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "service", "--bind", "127.0.0.1:0", "--workers", "2",
             "--config", str(ROOT / "hypercorn.toml")],
            cwd=tmp_path, env=env, stderr=out, start_new_session=True)
    finally:
        os.close(out)
    try:
        with trio.fail_after(GUARD):
            while not mark.exists():  # noqa: ASYNC110 (another process)
                assert proc.returncode is None, log.read_text()
                await trio.sleep(0.02)
    except BaseException:
        _reap(proc)
        raise
    return proc, log


_HOLD_A_WORKER = """\
import os, sys, time
if "--multiprocessing-fork" in sys.argv:  # a spawned worker, not the parent
    open(os.environ["HELD_MARK"], "w").close()
    time.sleep(60)  # still starting: the parent's SIGTERM ends it
"""


async def test_ctrl_c_while_a_worker_is_still_starting_is_no_traceback(tmp_path: Path) -> None:
    # A Ctrl+C reaches the whole foreground process group: the parent (which passes every stop
    # on to its workers as SIGTERM) and each worker. A worker still starting (its interpreter,
    # the imports multiprocessing's spawn does) had no handler yet: Python's
    # KeyboardInterrupt, a 30-line traceback from multiprocessing/spawn.py on the terminal.
    # A `sitecustomize` on the workers' PYTHONPATH holds the first worker in its start, so the
    # Ctrl+C lands there every time.
    proc, log = await spawn_with_site(tmp_path, _HOLD_A_WORKER, "HELD_MARK")
    try:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl+C: the parent and its worker
        with trio.move_on_after(GUARD, shield=True):
            await proc.wait()
        text = log.read_text()
        assert proc.returncode == 0, (proc.returncode, text[-3000:])
        assert "Traceback" not in text, text[-3000:]
        assert "KeyboardInterrupt" not in text, text[-3000:]
        assert "received SIGINT: stopping 2 workers" in text, text[-3000:]
        assert not _alive(_children(proc.pid))
    finally:
        _reap(proc)
