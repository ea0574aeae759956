"""The stores: concurrency, ordering, multi-process, crash safety and cancellation.

Tests taking ``db`` run on both stores: a SQLite file and a fresh database on a real PostgreSQL
server (tests/pg.py). They reach a store through its interface and its public fault injection
(``store.faults``: the write queue held, a hook before COMMIT). Tests marked
"SQLite only" check SQLite's own mechanics (the file, the WAL, PRAGMAs, processes on one file).
PostgreSQL-only faults (a restart, a wrong password) are in tests/store/test_postgres.py.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
import trio.testing

from service.errors import NotFound, StoreError
from service.store import (
    LLMCallOutcome,
    LLMCallRecord,
    MessageStatus,
    RunEvent,
    SQLiteStore,
    make_store,
    new_id,
    open_store,
)
from service.store.schema import SCHEMA_VERSION

from ..servers import ROOT

CHILD = str(ROOT / "tests" / "store_child.py")


class _RawSQL:
    """SQL straight to either store's database (SQLite's ``?`` placeholders), bypassing it."""

    def __init__(self, db: Path | str) -> None:
        self._pg = isinstance(db, str)
        self._conn: Any = (psycopg.connect(db, autocommit=True) if isinstance(db, str)
                           else sqlite3.connect(db))

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        return self._conn.execute(sql.replace("?", "%s") if self._pg else sql, params)

    def commit(self) -> None:
        if not self._pg:
            self._conn.commit()

    def close(self) -> None:
        self._conn.close()


async def test_schema_is_versioned_and_wal(tmp_path: Path) -> None:
    # SQLite only: PRAGMAs of the file.
    db = tmp_path / "s.db"
    async with open_store(db):
        pass
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"conversations", "messages", "runs", "run_events", "llm_calls"} <= tables
    conn.close()
    # Re-opening an up-to-date database migrates nothing and keeps data.
    async with open_store(db) as store:
        conv = await store.create_conversation(title="t")
    async with open_store(db) as store:
        assert (await store.get_conversation(conv.id)).title == "t"


async def test_closing_a_dead_runs_reply_finds_it_by_index(tmp_path: Path) -> None:
    # SQLite only (PostgreSQL's schema has messages_run from its first version). The recovery
    # of a dead process's runs closes their replies by run id: without an index, a scan of
    # every message per run at every start after a crash. A file made at version 6 gets it.
    from service.store.schema import MIGRATIONS

    db = tmp_path / "s.db"
    conn = sqlite3.connect(db)
    for migration in MIGRATIONS[:6]:
        for statement in migration:
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 6")
    conn.commit()
    conn.close()
    async with open_store(db):
        pass
    conn = sqlite3.connect(db)
    plan = " ".join(str(row) for row in conn.execute(
        "EXPLAIN QUERY PLAN UPDATE messages SET status = 'error' "
        "WHERE run_id = ? AND status = 'pending'", ("run_x",)))
    conn.close()
    assert "USING INDEX messages_run" in plan, plan


async def test_calls_stored_before_their_owner_column_are_listed_by_owner(
    tmp_path: Path,
) -> None:
    # Schema 9 keeps each LLM call's owner (its run's) so that one key's calls are listed by
    # an index: calls stored before it get their runs' owners, and each key still sees its
    # own only.
    db = tmp_path / "s.db"
    async with open_store(db) as store:
        ids = {}
        for owner in ("alice", "bob"):
            conv = await store.create_conversation(owner=owner)
            run = (await store.begin_run(conv.id, content="q", agent="chat", model=None,
                                         owner=owner)).run
            ids[owner] = new_id("call")
            await store.record_llm_call(LLMCallRecord(ids[owner], "sim", "m",
                                                      LLMCallOutcome.ok, 1.0, run_id=run.id))
    conn = sqlite3.connect(db)  # as a file of schema 8 had them: no owner column
    conn.execute("DROP TRIGGER runs_unanswered_key")  # (schema 11's)
    conn.execute("DROP INDEX runs_idempotency")
    conn.execute("ALTER TABLE runs DROP COLUMN idempotency_key")
    conn.execute("DROP TRIGGER llm_calls_owner_of_run")  # (schema 10's)
    conn.execute("DROP INDEX llm_calls_owner")
    conn.execute("ALTER TABLE llm_calls DROP COLUMN owner")
    conn.execute("PRAGMA user_version = 8")
    conn.commit()
    conn.close()
    async with open_store(db) as store:
        for owner in ("alice", "bob"):
            assert [c.id for c in await store.list_llm_calls(owner=owner)] == [ids[owner]]
        assert len(await store.list_llm_calls()) == 2


async def test_refuses_a_newer_schema(tmp_path: Path) -> None:
    # SQLite only: PRAGMA user_version (PostgreSQL: test_postgres.py).
    db = tmp_path / "s.db"
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        async with open_store(db):
            pass


async def test_messages_runs_events_calls_round_trip(db: Path | str) -> None:
    async with open_store(db) as store:
        conv = await store.create_conversation(title="t", owner="o1")
        with pytest.raises(NotFound):
            await store.get_conversation(conv.id, owner="o2")
        begun = await store.begin_run(conv.id, content="hi", agent="chat", model="m",
                                      owner="o1")
        run, pending = begun.run, begun.reply
        msgs = await store.get_messages(conv.id)
        assert [(m.role, m.content, m.status) for m in msgs] == [
            ("user", "hi", MessageStatus.complete),
            ("assistant", "", MessageStatus.pending),
        ]
        assert [(e.seq, e.type) for e in await store.list_run_events(run.id)] == [
            (1, "run.started")]
        assert await store.append_run_events(
            [RunEvent(run.id, i, "token", {"text": str(i)}, 0.0) for i in range(2, 6)]
        ) == set()
        assert await store.finish_run(
            run.id, status="cancelled", message_id=pending.id, content="partial",
            message_status=MessageStatus.cancelled, error="cancelled by client",
            usage={"total": 3},
            events=[RunEvent(run.id, 6, "run.finished", {"status": "cancelled"}, 0.0)])
        msgs = await store.get_messages(conv.id)
        assert [(m.role, m.content, m.status) for m in msgs] == [
            ("user", "hi", MessageStatus.complete),
            ("assistant", "partial", MessageStatus.cancelled),
        ]
        assert msgs[1].error == "cancelled by client"
        got = await store.get_run(run.id, owner="o1")
        assert (got.status, got.error, got.usage) == (
            "cancelled", "cancelled by client", {"total": 3})
        assert got.started_at is not None
        assert got.finished_at is not None
        assert got.finished_at >= got.started_at
        after = await store.list_run_events(run.id, after=2)
        assert [e.seq for e in after] == [3, 4, 5, 6]
        rec = LLMCallRecord(new_id("call"), "sim", "m", LLMCallOutcome.cancelled, 1.0,
                            run_id=run.id, completion_tokens=4, tokens_estimated=True)
        await store.record_llm_call(rec)
        assert await store.list_llm_calls(run_id=run.id) == [rec]
        with pytest.raises(NotFound):
            await store.append_message("conv_missing", role="user", content="x")
        # Deleting a conversation takes its messages, runs and events with it, and its runs'
        # LLM calls (they stayed, listed for a conversation its user had deleted).
        other = (await store.begin_run((await store.create_conversation()).id,
                                       content="q", agent="chat", model="m")).run
        kept = LLMCallRecord(new_id("call"), "sim", "m", LLMCallOutcome.ok, 2.0, run_id=other.id)
        await store.record_llm_call(kept)
        await store.delete_conversation(conv.id, owner="o1")
        assert await store.get_messages(conv.id) == []
        assert await store.list_run_events(run.id) == []
        assert await store.list_llm_calls(run_id=run.id) == []
        assert await store.list_llm_calls() == [kept]
        # A call whose run is not stored (it ended after its conversation's delete; or its
        # run's first write failed) happened all the same: kept, tied to no run.
        late = LLMCallRecord(new_id("call"), "sim", "m", LLMCallOutcome.cancelled, 3.0,
                             run_id=run.id)
        await store.record_llm_call(late)
        assert await store.list_llm_calls(run_id=run.id) == []
        assert await store.list_llm_calls() == [replace(late, run_id=None), kept]


async def _finished_run(store: Any, conv: str, tokens: int, owner: str | None) -> str:
    begun = await store.begin_run(conv, content="q", agent="chat", model="m", owner=owner)
    run = begun.run.id
    await store.append_run_events(
        [RunEvent(run, i, "token", {"text": "t"}, 0.0) for i in range(2, tokens + 2)])
    await store.finish_run(
        run, status="succeeded", message_id=begun.reply.id, content="t" * tokens,
        message_status=MessageStatus.complete, error=None, usage={},
        events=[RunEvent(run, tokens + 2, "message", {"content": "t" * tokens}, 0.0),
                RunEvent(run, tokens + 3, "run.finished", {"status": "succeeded"}, 0.0)])
    return str(run)


async def test_a_conversations_delete_takes_its_events_in_bounded_writes(
    db: Path | str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A long conversation's events went in one transaction (ON DELETE CASCADE): every other
    # write of the process waited behind it. Now its finished runs are pruned first, a bounded
    # number of rows per write, each run keeping its start, answer and end until the last
    # write (a re-join meanwhile is told those, as of a run the retention pruned), and
    # nothing of another conversation or owner is touched.
    monkeypatch.setattr("service.store.sqlite_queries.PRUNE_ROWS", 50)
    monkeypatch.setattr("service.store.postgres_queries.PRUNE_ROWS", 50)
    seen: list[tuple[int, set[str]]] = []  # at each commit: events stored, kept types per run

    def look() -> None:  # in the writer thread, before its transaction commits
        conn: Any = psycopg.connect(db) if isinstance(db, str) else sqlite3.connect(db)
        try:
            total = conn.execute("SELECT COUNT(*) FROM run_events").fetchone()[0]
            ends = {f"{r[0]} {r[1]}" for r in conn.execute(
                "SELECT run_id, type FROM run_events WHERE type IN ('message', 'run.finished')")}
            seen.append((total, ends))
        finally:
            conn.close()

    async with open_store(db) as store:
        conv = (await store.create_conversation(owner="o1")).id
        other = (await store.create_conversation(owner="o1")).id
        runs = [await _finished_run(store, conv, 120, "o1") for _ in range(3)]
        kept = await _finished_run(store, other, 120, "o1")
        live = (await store.begin_run(conv, content="q2", agent="chat", model="m",
                                      owner="o1")).run.id
        await store.append_run_events([RunEvent(live, 2, "token", {"text": "t"}, 0.0)])
        with pytest.raises(NotFound):
            await store.delete_conversation(conv, owner="o2")
        assert len(await store.list_run_events(runs[0], limit=1000)) == 123
        store.faults.before_commit = look
        try:
            await store.delete_conversation(conv, owner="o1")
        finally:
            store.faults.before_commit = None
        look()
        totals = [t for t, _ in seen]
        assert totals[0] == 4 * 123 + 2
        assert totals[-1] == 123  # the other conversation's run, whole
        assert max(a - b for a, b in itertools.pairwise(totals)) <= 50, totals
        # Each run's answer and end are there until the conversation's own delete.
        everyone = {f"{r} {t}" for r in runs for t in ("message", "run.finished")}
        assert all(everyone <= ends for _, ends in seen[:-1]), seen
        assert [e.seq for e in await store.list_run_events(kept, limit=1000)] == list(
            range(1, 124))
        for run in [*runs, live]:
            with pytest.raises(NotFound):
                await store.get_run(run, owner="o1")
            assert await store.list_run_events(run) == []


async def test_a_runs_end_moves_its_conversations_updated_at(db: Path | str) -> None:
    """A conversation's ``updated_at`` moves when its reply is decided (the run's end, or its
    close by a survivor), as it does for a new message: a client syncing what changed since a
    time would otherwise miss an answer that landed after its question. Never backwards."""
    async with open_store(db) as store:
        conv = await store.create_conversation()
        begun = await store.begin_run(conv.id, content="q", agent="chat", model="m")
        asked = (await store.get_conversation(conv.id)).updated_at
        assert await store.finish_run(
            begun.run.id, status="succeeded", message_id=begun.reply.id, content="a",
            message_status=MessageStatus.complete, error=None, usage={})
        answered = (await store.get_run(begun.run.id)).finished_at
        assert answered is not None
        assert answered > asked
        assert (await store.get_conversation(conv.id)).updated_at >= answered
        # An end stamped earlier (another host's clock, or an end stored well after the run
        # ended, its write refused for a while) does not take it back: the reply changed when
        # the store took it, and updated_at moves past what a client saw before.
        second = await store.begin_run(conv.id, content="q2", agent="chat", model="m")
        stamped = (await store.get_conversation(conv.id)).updated_at
        assert await store.finish_run(
            second.run.id, status="succeeded", message_id=second.reply.id, content="b",
            message_status=MessageStatus.complete, error=None, usage={},
            finished_at=stamped - 30.0)
        assert (await store.get_run(second.run.id)).finished_at == stamped - 30.0
        assert (await store.get_conversation(conv.id)).updated_at > stamped
        # A run another process holds is not this one's to end: nothing moves.
        third = await store.begin_run(conv.id, content="q3", agent="chat", model="m")
        before = (await store.get_conversation(conv.id)).updated_at
        conn = _RawSQL(db)
        conn.execute("UPDATE runs SET process = ? WHERE id = ?", ("999999999:1", third.run.id))
        conn.commit()
        conn.close()
        assert not await store.finish_run(
            third.run.id, status="succeeded", message_id=third.reply.id, content="c",
            message_status=MessageStatus.complete, error=None, usage={})
        assert (await store.get_conversation(conv.id)).updated_at == before
        # ... until a survivor closes it (its owner is gone): its reply is decided then.
        assert await store.recover_interrupted() == [third.run.id]
        closed = (await store.get_run(third.run.id)).finished_at
        assert closed is not None
        assert closed > before
        assert (await store.get_conversation(conv.id)).updated_at >= closed


async def _a_run_and_one_deleted(store: Any) -> tuple[Any, Any]:
    """Two runs, each on its own conversation; the second's conversation is deleted."""
    conv = await store.create_conversation()
    gone_conv = await store.create_conversation()
    run = (await store.begin_run(conv.id, content="q", agent="chat", model="m")).run
    gone = (await store.begin_run(gone_conv.id, content="q", agent="chat", model="m")).run
    await store.delete_conversation(gone_conv.id)
    return run, gone


async def test_event_batches_span_insert_chunks_and_skip_runs_that_are_gone(
    db: Path | str,
) -> None:
    # A batch is written as multi-row INSERTs of a bounded size: a batch longer than one chunk,
    # mixing runs, lands whole and in order; events of a run deleted meanwhile are dropped.
    async with open_store(db) as store:
        run, gone = await _a_run_and_one_deleted(store)
        batch = []
        for i in range(2, 401):
            batch.append(RunEvent(run.id, i, "token", {"text": f"t{i}"}, float(i)))
            if i % 3 == 0:
                batch.append(RunEvent(gone.id, i, "token", {"text": "x"}, 0.0))
        await store.append_run_events(batch)
        got = await store.list_run_events(run.id)
        assert [(e.seq, e.data["text"], e.created_at) for e in got[1:]] == [
            (i, f"t{i}", float(i)) for i in range(2, 401)]
        assert await store.list_run_events(gone.id) == []


async def test_runs_missing_names_the_runs_deleted_with_their_conversation(
    db: Path | str,
) -> None:
    # How a worker learns that a run it runs was deleted on another worker (the upkeep's
    # cancel loop): of the ids it asks about, those with no row; more than one chunk of ids.
    async with open_store(db) as store:
        run, gone = await _a_run_and_one_deleted(store)
        never = [f"run_never_{i}" for i in range(600)]
        assert await store.runs_missing([run.id, gone.id, *never]) == [gone.id, *never]
        assert await store.runs_missing([run.id]) == []
        assert await store.runs_missing([]) == []


async def test_events_of_several_runs_in_one_read_each_after_its_cursor(db: Path | str) -> None:
    async with open_store(db) as store:
        conv = await store.create_conversation()
        runs = [(await store.begin_run(conv.id, content="q", agent="chat", model="m")).run
                for _ in range(3)]
        await store.append_run_events([
            RunEvent(r.id, i, "token", {"text": f"{n}.{i}"}, float(i))
            for i in range(2, 8) for n, r in enumerate(runs)])
        cursors = {runs[0].id: 0, runs[1].id: 5, runs[2].id: 7, "run_unknown": 0}
        got = await store.list_events_of_runs(cursors)
        assert got == {r: await store.list_run_events(r, after=a) for r, a in cursors.items()}
        assert [e.seq for e in got[runs[0].id]] == list(range(1, 8))
        assert [e.seq for e in got[runs[1].id]] == [6, 7]
        assert got[runs[2].id] == got["run_unknown"] == []
        limited = await store.list_events_of_runs(cursors, limit=2)
        assert [e.seq for e in limited[runs[0].id]] == [1, 2]
        assert await store.list_events_of_runs({}) == {}


async def test_200_tasks_20_conversations_lose_nothing_keep_order(db: Path | str) -> None:
    async with open_store(db) as store:
        convs = [await store.create_conversation(title=f"c{i}") for i in range(20)]
        per_task = 10

        async def writer(task: int) -> None:
            conv = convs[task % 20]
            for i in range(per_task):
                await store.append_message(conv.id, role="user", content=f"{task}:{i}")

        async with trio.open_nursery() as nursery:
            for task in range(200):
                nursery.start_soon(writer, task)

        total = 0
        for idx, conv in enumerate(convs):
            msgs = await store.get_messages(conv.id)
            total += len(msgs)
            by_task: dict[str, list[int]] = {}
            for m in msgs:
                task, i = m.content.split(":")
                assert int(task) % 20 == idx
                by_task.setdefault(task, []).append(int(i))
            # Each writer's messages appear in the order it appended them.
            assert all(seq == list(range(per_task)) for seq in by_task.values())
            assert len(by_task) == 10
        assert total == 200 * per_task


@pytest.mark.slow
async def test_four_processes_append_to_one_file(tmp_path: Path) -> None:
    # SQLite only: processes sharing one file.
    db = tmp_path / "s.db"
    async with open_store(db) as store:
        conv = await store.create_conversation(title="shared")
    count = 150
    procs = [
        await trio.lowlevel.open_process(
            [sys.executable, CHILD, str(db), conv.id, str(count), f"p{n}"],
            stdout=subprocess.PIPE,
        )
        for n in range(4)
    ]
    acks: list[list[str]] = [[] for _ in procs]

    async def collect(n: int) -> None:
        proc = procs[n]
        assert proc.stdout is not None
        buf = b""
        async for chunk in proc.stdout:
            buf += chunk
        assert await proc.wait() == 0
        acks[n] = [line.split()[2] for line in buf.decode().splitlines()]

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for n in range(4):
                nursery.start_soon(collect, n)
    async with open_store(db) as store:
        msgs = await store.get_messages(conv.id)
    contents = [m.content for m in msgs]
    assert len(contents) == 4 * count
    for n in range(4):
        assert len(acks[n]) == count
        mine = [c for c in contents if c.startswith(f"p{n}:")]
        assert mine == [f"p{n}:{i}" for i in range(count)]


@pytest.mark.slow
async def test_sigkill_at_random_moments_loses_no_acknowledged_write(tmp_path: Path) -> None:
    # SQLite only: the file after SIGKILLs.
    db = tmp_path / "s.db"
    async with open_store(db) as store:
        conv = await store.create_conversation(title="crash")
    rng = random.Random(20261125)
    acknowledged: list[str] = []
    for _ in range(20):
        proc = await trio.lowlevel.open_process(
            [sys.executable, CHILD, str(db), conv.id, "0", "k"], stdout=subprocess.PIPE
        )
        assert proc.stdout is not None
        kill_after = rng.randint(1, 200)  # acknowledgements to read before the kill
        buf = b""
        lines: list[str] = []
        with trio.fail_after(60):
            while len(lines) < kill_after:
                chunk = await proc.stdout.receive_some(65536)
                assert chunk, "child exited early"
                buf += chunk
                *done, buf_tail = buf.split(b"\n")
                buf = buf_tail
                lines += [d.decode() for d in done]
        # Kill mid-stream: the child is appending as fast as it can right now.
        proc.send_signal(signal.SIGKILL)
        rest = b""
        async for chunk in proc.stdout:
            rest += chunk
        await proc.wait()
        buf += rest
        lines += [d.decode() for d in buf.split(b"\n")[:-1]]  # only complete lines are acks
        acknowledged += [line.split()[1] for line in lines if line.startswith("ACK ")]

    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = {r[0] for r in conn.execute("SELECT id FROM messages")}
    conn.close()
    assert len(acknowledged) >= 20
    missing = [a for a in acknowledged if a not in stored]
    assert missing == []


async def test_write_cancelled_while_waiting_never_lands(db: Path | str) -> None:
    async with open_store(db) as store:
        conv = await store.create_conversation()
        await store.faults.hold_writes()  # another write is in progress
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def append() -> None:
                with scope:
                    await store.append_message(conv.id, role="user", content="never")

            nursery.start_soon(append)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
        store.faults.release_writes()
        assert scope.cancelled_caught
        assert await store.get_messages(conv.id) == []


async def test_write_cancelled_inside_its_transaction_lands_whole(db: Path | str) -> None:
    async with open_store(db) as store:
        conv = await store.create_conversation()
        entered, proceed = threading.Event(), threading.Event()

        def hold() -> None:
            entered.set()
            proceed.wait(30)

        store.faults.before_commit = hold
        scope = trio.CancelScope()
        returned: list[object] = []

        async def append() -> None:
            with scope:
                returned.append(
                    await store.append_messages(
                        conv.id,
                        [("user", "q", MessageStatus.complete, None),
                         ("assistant", "", MessageStatus.pending, None)],
                    )
                )
                await trio.lowlevel.checkpoint()  # the cancel is delivered here, after the write

        async with trio.open_nursery() as nursery:
            nursery.start_soon(append)
            await trio.to_thread.run_sync(entered.wait, 30)  # the write is inside its transaction
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            proceed.set()
        store.faults.before_commit = None
        assert scope.cancelled_caught
        assert len(returned) == 1
        assert [m.content for m in await store.get_messages(conv.id)] == ["q", ""]


async def test_failed_transaction_rolls_back_whole(db: Path | str) -> None:
    async with open_store(db) as store:
        conv = await store.create_conversation()

        def boom() -> None:
            raise RuntimeError("disk on fire")

        store.faults.before_commit = boom
        with pytest.raises(RuntimeError):
            await store.append_messages(
                conv.id, [("user", "a", MessageStatus.complete, None)] * 3
            )
        store.faults.before_commit = None
        assert await store.get_messages(conv.id) == []
        # The writer connection is usable afterwards.
        await store.append_message(conv.id, role="user", content="ok")
        assert len(await store.get_messages(conv.id)) == 1


async def test_closed_store_raises_store_error(db: Path | str) -> None:
    store = make_store(db)
    await store.open()
    await store.aclose()
    with pytest.raises(StoreError, match="closed"):
        await store.create_conversation()
    assert "closed" in repr(store)


async def test_group_commit_isolates_a_failing_write(db: Path | str) -> None:
    async with open_store(db) as store:
        conv = await store.create_conversation()
        results: dict[str, object] = {}

        async def append(name: str, conv_id: str) -> None:
            try:
                results[name] = (await store.append_message(conv_id, role="user",
                                                            content=name)).content
            except NotFound as exc:
                results[name] = exc

        await store.faults.hold_writes()  # queue three writes behind a busy writer
        async with trio.open_nursery() as nursery:
            for name, cid in (("a", conv.id), ("bad", "conv_missing"), ("c", conv.id)):
                nursery.start_soon(append, name, cid)
            await trio.testing.wait_all_tasks_blocked()
            assert store.faults.queued_writes == 3
            store.faults.release_writes()
        assert results["a"] == "a"
        assert results["c"] == "c"
        assert isinstance(results["bad"], NotFound)
        assert sorted(m.content for m in await store.get_messages(conv.id)) == ["a", "c"]


async def test_a_commit_hook_is_told_which_writes_it_commits(db: Path | str) -> None:
    # ``faults.committing``: the writes of the transaction ``before_commit`` is called for, so a
    # hook meant for one write is not caught by another (a lease's renewal in a running
    # service): one write alone, and a group commit of several.
    async with open_store(db) as store:
        seen: list[tuple[str, ...]] = []
        store.faults.before_commit = lambda: seen.append(store.faults.committing)
        conv = await store.create_conversation()
        await store.faults.hold_writes()
        async with trio.open_nursery() as nursery:
            for n in range(2):
                nursery.start_soon(partial(store.append_message, conv.id, role="user",
                                           content=f"m{n}"))
            await trio.testing.wait_all_tasks_blocked()
            store.faults.release_writes()
        assert seen == [("create_conversation",), ("append_message", "append_message")]


async def test_a_cancelled_writer_whose_write_was_batched_still_gets_its_answer(
    db: Path | str,
) -> None:
    async with open_store(db) as store:
        conv = await store.create_conversation()
        entered, proceed = threading.Event(), threading.Event()

        def hold() -> None:
            entered.set()
            proceed.wait(30)

        got: list[str] = []
        scope = trio.CancelScope()

        async def follower() -> None:
            with scope:
                got.append((await store.append_message(conv.id, role="user", content="f")).id)
                await trio.lowlevel.checkpoint()  # the cancel is re-delivered here

        await store.faults.hold_writes()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(store.append_message, conv.id, role="user", content="leader")
            )
            nursery.start_soon(follower)
            await trio.testing.wait_all_tasks_blocked()
            store.faults.before_commit = hold
            store.faults.release_writes()
            await trio.to_thread.run_sync(entered.wait, 30)  # both writes are in one batch
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            proceed.set()
        store.faults.before_commit = None
        assert scope.cancelled_caught
        assert len(got) == 1  # it got its acknowledgement, and the write is there
        assert sorted(m.content for m in await store.get_messages(conv.id)) == ["f", "leader"]


async def test_runs_of_a_dead_process_are_closed_at_the_next_start(db: Path | str) -> None:
    async with open_store(db) as store:
        conv = await store.create_conversation()
        run, _, reply, *_ = await store.begin_run(conv.id, content="q", agent="chat", model=None)
        await store.append_run_events([
            RunEvent(run.id, 2, "token", {"text": "half "}, 0.0),
            RunEvent(run.id, 3, "token", {"text": "an answer"}, 0.0),
        ])
        # A live run of another worker (a live process: our parent) stays untouched.
        live, *_ = await store.begin_run(conv.id, content="q2", agent="chat", model=None)
        mine = store.process_id
    conn = _RawSQL(db)
    conn.execute("UPDATE runs SET process = ? WHERE id = ?", ("999999999:1", run.id))
    # (tagged now, as a live worker's runs are: a tag is made after its process started)
    conn.execute("UPDATE runs SET process = ? WHERE id = ?",
                 (f"{os.getppid()}:{time.time_ns()}", live.id))
    conn.commit()
    conn.close()
    async with open_store(db) as store:
        assert store.process_id != mine
        assert await store.recover_interrupted() == [run.id]
        got = await store.get_run(run.id)
        assert (got.status, got.error is not None) == ("failed", True)
        msgs = {m.id: m for m in await store.get_messages(conv.id)}
        assert (msgs[reply.id].status, msgs[reply.id].content) == (
            MessageStatus.error, "half an answer")
        events = await store.list_run_events(run.id)
        assert [e.seq for e in events] == [1, 2, 3, 4]
        assert events[-1].type == "run.finished"
        assert events[-1].data["status"] == "failed"
        assert (await store.get_run(live.id)).status == "running"
        assert await store.recover_interrupted() == []


async def test_a_dead_processs_run_is_closed_with_the_model_its_tokens_named(
    db: Path | str,
) -> None:
    """A run that named no model is stored with the one that answered only at its end, which
    its owner keeps in memory until then; its tokens name it as they stream (a ``token``'s
    ``model``: the first of a call that answers). Closed by another process after the owner
    died, the run and the ``run.finished`` its followers are told name the model its last
    tokens named (a run that named its model keeps that one; one whose tokens named none,
    none: an LLM call recorded earlier, a router's say, may not be the one that answered)."""
    async with open_store(db) as store:
        conv = await store.create_conversation()
        picked, *_ = await store.begin_run(conv.id, content="q", agent="chat", model=None)
        named, *_ = await store.begin_run(conv.id, content="q", agent="chat", model="asked")
        silent, *_ = await store.begin_run(conv.id, content="q", agent="chat", model=None)
        for run in (picked, named):
            await store.append_run_events([
                RunEvent(run.id, 2, "token", {"text": "a ", "model": "first"}, 0.0),
                RunEvent(run.id, 3, "token", {"text": "b ", "model": "answered"}, 0.0),
                RunEvent(run.id, 4, "token", {"text": "c"}, 0.0),
            ])
        await store.record_llm_call(LLMCallRecord(
            new_id("call"), "sim", "router", LLMCallOutcome.ok, 1.0, run_id=silent.id))
    conn = _RawSQL(db)
    for run in (picked, named, silent):
        conn.execute("UPDATE runs SET process = ? WHERE id = ?", ("999999999:1", run.id))
    conn.commit()
    conn.close()
    async with open_store(db) as store:
        assert sorted(await store.recover_interrupted()) == sorted(
            [picked.id, named.id, silent.id])
        for run, model in ((picked, "answered"), (named, "asked"), (silent, None)):
            assert (await store.get_run(run.id)).model == model
            told = (await store.list_run_events(run.id))[-1]
            assert told.type == "run.finished"
            assert told.data.get("model") == model


_STEPS_THEN_ANSWER = (  # a ReAct run: a step's text, its step events, an answer begun
    ("token", {"text": "Thought: look\nAction: search"}),
    ("thought", {"text": "look"}),
    ("tool.call", {"name": "search", "arguments": {}, "call_id": "c"}),
    ("tool.result", {"call_id": "c", "output": "x"}),
    ("token", {"text": "The answer "}),
    ("token", {"text": "is"}),
)
_THINKING_BETWEEN_TOKENS = (  # a chat run of a reasoning model: its tokens are the answer
    ("thought", {"text": "wants a number", "reasoning": True}),
    ("token", {"text": "The answer "}),
    ("token", {"text": "is"}),
    ("thought", {"text": " units?", "reasoning": True}),
    ("token", {"text": " 42"}),
)
_FINAL_ANSWER_BEGUN = (  # a ReAct text-protocol turn cut in its final answer
    ("token", {"text": "Thought: I know it\nFinal Answer: The ans"}),
)


@pytest.mark.parametrize(("events", "kept"), [
    (_STEPS_THEN_ANSWER, "The answer is"),
    (_THINKING_BETWEEN_TOKENS, "The answer is 42"),
    (_FINAL_ANSWER_BEGUN, "The ans"),
], ids=["react-steps", "reasoning-between-tokens", "final-answer-begun"])
async def test_a_dead_process_s_cut_reply_keeps_the_answer_so_far_not_its_steps_text(
    db: Path | str, events: tuple[tuple[str, dict[str, object]], ...], kept: str,
) -> None:
    # Found in review: recovery stored every token of the run as the reply, a ReAct run's
    # "Thought: ... Action: ..." of its finished steps included; the clients had shown that
    # text as steps (the text before a step event is the step's), and the next turn's history
    # gave it to the model as its own answer. The reply is the text after the last step; a
    # reasoning model's thinking is not a step (/v1 showed the tokens around it as the answer).
    async with open_store(db) as store:
        conv = await store.create_conversation()
        run, _, reply, *_ = await store.begin_run(conv.id, content="q", agent="react", model=None)
        await store.append_run_events([RunEvent(run.id, seq, type_, data, 0.0)
                                       for seq, (type_, data) in enumerate(events, start=2)])
    conn = _RawSQL(db)
    conn.execute("UPDATE runs SET process = ? WHERE id = ?", ("999999999:1", run.id))
    conn.commit()
    conn.close()
    async with open_store(db) as store:
        assert await store.recover_interrupted() == [run.id]
        msgs = {m.id: m for m in await store.get_messages(conv.id)}
        assert (msgs[reply.id].status, msgs[reply.id].content) == (MessageStatus.error, kept)


async def test_an_abandoned_start_is_closed_only_if_it_landed(db: Path | str) -> None:
    # A run start the service answered as failed (its COMMIT lost with its connection) may
    # have landed: the process closes it, by id, as its own; nothing else of its own.
    async with open_store(db) as store:
        conv = await store.create_conversation()
        landed, *_ = await store.begin_run(conv.id, content="q", agent="chat", model=None)
        other, *_ = await store.begin_run(conv.id, content="q2", agent="chat", model=None)
        assert await store.recover_interrupted() == []  # its own runs: never "interrupted"
        assert await store.recover_interrupted("run_never_stored", abandoned=True) == []
        assert await store.recover_interrupted(landed.id, abandoned=True) == [landed.id]
        got = await store.get_run(landed.id)
        assert (got.status, "could not be started" in (got.error or "")) == ("failed", True)
        assert (await store.list_run_events(landed.id))[-1].type == "run.finished"
        assert (await store.get_run(other.id)).status == "running"
        assert await store.recover_interrupted(landed.id, abandoned=True) == []  # once
        with pytest.raises(ValueError, match="named"):
            await store.recover_interrupted(abandoned=True)


async def test_checkpoint_moves_the_wal_into_the_file(tmp_path: Path) -> None:
    # SQLite only: the WAL.
    db = tmp_path / "s.db"
    async with open_store(db) as store:
        conv = await store.create_conversation()
        for i in range(50):
            await store.append_message(conv.id, role="user", content="x" * 2000 + str(i))
        wal = db.with_name("s.db-wal")
        assert wal.stat().st_size > 0
        size_before = db.stat().st_size
        await store.maintain()
        assert db.stat().st_size > size_before  # the pages are in the main file now
        assert len(await store.get_messages(conv.id)) == 50


async def test_a_leader_cancelled_before_its_batch_starts_still_runs_it(db: Path | str) -> None:
    # Found in review: a cancel between getting the lock and starting the thread dropped the
    # whole batch while every caller was told it had landed.
    async with open_store(db) as store:
        results: dict[str, str] = {}
        leader_scope = trio.CancelScope()

        async def writer(name: str, scope: trio.CancelScope) -> None:
            with scope:
                results[name] = (await store.create_conversation(title=name)).id

        await store.faults.hold_writes()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer, "A", leader_scope)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(writer, "B", trio.CancelScope())
            await trio.testing.wait_all_tasks_blocked()
            store.faults.release_writes()  # handed to A, which is cancelled before it runs
            leader_scope.cancel()
        for conv_id in results.values():
            await store.get_conversation(conv_id)  # every acknowledged write is there
        assert "B" in results


async def test_a_cancelled_writer_never_hangs_on_a_closed_store(tmp_path: Path) -> None:
    # SQLite only: swaps the writer connection.
    store = SQLiteStore(tmp_path / "s.db")
    await store.open()
    out: dict[str, str] = {}

    async def writer(name: str, scope: trio.CancelScope) -> None:
        with scope:
            try:
                await store.create_conversation(title=name)
                out[name] = "ok"
            except StoreError:
                out[name] = "closed"

    await store.faults.hold_writes()  # aclose() in progress
    a, b = trio.CancelScope(), trio.CancelScope()
    writer_conn = store._writer
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer, "A", a)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(writer, "B", b)
            await trio.testing.wait_all_tasks_blocked()
            store._writer = None  # closed meanwhile
            store.faults.release_writes()
            b.cancel()
    assert out["A"] == "closed"
    store._writer = writer_conn
    await store.aclose()


async def test_a_reused_pid_does_not_keep_old_runs_alive(db: Path | str) -> None:
    # In a container the restarted service often gets the same PID as the one that died.
    async with open_store(db) as store:
        conv = await store.create_conversation()
        run, *_ = await store.begin_run(conv.id, content="q", agent="chat", model=None)
    conn = _RawSQL(db)
    conn.execute("UPDATE runs SET process = ?", (f"{os.getpid()}:1",))
    conn.commit()
    conn.close()
    async with open_store(db) as store:
        assert await store.recover_interrupted() == [run.id]


async def test_a_pid_reused_by_another_process_does_not_keep_old_runs_alive(
    db: Path | str,
) -> None:
    # The dead service's PID now belongs to an unrelated process (a restart, a reboot): the
    # runs are the dead service's, and are closed. The same live process is left alone.
    from service.store.ownership import process_tag

    async with open_store(db) as store:
        conv = await store.create_conversation()
        old, *_ = await store.begin_run(conv.id, content="q", agent="chat", model=None)
        live, *_ = await store.begin_run(conv.id, content="q2", agent="chat", model=None)
    other = await trio.lowlevel.open_process(["sleep", "60"])
    try:
        pid, made, boot, ticks, ns = process_tag(other.pid).split(":")
        conn = _RawSQL(db)
        conn.execute("UPDATE runs SET process = ? WHERE id = ?",  # the PID's earlier owner
                     (f"{pid}:{made}:{boot}:{int(ticks) - 100}:{ns}", old.id))
        conn.execute("UPDATE runs SET process = ? WHERE id = ?", (process_tag(other.pid),
                                                                   live.id))
        conn.commit()
        conn.close()
        async with open_store(db) as store:
            assert await store.recover_interrupted() == [old.id]
            assert (await store.get_run(live.id)).status == "running"
    finally:
        other.kill()
        with trio.move_on_after(5, shield=True):
            await other.wait()


async def test_a_clock_step_does_not_make_a_live_worker_look_dead(
    db: Path | str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found in review: start times compared with the wall clock made a live sibling worker
    # look dead after an NTP step (/proc/stat's btime moves with the clock), and a worker
    # starting then closed the sibling's running runs. Process identity no longer uses it.
    import io

    import service.store.ownership as sq

    sibling = await trio.lowlevel.open_process(["sleep", "60"])  # a live sibling worker
    try:
        tag = sq.process_tag(sibling.pid)
        async with open_store(db) as store:
            conv = await store.create_conversation()
            run, *_ = await store.begin_run(conv.id, content="q", agent="chat", model=None)
        conn = _RawSQL(db)
        conn.execute("UPDATE runs SET process = ? WHERE id = ?", (tag, run.id))
        conn.commit()
        conn.close()
        real_open = open

        def stepped_open(path: str, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if path == "/proc/stat":  # btime after the wall clock was stepped 1 hour forward
                with real_open(path, "rb") as f:
                    return io.BytesIO(b"".join(
                        b"btime %d\n" % (int(line.split()[1]) + 3600)
                        if line.startswith(b"btime ") else line for line in f))
            return real_open(path, mode, *args, **kwargs)

        monkeypatch.setattr(sq, "open", stepped_open, raising=False)
        monkeypatch.setattr(time, "time_ns", lambda: 3600 * 10**9 + time.monotonic_ns())
        async with open_store(db) as store:
            assert await store.recover_interrupted() == []
            assert (await store.get_run(run.id)).status == "running"
    finally:
        sibling.kill()
        with trio.move_on_after(5, shield=True):
            await sibling.wait()


def test_a_dead_process_not_yet_reaped_is_dead() -> None:
    # Found in review: a zombie (exited, its parent has not waited for it) still answers
    # kill(pid, 0), so its runs were left running and a re-join of one polled forever.
    from service.store.ownership import alive as _alive
    from service.store.ownership import process_tag

    child = subprocess.Popen(["sleep", "60"])
    try:
        tag = process_tag(child.pid)
        assert _alive(tag, "1:1")
        child.kill()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
        assert not _alive(tag, "1:1")
    finally:
        child.kill()
        child.wait()


def test_process_tags_carry_the_boot_and_the_start_tick() -> None:
    from service.store.ownership import alive as _alive
    from service.store.ownership import process_tag

    pid, made, boot, ticks, ns = process_tag(os.getppid()).split(":")
    assert pid == str(os.getppid())
    assert ns.isdigit()  # the PID namespace the PID means something in
    assert len(boot) == 36
    assert int(ticks) > 0
    assert _alive(f"{pid}:{made}:{boot}:{ticks}", "1:1")
    assert not _alive(f"{pid}:{made}:{boot}:{int(ticks) + 1}", "1:1")  # a later process
    assert not _alive(f"{pid}:{made}:another-boot:{ticks}", "1:1")  # before a reboot
    assert _alive(f"{pid}:{made}", "1:1")  # an older tag: the PID exists
    assert not _alive("999999999:1", "1:1")


async def test_a_huge_cursor_is_a_value_error_not_an_overflow(db: Path | str) -> None:
    import base64

    async with open_store(db) as store:
        cursor = base64.urlsafe_b64encode(b"s" + b"9" * 30).decode().rstrip("=")
        with pytest.raises(ValueError, match="cursor"):
            await store.list_conversations(before=cursor)


async def test_a_newer_schema_is_refused_without_being_touched(tmp_path: Path) -> None:
    # SQLite only: the file is left as it was.
    # Found in review: the file was switched to WAL (written to) before its version was read.
    db = tmp_path / "new.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE future (x)")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer than this code"):
        async with open_store(db):
            pass
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    conn.close()
    assert not await trio.Path(f"{db}-wal").exists()


async def test_another_programs_database_is_refused_without_being_touched(
    tmp_path: Path,
) -> None:
    # SQLite only. Suspected by the durability review: SERVICE_DB pointing at another
    # program's file (user_version 0, tables of its own) had this service's tables added to it
    # without a word, and the file switched to WAL for good.
    db = tmp_path / "theirs.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match=r"another program's database.*'invoices'"):
        async with open_store(db):
            pass
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["invoices"]
    conn.close()


async def test_the_wal_is_cut_back_once_a_long_reader_is_gone(tmp_path: Path) -> None:
    # SQLite only: the WAL.
    # Found in review: a reader in another process held checkpoints back, the WAL grew to 30 MB
    # and kept that size for the life of the process. Now it is cut back to the limit when it
    # is next reset (64 MB by default; 1 MB here).
    db = tmp_path / "w.db"
    async with open_store(db, wal_size_limit=1 << 20) as store:
        conv = await store.create_conversation(title="t")
        reader = sqlite3.connect(db)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM messages").fetchone()  # holds a snapshot
        for _ in range(300):
            await store.append_message(conv.id, role="user", content="x" * 2000)
        wal = trio.Path(f"{db}-wal")
        assert (await wal.stat()).st_size > 1 << 20
        reader.rollback()
        reader.close()
        for _ in range(3):
            await store.maintain()
            await store.append_message(conv.id, role="user", content="y")
        assert (await wal.stat()).st_size <= 1 << 20
        assert len(await store.get_messages(conv.id)) == 303  # nothing lost


async def test_an_owner_on_another_host_lives_while_its_lease_does(db: Path | str) -> None:
    # Issue 14: a PID only means something on its own host (in its own PID namespace); a run
    # of an instance elsewhere was taken for dead (its PID is not here) and closed while it
    # ran. Its lease decides now; once the lease runs out, it is closed.
    async with open_store(db) as store:
        await store.renew_lease(15)
        conv = await store.create_conversation()
        run, *_ = await store.begin_run(conv.id, content="q", agent="chat", model=None)
    elsewhere = "999999999:1:another-boot-id:12345:4026531836"  # no such PID here
    conn = _RawSQL(db)
    conn.execute("UPDATE runs SET process = ? WHERE id = ?", (elsewhere, run.id))
    conn.execute("INSERT INTO instances (id, lease_until, host, pid) VALUES (?, ?, ?, ?)",
                 (elsewhere, time.time() + 60, "other-host", 999999999))
    conn.commit()
    async with open_store(db) as store:
        assert await store.run_in_progress(run.id) == "elsewhere"
        assert await store.recover_interrupted() == []
        assert (await store.get_run(run.id)).status in ("queued", "running")  # untouched
        # Its lease runs out (the instance was killed there): it is closed, once.
        conn.execute("UPDATE instances SET lease_until = ? WHERE id = ?",
                     (time.time() - 1, elsewhere))
        conn.commit()
        assert await store.run_in_progress(run.id) is None
        assert await store.recover_interrupted() == [run.id]
        assert await store.recover_interrupted() == []
        assert (await store.get_run(run.id)).status == "failed"
    conn.close()


async def test_a_dead_process_on_this_host_is_dead_whatever_its_lease(db: Path | str) -> None:
    # A process of this host killed a moment ago still has a current lease: its PID decides,
    # so a restart closes its runs at once (not a lease later).
    from service.store.ownership import process_tag

    dead = await trio.lowlevel.open_process(["true"])
    await dead.wait()
    tag = process_tag(os.getpid()).replace(f"{os.getpid()}:", f"{dead.pid}:", 1)
    async with open_store(db) as store:
        conv = await store.create_conversation()
        run, *_ = await store.begin_run(conv.id, content="q", agent="chat", model=None)
    conn = _RawSQL(db)
    conn.execute("UPDATE runs SET process = ? WHERE id = ?", (tag, run.id))
    conn.execute("INSERT INTO instances (id, lease_until, host, pid) VALUES (?, ?, ?, ?)",
                 (tag, time.time() + 60, "here", dead.pid))
    conn.commit()
    conn.close()
    async with open_store(db) as store:
        assert await store.run_in_progress(run.id) is None
        assert await store.recover_interrupted() == [run.id]


async def test_a_stopping_instance_ends_its_lease(db: Path | str) -> None:
    async with open_store(db) as store:
        await store.renew_lease(15)
        mine = store.process_id
        await store.end_lease()
    conn = _RawSQL(db)
    try:
        assert conn.execute("SELECT COUNT(*) FROM instances WHERE id = ?",
                            (mine,)).fetchone()[0] == 0
    finally:
        conn.close()


async def test_a_run_closed_by_another_instance_takes_no_more_writes_from_its_owner(
    db: Path | str,
) -> None:
    # Issue 14 (fencing): instance A's lease lapses (a stall, a partition) while its run goes
    # on; B takes A for dead and closes the run. A's later events and its own end must not
    # land: the run would get a second run.finished, and A's clients an end the store
    # contradicts. A's writes report the run as no longer held, and write nothing of it.
    elsewhere = "999999999:1:another-boot-id:12345:4026531836"  # A: lease decides, not PID
    async with open_store(db, process_id=elsewhere) as a, open_store(db) as b:
        await a.renew_lease(15)
        conv = await a.create_conversation()
        run, _, reply, *_ = await a.begin_run(conv.id, content="q", agent="chat", model=None)
        assert await a.append_run_events(
            [RunEvent(run.id, 2, "token", {"text": "kept"}, 0.0)]) == set()
        assert await b.recover_interrupted() == []  # A's lease holds: its run is its own
        await a.renew_lease(-1)  # ... until it lapses
        assert await b.recover_interrupted() == [run.id]

        late = [RunEvent(run.id, 3, "token", {"text": "late"}, 0.0)]
        assert await a.append_run_events(late) == {run.id}
        assert await a.append_run_events(late, retry=True) == {run.id}
        held = await a.finish_run(
            run.id, status="succeeded", message_id=reply.id, content="kept late",
            message_status=MessageStatus.complete, error=None, usage={},
            events=[RunEvent(run.id, 3, "run.finished", {"status": "succeeded"}, 0.0)])
        assert held is False

        stored = await b.list_run_events(run.id)
        assert [(e.seq, e.type) for e in stored] == [
            (1, "run.started"), (2, "token"), (3, "run.finished")]
        assert stored[-1].data["status"] == "failed"
        assert (await b.get_run(run.id)).status == "failed"
        (_, stored_reply) = await b.get_messages(conv.id)
        assert (stored_reply.status, stored_reply.content) == (MessageStatus.error, "kept")
        # B's own writes about it are not fenced (it closed the run, it holds it now) and A's
        # about its other runs go on.
        other = await a.create_conversation()
        run2, *_ = await a.begin_run(other.id, content="q", agent="chat", model=None)
        mixed = [RunEvent(run2.id, 2, "token", {"text": "x"}, 0.0), *late]
        assert await a.append_run_events(mixed) == {run.id}
        assert [e.type for e in await a.list_run_events(run2.id)] == ["run.started", "token"]
