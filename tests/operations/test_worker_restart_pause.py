"""The worker pool's restart pause ends with a stop (in-process, on trio's virtual clock): a
worker slot that keeps failing to start sleeps ever longer between tries (up to 30 s), and a
SIGTERM in that sleep made the parent wait for it to run out while every other worker had
drained. Failed before its fix (the pause was a plain sleep)."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import trio

from service import workers
from service.workers import _Pool


class _Dead:
    """A worker process that has exited: its sentinel is readable."""

    pid = None
    exitcode = 1

    def __init__(self, sentinel: int) -> None:
        self.sentinel = sentinel

    def join(self) -> None:
        pass

    def is_alive(self) -> bool:
        return False


async def test_a_stop_ends_a_slots_restart_pause(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch,
) -> None:
    ended, other = socket.socketpair()
    other.close()  # ``ended`` is readable (EOF): a worker that has exited
    starts: list[float] = []

    async def start(self: _Pool, slot: int) -> tuple[Any, bool]:
        starts.append(trio.current_time())
        self.procs[slot] = proc = _Dead(ended.fileno())
        return proc, len(starts) == 1  # up once, then dies; every replacement fails

    monkeypatch.setattr(_Pool, "_start", start)
    pool = _Pool(settings=None, config=None, sockets=None)  # type: ignore[arg-type]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run_slot, 0)
            while len(starts) < 5:  # noqa: ASYNC110 (the fake's record)
                await trio.sleep(0.01)
            await trio.sleep(1)  # in the pause after the 4th failed start: 8 s
            stopped_at = trio.current_time()
            pool.stop()
        took = trio.current_time() - stopped_at
    finally:
        ended.close()
    assert len(starts) == 5, starts  # nothing started after the stop
    assert pool.exit_codes == [0], pool.exit_codes
    assert took < 1, f"the slot slept on {took:g}s of its restart pause after the stop"
    assert workers._RESTART_MAX >= 8  # the pause the test stops in is within the bound
