"""A review of the chat page (service/web/: index.html, chat.js, markdown.js, chat.css) on
2026-12-06 (e): what a demanding user of the page hits in a real browser. Each test fails on the
tree it was written against because of the real defect its docstring names.

The service is the real app on port 0 with the real simulator behind it (tests/e2e.py); the
browser is Debian's ``chromium`` driven by Playwright in a worker thread
(tests/clients/test_chat_page.py's helpers).
"""

from __future__ import annotations

import json
import socket
import time
from contextlib import suppress
from functools import partial
from typing import Any

import pytest
import trio

from service.errors import StoreUnavailable
from service.settings import Settings
from service.sim.scenario import Reply as SimReply

from ..clients.test_chat_page import CHROMIUM, _in_browser, _send
from ..clients.test_page_follow_regressions import _pending_elsewhere
from ..e2e import e2e
from ..fakes import ScriptedBackend
from ..servers import running_server

playwright = pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")]

expect = playwright.expect
TEST_GUARD = 120  # seconds a whole test may take (a browser start included)


def _focused(page: Any) -> str:
    return str(page.evaluate(
        "() => document.activeElement?.dataset?.testid || document.activeElement?.tagName"))


# -- keyboard ----------------------------------------------------------------------------------


def _send_button_session(url: str, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    expect(page.get_by_test_id("error-banner")).to_be_hidden()
    page.get_by_test_id("message-input").focus()
    page.keyboard.type("hello there")
    page.keyboard.press("Tab")  # a keyboard user: Tab to Send, then Enter
    on_send = _focused(page)
    page.keyboard.press("Enter")
    answer = page.get_by_test_id("assistant-message").first
    expect(answer).to_contain_text("tick tick")
    during = _focused(page)
    expect(page.get_by_test_id("stop")).to_be_hidden()
    after = _focused(page)
    page.keyboard.type("next question")
    return {"on_send": on_send, "during": during, "after": after,
            "typed": page.get_by_test_id("message-input").input_value()}


async def test_keyboard_sending_with_the_send_button_leaves_the_focus_somewhere(
    settings: Settings,
) -> None:
    """A keyboard user types a message, Tabs to Send and presses Enter. ``running("starting")``
    disables the Send button that holds the focus: Chromium drops the focus to ``<body>``. While
    the answer streams the user cannot reach Stop without Tabbing through the whole sidebar,
    and when the run ends (``running(null)`` only moves the focus back when Stop held it) what
    they type next goes nowhere. (The same fault as Stop's, fixed in ``running``, on the other
    button.) Expected: the focus stays on the page's controls (Stop, or the message box), and
    after the run typing reaches the message box."""
    with trio.fail_after(TEST_GUARD):
        async with e2e(settings, "llamacpp") as env:
            env.sim.script(SimReply(text="tick " * 40, interval=0.05))
            seen = await _in_browser(partial(_send_button_session, env.server.url))
    assert seen["on_send"] == "send", seen  # the keyboard did reach Send
    assert (seen["during"] not in ("BODY", None), seen["typed"]) == (True, "next question"), (
        f"after Send by keyboard the focus went to {seen['during']!r} while the answer "
        f"streamed and {seen['after']!r} after it; the next question typed reached the "
        f"message box as {seen['typed']!r}")


# -- the conversation list -----------------------------------------------------------------------


def _failed_open_session(url: str, delete_other: Any, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    items = page.get_by_test_id("conversation")
    expect(items).to_have_count(2)
    items.filter(has_text="busy").click()
    answer = page.get_by_test_id("assistant-message").last
    expect(answer).to_contain_text("tick tick")  # the reply going elsewhere, followed
    delete_other()  # another tab deletes "old notes"
    items.filter(has_text="old notes").click()
    banner = page.get_by_test_id("error-banner")
    expect(banner).to_be_visible()
    # Still on "busy": its reply should go on to its end.
    with suppress(AssertionError):
        expect(answer).to_contain_text("THE END", timeout=15_000)
    return {"banner": banner.inner_text(), "answer": answer.inner_text(),
            "users": page.get_by_test_id("user-message").all_inner_texts()}


async def test_list_a_conversation_that_fails_to_open_does_not_freeze_the_one_on_screen(
    settings: Settings,
) -> None:
    """The page shows a conversation whose reply another client's run is still writing (the
    page follows it: ``watch``). The user clicks another conversation that cannot be opened
    (deleted in another tab: 404; the store away for a moment: 503). ``openConversation``
    aborts the follows of the conversation on screen (``viewing.abort()``) before it asks for
    the new one; the request fails, the banner says so, and the page stays on the first
    conversation, whose reply is now frozen half-written for good: no more tokens, no end, no
    note, though the run goes on and ends. Expected: a conversation that could not be opened
    leaves the one on screen as it was, its reply still followed to its end."""
    with trio.fail_after(TEST_GUARD):
        async with e2e(settings, "llamacpp") as env, trio.open_nursery() as nursery:
            env.sim.script(SimReply(text="tick " * 80 + "THE END.", interval=0.05))  # 4 s
            other = await env.conversation(title="old notes")
            busy = await env.conversation(title="busy")
            run_id = await _pending_elsewhere(env, nursery, busy)

            async def gone() -> None:
                r = await env.client.delete(f"/api/conversations/{other}")
                assert r.status_code == 204, r.text

            def delete_other() -> None:
                trio.from_thread.run(gone)

            seen = await _in_browser(partial(_failed_open_session, env.server.url,
                                             delete_other))
            run = (await env.client.get(f"/api/runs/{run_id}")).json()
    assert run["status"] == "succeeded", run  # the run did end, whole
    assert seen["users"] == ["slow please"], seen  # still on "busy"
    assert "THE END" in seen["answer"], (
        f"after a failed click elsewhere (banner: {seen['banner']!r}) the reply on screen "
        f"stopped at {seen['answer'].count('tick')} of 80 ticks, its end never shown")


def _deleted_click_session(url: str, delete: Any, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    items = page.get_by_test_id("conversation")
    expect(items).to_have_count(2)
    delete()  # another tab (or the terminal client) deletes "old notes"
    items.filter(has_text="old notes").click()
    banner = page.get_by_test_id("error-banner")
    expect(banner).to_be_visible()
    told = banner.inner_text()
    with suppress(AssertionError):  # a fixed page drops it: bounded either way
        expect(items).to_have_count(1, timeout=3000)
    return {"told": told, "list": items.all_inner_texts()}


async def test_list_a_conversation_found_deleted_when_clicked_leaves_the_list(
    settings: Settings,
) -> None:
    """A conversation is deleted in another tab (or by the terminal client); the user clicks
    it in the sidebar. ``openConversation``'s GET is refused 404 and the banner says "not
    found", but the entry stays in the list: every click on it fails the same way, until a
    reload. (``send`` lets go of a conversation found deleted: ``forget``; opening one does
    not.) Expected: once the page is told the conversation is gone, it is no longer listed."""
    with trio.fail_after(TEST_GUARD):
        async with e2e(settings, "llamacpp") as env:
            other = await env.conversation(title="old notes")
            await env.conversation(title="keep me")

            async def gone() -> None:
                r = await env.client.delete(f"/api/conversations/{other}")
                assert r.status_code == 204, r.text

            def delete() -> None:
                trio.from_thread.run(gone)

            seen = await _in_browser(partial(_deleted_click_session, env.server.url, delete))
    assert seen["told"], seen
    assert seen["list"] == ["keep me"], (
        f"'old notes' was found deleted (banner: {seen['told']!r}); the list still holds "
        f"{seen['list']}")


# -- a very long answer -------------------------------------------------------------------------


def _long_answer_session(url: str, ended: Any, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    answer = _send(page, "write the whole report")
    expect(answer).to_contain_text("Paragraph 1:")
    run_id = json.loads(page.evaluate("() => sessionStorage.getItem('service.live')"))["run_id"]
    ended(run_id)  # until the service has stored its end and published it
    server_done = time.monotonic()
    # The page's end: Stop hidden (its run.finished handled), bounded by the test's guard.
    expect(page.get_by_test_id("stop")).to_be_hidden(timeout=110_000)
    page_done = time.monotonic()
    return {"lag": page_done - server_done, "chars": len(answer.inner_text())}


async def test_stream_a_very_long_answer_is_shown_soon_after_the_model_ends(
    settings: Settings,
) -> None:
    """A long answer (a report: 800 paragraphs, ~94,000 characters, ~17,600 tokens). Per
    token, chat.js re-parses the whole answer so far (``renderMarkdown(this.segment)`` in
    ``AssistantView.render``), re-compares every block already shown (``isEqualNode``), forces
    a layout (``keepInView``), and writes the whole text again to sessionStorage
    (``follow``: ``sessionStorage.setItem(LIVE, JSON.stringify(live))``): each token costs
    the length of the answer so far, the whole answer quadratic. The page falls further
    behind the stream the longer the answer gets: the service has sent (and stored) the whole
    answer in a few seconds, and the page is still crawling through its tokens tens of
    seconds later, the tab's main thread pegged meanwhile (Stop and the rest of the page
    sluggish). Expected: the page's work per token does not grow with the answer (render at
    most once per frame, write the re-join state at most every so often), so that the whole
    answer is on screen within a few seconds of the model's end."""
    text = "".join(f"Paragraph {i}: " + "word " * 20 + "\n\n" for i in range(800))
    with trio.fail_after(TEST_GUARD + 60):
        async with e2e(settings, "llamacpp") as env:
            env.sim.script(SimReply(text=text))
            supervisor = env.server.services.require_supervisor()

            async def until_ended(run_id: str) -> None:
                handle = supervisor.get(run_id)
                if handle is not None:  # (gone: ended already)
                    await handle.finished.wait()

            def ended(run_id: str) -> None:
                trio.from_thread.run(until_ended, run_id)

            seen = await _in_browser(partial(_long_answer_session, env.server.url, ended))
    assert seen["chars"] > 90_000, seen
    # (Bounded loosely: the page took 35 s before its fix on this machine, about 1 s after.)
    assert seen["lag"] < 20, (
        f"the service had the whole answer ({len(text)} characters) stored; the page showed "
        f"its end {seen['lag']:.1f} s later")


# -- re-joining after a reload -------------------------------------------------------------------


def _reload_list_refused_session(url: str, arm: Any, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    answer = _send(page, "slow please")
    expect(answer).to_contain_text("tick tick tick")
    arm()  # the store refuses the next conversation list (a moment's lapse: 503)
    page.reload()
    banner = page.get_by_test_id("error-banner")
    expect(banner).to_be_visible()
    told = banner.inner_text()
    answers = page.get_by_test_id("assistant-message")
    with suppress(AssertionError):  # a fixed page re-joins the run: bounded either way
        expect(answers.last).to_contain_text("THE END", timeout=15_000)
    return {"told": told, "answers": answers.all_inner_texts(),
            "users": page.get_by_test_id("user-message").all_inner_texts()}


async def test_rejoin_after_a_reload_is_not_skipped_when_the_list_is_refused(
    settings: Settings,
) -> None:
    """The user reloads while an answer streams (the run goes on: ``on_disconnect:
    continue``); at that moment the store refuses one read (503 ``store_unavailable``, with
    Retry-After: a lapse the API says to retry). ``start()`` runs the sidebar's list, the
    model list and the re-join in one ``try``: the list's 503 skips the re-join altogether.
    The page shows the banner and an empty pane: no answer, no Stop (the user cannot stop a
    run that goes on), and nothing ever tries again, though the re-join alone would have
    worked (the page retries a re-join's own 503, ``followEvents``) and the run ends, stored
    whole, a second later. Expected: a refused conversation list does not cost the re-join:
    the running answer is shown and followed to its end."""
    with trio.fail_after(TEST_GUARD):
        async with e2e(settings, "llamacpp") as env:
            env.sim.script(SimReply(text="tick " * 60 + "THE END.", interval=0.05))  # 3 s
            store = env.server.services.require_store()
            listing = store.list_conversations
            armed = trio.Event()
            refused: list[int] = []

            async def once_unavailable(**kwargs: Any) -> Any:
                if armed.is_set() and not refused:
                    refused.append(1)
                    raise StoreUnavailable("the store is slow; retry")
                return await listing(**kwargs)

            store.list_conversations = once_unavailable  # type: ignore[method-assign]

            def arm() -> None:
                trio.from_thread.run_sync(armed.set)

            seen = await _in_browser(partial(_reload_list_refused_session, env.server.url, arm))
            store.list_conversations = listing  # type: ignore[method-assign]
            (conv,) = (await env.client.get("/api/conversations")).json()["data"]
            messages = (await env.client.get(f"/api/conversations/{conv['id']}")).json()
    assert refused, "the list was not refused"
    (reply,) = [m for m in messages["messages"] if m["role"] == "assistant"]
    assert reply["status"] == "complete", reply
    assert "THE END" in reply["content"], reply
    assert any("THE END" in a for a in seen["answers"]), (
        f"after the reload the list was refused once (banner: {seen['told']!r}); the run went "
        f"on and ended, but the page shows answers {seen['answers']} and user messages "
        f"{seen['users']}: the re-join was never tried")


# -- keyboard: the conversation list ------------------------------------------------------------


def _list_keyboard_session(url: str, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    items = page.get_by_test_id("conversation")
    expect(items).to_have_count(3)
    items.filter(has_text="second").focus()  # a keyboard user: Tab to it, then Enter
    before = page.evaluate("() => document.activeElement.textContent")
    page.keyboard.press("Enter")
    expect(items.filter(has_text="second")).to_have_attribute("aria-current", "true")
    return {"before": before, "after": page.evaluate(
        "() => document.activeElement?.dataset?.testid === 'conversation'"
        " ? document.activeElement.textContent : document.activeElement?.tagName")}


async def test_keyboard_opening_a_conversation_keeps_the_focus_on_it(settings: Settings) -> None:
    """A keyboard (or screen reader) user Tabs to a conversation in the sidebar and presses
    Enter. ``openConversation`` redraws the list (``showConversations``:
    ``list.replaceChildren()``, new buttons for all): the button that held the focus is thrown
    away and the focus falls to ``<body>``; a screen reader says "document" and the user has
    lost their place (the same happens on "Older conversations"). Expected: the focus stays
    on the conversation just opened (its new button, now marked current)."""
    with trio.fail_after(TEST_GUARD):
        async with e2e(settings, "llamacpp") as env:
            for title in ("first", "second", "third"):
                await env.conversation(title=title)
            seen = await _in_browser(partial(_list_keyboard_session, env.server.url))
    assert seen["before"] == "second", seen
    assert seen["after"] == "second", (
        f"after Enter on the conversation 'second' the focus is on {seen['after']!r}")


# -- a restart with new keys ---------------------------------------------------------------------


def _new_key_session(url: str, restart: Any, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    expect(page.get_by_test_id("error-banner")).to_contain_text("enter a key")
    page.get_by_test_id("key-input").fill("old-key")
    page.get_by_test_id("key-save").click()
    expect(page.get_by_test_id("key-form")).to_be_hidden()
    models = page.get_by_test_id("model-picker").locator("option")
    expect(models).to_have_count(2)  # "default" and the backend's model
    first = models.all_inner_texts()
    restart()  # the operator rotated the keys: the service is back with a new one
    page.get_by_test_id("message-input").fill("hello again")
    page.get_by_test_id("send").click()
    expect(page.get_by_test_id("key-form")).to_be_visible()  # 401: the page asks for a key
    page.get_by_test_id("key-input").fill("new-key")
    page.get_by_test_id("key-save").click()
    expect(page.get_by_test_id("key-form")).to_be_hidden()
    expect(page.get_by_test_id("error-banner")).to_be_hidden()
    with suppress(AssertionError):  # the models are listed again: bounded either way
        expect(models).not_to_have_count(2, timeout=3000)
    return {"first": first, "then": models.all_inner_texts()}


async def test_keys_a_key_entered_again_does_not_list_the_models_twice(
    settings: Settings,
) -> None:
    """The page has a key; the operator rotates the keys and restarts the service. The
    user's next message is refused 401, the page asks for a key, the user enters the new one:
    the key form calls ``start()`` again, whose ``loadModels`` appends every model to the
    model picker a second time (it never clears what it listed): "fake-model" is now offered
    twice (three times after another rotation), two identical choices the user cannot tell
    apart. Expected: the picker lists each model once."""
    old = settings.model_copy(update={"api_keys": ("old-key",)})
    new = settings.model_copy(update={"api_keys": ("new-key",)})
    with socket.socket() as probe:  # a free port, to serve on again after the restart
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    bind = [f"127.0.0.1:{port}"]
    swap, done, back = trio.Event(), trio.Event(), trio.Event()

    async def serve() -> None:
        async with running_server(old, ScriptedBackend(), bind=bind):
            up.set()
            await swap.wait()
        async with running_server(new, ScriptedBackend(), bind=bind):
            back.set()
            await done.wait()

    async def restarted() -> None:
        swap.set()
        await back.wait()

    def restart() -> None:
        trio.from_thread.run(restarted)

    up = trio.Event()
    with trio.fail_after(TEST_GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await up.wait()
            try:
                seen = await _in_browser(partial(_new_key_session, f"http://127.0.0.1:{port}",
                                                 restart))
            finally:
                swap.set()
                done.set()
    assert seen["first"] == ["default", "fake-model"], seen
    assert seen["then"] == ["default", "fake-model"], (
        f"after the new key the model picker offers {seen['then']}")


def _stale_banner_session(url: str, delete: Any, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    items = page.get_by_test_id("conversation")
    expect(items).to_have_count(2)
    delete()  # another tab deletes "old notes"
    items.filter(has_text="old notes").click()
    banner = page.get_by_test_id("error-banner")
    expect(banner).to_be_visible()
    told = banner.inner_text()
    items.filter(has_text="keep me").click()  # the user goes on to another conversation
    expect(page.get_by_test_id("assistant-message")).to_have_count(1)
    expect(items.filter(has_text="keep me")).to_have_attribute("aria-current", "true")
    return {"told": told, "banner": banner.inner_text() if banner.is_visible() else "",
            "answer": page.get_by_test_id("assistant-message").inner_text()}


async def test_list_an_error_banner_does_not_outlive_the_next_conversation_opened(
    settings: Settings,
) -> None:
    """A click on a conversation fails (deleted elsewhere: "no conversation 'conv_…'"; the
    service unreachable for a moment: "cannot reach the service"); the user then opens
    another conversation, which works. ``openConversation`` never clears the banner (only
    ``send`` and ``start`` do): the alert keeps saying the conversation is missing, or the
    service unreachable, above a conversation that is open and fine, until the user sends a
    message. Expected: opening a conversation successfully clears the banner of an earlier
    failure."""
    with trio.fail_after(TEST_GUARD):
        async with e2e(settings, "llamacpp") as env:
            env.sim.script("All good here.")
            other = await env.conversation(title="old notes")
            keep = await env.conversation(title="keep me")
            r = await env.client.post(f"/api/conversations/{keep}/messages",
                                      json={"content": "are you fine?"})
            assert r.status_code == 200, r.text

            async def gone() -> None:
                r = await env.client.delete(f"/api/conversations/{other}")
                assert r.status_code == 204, r.text

            def delete() -> None:
                trio.from_thread.run(gone)

            seen = await _in_browser(partial(_stale_banner_session, env.server.url, delete))
    assert seen["told"], seen
    assert "All good here." in seen["answer"], seen  # "keep me" is open, and fine
    assert not seen["banner"], (
        f"'keep me' opened fine; the banner still says {seen['banner']!r}")
