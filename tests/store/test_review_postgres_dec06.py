"""Review of the PostgreSQL store and cross-instance coordination (2026-12-06).

Against the session's real PostgreSQL (tests/pg.py, ``pg_url``: a fresh database per test); two
stores opened on one database stand for two instances.
"""

from __future__ import annotations

import threading

import psycopg
import trio

from service.errors import NotFound
from service.store import open_store


async def _a_statement_waits_on_a_lock(url: str) -> None:
    """Until a session of this database waits on a row lock (another's uncommitted write)."""
    def waiting() -> bool:
        with psycopg.connect(url, autocommit=True) as conn:
            return bool(conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'").fetchone()[0])  # type: ignore[index]

    with trio.fail_after(30):  # a hang guard only
        while not await trio.to_thread.run_sync(waiting):  # noqa: ASYNC110 (polls the database)
            await trio.sleep(0.02)


async def test_a_run_begun_on_another_instance_while_its_conversation_is_deleted_is_not_found(
    pg_url: str,
) -> None:
    """Two instances: A deletes a conversation while B begins a run on it (a second tab
    posting). Whichever lands first, B's answer is the store's contract for a missing id,
    NotFound (404, as SQLite gives: its writers go one at a time, so B finds no conversation),
    not a foreign-key violation surfacing as a StoreError (500). Here A's delete holds the
    conversation's row (uncommitted) when B reads it: B's UPDATE then waits for A, finds the row
    gone (nothing updated, unchecked) and its INSERT of the run violates runs' foreign key."""
    async with open_store(pg_url) as a, open_store(pg_url) as b:
        conv = await a.create_conversation(title="t")
        inside, release = threading.Event(), threading.Event()

        commits = 0

        def hold() -> None:  # A's delete, written and not yet committed
            nonlocal commits
            commits += 1
            if commits == 1:
                return  # (its runs' events pruned first: none here)
            inside.set()
            release.wait(30)

        a.faults.before_commit = hold
        outcome: dict[str, object] = {}

        async def begin() -> None:
            try:
                outcome["begun"] = await b.begin_run(conv.id, content="hi", agent=None,
                                                     model=None)
            except Exception as exc:  # (what it raises is the point)
                outcome["error"] = exc

        async def delete() -> None:
            await a.delete_conversation(conv.id)
            outcome["deleted"] = True

        async with trio.open_nursery() as nursery:
            nursery.start_soon(delete)
            await trio.to_thread.run_sync(inside.wait, 30)
            nursery.start_soon(begin)
            try:
                await _a_statement_waits_on_a_lock(pg_url)  # B waits on A's delete
            finally:
                release.set()
        # (Held open for well under the server's idle_in_transaction_session_timeout, 5 s.)
        assert outcome.get("deleted"), "the delete did not land: the race was not staged"
        assert "begun" not in outcome, "a run was begun on a deleted conversation"
        error = outcome["error"]
        assert isinstance(error, NotFound), f"{type(error).__name__}: {error}"
