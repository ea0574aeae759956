"""The chat page re-joins a dropped stream (``followRun``); a re-join the service answers 503
(the store slow for a moment; a restarting proxy's 502 alike), an answer the API calls worth a
retry, ended the page's following: an error banner, the rest of the answer never shown while
the run went on and stored it whole. Now a 5xx or 429 re-join counts as a failed attempt and is
tried again (failing before the fix). Debian's chromium through Playwright, against the real
server and simulator on loopback, a TCP proxy between them."""

from __future__ import annotations

import itertools
import re
from functools import partial
from typing import Any

import pytest
import trio

from service.errors import StoreUnavailable
from service.settings import Settings
from service.sim.scenario import Reply as SimReply

from ..e2e import GUARD, e2e
from ..proxies import CuttableProxy, cuttable, port_of, serving
from .test_chat_page import CHROMIUM, WAIT_MS, _in_browser, _send

playwright = pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")]


def _session(url: str, drop: Any, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    answer = _send(page, "how many ticks?")
    playwright.expect(answer).to_contain_text("tick tick tick tick")
    drop()  # the stream drops; its first re-join is answered 503
    # The page is done with it (its re-join waited the 503's Retry-After, 5 s).
    playwright.expect(page.get_by_test_id("send")).to_be_enabled(timeout=WAIT_MS)
    return {"text": answer.locator(".answer").inner_text(),
            "notes": answer.locator(".note").all_inner_texts(),
            "banner": page.get_by_test_id("error-banner").inner_text()}


async def test_page_a_rejoin_answered_503_is_tried_again(settings: Settings) -> None:
    async with e2e(settings, "llamacpp") as env, cuttable(env.server) as proxy:
        env.sim.script(SimReply(text="tick " * 60, interval=0.05))  # 3 s
        store = env.server.services.require_store()
        get_run = store.get_run
        refused: list[str] = []
        armed = trio.Event()

        async def once_unavailable(run_id: str, **kwargs: Any) -> Any:
            if armed.is_set() and not refused:
                refused.append(run_id)
                raise StoreUnavailable("the store is slow; retry")
            return await get_run(run_id, **kwargs)

        store.get_run = once_unavailable

        def drop() -> None:
            def now() -> None:
                armed.set()
                proxy.cut()

            trio.from_thread.run_sync(now)

        seen = await _in_browser(partial(_session, proxy.url, drop))
        store.get_run = get_run
        assert refused, "the page did not re-join"
        with trio.fail_after(GUARD):
            run = await env.finished_run(refused[0])
        stored = await env.reply_of(run["conversation_id"], run["id"])
    assert (seen["banner"], seen["notes"]) == ("", []), (
        f"the page stopped following at a 503 re-join; the run went on and its reply is "
        f"stored {stored['status']!r}: {seen}")
    assert stored["status"] == "complete", stored
    assert seen["text"].split() == stored["content"].split(), seen


def _gives_up_session(url: str, drop: Any, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    answer = _send(page, "how many ticks?")
    playwright.expect(answer).to_contain_text("tick tick tick tick")
    drop()  # the stream drops; every re-join is answered 503 (with Retry-After: 5)
    playwright.expect(page.get_by_test_id("send")).to_be_enabled(timeout=3 * WAIT_MS)
    return {"notes": answer.locator(".note").all_inner_texts(),
            "banner": page.get_by_test_id("error-banner").inner_text()}


async def test_page_rejoins_refused_to_the_end_say_why(settings: Settings) -> None:
    """Every re-join answered 503: the page gives up after 30 s of re-joins (each after the
    answer's Retry-After) and says why, the service's own words, not only that the stream
    ended."""
    async with e2e(settings, "llamacpp") as env, cuttable(env.server) as proxy:
        env.sim.script(SimReply(text="tick " * 600, interval=0.05))  # 30 s
        store = env.server.services.require_store()
        get_run = store.get_run
        refused: list[float] = []
        armed = trio.Event()

        async def unavailable(run_id: str, **kwargs: Any) -> Any:
            if armed.is_set():
                refused.append(trio.current_time())
                raise StoreUnavailable("the store is slow; retry")
            return await get_run(run_id, **kwargs)

        store.get_run = unavailable

        def drop() -> None:
            def now() -> None:
                armed.set()
                proxy.cut()

            trio.from_thread.run_sync(now)

        seen = await _in_browser(partial(_gives_up_session, proxy.url, drop))
        store.get_run = get_run
    # Re-joins go on for 30 s without an event (``REJOIN_FOR``), each after the 503's 5 s.
    assert 5 <= len(refused) <= 8, refused
    assert all(b - a >= 4.5 for a, b in itertools.pairwise(refused)), refused
    assert seen["notes"] == [
        "the stream ended before the run did (the store is slow; retry); reload to re-join"], seen


class _ForgetfulProxy(CuttableProxy):
    """A proxy that drops each request's ``Last-Event-ID`` (a cache or a proxy that passes
    only the headers it knows): every re-join is answered from the run's start."""

    dropped = 0  # headers dropped

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream) -> None:
        while data := await src.receive_some(65536):
            data, n = re.subn(rb"(?i)\r\nlast-event-id:", b"\r\nX-Dropped-Hdr:", data)
            self.dropped += n
            await dst.send_all(data)
        await dst.send_eof()


def _replayed_session(url: str, drop: Any, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    answer = _send(page, "how many ticks?")
    playwright.expect(answer).to_contain_text("tick tick tick tick")
    # Every text the answer shows while it streams (the conversation is read again from the
    # store at the run's end, which would hide what was shown before).
    answer.locator(".answer").evaluate(
        "el => { window.shown = [el.innerText]; new MutationObserver(() => "
        "window.shown.push(el.innerText)).observe(el, {childList: true, subtree: true, "
        "characterData: true}); }")
    drop()  # the stream drops; its re-join is answered from the run's first event
    playwright.expect(page.get_by_test_id("send")).to_be_enabled(timeout=WAIT_MS)
    return {"shown": page.evaluate("window.shown"),
            "text": answer.locator(".answer").inner_text(),
            "notes": answer.locator(".note").all_inner_texts()}


async def test_page_a_rejoin_replayed_from_the_start_shows_each_event_once(
        settings: Settings) -> None:
    """Fixed (was: DEFECT: behind a proxy that drops ``Last-Event-ID``, a re-join is answered
    from the run's start, and the page showed every event it got: the answer's start twice.
    At fault: service/web/chat.js ``follow``, which took every event as new.) An event at or
    below the last one shown is skipped."""
    async with e2e(settings, "llamacpp") as env, \
            serving(_ForgetfulProxy(port_of(env.server))) as proxy:
        env.sim.script(SimReply(text="tick " * 60, interval=0.05))  # 3 s

        def drop() -> None:
            trio.from_thread.run_sync(proxy.cut)

        seen = await _in_browser(partial(_replayed_session, proxy.url, drop))
        stored = await env.the_reply()
    assert stored["status"] == "complete", stored
    assert proxy.dropped >= 1, "the page did not re-join"
    assert seen["notes"] == [], seen
    assert seen["text"].split() == stored["content"].split(), (seen, stored)
    whole = stored["content"].split()
    for text in seen["shown"]:  # each a start of the stored answer
        assert text.split() == whole[:len(text.split())], (text, stored["content"])
