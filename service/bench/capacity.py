"""Capacity: ramp live streams (1 token/s each) until the added p99 gap passes 50 ms or errors.

Streams are added in steps. After each step (once every new stream has its first token and a
short settle) the gaps between token arrivals are measured over a hold window; a token's added
gap is its arrival gap minus the gap between the same two tokens' sends at the simulator. The
service's RSS per stream is (RSS - idle RSS) / streams.
"""

from __future__ import annotations

import time
from typing import Any

import trio

from .client import StreamResult
from .harness import Bench
from .stats import ms, pct

__all__ = ["capacity"]

_PACE = 1.0  # seconds between tokens: a slow local model, an agent waiting on tools
_ADDED_P99_LIMIT = 0.050


async def capacity(
    bench: Bench, *, steps: list[int], hold: float, idle_rss: int, start_parallel: int = 64,
    target_name: str = "openai",
) -> dict[str, Any]:
    await bench.configure(tokens=100_000, interval=_PACE, record_sends=True)
    marker = await bench.sim_marker()
    live: list[StreamResult] = []
    rows: list[dict[str, Any]] = []
    reached = 0
    reached_row: dict[str, Any] | None = None
    gate = trio.Semaphore(start_parallel)

    async def one(res: StreamResult) -> None:
        # Bound how many streams are being set up at once, not how many live.
        async with trio.open_nursery() as nursery:
            await gate.acquire()
            try:
                nursery.start_soon(_run_one, bench, res)
                await res.settled.wait()
            finally:
                gate.release()

    with bench.cpu() as total_cpu:
        async with trio.open_nursery() as nursery:
            for target in steps:
                t_step = time.perf_counter()
                while len(live) < target:
                    res = StreamResult(target_name)
                    res.tag = bench.new_tag("cap")
                    live.append(res)
                    nursery.start_soon(one, res)
                # A step whose streams are not all set up in 30 s is past capacity anyway (and
                # the whole benchmark must stay under 5 minutes).
                with trio.move_on_after(30) as ramp_scope:
                    for r in live:
                        await r.settled.wait()
                ramp = time.perf_counter() - t_step
                await trio.sleep(min(1.5, hold / 2))
                with bench.cpu() as cpu:
                    since = time.perf_counter()
                    await trio.sleep(hold)
                    until = time.perf_counter()
                rss = bench.service.rss()
                records = (await bench.sim_records(marker, sends_after=since - 2 * _PACE))
                sends = {r["tag"]: r for r in records["records"]}
                gaps, added = _gaps(live, sends, since, until)
                errors = sum(r.error is not None for r in live)
                p99 = pct(added, 0.99)
                set_up = not ramp_scope.cancelled_caught
                row = {"streams": len(live), "errors": errors, "gaps": len(gaps),
                       "all_set_up": set_up,
                       "gap_p50_ms": ms(pct(gaps, 0.5)), "gap_p99_ms": ms(pct(gaps, 0.99)),
                       "added_gap_p50_ms": ms(pct(added, 0.5)), "added_gap_p99_ms": ms(p99),
                       "ramp_s": round(ramp, 2), "service_rss_mb": round(rss / 2**20, 1),
                       "rss_per_stream_kb": round((rss - idle_rss) / len(live) / 1024, 1),
                       **cpu.as_dict()}
                rows.append(row)
                within = set_up and errors == 0 and added and p99 <= _ADDED_P99_LIMIT
                if not within:
                    break
                reached, reached_row = len(live), row
            nursery.cancel_scope.cancel()  # every client goes away: the runs are cancelled
    with trio.move_on_after(30):
        await bench.wait_upstreams_closed(marker)
    return {
        "pace_s": _PACE, "limit_added_gap_p99_ms": _ADDED_P99_LIMIT * 1000,
        "steps": rows, "reached": reached,
        "rss_per_stream_kb": reached_row["rss_per_stream_kb"] if reached_row else None,
        "added_gap_p99_ms_at_reached": reached_row["added_gap_p99_ms"] if reached_row else None,
        "total_cpu": total_cpu.as_dict(),
    }


async def _run_one(bench: Bench, res: StreamResult) -> None:
    await bench.stream(res.target, res.tag, limit=3600, result=res)


def _gaps(live: list[StreamResult], records: dict[str, dict[str, Any]], since: float,
          until: float) -> tuple[list[float], list[float]]:
    """Gaps between tokens arriving in [since, until), and each one's added part.

    A token's added gap is its arrival gap minus its send gap at the simulator: the jitter the
    relay added, without the simulator's own scheduling delays on a loaded machine.
    """
    gaps: list[float] = []
    added: list[float] = []
    for r in live:
        rec = records.get(r.tag)
        if rec is None or "sends" not in rec:
            continue
        sends, first = rec["sends"], rec["sends_from"]
        k = 0  # index of the token the next arrival entry starts with
        prev: float | None = None
        for at, n in zip(r.arrivals, r.counts, strict=True):
            for j in range(k, k + n):
                if prev is not None and since <= at < until:
                    gaps.append(at - prev)
                    i = j - first
                    if 1 <= i < len(sends):
                        added.append((at - prev) - (sends[i] - sends[i - 1]))
                prev = at
            k += n
    return gaps, added
