"""``python -m service.bench [--quick] [--json out.json] [--only relay,throughput,...,cross]
[--store sqlite|postgres|both] [--workers 1,2]``.

Starts the simulator (``service.bench.simproc``) and the service (``python -m service``) as
separate processes on loopback, drives them with a cheap raw-socket load client from this
process, prints a table and writes JSON. Everything is bounded and stops by itself.

``--store`` and ``--workers`` take lists: the service's scenarios run once per (store, workers)
pair, one after another, on a fresh service (and a fresh database), and are reported side by
side. PostgreSQL is the benchmark's own server (``service/bench/pg.py``, ``fsync=on``), started
when a store or the ``cross`` scenario needs it. ``store`` and ``cross`` run once.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from .cancel import cancellation
from .capacity import capacity
from .cross import CrossLevel, cross
from .floor import floor
from .harness import Bench
from .pg import PostgresServer, find_pg_bin, start_postgres
from .procs import Proc, raise_fd_limit, start_service, start_simulator
from .relay import RelayLevel, relay, throughput
from .report import bars, compare, machine, render
from .runs import short_runs
from .store import bench_store

SCENARIOS = ("relay", "throughput", "runs", "capacity", "cancel", "store", "cross", "floor")
# ``floor`` (what hypercorn and httpx cost alone, ~90 s) runs when named, and in --quick.
DEFAULT = SCENARIOS[:7]
PER_SERVICE = ("relay", "throughput", "runs", "capacity", "cancel", "floor")  # once per config
STORES = ("sqlite", "postgres")

# name: (full, quick)
_RELAY = (
    # 100 and 1,000 streams: 2,000 tokens/s and 50 / 100 new streams per second.
    [RelayLevel(1, 10, 0.005, 3.0, 2), RelayLevel(100, 40, 0.05, 4.0, 2),
     RelayLevel(1000, 20, 0.5, 4.0, 1)],
    [RelayLevel(1, 5, 0.005, 0.5, 1), RelayLevel(10, 5, 0.02, 0.5, 1)],
)
_IDLE_CPU_WINDOW = 3.0  # seconds of the idle service's CPU, after its warm-up

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
_RUNS: tuple[dict[str, Any], ...] = (
    {"concurrency": 16, "tokens": 8, "seconds": 4.0},
    {"concurrency": 4, "tokens": 5, "seconds": 0.5},
)
_CROSS = (CrossLevel(), CrossLevel(runs=10, follow_tokens=20, gap=0.02, cancel_after=0.3,
                                   cancel_spread=0.5, kill_runs=3))


async def _warm_up(bench: Bench) -> None:
    await bench.configure(tokens=4, interval=0.0)
    for name in ("direct", "openai", "native"):
        for _ in range(3):
            res = await bench.stream(name, bench.new_tag("warm"), limit=30)
            if not res.ok:
                raise RuntimeError(f"warm-up stream to {name} failed: {res.error}")


async def _one_config(sim: Proc, workdir: Path, only: set[str], quick: bool, store: str,
                      workers: int, round_: int, pg: PostgresServer | None) -> dict[str, Any]:
    """The per-service scenarios on a fresh service (and database) of this store and size."""
    pick = 1 if quick else 0
    out: dict[str, Any] = {"store": store, "workers": workers, "round": round_}
    db = None
    if store == "postgres":
        assert pg is not None
        db = pg.create_database(f"bench_{workers}w_" + os.urandom(4).hex())
        out["store"] = "postgres"
        out["store_detail"] = f"PostgreSQL {pg.version}, fsync={'on' if pg.fsync else 'off'}"
    else:
        out["store_detail"] = "SQLite WAL, synchronous=NORMAL"
    sub = workdir / f"{store}-{workers}w-{round_}"
    sub.mkdir()
    service = await start_service(sub, sim.port, db=db, workers=workers)
    try:
        bench = Bench(sim, service)
        if pg is not None and store == "postgres":
            bench.others["postgres"] = Proc("postgres", None, pg.port, pg.root / "log",
                                            pid=pg.pid())
        await _warm_up(bench)
        await trio.sleep(0.5)
        idle = service.rss()
        out["idle_rss_mb"] = round(idle / 2**20, 1)
        # What the service costs doing nothing (its upkeep loops, the collector's pacing):
        # the tree's CPU over a few idle seconds, per serving process.
        service.mark()
        await trio.sleep(_IDLE_CPU_WINDOW)
        idle_cpu = service.since_mark()
        out["idle_cpu_pct_per_worker"] = round(100 * idle_cpu.cpu / idle_cpu.wall / workers, 2)
        # Capacity first, on a fresh heap: its RSS per stream is (RSS - idle) / streams.
        if "capacity" in only:
            out["capacity"] = await capacity(bench, idle_rss=idle, **_CAPACITY[pick])
        if "relay" in only:
            out["relay"] = await relay(bench, _RELAY[pick])
        if "throughput" in only:
            out["throughput"] = await throughput(bench, **_THROUGHPUT[pick])
        if "runs" in only:
            out["runs"] = await short_runs(bench, **_RUNS[pick])
        if "cancel" in only:
            out["cancel"] = await cancellation(bench, **_CANCEL[pick])
        if "floor" in only:
            out["floor"] = await floor(bench, sub, _FLOOR[pick])
        service.check_alive()
        out["service_rss_mb_at_end"] = round(service.rss() / 2**20, 1)
    finally:
        service.stop()
    return out


async def _service_scenarios(only: set[str], quick: bool, configs: list[tuple[str, int, int]],
                             cross_level: CrossLevel | None, pg: PostgresServer | None,
                             out: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = Path(tmp)
        sim = await start_simulator(workdir)
        try:
            if only & set(PER_SERVICE):
                out["configs"] = []
                for store, workers, round_ in configs:
                    cfg = await _one_config(sim, workdir, only, quick, store, workers, round_, pg)
                    out["configs"].append(cfg)
            if cross_level is not None and pg is not None:
                out["cross"] = await cross(sim, pg, workdir, cross_level)
        finally:
            sim.stop()


def _workers(text: str) -> list[int]:
    counts = [int(x) for x in text.split(",") if x.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("worker counts of 1 or more, e.g. 1 or 1,2")
    return counts


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a whole number of 1 or more, not {text!r}")
    return value


def _writable(path: Path) -> str | None:
    """Why the results could not be written to ``path`` (found before the benchmark runs, not
    after its minutes), or None."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        return f"{path} is a directory"
    if not parent.is_dir():
        return f"no directory {parent}"
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return f"{path} cannot be written"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke test")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(SCENARIOS)}"
                        f" (default: {','.join(DEFAULT)}; with --quick, all)")
    parser.add_argument("--store", choices=[*STORES, "both"], default="sqlite",
                        help="the service's store (both: each, side by side; default sqlite)")
    parser.add_argument("--workers", type=_workers, default=[1], metavar="N[,M...]",
                        help="python -m service --workers N; a list compares them (default 1)")
    parser.add_argument("--rounds", type=_positive, default=1, metavar="N",
                        help="run the (store, workers) configurations N times, in rotation;"
                        " each is judged by its round with the least CPU taken by processes"
                        " not the benchmark's (default 1)")
    parser.add_argument("--cross-runs", type=_positive, help="live runs in the cross scenario"
                        " (default 100; --quick 10)")
    parser.add_argument("--cross-clients", type=_positive, help="load client processes of the cross"
                        " scenario (default 2)")
    args = parser.parse_args(argv)
    if args.only is None:
        only = set(SCENARIOS if args.quick else DEFAULT)
        # Without PostgreSQL's binaries the cross scenario is left out (said in the report).
        named_cross = False
    else:
        only = {s.strip() for s in args.only.split(",") if s.strip()}
        named_cross = "cross" in only
    if only - set(SCENARIOS):
        parser.error(f"unknown scenario(s): {', '.join(sorted(only - set(SCENARIOS)))}")
    if not only:
        parser.error(f"--only names no scenario (of {','.join(SCENARIOS)})")
    if args.json is not None and (why := _writable(args.json)) is not None:
        parser.error(f"--json: {why}")
    stores = list(STORES) if args.store == "both" else [args.store]
    have_pg = find_pg_bin() is not None
    if not have_pg and ("postgres" in stores or named_cross):
        parser.error("PostgreSQL is not installed (/usr/lib/postgresql/*/bin): "
                     "--store postgres and the cross scenario need it")
    level: CrossLevel | None = None
    if "cross" in only and have_pg:
        level = dataclasses.replace(
            _CROSS[1 if args.quick else 0],
            **({"runs": args.cross_runs} if args.cross_runs is not None else {}),
            **({"clients": args.cross_clients} if args.cross_clients is not None else {}))
    # Side by side: each worker count on each store (sqlite/1, postgres/1, sqlite/2, ...).
    configs = [(store, n, r) for r in range(args.rounds) for n in args.workers
               for store in stores]
    fds = raise_fd_limit()
    started = time.perf_counter()
    out: dict[str, Any] = {
        "command": "python -m service.bench " + shlex.join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick, "machine": machine(), "fd_limit": fds,
    }
    pg = None
    if "postgres" in stores or level is not None:
        # Commit times are kept for the cross scenario (an event's commit -> B's subscriber).
        settings = {"track_commit_timestamp": "on"}
        pg = start_postgres(fsync=True, shared_buffers="128MB", settings=settings)
        out["postgres"] = {"version": pg.version, "fsync": "on", "shared_buffers": "128MB",
                           **settings}
    try:
        if only - {"store"}:
            gc.disable()  # the load client collects between scenarios only (Bench.configure)
            try:
                trio.run(_service_scenarios, only, args.quick, configs, level, pg, out)
            finally:
                gc.enable()
        if "cross" in only and level is None:
            out["cross"] = {"skipped": "PostgreSQL is not installed"}
        if "store" in only:
            kinds: dict[str, Any] = {}
            for store in stores:
                db = pg.create_database("bench_store_" + os.urandom(4).hex()) if (
                    store == "postgres" and pg is not None) else None
                res = bench_store(**_STORE[1 if args.quick else 0], db=db)
                procs = _STORE[1 if args.quick else 0]["procs"]
                res["procs"] = procs
                res["many_processes"] = res.pop(f"{procs}_processes")
                kinds[store] = res
            out["store"] = kinds[stores[0]]
            if len(kinds) > 1:
                out["stores"] = kinds
    finally:
        if pg is not None:
            pg.remove()
    # The first configuration's results are also at the top level (as with one configuration).
    for key, value in (out.get("configs") or [{}])[0].items():
        if key not in ("store", "workers", "round", "store_detail"):
            out[key] = value
    out["compare"] = compare(out)
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
