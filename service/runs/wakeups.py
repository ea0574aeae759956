"""Wake-ups from other instances: a reader of a run served elsewhere, or the look for cancels
asked of this process, waits here instead of sleeping its whole poll interval.

The store's ``listen`` calls :meth:`Wakeups.notified` with what other instances committed (on
PostgreSQL, LISTEN/NOTIFY: ids only, the rows stay the truth); on SQLite nothing comes and every
wait simply lasts its timeout (the poll it replaces). A notification missed (the listening
connection lost) costs one poll interval, never an event: the waiters always read the store.

Marks: a reader notes :meth:`mark` before it reads the store, and :meth:`since` tells it later
whether its run was announced after that; so a reader whose read returned events does not read
again until the run's next commit is announced, and a wait ends at once for an announcement
that came while it was reading. While nothing is announced (SQLite, a lost listener) every
mark says "maybe": the reader reads as it polls.
"""

from __future__ import annotations

import trio

__all__ = ["Wakeups"]

_MARKS_MAX = 10_000  # runs whose last notification is remembered


class Wakeups:
    def __init__(self) -> None:
        self._runs: dict[str, tuple[trio.Event, int]] = {}  # run id -> (event, waiters)
        self._cancels = trio.Event()
        self.cancels_announced = 0  # cancel notifications so far (a mark for wait_cancels)
        # Marks: a reader notes ``mark()`` before it reads the store; ``since(run, mark)``
        # then says whether anything of the run was announced after it.
        self.listening = False  # notifications come (the listening connection is up)
        # The listening connection was lost and is not back: the database may be away
        # (a read then waits the pool's acquire_timeout for a connection).
        self.away = False
        self._count = 0  # notifications so far
        self._last: dict[str, int] = {}  # run id -> the count at its last notification
        self._horizon = 0  # marks before this are too old to tell: taken as notified

    def __repr__(self) -> str:
        return f"<Wakeups [{len(self._runs)} runs waited on]>"

    def notified(self, payload: str) -> None:
        """A notification (one per commit): run ids and ``cancel:<run id>`` (a cancel asked),
        comma-separated; ``*`` (all: the listening connection is (re)established, or a commit
        named too many runs) or ``!`` (it is lost)."""
        if "cancel:" in payload:
            self._wake_cancels()
            payload = ",".join(i for i in payload.split(",") if not i.startswith("cancel:"))
            if not payload:
                return
        self._count += 1
        if payload in ("*", "!"):
            self.listening = payload == "*"
            self.away = payload == "!"
            self._horizon = self._count
            self._last.clear()
            self._wake_cancels()
            for event, _ in self._runs.values():
                event.set()
            self._runs.clear()
            return
        if len(self._last) >= _MARKS_MAX:  # forget them all: older marks read again
            self._horizon = self._count
            self._last.clear()
        for run_id in payload.split(","):
            self._last[run_id] = self._count
            entry = self._runs.pop(run_id, None)
            if entry is not None:
                entry[0].set()

    def mark(self) -> int:
        """A mark to note before reading the store."""
        return self._count

    def since(self, run_id: str, mark: int | None) -> bool:
        """Whether ``run_id`` may have been announced after ``mark``: True when unknown (no
        notifications come, or came since: the listener was lost or is back, ``!``/``*``)."""
        if mark is None or mark < self._horizon or not self.listening:
            return True
        return self._last.get(run_id, 0) > mark

    def _wake_cancels(self) -> None:
        self.cancels_announced += 1
        cancels, self._cancels = self._cancels, trio.Event()
        cancels.set()

    async def wait_run(self, run_id: str, seconds: float, *, since: int | None = None) -> bool:
        """Like ``trio.sleep(seconds)`` (a poll interval), but over (True) as soon as another
        instance commits something of ``run_id``, or at once if it did after the mark
        ``since``."""
        if since is not None and self.listening and self.since(run_id, since):
            # Announced after the mark (or the listener came back since: ``*``, every reader
            # reads again). While nothing is announced the wait is the poll it replaces.
            await trio.lowlevel.checkpoint()
            return True
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

    async def wait_cancels(self, seconds: float, *, since: int | None = None) -> None:
        """Like ``trio.sleep(seconds)``, but over as soon as another instance asks for a
        cancel, or at once if one did after ``since`` (a count of ``cancels_announced``
        noted before the last look: an announcement during that look is not lost)."""
        if since is not None and self.cancels_announced != since:
            await trio.lowlevel.checkpoint()
            return
        with trio.move_on_after(seconds):
            await self._cancels.wait()
