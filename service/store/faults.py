"""Faults injected into a store's real write path, for tests and fault drills.

Both stores carry one (``store.faults``). What it injects goes through the store's own code, so
the store answers as it would to the real fault (its errors, ``write_error`` and ``/readyz``,
the supervisor's retries): a test states the fault, not the store's insides.

* ``before_commit``: called in the writer thread, inside each write transaction, just before
  COMMIT. Raising :class:`InjectedFault` there fails the whole batch as a failed COMMIT would;
  blocking there holds the transaction open (a slow disk). ``committing`` names, meanwhile,
  the writes the transaction holds (the store's names: ``"begin_run"``, ``"append_run_events"``,
  ...): a store inside a running service commits on its own too (its lease's renewal, upkeep,
  call records), and a hook meant for one write tells it from those.
* ``before_batch``: awaited in trio once a batch is taken, before its thread starts (shielded,
  like the batch): a writer stuck that long, with the batch's writes already taken.
* ``before_read``: called in trio with the read's name (``"list_run_events"``, ...) before each
  read; what it raises (a ``StoreError``, as the database's own failures become) is what the
  read raises.
* ``hold_writes()`` / ``release_writes()`` / ``writes_held()``: hold the write queue's lock, as
  a batch in progress (or a store closing) does: writes queue up behind it and, once released,
  go in one batch (``queued_writes`` counts them meanwhile).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from .group_commit import GroupCommit

__all__ = ["InjectedFault", "StoreFaults"]


class InjectedFault(Exception):
    """A failure a hook raises in the store's write path. Both stores answer it as they answer
    the database's own passing failures (an I/O error, a full volume, a lost connection):
    ``StoreUnavailable``, the write not done. Its message may name the fault ("database or
    disk is full" is taken for a full volume by SQLite's store)."""


class StoreFaults:
    def __init__(self, commits: GroupCommit[Any]) -> None:
        self._commits = commits
        self._lock = commits.lock
        self.before_commit: Callable[[], None] | None = None
        self.before_batch: Callable[[], Awaitable[None]] | None = None
        self.before_read: Callable[[str], None] | None = None
        # The writes of the transaction ``before_commit`` is called for (set only then).
        self.committing: tuple[str, ...] = ()

    def __repr__(self) -> str:
        hooks = [n for n in ("before_commit", "before_batch", "before_read")
                 if getattr(self, n) is not None]
        return f"<StoreFaults [{', '.join(hooks) or 'none'}]>"

    async def hold_writes(self) -> None:
        """Take the write lock (until :meth:`release_writes`, from the same task)."""
        await self._lock.acquire()

    def release_writes(self) -> None:
        self._lock.release()

    @asynccontextmanager
    async def writes_held(self) -> AsyncIterator[None]:
        async with self._lock:
            yield

    @property
    def queued_writes(self) -> int:
        """Writes waiting for the next batch."""
        return len(self._commits.queue)

    def clear(self) -> None:
        self.before_commit = self.before_batch = self.before_read = None
