"""The SQLite store's run-event SQL: batched inserts (fenced to the runs a process holds) and the
pruning a retention pass or a conversation's delete does, a bounded number of rows at a time."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from .records import KEPT_EVENTS_SQL, RunEvent

__all__ = ["insert_events", "not_held", "prune_runs"]


# Events of a run whose conversation was deleted meanwhile are dropped, not an error: one batch
# holds several runs' events and must not fail for one of them.
# Up to this many events per INSERT statement: one sqlite3 step per chunk instead of one per
# event. Each step releases the GIL and must win it back from the busy event loop (up to the
# interpreter's switch interval each time), so a batch costs a few hand-offs, not hundreds.
_EVENTS_PER_INSERT = 150
_INSERT_EVENTS_SQL: dict[tuple[int, bool, bool], str] = {}


def _insert_events_sql(n: int, ignore: bool = False, fenced: bool = False) -> str:
    sql = _INSERT_EVENTS_SQL.get((n, ignore, fenced))
    if sql is None:
        values = ", ".join(["(?, ?, ?, ?, ?)"] * n)
        # An event of a run that is gone (its conversation deleted meanwhile) is dropped;
        # ``fenced``: so is one of a run this process no longer holds (closed by another).
        sql = _INSERT_EVENTS_SQL[n, ignore, fenced] = (
            f"INSERT {'OR IGNORE ' if ignore else ''}INTO run_events "
            "(run_id, seq, type, data, created_at) "
            f"SELECT column1, column2, column3, column4, column5 FROM (VALUES {values}) "
            "WHERE EXISTS (SELECT 1 FROM runs WHERE id = column1"
            + (" AND process = ?)" if fenced else ")")
        )
    return sql


def insert_events(
    c: sqlite3.Connection, events: Sequence[RunEvent], *, ignore: bool = False,
    process: str | None = None,
) -> int:
    """Insert ``events``; ``process``: only those of runs that process holds. Rows inserted."""
    inserted = 0
    for start in range(0, len(events), _EVENTS_PER_INSERT):
        chunk = events[start:start + _EVENTS_PER_INSERT]
        params: list[Any] = []
        for e in chunk:
            raw = e.raw
            params += (e.run_id, e.seq, e.type, raw, e.created_at)
        if process is not None:
            params.append(process)
        inserted += c.execute(
            _insert_events_sql(len(chunk), ignore, process is not None), params).rowcount
    return inserted


def not_held(c: sqlite3.Connection, run_ids: set[str], process: str) -> set[str]:
    """Those of ``run_ids`` that ``process`` no longer holds: closed by another instance (which
    then holds them), or gone."""
    held: set[str] = set()
    ids = list(run_ids)
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        held.update(rid for (rid,) in c.execute(
            f"SELECT id FROM runs WHERE id IN ({', '.join('?' * len(chunk))}) AND process = ?",
            (*chunk, process)))
    return run_ids - held


def prune_runs(c: sqlite3.Connection, runs: list[str], rows: int) -> int:
    """Delete at most ``rows`` events of these (finished) runs but their kept ones, marking a
    run pruned once none is left; the work done (rows deleted + runs marked), 0 when none."""
    budget, done = rows, 0
    for run_id in runs:
        deleted = c.execute(
            "DELETE FROM run_events WHERE run_id = ? AND seq IN (SELECT seq FROM "
            "run_events WHERE run_id = ? AND type NOT IN (" + KEPT_EVENTS_SQL + ") "
            "LIMIT ?)", (run_id, run_id, budget)).rowcount
        budget -= deleted
        done += deleted
        if budget <= 0:
            break  # maybe more of this run: the next call goes on with it
        c.execute("UPDATE runs SET events_pruned = 1 WHERE id = ?", (run_id,))
        done += 1
    return done
