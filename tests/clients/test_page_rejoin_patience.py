"""How long the chat page keeps re-joining a run whose stream dropped (``followEvents``).

It gave up after four re-joins in all (0.5 + 1 + 2 + 4 s), counted over the whole run:
* a network (or a proxy, or the service restarting) away for longer than 7.5 s ended the
  following with "reload to re-join", while the run went on and stored its whole answer;
* a long run behind a proxy that cuts every stream after a while was given up at the fifth
  cut, though every re-join before it had brought the rest of the answer.

Now re-joins go on for 30 s without an event (each after up to 5 s), and a re-join that brings
events starts the count again. Debian's chromium through Playwright, against the real server
and simulator on loopback, a TCP proxy between them that really drops and refuses connections.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import trio

from service.settings import Settings
from service.sim.scenario import Reply as SimReply

from ..e2e import e2e
from ..proxies import cuttable
from .test_chat_page import CHROMIUM, WAIT_MS, _in_browser, _send

playwright = pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")]

_TICKS = 300  # 15 s at 50 ms a token


def _shown(answer: Any, page: Any) -> dict[str, Any]:
    playwright.expect(page.get_by_test_id("send")).to_be_enabled(timeout=3 * WAIT_MS)
    return {"text": answer.locator(".answer").inner_text(),
            "notes": answer.locator(".note").all_inner_texts(),
            "banner": page.get_by_test_id("error-banner").inner_text()}


def _cut_often_session(url: str, cut: Any, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    answer = _send(page, "how many ticks?")
    text = answer.locator(".answer")
    for _ in range(6):
        # More of the answer arrives (the re-join worked), then the stream is cut again.
        playwright.expect(text).to_contain_text("tick")
        before = len(text.inner_text().split())
        page.wait_for_function(
            "([el, n]) => el.innerText.split(/\\s+/).filter(Boolean).length > n + 5",
            arg=[text.element_handle(), before])
        cut()
    return _shown(answer, page)


async def test_page_follows_a_long_run_through_many_cuts(settings: Settings) -> None:
    """A proxy cuts the page's stream six times, each after the re-join before brought more of
    the answer: the page follows the run to its end and shows the stored answer, with no note.
    (It gave up at the fifth cut: "reload to re-join".)"""
    async with e2e(settings, "llamacpp") as env, cuttable(env.server) as proxy:
        env.sim.script(SimReply(text="tick " * _TICKS, interval=0.05))
        seen = await _in_browser(partial(
            _cut_often_session, proxy.url, lambda: trio.from_thread.run_sync(proxy.cut)))
        stored = await env.the_reply()
    assert (seen["banner"], seen["notes"]) == ("", []), seen
    assert stored["status"] == "complete", stored
    assert seen["text"].split() == stored["content"].split() == ["tick"] * _TICKS


def _outage_session(url: str, down: Any, up: Any, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    answer = _send(page, "how many ticks?")
    playwright.expect(answer).to_contain_text("tick tick tick")
    down()  # the stream drops and no connection gets through
    page.wait_for_timeout(10_000)  # longer than the 7.5 s the page used to wait in all
    up()
    return _shown(answer, page)


async def test_page_rejoins_after_a_ten_second_outage(settings: Settings) -> None:
    """The network is down for 10 s in the middle of a run (every connection refused; the run
    goes on, ``on_disconnect: continue``). Once it is back, the page re-joins on its own and
    shows the whole stored answer. (It had given up after 7.5 s: "reload to re-join".)"""
    async with e2e(settings, "llamacpp") as env, cuttable(env.server) as proxy:
        env.sim.script(SimReply(text="tick " * _TICKS, interval=0.05))

        def down() -> None:
            trio.from_thread.run_sync(partial(proxy.cut, refuse=True))

        def up() -> None:
            def now() -> None:
                proxy.refusing = False
            trio.from_thread.run_sync(now)

        seen = await _in_browser(partial(_outage_session, proxy.url, down, up))
        stored = await env.the_reply()
        refused = proxy.refused
    assert refused, "no re-join was tried while the network was down"
    assert (seen["banner"], seen["notes"]) == ("", []), seen
    assert stored["status"] == "complete", stored
    assert seen["text"].split() == stored["content"].split() == ["tick"] * _TICKS
