"""Wake-ups from other instances: a reader of a run served elsewhere, or the look for cancels
asked of this process, waits here instead of sleeping its whole poll interval.

The store's ``listen`` calls :meth:`Wakeups.notified` with what other instances committed (on
PostgreSQL, LISTEN/NOTIFY: ids only, the rows stay the truth); on SQLite nothing comes and every
wait simply lasts its timeout (the poll it replaces). A notification missed (the listening
connection lost) costs one poll interval, never an event: the waiters always read the store.
"""

from __future__ import annotations

import trio

__all__ = ["Wakeups"]


class Wakeups:
    def __init__(self) -> None:
        self._runs: dict[str, tuple[trio.Event, int]] = {}  # run id -> (event, waiters)
        self._cancels = trio.Event()

    def __repr__(self) -> str:
        return f"<Wakeups [{len(self._runs)} runs waited on]>"

    def notified(self, payload: str) -> None:
        """A notification: ``cancel:<run id>``, run ids comma-separated, or ``*`` (all)."""
        if payload.startswith("cancel:"):
            self._wake_cancels()
            return
        if payload == "*":
            self._wake_cancels()
            for event, _ in self._runs.values():
                event.set()
            self._runs.clear()
            return
        for run_id in payload.split(","):
            entry = self._runs.pop(run_id, None)
            if entry is not None:
                entry[0].set()

    def _wake_cancels(self) -> None:
        cancels, self._cancels = self._cancels, trio.Event()
        cancels.set()

    async def wait_run(self, run_id: str, seconds: float) -> bool:
        """Like ``trio.sleep(seconds)`` (a poll interval), but over (True) as soon as another
        instance commits something of ``run_id``."""
        event, waiters = self._runs.get(run_id, (trio.Event(), 0))
        self._runs[run_id] = (event, waiters + 1)
        try:
            with trio.move_on_after(seconds):
                await event.wait()
                return True
            return False
        finally:
            entry = self._runs.get(run_id)
            if entry is not None and entry[0] is event:
                if entry[1] <= 1:
                    del self._runs[run_id]
                else:
                    self._runs[run_id] = (event, entry[1] - 1)

    async def wait_cancels(self, seconds: float) -> None:
        """Like ``trio.sleep(seconds)``, but over as soon as another instance asks for a
        cancel."""
        with trio.move_on_after(seconds):
            await self._cancels.wait()
