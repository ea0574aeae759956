"""The chat page's Markdown: tables and nested lists, the two shapes models write most that the
page's subset showed as raw text (a table as lines of pipes; a nested list flattened, its
sub-items level with their parents).

The real app on port 0 with the real simulator (tests/e2e.py); Debian's chromium through
Playwright (tests/clients/test_chat_page.py's helpers).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import trio

from service.settings import Settings
from service.sim.scenario import Reply as SimReply

from ..e2e import e2e
from .test_chat_page import CHROMIUM, _in_browser, _send

playwright = pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")]

expect = playwright.expect
TEST_GUARD = 60  # seconds a whole test may take (a browser start included)


def _shown(url: str, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    answer = _send(page, "question")
    expect(page.get_by_test_id("stop")).to_be_hidden()
    body = answer.locator(".answer")
    return body.evaluate("""(el) => ({
        text: el.innerText,
        tables: [...el.querySelectorAll("table")].map((t) => ({
          head: [...t.querySelectorAll("thead th")].map((c) => c.textContent),
          rows: [...t.querySelectorAll("tbody tr")].map(
            (r) => [...r.children].map((c) => c.textContent)),
          align: [...t.querySelectorAll("thead th")].map((c) => getComputedStyle(c).textAlign),
        })),
        // Each list item: its depth (lists around it) and its own text (not its sub-items').
        items: [...el.querySelectorAll("li")].map((li) => {
          let depth = 0;
          for (let p = li.parentElement; p && p !== el; p = p.parentElement) {
            if (p.tagName === "UL" || p.tagName === "OL") depth++;
          }
          return [depth, li.firstChild.textContent.trim()];
        }),
        numbers: [...el.querySelectorAll(":scope > ol > li")].map((li, i, all) => {
          const ol = li.parentElement;
          return (ol.start || 1) + [...ol.children].indexOf(li);
        }),
        images: el.querySelectorAll("img").length,
      })""")


async def _model_says(settings: Settings, text: str) -> dict[str, Any]:
    with trio.fail_after(TEST_GUARD):
        async with e2e(settings, "llamacpp") as env:
            env.sim.script(SimReply(text=text))
            return await _in_browser(partial(_shown, env.server.url))


async def test_a_table_is_shown_as_a_table(settings: Settings) -> None:
    text = ("Here are the prices:\n"
            "| Fruit | Price (EUR) | Note |\n"
            "|:------|------------:|:----:|\n"
            "| apple | 1.20 | **fresh** |\n"
            "| pear \\| nashi | 10 | <img src=x onerror=alert(1)> |\n"
            "\n"
            "Prices change daily.")
    seen = await _model_says(settings, text)
    (table,) = seen["tables"]
    assert table["head"] == ["Fruit", "Price (EUR)", "Note"]
    assert table["rows"] == [["apple", "1.20", "fresh"],
                             ["pear | nashi", "10", "<img src=x onerror=alert(1)>"]]
    assert table["align"] == ["left", "right", "center"]
    assert seen["images"] == 0  # model output is text, never markup
    assert "|:---" not in seen["text"], seen["text"]
    assert "| apple" not in seen["text"], seen["text"]
    assert seen["text"].startswith("Here are the prices:")
    assert seen["text"].rstrip().endswith("Prices change daily.")


async def test_a_nested_list_keeps_its_levels_and_numbers(settings: Settings) -> None:
    text = ("1. Prepare:\n"
            "   - wash the fruit\n"
            "   - cut it\n"
            "     - in halves\n"
            "2. Cook it\n"
            "3. Serve\n")
    seen = await _model_says(settings, text)
    assert seen["items"] == [
        [1, "Prepare:"], [2, "wash the fruit"], [2, "cut it"], [3, "in halves"],
        [1, "Cook it"], [1, "Serve"],
    ], seen["items"]
    assert seen["numbers"] == [1, 2, 3]
