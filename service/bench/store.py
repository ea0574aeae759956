"""Store throughput: appends/s and append latency, in one process and in several at once.

    python -m service.bench.store [--seconds 5] [--tasks 16] [--procs 4] [--synchronous NORMAL]
                                  [--db postgresql://user@host:port/db]

Each worker process runs ``--tasks`` trio tasks appending messages to its own conversations for
``--seconds``; every append is one committed transaction (the same call the service makes).
Without ``--db`` each part runs on a fresh SQLite file; with a PostgreSQL URL both parts append
to that database (its tables are created if missing; the rows are left there).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from ..store import is_postgres_url, make_store

__all__ = ["bench_store", "main"]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _worker(db: str, seconds: float, tasks: int, synchronous: str) -> dict[str, Any]:
    store = make_store(db, synchronous=synchronous)
    await store.open()
    convs = [await store.create_conversation(title=f"bench {i}") for i in range(tasks)]
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    cpu0 = time.process_time()
    start = time.perf_counter()

    async def loop(conv_id: str) -> None:
        i = 0
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            await store.append_message(conv_id, role="user", content=f"message {i} " + "x" * 200)
            latencies.append(time.perf_counter() - t0)
            i += 1

    async with trio.open_nursery() as nursery:
        for conv in convs:
            nursery.start_soon(loop, conv.id)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    await store.aclose()
    return {"appends": len(latencies), "elapsed": elapsed, "cpu": cpu, "latencies": latencies}


def _proc_main(db: str, seconds: float, tasks: int, synchronous: str, out: Any) -> None:
    out.put(trio.run(_worker, db, seconds, tasks, synchronous))


def bench_store(
    *, seconds: float = 5.0, tasks: int = 16, procs: int = 4, synchronous: str = "NORMAL",
    db: str | None = None,
) -> dict[str, Any]:
    results: dict[str, Any] = (
        {"store": "postgresql", "tasks": tasks} if db and is_postgres_url(db)
        else {"store": "sqlite", "synchronous": synchronous, "journal_mode": "wal",
              "tasks": tasks})
    with tempfile.TemporaryDirectory() as tmp:
        db1 = db or str(Path(tmp) / "bench.db")
        one = trio.run(_worker, db1, seconds, tasks, synchronous)
        results["one_process"] = _summary([one])
        ctx = mp.get_context("spawn")
        q: Any = ctx.Queue()
        db4 = db or str(Path(tmp) / "bench4.db")
        trio.run(_init, db4, synchronous)  # migrate once, so the workers only append
        workers = [
            ctx.Process(target=_proc_main, args=(str(db4), seconds, tasks, synchronous, q))
            for _ in range(procs)
        ]
        for w in workers:
            w.start()
        many = [q.get() for _ in workers]
        for w in workers:
            w.join()
        results[f"{procs}_processes"] = _summary(many)
    return results


async def _init(db: str, synchronous: str) -> None:
    store = make_store(db, synchronous=synchronous)
    await store.open()
    await store.aclose()


def _summary(parts: list[dict[str, Any]]) -> dict[str, Any]:
    lat = [x for p in parts for x in p["latencies"]]
    appends = sum(p["appends"] for p in parts)
    elapsed = max(p["elapsed"] for p in parts)
    return {
        "appends": appends,
        "appends_per_s": round(appends / elapsed, 1),
        "p50_ms": round(_pct(lat, 0.50) * 1000, 3),
        "p99_ms": round(_pct(lat, 0.99) * 1000, 3),
        "mean_ms": round(statistics.fmean(lat) * 1000, 3) if lat else None,
        "cpu_s": round(sum(p["cpu"] for p in parts), 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.bench.store", description=__doc__)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--tasks", type=int, default=16)
    p.add_argument("--procs", type=int, default=4)
    p.add_argument("--synchronous", default="NORMAL", choices=["OFF", "NORMAL", "FULL", "EXTRA"])
    p.add_argument("--db", help="a PostgreSQL URL to measure instead of SQLite")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    res = bench_store(
        seconds=args.seconds, tasks=args.tasks, procs=args.procs, synchronous=args.synchronous,
        db=args.db,
    )
    res["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
