"""The PostgreSQL store's queries about who runs what: leases, runs left by a process that is
gone, cancels asked across processes (``PostgresOwnership``, a part of ``PostgresQueries``; the
same as :mod:`.sqlite_ownership` in PostgreSQL's dialect, leases in the database's time)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import psycopg

from .ownership import close_interrupted, owner_alive
from .pg_notify import notify as _notify

if TYPE_CHECKING:
    from ..metrics import Metrics

__all__ = ["Conn", "PostgresOwnership", "qmarks"]

T = TypeVar("T")
Conn = psycopg.Connection[Any]


def qmarks(c: Conn) -> Callable[[str, Sequence[object]], Any]:
    """``c.execute`` for SQL written with ``?`` placeholders (``ownership``'s, both stores')."""
    def execute(sql: str, args: Sequence[object]) -> Any:
        # (a literal "%" in that SQL would be psycopg's: escaped first)
        return c.execute(sql.replace("%", "%%").replace("?", "%s"), args)  # type: ignore[arg-type]

    return execute

# Whether a run's owner holds a current lease (in the database's time), NULL if it has none.
_LEASE_ALIVE = ("CASE WHEN i.id IS NULL THEN NULL "
                "ELSE i.lease_until > extract(epoch FROM clock_timestamp()) END")
# Takes a run for its closer if it is still in progress and no open batch locks its row
# (reason, now, closer, run id; ``?`` placeholders, as ``ownership.close_interrupted`` writes).
_CLAIM = ("UPDATE runs SET status = 'failed', error = ?, finished_at = ?, process = ? "
          "WHERE id = (SELECT id FROM runs WHERE id = ? AND status IN ('queued', 'running') "
          "FOR UPDATE SKIP LOCKED)")


class PostgresOwnership:
    """Leases and ownership, as PostgreSQL SQL."""

    process_id: str  # how this process tags the runs it runs
    _metrics: Metrics  # the engine's

    if TYPE_CHECKING:  # the engine's (PostgresStore)
        async def _write(self, op: str, fn: Callable[[Conn], T]) -> T: ...

        async def _read(self, op: str, fn: Callable[[Conn], T]) -> T: ...

        async def _lease_write(self, op: str, query: str, params: tuple[Any, ...]) -> None: ...

        async def _write_alone(self, op: str, fn: Callable[[Conn], T]) -> T: ...

    async def recover_interrupted(self, run_id: str | None = None, *,
                                  abandoned: bool = False) -> list[str]:
        """Close runs left in progress by a process that is gone (see SQLiteStore's)."""
        if abandoned and run_id is None:
            raise ValueError("abandoned: one run of this process's, named")
        now = time.time()
        reason = ("the run could not be started: the store failed as it was written"
                  if abandoned else "interrupted: the service stopped before the run finished")

        def find(c: Conn) -> list[str]:
            sql = ("SELECT r.id, r.process, " + _LEASE_ALIVE + " FROM runs r LEFT JOIN "
                   "instances i ON i.id = r.process WHERE r.status IN ('queued', 'running')")
            rows = (c.execute(sql + " AND r.id = %s", (run_id,)) if run_id is not None
                    else c.execute(sql)).fetchall()
            if abandoned:  # this process's own, which it does not run
                return [rid for rid, proc, _ in rows if proc == self.process_id]
            return [rid for rid, proc, lease in rows if proc != self.process_id
                    and not owner_alive(proc, self.process_id, lease)]

        candidates = await self._read("find_interrupted", find)
        if not candidates:
            return []

        def close(rid: str) -> Callable[[Conn], bool]:
            def fn(c: Conn) -> bool:
                # A run whose row a stalled owner's open batch still locks is left for the next
                # look (the server ends that transaction: idle_in_transaction_session_timeout).
                if not close_interrupted(qmarks(c), _CLAIM, rid, reason, now, self.process_id):
                    return False
                _notify(c, {rid})  # its followers elsewhere read the end now
                return True
            return fn

        # One write each, in the order owners' batches lock runs: a dead instance's runs
        # closed in one held its batch (every stream's tokens behind it) while it read all
        # their events.
        closed: list[str] = []
        for rid in sorted(candidates):
            if await self._write("recover_interrupted", close(rid)):
                closed.append(rid)
                # Ended here, not by its owner (it is gone): counted once, by its closer, as
                # its write lands (the loop may stop before the next: a shutdown, a refusal).
                self._metrics.runs.labels("failed").inc()
        return closed

    async def run_in_progress(self, run_id: str) -> Literal["here", "elsewhere"] | None:
        def fn(c: Conn) -> Literal["here", "elsewhere"] | None:
            row = c.execute(
                "SELECT r.process, " + _LEASE_ALIVE + " FROM runs r LEFT JOIN instances i "
                "ON i.id = r.process WHERE r.id = %s AND r.status IN ('queued', 'running')",
                (run_id,)).fetchone()
            if row is None:
                return None
            if row[0] == self.process_id:
                return "here"
            return "elsewhere" if owner_alive(row[0], self.process_id, row[1]) else None

        return await self._read("run_in_progress", fn)

    async def renew_lease(self, seconds: float) -> None:
        """This process is alive for ``seconds`` more (``ownership``), in the database's time:
        hosts' clocks may differ. Outside the write queue, bounded to a third of a lease
        (``PostgresStore._lease_write``)."""
        pid, host = os.getpid(), socket.gethostname()
        await self._lease_write(
            "renew_lease",
            "INSERT INTO instances (id, lease_until, host, pid) VALUES "
            "(%s, extract(epoch FROM clock_timestamp()) + %s, %s, %s) "
            "ON CONFLICT (id) DO UPDATE SET lease_until = EXCLUDED.lease_until",
            (self.process_id, seconds, host, pid))

    async def end_lease(self) -> None:
        """This process stops: its lease ends now (others close what it left at once)."""
        await self._lease_write(
            "end_lease",
            # The probe rows its own batches (or another instance's) hold are skipped, never
            # waited on (a batch may wait on a slow statement): one left is cleared later.
            "WITH probed AS (DELETE FROM probes WHERE id IN (SELECT id FROM probes WHERE "
            "id = %s OR at < extract(epoch FROM clock_timestamp()) - 86400 "
            "FOR UPDATE SKIP LOCKED)) "
            "DELETE FROM instances WHERE id = %s "
            "OR lease_until < extract(epoch FROM clock_timestamp()) - 86400",
            (self.process_id, self.process_id))

    async def request_cancel(self, run_id: str, reason: str) -> bool:
        def fn(c: Conn) -> bool:
            asked = c.execute(
                "UPDATE runs SET cancel_requested = COALESCE(cancel_requested, %s) "
                "WHERE id = %s AND status IN ('queued', 'running')", (reason, run_id),
            ).rowcount > 0
            if asked:
                _notify(c, [f"cancel:{run_id}"])
            return asked

        # Alone: the run is another instance's, whose event batch holds its row (the fence)
        # until it commits. In the group commit its wait held every write queued here, and two
        # instances cancelling each other's runs deadlocked.
        return await self._write_alone("request_cancel", fn)

    async def runs_missing(self, run_ids: Sequence[str]) -> list[str]:
        """See ``SQLiteStore.runs_missing``."""
        def fn(c: Conn) -> list[str]:
            present = {r[0] for r in c.execute(
                "SELECT id FROM runs WHERE id = ANY(%s)", (list(run_ids),)).fetchall()}
            return [r for r in run_ids if r not in present]

        return await self._read("runs_missing", fn) if run_ids else []

    async def cancel_requests(self) -> list[tuple[str, str]]:
        def fn(c: Conn) -> list[tuple[str, str]]:
            return [(r[0], r[1]) for r in c.execute(
                "SELECT id, cancel_requested FROM runs WHERE status IN ('queued', 'running') "
                "AND process = %s AND cancel_requested IS NOT NULL", (self.process_id,),
            ).fetchall()]

        return await self._read("cancel_requests", fn)
