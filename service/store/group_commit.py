"""Group commit: the write queue both stores share (SQLite's and PostgreSQL's).

Writes that queue up while another batch is in its thread go together: the first waiter to get
the lock takes the whole queue and hands it to the store, which runs it as one transaction in
one thread hop, each write under its own SAVEPOINT (one failing write does not undo the others);
the other waiters find their write done.

* **Call order**: a call joins the queue before its first checkpoint and the queue is taken
  whole and in order, so writes land in the order they were called (``RunSupervisor`` relies
  on it: a run's first write is called before anything else about the run).
* **Failure**: a batch that fails as a whole (outside its transaction, which answers each
  write itself) fails every write in it with ``StoreUnavailable``: none is told it landed.
* **Cancellation**: a write still queued when its caller is cancelled is removed and never
  runs; one already taken lands whole and its caller gets its answer (the cancellation is
  re-delivered by trio at the caller's next checkpoint). A batch, once taken, runs shielded.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import trio

from ..errors import StoreError, StoreUnavailable
from ..logs import get_logger

__all__ = ["GroupCommit", "PendingWrite"]

C = TypeVar("C")  # the store's connection type

log = get_logger("service.store")

BATCH_WAIT = 60.0  # seconds a cancelled writer waits for the batch that took its write


class PendingWrite(Generic[C]):
    """One queued write: its function (and the store's name for it), and its result or error
    once its batch has run."""

    __slots__ = ("done", "error", "fn", "op", "result", "taken")

    def __init__(self, fn: Callable[[C], Any], op: str = "") -> None:
        self.fn = fn
        self.op = op
        self.taken = False
        self.done = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class GroupCommit(Generic[C]):
    """The queue and the lock. ``run_batch`` (the store's) runs a batch and sets each write's
    ``result`` or ``error``; it is called shielded, one batch at a time."""

    def __init__(self, run_batch: Callable[[list[PendingWrite[C]]], Awaitable[None]]) -> None:
        self.lock = trio.Lock()  # held while a batch runs (and by a store closing)
        self.queue: list[PendingWrite[C]] = []
        self._run_batch = run_batch

    def __repr__(self) -> str:
        busy = "writing" if self.lock.locked() else "idle"
        return f"<GroupCommit [{busy}, {len(self.queue)} queued]>"

    async def submit(self, fn: Callable[[C], Any], op: str = "") -> PendingWrite[C]:
        """Queue ``fn`` (the write ``op``) and return it once its batch has run (see its result
        or error)."""
        item: PendingWrite[C] = PendingWrite(fn, op)
        self.queue.append(item)
        try:
            async with self.lock:
                if not item.taken:
                    batch, self.queue = self.queue, []
                    for it in batch:
                        it.taken = True
                    try:
                        # Shielded: once taken, a batch runs (its thread could not be
                        # cancelled anyway; this closes the gap before the thread starts,
                        # where a cancel would drop every write of the batch).
                        with trio.CancelScope(shield=True):
                            await self._run_batch(batch)
                    except BaseException as exc:  # noqa: ASYNC103 (re-raised unless an Exception)
                        # Failed as a whole, outside its transaction (its thread did not
                        # start, say): no write of it landed, and each one's caller is told.
                        log.error("a batch of %d writes failed before it ran: %r",
                                  len(batch), exc)
                        error = exc if isinstance(exc, StoreError) else StoreUnavailable(
                            f"store write failed: {type(exc).__name__}: {exc}")
                        for it in batch:
                            if it.error is None:
                                it.error = error
                        if not isinstance(exc, Exception):
                            raise
                    finally:
                        for it in batch:
                            it.done.set()
        except trio.Cancelled:  # noqa: ASYNC103 (re-delivered by trio; see below)
            if not item.taken:
                self.queue.remove(item)  # never started: it will never land
                raise
            # Taken by another task's batch, which will commit it: wait for that (shielded,
            # bounded) and answer, as a write in its own thread would. The cancellation is not
            # lost: trio re-delivers it at the caller's next checkpoint.
            with trio.move_on_after(BATCH_WAIT, shield=True):
                await item.done.wait()
            if not item.done.is_set():
                raise
        except BaseException:
            if not item.taken:
                self.queue.remove(item)
            raise
        return item
