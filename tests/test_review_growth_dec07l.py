"""Data that grows: long-lived conversations, long runs, many rows (a review of 2026-12-07).

Growth is made visible by comparing two sizes of the same data (100 vs 2,000 messages, 300 vs
3,000 calls), measured in rows and bytes read and in SQLite virtual-machine steps (the
connection's progress handler: deterministic work, never wall-clock time).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from service.settings import Settings
from service.store import (
    LLMCallOutcome,
    LLMCallRecord,
    MessageStatus,
    RunEvent,
    SQLiteStore,
    new_id,
    open_store,
)

from .fakes import ScriptedBackend
from .servers import running_server
from .streams import parse_sse

GUARD = 60  # seconds any single wait may take before the test fails


# -- helpers ---------------------------------------------------------------------------------


@asynccontextmanager
async def _store(tmp_path: Path, name: str = "g.db") -> AsyncIterator[SQLiteStore]:
    async with open_store(tmp_path / name, threaded=False) as store:
        yield store


@contextmanager
def _vm_steps(store: SQLiteStore) -> Iterator[list[int]]:
    """SQLite VM instructions (in hundreds) run on the store's connections meanwhile."""
    counts = [0]

    def tick() -> int:
        counts[0] += 1
        return 0

    conns = [c for c in (store._writer, store._reader) if c is not None]
    for conn in conns:
        conn.set_progress_handler(tick, 100)
    try:
        yield counts
    finally:
        for conn in conns:
            conn.set_progress_handler(None, 100)


async def _fill(store: Any, conv: str, n: int, size: int = 100) -> None:
    """``n`` complete messages, user and assistant in turn, ``size`` characters each."""
    for start in range(0, n, 500):
        await store.append_messages(conv, [
            ("user" if i % 2 == 0 else "assistant", f"{i:06d} " + "x" * (size - 7),
             MessageStatus.complete, None)
            for i in range(start, min(n, start + 500))
        ])


async def _begin_cost(tmp_path: Path, n: int, size: int) -> tuple[int, int, int]:
    """(VM steps, messages, characters) a new run's ``begin_run`` reads on a conversation of
    ``n`` messages of ``size`` characters."""
    async with _store(tmp_path, f"b{n}.db") as store:
        conv = (await store.create_conversation()).id
        await _fill(store, conv, n, size)
        with _vm_steps(store) as steps:
            # As the supervisor calls it (SERVICE_HISTORY_CHARS, its default).
            begun = await store.begin_run(conv, content="next question", agent="chat",
                                          model=None, history_chars=24_000)
        return steps[0], len(begun.history), sum(len(m.content) for m in begun.history)


# -- a long conversation: what each new run reads ----------------------------------------------


async def test_begin_run_reads_the_whole_conversation_under_the_write_lock(
        tmp_path: Path) -> None:
    """DEFECT: every new run reads every message of its conversation, inside the store's write
    transaction, although the agent keeps at most SERVICE_HISTORY_CHARS (24,000) of it.

    Growth: a conversation of 2,000 messages of 1,000 characters has each new question read all
    2,000 rows (2 MB) in ``begin_run``; at 100 messages, 100. Only ~24 of them reach the model
    (``trim_history``). ``begin_run`` runs in ``_write``: an IMMEDIATE transaction on the one
    writer connection, so every other write of the process (every run's token batches, other
    conversations' starts, finish_run) waits behind that read; and the group commit puts it in
    the same batch as those writes.

    What a user hits: a months-old conversation gets slower to start each message, and while it
    starts every other user's stream stalls. docs/api.md: "SERVICE_HISTORY_CHARS bounds only the
    stored history of a native conversation's run" (it bounds what is sent, not what is read).

    Code: service/store/sqlite_queries.py ``begin_run`` (``SELECT ... FROM messages WHERE
    conversation_id = ? ORDER BY seq``, no bound; also ``latest = max(... for m in history)``),
    the same in postgres_queries.py; service/agents/__init__.py then trims it.
    """
    small_steps, small_rows, _ = await _begin_cost(tmp_path, 100, 1000)
    big_steps, big_rows, big_chars = await _begin_cost(tmp_path, 2000, 1000)
    # Only ~24 messages of 1,000 characters fit the default 24,000-character history.
    bounded = big_rows <= 200 and big_steps <= 3 * small_steps
    assert bounded, (
        f"begin_run read {big_rows} messages ({big_chars:,} chars) of a 2,000-message "
        f"conversation ({small_rows} at 100) to keep ~24 of them; its work in the write "
        f"transaction: {big_steps} x100 VM steps vs {small_steps}")


async def test_begin_run_holds_megabytes_of_history_to_send_24000_characters(
        tmp_path: Path) -> None:
    """DEFECT: the history read per run is held in memory whole, however large its messages:
    30 earlier messages of 400,000 characters (a body under SERVICE_MAX_BODY_BYTES, 1 MiB; a
    pasted document each) make every new run load 12 MB, of which the agent keeps the current
    turn and at most 24,000 characters of older turns. ``BegunRun.history`` is kept on the run's
    handle (``RunHandle.begun``) for the run's whole life: with SERVICE_MAX_RUNS=1000 runs in
    flight on such conversations, that is gigabytes of RAM for nothing.

    What a user hits: the process's memory grows with the size of its conversations, not with
    its load; a few users pasting documents into long chats make the service swap or be killed.

    Code: service/store/sqlite_queries.py ``begin_run`` (reads every column of every message),
    service/runs/handle.py ``self.begun = begun``; fix: read newest-first and stop once the
    history budget is spent (``SUM(length(content))`` in SQL, or fetch in slices), keep only
    the trimmed history on the handle.
    """
    _, rows, chars = await _begin_cost(tmp_path, 30, 400_000)
    assert chars <= 2_000_000, (
        f"a new run read and holds {rows} messages, {chars:,} characters, to send at most "
        f"24,000 characters of older turns")


async def _finish_cost(tmp_path: Path, n: int) -> int:
    """VM steps of a run's ``finish_run`` on a conversation of ``n`` messages."""
    async with _store(tmp_path, f"f{n}.db") as store:
        conv = (await store.create_conversation()).id
        await _fill(store, conv, n, 1000)
        begun = await store.begin_run(conv, content="q", agent="chat", model=None)
        with _vm_steps(store) as steps:
            assert await store.finish_run(
                begun.run.id, status="succeeded", message_id=begun.reply.id, content="a",
                message_status=MessageStatus.complete, error=None, usage={})
        return steps[0]


async def test_every_run_end_scans_its_conversation_in_the_write_transaction(
        tmp_path: Path) -> None:
    """DEFECT: a run's end (``finish_run``, in the write transaction) computes its reply's
    ``updated_at`` from ``MAX(m.updated_at)`` over every message of the conversation
    (``ownership.changed_at``): with only the ``(conversation_id, seq)`` index, a scan of all
    of them (and, in SQLite, of their contents' overflow pages: ``updated_at`` is stored after
    ``content``). A 2,000-message conversation's run end does ~20x the work of a 100-message
    one's, holding the store's write lock: the same growth as ``begin_run`` at the other end
    of every run, and in every survivor's close of a dead instance's runs.

    Code: service/store/ownership.py ``changed_at``, called by sqlite_queries.py and
    postgres_queries.py ``finish_run``. Fix: index ``messages(conversation_id, updated_at)``.
    """
    small = await _finish_cost(tmp_path, 100)
    big = await _finish_cost(tmp_path, 2000)
    assert big <= 3 * small, (
        f"finish_run: {big} x100 VM steps at 2,000 messages vs {small} at 100")


async def test_what_reaches_the_model_of_a_2000_message_conversation_is_bounded(
        settings: Settings) -> None:
    """Bound pinned (passes): however long the conversation, a run sends the model at most
    SERVICE_HISTORY_CHARS (24,000) of older turns, in whole turns, plus the question (the cost
    that grows is what the store reads to get there, above)."""
    backend = ScriptedBackend()
    async with running_server(settings, backend) as server, server.client() as client:
        conv = (await client.post("/api/conversations", json={})).json()["id"]
        await _fill(server.services.require_store(), conv, 2000, 1000)
        with trio.fail_after(GUARD):
            r = await client.post(f"/api/conversations/{conv}/messages",
                                  json={"content": "the latest question"})
        assert r.status_code == 200, r.text
        sent = backend.streams[-1].request.messages
        older = [m for m in sent[:-1] if m.role != "system"]
        assert sent[-1].content == "the latest question"
        assert sum(len(m.content) for m in older) <= 24_000
        assert [m.role for m in older[:2]] == ["user", "assistant"]
        assert older[-1].content.startswith("001999 ")  # the newest turn kept


# -- a long conversation: what the list and the page read ------------------------------------


async def _list_cost(tmp_path: Path, per_conv: int) -> tuple[int, int]:
    async with _store(tmp_path, f"l{per_conv}.db") as store:
        for _ in range(20):
            conv = (await store.create_conversation()).id
            await _fill(store, conv, per_conv, 50)
        with _vm_steps(store) as steps:
            page, _ = await store.list_conversations(limit=20)
        return steps[0], len(page)


async def test_listing_conversations_costs_every_message_of_each_listed_one(
        tmp_path: Path) -> None:
    """DEFECT: ``GET /api/conversations?limit=20`` reads every message of the 20 conversations
    it lists: the conversation's ``updated_at`` is read as ``MAX(m.updated_at)`` over its
    messages (``_CONV_READ``), and the only index on messages is ``(conversation_id, seq)``,
    so each listed conversation costs a scan of all its messages' rows (and, in SQLite, the
    overflow pages of long contents: ``updated_at`` is stored after ``content``).

    Growth: a page of 20 conversations of 300 messages does ~30x the work of one of 10
    messages. A busy user's sidebar (the page at ``/`` lists 100 at a time, chat.js) reads
    their whole history on every refresh; ``GET /api/conversations/{id}`` reads it three
    times (``get_conversation`` twice around ``get_messages``), and ``begin_run`` once more.

    Code: service/store/sqlite_queries.py ``_CONV_READ`` (PostgreSQL: ``GREATEST(updated_at,
    (SELECT MAX(m.updated_at) ...))`` in postgres_queries.py); schema.py has no index with
    ``updated_at``. Fix: an index ``messages(conversation_id, updated_at)`` (MAX becomes one
    index probe), or keep the conversation's own updated_at current.
    """
    small, n_small = await _list_cost(tmp_path, 10)
    big, n_big = await _list_cost(tmp_path, 300)
    assert n_small == n_big == 20
    assert big <= 3 * small, (
        f"one page of 20 conversations: {big} x100 VM steps at 300 messages each vs {small} "
        f"at 10 messages each")


async def test_get_conversation_returns_every_message_with_no_way_to_page(
        settings: Settings) -> None:
    """DEFECT: ``GET /api/conversations/{id}`` answers every message of the conversation in
    one JSON body: no ``limit``, no cursor (``?limit=50`` is ignored as an unknown
    parameter). A conversation kept for months (2,000 messages here; messages up to
    1,000,000 characters each, MAX_CONTENT_CHARS) makes an answer of any size, built whole in
    memory (``[MessageOut.of(m) for m in messages]`` then pydantic, then JSON), and the chat
    page at ``/`` loads it whole on every open (service/web/chat.js: ``api("GET",
    `/api/conversations/${id}`)``), and the terminal client, when a POST's answer is lost,
    fetches it whole to read its last two messages (service/chat.py ``_find_run``).

    What a user hits: opening an old conversation takes longer and longer, then times out or
    exhausts the browser tab; the server builds the whole body for each open.

    Code: service/api/conversations.py ``get_conversation``; store ``get_messages`` has no
    bound. Fix: ``?limit=&before=`` on messages (newest N, oldest first within the page) with
    a ``messages_next`` cursor, the page fetching older messages on scroll.
    """
    async with running_server(settings) as server, server.client() as client:
        store = server.services.require_store()
        r = await client.post("/api/conversations", json={})
        conv = r.json()["id"]
        await _fill(store, conv, 2000, 200)
        r = await client.get(f"/api/conversations/{conv}", params={"limit": 50})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["messages"]) <= 1000, (
            f"{len(body['messages'])} messages, {len(r.content):,} bytes in one answer "
            f"(limit=50 asked); keys: {sorted(body)}")


async def test_conversation_list_pages_repeat_every_v1_clients_system_prompt(
        settings: Settings) -> None:
    """Fixed (was: DEFECT): every ``/v1/chat/completions`` call stores a conversation whose
    ``system`` is the request's system messages, whole and uncapped (``POST /api/conversations``
    caps it at 100,000 characters; here 400,000, a body under SERVICE_MAX_BODY_BYTES), and every
    page of ``GET /api/conversations`` carries each listed conversation's whole ``system``. A
    host serving an SDK client with a long system prompt (a coding agent's: tens to hundreds of
    KB, sent with every call) fills the list with such conversations: a page of 100 (what the
    page at ``/`` asks for its sidebar, chat.js ``/api/conversations?limit=100``) is up to 100 x
    1 MiB. Here 10 completions make a 4 MB listing, for ids and titles.

    Code: service/api/openai.py ``chat_completions`` (``system = "\n\n".join(...)``, no cap),
    service/api/models.py ``ConversationOut`` (``system`` in every list item), served by
    service/api/conversations.py ``list_conversations``. Fix: leave ``system`` out of the list
    items (or cut it to a preview) and keep it in ``GET /api/conversations/{id}``; cap what a
    /v1 run stores as the conversation's system as ``CreateConversation`` does.
    """
    async with running_server(settings) as server, server.client() as client:
        big = "You are a careful assistant. " * 14_000  # ~400,000 characters
        for i in range(10):
            r = await client.post("/v1/chat/completions", json={
                "model": "fake-model",
                "messages": [{"role": "system", "content": big},
                             {"role": "user", "content": f"question {i}"}]})
            assert r.status_code == 200, r.text[:300]
        r = await client.get("/api/conversations", params={"limit": 100})
        assert r.status_code == 200
        items = r.json()["data"]
        assert len(items) == 10
        longest = max(len(c.get("system") or "") for c in items)
        assert len(r.content) <= 1_000_000, (
            f"a list page of {len(items)} conversations is {len(r.content):,} bytes "
            f"(a system of {longest:,} characters in each)")
        # Each item says its system is cut; the conversation's own GET has it whole.
        assert all(c["system_truncated"] and big.startswith(c["system"]) for c in items)
        r = await client.get(f"/api/conversations/{items[0]['id']}")
        assert r.json()["system"] == big
        assert "system_truncated" not in r.json()


# -- a long run: re-join from event 1 ---------------------------------------------------------


async def _long_finished_run(store: Any, n_tokens: int, finished_at: float | None = None,
                             conv: str | None = None) -> tuple[str, str]:
    conv = conv or (await store.create_conversation()).id
    begun = await store.begin_run(conv, content="write a lot", agent="chat", model=None)
    run_id = begun.run.id
    now = time.time()
    seq = 1
    batch: list[RunEvent] = []
    for _ in range(n_tokens):
        seq += 1
        batch.append(RunEvent.make(run_id, seq, "token", {"text": f"t{seq} "}, now))
        if len(batch) == 2000:
            assert not await store.append_run_events(batch)
            batch = []
    if batch:
        assert not await store.append_run_events(batch)
    end = [RunEvent.make(run_id, seq + 1, "message", {"content": "done"}, now),
           RunEvent.make(run_id, seq + 2, "run.finished",
                         {"status": "succeeded", "usage": {}}, now)]
    assert await store.finish_run(
        run_id, status="succeeded", message_id=begun.reply.id, content="done",
        message_status=MessageStatus.complete, error=None, usage={}, events=end,
        finished_at=finished_at)
    return conv, run_id


async def test_rejoin_of_a_25000_event_run_from_event_1_is_whole_and_in_order(
        settings: Settings) -> None:
    """Bound pinned (passes): a run of 25,000 events re-joined from event 1 gets every one,
    in order, with no duplicate (the reader takes the store in READ_LIMIT = 10,000 slices, so a
    re-join holds at most one slice in memory); one from ``after=24,990`` gets the last 12."""
    n = 25_000
    async with running_server(settings) as server, server.client() as client:
        _, run_id = await _long_finished_run(server.services.require_store(), n)
        with trio.fail_after(GUARD):
            r = await client.get(f"/api/runs/{run_id}/events")
        assert r.status_code == 200
        events = parse_sse(r.text)
        ids = [int(e["id"]) for e in events]
        assert ids == list(range(1, n + 4)), (len(ids), ids[:3], ids[-3:])
        assert events[-1]["event"] == "run.finished"
        r = await client.get(f"/api/runs/{run_id}/events", params={"after": 24_990})
        assert [int(e["id"]) for e in parse_sse(r.text)] == list(range(24_991, n + 4))


async def _recovery_cost(tmp_path: Path, runs: int, tokens: int) -> list[tuple[str, int]]:
    """(op, VM steps) of each write of a survivor closing ``runs`` runs of ``tokens`` events
    each that a dead process left running."""
    path = tmp_path / f"r{runs}.db"
    async with open_store(path, threaded=False) as store:
        conv = (await store.create_conversation()).id
    dead = SQLiteStore(path, threaded=False, process_id="999999999:1")
    await dead.open()
    try:
        for _ in range(runs):
            begun = await dead.begin_run(conv, content="q", agent="chat", model=None)
            assert not await dead.append_run_events([
                RunEvent.make(begun.run.id, seq, "token", {"text": "t "}, time.time())
                for seq in range(2, tokens + 2)])
    finally:
        await dead.aclose()
    async with open_store(path, threaded=False) as store:
        per_write: list[tuple[str, int]] = []
        write = store._write

        async def counting(op: str, fn: Any) -> Any:
            with _vm_steps(store) as steps:
                result = await write(op, fn)
            per_write.append((op, steps[0]))
            return result

        store._write = counting  # type: ignore[method-assign]
        closed = await store.recover_interrupted()
        store._write = write  # type: ignore[method-assign]
        assert len(closed) == runs
        return per_write


async def test_closing_a_dead_workers_runs_reads_all_their_events_in_one_write(
        tmp_path: Path) -> None:
    """DEFECT: a survivor closes every run a dead worker left in one write transaction
    (``recover_interrupted``: one ``_write`` for all candidates), and closing each reads all of
    its token events (to rebuild the partial answer), its run.finished by a scan of its events
    (no index on type), and its conversation's messages twice (``changed_at``). A worker
    killed with 200 long answers in flight (10,000 tokens each) makes its siblings read 2
    million rows while holding the write lock: every stream of every surviving worker freezes
    for as long (and at every start after a crash). Growth here: 20 dead runs cost ~10x the
    single write of 2, no batching.

    Code: service/store/sqlite_ownership.py ``recover_interrupted`` (``fn`` closes all
    ``candidates``), service/store/ownership.py ``close_interrupted``; postgres_ownership.py
    alike. Fix: close a few runs per transaction (as ``prune_events`` bounds its rows), and
    read each run's token text before the write (a run's events no longer change once its
    owner is gone; the claim in the write still decides).
    """
    small = await _recovery_cost(tmp_path, 2, 2500)
    big = await _recovery_cost(tmp_path, 20, 2500)
    biggest = max(n for op, n in big if op == "recover_interrupted")
    base = max(n for op, n in small if op == "recover_interrupted")
    assert biggest <= 3 * base, (
        f"one write transaction closing 20 dead runs: {biggest} x100 VM steps vs {base} "
        f"for 2; writes: {big}")


# -- retention: pruning a big table ----------------------------------------------------------


async def test_pruning_a_long_runs_events_is_batched_and_keeps_its_end(tmp_path: Path) -> None:
    """Bound pinned (passes): ``prune_events`` on a run of 12,000 token events deletes at most
    its ``rows`` (5,000) per call (one write transaction each, so writers wait behind at most
    that), takes several calls, and leaves the events a re-join needs (run.started, message,
    run.finished)."""
    async with _store(tmp_path) as store:
        _, run_id = await _long_finished_run(store, 12_000, finished_at=time.time() - 86_400)
        counts = []
        for _ in range(10):
            before = len(await store.list_run_events(run_id, limit=100_000))
            done = await store.prune_events(time.time() - 3600)
            after = len(await store.list_run_events(run_id, limit=100_000))
            counts.append(before - after)
            if not done:
                break
        assert max(counts) <= 5000, counts
        assert sum(counts) == 12_000, counts
        left = [e.type for e in await store.list_run_events(run_id)]
        assert left == ["run.started", "message", "run.finished"], left


async def test_deleting_a_long_conversation_deletes_its_events_in_bounded_writes(
        tmp_path: Path) -> None:
    """Fixed (was: DEFECT): ``DELETE /api/conversations/{id}`` deleted every event of every run of
    the conversation in one write transaction (ON DELETE CASCADE), with no bound: a conversation
    of 20 runs of 2,500 events (long answers: a token each) is 50,000 rows deleted while the
    store's write lock (SQLite: the one writer connection; PostgreSQL: the group-commit batch)
    is held. Every other write of the process (every live run's token batches, starts, ends)
    waits behind it: every user's stream freezes while one user deletes an old chat. A
    conversation kept for months holds millions.

    The service bounds the same work elsewhere: the retention's ``prune_events`` deletes at most
    5,000 rows per transaction, "so that no write waits long behind one" (runs/upkeep.py).

    Code: service/store/sqlite_queries.py ``delete_conversation`` (and postgres_queries.py),
    schema.py ``run_events ... REFERENCES runs(id) ON DELETE CASCADE``. Fix: delete the
    conversation's row (and its messages/runs rows) at once, then its runs' events in bounded
    batches, as ``prune_events`` does (e.g. a ``deleted`` mark on the runs and the upkeep
    loop finishing the job), or in slices of 5,000 before the final delete.
    """
    async with _store(tmp_path) as store:
        conv = (await store.create_conversation()).id
        for _ in range(20):
            await _long_finished_run(store, 2500, conv=conv)
        per_write: list[tuple[str, int]] = []
        write = store._write

        async def counting(op: str, fn: Any) -> Any:
            def counted(c: Any) -> Any:
                before = c.execute("SELECT COUNT(*) FROM run_events").fetchone()[0]
                result = fn(c)
                after = c.execute("SELECT COUNT(*) FROM run_events").fetchone()[0]
                per_write.append((op, before - after))
                return result
            return await write(op, counted)

        store._write = counting  # type: ignore[method-assign]
        await store.delete_conversation(conv)
        store._write = write  # type: ignore[method-assign]
        assert sum(n for _, n in per_write) == 20 * 2503
        assert max(n for _, n in per_write) <= 5000, (
            f"events deleted per write transaction: {per_write}")


async def test_rejoin_of_a_pruned_long_run_is_its_start_answer_and_end(
        settings: Settings) -> None:
    """Bound pinned (passes): once the retention pruned a 12,000-event run, a re-join from
    event 1 is ``run.started``, ``message``, ``run.finished`` (docs/api.md), across the gap
    the pruning left in the numbering, and costs three rows, not 12,000."""
    async with running_server(settings) as server, server.client() as client:
        store = server.services.require_store()
        _, run_id = await _long_finished_run(store, 12_000, finished_at=time.time() - 86_400)
        with trio.fail_after(GUARD):
            while await store.prune_events(time.time() - 3600):
                pass
            r = await client.get(f"/api/runs/{run_id}/events")
        frames = parse_sse(r.text)
        assert [(int(f["id"]), f["event"]) for f in frames] == [
            (1, "run.started"), (12_002, "message"), (12_003, "run.finished")]


async def _page_cost(tmp_path: Path, n: int) -> int:
    async with _store(tmp_path, f"p{n}.db") as store:
        for _ in range(n):
            await store.create_conversation(owner="alice")
        await store.create_conversation(owner="bob")
        with _vm_steps(store) as steps:
            await store.list_conversations(owner="alice", limit=20)
            page, nxt = await store.list_conversations(owner="alice", limit=20)
            await store.list_conversations(owner="alice", limit=20, before=nxt)
            await store.list_conversations(owner="bob", limit=20)
        assert len(page) == 20
        return steps[0]


async def test_a_page_of_conversations_costs_the_same_among_200_or_2000(
        tmp_path: Path) -> None:
    """Bound pinned (passes): with empty conversations, a page (the first, the next, another
    owner's) costs the same work among 200 or 2,000 of them: the ``(owner, seq)`` index
    serves the cursor (the cost that grows is each listed conversation's messages, above)."""
    small = await _page_cost(tmp_path, 200)
    big = await _page_cost(tmp_path, 2000)
    assert big <= 2 * small + 5, (small, big)


# -- many rows: listings ---------------------------------------------------------------------


async def test_conversation_pages_are_whole_at_page_boundaries_and_limits_enforced(
        tmp_path: Path, settings: Settings) -> None:
    """Bound pinned (passes): 250 conversations created in one burst (equal timestamps at the
    clock's resolution) page 100 + 100 + 50 with no duplicate and none missing (the cursor is
    the row's sequence, not its time); ``limit`` past 100 (conversations) or 500 (llm-calls) is
    a 422, not an unbounded answer."""
    async with _store(tmp_path) as store:
        made = [(await store.create_conversation()).id for _ in range(250)]
        seen: list[str] = []
        sizes = []
        cursor = None
        while True:
            page, cursor = await store.list_conversations(limit=100, before=cursor)
            seen += [c.id for c in page]
            sizes.append(len(page))
            if cursor is None:
                break
        assert sizes == [100, 100, 50]
        assert seen == made[::-1]
    async with running_server(settings) as server, server.client() as client:
        r = await client.get("/api/conversations", params={"limit": 101})
        assert r.status_code == 422, r.text
        r = await client.get("/api/llm-calls", params={"limit": 501})
        assert r.status_code == 422, r.text


async def _calls_cost(tmp_path: Path, n: int) -> tuple[int, int]:
    """VM steps of the newest 50 calls of an owner with none, among ``n`` calls of another."""
    async with _store(tmp_path, f"c{n}.db") as store:
        conv = (await store.create_conversation(owner="alice")).id
        begun = await store.begin_run(conv, content="q", agent="chat", model=None,
                                      owner="alice")
        now = time.time()
        async with trio.open_nursery() as nursery:  # group commit: few transactions
            for _ in range(n):
                nursery.start_soon(store.record_llm_call, LLMCallRecord(
                    new_id("call"), "fake", "m", LLMCallOutcome.ok, now, run_id=begun.run.id))
        bob_conv = (await store.create_conversation(owner="bob")).id
        bob = await store.begin_run(bob_conv, content="q", agent="chat", model=None,
                                    owner="bob")
        await store.record_llm_call(LLMCallRecord(
            new_id("call"), "fake", "m", LLMCallOutcome.ok, now, run_id=bob.run.id))
        # Bob's call, then more of alice's: his is neither the newest nor the oldest.
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(store.record_llm_call, LLMCallRecord(
                    new_id("call"), "fake", "m", LLMCallOutcome.ok, now, run_id=begun.run.id))
        with _vm_steps(store) as steps:
            calls = await store.list_llm_calls(owner="bob", limit=50)
        return steps[0], len(calls)


async def test_llm_calls_of_one_key_scan_every_other_keys_calls(tmp_path: Path) -> None:
    """DEFECT: with SERVICE_API_KEYS (one owner per key), ``GET /api/llm-calls`` of a key
    scans the calls of every key: calls carry no owner, so ``list_llm_calls`` joins
    ``runs`` and walks ``llm_calls`` newest first, one ``runs`` lookup per call, until it has
    ``limit`` of the caller's (or the table ends). A key with few calls on a host with millions
    of others' pays a scan of the whole table on each request (in SQLite, in the one reader
    connection's lock: every other read of the process waits behind it).

    Growth: here one call of "bob" among 2 x 300 vs 2 x 3,000 of "alice": ~10x the work for the
    same one-row answer.

    Code: service/store/sqlite_queries.py ``list_llm_calls`` (``JOIN runs AS r ON r.id =
    l.run_id WHERE r.owner = ? ORDER BY l.seq DESC``; postgres_queries.py alike); schema.py
    has no owner on llm_calls and no index on runs(owner). Fix: store the owner on each call
    (it is known when the call is recorded) with an index ``llm_calls(owner, seq)``.
    """
    small, n_small = await _calls_cost(tmp_path, 300)
    big, n_big = await _calls_cost(tmp_path, 3000)
    assert n_small == n_big == 1
    assert big <= 3 * small, (
        f"bob's one call: {big} x100 VM steps among 6,000 others' vs {small} among 600")


@pytest.mark.parametrize("n", [40])
async def test_metrics_series_do_not_grow_with_conversations_or_paths(
        settings: Settings, n: int) -> None:
    """Bound pinned (passes): requests on many conversations, runs and unknown paths add no
    series to /metrics (routes are labelled by their rule, unmatched paths as one label)."""
    async with running_server(settings) as server, server.client() as client:
        async def series() -> int:
            text = (await client.get("/metrics")).text
            # Request series only: a background store op seen for the first time (its
            # latency histogram) is not growth with the data.
            return sum(1 for line in text.splitlines()
                       if line.startswith("service_http_requests_total{")
                       and "/metrics" not in line)

        for i in range(3):  # every label combination of the requests below, once
            await client.get(f"/api/conversations/conv_x{i}")
            await client.get(f"/api/runs/run_x{i}")
            await client.get(f"/nowhere/{i}")
        base = await series()
        for i in range(n):
            await client.get(f"/api/conversations/conv_{i}")
            await client.get(f"/api/runs/run_{i}")
            await client.get(f"/nowhere/{i}/deeper")
        assert base >= 3
        assert await series() <= base + 2  # (an unmatched 404 under another rule, at most)
