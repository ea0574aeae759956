"""The PostgreSQL store's queries: what each method reads and writes (``PostgresQueries``).

:class:`~service.store.postgres.PostgresStore` is these queries on its engine (the pool, group
commit, transactions): each method hands its SQL, as a function of a psycopg connection, to
``_write`` (in a write transaction, grouped with others), ``_write_alone`` (a transaction of
its own: a cancel, of a row another instance's batch may hold) or ``_read``. The same queries as
SQLite's (:mod:`.sqlite_queries`) in PostgreSQL's dialect: ``%s`` placeholders, ``ON CONFLICT
DO NOTHING`` for ``OR IGNORE``, a batch of events as arrays (one statement however long).
Leases and ownership are in :mod:`.postgres_ownership`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from ..errors import AlreadyBegun, NotFound
from ..text import clean_text
from .ownership import changed_at
from .pg_notify import notify as _notify
from .postgres_events import Picks, insert_events, not_held, prune_runs
from .postgres_ownership import Conn, PostgresOwnership
from .postgres_ownership import qmarks as _qmarks
from .records import (
    MESSAGES,
    PRUNE_ROWS,
    BegunRun,
    Conversation,
    LLMCallRecord,
    Message,
    MessageStatus,
    RunEvent,
    RunRecord,
    begun_run,
    call_row,
    conversation_row,
    decode_cursor,
    encode_cursor,
    event_rows,
    message_row,
    new_id,
    newest_history,
    run_row,
)

if TYPE_CHECKING:
    from ..metrics import Metrics

__all__ = ["Conn", "PostgresQueries"]

T = TypeVar("T")

_CONV_COLS = "id, title, system, model, agent, owner, created_at, updated_at"
# As read: also its latest message's updated_at (see the SQLite store's _CONV_READ).
_CONV_READ = (
    "id, title, system, model, agent, owner, created_at, GREATEST(updated_at, (SELECT "
    "MAX(m.updated_at) FROM messages m WHERE m.conversation_id = conversations.id))"
)
_MSG_COLS = "id, conversation_id, role, content, status, run_id, error, created_at, updated_at"
_RUN_COLS = (
    "id, conversation_id, owner, agent, model, status, created_at, started_at, finished_at, "
    "error, usage"
)
_CALL_COLS = (
    "id, backend, model, outcome, started_at, run_id, queue_wait, ttft, duration, "
    "prompt_tokens, completion_tokens, tokens_estimated, error"
)
_CALL_COLS_QUALIFIED = ", ".join(f"l.{c.strip()}" for c in _CALL_COLS.split(","))
_MSG_INSERT = f"INSERT INTO messages ({_MSG_COLS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
_CONV_INSERT = f"INSERT INTO conversations ({_CONV_COLS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"


def _owner_is(owner: str | None) -> tuple[str, tuple[Any, ...]]:
    """SQLite's ``owner IS ?``, written so PostgreSQL can use its index."""
    return ("owner IS NULL", ()) if owner is None else ("owner = %s", (owner,))


# A page of a run's events, cut in the query where their JSON passes max_chars (the one that
# passes it included): the rows past it are neither sent nor held (a page cut in Python after
# a whole LIMIT's fetch moved the rest of the run at every page). The JSON is ASCII (json.dumps
# escapes the rest), so its octets are its characters; octet_length reads no TOASTed value.
_SIZED_COLS = ("run_id, seq, type, data, created_at, "
               "sum(octet_length(data)) OVER (ORDER BY seq) - octet_length(data) AS before")
_PAGE_COLS = "e.run_id, e.seq, e.type, e.data, e.created_at"


def _chars(max_chars: int | None) -> int:
    return 2**62 if max_chars is None else max_chars


class PostgresQueries(PostgresOwnership):
    """Conversations, messages, runs, run events and LLM calls, as PostgreSQL SQL."""

    process_id: str  # how this process tags the runs it runs
    _metrics: Metrics  # the engine's
    _statement_timeout: float  # the engine's: seconds one statement may take

    if TYPE_CHECKING:  # the engine's (PostgresStore)
        async def _write(self, op: str, fn: Callable[[Conn], T]) -> T: ...

        async def _read(self, op: str, fn: Callable[[Conn], T]) -> T: ...


    # -- conversations --------------------------------------------------------------------------

    async def create_conversation(
        self, *, title: str | None = None, system: str | None = None, model: str | None = None,
        agent: str | None = None, owner: str | None = None,
    ) -> Conversation:
        now = time.time()
        conv = Conversation(new_id("conv"), title, system, model, agent, owner, now, now)

        def fn(c: Conn) -> None:
            c.execute(_CONV_INSERT, (conv.id, title, system, model, agent, owner, now, now))

        await self._write("create_conversation", fn)
        return conv

    async def get_conversation(
        self, conversation_id: str, *, owner: str | None = None
    ) -> Conversation:
        who, args = _owner_is(owner)

        def fn(c: Conn) -> Conversation | None:
            row = c.execute(f"SELECT {_CONV_READ} FROM conversations WHERE id = %s AND {who}",
                            (conversation_id, *args)).fetchone()
            return conversation_row(row) if row else None

        conv = await self._read("get_conversation", fn)
        if conv is None:
            raise NotFound(f"no conversation {conversation_id!r}", id=conversation_id)
        return conv

    async def list_conversations(
        self, *, owner: str | None = None, limit: int = 20, before: str | None = None
    ) -> tuple[list[Conversation], str | None]:
        before_seq = decode_cursor(before) if before else None
        who, owner_args = _owner_is(owner)

        def fn(c: Conn) -> tuple[list[Conversation], str | None]:
            sql = f"SELECT seq, {_CONV_READ} FROM conversations WHERE {who}"
            args: list[Any] = [*owner_args]
            if before_seq is not None:
                sql += " AND seq < %s"
                args.append(before_seq)
            sql += " ORDER BY seq DESC LIMIT %s"
            args.append(limit + 1)
            rows = c.execute(sql, args).fetchall()  # type: ignore[call-overload]
            page = rows[:limit]
            nxt = encode_cursor(page[-1][0]) if len(rows) > limit else None
            return [conversation_row(r[1:]) for r in page], nxt

        return await self._read("list_conversations", fn)

    async def delete_conversation(
        self, conversation_id: str, *, owner: str | None = None
    ) -> None:
        who, args = _owner_is(owner)

        # Its finished runs' events first, pruned in bounded writes as the retention does (each
        # run keeps its start, answer and end: a re-join meanwhile is told those), then the
        # rest in one: 50,000 events in one batch held every write queued behind it.
        picks = Picks(
            "SELECT r.id, r.id FROM runs r JOIN conversations c ON c.id = r.conversation_id "
            f"WHERE r.conversation_id = %s AND c.{who} AND r.events_pruned = 0 "
            "AND r.finished_at IS NOT NULL AND r.id >= %s ORDER BY r.id LIMIT 1 "
            "FOR UPDATE OF r SKIP LOCKED", (conversation_id, *args), ("",))

        def prune(c: Conn) -> int:
            return prune_runs(c, PRUNE_ROWS, picks)

        def skipped(c: Conn) -> bool:  # a run another instance's prune held: not yet pruned
            return bool(c.execute(
                "SELECT EXISTS (SELECT 1 FROM runs r JOIN conversations c ON "
                f"c.id = r.conversation_id WHERE r.conversation_id = %s AND c.{who} AND "
                "r.events_pruned = 0 AND r.finished_at IS NOT NULL)",
                (conversation_id, *args)).fetchone()[0])  # type: ignore[index]

        # A run skipped above is held by one batch, which ends within a statement's bound: its
        # turn comes then, or its events go in the last write (not waited for past that bound).
        deadline = trio.current_time() + self._statement_timeout
        while True:
            while await self._write("delete_conversation", prune):
                pass
            if (trio.current_time() >= deadline
                    or not await self._read("delete_conversation", skipped)):
                break
            await trio.sleep(0.05)

        def fn(c: Conn) -> int:
            # The conversation's row first: a run begun on it meanwhile (its insert holds the
            # row) is then in the list below, or waits and finds the conversation gone.
            c.execute(f"SELECT 1 FROM conversations WHERE id = %s AND {who} FOR UPDATE",
                      (conversation_id, *args))
            runs = [r[0] for r in c.execute("SELECT id FROM runs WHERE conversation_id = %s",
                                             (conversation_id,)).fetchall()]
            deleted = c.execute(f"DELETE FROM conversations WHERE id = %s AND {who}",
                                (conversation_id, *args)).rowcount
            if deleted and runs:  # its messages, runs and events go with it (foreign keys)...
                # ... and its runs' LLM calls (run_id is no foreign key: it may be NULL). A call
                # recorded meanwhile held its run's row (record_llm_call): the delete above
                # waited for it, and this statement, a fresh snapshot, sees it.
                c.execute("DELETE FROM llm_calls WHERE run_id = ANY(%s)", (runs,))
            return deleted

        # In the group commit (its runs' cancels are asked and waited for first, stop_runs):
        # alone, its conversation's row held, it deadlocked with this instance's own batch
        # that holds a run's row and updates the conversation.
        if not await self._write("delete_conversation", fn):
            raise NotFound(f"no conversation {conversation_id!r}", id=conversation_id)

    # -- messages -------------------------------------------------------------------------------

    async def append_message(
        self, conversation_id: str, *, role: str, content: str,
        status: MessageStatus = MessageStatus.complete, run_id: str | None = None,
    ) -> Message:
        return (await self.append_messages(conversation_id, [(role, content, status, run_id)]))[0]

    async def append_messages(
        self, conversation_id: str,
        items: Iterable[tuple[str, str, MessageStatus, str | None]],
    ) -> list[Message]:
        now = time.time()
        msgs = [
            Message(new_id("msg"), conversation_id, role, clean_text(content), status, run_id,
                    None, now, now)
            for role, content, status, run_id in items
        ]

        def fn(c: Conn) -> None:
            cur = c.execute("UPDATE conversations SET updated_at = %s WHERE id = %s",
                            (now, conversation_id))
            if cur.rowcount == 0:
                raise NotFound(f"no conversation {conversation_id!r}", id=conversation_id)
            _insert_messages(c, msgs)

        await self._write("append_message", fn)
        return msgs

    async def get_messages(self, conversation_id: str) -> list[Message]:
        def fn(c: Conn) -> list[Message]:
            rows = c.execute(
                f"SELECT {_MSG_COLS} FROM messages WHERE conversation_id = %s ORDER BY seq",
                (conversation_id,)).fetchall()
            return [message_row(r) for r in rows]

        return await self._read("get_messages", fn)

    async def message_page(
        self, conversation_id: str, *, limit: int, before: str | None = None
    ) -> tuple[list[Message], str | None]:
        before_seq = decode_cursor(before, MESSAGES) if before else None

        def fn(c: Conn) -> tuple[list[Message], str | None]:
            sql = f"SELECT seq, {_MSG_COLS} FROM messages WHERE conversation_id = %s"
            args: list[Any] = [conversation_id]
            if before_seq is not None:
                sql += " AND seq < %s"
                args.append(before_seq)
            rows = c.execute(sql + " ORDER BY seq DESC LIMIT %s", [*args, limit + 1]).fetchall()
            page = rows[:limit]
            nxt = encode_cursor(page[-1][0], MESSAGES) if len(rows) > limit else None
            return [message_row(r[1:]) for r in reversed(page)], nxt

        return await self._read("message_page", fn)

    # -- runs and their events ------------------------------------------------------------------

    async def begin_run(
        self, conversation_id: str, *, content: str, agent: str | None, model: str | None,
        owner: str | None = None, default_model: str | None = None, run_id: str | None = None,
        history_chars: int | None = None, idempotency_key: str | None = None,
    ) -> BegunRun:
        now = time.time()
        run_id = run_id or new_id("run")
        user_id, reply_id = new_id("msg"), new_id("msg")
        who, args = _owner_is(owner)

        def fn(c: Conn) -> BegunRun:
            row = c.execute(f"SELECT {_CONV_COLS} FROM conversations WHERE id = %s AND {who}",
                            (conversation_id, *args)).fetchone()
            if row is None:
                raise NotFound(f"no conversation {conversation_id!r}", id=conversation_id)
            conv = conversation_row(row)
            # This host's clock, but the conversation's updated_at past its latest change (an
            # instance with a clock ahead of this one's may have written it): it moves. (The
            # run and its messages keep this host's clock: a run's end, stamped by the same
            # clock, is never before its start.)
            stamped = c.execute(
                "UPDATE conversations AS c SET updated_at = (SELECT CASE WHEN %s > l.latest "
                "THEN %s ELSE l.latest + 0.001 END FROM (SELECT GREATEST(c.updated_at, "
                "(SELECT MAX(m.updated_at) FROM messages m WHERE m.conversation_id = c.id)) "
                "AS latest) AS l) WHERE c.id = %s RETURNING c.updated_at",
                (now, now, conv.id)).fetchone()
            if stamped is None:
                # Deleted by another instance meanwhile (its delete held the row: this waited
                # for it, then found it gone): not a foreign-key error, a 500.
                raise NotFound(f"no conversation {conversation_id!r}", id=conversation_id)
            # Under the conversation's row, held since the update above: a run begun with the
            # key by another instance meanwhile has committed, and is seen.
            if idempotency_key and (found := _keyed(c, conv.id, idempotency_key)) is not None:
                raise AlreadyBegun(*found)

            def fetch(before: int | None, limit: int) -> list[tuple[int, Message]]:
                rows = c.execute(
                    f"SELECT seq, {_MSG_COLS} FROM messages WHERE conversation_id = %s "
                    "AND seq < %s ORDER BY seq DESC LIMIT %s",
                    (conv.id, 2**63 - 1 if before is None else before, limit)).fetchall()
                return [(r[0], message_row(r[1:])) for r in rows]

            history = newest_history(fetch, history_chars)
            begun = begun_run(run_id, user_id, reply_id, conv, history, content, agent, model,
                              owner, default_model, now)
            self._insert_run(c, begun)
            if idempotency_key is not None:
                c.execute("UPDATE runs SET idempotency_key = %s WHERE id = %s",
                          (idempotency_key, run_id))
            return begun

        return await self._write("begin_run", fn)

    def plan_run(
        self, *, content: str, agent: str | None, model: str | None, owner: str | None = None,
        new_conversation: dict[str, str | None] | None = None,
        default_model: str | None = None,
    ) -> BegunRun:
        now = time.time()
        f = new_conversation or {}
        conv = Conversation(new_id("conv"), f.get("title"), f.get("system"), f.get("model"),
                            f.get("agent"), owner, now, now)
        return begun_run(new_id("run"), new_id("msg"), new_id("msg"), conv, [], content, agent,
                         model, owner, default_model, now)

    async def write_run(self, begun: BegunRun) -> None:
        conv = begun.conversation

        def fn(c: Conn) -> None:
            c.execute(_CONV_INSERT, (conv.id, conv.title, conv.system, conv.model, conv.agent,
                                     conv.owner, conv.created_at, conv.updated_at))
            self._insert_run(c, begun)

        await self._write("begin_run", fn)

    def _insert_run(self, c: Conn, begun: BegunRun) -> None:
        run, now = begun.run, begun.run.created_at
        # Stored as running, from now (as SQLite's: its task starts as this write lands).
        c.execute(
            f"INSERT INTO runs ({_RUN_COLS}, process) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (run.id, run.conversation_id, run.owner, run.agent, run.model, "running", now, now,
             None, None, "{}", self.process_id))
        _insert_messages(c, [begun.user, begun.reply])
        insert_events(c, [begun.started])

    async def finish_run(
        self, run_id: str, *, status: str, message_id: str, content: str,
        message_status: MessageStatus, error: str | None, usage: dict[str, Any],
        events: Sequence[RunEvent] = (), finished_at: float | None = None,
        model: str | None = None,
    ) -> bool:
        """See ``SQLiteStore.finish_run``: only while this process holds the run."""
        now = finished_at if finished_at is not None else time.time()
        content, error = clean_text(content), error and clean_text(error)
        model = model and clean_text(model)  # as an upstream's chunk named it

        def fn(c: Conn) -> bool:
            if not c.execute(
                "UPDATE runs SET status = %s, finished_at = %s, error = %s, usage = %s, "
                "started_at = COALESCE(started_at, %s), model = COALESCE(model, %s) "
                "WHERE id = %s AND process = %s",
                (status, now, error, json.dumps(usage), now, model, run_id, self.process_id),
            ).rowcount:
                return False
            c.execute(
                "UPDATE messages SET content = %s, status = %s, error = %s, updated_at = %s "
                "WHERE id = %s",  # changed now (as SQLite's: its end may land late)
                (content, message_status.value, error, changed_at(_qmarks(c), run_id, now),
                 message_id))
            if events:
                insert_events(c, events, ignore=True)
            _notify(c, {run_id})
            return True

        return await self._write("finish_run", fn)

    async def get_run(self, run_id: str, *, owner: str | None = None) -> RunRecord:
        who, args = _owner_is(owner)

        def fn(c: Conn) -> RunRecord | None:
            row = c.execute(f"SELECT {_RUN_COLS} FROM runs WHERE id = %s AND {who}",
                            (run_id, *args)).fetchone()
            return run_row(row) if row else None

        run = await self._read("get_run", fn)
        if run is None:
            raise NotFound(f"no run {run_id!r}", id=run_id)
        return run

    async def prune_events(self, finished_before: float, rows: int = PRUNE_ROWS) -> int:
        # (From the oldest each time: the index entries of the runs pruned before are dead
        # once their batch commits, and a scan steps over those at little cost: a pass over
        # 16,000 runs took 7.9 s with the picks going on from the last one, 8.3 s without.)
        picks = Picks(
            "SELECT id, finished_at, id FROM runs WHERE events_pruned = 0 "
            "AND finished_at IS NOT NULL AND finished_at < %s "
            "AND (finished_at, id) >= (%s, %s) ORDER BY finished_at, id LIMIT 1 "
            "FOR UPDATE SKIP LOCKED", (finished_before,), (float("-inf"), ""))

        def fn(c: Conn) -> int:
            return prune_runs(c, rows, picks)

        return await self._write("prune_events", fn)

    async def run_of_key(self, conversation_id: str, key: str, *, owner: str | None = None
                         ) -> tuple[str, str | None] | None:
        who, args = _owner_is(owner)

        def fn(c: Conn) -> tuple[str, str | None] | None:
            if c.execute(f"SELECT 1 FROM conversations WHERE id = %s AND {who}",
                         (conversation_id, *args)).fetchone() is None:
                return None
            return _keyed(c, conversation_id, key)

        return await self._read("run_of_key", fn)

    async def runs_in_progress(self, conversation_id: str) -> list[str]:
        def fn(c: Conn) -> list[str]:
            return [r[0] for r in c.execute(
                "SELECT id FROM runs WHERE conversation_id = %s AND status IN "
                "('queued', 'running')", (conversation_id,)).fetchall()]

        return await self._read("runs_in_progress", fn)

    async def append_run_events(
        self, events: Sequence[RunEvent], *, retry: bool = False
    ) -> set[str]:
        """See ``SQLiteStore.append_run_events``: only events of runs this process holds."""
        if not events:
            return set()

        def fn(c: Conn) -> set[str]:
            runs = {e.run_id for e in events}
            inserted = insert_events(c, events, ignore=retry, process=self.process_id)
            gone = set() if inserted == len(events) else not_held(c, runs, self.process_id)
            if runs - gone:
                _notify(c, runs - gone)
            return gone

        return await self._write("append_run_events", fn)

    async def list_run_events(
        self, run_id: str, *, after: int = 0, limit: int = 10_000, max_chars: int | None = None
    ) -> list[RunEvent]:
        def fn(c: Conn) -> list[RunEvent]:
            return event_rows(c.execute(
                f"SELECT {_PAGE_COLS} FROM (SELECT {_SIZED_COLS} FROM run_events "
                "WHERE run_id = %s AND seq > %s ORDER BY seq LIMIT %s) AS e "
                "WHERE e.before < %s ORDER BY e.seq",
                (run_id, after, limit, _chars(max_chars))).fetchall(), max_chars)

        return await self._read("list_run_events", fn)

    async def list_events_of_runs(
        self, cursors: Mapping[str, int], *, limit: int = 10_000, max_chars: int | None = None
    ) -> dict[str, list[RunEvent]]:
        ids, afters = list(cursors), [cursors[r] for r in cursors]

        def fn(c: Conn) -> dict[str, list[RunEvent]]:
            # One query for all: each run's events after its cursor, by its (run_id, seq) key.
            rows = c.execute(
                f"SELECT {_PAGE_COLS} "
                "FROM unnest(%s::text[], %s::bigint[]) AS c(run_id, after) "
                f"CROSS JOIN LATERAL (SELECT {_SIZED_COLS} "
                "FROM run_events WHERE run_id = c.run_id AND seq > c.after "
                "ORDER BY seq LIMIT %s) AS e WHERE e.before < %s",
                (ids, afters, limit, _chars(max_chars))).fetchall()
            of: dict[str, list[Any]] = {r: [] for r in ids}
            for r in rows:
                of[r[0]].append(r)
            return {run_id: event_rows(sorted(runs, key=lambda r: r[1]), max_chars)
                    for run_id, runs in of.items()}

        return await self._read("list_events_of_runs", fn)

    # -- LLM calls ------------------------------------------------------------------------------

    async def record_llm_call(self, rec: LLMCallRecord) -> None:
        def fn(c: Conn) -> None:
            # Its run's row held until the commit (a conversation's delete waits for it, then
            # removes this call too). No row: the call happened, but its run is not stored
            # (never was: its first write failed; or deleted since): kept, tied to no run.
            run_id, owner = rec.run_id, None
            run = None if run_id is None else c.execute(
                "SELECT owner FROM runs WHERE id = %s FOR KEY SHARE", (run_id,)).fetchone()
            if run is None:
                run_id = None
            else:
                owner = run[0]  # its run's, so that one key's calls are listed by an index
            c.execute(
                # A record written again (its first write's answer lost) is still one.
                f"INSERT INTO llm_calls ({_CALL_COLS}, owner) VALUES "
                "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (id) DO NOTHING",
                (rec.id, rec.backend, rec.model, rec.outcome.value, rec.started_at, run_id,
                 rec.queue_wait, rec.ttft, rec.duration, rec.prompt_tokens,
                 rec.completion_tokens, int(rec.tokens_estimated), rec.error, owner))

        await self._write("record_llm_call", fn)

    async def list_llm_calls(
        self, *, run_id: str | None = None, limit: int = 50, owner: str | None = None
    ) -> list[LLMCallRecord]:
        sql = f"SELECT {_CALL_COLS_QUALIFIED} FROM llm_calls AS l"
        where: list[str] = []
        args: list[Any] = []
        if owner is not None:
            where.append("l.owner = %s")  # (its run's, kept with it: see SQLite's)
            args.append(owner)
        if run_id is not None:
            where.append("l.run_id = %s")
            args.append(run_id)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY l.seq DESC LIMIT %s"
        args.append(limit)

        def fn(c: Conn) -> list[LLMCallRecord]:
            return [call_row(r) for r in c.execute(sql, args).fetchall()]  # type: ignore[call-overload]

        return await self._read("list_llm_calls", fn)


def _insert_messages(c: Conn, msgs: Sequence[Message]) -> None:
    rows = [(m.id, m.conversation_id, m.role, m.content, m.status.value, m.run_id, None,
             m.created_at, m.updated_at) for m in msgs]
    if len(rows) == 1:
        c.execute(_MSG_INSERT, rows[0])  # one round trip; executemany enters pipeline mode
        return
    with c.cursor() as cur:
        cur.executemany(_MSG_INSERT, rows)


def _keyed(c: Conn, conversation_id: str, key: str) -> tuple[str, str | None] | None:
    """The run holding ``key`` on the conversation, and the content it was asked with."""
    found = c.execute(
        "SELECT r.id, m.content FROM runs r LEFT JOIN messages m ON m.run_id = r.id AND "
        "m.role = 'user' WHERE r.conversation_id = %s AND r.idempotency_key = %s",
        (conversation_id, key)).fetchone()
    return None if found is None else (found[0], found[1])
