"""Backups as docs/deploy.md ("Backups") says to take them, restored and opened by the store.

SQLite: the backup API's one-liner run by another process while the store is open and writing
(a copy of the file alone would miss what is still in its WAL). PostgreSQL: ``pg_dump`` and
``pg_restore`` from the server's own binaries, the data restored into a database a new instance
made.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import trio

from service.store import (
    LLMCallOutcome,
    LLMCallRecord,
    RunEvent,
    new_id,
    open_store,
)

from ..pg import PostgresServer

# The command docs/deploy.md gives, read from it (the source opened read-only: a mistyped
# path fails, where it made an empty database and "backed it up").
_DOCS = (Path(__file__).resolve().parents[2] / "docs" / "deploy.md").read_text()
SQLITE_BACKUP = re.search(r"python -c '([^']+)' data/service\.db", _DOCS)[1]  # type: ignore[index]


async def test_a_sqlite_backup_taken_while_the_store_writes_has_every_commit(
        tmp_path: Path) -> None:
    db, copy = tmp_path / "service.db", tmp_path / "backup" / "service.db"
    copy.parent.mkdir()
    async with open_store(db) as store:
        conv = await store.create_conversation(title="kept")
        await store.append_message(conv.id, role="user", content="question")
        begun = await store.begin_run(conv.id, content="q", agent="chat", model=None)
        run_id = begun.run.id
        assert not await store.append_run_events([
            RunEvent.make(run_id, seq, "token", {"text": f"t{seq} "}, time.time())
            for seq in range(2, 40)])
        # Another program, while this store is open with the run under way.
        await trio.run_process([sys.executable, "-c", SQLITE_BACKUP, str(db), str(copy)])
        assert not await store.append_run_events([
            RunEvent.make(run_id, 40, "token", {"text": "after"}, time.time())])
    async with open_store(copy) as restored:
        assert (await restored.get_conversation(conv.id)).title == "kept"
        assert [m.content for m in await restored.get_messages(conv.id)][:2] == [
            "question", "q"]
        events = await restored.list_run_events(run_id)
        tokens = [e.data["text"] for e in events if e.type == "token"]
        assert tokens == [f"t{seq} " for seq in range(2, 40)]  # not the one after the copy


def test_the_sqlite_backup_of_a_mistyped_path_fails_and_makes_nothing(tmp_path: Path) -> None:
    typo, copy = tmp_path / "typo.db", tmp_path / "copy.db"
    done = subprocess.run([sys.executable, "-c", SQLITE_BACKUP, str(typo), str(copy)],
                          capture_output=True, text=True, check=False)
    assert done.returncode != 0
    assert "unable to open database file" in done.stderr
    assert not typo.exists()


async def test_a_dump_restored_data_only_into_a_new_database_loads(
        postgres: PostgresServer, pg_url: str) -> None:
    # pg_restore empties search_path: the trigger filling a call's owner from its run
    # (schema 6) did not find ``runs`` there, so no call with a run could be restored (7).
    async with open_store(pg_url) as store:
        conv = await store.create_conversation(title="kept")
        run = (await store.begin_run(conv.id, content="q", agent="chat", model=None)).run
        call = new_id("call")
        await store.record_llm_call(
            LLMCallRecord(call, "sim", "m", LLMCallOutcome.ok, time.time(), run_id=run.id))
    name = "t_" + os.urandom(6).hex()
    target = postgres.create_database(name)
    try:
        async with open_store(target):
            pass  # the schema, as an instance's first start makes it
        dumped = await trio.run_process(
            [str(postgres.bin / "pg_dump"), "--data-only", "--format=custom",
             "--exclude-table-data=schema_version", "-d", pg_url], capture_stdout=True)
        restored = await trio.run_process(
            [str(postgres.bin / "pg_restore"), "--data-only", "--exit-on-error", "-d", target],
            stdin=dumped.stdout, capture_stderr=True, check=False)
        assert restored.returncode == 0, restored.stderr.decode()
        async with open_store(target) as store:
            assert (await store.get_conversation(conv.id)).title == "kept"
            assert [c.id for c in await store.list_llm_calls()] == [call]
            assert (await store.get_run(run.id)).conversation_id == conv.id
    finally:
        postgres.drop_database(name)
