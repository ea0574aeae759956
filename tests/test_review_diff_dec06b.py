"""Review of the 2026-12-06 diff (cdd9122..HEAD, service/): each test fails on the code it was
written against, because of a defect a client would hit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import h2.events
import pytest
import trio

from service.settings import Settings, load_settings
from service.sim.scenario import Reply as SimReply

from .clients.test_chat_page import CHROMIUM, _in_browser, _send
from .e2e import e2e
from .fakes import ScriptedBackend
from .h2client import GUARD, H2Client
from .servers import running_server

TEST_GUARD = 60  # seconds a browser test may take (a browser start included)

# -- 1. SERVICE_MAX_BODY_BYTES over HTTP/2, a body with no declared length ---------------------

async def test_a_body_over_the_cap_without_a_length_over_http2_is_413_and_does_nothing(
    tmp_path: Path,
) -> None:
    """API.md: ``SERVICE_MAX_BODY_BYTES`` is the "largest request body; larger gets 413", on
    every endpoint (the new before_request hook: a cancel or a delete with a body over it does
    nothing). The hook checks a declared Content-Length, and reads the body only when
    ``Transfer-Encoding`` says chunked. HTTP/2 has no Transfer-Encoding (RFC 9113 forbids it):
    a body sent in DATA frames with no content-length (as any streaming h2 client sends one)
    passes both checks, and ``DELETE /api/conversations/{id}`` is answered 204 and deletes it.

    Expected: 413, and the conversation is still there.
    """
    settings = load_settings(db=tmp_path / "s.db", max_body_bytes=4096)
    async with running_server(settings, ScriptedBackend()) as srv:
        async with srv.client() as http:
            with trio.fail_after(GUARD):
                conv = (await http.post("/api/conversations", json={})).json()["id"]
        c = await H2Client.to(srv.url)
        try:
            sid = c.h2.get_next_available_stream_id()
            c.h2.send_headers(sid, [
                (b":method", b"DELETE"), (b":scheme", b"http"),
                (b":path", f"/api/conversations/{conv}".encode()),
                (b":authority", b"127.0.0.1"), (b"content-type", b"application/json")])
            body = b'{"x": "' + b"y" * 20_000 + b'"}'  # within the initial window (65,535)
            for at in range(0, len(body), 8192):
                c.h2.send_data(sid, body[at:at + 8192], end_stream=at + 8192 >= len(body))
            await c.flush()
            with trio.fail_after(GUARD):
                while not any(isinstance(e, h2.events.StreamEnded) and e.stream_id == sid
                              for e in c.events):
                    assert await c.pump(), "the server closed the connection"
            statuses = [dict(e.headers)[b":status"] for e in c.events
                        if isinstance(e, h2.events.ResponseReceived)]
        finally:
            await c.stream.aclose()
        async with srv.client() as http:
            with trio.fail_after(GUARD):
                still = await http.get(f"/api/conversations/{conv}")
        assert (statuses, still.status_code) == ([b"413"], 200), (
            f"DELETE with a 20,002-byte body (cap 4,096) over HTTP/2: {statuses}; the "
            f"conversation afterwards: {still.status_code}")


# -- 2. the announcer reads a reply's blocks run together -----------------------------------

browser = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")


def _announced(url: str, page: Any) -> dict[str, str]:
    from playwright.sync_api import expect

    page.goto(url + "/")
    answer = _send(page, "question")
    expect(page.get_by_test_id("stop")).to_be_hidden()
    announcer = page.get_by_test_id("announcer")
    expect(announcer).not_to_have_text("")
    return {"said": announcer.text_content() or "",
            "shown": answer.locator(".answer").inner_text()}


@pytest.mark.slow
@browser
async def test_the_announcer_says_a_replys_blocks_as_separate_words(tmp_path: Path) -> None:
    """The announcer (a status region, commit d005308) says a reply once it is whole: "the
    answer" as shown. It takes the answer's ``textContent``, which joins its blocks (paragraphs,
    list items, table cells: the Markdown renderer's elements) with nothing between them: a
    reply "- apples / - pears" is read out as "applespears", a table's "name | kg" as
    "namekg", a heading and its paragraph as one word. A screen reader user hears words the
    reply does not have.

    Expected: the announcement has the words shown on screen (innerText's), in order
    (punctuation added between blocks aside).
    """
    text = ("# Fruit\nTwo kinds:\n\n- apples\n- pears\n\n"
            "| name | kg |\n|---|---|\n| figs | 3 |")
    with trio.fail_after(TEST_GUARD):
        async with e2e(load_settings(db=tmp_path / "s.db"), "llamacpp") as env:
            env.sim.script(SimReply(text=text))
            seen = await _in_browser(partial(_announced, env.server.url))
    def words(text: str) -> list[str]:  # punctuation between blocks is fine
        return [w for w in (w.strip(".,;:!?") for w in text.split()) if w]

    assert words(seen["said"]) == words(seen["shown"]), (
        f"said {seen['said']!r}; shown {seen['shown']!r}")


# -- 3. a table under a list item stays raw pipes --------------------------------------------

@pytest.mark.slow
@browser
async def test_a_table_under_a_list_item_is_shown_as_a_table(settings: Settings) -> None:
    """The renderer's tables (commit 027882b: "a table as lines of pipes" fixed) are looked for
    only outside lists (``!lists.length``); a table written under a numbered step, indented as
    the step's text (as GitHub renders it: a table inside the item), is taken for the item's
    continuation lines and shown as raw pipes and dashes: "| a | b |<br>|---|---|...".

    Expected: a table, and no line of pipes or dashes on screen.
    """
    text = ("1. Compare the two:\n"
            "   | plan | price |\n"
            "   |------|------:|\n"
            "   | basic | 5 |\n"
            "2. Pick one.")
    from .clients.test_page_markdown_tables import _model_says

    seen = await _model_says(settings, text)
    assert [t["head"] for t in seen["tables"]] == [["plan", "price"]], seen["text"]
    assert "|---" not in seen["text"], seen["text"]


# -- 4. a late end on an instance whose clock is behind moves no updated_at ---------------------

async def test_a_late_end_moves_updated_at_whatever_the_instances_clocks_say(
    pg_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docs/api.md: a conversation's ``updated_at`` moves with each run's end, "never
    backwards: a client syncing what changed since a time finds an answer that landed after
    its question (a reply's end moves it when the store takes it, also when that is well after
    the run ended)"; docs/deploy.md: instances on several hosts share one PostgreSQL and
    "hosts' clocks need not agree". The fix (finish_run's ``max(now, time.time())``) stamps
    the reply with the *writing instance's* wall clock: after a question landed through an
    instance whose clock is ahead (here by 60 s), the run's late end, stored by its owner,
    is stamped under it, and the conversation's ``updated_at`` (the latest of its own and its
    messages') does not move: a client that synced in between never fetches the answer.

    Expected: ``updated_at`` after the end is stored is later than before it was.
    """
    import time as time_mod

    from service.store.postgres import PostgresStore
    from service.store.records import MessageStatus

    async with PostgresStore(pg_url) as store:
        conv = (await store.create_conversation()).id
        first = await store.begin_run(conv, content="q1", agent="chat", model=None)
        real = time_mod.time
        monkeypatch.setattr(time_mod, "time", lambda: real() + 60)  # an instance ahead
        await store.begin_run(conv, content="q2", agent="chat", model=None)  # a new question
        monkeypatch.setattr(time_mod, "time", real)
        before = (await store.get_conversation(conv)).updated_at
        held = await store.finish_run(
            first.run.id, status="succeeded", message_id=first.reply.id, content="the answer",
            message_status=MessageStatus.complete, error=None, usage={})
        after = (await store.get_conversation(conv)).updated_at
        reply = next(m for m in await store.get_messages(conv) if m.id == first.reply.id)
    assert held
    assert reply.status == "complete"
    assert after > before, (
        f"the reply went pending -> complete and updated_at stayed {after} (was {before}; "
        f"the reply's updated_at {reply.updated_at})")


# -- 5. Expect: 100-continue with a declared length over the cap -------------------------------

async def _head(stream: trio.SocketStream, buf: bytes = b"") -> bytes:
    """What the server sent, read until the end of a response head."""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        assert data, f"closed before an answer: {buf!r}"
        buf += data
    return buf


@asynccontextmanager
async def _asking_to_send(tmp_path: Path, length: int
                          ) -> AsyncIterator[tuple[trio.SocketStream, bytes]]:
    """A POST declaring ``length`` bytes that asks first (``Expect: 100-continue``), to a
    server whose cap is 4,096 bytes: its connection, and the head the server answered."""
    settings = load_settings(db=tmp_path / "s.db", max_body_bytes=4096)
    async with running_server(settings, ScriptedBackend()) as srv:
        host, port = srv.url.removeprefix("http://").rsplit(":", 1)
        async with await trio.open_tcp_stream(host, int(port)) as stream:
            await stream.send_all(
                b"POST /api/conversations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n"
                b"Expect: 100-continue\r\n\r\n" % length)
            with trio.fail_after(GUARD):
                buf = await _head(stream)
            yield stream, buf


async def test_a_declared_length_over_the_cap_is_refused_before_100_continue(
    tmp_path: Path,
) -> None:
    """The new hook: "A declared length is known at once" and is a 413 before anything runs.
    A client that asks first (``Expect: 100-continue``: curl does for any body over 1 KiB,
    so do .NET's and Java's clients) is told ``100 Continue`` all the same (hypercorn sends it
    as soon as the headers are read, before the app sees the request) and so uploads the whole
    body (here 10 MB) that is refused; the server then answers 413 with ``Connection: close``
    while the upload is still coming, and the client may get a reset instead of the 413.
    RFC 9110 10.1.1: a server SHOULD send the final status at once "if that status can be
    determined by examining just the method, target URI, and header fields".

    Expected: the first (and only) status line is 413, with no 100 before it.
    """
    async with _asking_to_send(tmp_path, 10_000_000) as (_, buf):
        pass
    first = buf.split(b"\r\n", 1)[0]
    assert first.startswith(b"HTTP/1.1 413"), (
        f"a 10 MB body declared (cap 4,096) with Expect: 100-continue was answered "
        f"{first!r} first: the client is told to upload it")


# -- 6. a table's missing cells, made up without bound -----------------------------------------

def _rendered_size(url: str, text: str, page: Any) -> dict[str, int]:
    page.goto(url + "/")
    return page.evaluate("""async (text) => {
        const { renderMarkdown } = await import("/assets/markdown.js");
        const html = renderMarkdown(text);
        return { chars: html.length, cells: (html.match(/<td/g) || []).length };
    }""", text)


@pytest.mark.slow
@browser
async def test_a_tables_missing_cells_do_not_blow_up_the_page(tmp_path: Path) -> None:
    """The renderer fills each row to the header's width (``head.map`` per row, an empty
    ``<td>`` for each cell the row lacks): a wide header and many short rows make cells
    that are not in the input, width x rows of them. 6 kB of model output (1,000 columns,
    1,000 rows of a lone "|") renders 1,000,000 cells, 20 MB of HTML, and the page renders
    the whole answer again at every token: an upstream (or a prompt-injected page a tool
    fetched) freezes or kills the tab. cmark-gfm bounds the cells it makes up for this very
    reason (MAX_AUTOCOMPLETED_CELLS, a 2023 denial-of-service fix); every other construct of
    the subset makes HTML proportional to its input.

    Expected: the HTML is at most 100 times the Markdown's size.
    """
    cols, rows = 1000, 1000
    text = "|a" * cols + "|\n" + "|-" * cols + "|\n" + "|\n" * rows
    with trio.fail_after(TEST_GUARD):
        async with running_server(load_settings(db=tmp_path / "s.db"), ScriptedBackend()) as srv:
            got = await _in_browser(partial(_rendered_size, srv.url, text))
    assert got["chars"] <= 100 * len(text), (
        f"{len(text):,} characters of Markdown rendered {got['chars']:,} of HTML "
        f"({got['cells']:,} table cells)")


async def test_a_declared_length_within_the_cap_is_still_told_to_continue(
    tmp_path: Path,
) -> None:
    """The guard beside the test above: a body within the cap is asked for (``100 Continue``),
    sent, and answered."""
    body = b'{"title": "t"}'
    async with _asking_to_send(tmp_path, len(body)) as (stream, buf):
        assert buf.startswith(b"HTTP/1.1 100 "), buf
        with trio.fail_after(GUARD):
            await stream.send_all(body)
            buf = await _head(stream, buf.split(b"\r\n\r\n", 1)[1])
    assert buf.startswith(b"HTTP/1.1 201") or buf.startswith(b"HTTP/1.1 200"), buf[:200]
