"""The server's garbage-collector pacing (service.server._pace_gc), in virtual time."""

from __future__ import annotations

import gc
import sys

import pytest
import trio
import trio.testing

from service import server


async def test_young_generations_on_a_clock_full_on_growth_or_age(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    calls: list[tuple[float, int]] = []
    blocks = [1000]
    frozen: list[float] = []
    thresholds: list[tuple[int, ...]] = []

    def collect(generation: int = 2) -> int:
        calls.append((trio.current_time(), generation))
        return 0

    monkeypatch.setattr(gc, "collect", collect)
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(trio.current_time()))
    monkeypatch.setattr(gc, "set_threshold", lambda *t: thresholds.append(t))
    monkeypatch.setattr(sys, "getallocatedblocks", lambda: blocks[0])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server._pace_gc)
        await trio.sleep(1.0 + 0.05 * 10 + 0.01)
        # Start-up: one full collection, then everything alive is frozen; thresholds are a
        # backstop. Then the two young generations every tick.
        assert frozen == [1.0]
        assert thresholds == [(server._GC_GEN0, server._GC_GEN1, server._GC_GEN2)]
        assert calls[0] == (1.0, 2)
        assert [g for _, g in calls[1:]] == [1] * 10
        assert [round(t - 1.0, 2) for t, _ in calls[1:]] == [
            round(0.05 * i, 2) for i in range(1, 11)]
        # The heap grows, but not to double: still young collections only.
        blocks[0] = 1999
        await trio.sleep(0.05)
        assert calls[-1][1] == 1
        # Doubled: one full collection, and growth is measured from there.
        blocks[0] = 2001
        await trio.sleep(0.05)
        assert calls[-1][1] == 2
        await trio.sleep(0.05)
        assert calls[-1][1] == 1
        # However little grows, a full collection at least every _GC_FULL_AT_LEAST seconds.
        last_full = calls[-2][0]
        await trio.sleep(server._GC_FULL_AT_LEAST)
        fulls = [t for t, g in calls if g == 2 and t > last_full]
        assert fulls
        assert fulls[0] - last_full == pytest.approx(server._GC_FULL_AT_LEAST, abs=0.06)
        nursery.cancel_scope.cancel()
