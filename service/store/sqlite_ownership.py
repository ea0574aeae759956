"""The SQLite store's queries about who runs what: leases, runs left by a process that is gone,
cancels asked across processes (``SQLiteOwnership``, a part of ``SQLiteQueries``)."""

from __future__ import annotations

import os
import socket
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal, TypeVar

from .ownership import close_interrupted, owner_alive

if TYPE_CHECKING:
    from ..metrics import Metrics

__all__ = ["SQLiteOwnership"]

T = TypeVar("T")

# Whether a run's owner holds a current lease: 1/0, NULL if it has none (the parameter: now).
_LEASE_ALIVE = "CASE WHEN i.id IS NULL THEN NULL ELSE i.lease_until > ? END"
# Takes a run for its closer if it is still in progress (reason, now, closer, run id).
_CLAIM = ("UPDATE runs SET status = 'failed', error = ?, finished_at = ?, process = ? "
          "WHERE id = ? AND status IN ('queued', 'running')")


def _flag(value: object) -> bool | None:
    return None if value is None else bool(value)


class SQLiteOwnership:
    """Leases and ownership, as SQLite SQL."""

    process_id: str  # how this process tags the runs it runs
    _metrics: Metrics  # the engine's

    if TYPE_CHECKING:  # the engine's (SQLiteStore)
        async def _write(self, op: str, fn: Callable[[sqlite3.Connection], T]) -> T: ...

        async def _read(self, op: str, fn: Callable[[sqlite3.Connection], T]) -> T: ...

    async def recover_interrupted(self, run_id: str | None = None, *,
                                  abandoned: bool = False) -> list[str]:
        """Close runs left ``queued``/``running`` by a process that is gone (killed, crashed).

        Each becomes ``failed`` ("interrupted"), its pending reply ``error`` with what it had,
        and gets a final ``run.finished`` event, so nothing hangs as "running" forever and a
        client re-joining it gets a clean end. Runs of live processes (other workers sharing
        the file) are left alone. Returns the ids closed.

        Called at start-up, and by the run supervisor every ``upkeep.RECOVER_EVERY`` seconds
        (workers sharing the file close a dead sibling's runs): a read finds them; only then a
        write, which closes each only if it is still in progress (another worker may have been
        first).
        ``run_id``: look at that run only (a reader following a run whose owner is gone).
        ``abandoned``: ``run_id`` is this process's own, whose start it answered as failed
        (``Store.recover_interrupted``).
        """
        if abandoned and run_id is None:
            raise ValueError("abandoned: one run of this process's, named")
        now = time.time()
        reason = ("the run could not be started: the store failed as it was written"
                  if abandoned else "interrupted: the service stopped before the run finished")

        def find(c: sqlite3.Connection) -> list[str]:
            sql = ("SELECT r.id, r.process, " + _LEASE_ALIVE + " FROM runs r LEFT JOIN "
                   "instances i ON i.id = r.process WHERE r.status IN ('queued', 'running')")
            rows = (c.execute(sql + " AND r.id = ?", (time.time(), run_id))
                    if run_id is not None else c.execute(sql, (time.time(),))).fetchall()
            if abandoned:  # this process's own, which it does not run
                return [rid for rid, proc, _ in rows if proc == self.process_id]
            return [rid for rid, proc, lease in rows if proc != self.process_id
                    and not owner_alive(proc, self.process_id, _flag(lease))]

        candidates = await self._read("find_interrupted", find)
        if not candidates:
            return []

        def close(rid: str) -> Callable[[sqlite3.Connection], bool]:
            return lambda c: close_interrupted(c.execute, _CLAIM, rid, reason, now,
                                               self.process_id)

        # One write each: a dead worker's runs closed in one held every other write (every
        # stream's tokens) while it read all their events.
        closed: list[str] = []
        for rid in candidates:
            if await self._write("recover_interrupted", close(rid)):
                closed.append(rid)
                # Ended here, not by its owner (it is gone): counted once, by its closer, as
                # its write lands (the loop may stop before the next: a shutdown, a refusal).
                self._metrics.runs.labels("failed").inc()
        return closed

    async def run_in_progress(self, run_id: str) -> Literal["here", "elsewhere"] | None:
        """Where a run stored as ``queued``/``running`` runs: ``"here"`` (this process),
        ``"elsewhere"`` (another live worker sharing the file), or None: not in progress, or
        its process is gone (the next start closes such runs)."""
        def fn(c: sqlite3.Connection) -> Literal["here", "elsewhere"] | None:
            row = c.execute(
                "SELECT r.process, " + _LEASE_ALIVE + " FROM runs r LEFT JOIN instances i "
                "ON i.id = r.process WHERE r.id = ? AND r.status IN ('queued', 'running')",
                (time.time(), run_id),
            ).fetchone()
            if row is None:
                return None
            if row[0] == self.process_id:
                return "here"
            alive = owner_alive(row[0], self.process_id, _flag(row[1]))
            return "elsewhere" if alive else None

        return await self._read("run_in_progress", fn)

    async def renew_lease(self, seconds: float) -> None:
        """This process is alive for ``seconds`` more (``ownership``)."""
        until = time.time() + seconds
        pid, host = os.getpid(), socket.gethostname()
        await self._write("renew_lease", lambda c: c.execute(
            "INSERT INTO instances (id, lease_until, host, pid) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET lease_until = excluded.lease_until",
            (self.process_id, until, host, pid)))

    async def end_lease(self) -> None:
        """This process stops: its lease ends now (others close what it left at once)."""
        await self._write("end_lease", lambda c: c.execute(
            "DELETE FROM instances WHERE id = ? OR lease_until < ?",
            (self.process_id, time.time() - 86_400)))

    async def request_cancel(self, run_id: str, reason: str) -> bool:
        """Ask the process running a run to cancel it (for a run of another worker sharing the
        file). False if the run is not in progress."""
        def fn(c: sqlite3.Connection) -> bool:
            return c.execute(
                "UPDATE runs SET cancel_requested = COALESCE(cancel_requested, ?) "
                "WHERE id = ? AND status IN ('queued', 'running')", (reason, run_id),
            ).rowcount > 0

        return await self._write("request_cancel", fn)

    async def runs_missing(self, run_ids: Sequence[str]) -> list[str]:
        """Of ``run_ids``, those with no row (deleted with their conversation)."""
        def fn(c: sqlite3.Connection) -> list[str]:
            present: set[str] = set()
            for at in range(0, len(run_ids), 500):  # under SQLite's bound on parameters
                part = run_ids[at:at + 500]
                present.update(r[0] for r in c.execute(
                    f"SELECT id FROM runs WHERE id IN ({','.join('?' * len(part))})", part))
            return [r for r in run_ids if r not in present]

        return await self._read("runs_missing", fn) if run_ids else []

    async def cancel_requests(self) -> list[tuple[str, str]]:
        """(run id, reason) of this process's runs whose cancel another worker asked for."""
        def fn(c: sqlite3.Connection) -> list[tuple[str, str]]:
            return c.execute(
                "SELECT id, cancel_requested FROM runs WHERE status IN ('queued', 'running') "
                "AND process = ? AND cancel_requested IS NOT NULL", (self.process_id,),
            ).fetchall()

        return await self._read("cancel_requests", fn)
