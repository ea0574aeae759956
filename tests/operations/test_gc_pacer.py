"""The server's garbage-collector pacing (service.server._pace_gc), in virtual time."""

from __future__ import annotations

import gc
import itertools
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from service import server


@dataclass
class _Gc:
    """What the pacer asked of the collector, and what the collector tells it."""

    young: int = 10 * server._GC_IDLE_BELOW  # new young objects at each tick
    blocks: int = 1000
    rss: int = 100 << 20  # the process's resident bytes
    counts: list[float] = field(default_factory=list)  # each time it counted the heap
    calls: list[tuple[float, int]] = field(default_factory=list)  # (time, generation)
    ticks: list[float] = field(default_factory=list)  # each time it looked at the count
    frozen: list[float] = field(default_factory=list)
    thresholds: list[tuple[int, ...]] = field(default_factory=list)

    def collect(self, generation: int = 2) -> int:
        self.calls.append((trio.current_time(), generation))
        return 0

    def getallocatedblocks(self) -> int:
        self.counts.append(trio.current_time())
        return self.blocks

    def get_count(self) -> tuple[int, int, int]:
        self.ticks.append(trio.current_time())
        return (self.young, 0, 0)


@asynccontextmanager
async def _pacer(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[_Gc]:
    fake = _Gc()
    monkeypatch.setattr(gc, "collect", fake.collect)
    monkeypatch.setattr(gc, "get_count", fake.get_count)
    monkeypatch.setattr(gc, "freeze", lambda: fake.frozen.append(trio.current_time()))
    monkeypatch.setattr(gc, "set_threshold", lambda *t: fake.thresholds.append(t))
    monkeypatch.setattr(sys, "getallocatedblocks", fake.getallocatedblocks)
    monkeypatch.setattr(server, "_resident_bytes", lambda: fake.rss)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server._pace_gc)
        yield fake
        nursery.cancel_scope.cancel()


async def test_young_generations_on_a_clock_full_on_growth_or_age(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    async with _pacer(monkeypatch) as fake:
        await trio.sleep(1.0 + 0.05 * 10 + 0.01)
        # Start-up: one full collection, then everything alive is frozen; thresholds are a
        # backstop. Then, busy, the two young generations every tick.
        assert fake.frozen == [1.0]
        assert fake.thresholds == [(server._GC_GEN0, server._GC_GEN1, server._GC_GEN2)]
        assert fake.calls[0] == (1.0, 2)
        assert [g for _, g in fake.calls[1:]] == [1] * 10
        assert [round(t - 1.0, 2) for t, _ in fake.calls[1:]] == [
            round(0.05 * i, 2) for i in range(1, 11)]
        # The heap grows, but not to double: still young collections only.
        fake.blocks = 1999
        await trio.sleep(server._GC_GROWTH_EVERY + 0.05)
        assert {g for _, g in fake.calls[11:]} == {1}
        # Counting the heap walks it: it is counted every _GC_GROWTH_EVERY seconds, not at
        # every tick, while the resident memory stays put.
        counted_from = trio.current_time()
        await trio.sleep(3 * server._GC_GROWTH_EVERY)
        gaps = [round(b - a, 2) for a, b in itertools.pairwise(
            t for t in fake.counts if t > counted_from)]
        assert len(gaps) >= 2
        assert all(server._GC_GROWTH_EVERY <= g <= server._GC_GROWTH_EVERY
                   + server._GC_YOUNG_EVERY + 0.001 for g in gaps), gaps
        # Doubled, the memory still put: one full collection at the next count, and growth is
        # measured from there.
        fake.blocks = 2001
        doubled_at = trio.current_time()
        await trio.sleep(server._GC_GROWTH_EVERY + 0.05)
        fulls = [t for t, g in fake.calls if g == 2 and t > doubled_at]
        assert len(fulls) == 1
        assert fulls[0] - doubled_at <= server._GC_GROWTH_EVERY + 0.01
        assert fake.calls[-1][1] == 1
        # Doubled again and the memory grew by a quarter: counted, and collected, at once.
        fake.blocks, fake.rss = 4003, int(fake.rss * server._GC_RSS_GROWTH) + 1
        grown_at = trio.current_time()
        await trio.sleep(0.2)
        fulls = [t for t, g in fake.calls if g == 2 and t > grown_at]
        assert len(fulls) == 1
        assert fulls[0] - grown_at <= server._GC_YOUNG_EVERY + 0.001
        # However little grows, a full collection at least every _GC_FULL_AT_LEAST seconds.
        last_full = fulls[0]
        await trio.sleep(server._GC_FULL_AT_LEAST)
        fulls = [t for t, g in fake.calls if g == 2 and t > last_full]
        assert fulls
        assert fulls[0] - last_full == pytest.approx(server._GC_FULL_AT_LEAST, abs=0.06)


async def test_an_idle_server_collects_nothing_and_ticks_ever_less_often(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    async with _pacer(monkeypatch) as fake:
        fake.young = server._GC_IDLE_BELOW - 1
        await trio.sleep(1.0 + 10.0)
        # Nothing new to collect: no young collections (only the start-up's full one), and
        # the ticks space out, doubling, to one a second.
        assert fake.calls == [(1.0, 2)]
        gaps = [round(b - a, 3) for a, b in itertools.pairwise([1.0, *fake.ticks])]
        assert gaps[:6] == [0.05, 0.1, 0.2, 0.4, 0.8, server._GC_IDLE_EVERY]
        assert set(gaps[5:]) == {server._GC_IDLE_EVERY}
        assert len(fake.ticks) < 16  # 10 idle seconds; at the busy pace, 200
        # Busy again: the next tick collects and the 50 ms pace is back.
        fake.young = server._GC_IDLE_BELOW
        busy_at = trio.current_time()
        await trio.sleep(server._GC_IDLE_EVERY + 0.5 + 0.001)
        young = [t for t, g in fake.calls if g == 1]
        assert young[0] - busy_at <= server._GC_IDLE_EVERY
        gaps = [round(b - a, 3) for a, b in itertools.pairwise(young)]
        assert len(gaps) >= 10
        assert set(gaps) == {server._GC_YOUNG_EVERY}
