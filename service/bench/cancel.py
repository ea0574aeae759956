"""Cancellation latency: clients disconnect mid-stream under load; when does the upstream close?

``streams`` streams (half OpenAI-compatible, half native SSE) run through the service at
``interval`` seconds per token. Once all should be live, each client closes its socket at a
random moment of a ``spread``-second window, while the others keep streaming. The latency
of one stream is the simulator's record of the service closing its upstream connection minus the
client's close (both on CLOCK_MONOTONIC). A stream whose upstream is still open ``grace`` seconds
after the last close never closed.
"""

from __future__ import annotations

import random
import time
from functools import partial
from typing import Any

import trio

from .client import StreamResult
from .harness import Bench
from .stats import ms, pct

__all__ = ["cancellation"]


async def cancellation(
    bench: Bench, *, streams: int, interval: float, spread: float, grace: float = 5.0,
) -> dict[str, Any]:
    await bench.configure(tokens=100_000, interval=interval)
    marker = await bench.sim_marker()
    results: list[StreamResult] = []
    tags: list[str] = []
    with bench.cpu() as cpu:
        t0 = time.perf_counter()
        # Close times are drawn up front, in a window that starts once all should be live.
        window = t0 + max(2.0, streams / 150 + 1.0)
        async with trio.open_nursery() as nursery:
            for i in range(streams):
                name = "openai" if i % 2 == 0 else "native"
                res = StreamResult(name)
                tag = bench.new_tag(f"cancel-{name}")
                results.append(res)
                tags.append(tag)
                close_at = window + random.uniform(0, spread)
                nursery.start_soon(partial(bench.stream, name, tag, limit=close_at - t0 + 30,
                                           close_at=close_at, result=res))
                if i % 50 == 49:
                    await trio.sleep(0.05)  # don't overrun the listen backlog
    # Every client has closed; give the service ``grace`` seconds to close every upstream.
    with trio.move_on_after(grace):
        await bench.wait_upstreams_closed(marker)
    records = {r["tag"]: r for r in (await bench.sim_records(marker))["records"]}
    lat: dict[str, list[float]] = {"openai": [], "native": []}
    never = errors = early = 0
    for tag, res in zip(tags, results, strict=True):
        rec = records.get(tag)
        if res.closed_at is None:
            errors += 1  # failed, or ended before its client closed it
            continue
        if res.first_token_at is None:
            early += 1  # closed before its first token: still a disconnect, counted apart
        if rec is None or rec["client_gone_at"] is None:
            never += 1
            continue
        lat[res.target].append(rec["client_gone_at"] - res.closed_at)
    every = lat["openai"] + lat["native"]
    return {
        "streams": streams, "interval_ms": interval * 1000, "spread_s": spread,
        "measured": len(every), "errors": errors, "closed_before_first_token": early,
        "never_closed": never,
        "p50_ms": ms(pct(every, 0.5)), "p99_ms": ms(pct(every, 0.99)),
        "max_ms": ms(max(every)) if every else None,
        "by_protocol": {n: {"n": len(v), "p50_ms": ms(pct(v, 0.5)), "p99_ms": ms(pct(v, 0.99)),
                            "max_ms": ms(max(v)) if v else None} for n, v in lat.items()},
        **cpu.as_dict(),
    }
