"""The pause between tries of a write the store refused (a full volume, a database away), and
the loop both writers of held records run: write when woken, again after a pause while
refused."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

__all__ = ["Backoff", "Wakeup", "write_when_woken"]

FIRST, MOST = 0.1, 2.0  # seconds: the first pause, doubling up to this


class Backoff:
    """``await backoff.pause()`` between tries: 0.1 s, doubling to 2 s; ``reset()`` once a try
    succeeds."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = FIRST

    def reset(self) -> None:
        self._next = FIRST

    async def pause(self) -> None:
        await trio.sleep(self._next)
        self._next = min(2 * self._next, MOST)



class Wakeup:
    """What a writer waits on: ``set()`` by whoever has something for it (sync); ``wait()``
    returns once it is set, and clears it."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = trio.Event()


async def write_when_woken(wakeup: Wakeup, write: Callable[[], Awaitable[bool]]) -> None:
    """Until cancelled: ``write()`` each time ``wakeup`` is set; while it returns False (the
    store refused what it holds), again after a pause, doubling."""
    backoff = Backoff()
    while True:
        await wakeup.wait()
        if await write():
            backoff.reset()
            continue
        await backoff.pause()
        wakeup.set()
