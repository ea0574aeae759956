"""The chat page for a screen reader: a reply is read once, whole, not token by token.

The messages used to be one ``aria-live`` region: each token replaced the answer's last block,
and a screen reader read the changed block again at every token ("Hel", "Hello the", ...), and
opening a conversation read it all. Now the messages are not live; a streaming reply is
``aria-busy`` and its end goes to a status region (the announcer): the answer, or why it ended.

Real server on port 0, the scripted backend, Debian's chromium through Playwright (the helpers of
tests/clients/test_chat_page.py).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import trio

from service.backends.base import ChatRequest
from service.settings import Settings

from ..fakes import Reply, ScriptedBackend
from ..servers import running_server
from .test_chat_page import CHROMIUM, _in_browser, _send

playwright = pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")]

expect = playwright.expect
TEST_GUARD = 90  # seconds a whole test may take (a browser start included)


def _answers(req: ChatRequest) -> Reply:
    q = req.messages[-1].content
    if q.startswith("slow"):
        return Reply("tick " * 30, gap=0.1)  # 3 s
    if q.startswith("long"):
        return Reply("tock " * 400, gap=0.05)  # 20 s: stopped long before
    if q.startswith("fail"):
        return Reply("", fail_after=0, error=RuntimeError("boom"))
    return Reply(f"**echo**: {q}")


def _session(url: str, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    messages = page.get_by_test_id("messages")
    announcer = page.get_by_test_id("announcer")
    seen: dict[str, Any] = {"live": messages.get_attribute("aria-live"),
                            "role": announcer.get_attribute("role")}
    # While a reply streams: busy, and nothing of it said yet.
    slow = _send(page, "slow one")
    expect(slow).to_contain_text("tick tick")
    seen["busy_streaming"] = slow.get_attribute("aria-busy")
    seen["said_streaming"] = announcer.text_content()
    expect(page.get_by_test_id("stop")).to_be_hidden()
    seen["busy_after"] = slow.get_attribute("aria-busy")
    seen["said_after"] = announcer.text_content()
    # A plain answer: said as shown (its Markdown as text).
    _send(page, "hello")
    expect(announcer).to_have_text("echo: hello")
    # A failed run: why.
    _send(page, "fail now")
    expect(announcer).to_contain_text("failed: ")
    seen["said_failed"] = announcer.text_content()
    # The user's Stop: "stopped", and what had come, which the reader did not hear.
    long = _send(page, "long story")
    expect(long).to_contain_text("tock tock")
    page.get_by_test_id("stop").click()
    expect(announcer).to_contain_text("stopped")
    seen["said_stopped"] = announcer.text_content()
    # Opening a conversation (after a reload) reads nothing out: it is all there to browse.
    page.reload()
    page.get_by_test_id("conversations").locator("button").first.click()
    expect(page.get_by_test_id("assistant-message")).to_have_count(4)
    seen["said_reloaded"] = announcer.text_content()
    seen["busy_reloaded"] = page.get_by_test_id("assistant-message").evaluate_all(
        "(els) => els.map((el) => el.getAttribute('aria-busy'))")
    return seen


async def test_a_reply_is_announced_once_whole_not_token_by_token(settings: Settings) -> None:
    with trio.fail_after(TEST_GUARD):
        async with running_server(settings, ScriptedBackend(_answers)) as srv:
            seen = await _in_browser(partial(_session, srv.url))
    assert seen["live"] is None, "the messages are not a live region (each token was read out)"
    assert seen["role"] == "status"
    assert (seen["busy_streaming"], seen["said_streaming"]) == ("true", "")
    assert seen["busy_after"] == "false"
    assert seen["said_after"] == " ".join(["tick"] * 30)
    assert seen["said_failed"].startswith("failed: internal error"), seen["said_failed"]
    said = seen["said_stopped"]
    assert said.startswith("stopped. The answer so far: tock tock"), said
    assert seen["said_reloaded"] == ""
    assert seen["busy_reloaded"] == [None, None, None, None]
