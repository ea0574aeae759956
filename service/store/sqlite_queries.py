"""The SQLite store's queries: what each method reads and writes (``SQLiteQueries``).

:class:`~service.store.sqlite.SQLiteStore` is these queries on its write engine (group commit,
transactions, WAL upkeep): each method hands its SQL, as a function of a ``sqlite3``
connection, to ``_write`` (in a write transaction, grouped with others) or ``_read``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import closing
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import AlreadyBegun, NotFound
from ..text import clean_text
from .ownership import changed_at
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
    decode_cursor,
    encode_cursor,
    event_rows,
    new_id,
    newest_history,
)
from .records import (
    call_row as _call,
)
from .records import (
    conversation_row as _conversation,
)
from .records import (
    message_row as _message,
)
from .records import (
    run_row as _run,
)
from .sqlite_events import insert_events as _insert_events
from .sqlite_events import not_held as _not_held
from .sqlite_events import prune_runs as _prune_runs
from .sqlite_ownership import SQLiteOwnership

__all__ = ["SQLiteQueries"]

T = TypeVar("T")

_CONV_COLS = "id, title, system, model, agent, owner, created_at, updated_at"
# As read: a conversation's updated_at is also its latest message's (a reply's end, or its close
# by a survivor, changes that message, not the conversation's row: locking the conversation's
# row at a run's end deadlocked on PostgreSQL with a delete, a recovery and other instances'
# new questions).
_CONV_READ = (
    "id, title, system, model, agent, owner, created_at, MAX(updated_at, COALESCE((SELECT "
    "MAX(m.updated_at) FROM messages m WHERE m.conversation_id = conversations.id), 0))"
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


def _page(c: sqlite3.Connection, run_id: str, after: int, limit: int,
          max_chars: int | None) -> list[RunEvent]:
    """A page of a run's events: its rows read only up to the cut (``event_rows``), and its
    statement closed at once, even when a row fails to decode (a statement left open holds
    the connection's read snapshot for as long as anything keeps it, a traceback say)."""
    with closing(c.execute("SELECT run_id, seq, type, data, created_at FROM run_events "
                           "WHERE run_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                           (run_id, after, limit))) as rows:
        return event_rows(rows, max_chars)


class SQLiteQueries(SQLiteOwnership):
    """Conversations, messages, runs, run events and LLM calls, as SQLite SQL."""

    process_id: str  # how this process tags the runs it runs

    if TYPE_CHECKING:  # the engine's (SQLiteStore)
        async def _write(self, op: str, fn: Callable[[sqlite3.Connection], T]) -> T: ...

        async def _read(self, op: str, fn: Callable[[sqlite3.Connection], T]) -> T: ...

    # -- conversations --------------------------------------------------------------------------

    async def create_conversation(
        self,
        *,
        title: str | None = None,
        system: str | None = None,
        model: str | None = None,
        agent: str | None = None,
        owner: str | None = None,
    ) -> Conversation:
        now = time.time()
        conv = Conversation(new_id("conv"), title, system, model, agent, owner, now, now)

        def fn(c: sqlite3.Connection) -> None:
            c.execute(
                f"INSERT INTO conversations ({_CONV_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (conv.id, title, system, model, agent, owner, now, now),
            )

        await self._write("create_conversation", fn)
        return conv

    async def get_conversation(
        self, conversation_id: str, *, owner: str | None = None
    ) -> Conversation:
        def fn(c: sqlite3.Connection) -> Conversation | None:
            row = c.execute(
                f"SELECT {_CONV_READ} FROM conversations WHERE id = ? AND owner IS ?",
                (conversation_id, owner),
            ).fetchone()
            return _conversation(row) if row else None

        conv = await self._read("get_conversation", fn)
        if conv is None:
            raise NotFound(f"no conversation {conversation_id!r}", id=conversation_id)
        return conv

    async def list_conversations(
        self, *, owner: str | None = None, limit: int = 20, before: str | None = None
    ) -> tuple[list[Conversation], str | None]:
        """Newest first; returns the page and the cursor of the next page (or None)."""
        before_seq = decode_cursor(before) if before else None

        def fn(c: sqlite3.Connection) -> tuple[list[Conversation], str | None]:
            sql = f"SELECT seq, {_CONV_READ} FROM conversations WHERE owner IS ?"
            args: list[Any] = [owner]
            if before_seq is not None:
                sql += " AND seq < ?"
                args.append(before_seq)
            sql += " ORDER BY seq DESC LIMIT ?"
            args.append(limit + 1)
            rows = c.execute(sql, args).fetchall()
            page = rows[:limit]
            nxt = encode_cursor(page[-1][0]) if len(rows) > limit else None
            return [_conversation(r[1:]) for r in page], nxt

        return await self._read("list_conversations", fn)

    async def delete_conversation(
        self, conversation_id: str, *, owner: str | None = None
    ) -> None:
        # Its finished runs' events first, pruned in bounded writes as the retention does (each
        # run keeps its start, answer and end: a re-join meanwhile is told those), then the
        # rest in one: 50,000 events in one transaction held every other write of the process
        # (every live stream's tokens) behind it.
        # Each batch's pick goes on from where the last one stopped (``after``, in
        # ``runs_conversation``'s order): from the start, the k-th pick read past the k-1
        # batches pruned before it (16,000 runs: 2.6 x the work of 8,000). At the end the picks
        # start again once from the start (a run that finished meanwhile).
        after, again = 0, True

        def prune(c: sqlite3.Connection) -> int:
            nonlocal after, again
            picked = c.execute(
                "SELECT r.id, r.seq FROM runs r JOIN conversations c ON c.id = r.conversation_id "
                "WHERE r.conversation_id = ? AND c.owner IS ? AND r.seq >= ? "
                "AND r.events_pruned = 0 AND r.finished_at IS NOT NULL ORDER BY r.seq LIMIT 100",
                (conversation_id, owner, after)).fetchall()
            if not picked and again and after:
                after, again = 0, False
                return 1  # once more, from the start
            done = _prune_runs(c, [run_id for run_id, _ in picked], PRUNE_ROWS)
            # The first picked run not done yet (its budget ran out), or past the last.
            after = next((seq for run_id, seq in picked if c.execute(
                "SELECT events_pruned FROM runs WHERE id = ?", (run_id,)).fetchone() == (0,)),
                picked[-1][1] + 1 if picked else after)
            return done

        while await self._write("delete_conversation", prune):
            pass

        def fn(c: sqlite3.Connection) -> int:
            runs = c.execute("SELECT id FROM runs WHERE conversation_id = ?",
                             (conversation_id,)).fetchall()
            cur = c.execute(
                "DELETE FROM conversations WHERE id = ? AND owner IS ?", (conversation_id, owner)
            )
            if cur.rowcount:  # its messages, runs and events go with it (foreign keys)...
                # ... and its runs' LLM calls (run_id is no foreign key: it may be NULL).
                c.executemany("DELETE FROM llm_calls WHERE run_id = ?", runs)
            return cur.rowcount

        if not await self._write("delete_conversation", fn):
            raise NotFound(f"no conversation {conversation_id!r}", id=conversation_id)

    # -- messages -------------------------------------------------------------------------------

    async def append_message(
        self,
        conversation_id: str,
        *,
        role: str,
        content: str,
        status: MessageStatus = MessageStatus.complete,
        run_id: str | None = None,
    ) -> Message:
        """Append a message; it is durable when this returns."""
        return (await self.append_messages(conversation_id, [(role, content, status, run_id)]))[0]

    async def append_messages(
        self,
        conversation_id: str,
        items: Iterable[tuple[str, str, MessageStatus, str | None]],
    ) -> list[Message]:
        """Append several messages in one transaction: all land or none."""
        now = time.time()
        msgs = [
            Message(new_id("msg"), conversation_id, role, clean_text(content), status, run_id,
                    None, now, now)
            for role, content, status, run_id in items
        ]

        def fn(c: sqlite3.Connection) -> None:
            cur = c.execute(
                "UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id)
            )
            if cur.rowcount == 0:
                raise NotFound(f"no conversation {conversation_id!r}", id=conversation_id)
            c.executemany(
                f"INSERT INTO messages ({_MSG_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (m.id, m.conversation_id, m.role, m.content, m.status.value, m.run_id, None,
                     now, now)
                    for m in msgs
                ],
            )

        await self._write("append_message", fn)
        return msgs

    async def get_messages(self, conversation_id: str) -> list[Message]:
        """Messages of a conversation, oldest first."""

        def fn(c: sqlite3.Connection) -> list[Message]:
            rows = c.execute(
                f"SELECT {_MSG_COLS} FROM messages WHERE conversation_id = ? ORDER BY seq",
                (conversation_id,),
            ).fetchall()
            return [_message(r) for r in rows]

        return await self._read("get_messages", fn)

    async def message_page(
        self, conversation_id: str, *, limit: int, before: str | None = None
    ) -> tuple[list[Message], str | None]:
        before_seq = decode_cursor(before, MESSAGES) if before else None

        def fn(c: sqlite3.Connection) -> tuple[list[Message], str | None]:
            sql = f"SELECT seq, {_MSG_COLS} FROM messages WHERE conversation_id = ?"
            args: list[Any] = [conversation_id]
            if before_seq is not None:
                sql += " AND seq < ?"
                args.append(before_seq)
            rows = c.execute(sql + " ORDER BY seq DESC LIMIT ?", [*args, limit + 1]).fetchall()
            page = rows[:limit]
            nxt = encode_cursor(page[-1][0], MESSAGES) if len(rows) > limit else None
            return [_message(r[1:]) for r in reversed(page)], nxt

        return await self._read("message_page", fn)

    # -- runs and their events ------------------------------------------------------------------

    async def begin_run(
        self,
        conversation_id: str,
        *,
        content: str,
        agent: str | None,
        model: str | None,
        owner: str | None = None,
        default_model: str | None = None,
        run_id: str | None = None,
        history_chars: int | None = None,
        idempotency_key: str | None = None,
    ) -> BegunRun:
        """Everything a run on an existing conversation needs to start, in one transaction (one
        thread hop). ``run_id``: the new run's id, if the caller made it (``new_id("run")``);
        ``history_chars``: read only the newest messages its history can keep
        (``records.newest_history``), all of them if None.

        Checks the conversation (owned by ``owner``), resolves the agent and model (the
        request's, else the conversation's, else ``"chat"`` / ``default_model``), writes a
        ``queued`` run, the user's message, a ``pending`` reply and the run's first event
        (``run.started``, seq 1), and reads the conversation's earlier messages for the agent's
        history. (A run on a new conversation has nothing to read: :meth:`plan_run`.)
        """
        now = time.time()
        run_id = run_id or new_id("run")
        user_id, reply_id = new_id("msg"), new_id("msg")

        def fn(c: sqlite3.Connection) -> BegunRun:
            row = c.execute(
                f"SELECT {_CONV_COLS} FROM conversations WHERE id = ? AND owner IS ?",
                (conversation_id, owner),
            ).fetchone()
            if row is None:
                raise NotFound(f"no conversation {conversation_id!r}", id=conversation_id)
            conv = _conversation(row)
            if idempotency_key is not None:
                _not_begun_yet(c, conv.id, idempotency_key)

            def fetch(before: int | None, limit: int) -> list[tuple[int, Message]]:
                rows = c.execute(
                    f"SELECT seq, {_MSG_COLS} FROM messages WHERE conversation_id = ? "
                    "AND seq < ? ORDER BY seq DESC LIMIT ?",
                    (conv.id, 2**63 - 1 if before is None else before, limit))
                return [(r[0], _message(r[1:])) for r in rows]

            history = newest_history(fetch, history_chars)
            # This host's clock, but the conversation's updated_at past its latest change (a
            # process with a clock ahead of this one's may have written it): it moves. (The
            # run and its messages keep this host's clock: a run's end, stamped by the same
            # clock, is never before its start.)
            last_change = c.execute("SELECT MAX(updated_at) FROM messages "
                                    "WHERE conversation_id = ?", (conv.id,)).fetchone()[0]
            latest = max(conv.updated_at, last_change or 0.0)
            stamp = now if now > latest else latest + 0.001
            c.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (stamp, conv.id))
            begun = begun_run(run_id, user_id, reply_id, conv, history, content, agent, model,
                              owner, default_model, now)
            self._insert_run(c, begun)
            if idempotency_key is not None:
                c.execute("UPDATE runs SET idempotency_key = ? WHERE id = ?",
                          (idempotency_key, run_id))
            return begun

        return await self._write("begin_run", fn)

    def plan_run(
        self,
        *,
        content: str,
        agent: str | None,
        model: str | None,
        owner: str | None = None,
        new_conversation: dict[str, str | None] | None = None,
        default_model: str | None = None,
    ) -> BegunRun:
        """The records of a run on a new conversation, without writing them (sync, no I/O).

        Nothing has to be read for such a run, so its caller can start working while
        :meth:`write_run` stores them: writes land in the order they were called, so any write
        about the run called after ``write_run`` (its events, its final state) lands after it.
        """
        now = time.time()
        f = new_conversation or {}
        conv = Conversation(new_id("conv"), f.get("title"), f.get("system"), f.get("model"),
                            f.get("agent"), owner, now, now)
        return begun_run(new_id("run"), new_id("msg"), new_id("msg"), conv, [], content, agent,
                      model, owner, default_model, now)

    async def write_run(self, begun: BegunRun) -> None:
        """Store a run from :meth:`plan_run` in one transaction: its new conversation, the
        ``queued`` run, the user's message, the ``pending`` reply and event 1
        (``begun.started``)."""
        conv = begun.conversation

        def fn(c: sqlite3.Connection) -> None:
            c.execute(
                f"INSERT INTO conversations ({_CONV_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (conv.id, conv.title, conv.system, conv.model, conv.agent, conv.owner,
                 conv.created_at, conv.updated_at),
            )
            self._insert_run(c, begun)

        await self._write("begin_run", fn)

    def _insert_run(self, c: sqlite3.Connection, begun: BegunRun) -> None:
        run, now = begun.run, begun.run.created_at
        # Stored as running, from now: its task starts as this write lands (a /v1 run's even
        # before), and another worker reading the store sees it as it is.
        c.execute(
            f"INSERT INTO runs ({_RUN_COLS}, process) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (run.id, run.conversation_id, run.owner, run.agent, run.model, "running", now, now,
             None, None, "{}", self.process_id),
        )
        c.executemany(
            f"INSERT INTO messages ({_MSG_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(m.id, m.conversation_id, m.role, m.content, m.status.value, m.run_id, None,
              now, now) for m in (begun.user, begun.reply)],
        )
        _insert_events(c, [begun.started])

    async def finish_run(
        self,
        run_id: str,
        *,
        status: str,
        message_id: str,
        content: str,
        message_status: MessageStatus,
        error: str | None,
        usage: dict[str, Any],
        events: Sequence[RunEvent] = (), finished_at: float | None = None,
        model: str | None = None,
    ) -> bool:
        """In one transaction: the run's final status, its reply's final text, its last events
        (those already stored, by an earlier write that timed out but landed, are skipped);
        ``model``: the model that answered, stored if the run named none.

        Only while this process holds the run: False, and nothing written, if another instance
        closed it meanwhile (this one's lease had lapsed) or it is gone."""
        now = finished_at if finished_at is not None else time.time()
        # Model text: the adapters clean it already; a lone surrogate here would fail the
        # write (UTF-8 cannot encode it) every time it is retried.
        content, error = clean_text(content), error and clean_text(error)
        model = model and clean_text(model)  # as an upstream's chunk named it

        def fn(c: sqlite3.Connection) -> bool:
            if not c.execute(
                "UPDATE runs SET status = ?, finished_at = ?, error = ?, usage = ?, "
                "started_at = COALESCE(started_at, ?), model = COALESCE(model, ?) "
                "WHERE id = ? AND process = ?",
                (status, now, error, json.dumps(usage), now, model, run_id, self.process_id),
            ).rowcount:
                return False
            c.execute(
                "UPDATE messages SET content = ?, status = ?, error = ?, updated_at = ? "
                "WHERE id = ?",
                # The reply changed now (its end may land well after the run ended, its write
                # refused for a while): its conversation's updated_at moves past what a
                # syncing client saw meanwhile, whatever the clock of the instance that wrote
                # its latest change said.
                (content, message_status.value, error, changed_at(c.execute, run_id, now),
                 message_id),
            )
            if events:
                _insert_events(c, events, ignore=True)
            return True

        return await self._write("finish_run", fn)

    async def get_run(self, run_id: str, *, owner: str | None = None) -> RunRecord:
        def fn(c: sqlite3.Connection) -> RunRecord | None:
            row = c.execute(
                f"SELECT {_RUN_COLS} FROM runs WHERE id = ? AND owner IS ?", (run_id, owner)
            ).fetchone()
            return _run(row) if row else None

        run = await self._read("get_run", fn)
        if run is None:
            raise NotFound(f"no run {run_id!r}", id=run_id)
        return run

    async def prune_events(self, finished_before: float, rows: int = PRUNE_ROWS) -> int:
        """Delete at most ``rows`` events of runs finished before ``finished_before``, except each
        run's ``run.started``, ``message``, ``error`` and ``run.finished`` (``KEPT_EVENTS_SQL``: a
        re-join is still told the answer, or why there is none, and the end; one row each); a
        run is marked done once none is left. One transaction,
        bounded by rows, not runs (a run may hold 100,000 tokens). Returns the work done (rows
        deleted + runs marked): 0 when nothing is left to prune."""
        def fn(c: sqlite3.Connection) -> int:
            return _prune_runs(c, [r[0] for r in c.execute(
                "SELECT id FROM runs WHERE events_pruned = 0 AND finished_at IS NOT NULL "
                "AND finished_at < ? ORDER BY finished_at LIMIT 100", (finished_before,),
            )], rows)

        return await self._write("prune_events", fn)

    async def run_of_key(self, conversation_id: str, key: str, *, owner: str | None = None
                         ) -> tuple[str, str | None] | None:
        def fn(c: sqlite3.Connection) -> tuple[str, str | None] | None:
            if c.execute("SELECT 1 FROM conversations WHERE id = ? AND owner IS ?",
                         (conversation_id, owner)).fetchone() is None:
                return None
            return _keyed(c, conversation_id, key)

        return await self._read("run_of_key", fn)

    async def runs_in_progress(self, conversation_id: str) -> list[str]:
        """Ids of a conversation's runs stored as ``queued`` or ``running``."""
        def fn(c: sqlite3.Connection) -> list[str]:
            return [r[0] for r in c.execute(
                "SELECT id FROM runs WHERE conversation_id = ? AND status IN "
                "('queued', 'running')", (conversation_id,))]

        return await self._read("runs_in_progress", fn)

    async def append_run_events(
        self, events: Sequence[RunEvent], *, retry: bool = False
    ) -> set[str]:
        """Append a batch of events in one transaction (all land or none). ``retry``: some may
        be stored already (a write that timed out may still have landed); those are skipped.

        Only events of runs this process holds are written; returns the ids of the others'
        runs (closed by another instance, or gone), whose events were not stored."""
        if not events:
            return set()

        def fn(c: sqlite3.Connection) -> set[str]:
            if _insert_events(c, events, ignore=retry, process=self.process_id) == len(events):
                return set()  # all of them: the usual case costs no extra query
            return _not_held(c, {e.run_id for e in events}, self.process_id)

        return await self._write("append_run_events", fn)

    async def list_run_events(
        self, run_id: str, *, after: int = 0, limit: int = 10_000, max_chars: int | None = None
    ) -> list[RunEvent]:
        def fn(c: sqlite3.Connection) -> list[RunEvent]:
            return _page(c, run_id, after, limit, max_chars)

        return await self._read("list_run_events", fn)

    async def list_events_of_runs(
        self, cursors: Mapping[str, int], *, limit: int = 10_000, max_chars: int | None = None
    ) -> dict[str, list[RunEvent]]:
        def fn(c: sqlite3.Connection) -> dict[str, list[RunEvent]]:
            out: dict[str, list[RunEvent]] = {}
            for run_id, after in cursors.items():  # one thread hop and one read for all
                out[run_id] = _page(c, run_id, after, limit, max_chars)
            return out

        return await self._read("list_events_of_runs", fn)

    # -- LLM calls ------------------------------------------------------------------------------

    async def record_llm_call(self, rec: LLMCallRecord) -> None:
        def fn(c: sqlite3.Connection) -> None:
            run_id, owner = rec.run_id, None
            run = None if run_id is None else c.execute(
                "SELECT owner FROM runs WHERE id = ?", (run_id,)).fetchone()
            if run is None:
                # The call happened, but its run is not stored: never was (its first write
                # failed), or deleted with its conversation since. Kept, tied to no run.
                run_id = None
            else:
                owner = run[0]  # its run's, so that one key's calls are listed by an index
            c.execute(
                # A record written again (its first write's answer lost) is still one.
                f"INSERT INTO llm_calls ({_CALL_COLS}, owner) VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                (rec.id, rec.backend, rec.model, rec.outcome.value, rec.started_at, run_id,
                 rec.queue_wait, rec.ttft, rec.duration, rec.prompt_tokens,
                 rec.completion_tokens, int(rec.tokens_estimated), rec.error, owner),
            )

        await self._write("record_llm_call", fn)

    async def list_llm_calls(
        self, *, run_id: str | None = None, limit: int = 50, owner: str | None = None
    ) -> list[LLMCallRecord]:
        """Newest first. ``owner``: only calls made by that owner's runs (None: every call)."""
        sql = f"SELECT {_CALL_COLS_QUALIFIED} FROM llm_calls AS l"
        where: list[str] = []
        args: list[Any] = []
        if owner is not None:
            # Its run's owner, kept with the call (llm_calls_owner): joined to runs, one key's
            # list walked every other key's calls.
            where.append("l.owner = ?")
            args.append(owner)
        if run_id is not None:
            where.append("l.run_id = ?")
            args.append(run_id)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY l.seq DESC LIMIT ?"
        args.append(limit)

        def fn(c: sqlite3.Connection) -> list[LLMCallRecord]:
            return [_call(r) for r in c.execute(sql, args).fetchall()]

        return await self._read("list_llm_calls", fn)


def _keyed(c: sqlite3.Connection, conversation_id: str, key: str) -> tuple[str, str | None] | None:
    """The run holding ``key`` on the conversation, and the content it was asked with."""
    found = c.execute(
        "SELECT r.id, m.content FROM runs r LEFT JOIN messages m ON m.run_id = r.id AND "
        "m.role = 'user' WHERE r.conversation_id = ? AND r.idempotency_key = ?",
        (conversation_id, key)).fetchone()
    return None if found is None else (found[0], found[1])


def _not_begun_yet(c: sqlite3.Connection, conversation_id: str, key: str) -> None:
    """``AlreadyBegun`` if a run holds ``key`` on the conversation."""
    if (found := _keyed(c, conversation_id, key)) is not None:
        raise AlreadyBegun(*found)
