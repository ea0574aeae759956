"""The chat page re-joins its own run after a reload (``rejoinRun``) from where it was
(``Last-Event-ID``) with the text so far, but the steps it had shown (a ReAct thought, tool
calls and results, a plan) were not kept: after a reload the reply showed no steps until new
ones came, although the run had taken them (failing before the fix). Debian's chromium through
Playwright, against the real server on loopback."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest

from service.backends.base import ToolCall
from service.settings import Settings

from ..fakes import Reply, ScriptedBackend
from ..servers import running_server
from .test_chat_page import CHROMIUM, _in_browser, _send

playwright = pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")]

def _turns(req: Any) -> Reply:
    """A calculator call (native), then a 4 s answer."""
    if any(m.role == "tool" for m in req.messages):
        return Reply("tick " * 80, gap=0.05)
    return Reply("", tool_calls=[ToolCall("c1", "calculator", {"expression": "6*7"})])


def _session(url: str, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    page.get_by_test_id("agent-picker").select_option("react")
    answer = _send(page, "how many ticks?")
    playwright.expect(answer).to_contain_text("tick tick tick tick")
    before = answer.get_by_test_id("steps").locator("li").all_text_contents()
    page.reload()
    again = page.get_by_test_id("assistant-message").last
    playwright.expect(again).to_contain_text("tick tick tick tick")
    during = again.get_by_test_id("steps").locator("li").all_text_contents()
    playwright.expect(page.get_by_test_id("send")).to_be_enabled()  # the run is over
    return {"before": before, "during": during,
            "after": again.get_by_test_id("steps").locator("li").all_text_contents()}


async def test_page_steps_shown_before_a_reload_are_shown_after_it(settings: Settings) -> None:
    backend = ScriptedBackend(_turns)
    async with running_server(settings, backend) as srv:
        seen = await _in_browser(partial(_session, srv.url))
    assert any("calculator" in s for s in seen["before"]), seen  # shown as steps
    assert seen["during"] == seen["before"], seen
    assert seen["after"][:len(seen["before"])] == seen["before"], seen
