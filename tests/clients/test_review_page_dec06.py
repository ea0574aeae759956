"""A review of the chat page (service/web/: chat.js, markdown.js, chat.css) on 2026-12-06: what a
user of the page sees. Each test fails on the tree it was written against because of the real
defect its docstring names.

The service is the real app on port 0 with the real simulator behind it (tests/e2e.py), except
where the simulator cannot say it (a reasoning model's thinking: the scripted backend streams it
as a model does, as tests/clients/test_review_terminal_dec05.py does); the browser is Debian's
``chromium`` driven by Playwright in a worker thread (tests/clients/test_chat_page.py's helpers).
"""

from __future__ import annotations

import json
import re
from contextlib import suppress
from functools import partial
from typing import Any

import pytest
import trio

from service.settings import Settings
from service.sim.scenario import Reply as SimReply

from ..e2e import e2e
from ..fakes import Reply, ScriptedBackend
from ..servers import running_server
from .test_chat_page import CHROMIUM, _in_browser, _send

playwright = pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")]

expect = playwright.expect
TEST_GUARD = 60  # seconds a whole test may take (a browser start included)


def _answer_of(text: str, url: str, page: Any) -> dict[str, Any]:
    """Ask once; the answer (``text`` from the model) once its run is over: its HTML, its text,
    and the numbers its ordered lists' items show."""
    page.goto(url + "/")
    answer = _send(page, "question")
    expect(page.get_by_test_id("stop")).to_be_hidden()
    body = answer.locator(".answer")
    numbers = body.evaluate("""(el) => [...el.querySelectorAll("ol")].flatMap((ol) => {
        let n = ol.start || 1;
        return [...ol.children].map((li) => {
          if (li.hasAttribute("value")) n = li.value;
          return n++;
        });
      })""")
    return {"html": body.inner_html(), "text": body.inner_text(), "numbers": numbers,
            "links": body.evaluate("(el) => [...el.querySelectorAll('a')].map((a) => a.href)"),
            "code": body.locator("pre code").all_inner_texts()}


async def _model_says(settings: Settings, text: str) -> dict[str, Any]:
    with trio.fail_after(TEST_GUARD):
        async with e2e(settings, "llamacpp") as env:
            env.sim.script(SimReply(text=text))
            return await _in_browser(partial(_answer_of, text, env.server.url))


# -- Markdown of model output (markdown.js) -------------------------------------------------------


async def test_markdown_a_numbered_list_split_by_code_blocks_keeps_its_numbers(
    settings: Settings,
) -> None:
    """Models write numbered instructions as a "loose" list: blank lines between the items, or
    a code block after each step. ``renderMarkdown`` closes the list at every blank line or
    fence (``flush``) and opens a new ``<ol>`` for the next item, without its number (no
    ``start``): the user reads "1. Install it ... 1. Run it ... 1. Check it" where the model
    wrote 1, 2, 3. In step-by-step instructions the numbers are what the user follows (and
    what the model refers to later: "as in step 3"). Expected: the items show 1, 2, 3."""
    text = ("Do this:\n\n1. Install it:\n\n```\npip install thing\n```\n\n"
            "2. Run it:\n\n```\nthing --go\n```\n\n3. Check the output.\n")
    seen = await _model_says(settings, text)
    assert seen["code"] == ["pip install thing", "thing --go"], seen
    assert seen["numbers"] == [1, 2, 3], (
        f"the model numbered its steps 1, 2, 3; the page shows {seen['numbers']}: {seen['html']}")


async def test_markdown_a_code_block_inside_a_list_item_is_code(settings: Settings) -> None:
    """A fenced code block inside a list item is indented to the item's text ("1. Install:\\n
    ```bash\\n   pip install x\\n   ```"), the usual shape of a model's numbered instructions.
    ``renderMarkdown`` only sees a fence at column 0 (``line.startsWith("```")``): the
    indented fence and its code become a paragraph, the backticks shown literally and the
    code's lines run through the inline rules (a ``*`` in a shell glob turns into italics,
    line breaks as <br>). Expected: the code is shown as a code block, no stray backticks."""
    text = ("1. Install it:\n   ```bash\n   pip install thing\n   rm -f build/*.o dist/*.whl\n"
            "   ```\n2. Run it.\n")
    seen = await _model_says(settings, text)
    assert "```" not in seen["text"], f"an indented fence is shown as text: {seen['html']}"
    assert any("pip install thing" in c for c in seen["code"]), seen["html"]


async def test_markdown_a_link_with_parentheses_in_its_url_is_whole(settings: Settings) -> None:
    """Wikipedia's URLs hold parentheses ("Python_(programming_language)"), and models link to
    them all the time. The link rule's URL stops at the first ")" (``[^\\s)]+``): the link
    points to "https://en.wikipedia.org/wiki/Python_(programming_language" (a page that does
    not exist) and a stray ")" follows its text. Expected: balanced parentheses stay in the URL,
    as CommonMark and every chat UI keep them."""
    url = "https://en.wikipedia.org/wiki/Python_(programming_language)"
    seen = await _model_says(settings, f"See [Python]({url}) for its history.")
    assert seen["links"] == [url], f"the link goes to {seen['links']}: {seen['html']}"
    assert seen["text"].strip() == "See Python for its history.", seen["text"]


async def test_markdown_multiplication_asterisks_are_not_italics(settings: Settings) -> None:
    """Arithmetic in an answer: "6 * 7 = 42, and 3 * 4 = 12". The italic rule
    (``\\*([^*\\n]+)\\*``) takes any two asterisks on a line, even with spaces inside them
    (CommonMark: a "*" followed by a space opens nothing): the page shows "6  7 = 42, and 3  4
    = 12" with the middle in italics, the multiplication signs gone: the user reads wrong
    maths. Expected: the text as written, no emphasis."""
    seen = await _model_says(settings, "So 6 * 7 = 42, and 3 * 4 = 12.")
    assert seen["text"].strip() == "So 6 * 7 = 42, and 3 * 4 = 12.", (
        f"the page shows {seen['text']!r}: {seen['html']}")


# -- steps -------------------------------------------------------------------------------------


def _steps_of(url: str, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    page.get_by_test_id("agent-picker").select_option("plan_execute")
    answer = _send(page, "convert 3 kg to km, then add 1 and 1")
    expect(page.get_by_test_id("stop")).to_be_hidden()
    return {"steps": answer.get_by_test_id("steps").locator("li").all_text_contents(),
            "answer": answer.locator(".answer").inner_text()}


async def test_steps_a_failed_plan_step_is_not_shown_as_done(settings: Settings) -> None:
    """A plan_execute step fails (its tool refuses: "cannot convert kg to km") and the agent
    re-plans around it. Its ``step.finished`` carries ``error`` instead of ``output``
    (docs/api.md), but chat.js's ``what()`` shows every ``step.finished`` as "step 1 done"
    (its ``default`` case never looks at ``error``): the user, reading the folded steps to
    know what the answer rests on, is told the failed step succeeded. (The terminal client
    says "step 1 failed: ...".) Expected: the step's line says it failed, with why."""
    plan = {"steps": [{"id": 1, "task": "convert 3 kg to km", "tool": "unit_convert",
                       "arguments": {"value": 3, "from_unit": "kg", "to_unit": "km"}}]}
    replan = {"steps": [{"id": 1, "task": "add 1 and 1", "tool": "calculator",
                         "arguments": {"expression": "1+1"}}]}
    with trio.fail_after(TEST_GUARD):
        async with e2e(settings, "llamacpp") as env:
            env.sim.script(json.dumps(plan), json.dumps(replan),
                           "kg cannot become km; 1 + 1 is 2.")
            seen = await _in_browser(partial(_steps_of, env.server.url))
    assert "1 + 1 is 2" in seen["answer"], seen
    # Its step.finished's line (step.started's is "step 1: <task>").
    first = [s for s in seen["steps"] if s.startswith("step 1 ")]
    assert first, seen["steps"]
    assert not [s for s in first if "done" in s or "fail" not in s], (
        f"step 1 failed (its tool: cannot convert kg to km); the page's steps say {first}")


def _thinking_of(url: str, page: Any) -> list[str]:
    page.goto(url + "/")
    answer = _send(page, "hi")
    expect(page.get_by_test_id("stop")).to_be_hidden()
    expect(answer.locator(".answer")).to_have_text("Hello! How can I help?")
    return answer.get_by_test_id("steps").locator("li").all_text_contents()


async def test_steps_a_reasoning_models_thinking_is_text_not_a_step_per_token(
    settings: Settings,
) -> None:
    """A reasoning model streams its thinking token by token; the service passes each piece on
    as a ``thought`` with ``reasoning: true``. ``AssistantView.step`` adds every one as a
    step line of its own: the folded steps read "thinking: The", "thinking: user",
    "thinking: greets", ... one line per token (hundreds for a real model's thinking, and
    ``STEPS_KEPT`` then drops the start of it from what a reload shows). The terminal client
    joins the pieces into one running text. Expected: the thinking reads as its text (at most
    a line or two), not a line per piece. (The simulator has no thinking: the scripted
    backend streams it as a model does, a chunk per word.)"""
    thought = ("The user greets me, so I should greet them back and offer some help "
               "with whatever they need today.")
    pieces = [w + " " for w in thought.split()]
    backend = ScriptedBackend(lambda req: Reply("Hello! How can I help?", thinking=pieces))
    with trio.fail_after(TEST_GUARD):
        async with running_server(settings, backend) as srv:
            steps = await _in_browser(partial(_thinking_of, srv.url))
    lines = [s for s in steps if "thinking" in s]
    assert len(lines) <= 2, (
        f"the model's thinking ({len(pieces)} pieces of one sentence) is shown as "
        f"{len(lines)} step lines: {lines[:5]}...")
    assert thought in " ".join(" ".join(lines).split()), lines


# -- a long answer streamed (chat.js: AssistantView.render per token) -----------------------------


def _scroll_session(url: str, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    answer = _send(page, "a long one please")
    expect(answer).to_contain_text("line 40 ")  # taller than the pane by now
    messages = page.get_by_test_id("messages")
    messages.hover()
    page.mouse.wheel(0, -100_000)  # the user scrolls up to read the start of the answer
    expect(answer).to_contain_text("line 70 ")  # more tokens came meanwhile
    top = messages.evaluate("(el) => el.scrollTop")
    page.get_by_test_id("stop").click()
    return {"top": top, "height": messages.evaluate("(el) => el.scrollHeight")}


async def test_stream_scrolling_up_during_an_answer_is_not_undone_per_token(
    settings: Settings,
) -> None:
    """A long answer streams; the user scrolls up to read its beginning (or an earlier
    message) while the rest comes. ``AssistantView.render`` calls
    ``this.el.scrollIntoView({block: "end"})`` on every token: the pane is yanked back to the
    bottom many times a second, and nothing above the newest line can be read until the run
    ends (or is stopped). Expected: the page follows the answer only while the user is at the
    bottom; scrolled up, it stays where the user put it."""
    text = "".join(f"line {i} of the answer.\n\n" for i in range(1, 200))
    with trio.fail_after(TEST_GUARD):
        async with e2e(settings, "llamacpp") as env:
            env.sim.script(SimReply(text=text, interval=0.01))
            seen = await _in_browser(partial(_scroll_session, env.server.url))
    assert seen["top"] < 50, (
        f"the user scrolled to the top; a few tokens later the pane is at {seen['top']}px "
        f"(of {seen['height']}px): pulled back to the end of the answer")


def _select_session(url: str, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    answer = _send(page, "tell me")
    first = answer.locator(".answer p").first
    expect(first).to_have_text("Remember this sentence: the key is under the mat.")
    expect(answer).to_contain_text("tick tick")
    # The user selects the first paragraph to copy it (a mouse triple-click where it is:
    # Playwright's own click would wait for the element to hold still, i.e. the run's end).
    box = page.evaluate("""() => {  // where it is now (the element may be a new one each token)
        const r = document.querySelector("[data-testid=assistant-message] .answer p")
          .getBoundingClientRect();
        return {x: r.x, y: r.y, height: r.height};
      }""")
    page.mouse.click(box["x"] + 20, box["y"] + box["height"] / 2, click_count=3)
    before = page.evaluate("() => String(getSelection())")
    count = answer.inner_text().count("tick")
    page.wait_for_function(
        "(n) => document.querySelector('[data-testid=assistant-message]').textContent"
        ".split('tick').length - 1 > n + 5", arg=count)  # more tokens came
    after = page.evaluate("() => String(getSelection())")
    page.get_by_test_id("stop").click()
    return {"before": before, "after": after}


async def test_stream_text_selected_during_an_answer_stays_selected(settings: Settings) -> None:
    """While an answer streams, the user selects its first paragraph (to copy it). Each token
    makes ``AssistantView.render`` rebuild the whole answer (``answer.innerHTML =
    renderMarkdown(everything so far)``): the selected nodes are thrown away with the next
    token and the selection is gone before the user can press Ctrl+C (a triple-click may not
    even take, its clicks landing on nodes replaced in between); the same rebuild makes
    each token cost the whole answer's re-parse and re-layout (quadratic over a long answer).
    Expected: the text already shown stays the same nodes (only the last block is redrawn),
    and a selection in it survives the tokens that follow."""
    text = "Remember this sentence: the key is under the mat.\n\n" + "tick " * 300
    with trio.fail_after(TEST_GUARD):
        async with e2e(settings, "llamacpp") as env:
            env.sim.script(SimReply(text=text, interval=0.02))
            seen = await _in_browser(partial(_select_session, env.server.url))
    # (Just after the triple-click the selection is there, or already gone: a token came
    # between its clicks.)
    assert "the key is under the mat" in seen["after"], (
        f"the user triple-clicked the first paragraph (selected right after: "
        f"{seen['before']!r}); a few tokens later the selection is {seen['after']!r}")


# -- keyboard --------------------------------------------------------------------------------


def _ime_session(url: str, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    expect(page.get_by_test_id("error-banner")).to_be_hidden()
    box = page.get_by_test_id("message-input")
    box.fill("東京の天気")
    # The user is still composing (Japanese IME): Enter commits the candidate. Chromium fires
    # that keydown with isComposing (and keyCode 229) before compositionend.
    sent = box.evaluate("""(el) => {
        el.dispatchEvent(new CompositionEvent("compositionstart", {data: ""}));
        const e = new KeyboardEvent("keydown", {key: "Enter", code: "Enter", keyCode: 229,
                                                 isComposing: true, bubbles: true,
                                                 cancelable: true});
        el.dispatchEvent(e);
        const busy = document.getElementById("send").disabled;
        el.dispatchEvent(new CompositionEvent("compositionend", {data: "天気"}));
        return {busy, prevented: e.defaultPrevented};
    }""")
    page.wait_for_timeout(300)
    return {**sent, "users": page.get_by_test_id("user-message").count(),
            "value": box.input_value()}


async def test_keyboard_enter_that_commits_an_ime_candidate_does_not_send(
    settings: Settings,
) -> None:
    """Typing Japanese, Chinese or Korean goes through an input method: Enter picks the
    candidate being composed. The page's keydown handler sends on any Enter without Shift
    (``e.key === "Enter" && !e.shiftKey``) and never looks at ``e.isComposing``: the half-typed
    message goes off (and the composition is broken) the moment the user confirms a word.
    Expected: an Enter during composition only commits the text; nothing is sent."""
    with trio.fail_after(TEST_GUARD):
        async with e2e(settings, "llamacpp") as env:
            seen = await _in_browser(partial(_ime_session, env.server.url))
    assert (seen["busy"], seen["users"]) == (False, 0), (
        f"an Enter that committed an IME candidate sent the message: {seen}")


# -- the conversation list ----------------------------------------------------------------------


def _deleted_session(url: str, delete: Any, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    first = _send(page, "hello")
    expect(first).to_contain_text("first answer")
    delete()  # another tab (or the terminal client) deletes this conversation
    box = page.get_by_test_id("message-input")
    box.fill("are you there?")
    page.get_by_test_id("send").click()
    banner = page.get_by_test_id("error-banner")
    expect(banner).to_be_visible()
    told = banner.inner_text()
    # The user tries again (what else?).
    page.get_by_test_id("send").click()
    with suppress(AssertionError):
        expect(page.get_by_test_id("assistant-message").last).to_contain_text(
            "second answer", timeout=3000)
    return {"told": told, "banner": banner.inner_text() if banner.is_visible() else "",
            "answers": page.get_by_test_id("assistant-message").all_inner_texts(),
            "list": page.get_by_test_id("conversation").all_inner_texts()}


async def test_list_a_conversation_deleted_elsewhere_does_not_trap_the_page(
    settings: Settings,
) -> None:
    """The conversation on screen is deleted in another tab. The user's next message is
    refused 404 (shown in the banner), and the page stays on the deleted conversation:
    ``state.conversation`` still names it and the sidebar still lists it, so every later
    message is refused the same way, for ever, until the user guesses that "New conversation"
    is the way out. Expected: after the 404 the page lets go of the conversation (drops it
    from the list, not "on" it any more) so that sending again works."""
    with trio.fail_after(TEST_GUARD):
        async with e2e(settings, "llamacpp") as env:
            env.sim.script("first answer", "second answer", "third answer")

            async def gone() -> None:
                (conv,) = (await env.client.get("/api/conversations")).json()["data"]
                r = await env.client.delete(f"/api/conversations/{conv['id']}")
                assert r.status_code == 204, r.text

            def delete() -> None:
                trio.from_thread.run(gone)

            seen = await _in_browser(partial(_deleted_session, env.server.url, delete))
    assert seen["told"], seen
    assert "hello" not in seen["list"], (
        f"the deleted conversation is still listed: {seen}")
    assert not seen["banner"], f"sending again after the 404 is refused again: {seen}"
    # (The page shows the new conversation it started: the deleted one's messages are gone.)
    assert any("second answer" in a for a in seen["answers"]), seen


def _oldest_session(url: str, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    items = page.get_by_test_id("conversation")
    expect(items.first).to_have_text("talk 104")
    # The user scrolls the list down to the end (a page that loads more on scroll does so).
    for _ in range(3):
        items.last.scroll_into_view_if_needed()
        page.wait_for_timeout(200)
    more = page.get_by_role("button", name=re.compile(r"more|older", re.I))
    if more.count():
        more.first.click()
        page.wait_for_timeout(500)
    return {"count": items.count(), "last": items.last.inner_text()}


async def test_list_conversations_past_the_hundredth_can_be_reached(settings: Settings) -> None:
    """A user with more than 100 conversations: ``loadConversations`` asks for
    ``?limit=100`` once and never follows ``next``. The oldest conversations are not listed,
    and there is no "more" to click or scroll to: the page has no way at all to reopen them
    (their ids are not shown anywhere), though the service still holds them. Expected: the
    list reaches them (a "more" button, loading on scroll, or the whole list)."""
    with trio.fail_after(TEST_GUARD):
        async with e2e(settings, "llamacpp") as env:
            for i in range(105):
                await env.conversation(title=f"talk {i}")
            seen = await _in_browser(partial(_oldest_session, env.server.url))
    assert seen["last"] == "talk 0", (
        f"105 conversations; the page lists {seen['count']}, the last being {seen['last']!r}")


def _reorder_session(url: str, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    items = page.get_by_test_id("conversation")
    expect(items).to_have_count(2)
    before = items.all_inner_texts()
    page.get_by_test_id("conversation").filter(has_text="trip to Lisbon").click()
    expect(page.get_by_test_id("user-message")).to_have_count(0)
    answer = _send(page, "and what about the weather?")
    expect(answer).to_contain_text("sunny")
    expect(page.get_by_test_id("stop")).to_be_hidden()
    page.wait_for_timeout(300)
    after_run = items.all_inner_texts()
    page.reload()
    expect(items).to_have_count(2)
    return {"before": before, "after_run": after_run, "after_reload": items.all_inner_texts()}


async def test_list_the_conversation_just_continued_comes_first(settings: Settings) -> None:
    """The list is "newest first", but by when a conversation was created: the user goes back
    to an older conversation and continues it, and it stays below every conversation made
    since (after a reload too), though its ``updated_at`` is now the newest. With the page's
    100-conversation list (see above) a conversation continued today can even be one the
    list does not show. Every chat UI lists the conversation last used first. Expected: once
    the reply is in, the continued conversation is at the top of the list."""
    with trio.fail_after(TEST_GUARD):
        async with e2e(settings, "llamacpp") as env:
            await env.conversation(title="trip to Lisbon")
            await env.conversation(title="tax questions")
            env.sim.script("It will be sunny.")
            seen = await _in_browser(partial(_reorder_session, env.server.url))
    assert seen["before"] == ["tax questions", "trip to Lisbon"], seen
    assert seen["after_run"][0] == "trip to Lisbon", (
        f"the user just continued 'trip to Lisbon'; the list is {seen['after_run']}")
    assert seen["after_reload"][0] == "trip to Lisbon", (
        f"after a reload the list is {seen['after_reload']}")


# -- layout of model output --------------------------------------------------------------------


def _rtl_session(url: str, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    answer = _send(page, "שלום, מה שלומך?")
    expect(page.get_by_test_id("stop")).to_be_hidden()
    para = answer.locator(".answer p").first
    user = page.get_by_test_id("user-message").first
    return {"answer": para.evaluate("(el) => getComputedStyle(el).direction"),
            "answer_dir": para.evaluate("(el) => el.matches(':dir(rtl)')"),
            "user": user.evaluate("(el) => getComputedStyle(el).direction"),
            "user_dir": user.evaluate("(el) => el.matches(':dir(rtl)')")}


async def test_layout_a_right_to_left_answer_is_laid_out_right_to_left(
    settings: Settings,
) -> None:
    """A user writes in Hebrew (or Arabic, Persian, Urdu) and the model answers in it. No
    element of a message has ``dir="auto"`` (nor a ``dir`` at all): the page is
    ``<html lang="en">``, so each message is laid out left to right: the text is aligned left,
    and the neutral characters at a direction change (the final "?" or ".", a number, a
    parenthesis) land at the wrong end of the line: the sentence reads garbled to its
    reader. Expected: a message whose text is right-to-left is shown right-to-left
    (``dir="auto"`` on each message)."""
    with trio.fail_after(TEST_GUARD):
        async with e2e(settings, "llamacpp") as env:
            env.sim.script("שלום! אני בסדר, תודה. איך אפשר לעזור לך היום?")
            seen = await _in_browser(partial(_rtl_session, env.server.url))
    assert seen["answer"] == "rtl" or seen["answer_dir"], f"the Hebrew answer is laid out {seen}"
    assert seen["user"] == "rtl" or seen["user_dir"], f"the Hebrew question is laid out {seen}"


def _overflow_session(url: str, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    answer = _send(page, "give me the token")
    expect(page.get_by_test_id("stop")).to_be_hidden()
    return answer.evaluate("""(el) => ({
        bubble: el.clientWidth, content: el.scrollWidth,
        pane: document.getElementById("messages").clientWidth,
        paneContent: document.getElementById("messages").scrollWidth})""")


async def test_layout_a_long_unbroken_word_stays_inside_the_answer(settings: Settings) -> None:
    """Models answer with long unbroken strings: a URL with a long query, a hash, a base64
    token, a path. The answer's text has no ``overflow-wrap`` (chat.css): such a line runs out
    of the message bubble and widens the whole message pane, which grows a horizontal
    scrollbar; the end of the string (and of every line next to it) is off screen. Expected:
    the line wraps inside the bubble, as the user's own long lines must too."""
    token = "eyJhbGciOiJIUzI1NiJ9" + "Q" * 400
    with trio.fail_after(TEST_GUARD):
        async with e2e(settings, "llamacpp") as env:
            env.sim.script(f"Your token is {token} and it expires tomorrow.")
            seen = await _in_browser(partial(_overflow_session, env.server.url))
    assert seen["content"] <= seen["bubble"] + 1, (
        f"the answer's content is {seen['content']}px wide in a {seen['bubble']}px bubble; "
        f"the pane scrolls sideways ({seen['paneContent']}px in {seen['pane']}px)")
    assert seen["paneContent"] <= seen["pane"] + 1, seen


# -- run events the page does not show ----------------------------------------------------------


WAITING = re.compile(r"queue|wait", re.I)


def _queued_session(url: str, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    answer = _send(page, "my question")
    with suppress(AssertionError):
        expect(answer).to_contain_text(WAITING, timeout=2500)
    shown = answer.text_content()
    expect(page.get_by_test_id("stop")).to_be_hidden(timeout=20_000)  # the slot's holder: 6 s
    return {"while_queued": shown, "final": answer.locator(".answer").inner_text()}


async def test_events_a_run_waiting_for_a_backend_slot_says_so(settings: Settings) -> None:
    """The backend's slots are all taken (``SERVICE_BACKEND_CONCURRENCY``, a fleet server's
    ``max_concurrency``): the run's LLM call waits in the queue, and the service says so with
    ``queued`` events (``{"position"}``, docs/api.md: "a burst is visible, not silence").
    chat.js's ``follow`` has no case for ``queued`` (nor ``decision``): the user sees an empty
    answer, Stop, and nothing else for as long as the wait lasts, the same as a hung service.
    Expected: while queued, the answer says it waits (and its place)."""
    with trio.fail_after(TEST_GUARD):
        async with e2e(settings, "llamacpp", backend_concurrency=1) as env, \
                trio.open_nursery() as nursery:
            env.sim.script(SimReply(text="busy " * 120, interval=0.05),  # 6 s: the slot's holder
                           "Here is your answer.")
            conv = await env.conversation(title="someone else")

            async def other() -> None:
                r = await env.client.post(f"/api/conversations/{conv}/messages",
                                          json={"content": "hold the slot"})
                assert r.status_code == 200, r.text

            nursery.start_soon(other)
            await env.sim.wait_streams(1)
            seen = await _in_browser(partial(_queued_session, env.server.url))
            mine = [c for c in (await env.client.get("/api/conversations")).json()["data"]
                    if c["id"] != conv]
            (reply,) = [m for m in (await env.client.get(
                f"/api/conversations/{mine[0]['id']}")).json()["messages"]
                if m["role"] == "assistant"]
            kinds = [e.type for e in await env.run_events(reply["run_id"])]
    assert "queued" in kinds, kinds  # the service did say it
    assert seen["final"] == "Here is your answer.", seen
    assert WAITING.search(seen["while_queued"]), (
        f"the run waited for a backend slot for seconds (queued events); the page showed "
        f"{seen['while_queued']!r} meanwhile")


def _cancelled_elsewhere_session(url: str, cancel: Any, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    answer = _send(page, "a long story please")
    expect(answer).to_contain_text("tick tick tick")
    cancel()  # not this page: the terminal client, a script, another person with the key
    expect(page.get_by_test_id("stop")).to_be_hidden()
    return {"notes": answer.locator(".note").all_inner_texts(),
            "quiet": answer.locator(".note.quiet").count()}


async def test_events_a_run_stopped_by_another_client_is_not_shown_as_the_users_stop(
    settings: Settings,
) -> None:
    """The page's run is cancelled by someone else (``POST /api/runs/{id}/cancel`` from the
    terminal client, a script, a colleague with the key). Its ``run.finished`` says
    ``cancelled`` with reason "cancelled by request", and ``stopped()`` shows any such
    reason as the user's own Stop: a quiet grey "stopped", though the user pressed nothing
    (chat.js's own comment: "anything else (the service shutting down, another client) says
    so, since asking again is then worth it"). The page knows whether it sent a cancel.
    Expected: a run this page did not stop says it was stopped elsewhere, not a bare
    "stopped"."""
    with trio.fail_after(TEST_GUARD):
        async with e2e(settings, "llamacpp") as env:
            env.sim.script(SimReply(text="tick " * 200, interval=0.05))

            async def elsewhere() -> None:
                (conv,) = (await env.client.get("/api/conversations")).json()["data"]
                (reply,) = [m for m in (await env.client.get(
                    f"/api/conversations/{conv['id']}")).json()["messages"]
                    if m["role"] == "assistant"]
                r = await env.client.post(f"/api/runs/{reply['run_id']}/cancel")
                assert r.status_code == 202, r.text

            def cancel() -> None:
                trio.from_thread.run(elsewhere)

            seen = await _in_browser(partial(_cancelled_elsewhere_session, env.server.url,
                                             cancel))
    assert seen["notes"], seen
    assert (seen["notes"] != ["stopped"], seen["quiet"]) == (True, 0), (
        f"the user never pressed Stop; the page says {seen['notes']} (quiet: {seen['quiet']}), "
        f"as after the user's own Stop")


def _title_session(url: str, question: str, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    expect(page.get_by_test_id("error-banner")).to_be_hidden()
    page.get_by_test_id("message-input").fill(question)
    page.get_by_test_id("send").click()
    answer, banner = page.get_by_test_id("assistant-message"), page.get_by_test_id("error-banner")
    # The answer, or the banner shown (it is in the page, hidden, before either).
    page.wait_for_function("() => document.querySelector('[data-testid=assistant-message]')"
                           " || !document.getElementById('problem').hidden")
    if answer.count():
        expect(answer).to_contain_text("noted")
    return {"titles": page.get_by_test_id("conversation").all_inner_texts(),
            "banner": banner.inner_text() if banner.is_visible() else "",
            "answers": answer.all_inner_texts()}


async def test_list_a_first_message_with_an_emoji_at_the_60th_character_is_sent(
    settings: Settings,
) -> None:
    """A new conversation is titled with the first 60 characters of its first message:
    ``send()`` takes ``content.slice(0, 60)``, which counts UTF-16 code units, so an emoji
    (two units) across the 60th unit is cut in half. The lone surrogate goes out in the title
    and the service refuses it (422): the user's message is not sent at all, and the banner
    says "title: Value error, not text: a NUL character or a lone surrogate", about a title
    the user never typed. The same message in an existing conversation goes through; the
    terminal client cuts by characters. Expected: the message is sent and answered, its
    conversation titled with whole characters."""
    prefix = "Please plan a relaxed weekend in Lisbon with good food"
    question = prefix + " " * (59 - len(prefix)) + "\U0001f389 and a party!"
    assert question[59] == "\U0001f389"  # UTF-16 units 59 and 60: the 60th is its first half
    with trio.fail_after(TEST_GUARD):
        async with e2e(settings, "llamacpp") as env:
            env.sim.script("noted")
            seen = await _in_browser(partial(_title_session, env.server.url, question))
            convs = (await env.client.get("/api/conversations")).json()["data"]
    assert not seen["banner"], (
        f"the first message was refused: the banner says {seen['banner']!r}")
    assert seen["answers"], seen
    (conv,) = convs
    assert "\ufffd" not in conv["title"], conv


# -- accessibility basics ----------------------------------------------------------------------


def _current_session(url: str, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    items = page.get_by_test_id("conversation")
    expect(items).to_have_count(2)
    items.filter(has_text="second").click()
    expect(items.filter(has_text="second")).to_have_class("current")
    return {"aria": page.evaluate("""() => [...document.querySelectorAll(
        "[data-testid=conversation]")].map((b) => [b.textContent,
        b.getAttribute("aria-current") || b.getAttribute("aria-pressed")
        || b.getAttribute("aria-selected")])""")}


async def test_a11y_the_open_conversation_is_marked_for_assistive_technology(
    settings: Settings,
) -> None:
    """The sidebar shows which conversation is open by a CSS class only (``current``: a grey
    background). A screen reader announces every entry the same ("second, button"): its user
    cannot tell which conversation the messages on screen belong to. Expected: the open
    conversation's entry carries ``aria-current`` (or a selected/pressed state)."""
    with trio.fail_after(TEST_GUARD):
        async with e2e(settings, "llamacpp") as env:
            await env.conversation(title="first")
            await env.conversation(title="second")
            seen = await _in_browser(partial(_current_session, env.server.url))
    marked = [name for name, state in seen["aria"] if state not in (None, "false")]
    assert marked == ["second"], f"the open conversation is 'second'; ARIA says {seen['aria']}"


def _stop_focus_session(url: str, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    answer = _send(page, "a long story please")
    expect(answer).to_contain_text("tick tick")
    stop = page.get_by_test_id("stop")
    stop.focus()  # a keyboard user: Tab to Stop, then Enter
    page.keyboard.press("Enter")
    expect(answer.get_by_test_id("run-note")).to_have_text("stopped")
    expect(stop).to_be_hidden()
    focused = page.evaluate("() => document.activeElement?.dataset?.testid "
                            "|| document.activeElement?.tagName")
    page.keyboard.type("next question")
    return {"focused": focused,
            "typed": page.get_by_test_id("message-input").input_value()}


async def test_a11y_stop_by_keyboard_leaves_the_focus_somewhere(settings: Settings) -> None:
    """A keyboard user stops an answer: Tab to Stop, Enter. The run ends and ``running(null)``
    hides the Stop button that holds the focus: the focus falls to ``<body>``, and what the
    user types next goes nowhere; they must Tab through the sidebar's every conversation to
    get back to the message box. (A screen reader user is left "nowhere" as well.) Expected:
    the focus goes back to the message box (or at least to something on the page)."""
    with trio.fail_after(TEST_GUARD):
        async with e2e(settings, "llamacpp") as env:
            env.sim.script(SimReply(text="tick " * 200, interval=0.05))
            seen = await _in_browser(partial(_stop_focus_session, env.server.url))
    assert seen["focused"] not in ("BODY", None), (
        f"after Stop the focus is on {seen['focused']!r}; typing reached the message box: "
        f"{seen['typed']!r}")
    assert seen["typed"] == "next question", seen


async def test_markdown_bidi_override_characters_cannot_reorder_the_answer(
    settings: Settings,
) -> None:
    """Model output can carry Unicode bidi overrides (U+202E RIGHT-TO-LEFT OVERRIDE and its
    kin), often copied from a tool's or a web page's text (a prompt injection). The page puts
    them into the answer as they are: "invoice\\u202efdp.exe" is shown as "invoiceexe.pdf",
    a command or an account number reads other than it is (the "Trojan Source" trick). The
    terminal client replaces these characters (chat_render's ``_CONTROL``); ``renderMarkdown``
    only escapes HTML. Expected: the overrides (and embeddings) do not reach the screen as
    such (dropped, replaced, or shown visibly)."""
    seen = await _model_says(settings, "Open the attachment invoice\u202efdp.exe to pay.")
    assert not any(c in seen["text"] for c in "\u202a\u202b\u202c\u202d\u202e"), (
        f"the answer holds bidi overrides: {seen['text']!r} (shown as "
        f"'Open the attachment invoiceexe.pdf to pay.')")
