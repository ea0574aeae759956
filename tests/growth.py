"""Growth checks for the event loop's parsers: a doubling of the input should about double the
time (a ratio near 4 is quadratic). Never an absolute speed: the ratio of the fastest of a few
runs, with one retry at double the size, and below ``FLOOR`` seconds timer noise decides.

Work done in this process is timed in CPU time (``time.process_time``: every thread of the
process, none of the others on the machine), so another busy process does not stretch one size's
runs and not the other's (a wall-clock ratio failed a CI run once: SQLite's delete beside a
stream, 0.14 then 0.45 s). Latencies (a victim's token gaps) stay wall-clock."""

from __future__ import annotations

import gc
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import trio

LINEAR = 2.8  # a doubling's time ratio a linear parse stays under (noise allowed); 4 is quadratic
FLOOR = 0.02  # seconds: below this, timer noise decides the ratio


def best(fn: Callable[[], Any], reps: int = 3) -> float:
    """The fastest of ``reps`` runs (the least disturbed by the other tests on the machine),
    the collector held off while each runs: its full collections come when the heap has grown
    by a share, so they land in one size's runs and not the other's (a linear validation of
    4,000 then 8,000 messages read 2.8 then 3.5 with them, 2.0 without)."""
    fastest = float("inf")
    gc.collect()
    gc.disable()
    try:
        for _ in range(reps):
            t0 = time.process_time()
            fn()
            fastest = min(fastest, time.process_time() - t0)
    finally:
        gc.enable()
    return fastest


def growth(fn: Callable[[Any], Any], make: Callable[[int], Any], n: int,
           reps: int = 3) -> tuple[float, float, float]:
    """Times of ``fn`` on ``make(n)`` and ``make(2n)``, and their ratio."""
    small, big = make(n), make(2 * n)
    fn(small)  # warm (regex compile caches, imports)
    t1 = best(lambda: fn(small), reps)
    t2 = best(lambda: fn(big), reps)
    return t1, t2, t2 / max(t1, 1e-6)


def assert_linear(fn: Callable[[Any], Any], make: Callable[[int], Any], n: int,
                  what: str, reps: int = 3) -> None:
    t1, t2, ratio = growth(fn, make, n, reps)
    if ratio >= LINEAR and t2 > FLOOR:  # one retry at double the size: a spike is no defect
        n *= 2
        t1, t2, ratio = growth(fn, make, n, reps)
    assert ratio < LINEAR or t2 <= FLOOR, (
        f"{what}: n={n} {t1:.4f}s, n={2 * n} {t2:.4f}s, ratio {ratio:.2f}")


async def gaps_around(client: httpx.AsyncClient, conversation: str,
                      hostile: Callable[[], Awaitable[None]], at: int = 300) -> tuple[float, float]:
    """A victim's stream (``POST .../messages``, ``stream: true``, a reply of many tokens a few
    ms apart) with ``hostile`` started at its ``at``-th token: the largest gap between two of
    its tokens before (past its first 20) and the largest while ``hostile`` runs, in seconds."""
    arrivals: list[float] = []
    started: list[float] = []

    async def go() -> None:
        started.append(time.perf_counter())
        await hostile()

    async with trio.open_nursery() as nursery, \
            client.stream("POST", f"/api/conversations/{conversation}/messages",
                          json={"content": "victim", "stream": True}) as resp:
        async for line in resp.aiter_lines():
            if line.startswith("event: token"):
                arrivals.append(time.perf_counter())
                if len(arrivals) == at:
                    nursery.start_soon(go)
            elif line.startswith("event: run.finished"):
                break
    assert len(arrivals) >= at + 100, len(arrivals)
    assert started
    before = [b - a for a, b in itertools.pairwise(arrivals) if b <= started[0]]
    during = [b - a for a, b in itertools.pairwise(arrivals) if a >= started[0]]
    return max(before[20:]), max(during)


async def asked_twice(client: httpx.AsyncClient) -> tuple[str, str]:
    """A new chat conversation asked twice (a plan walk sees its statements on a conversation
    with a history): its id and the second run's."""
    conv = (await client.post("/api/conversations", json={"agent": "chat"})).json()["id"]
    run_id = ""
    for _ in range(2):
        r = await client.post(f"/api/conversations/{conv}/messages", json={"content": "hi"})
        assert r.status_code in (200, 201), r.text
        run_id = r.json()["run"]["id"]
    return conv, run_id
