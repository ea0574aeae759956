"""Review (dec07aa) of ``git diff dc6c4da..HEAD -- service docs`` (9c77b02..4c8a9a3): clients
skip replayed events, PostgreSQL picks of runs to prune (``Picks``, migration 9), HTTP/2 idle
connections closed at ``keep_alive_timeout``, store reads of run events bounded by size
(``READ_CHARS``, ``event_rows``).

Checked against the real app under hypercorn on 127.0.0.1:0 (``ScriptedBackend``), both stores
where it applies, PostgreSQL through ``pg_url``.

Fixed (was: DEFECTS, each test failing before its fix):

* ``service/store/postgres_queries.py`` ``list_run_events`` / ``list_events_of_runs``: a read
  cut by size still fetches up to ``limit`` (10,000) rows from the server and drops all but
  its page in Python: a follower catching up on a run of big events re-fetches the rest of the
  run at each page (43 events read in 12 pages fetched 244 rows; a 9.7 MB run of 10,000
  events is about 53 MB over the wire and a 10 MB ``fetchall`` per 1 MiB page).
* ``service/chat.py`` ``Client._take`` (line ~320): ``int(event_id)`` / ``int(turn.last_id)``
  on an id of more than 4,300 digits raises ``ValueError`` (Python's int-string limit) outside
  the ``try`` that turns a bad frame into ``Malformed``: a broken or hostile server crashes the
  turn with a traceback instead of the one line the docstring promises.
* (A risk this review found, fixed too: SQLite's lazily read page left its statement open
  while its error was kept alive: ``test_a_failed_page_kept_by_its_error_holds_no_old_...``.)

Found sound (tests pass):

* Reads cut by size (both stores): a finished run re-joined from 0 and from the middle, with
  ``READ_CHARS`` small and the answer's ``message`` event alone larger than it, gives every
  event once, in order, then the 204 after ``run.finished``; no loop re-reading one page, no
  wait for a wake-up (a cut page is not taken as drained: ``full()``). ``BatchedReads`` with
  asks from several cursors: an ask above a cut page reads the store itself (the existing
  ``test_reads_cut_by_size_are_not_taken_as_drained`` covers the batch too).
* SQLite's cursor iterated lazily (``event_rows`` stops early): the statement is reset when
  the cursor is freed at the read's return; a read that failed on a rotted row mid-page does
  not leave the reader connection on an old snapshot (a later commit is seen).
  (Mechanism noted: anything that keeps that failure's traceback alive keeps the statement,
  and with it the reader connection's read transaction, open: a later read on that
  connection sees the old snapshot. Nothing in the service keeps it: not a defect today.)
* PostgreSQL ``Picks``: the retention's ``(finished_at, id) >= (-inf, '')`` takes every row
  (finished_at 0, negative, -1e300); a run held by another transaction (SKIP LOCKED) is
  skipped and pruned by the next pass; a conversation's delete with a run held for a moment
  completes with its events gone. Ids are only compared in SQL (``>=`` and ``ORDER BY`` under
  one collation); Python compares ``after`` with ``start`` for equality only.
* Migration 9 on a database at version 8 with runs in it: the index is built, the version is
  9, the data is intact; a database at a newer version is refused.
* HTTP/2: an SSE stream on an h2c connection outlives ``keep_alive_timeout`` while another
  stream of the same connection ends (the re-armed timer sees a live stream: not idle).
* The page (``chat.js`` ``follow``) and the terminal skip ids at or below the last shown: ids
  are the run's own event seqs (``sse_event(item.seq, ...)``; frames not of the run carry no
  id and are never skipped); every ``live`` object starts at ``last_id: 0`` per run (send,
  watch), the reload restores ``last_id`` and ``text`` written together from one object; an
  Idempotency-Key re-send replays the same run, whose shown part is then rightly skipped.
  (Reviewed by reading; the terminal's path is exercised below.)

Runtime: about 9 s (10 tests, both stores where marked).
"""

from __future__ import annotations

import json
import sqlite3
import time
from io import StringIO
from typing import Any

import h2.events
import httpx
import psycopg
import pytest
import trio
from rich.console import Console

from service import chat
from service.errors import StoreError
from service.runs import reads as reads_mod
from service.settings import Settings, load_settings
from service.store import RunEvent, open_store, postgres_queries

from .fakes import Reply, ScriptedBackend
from .h2client import GUARD as H2_GUARD
from .h2client import H2Client, request
from .servers import running_server
from .streams import parse_sse
from .test_review_h2_abuse_dec07aa import server

pytestmark = pytest.mark.both_stores

GUARD = 30


async def _finished_run(srv: Any, reply_text: str = "") -> tuple[str, str, list[dict[str, Any]]]:
    """A run asked and followed to its end: (conversation, run id, its frames)."""
    async with srv.client() as c:
        conv = (await c.post("/api/conversations", json={})).json()["id"]
        with trio.fail_after(GUARD):
            r = await c.post(f"/api/conversations/{conv}/messages",
                             json={"content": "q", "stream": True})
        assert r.status_code == 200, r.text
        frames = parse_sse(r.text)
        assert frames[-1]["event"] == "run.finished", frames[-1]
        return conv, str(frames[0]["data"]["run_id"]), frames


# -- reads bounded by size ----------------------------------------------------------------------


async def test_a_finished_run_is_read_by_pages_of_size_to_its_end_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every event once, in order, from 0 and from the middle, the answer's ``message`` (20 KB)
    alone past ``READ_CHARS`` (2,000): no page read again, no wait for a wake-up."""
    monkeypatch.setattr(reads_mod, "READ_CHARS", 2_000)
    backend = ScriptedBackend([Reply("y" * 20_000, chunks=40)])
    async with running_server(settings, backend) as srv:
        _, run_id, live = await _finished_run(srv)
        ids = [int(f["id"]) for f in live if "id" in f]
        assert ids == list(range(1, len(ids) + 1))
        assert max(len(json.dumps(f["data"])) for f in live) > 2_000
        async with srv.client() as c:
            for after in (0, 1, len(ids) // 2, len(ids) - 2):
                t0 = trio.current_time()
                with trio.fail_after(10):
                    r = await c.get(f"/api/runs/{run_id}/events",
                                    headers={"Last-Event-ID": str(after)} if after else {})
                got = parse_sse(r.text)
                assert [int(f["id"]) for f in got] == ids[after:], after
                assert got[-1]["event"] == "run.finished"
                assert trio.current_time() - t0 < 2, "a page waited for a poll"
            r = await c.get(f"/api/runs/{run_id}/events", headers={"Last-Event-ID": str(ids[-1])})
            assert r.status_code == 204


async def test_pg_a_read_cut_by_size_fetches_only_its_page(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fixed (was: DEFECT: on PostgreSQL a read cut by size still fetches ``limit`` rows: a
    follower catching up on a run re-fetches the rest of the run at every page (quadratic up to
    10,000 events a read). Cause: service/store/postgres_queries.py:447-451
    (``list_run_events``: ``... ORDER BY seq LIMIT %s`` then ``.fetchall()``, cut by
    ``event_rows`` in Python) and :458-473 (``list_events_of_runs``: the LATERAL ``LIMIT %s``
    per run, all rows fetched); the comment "the rows come whole from the server: those past
    max_chars are dropped here" says so. Evidence: ``READ_CHARS`` = 2,000, a finished run of 43
    events (~520 characters each, its message 20 KB) read from 0 through GET /events: 12 reads
    fetched 43, 38, 34, ..., 2, 1 rows = 244 rows for 43 events (SQLite stops at the cut: its
    cursor is lazy). At the production bounds a 9.7 MB run of 10,000 events (~1 KB each) is ~10
    reads fetching ~53 MB, and each read still materialises up to 10 MB in ``fetchall`` (the
    memory bound the change claims holds for the page kept, not for the read). Fix: cut in SQL,
    e.g. ``SELECT ... FROM (SELECT ..., sum(length(data)) OVER (ORDER BY seq) - length(data) AS
    before FROM run_events WHERE run_id = %s AND seq > %s ORDER BY seq LIMIT %s) e WHERE before
    < %s`` (the same inside the LATERAL), or iterate a server-side cursor
    (``conn.cursor(name=...)`` / ``itersize``) and stop at the cut.)"""
    monkeypatch.setattr(reads_mod, "READ_CHARS", 2_000)
    fetched: list[int] = []
    real = postgres_queries.event_rows

    def counting(rows: Any, max_chars: int | None = None) -> Any:
        rows = list(rows)
        if max_chars is not None:
            fetched.append(len(rows))
        return real(rows, max_chars)

    monkeypatch.setattr(postgres_queries, "event_rows", counting)
    backend = ScriptedBackend([Reply("y" * 20_000, chunks=40)])
    async with running_server(load_settings(db=pg_url), backend) as srv:
        _, run_id, live = await _finished_run(srv)
        n = sum(1 for f in live if "id" in f)
        fetched.clear()
        async with srv.client() as c:
            with trio.fail_after(10):
                r = await c.get(f"/api/runs/{run_id}/events")
        assert len(parse_sse(r.text)) == n
    assert sum(fetched) <= 2 * n, (
        f"{n} events read in {len(fetched)} pages fetched {sum(fetched)} rows: {fetched}")


async def test_a_read_failed_mid_page_leaves_no_old_snapshot_on_sqlite(tmp_path: Any) -> None:
    """SQLite's cursor is read lazily now: a read that fails on a rotted row in the middle of
    its page (``json.loads``) must not leave its statement, and with it a read transaction,
    open on the reader connection: a conversation created after it is listed."""
    settings = load_settings(db=tmp_path / "s.db")
    async with running_server(settings, ScriptedBackend([Reply("a b c d e f")])) as srv:
        _, run_id, _ = await _finished_run(srv)
        with sqlite3.connect(tmp_path / "s.db") as db:
            db.execute("UPDATE run_events SET data = '{rotted' WHERE run_id = ? AND seq = 3",
                       (run_id,))
        async with srv.client() as c:
            with trio.fail_after(10):
                r = await c.get(f"/api/runs/{run_id}/events")
            frames = parse_sse(r.text)
            assert frames[-1]["event"] == "error", frames[-1]
            assert "id" not in frames[-1], frames[-1]
            conv = (await c.post("/api/conversations", json={})).json()["id"]
            listed = (await c.get("/api/conversations")).json()
            ids = [x["id"] for x in listed.get("conversations", listed.get("data", []))]
            assert conv in ids, "the reader connection reads an old snapshot"


# -- PostgreSQL: picks of runs to prune, migration 9 --------------------------------------------


def _pg(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True)


async def test_pg_retention_takes_every_finished_row_and_a_held_run_on_the_next_pass(
    pg_url: str,
) -> None:
    """``(finished_at, id) >= (-inf, '')`` takes every row (0, negative, -1e300 included); a
    run another transaction holds (SKIP LOCKED) is left and pruned by a later pass."""
    backend = ScriptedBackend([Reply("one two three four five six seven")] * 5)
    async with running_server(load_settings(db=pg_url), backend) as srv:
        runs = [(await _finished_run(srv))[1] for _ in range(5)]
        store = srv.services.require_store()
        with _pg(pg_url) as db:
            for rid, at in zip(runs, (0.0, -5.0, -1e300, 1.5, time.time() - 100), strict=True):
                db.execute("UPDATE runs SET finished_at = %s WHERE id = %s", (at, rid))
            with db.transaction():  # another instance's prune holds run 4
                db.execute("SELECT 1 FROM runs WHERE id = %s FOR UPDATE", (runs[3],))
                with trio.fail_after(GUARD):
                    while await store.prune_events(time.time()):
                        pass
                pruned = dict(db.execute("SELECT id, events_pruned FROM runs").fetchall())
            assert [pruned[r] for r in runs] == [1, 1, 1, 0, 1], pruned
            with trio.fail_after(GUARD):
                while await store.prune_events(time.time()):
                    pass
            pruned = dict(db.execute("SELECT id, events_pruned FROM runs").fetchall())
            assert all(pruned[r] == 1 for r in runs), pruned
            kinds = {t for (t,) in db.execute("SELECT DISTINCT type FROM run_events")}
            assert "token" not in kinds, kinds


async def test_pg_a_delete_with_a_run_held_for_a_moment_completes(pg_url: str) -> None:
    """A conversation's delete: its picks go on from the last one; a run held by another
    transaction for 0.5 s is skipped, then pruned or deleted: the conversation and every
    event of its runs are gone."""
    backend = ScriptedBackend([Reply("one two three four five")] * 6)
    async with running_server(load_settings(db=pg_url), backend) as srv:
        conv, _, _ = await _finished_run(srv)
        async with srv.client() as c:
            for _ in range(5):
                with trio.fail_after(GUARD):
                    r = await c.post(f"/api/conversations/{conv}/messages",
                                     json={"content": "q", "stream": True})
                assert parse_sse(r.text)[-1]["event"] == "run.finished"
            with _pg(pg_url) as db:
                held = db.execute("SELECT id FROM runs WHERE conversation_id = %s "
                                  "ORDER BY id LIMIT 1 OFFSET 2", (conv,)).fetchone()[0]

                async def hold() -> None:
                    with _pg(pg_url) as other, other.transaction():
                        other.execute("SELECT 1 FROM runs WHERE id = %s FOR UPDATE", (held,))
                        await trio.sleep(0.5)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(hold)
                    await trio.sleep(0.1)
                    with trio.fail_after(GUARD):
                        r = await c.delete(f"/api/conversations/{conv}")
                assert r.status_code in (200, 204), r.text
                left = db.execute("SELECT count(*) FROM run_events e JOIN runs r ON "
                                  "r.id = e.run_id WHERE r.conversation_id = %s",
                                  (conv,)).fetchone()[0]
                assert left == 0
                assert (await c.get(f"/api/conversations/{conv}")).status_code == 404


async def test_pg_migration_9_on_a_database_with_data_and_a_newer_one_refused(
    pg_url: str,
) -> None:
    """A database at version 8 with a run in it migrates to 9 (the index built, the data
    intact); one at version 10 is refused before anything is written."""
    async with running_server(load_settings(db=pg_url),
                              ScriptedBackend([Reply("a b c")] * 2)) as srv:
        await _finished_run(srv)
    with _pg(pg_url) as db:
        db.execute("DROP INDEX runs_conversation_unpruned")
        db.execute("UPDATE schema_version SET version = 8")
    async with open_store(pg_url) as store:
        assert store is not None
    with _pg(pg_url) as db:
        assert db.execute("SELECT version FROM schema_version").fetchone()[0] == 9
        assert db.execute("SELECT count(*) FROM pg_indexes WHERE indexname = "
                          "'runs_conversation_unpruned'").fetchone()[0] == 1
        assert db.execute("SELECT count(*) FROM runs").fetchone()[0] == 1
        db.execute("UPDATE schema_version SET version = 10")
    with pytest.raises(StoreError, match="newer than this code"):
        async with open_store(pg_url):
            pass


# -- HTTP/2: the idle timer and a live stream --------------------------------------------------


async def test_an_h2c_sse_stream_outlives_keep_alive_timeout_while_another_stream_ends(
    tmp_path: Any,
) -> None:
    """Stream 1 an SSE run of 3 s (tokens every 0.1 s), stream 3 a GET that ends at once on
    the same connection, ``keep_alive_timeout`` = 0.5: the timer re-armed by stream 3's end
    sees stream 1 (not idle), and stream 1 gets its ``run.finished``."""
    backend = ScriptedBackend([Reply("tick " * 30, gap=0.1)])
    async with server(tmp_path, backend, keep_alive_timeout=0.5) as srv:
        async with srv.http() as http:
            conv = (await http.post("/api/conversations", json={})).json()["id"]
        c = await H2Client.open(srv.port, settled=True)
        body = json.dumps({"content": "q", "stream": True}).encode()
        c.h2.send_headers(1, request("POST", f"/api/conversations/{conv}/messages",
                                     len(body)))
        c.h2.send_data(1, body, end_stream=True)
        await c.flush()
        await trio.sleep(0.3)
        c.h2.send_headers(3, request("GET", "/healthz"), end_stream=True)
        await c.flush()
        data = b""
        with trio.fail_after(H2_GUARD):
            while True:
                assert await c.pump(), "the connection was closed under a live stream"
                for e in c.events:
                    if getattr(e, "stream_id", None) == 1 and hasattr(e, "data"):
                        data += e.data
                c.events = [e for e in c.events if not hasattr(e, "data")
                            or getattr(e, "stream_id", None) != 1]
                if b"run.finished" in data:
                    break
        assert any(e.stream_id == 3 for e in c.saw(h2.events.StreamEnded)), "stream 3 open"
        await c.aclose()


# -- the terminal: ids at or below the last shown ------------------------------------------------


def _client(handler: Any) -> tuple[httpx.AsyncClient, chat.Client, StringIO]:
    out = StringIO()
    renderer = chat.Renderer(Console(file=out, force_terminal=False, width=200),
                             Console(file=StringIO(), force_terminal=False, width=200))
    opts = chat.Options(url="http://svc.test", key=None, agent=None, model=None,
                        conversation="c1", message=None)
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://svc.test")
    return http, chat.Client(opts, http, renderer), out


def _sse(*frames: tuple[str, str, dict[str, Any]]) -> bytes:
    return b"".join(f"id: {i}\nevent: {e}\ndata: {json.dumps(d)}\n\n".encode()
                    for i, e, d in frames)


async def test_the_terminal_shows_a_replayed_run_once() -> None:
    """A re-join answered from the run's start (a proxy dropped Last-Event-ID): the tokens
    already shown are skipped, the rest shown once, the turn ends."""
    calls: list[str] = []

    class Cut(httpx.AsyncByteStream):
        async def __aiter__(self) -> Any:
            yield _sse(("1", "run.started", {"run_id": "r1", "agent": "chat"}),
                       ("2", "token", {"text": "AAA"}))
            raise httpx.ReadError("cut")

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.method == "POST":
            return httpx.Response(200, headers={"X-Run-Id": "r1",
                                                "content-type": "text/event-stream"},
                                  stream=Cut())
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=_sse(
            ("1", "run.started", {"run_id": "r1", "agent": "chat"}),
            ("2", "token", {"text": "AAA"}), ("3", "token", {"text": "BBB"}),
            ("4", "run.finished", {"status": "succeeded", "content": "AAABBB"})))

    http, client, out = _client(handler)
    async with http:
        turn = chat.Turn()
        with trio.fail_after(20):
            await client._stream("c1", {"content": "hi", "stream": True}, turn)
    assert turn.status == "succeeded"
    assert out.getvalue().count("AAA") == 1, out.getvalue()
    assert "BBB" in out.getvalue()


async def test_the_terminal_says_one_line_for_an_id_past_pythons_int_limit() -> None:
    """Fixed (was: DEFECT: an event id of more than 4,300 digits crashes the terminal's turn
    with a ``ValueError`` traceback. Cause: service/chat.py:320 (``Client._take``):
    ``int(event_id)`` and ``int(turn.last_id)`` are outside the ``try`` that turns a frame this
    client cannot read into ``Malformed`` (one line), and Python 3.11 refuses int() of a string
    past 4,300 digits (``sys.set_int_max_str_digits``). Evidence: frames ``id: 1`` then an id of
    5,000 digits then ``id: 2``: ``ValueError: Exceeds the limit (4300 digits) for integer
    string conversion`` escapes ``_stream`` (before the change the id was only kept as a
    string). Fix: bound the id before ``int()`` as the server does (``is_event_id`` and ``<
    2**63``, service/api/runs.py:309), e.g. ``number = event_id.isascii() and event_id.isdigit()
    and len(event_id) <= 19``, and raise ``Malformed`` for a longer one.)"""
    huge = "9" * 5_000

    async def handler(request: httpx.Request) -> httpx.Response:
        body = _sse(("1", "run.started", {"run_id": "r1", "agent": "chat"}),
                    (huge, "token", {"text": "x"}), ("2", "token", {"text": "y"}),
                    ("3", "run.finished", {"status": "succeeded", "content": "xy"}))
        return httpx.Response(200, headers={"X-Run-Id": "r1",
                                            "content-type": "text/event-stream"}, content=body)

    http, client, _ = _client(handler)
    failure: BaseException | None = None
    async with http:
        turn = chat.Turn()
        with trio.fail_after(20):
            try:
                await client._stream("c1", {"content": "hi", "stream": True}, turn)
            except chat.ChatError:
                pass  # one line: what the docstring promises
            except ValueError as exc:
                failure = exc
    assert failure is None, f"the turn crashed: {failure!r}"


async def test_a_failed_page_kept_by_its_error_holds_no_old_snapshot_on_sqlite(
        tmp_path: Any) -> None:
    """Fixed (was: a risk the review found, not yet a defect): the error of a read that failed
    mid-page, kept alive (its traceback holds the read's frames, and with them its lazily read
    cursor), kept the statement open, and with it the reader connection's snapshot: reads
    after it did not see later commits. A page's statement is now closed when the page is
    done, whatever happened (``sqlite_queries._page``)."""
    from service.errors import StoreError

    db = tmp_path / "s.db"
    async with open_store(db) as store:
        conv = await store.create_conversation(agent="chat")
        run = (await store.begin_run(conv.id, content="q", agent="chat", model=None)).run
        await store.append_run_events(
            [RunEvent(run.id, s, "token", {"text": str(s)}, 0.0) for s in range(2, 9)])
        with sqlite3.connect(db) as raw:
            raw.execute("UPDATE run_events SET data = '{rotted' WHERE run_id = ? AND seq = 4",
                        (run.id,))
        kept: list[BaseException] = []
        for _ in range(3):  # (each reader connection of the store, if it has several)
            try:
                await store.list_run_events(run.id)
            except StoreError as exc:
                kept.append(exc)
        assert kept
        later = await store.create_conversation(agent="chat")
        listed, _ = await store.list_conversations()
        assert later.id in [c.id for c in listed], "a read saw the snapshot of a failed page"
