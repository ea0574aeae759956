"""Review of the day's diff (6836286..HEAD): each test fails on the reviewed code because of a
real defect, and says the correct behaviour."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from service.backends.base import ChatRequest
from service.settings import load_settings

from .clients.test_chat_page import CHROMIUM, _in_browser
from .fakes import Reply, ScriptedBackend
from .servers import running_server
from .streams import parse_sse

GUARD = 90  # seconds a whole test may take (a browser start included)
browser = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")


# -- 1. a non-stream /v1 answer's reasoning_content is not cleaned as the stream's is -------

_DIRTY = ("a\ud800b ", "c\x00d")


async def test_non_stream_reasoning_content_is_the_streams_text(tmp_path: Path) -> None:
    """5409d38 collects the thinking for a non-stream answer (``reasoning_parts``) from the
    raw chunks, while the stream's ``reasoning_content`` comes from the ``thought`` events,
    whose text is cleaned (``RunHandle._number``: a model's JSON escapes decode to NUL and
    lone surrogates, which no event holds). The same completion's thinking then differs between
    the two forms: the non-stream answer carries the NUL and the lone surrogate.

    Expected: the non-stream ``reasoning_content`` is the stream's (cleaned) text."""
    def answers(req: ChatRequest) -> Reply:
        return Reply("The answer.", thinking=_DIRTY)

    async with running_server(load_settings(db=tmp_path / "s.db"),
                              ScriptedBackend(answers)) as srv, srv.client() as client:
        with trio.fail_after(GUARD):
            r = await client.post("/v1/chat/completions", json={
                "stream": True, "messages": [{"role": "user", "content": "why?"}]})
            deltas = [f["data"]["choices"][0]["delta"] for f in parse_sse(r.text)
                      if f["data"] != "[DONE]" and f["data"].get("choices")]
            streamed = "".join(d["reasoning_content"] for d in deltas
                               if "reasoning_content" in d)
            r = await client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "why?"}]})
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert "\x00" not in streamed
    assert "\ud800" not in streamed
    assert message.get("reasoning_content") == streamed, (
        f"non-stream {message.get('reasoning_content')!r}; stream {streamed!r}")


# -- 2. a conversation opened late runs over the run the user sent meanwhile ----------------

_SLOW_OPEN = """
(() => {
  const real = window.fetch.bind(window);
  window.__slowOpen = false;
  window.fetch = async (input, init) => {
    const url = typeof input === "string" ? input : input.url;
    const method = (init && init.method) || "GET";
    // The store slow for a moment: a conversation's GET takes 1.5 s.
    if (window.__slowOpen && method === "GET" && /\\/api\\/conversations\\/[^/?]+$/.test(url)) {
      await new Promise((done) => setTimeout(done, 1500));
    }
    return real(input, init);
  };
})();
"""


def _send_while_opening(url: str, page: Any) -> dict[str, Any]:
    from playwright.sync_api import expect

    page.add_init_script(_SLOW_OPEN)
    page.goto(url + "/")
    answers = page.get_by_test_id("assistant-message")
    page.get_by_test_id("message-input").fill("first question")
    page.get_by_test_id("send").click()
    expect(answers.first).to_contain_text("echo: first question")
    expect(page.get_by_test_id("stop")).to_be_hidden()
    page.get_by_test_id("new-conversation").click()
    page.get_by_test_id("message-input").fill("second question")
    page.get_by_test_id("send").click()
    expect(answers.first).to_contain_text("echo: second question")
    expect(page.get_by_test_id("stop")).to_be_hidden()
    expect(page.get_by_test_id("conversation")).to_have_count(2)
    # The first conversation clicked (its GET slow), then, before it has opened, a message
    # sent in the one on screen: the page is busy with that run from now on.
    page.evaluate("() => { window.__slowOpen = true; }")
    page.get_by_test_id("conversation").filter(has_text="first question").click()
    page.get_by_test_id("message-input").fill("slow third")
    page.get_by_test_id("send").click()
    expect(page.get_by_test_id("stop")).to_be_visible()
    expect(page.get_by_test_id("stop")).to_be_hidden(timeout=30_000)  # the run's end
    page.wait_for_timeout(300)
    return {"users": page.get_by_test_id("user-message").all_inner_texts(),
            "answers": answers.all_inner_texts()}


def _slow_or_echo(req: ChatRequest) -> Reply:
    q = req.messages[-1].content
    if q.startswith("slow"):
        return Reply("tick " * 30, gap=0.1)  # 3 s
    return Reply(f"echo: {q}")


@pytest.mark.slow
@browser
async def test_a_conversation_opened_late_does_not_replace_a_run_sent_meanwhile(
        tmp_path: Path) -> None:
    """``openConversation`` (rewritten in 9c0e483 with the ``opening`` counter) checks that
    the page is not busy with a run (``state.run``) only before its GET: a message sent while
    that GET is in flight starts a run, and when the GET lands the page replaces the messages
    with the other conversation and makes it current. The run the user just sent streams into
    a reply no longer on screen (its answer never shown), and the next message goes to the
    conversation opened late. The same function drops an answer that comes late when another
    conversation was opened meanwhile; a run started meanwhile is not considered.

    Expected: once the run has ended, the screen shows the message just sent and its answer
    (the late open is dropped, as a click while busy is)."""
    backend = ScriptedBackend(_slow_or_echo)
    with trio.fail_after(GUARD):
        async with running_server(load_settings(db=tmp_path / "s.db"), backend) as srv:
            seen = await _in_browser(partial(_send_while_opening, srv.url))
    assert "slow third" in seen["users"], seen
    assert any("tick tick" in a for a in seen["answers"]), seen


# -- 3. at a phone's width a streaming answer is no longer followed ---------------------------

def _phone_follow(url: str, page: Any) -> list[dict[str, float]]:
    from playwright.sync_api import expect

    page.set_viewport_size({"width": 375, "height": 667})  # a phone (under 40rem)
    page.goto(url + "/")
    answers = page.get_by_test_id("assistant-message")
    composer = page.get_by_test_id("message-input")
    for n, text in enumerate(("first", "second", "slow third")):
        composer.fill(text)
        composer.press("Enter")  # sent by keyboard: the focus stays in the composer
        expect(answers).to_have_count(n + 1)
        if n < 2:
            expect(page.get_by_test_id("stop")).to_be_hidden()
    # The third answer streams (about 4 s): where its newest text is, a few times.
    seen = []
    for _ in range(4):
        page.wait_for_timeout(400)
        seen.append(page.evaluate("""() => {
            const last = [...document.querySelectorAll('[data-testid=assistant-message]')].pop();
            return {bottom: last.getBoundingClientRect().bottom, screen: innerHeight}; }"""))
    return seen


@pytest.mark.slow
@browser
async def test_at_a_phone_width_a_streaming_answer_stays_in_view(tmp_path: Path) -> None:
    """bd4e9d4 puts the conversations above the chat below 40rem (``body`` a column). ``main``
    keeps ``flex: 1`` with its automatic minimum height (its content's), so it grows with the
    messages: ``#messages`` is no longer a pane of the screen's height that scrolls, the whole
    page is, and ``keepInView`` (which scrolls ``#messages``) follows nothing. On a phone an
    answer streams off the bottom of the screen while its reader sits at the bottom (at 700 px
    wide, the row layout, the same answer is followed; with ``main { min-height: 0 }`` in the
    media query it is followed at 375 px too).

    Expected: while an answer streams, its newest text is on screen (the pane follows it, as
    it does at any width above 40rem)."""
    def answers(req: ChatRequest) -> Reply:
        if req.messages[-1].content.startswith("slow"):
            return Reply("tick " * 400, gap=0.01)
        return Reply("word " * 300)

    with trio.fail_after(GUARD):
        async with running_server(load_settings(db=tmp_path / "s.db"),
                                  ScriptedBackend(answers)) as srv:
            seen = await _in_browser(partial(_phone_follow, srv.url))
    assert all(s["bottom"] <= s["screen"] + 2 for s in seen), (
        f"the streaming answer's bottom vs the screen's height: {seen}")


# -- 4. a kept end whose run's row is locked still ends every retry pass first ----------------

async def test_a_kept_end_on_a_locked_row_does_not_hold_back_the_others(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """c934424 moves a kept end whose write went past ``WRITE_BUDGET`` to the end of the retry
    list, for "a write the store is slow to take only for itself (a locked row, ...)". On
    PostgreSQL that is not what a locked row looks like to the retry pass: the write is taken
    by the group commit and runs shielded, so the budget cancels nothing; the UPDATE waits on
    the lock until ``statement_timeout`` and the write fails ``StoreUnavailable``, the branch
    that ends the pass *without* moving the entry. The end on the locked row stays first, every
    pass ends on it, and the other kept ends are never tried (their clients wait for an end the
    store would take at once).

    Here: two kept ends, the first run's row locked by another session; three retry passes
    (each a write past its budget). Expected: the second run's end is stored."""
    import psycopg

    from service.runs import RunStatus
    from service.runs import committer as committer_mod
    from service.runs.committer import EventCommitter, FinalState
    from service.runs.handle import RunHandle
    from service.store.postgres import PostgresStore
    from service.store.records import MessageStatus

    monkeypatch.setattr(committer_mod, "WRITE_BUDGET", 0.5)  # (10 s; the lock waits 30 s)
    async with PostgresStore(pg_url, statement_timeout=1.5) as store:
        entries = []
        for n in range(2):
            conv = (await store.create_conversation()).id
            begun = await store.begin_run(conv, content=f"q{n}", agent="chat", model=None)
            handle = RunHandle(run_id=begun.run.id, conversation_id=conv, agent="chat",
                               model=None, owner=None, message_id=begun.reply.id,
                               sink=lambda e: None)
            handle.set_status(RunStatus.running)
            entries.append((handle, FinalState(
                run_id=begun.run.id, status=RunStatus.succeeded, message_id=begun.reply.id,
                content=f"answer {n}", message_status=MessageStatus.complete, error=None,
                usage={}, events=())))
        committer = EventCommitter(store, live=lambda run_id: None)
        committer._final_retries.extend(entries)  # both ends kept (the store refused them)
        (locked, _), (other, _) = entries

        lock = await trio.to_thread.run_sync(partial(psycopg.connect, pg_url))
        try:
            await trio.to_thread.run_sync(
                lock.execute, "SELECT 1 FROM runs WHERE id = %s FOR UPDATE", (locked.id,))
            with trio.fail_after(GUARD):
                for _ in range(3):
                    await committer.retry_final_writes()
            stored = (await store.get_run(other.id)).status
        finally:
            with trio.move_on_after(GUARD, shield=True):
                await trio.to_thread.run_sync(lock.close)
    assert stored == "succeeded", (
        f"after three retry passes the unlocked run's kept end is still {stored!r}: every pass "
        "ended on the locked one")
