"""Relay overhead (service vs straight to the simulator, alternating) and flood throughput."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import trio

from .client import StreamResult
from .harness import Bench
from .stats import ms, pct

__all__ = ["RelayLevel", "relay", "throughput"]


@dataclass(frozen=True)
class RelayLevel:
    streams: int  # concurrent streams, each a closed loop of back-to-back requests
    tokens: int  # per stream
    interval: float  # seconds between tokens (the simulator's pacing)
    seconds: float  # per round and target: new streams start until then
    rounds: int  # direct, openai, native, direct, ... (the order rotates each round)


async def _round(bench: Bench, name: str, level: RelayLevel) -> tuple[list[StreamResult], Any]:
    results: list[StreamResult] = []
    stream_time = level.tokens * level.interval
    limit = stream_time + 30.0

    async def worker(delay: float, until: float) -> None:
        await trio.sleep(delay)
        while time.perf_counter() < until:
            res = StreamResult(name)
            res.tag = bench.new_tag(f"relay-{name}")
            results.append(await bench.stream(name, res.tag, limit=limit, result=res))

    with bench.cpu(name) as cpu:
        until = time.perf_counter() + level.seconds
        # Stagger the first requests over one stream's length: a steady state, not a stampede.
        spread = min(stream_time, level.seconds / 2) if level.streams > 1 else 0.0
        async with trio.open_nursery() as nursery:
            for _ in range(level.streams):
                nursery.start_soon(worker, random.uniform(0, spread), until)
    return results, cpu


def _ttfts(results: list[StreamResult]) -> list[float]:
    return [t for r in results if r.ok and (t := r.ttft) is not None]


def _target_summary(results: list[StreamResult], wall: float,
                    records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    ttft = _ttfts(results)
    gaps = [g for r in ok for g in r.gaps()]
    tokens = sum(r.tokens for r in results)
    # TTFT split by the simulator's record: request sent -> upstream request received, and
    # upstream first chunk sent -> first token at the client.
    before, after = [], []
    for r in ok:
        rec = records.get(r.tag)
        if rec and r.first_token_at is not None and rec["first_chunk"] is not None:
            before.append(rec["started"] - r.sent_at)
            after.append(r.first_token_at - rec["first_chunk"])
    kinds: dict[str, int] = {}
    for r in results:
        if not r.ok:
            kind = (r.error or f"HTTP {r.status}").split(":")[0][:40]
            kinds[kind] = kinds.get(kind, 0) + 1
    return {
        "streams": len(results), "errors": len(results) - len(ok), "error_kinds": kinds,
        "ttft_p50_ms": ms(pct(ttft, 0.5)), "ttft_p99_ms": ms(pct(ttft, 0.99)),
        "to_upstream_p50_ms": ms(pct(before, 0.5)), "to_upstream_p99_ms": ms(pct(before, 0.99)),
        "first_chunk_to_client_p50_ms": ms(pct(after, 0.5)),
        "first_chunk_to_client_p99_ms": ms(pct(after, 0.99)),
        "gap_p50_ms": ms(pct(gaps, 0.5)), "gap_p99_ms": ms(pct(gaps, 0.99)),
        "chunks_per_s": round(tokens / wall, 1) if wall else None,
        "_ttft": ttft, "_gaps": gaps,
    }


async def relay(bench: Bench, levels: list[RelayLevel],
                names: tuple[str, ...] = ("direct", "openai", "native")) -> list[dict[str, Any]]:
    """Each level: rounds of every target in ``names`` in turn (the first is the baseline)."""
    out = []
    for level in levels:
        await bench.configure(tokens=level.tokens, interval=level.interval)
        marker = await bench.sim_marker()
        per: dict[str, list[StreamResult]] = {n: [] for n in names}
        by_round: dict[str, list[list[StreamResult]]] = {n: [] for n in names}
        cpu: dict[str, dict[str, float]] = {n: {} for n in names}
        wall: dict[str, float] = dict.fromkeys(names, 0.0)
        for r in range(level.rounds):
            k = r % len(names)
            order = names[k:] + names[:k]
            for name in order:
                results, window = await _round(bench, name, level)
                per[name] += results
                by_round[name].append(results)
                wall[name] += window.wall
                for k, v in window.as_dict().items():
                    if isinstance(v, float | int):  # not the per-worker list
                        cpu[name][k] = cpu[name].get(k, 0.0) + v
        records = {r["tag"]: r for r in (await bench.sim_records(marker))["records"]}
        summaries = {n: _target_summary(per[n], wall[n], records) for n in names}
        base_ttft, base_gaps = summaries[names[0]]["_ttft"], summaries[names[0]]["_gaps"]
        row: dict[str, Any] = {"streams": level.streams, "tokens": level.tokens,
                               "interval_ms": level.interval * 1000, "targets": {}}
        for n in names:
            s = summaries[n]
            ttft, gaps = s.pop("_ttft"), s.pop("_gaps")
            rounds = max(level.rounds, 1)
            s["cpu"] = {k: round(v / rounds, 2) for k, v in cpu[n].items()}
            # Each round's TTFT p50: the host's speed drifts between rounds and runs, and a
            # ratio between two targets is best read round by round (each round runs every
            # target once, one after the other).
            s["ttft_p50_rounds_ms"] = [ms(pct(_ttfts(rs), 0.5)) for rs in by_round[n]]
            if n != names[0]:
                s["added_ttft_p50_ms"] = ms(pct(ttft, 0.5) - pct(base_ttft, 0.5))
                s["added_ttft_p50_rounds_ms"] = [
                    ms(pct(_ttfts(rs), 0.5) - pct(_ttfts(base), 0.5))
                    for rs, base in zip(by_round[n], by_round[names[0]], strict=True)]
                s["added_ttft_p99_ms"] = ms(pct(ttft, 0.99) - pct(base_ttft, 0.99))
                s["added_gap_p50_ms"] = ms(pct(gaps, 0.5) - pct(base_gaps, 0.5))
                s["added_gap_p99_ms"] = ms(pct(gaps, 0.99) - pct(base_gaps, 0.99))
            row["targets"][n] = s
        out.append(row)
    return out


async def throughput(bench: Bench, *, streams: int, tokens: int, seconds: float) -> dict[str, Any]:
    """A flood upstream (no pacing): chunks relayed per second and per service CPU-second."""
    await bench.configure(tokens=tokens, interval=0.0)
    out: dict[str, Any] = {"streams": streams, "tokens_per_stream": tokens}
    for name in ("direct", "openai"):
        results: list[StreamResult] = []

        async def worker(until: float, name: str = name,
                         results: list[StreamResult] = results) -> None:
            while time.perf_counter() < until:
                results.append(await bench.stream(name, bench.new_tag("flood"), limit=120,
                                                  record=False))

        with bench.cpu() as cpu:
            until = time.perf_counter() + seconds
            async with trio.open_nursery() as nursery:
                for _ in range(streams):
                    nursery.start_soon(worker, until)
        relayed = sum(r.tokens for r in results)
        row: dict[str, Any] = {
               "streams_done": len(results), "errors": sum(not r.ok for r in results),
               "chunks": relayed, "chunks_per_s": round(relayed / cpu.wall, 1),
               **cpu.as_dict()}
        if name == "openai":
            row["chunks_per_service_cpu_s"] = (
                round(relayed / cpu.service, 1) if cpu.service else None)
        row["chunks_per_client_cpu_s"] = round(relayed / cpu.client, 1) if cpu.client else None
        out[name] = row
    return out
