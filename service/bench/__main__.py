"""``python -m service.bench [--quick] [--json out.json] [--only relay,throughput,...,floor]``.

Starts the simulator (``service.bench.simproc``) and the service (``python -m service``) as
separate processes on loopback, drives them with a cheap raw-socket load client from this
process, prints a table and writes JSON. Everything is bounded and stops by itself.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from .cancel import cancellation
from .capacity import capacity
from .floor import floor
from .harness import Bench
from .procs import raise_fd_limit, start_service, start_simulator
from .relay import RelayLevel, relay, throughput
from .report import bars, machine, render
from .store import bench_store

SCENARIOS = ("relay", "throughput", "capacity", "cancel", "store", "floor")
# ``floor`` (what hypercorn and httpx cost alone, ~90 s) runs when named, and in --quick.
DEFAULT = SCENARIOS[:5]

# name: (full, quick)
_RELAY = (
    # 100 and 1,000 streams: 2,000 tokens/s and 50 / 100 new streams per second.
    [RelayLevel(1, 10, 0.005, 3.0, 2), RelayLevel(100, 40, 0.05, 4.0, 2),
     RelayLevel(1000, 20, 0.5, 4.0, 1)],
    [RelayLevel(1, 5, 0.005, 0.5, 1), RelayLevel(10, 5, 0.02, 0.5, 1)],
)
_FLOOR = (
    [RelayLevel(1, 10, 0.005, 2.0, 2), RelayLevel(100, 40, 0.05, 3.0, 2)],
    [RelayLevel(1, 5, 0.005, 0.3, 1), RelayLevel(10, 5, 0.02, 0.3, 1)],
)
_THROUGHPUT: tuple[dict[str, Any], ...] = (
    {"streams": 8, "tokens": 2000, "seconds": 6.0},
    {"streams": 2, "tokens": 200, "seconds": 0.5},
)
_CAPACITY: tuple[dict[str, Any], ...] = (
    {"steps": [250, 500, 750, 1000, 1500, 2000, 3000, 4000, 5000], "hold": 4.0},
    {"steps": [10, 30], "hold": 1.0},
)
_CANCEL: tuple[dict[str, Any], ...] = (
    {"streams": 500, "interval": 0.25, "spread": 2.0},
    {"streams": 20, "interval": 0.05, "spread": 0.5},
)
_STORE: tuple[dict[str, Any], ...] = (
    {"seconds": 5.0, "tasks": 16, "procs": 4},
    {"seconds": 0.5, "tasks": 4, "procs": 4},
)


async def _warm_up(bench: Bench) -> None:
    await bench.configure(tokens=4, interval=0.0)
    for name in ("direct", "openai", "native"):
        for _ in range(3):
            res = await bench.stream(name, bench.new_tag("warm"), limit=30)
            if not res.ok:
                raise RuntimeError(f"warm-up stream to {name} failed: {res.error}")


async def _service_scenarios(only: set[str], quick: bool, out: dict[str, Any]) -> None:
    pick = 1 if quick else 0
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = Path(tmp)
        sim = await start_simulator(workdir)
        try:
            service = await start_service(workdir, sim.port)
            try:
                bench = Bench(sim, service)
                await _warm_up(bench)
                await trio.sleep(0.5)
                idle = service.rss()
                out["idle_rss_mb"] = round(idle / 2**20, 1)
                # Capacity first, on a fresh heap: its RSS per stream is (RSS - idle) / streams.
                if "capacity" in only:
                    out["capacity"] = await capacity(bench, idle_rss=idle, **_CAPACITY[pick])
                if "relay" in only:
                    out["relay"] = await relay(bench, _RELAY[pick])
                if "throughput" in only:
                    out["throughput"] = await throughput(bench, **_THROUGHPUT[pick])
                if "cancel" in only:
                    out["cancel"] = await cancellation(bench, **_CANCEL[pick])
                if "floor" in only:
                    out["floor"] = await floor(bench, workdir, _FLOOR[pick])
                service.check_alive()
                out["service_rss_mb_at_end"] = round(service.rss() / 2**20, 1)
            finally:
                service.stop()
        finally:
            sim.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke test")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(SCENARIOS)}"
                        f" (default: {','.join(DEFAULT)}; with --quick, all)")
    args = parser.parse_args(argv)
    if args.only is None:
        only = set(SCENARIOS if args.quick else DEFAULT)
    else:
        only = {s.strip() for s in args.only.split(",") if s.strip()}
    if only - set(SCENARIOS):
        parser.error(f"unknown scenario(s): {', '.join(sorted(only - set(SCENARIOS)))}")
    fds = raise_fd_limit()
    started = time.perf_counter()
    out: dict[str, Any] = {
        "command": "python -m service.bench " + shlex.join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick, "machine": machine(), "fd_limit": fds,
    }
    if only - {"store"}:
        gc.disable()  # the load client collects between scenarios only (Bench.configure)
        try:
            trio.run(_service_scenarios, only, args.quick, out)
        finally:
            gc.enable()
    if "store" in only:
        store = bench_store(**_STORE[1 if args.quick else 0])
        procs = _STORE[1 if args.quick else 0]["procs"]
        store["procs"] = procs
        store["many_processes"] = store.pop(f"{procs}_processes")
        out["store"] = store
    out["bars"] = bars(out)
    out["duration_s"] = round(time.perf_counter() - started, 1)
    print(render(out))
    print(f"\n({out['duration_s']} s; {out['machine']['nproc']} x {out['machine']['cpu_model']},"
          f" Python {out['machine']['python']})")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
