"""Short runs: as many few-token runs as the service takes, closed loop.

``concurrency`` clients each start a run, read it to its end and start the next, for ``seconds``
per target; the simulator answers each with ``tokens`` unpaced tokens. A run is several store
writes (the run and its messages, its events, its final state), so this is where the store's
cost per run shows: the service's CPU per run (``--store sqlite|postgres``) and the runs per
second it sustains (``--workers N``). ``openai`` is a ``/v1/chat/completions`` stream; ``native``
creates a conversation and posts a message to it (both inside the window: a native run's cost
here includes its conversation). ``all`` sums both windows.
"""

from __future__ import annotations

import time
from typing import Any

import trio

from .client import StreamResult
from .harness import Bench

__all__ = ["short_runs"]


def _per_run(cpu_s: float, runs: int) -> float | None:
    return round(1000 * cpu_s / runs, 3) if runs else None


async def short_runs(bench: Bench, *, concurrency: int, tokens: int, seconds: float,
                     targets: tuple[str, ...] = ("openai", "native")) -> dict[str, Any]:
    await bench.configure(tokens=tokens, interval=0.0)
    out: dict[str, Any] = {"concurrency": concurrency, "tokens": tokens, "seconds": seconds,
                           "targets": {}}
    totals: dict[str, float] = {}
    machine = 0.0  # busy CPU-share-seconds of the whole machine
    foreign = 0.0  # CPU seconds of processes not the benchmark's
    for name in targets:
        await bench.wait_idle()
        results: list[StreamResult] = []

        async def worker(until: float, name: str = name,
                         results: list[StreamResult] = results) -> None:
            while time.perf_counter() < until:
                res = await bench.stream(name, bench.new_tag("short"), limit=30, record=False)
                results.append(res)
                if not res.ok:
                    await trio.sleep(0.05)  # an error is quick: do not spin on it

        with bench.cpu() as cpu:
            until = time.perf_counter() + seconds
            async with trio.open_nursery() as nursery:
                for _ in range(concurrency):
                    nursery.start_soon(worker, until)
        ok = sum(r.ok for r in results)
        kinds: dict[str, int] = {}
        for r in results:
            if not r.ok:
                kind = (r.error or f"HTTP {r.status}").split(":")[0][:40]
                kinds[kind] = kinds.get(kind, 0) + 1
        row: dict[str, Any] = {"runs": ok, "errors": len(results) - ok, "error_kinds": kinds,
                               "runs_per_s": round(ok / cpu.wall, 1) if cpu.wall else None,
                               **cpu.as_dict()}
        row["service_cpu_ms_per_run"] = _per_run(cpu.service, ok)
        row["simulator_cpu_ms_per_run"] = _per_run(cpu.simulator, ok)
        row["client_cpu_ms_per_run"] = _per_run(cpu.client, ok)
        for other, c in cpu.others.items():
            row[f"{other}_cpu_ms_per_run"] = _per_run(c, ok)
        out["targets"][name] = row
        for key in ("runs", "errors", "wall_s", "service_cpu_s", "simulator_cpu_s",
                    "client_cpu_s", *(f"{o}_cpu_s" for o in cpu.others)):
            totals[key] = totals.get(key, 0.0) + row[key]
        machine += cpu.machine * cpu.wall
        foreign += cpu.foreign
    runs, wall = int(totals["runs"]), totals["wall_s"]
    every: dict[str, Any] = {"runs": runs, "errors": int(totals["errors"]),
                             "runs_per_s": round(runs / wall, 1) if wall else None}
    for key, value in totals.items():
        if key.endswith("_cpu_s"):
            proc = key[:-len("_cpu_s")]
            every[key] = round(value, 2)
            every[f"{proc}_cpu_pct"] = round(100 * value / wall, 1) if wall else None
            every[f"{proc}_cpu_ms_per_run"] = _per_run(value, runs)
    every["machine_busy_pct"] = round(100 * machine / wall, 1) if wall else None
    every["foreign_cpu_pct"] = round(100 * foreign / wall, 1) if wall else None
    out["all"] = every
    return out
