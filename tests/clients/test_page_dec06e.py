"""The chat page: what the browser review of 2026-12-06 (e) suspected, each a test that failed
before its fix: text from the store shown without its bidi controls wherever it is shown, the
messages POST's network failure said in the page's words, and a phone's width.

The real app on port 0 with the real simulator behind it (tests/e2e.py); Debian's chromium
driven by Playwright in a worker thread (tests/clients/test_chat_page.py's helpers).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import trio

from service.settings import Settings
from service.sim.scenario import Reply as SimReply

from ..e2e import e2e
from .test_chat_page import CHROMIUM, ROOT, _in_browser, _send

playwright = pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")]

expect = playwright.expect
GUARD = 120
RLO = "\u202e"  # RIGHT-TO-LEFT OVERRIDE: shows "exe.txt" as "txt.exe"


def _bidi_session(url: str, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    page.get_by_test_id("conversation").first.click()
    user = page.get_by_test_id("user-message").first
    expect(user).to_contain_text("invoice")
    return {"user": user.inner_text()}


async def test_a_stored_user_message_is_shown_without_bidi_controls(settings: Settings) -> None:
    """A user message stored by another client (the API, the terminal) holding U+202E: the
    page showed it as is, so "invoice\u202etxt.exe" read as "invoiceexe.txt". Answers, steps,
    notes and titles were cleaned; user messages, the error banner and the model picker were
    not."""
    with trio.fail_after(GUARD):
        async with e2e(settings, "llamacpp") as env:
            env.sim.script("ok")
            conv = await env.conversation(title="t")
            r = await env.client.post(f"/api/conversations/{conv}/messages",
                                      json={"content": f"invoice{RLO}txt.exe"})
            assert r.status_code == 200, r.text
            seen = await _in_browser(partial(_bidi_session, env.server.url))
    assert RLO not in seen["user"], repr(seen["user"])
    assert "invoice\ufffdtxt.exe" in seen["user"], repr(seen["user"])


def _post_fails_session(url: str, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    expect(page.get_by_test_id("error-banner")).to_be_hidden()
    page.route("**/messages", lambda route: route.abort("connectionreset"))
    page.get_by_test_id("message-input").fill("hello")
    page.get_by_test_id("send").click()
    banner = page.get_by_test_id("error-banner")
    expect(banner).to_be_visible()
    return {"banner": banner.inner_text(),
            "typed": page.get_by_test_id("message-input").input_value()}


async def test_a_message_that_cannot_reach_the_service_says_so(settings: Settings) -> None:
    """The connection fails as the message is posted: the banner said the browser's "Failed
    to fetch", where every other request says "cannot reach the service"."""
    with trio.fail_after(GUARD):
        async with e2e(settings, "llamacpp") as env:
            seen = await _in_browser(partial(_post_fails_session, env.server.url))
    assert "cannot reach the service" in seen["banner"], seen
    assert seen["typed"] == "hello", seen  # kept, to send again


def _phone_session(url: str, page: Any) -> dict[str, Any]:
    page.set_viewport_size({"width": 375, "height": 700})
    page.goto(url + "/")
    box = page.locator("#messages").bounding_box()
    return {"width": box["width"] if box else 0}


async def test_the_chat_has_the_width_of_a_phones_screen(settings: Settings) -> None:
    """At 375 px (a phone) the conversation list took its 15rem column beside the chat,
    which was left about 135 px."""
    with trio.fail_after(GUARD):
        async with e2e(settings, "llamacpp") as env:
            seen = await _in_browser(partial(_phone_session, env.server.url))
    assert seen["width"] >= 300, seen


# -- Markdown the models write --------------------------------------------------------------------

_MARKDOWN = {
    # a rule, as models put between sections (shown as a line of dashes)
    "a\n\n---\n\nb": '<p dir="auto">a</p><hr><p dir="auto">b</p>',
    "* * *": "<hr>",
    # setext headings
    "Title\n===": '<h1 dir="auto">Title</h1>',
    "Sub\n---": '<h2 dir="auto">Sub</h2>',
    # backslash escapes (the backslash was shown, and "\\*" still opened emphasis)
    "\\*.txt and \\*.md": '<p dir="auto">*.txt and *.md</p>',
    "\\<b\\>": '<p dir="auto">&lt;b&gt;</p>',
    "`a\\*b`": '<p dir="auto"><code>a\\*b</code></p>',  # none in a code span
    "[x](https://e.com/\\_a)": ('<p dir="auto"><a href="https://e.com/_a" rel="noopener '
                                'noreferrer" target="_blank">x</a></p>'),
    # a line break in a table cell, GitHub's way
    "| a |\n|---|\n| x<br>y |": ('<div class="table"><table><thead><tr><th dir="auto">a</th>'
                                 '</tr></thead><tbody><tr><td dir="auto">x<br>y</td></tr>'
                                 '</tbody></table></div>'),
    # nothing else of HTML: an escaped tag, a break outside a table
    "\\<img src=x onerror=alert(1)\\> x<br>y": (
        '<p dir="auto">&lt;img src=x onerror=alert(1)&gt; x&lt;br&gt;y</p>'),
    # what inline() keeps aside is marked with NUL: none may come from the text
    "`\x000\x00`": '<p dir="auto"><code>\ufffd0\ufffd</code></p>',
}


def _rendered(page: Any) -> dict[str, str]:
    page.set_content("<div id=out></div>")
    source = (ROOT / "service" / "web" / "markdown.js").read_text()
    return dict(zip(_MARKDOWN, page.evaluate(
        "([src, texts]) => import('data:text/javascript,' + encodeURIComponent(src))"
        ".then((m) => texts.map((t) => m.renderMarkdown(t)))", [source, list(_MARKDOWN)]),
        strict=True))


async def test_rules_setext_headings_escapes_and_cell_breaks_are_rendered() -> None:
    """What models write often and the page showed as typed: ``---`` between sections (a line
    of dashes), setext headings, ``\\*`` (the backslash shown, the star still emphasis), a
    ``<br>`` in a table cell (shown as text)."""
    seen = await _in_browser(_rendered)
    assert seen == _MARKDOWN


# -- a reload right after Stop --------------------------------------------------------------------


def _stop_then_reload_session(url: str, hold: Any, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    answer = _send(page, "slow please")
    expect(answer).to_contain_text("tick tick")
    release = hold()  # the store takes no write for now: the run's end cannot land yet
    with page.expect_response("**/cancel"):
        page.get_by_test_id("stop").click()
    page.reload()  # before run.finished came
    answers = page.get_by_test_id("assistant-message")
    expect(answers.last).to_contain_text("tick")  # re-joined
    release()
    expect(page.get_by_test_id("stop")).to_be_hidden()
    return {"notes": answers.last.locator(".note").all_inner_texts()}


async def test_a_reload_right_after_stop_still_says_the_user_stopped_it(
    settings: Settings,
) -> None:
    """The user clicks Stop and reloads before the run's end comes (the store slow for a
    moment). The re-joined run ended ``cancelled by request``, and the page said "stopped
    elsewhere (another client cancelled it)": it had forgotten its own Stop in the reload."""
    with trio.fail_after(GUARD):
        async with e2e(settings, "llamacpp") as env, trio.open_nursery() as nursery:
            env.sim.script(SimReply(text="tick " * 200, interval=0.05))
            store = env.server.services.require_store()
            held, let_go = trio.Event(), trio.Event()

            async def holding() -> None:
                async with store.faults.writes_held():
                    held.set()
                    await let_go.wait()

            def hold() -> Any:
                trio.from_thread.run_sync(nursery.start_soon, holding)
                trio.from_thread.run(held.wait)
                return lambda: trio.from_thread.run_sync(let_go.set)

            try:
                seen = await _in_browser(partial(_stop_then_reload_session, env.server.url,
                                                 hold))
            finally:
                let_go.set()
    assert seen["notes"] == ["stopped"], seen
