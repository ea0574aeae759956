"""The pause between tries of a write the store refused (a full volume, a database away)."""

from __future__ import annotations

import trio

__all__ = ["Backoff"]

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
