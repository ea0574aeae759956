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
    calls: list[tuple[float, int]] = field(default_factory=list)  # (time, generation)
    ticks: list[float] = field(default_factory=list)  # each time it looked at the count
    frozen: list[float] = field(default_factory=list)
    thresholds: list[tuple[int, ...]] = field(default_factory=list)

    def collect(self, generation: int = 2) -> int:
        self.calls.append((trio.current_time(), generation))
        return 0

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
    monkeypatch.setattr(sys, "getallocatedblocks", lambda: fake.blocks)
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
        # Doubled: one full collection within a look at the heap's size (not at every tick:
        # the look walks the heap), and growth is measured from there.
        fake.blocks = 2001
        doubled_at = trio.current_time()
        await trio.sleep(server._GC_GROWTH_EVERY + 0.05)
        fulls = [t for t, g in fake.calls if g == 2 and t > doubled_at]
        assert len(fulls) == 1
        assert fulls[0] - doubled_at <= server._GC_GROWTH_EVERY + 0.01
        assert fake.calls[-1][1] == 1
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
