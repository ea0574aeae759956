"""Review (helper dec07r) of d682b2b (schema 10 / PG 6: llm_calls.owner trigger, the PG
migration without statement_timeout), 74384b9 (sqlite_events.py) and 1e44fb0 (unique_calls
seeding, pid in logs, /v1 tool messages by name).

Defects found are marked "Fixed (was: DEFECT)" (fixed the same session); the others pin
behaviour that holds.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from service.agents.base import AgentContext
from service.api.openai import _to_history
from service.api.openai_request import ChatMessageIn
from service.backends.base import ChatMessage, ToolCall
from service.backends.openai_compat import openai_messages
from service.logs import TextFormatter
from service.store import LLMCallOutcome, LLMCallRecord, new_id, open_store
from service.store.pg_migrate import MIGRATION_LOCK as _MIGRATION_LOCK

from .test_review_upgrade_dec07q import _Raw

_OLD_INSERT = ("INSERT INTO llm_calls (id, backend, model, outcome, started_at, run_id, "
               "tokens_estimated) VALUES (?, 'sim', 'm', 'ok', ?, ?, 0)")


# -- the PostgreSQL migration's bound -----------------------------------------------------------


async def test_an_instance_waiting_past_the_stall_bound_for_a_migration_starts(
        pg_url: str) -> None:
    """Fixed (was: DEFECT): d682b2b's ``SET LOCAL statement_timeout = 0`` (service/store/postgres.py
    ``_migrate``, ~line 250) lifts the server's bound only. The migration's connection is a
    ``BoundedConnection`` (``_connect`` -> ``_configure``: ``answer_within = stall_timeout``, by
    default statement_timeout + 5 s, i.e. 35 s in the service), so an instance waiting on
    ``pg_advisory_xact_lock`` longer than that still fails to start ("the database did not
    answer within ... s"), contrary to the new comment and docs/deploy.md ("an instance starting
    while another migrates waits for it"). The test before (dec07q) held the lock 3 s, inside
    the 6 s stall bound of its ``statement_timeout=1``.

    Here: ``statement_timeout=0.2`` (stall bound 5.2 s), the lock held 6.5 s.
    Fix: in ``_migrate``, ``conn.answer_within = None`` for the migration (restore after), or
    wait with ``pg_try_advisory_xact_lock`` in a loop (logging "waiting for another instance's
    migration" every few seconds); and if a bound is kept, say it in docs/deploy.md."""
    async with open_store(pg_url):
        pass
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with psycopg.connect(pg_url) as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            held.set()
            release.wait(20)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert held.wait(10)

    async def let_go() -> None:
        await trio.sleep(6.5)
        release.set()

    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(let_go)
        try:
            async with open_store(pg_url, statement_timeout=0.2):
                pass
        except Exception as exc:
            error = exc
    await trio.to_thread.run_sync(holder.join, 20)
    assert error is None, f"an instance behind a migration failed to start: {error}"


async def test_a_backfill_longer_than_the_stall_bound_migrates(pg_url: str) -> None:
    """Fixed (was: DEFECT): same cause as above, the migrating side: schema 6's backfill
    (``_FILL_OWNERS``) on a big ``llm_calls`` taking longer than ``stall_timeout`` is cut by the
    client (BoundedConnection closes the connection), the migration rolls back and every start
    fails the same way: "a backfill over a big table takes what it takes" (postgres.py
    ``_migrate``'s comment, docs/deploy.md) does not hold. Simulated: a database at version 5
    whose backfill UPDATE is slowed to 6.5 s by a test trigger; ``statement_timeout=0.2`` (bound
    5.2 s). Fix: as above (``answer_within = None`` during ``_migrate``)."""
    async with open_store(pg_url) as store:
        conv = await store.create_conversation(owner="alice")
        run = (await store.begin_run(conv.id, content="q", agent="chat", model=None,
                                     owner="alice")).run
    raw = _Raw(pg_url)
    try:
        raw.execute("DROP TRIGGER llm_calls_owner_of_run ON llm_calls")
        raw.execute("DROP FUNCTION llm_calls_owner_of_run()")
        raw.execute("DROP INDEX runs_conversation_unpruned")  # (version 9's)
        raw.execute("DROP TRIGGER runs_unanswered_key ON runs")  # (version 8's)
        raw.execute("DROP FUNCTION runs_unanswered_key()")
        raw.execute("DROP INDEX runs_idempotency")
        raw.execute("ALTER TABLE runs DROP COLUMN idempotency_key")
        raw.execute("UPDATE schema_version SET version = 5")
        raw.execute(_OLD_INSERT, (new_id("call"), time.time(), run.id))
        raw.execute("CREATE FUNCTION review_slow() RETURNS trigger LANGUAGE plpgsql AS $$ "
                    "BEGIN PERFORM pg_sleep(6.5); RETURN NEW; END $$")
        raw.execute("CREATE TRIGGER review_slow BEFORE UPDATE ON llm_calls "
                    "FOR EACH ROW EXECUTE FUNCTION review_slow()")
    finally:
        raw.close()
    error: BaseException | None = None
    try:
        async with open_store(pg_url, statement_timeout=0.2):
            pass
    except Exception as exc:
        error = exc
    assert error is None, f"a long backfill failed the migration: {error}"


# -- the trigger (pinned) -----------------------------------------------------------------------


async def test_the_trigger_leaves_new_code_calls_and_re_records_alone(db: Path | str) -> None:
    """Pinned (passes): the trigger fills only an owner-less call of an owned run: a call the
    new code records keeps its owner, a re-record of an id (``ON CONFLICT DO NOTHING``) adds
    nothing, an anonymous run's call and a call of a run deleted before stay without an owner,
    a call of no run is untouched."""
    async with open_store(db) as store:
        conv = await store.create_conversation(owner="alice")
        run = (await store.begin_run(conv.id, content="q", agent="chat", model=None,
                                     owner="alice")).run
        anon_conv = await store.create_conversation()
        anon = (await store.begin_run(anon_conv.id, content="q", agent="chat",
                                      model=None)).run
        mine = new_id("call")
        await store.record_llm_call(LLMCallRecord(mine, "sim", "m", LLMCallOutcome.ok,
                                                  time.time(), run_id=run.id))
        raw = _Raw(db)
        try:
            # A re-record of the id, as the old code writes it: ignored, owner untouched.
            raw.execute(_OLD_INSERT + " ON CONFLICT (id) DO NOTHING",
                        (mine, time.time(), anon.id))
            anon_call, gone_call, none_call = new_id("call"), new_id("call"), new_id("call")
            raw.execute(_OLD_INSERT, (anon_call, time.time(), anon.id))
            raw.execute(_OLD_INSERT, (gone_call, time.time(), "run_gone"))
            raw.execute(_OLD_INSERT, (none_call, time.time(), None))
            owners = dict(raw.execute("SELECT id, owner FROM llm_calls").fetchall())
            runs = dict(raw.execute("SELECT id, run_id FROM llm_calls").fetchall())
        finally:
            raw.close()
        assert owners == {mine: "alice", anon_call: None, gone_call: None, none_call: None}
        assert runs[mine] == run.id
        assert [c.id for c in await store.list_llm_calls(owner="alice")] == [mine]


# -- /v1: a tool message naming its tool ---------------------------------------------------------


def test_a_tool_result_by_name_reaches_an_openai_server_with_its_call_id() -> None:
    """Fixed (was: DEFECT): 1e44fb0 takes a /v1 ``tool`` message with ``name`` and no
    ``tool_call_id`` (service/api/openai_request.py ``_answers_a_call``), but passes it on
    unpaired to an OpenAI-compatible model server: ``_to_history`` (service/api/openai.py ~line
    103) keeps ``tool_call_id=None`` while the assistant's id-less call got ``call_0``, and
    ``openai_messages`` (service/backends/openai_compat.py ~line 72) sends the result without
    ``tool_call_id``: the very case the refused-before comment named ("the model's server paired
    it with no call"; vLLM/OpenAI reject it, llama.cpp's templates render no id). Only the
    Ollama backend pairs by name. Fix: in ``_to_history``, give a tool message without
    ``tool_call_id`` the id of the first not yet answered call of its ``name`` in the assistant
    message before it (or refuse it when the backend is not Ollama)."""
    msgs = [ChatMessageIn.model_validate(m) for m in (
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "name": "weather", "content": "sunny"},
    )]
    sent = openai_messages(_to_history(msgs))
    call_id = sent[1]["tool_calls"][0]["id"]
    assert sent[2].get("tool_call_id") == call_id, sent


def test_a_tool_message_with_neither_id_nor_name_is_refused() -> None:
    """Pinned (passes): neither ``tool_call_id`` nor ``name``: 422 as before."""
    with pytest.raises(ValueError, match="tool_call_id"):
        ChatMessageIn.model_validate({"role": "tool", "content": "x"})


# -- unique_calls seeded from the history --------------------------------------------------------


def _ctx(history: tuple[ChatMessage, ...]) -> Any:
    ctx = object.__new__(AgentContext)
    object.__setattr__(ctx, "history", history)
    object.__setattr__(ctx, "_call_ids", set())
    return ctx


def test_unique_calls_seeded_from_tool_messages_only() -> None:
    """Pinned (passes): a history holding only tool results (their calls' messages cut) still
    seeds their ids: the model's ``call_0`` is renamed, and the second of a reply's two
    equal ids too."""
    ctx = _ctx((ChatMessage("tool", "r", (), "call_0", "weather"),))
    reply = ChatMessage("assistant", "", (ToolCall("call_0", "weather", {}),
                                          ToolCall("call_1", "weather", {})))
    out = AgentContext.unique_calls(ctx, reply)
    ids = [c.id for c in out.tool_calls]
    assert ids[0] != "call_0"
    assert ids[1] == "call_1"
    again = AgentContext.unique_calls(ctx, ChatMessage("assistant", "", (
        ToolCall("call_1", "weather", {}),)))
    assert again.tool_calls[0].id not in {"call_0", "call_1", ids[0]}


# -- logs -----------------------------------------------------------------------------------------


def test_text_lines_name_their_pid() -> None:
    """Pinned (passes): SERVICE_LOG_FORMAT=text with ``pid`` names the process."""
    record = logging.LogRecord("service", logging.WARNING, __file__, 1, "hello", None, None)
    record.request_id, record.run_id = None, None
    line = TextFormatter(pid=True).format(record)
    assert f"pid={record.process}" in line
    assert "hello" in line
    assert "pid=" not in TextFormatter().format(record)


# -- 74384b9: the moved module --------------------------------------------------------------------


def test_the_moved_event_module_imports_alone() -> None:
    """Pinned (passes): service/store/sqlite_events.py imports on its own (no cycle with
    sqlite_queries.py)."""
    import importlib

    events = importlib.import_module("service.store.sqlite_events")
    assert {"insert_events", "not_held", "prune_runs"} <= set(vars(events))
    importlib.import_module("service.store.sqlite_queries")
