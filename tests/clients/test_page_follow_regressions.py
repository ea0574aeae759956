"""A review of 9894e7c..HEAD (the lease check, /readyz's probe, the terminal's plain mode, the
page following a pending run): each test fails on the tree it was written against because
of a defect that change set introduced.

Browser tests drive Debian's ``chromium`` through Playwright in a worker thread
(tests/clients/test_chat_page.py's helpers) against the real server on loopback with the real
simulator behind it (tests/e2e.py); the terminal test drives the real ``Renderer`` on a rich
console that is a terminal."""

from __future__ import annotations

import io
import re
from contextlib import suppress
from functools import partial
from typing import Any

import pytest
import trio
from rich.console import Console

from service.chat import Renderer
from service.settings import Settings
from service.sim.scenario import Reply as SimReply

from ..e2e import GUARD, e2e
from .test_chat_page import CHROMIUM, _in_browser

playwright = pytest.importorskip("playwright.sync_api")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")


# -- the terminal client ---------------------------------------------------------------------


def _terminal(height: int = 12) -> tuple[Renderer, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=80, height=height,
                      color_system=None, legacy_windows=False)
    err = Console(file=io.StringIO(), force_terminal=True, width=80)
    return Renderer(console, err), out


def test_cli_a_tall_streamed_reply_then_a_different_answer_shows_the_answer() -> None:
    """ReAct at its step limit (service/agents/react.py ``loop``): the last LLM call streams
    its text as tokens (another "Thought/Action", no final answer), no event comes between,
    and the run's ``message`` is a different text, the stored answer ("I could not finish
    this within 8 steps..."). Taller than the screen, the streamed text went out in plain
    mode; ``message`` then writes only the part of the answer that extends what was printed,
    and here that is nothing: the stored answer is never shown, the terminal keeps the
    model's raw text as if it were the answer. A short one (live mode) shows the answer."""
    streamed = "".join(f"Thought: line {i} of a long thought\n\n" for i in range(20)) + \
        "Action: search\nAction Input: {}"
    answer = "I could not finish this within 8 steps. Last thought: line 19"
    renderer, out = _terminal()
    renderer.started("react")
    for piece in re.findall(r"\S+\s*", streamed):
        renderer.token(piece)
    renderer.message(answer)
    renderer.finished("succeeded", None)
    shown = out.getvalue()
    assert "line 0 of a long thought" in shown  # it did stream (plain mode)
    assert "I could not finish" in shown, (
        f"the run's answer {answer!r} is not on the terminal; its tail: {shown[-200:]!r}")


# -- the chat page ---------------------------------------------------------------------------


async def _pending_elsewhere(env: Any, nursery: trio.Nursery, conv: str) -> str:
    """A run on ``conv`` started by another client that then left it going; its id."""
    started: list[str] = []
    some = trio.Event()

    async def other_tab() -> None:
        async with env.post_stream(conv, "slow please", on_disconnect="continue") as r:
            async for line in r.aiter_lines():
                found = re.search(r'"run_id": ?"([^"]+)"', line)
                if line.startswith("data:") and found and not started:
                    started.append(found.group(1))
                if line.startswith("id: 4"):
                    some.set()
                    return

    nursery.start_soon(other_tab)
    with trio.fail_after(GUARD):
        await some.wait()
    return started[0]


def _switch_session(url: str, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    page.get_by_test_id("conversation").filter(has_text="busy").click()
    # following the run: its tokens come in
    playwright.expect(page.get_by_test_id("assistant-message").last).to_contain_text("tick")
    page.get_by_test_id("conversation").filter(has_text="quiet").click()
    with suppress(AssertionError):  # a fixed page shows "quiet" (no messages): bounded
        playwright.expect(page.get_by_test_id("user-message")).to_have_count(0, timeout=5000)
    return {"users": page.get_by_test_id("user-message").all_inner_texts(),
            "current": page.locator("#conversations button.current").all_inner_texts(),
            "stop_visible": page.get_by_test_id("stop").is_visible()}


@needs_chromium
async def test_page_opening_a_busy_conversation_does_not_lock_the_page_on_it(
    settings: Settings,
) -> None:
    """The page opens a conversation whose reply another client's run is still writing: it
    now follows that run (``followPending``, awaited inside ``openConversation``), and while
    it does ``state.run`` is set, so ``openConversation`` returns at once for any other
    conversation (and "New" does nothing): the page is held on a conversation the user only
    looked at, for as long as somebody else's run goes on (up to the run timeout), the
    click silently ignored."""
    async with e2e(settings, "llamacpp") as env, trio.open_nursery() as nursery:
        env.sim.script(SimReply(text="tick " * 400, interval=0.05))  # 20 s
        await env.conversation(title="quiet")
        busy = await env.conversation(title="busy")
        run_id = await _pending_elsewhere(env, nursery, busy)
        seen = await _in_browser(partial(_switch_session, env.server.url))
        await env.client.post(f"/api/runs/{run_id}/cancel")
    assert seen["users"] == [], (
        f"after a click on 'quiet' the page still shows {seen['users']} (buttons marked "
        f"current: {seen['current']}, Stop visible: {seen['stop_visible']})")


def _two_pending_session(url: str, runs_over: Any, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    page.get_by_test_id("conversation").first.click()
    answers = page.get_by_test_id("assistant-message")
    playwright.expect(answers).to_have_count(2)
    runs_over()  # both runs have ended, both whole answers are stored
    playwright.expect(page.get_by_test_id("stop")).to_be_hidden()
    with suppress(AssertionError):  # a fixed page shows both: bounded either way
        playwright.expect(answers.first.locator(".answer")).to_contain_text("tick", timeout=5000)
    return {"answers": [a.inner_text() for a in answers.locator(".answer").all()],
            "notes": answers.first.locator(".note").all_inner_texts()}


@needs_chromium
async def test_page_every_pending_reply_of_an_opened_conversation_is_followed(
    settings: Settings,
) -> None:
    """Two runs going on one conversation (two tabs, or a tab and a terminal, each asked
    something): ``openConversation`` keeps only the last pending reply (``pending = ...`` in
    its loop) and follows that run; the earlier reply is drawn as it is stored while its run
    goes (empty) and stays so: an ended, empty answer with no note, which the store, once
    that run ends, contradicts with its whole text (the case the change set meant to fix,
    for one run)."""
    async with e2e(settings, "llamacpp") as env, trio.open_nursery() as nursery:
        env.sim.script(SimReply(text="tick " * 40, interval=0.05),
                       SimReply(text="tock " * 60, interval=0.05))
        conv = await env.conversation(title="two at once")
        first = await _pending_elsewhere(env, nursery, conv)
        second = await _pending_elsewhere(env, nursery, conv)

        async def both_over() -> None:
            for run_id in (first, second):
                with trio.fail_after(GUARD):
                    while (await env.client.get(f"/api/runs/{run_id}")).json()["status"] in (  # noqa: ASYNC110
                            "queued", "running"):
                        await trio.sleep(0.05)

        def runs_over() -> None:
            trio.from_thread.run(both_over)

        seen = await _in_browser(partial(_two_pending_session, env.server.url, runs_over))
        messages = (await env.client.get(f"/api/conversations/{conv}")).json()["messages"]
    stored = [m["content"].split() for m in messages if m["role"] == "assistant"]
    assert stored == [["tick"] * 40, ["tock"] * 60], stored
    assert [a.split() for a in seen["answers"]] == stored, (
        f"the store has replies of 40 ticks and 60 tocks; the page shows "
        f"{[(a.count('tick'), a.count('tock')) for a in seen['answers']]} "
        f"(notes on the first: {seen['notes']})")
