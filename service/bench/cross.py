"""The ``cross`` scenario: two instances on one PostgreSQL database (issue 14's bars).

Instances A and B are ``python -m service`` processes on one database of the benchmark's own
PostgreSQL server (``fsync=on``); the load comes from ``clients`` processes of their own
(``service.bench.crossclient``), the runs shared out among them, so that at 100 runs no single
Python client is what falls behind. Every process's CPU over each window is reported: A, B,
the PostgreSQL server (postmaster and backends), the simulator, each client process and this
one (which only waits).

* **follow**: ``runs`` native runs stream on A (20 tokens/s each, started ``gap`` apart), each
  followed by a subscriber on B. An event's delay is B's subscriber's arrival minus the event's
  commit in the database (the server runs with ``track_commit_timestamp``: its wall-clock time,
  set against the client's CLOCK_MONOTONIC arrival by the client's measured offset between
  the two clocks); only events B got live count (not the backlog B reads first). Beside it:
  the commit to A's own client (A publishes once committed), the simulator's send of a token
  to its commit (A reading its upstream, and its committer), and B's arrival minus A's
  client's.
* **cancel**: ``runs`` long native runs on A; once all have started, each is cancelled through B
  at a random moment of a ``cancel_spread``-second window; the time from the cancel request to
  the simulator's record of A closing that run's upstream stream (both CLOCK_MONOTONIC), and
  to A's client seeing ``run.finished``.
* **kill**: a third instance C, in a PID namespace of its own (``unshare --pid``, as root: to A
  and B it is on another host, alive while its lease is), streams ``kill_runs`` runs to
  clients; once each has shown a few tokens C is killed (SIGKILL). Measured: the time until the
  store holds every one of its runs closed (by A or B, with nobody asking: their look for runs
  left open, every 5 s, once C's lease has run out), against the bar of the lease + 5 s; and
  whether every token a client was shown is in the stored reply. Without ``unshare`` (not
  root) C shares the namespace and its death is seen from its PID: said in the output.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import trio

from .harness import Bench
from .pg import PostgresServer
from .procs import Proc, children, start_service
from .stats import summary_ms

__all__ = ["CrossLevel", "cross"]

_REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class CrossLevel:
    runs: int = 100
    clients: int = 2  # load client processes
    follow_tokens: int = 100  # per followed run, at 50 ms: 5 s
    gap: float = 0.01  # between run starts: 100 runs start within 1 s
    cancel_after: float = 0.5  # after the last run started, the cancel window opens...
    cancel_spread: float = 2.0  # ... for this long
    kill_runs: int = 20  # runs on the instance that is killed


def _peak(spans: list[list[float]]) -> int:
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    live = peak = 0
    for _, step in edges:
        live += step
        peak = max(peak, live)
    return peak


async def _clients(bench: Bench, a: Proc, b: Proc, scenario: str, level: CrossLevel
                   ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the client processes to their end; their outputs and every process's CPU."""
    start_at = time.perf_counter() + 1.5  # after each client's interpreter and imports
    cmd = [sys.executable, "-m", "service.bench.crossclient", scenario,
           "--a", str(a.port), "--b", str(b.port), "--runs", str(level.runs),
           "--parts", str(level.clients), "--start-at", repr(start_at), "--gap", str(level.gap),
           "--cancel-after", str(level.cancel_after),
           "--cancel-spread", str(level.cancel_spread)]
    outs: list[dict[str, Any]] = [{} for _ in range(level.clients)]

    async def one(i: int) -> None:
        done = await trio.run_process([*cmd, "--part", str(i)], cwd=_REPO, check=False,
                                      capture_stdout=True, capture_stderr=True)
        if done.returncode != 0:
            raise RuntimeError(f"cross client {i} exited {done.returncode}: "
                               f"{done.stderr.decode(errors='replace')[-2000:]}")
        outs[i] = json.loads(done.stdout)

    with bench.cpu() as cpu:
        async with trio.open_nursery() as nursery:
            for i in range(level.clients):
                nursery.start_soon(one, i)
    window = cpu.as_dict()
    w = cpu.wall or 1.0
    cpus: dict[str, Any] = {
        "wall_s": window["wall_s"],
        "a_cpu_pct": window["service_cpu_pct"], "b_cpu_pct": window["b_cpu_pct"],
        "postgres_cpu_pct": window["postgres_cpu_pct"],
        "simulator_cpu_pct": window["simulator_cpu_pct"],
        "client_cpu_pct": [round(100 * o["cpu_s"] / w, 1) for o in outs],
        "bench_cpu_pct": window["client_cpu_pct"],  # this process: it only waits
    }
    busy = (cpu.service + cpu.others["b"] + cpu.others["postgres"] + cpu.simulator + cpu.client
            + sum(o["cpu_s"] for o in outs))
    cpus["total_cpu_pct"] = round(100 * busy / w, 1)  # of 100 * nproc
    # Processes not the benchmark's (another user's work on the host): of 100 * nproc too.
    machine = cpu.machine * (os.cpu_count() or 1) * cpu.wall
    ours = busy + sum(o["life_cpu_s"] - o["cpu_s"] for o in outs)  # the clients' start-up
    cpus["foreign_cpu_pct"] = round(100 * max(0.0, machine - ours) / w, 1)
    return outs, cpus


def _commit_times(db: str, run_ids: list[str]) -> dict[tuple[str, int], float]:
    """Each event's commit time (wall clock, s): the server runs ``track_commit_timestamp``."""
    with psycopg.connect(db) as conn:
        rows = conn.execute(
            "SELECT run_id, seq, extract(epoch FROM pg_xact_commit_timestamp(xmin))"
            " FROM run_events WHERE run_id = ANY(%s)", (run_ids,)).fetchall()
    return {(r[0], r[1]): float(r[2]) for r in rows if r[2] is not None}


async def _follow(bench: Bench, a: Proc, b: Proc, db: str, level: CrossLevel
                  ) -> dict[str, Any]:
    # 20 tokens/s a run; each token's send time kept, to split the way from the simulator.
    await bench.configure(tokens=level.follow_tokens, interval=0.05, record_sends=True)
    marker = await bench.sim_marker()
    outs, cpus = await _clients(bench, a, b, "follow", level)
    delays = [d for o in outs for d in o["delays"]]
    errors = [e for o in outs for e in o["errors"]]
    runs = {rid: (o["wall_offset"], run) for o in outs for rid, run in o["runs"].items()}
    committed = await trio.to_thread.run_sync(_commit_times, db, list(runs))
    sends = {rec["tag"]: rec for rec in
             (await bench.sim_records(marker, sends_after=1e-9))["records"] if "sends" in rec}
    split: dict[str, list[float]] = {k: [] for k in (
        "commit_to_b", "commit_to_a", "sim_to_commit", "sim_to_a", "sim_to_b")}
    for rid, (offset, run) in runs.items():
        rec = sends.get(run["tag"])
        for seq, on_a, on_b, token in run["events"]:
            at = committed.get((rid, seq))  # wall clock; the clients' times + offset are too
            sent = None
            if rec is not None and token >= rec["sends_from"]:
                k = token - rec["sends_from"]
                sent = rec["sends"][k] if k < len(rec["sends"]) else None
            if at is not None:
                split["commit_to_a"].append(on_a + offset - at)
                if on_b is not None:
                    split["commit_to_b"].append(on_b + offset - at)
                if sent is not None:
                    split["sim_to_commit"].append(at - (sent + offset))
            if sent is not None:
                split["sim_to_a"].append(on_a - sent)
                if on_b is not None:
                    split["sim_to_b"].append(on_b - sent)
    return {"runs": level.runs, "peak_live_runs": _peak([s for o in outs for s in o["spans"]]),
            # the bar: an event committed on A -> B's subscriber (live events only)
            "commit_to_b_subscriber": summary_ms(split["commit_to_b"]),
            "commit_to_a_client": summary_ms(split["commit_to_a"]),
            "sim_to_commit": summary_ms(split["sim_to_commit"]),
            "b_minus_a_client": summary_ms(delays),
            "sim_to_a_client": summary_ms(split["sim_to_a"]),
            "sim_to_b_subscriber": summary_ms(split["sim_to_b"]),
            "missing_on_b": sum(o["missing_on_b"] for o in outs),
            "errors": len(errors), "error_samples": errors[:3], "cpu": cpus}


async def _cancel(bench: Bench, a: Proc, b: Proc, level: CrossLevel) -> dict[str, Any]:
    await bench.configure(tokens=100_000, interval=0.05)
    marker = await bench.sim_marker()
    outs, cpus = await _clients(bench, a, b, "cancel", level)
    asked: dict[str, float] = {}
    for o in outs:
        asked.update(o["asked"])
    with trio.move_on_after(5.0):  # the upstreams still open by then were never closed
        await bench.wait_upstreams_closed(marker)
    records = [r for r in (await bench.sim_records(marker))["records"] if r["tag"] in asked]
    closed = [r["client_gone_at"] - asked[r["tag"]] for r in records
              if r["client_gone_at"] is not None]
    errors = [e for o in outs for e in o["errors"]]
    return {"runs": level.runs, "cancelled": len(asked),
            "live_at_first_cancel": _peak([s for o in outs for s in o["spans"]]),
            "upstream_closed": summary_ms(closed),
            "never_closed": sum(r["finished"] is None for r in records),
            "end_seen_on_a": summary_ms([x for o in outs for x in o["end_seen"]]),
            "cancel_errors": sum(o["cancel_errors"] for o in outs),
            "errors": len(errors), "error_samples": errors[:3], "cpu": cpus}


async def cross(sim: Proc, pg: PostgresServer, workdir: Path, level: CrossLevel
                ) -> dict[str, Any]:
    """Both parts on two fresh instances and a fresh database of ``pg``."""
    db = pg.create_database("bench_cross_" + os.urandom(4).hex())
    postgres = Proc("postgres", None, pg.port, pg.root / "log", pid=pg.pid())
    a = b = None
    try:
        a = await start_service(workdir, sim.port, db=db, name="a")
        b = await start_service(workdir, sim.port, db=db, name="b")
        bench = Bench(sim, a)
        bench.others = {"b": b, "postgres": postgres}
        await bench.configure(tokens=4, interval=0.0)
        for target in (bench, Bench(sim, b)):  # each instance's first runs (imports, pools)
            for _ in range(3):
                res = await target.stream("native", bench.new_tag("warm"), limit=30)
                if not res.ok:
                    raise RuntimeError(f"cross warm-up failed: {res.error}")
        out: dict[str, Any] = {"level": asdict(level), "store": f"postgresql {pg.version}",
                               "fsync": pg.fsync}
        out["follow"] = await _follow(bench, a, b, db, level)
        out["cancel"] = await _cancel(bench, a, b, level)
        out["kill"] = await _kill(bench, sim, db, workdir, level)
        a.check_alive()
        b.check_alive()
        return out
    finally:
        for proc in (b, a):
            if proc is not None:
                proc.stop()


def _namespace_prefix() -> list[str]:
    """``unshare`` into a PID namespace of its own, where this process may (root)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return []
    try:
        done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                              capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"] \
        if done.returncode == 0 else []


def _open_runs(db: str, run_ids: list[str]) -> int:
    with psycopg.connect(db) as conn:
        row = conn.execute("SELECT count(*) FROM runs WHERE id = ANY(%s) AND status IN "
                           "('queued', 'running')", (run_ids,)).fetchone()
    return int(row[0]) if row else 0


def _stored_replies(db: str, run_ids: list[str]) -> dict[str, str]:
    with psycopg.connect(db) as conn:
        rows = conn.execute("SELECT run_id, content FROM messages WHERE run_id = ANY(%s) "
                            "AND role = 'assistant'", (run_ids,)).fetchall()
    return {r[0]: r[1] for r in rows}


async def _kill(bench: Bench, sim: Proc, db: str, workdir: Path, level: CrossLevel
                ) -> dict[str, Any]:
    from ..runs.upkeep import RECOVER_EVERY
    from ..store.ownership import LEASE

    await bench.configure(tokens=100_000, interval=0.05)
    prefix = _namespace_prefix()
    c = await start_service(workdir, sim.port, db=db, name="c", prefix=prefix)
    shown: dict[str, str] = {}  # run id -> the text its client was shown
    started = trio.Event()
    ready = 0
    base = f"http://127.0.0.1:{c.port}"

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal ready
        conv = (await client.post(f"{base}/api/conversations", json={"model": "bench"})).json()
        tokens = 0
        try:
            async with client.stream("POST", f"{base}/api/conversations/{conv['id']}/messages",
                                     json={"content": "kill", "stream": True}) as resp:
                event = ""
                async for line in resp.aiter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        data = json.loads(line[6:])
                        if event == "run.started":
                            run_id = data["run_id"]
                            shown[run_id] = ""
                        elif event == "token":
                            shown[run_id] += data["text"]
                            tokens += 1
                            if tokens == 5:
                                ready += 1
                                if ready == level.kill_runs:
                                    started.set()
        except httpx.HTTPError:
            pass  # its instance was killed

    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=60.0),
                                     limits=httpx.Limits(max_connections=1000)) as client, \
                trio.open_nursery() as nursery:
            for _ in range(level.kill_runs):
                nursery.start_soon(one, client)
            with trio.fail_after(30):
                await started.wait()
            # The service process itself (under unshare, its child: the namespace's init).
            target = (children(c.pid) or [c.pid])[0] if prefix else c.pid
            killed_at = time.perf_counter()
            os.kill(target, signal.SIGKILL)
        run_ids = list(shown)
        closed_after = None
        with trio.move_on_after(LEASE + RECOVER_EVERY + 30):
            while await trio.to_thread.run_sync(  # noqa: ASYNC110 (another process's rows)
                    _open_runs, db, run_ids):
                await trio.sleep(0.1)
            closed_after = time.perf_counter() - killed_at
        stored = await trio.to_thread.run_sync(_stored_replies, db, run_ids)
    finally:
        c.stop()
    lost = [rid for rid, text in shown.items() if not stored.get(rid, "").startswith(text)]
    return {"runs": len(run_ids), "own_pid_namespace": bool(prefix), "lease_s": LEASE,
            "bound_s": LEASE + RECOVER_EVERY,
            "closed_after_s": None if closed_after is None else round(closed_after, 2),
            "tokens_shown": sum(len(t) for t in shown.values()),
            "runs_missing_shown_text": len(lost)}
