"""The chat page reloaded mid-run, and a click in the sidebar before it has re-joined the run.

Before the fix these tests were written against (2026-12-04: the re-join now marks the page
busy first), a reload re-joined the tab's run: ``start`` -> ``rejoin`` -> ``rejoinRun``, which
first awaited ``openConversation(conv, runId)`` (GET the conversation, redraw it without the
run's reply, GET the sidebar list) and only then marks the page busy (``running(runId)``) and
opens the run's stream with ``Last-Event-ID``. Until ``running`` the page is not busy, so a
click on a conversation is served: its ``openConversation(id)`` aborts the re-join's (which
then returns silently, and ``rejoinRun`` goes on all the same), does not skip the re-joined run
(so it draws the reply as stored, empty while the run goes, and starts a ``watch`` of the run
from its first event), and wipes ``#messages`` whenever its GET comes back, which may be after
the re-join has drawn its view. Depending on which GET comes back first the page ends with two
views of one reply (and two streams of one run), or with the re-join's view thrown away (its
stream still held, writing into a detached element) and the answer gone from the screen until
the click's sidebar refresh and its new stream have both answered.

The race is made deterministic with ``page.route``: the two GETs of the conversation (the
re-join's, the click's) are held and let go in the order each test needs, from the test's own
flow (a route handler never sleeps: Playwright's sync API runs handlers on the thread that
drives the page, so a handler that waited would stall every routed request, the clicks and
the test's own reads with it). Timing is the real simulator's token pacing; every wait is
bounded by ``GUARD`` (a few seconds on this machine, generous on a slow one).

Browser tests drive Debian's ``chromium`` through Playwright in a worker thread
(tests/clients/test_chat_page.py's helpers) against the real server on loopback with the real
simulator behind it (tests/e2e.py)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import trio

from service.settings import Settings
from service.sim.scenario import Reply as SimReply

from ..e2e import GUARD, Env, e2e
from .test_chat_page import CHROMIUM, _in_browser, _send
from .test_page_follow_regressions import _pending_elsewhere

playwright = pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")]

# 0.05 s a token, 1200 tokens: a minute, far longer than any test here; cancelled at the end.
LONG = SimReply(text="tick " * 1200, interval=0.05)
CONVERSATION = re.compile(r".*/api/conversations/conv_[0-9a-f]+(\?limit=[0-9]+)?$")  # GET one
SIDEBAR = re.compile(r".*/api/conversations\?limit=100$")  # loadConversations()
QUIET_MS = 1500  # how long a fixed page is given to show it did not send a request


def _until(check: Callable[[], bool], page: Any, *, within: float = GUARD) -> bool:
    """Poll ``check`` (letting Playwright dispatch its events and route handlers) until it is
    true or ``within`` seconds have passed; whether it came true."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        if check():
            return True
        page.wait_for_timeout(20)
    return check()


class Hold:
    """A ``page.route`` handler that keeps matching GETs (at most ``limit``, only while armed)
    until the test lets each go; anything else is continued at once."""

    def __init__(self, limit: int, *, armed: bool = True) -> None:
        self.limit, self.armed = limit, armed
        self.held: list[Any] = []
        self.released = 0

    def __call__(self, route: Any) -> None:
        if self.armed and route.request.method == "GET" and len(self.held) < self.limit:
            self.held.append(route)
        else:
            route.continue_()

    def release(self, i: int) -> bool:
        if i >= len(self.held):
            return False  # never sent (a page that ignored the click)
        self.held[i].continue_()
        self.released += 1
        return True

    def release_all(self) -> None:
        for route in self.held[self.released:]:
            route.continue_()
        self.released = len(self.held)


class Streams:
    """The page's requests for the events of one run, by their fate."""

    def __init__(self, page: Any) -> None:
        self.run_id = ""
        self.all: list[Any] = []
        self.done: set[int] = set()
        page.on("request", self._request)
        page.on("requestfinished", lambda r: self.done.add(id(r)))
        page.on("requestfailed", lambda r: self.done.add(id(r)))

    def _request(self, r: Any) -> None:
        if self.run_id and f"/api/runs/{self.run_id}/events" in r.url:
            self.all.append(r)

    def open(self) -> list[str]:
        """The streams of the run still held open: their Last-Event-ID ("" if from the first)."""
        return [r.headers.get("last-event-id", "") for r in self.all if id(r) not in self.done]


_SHOWN = """() => {
  const views = [...document.querySelectorAll('[data-testid=assistant-message]')];
  return {
    users: [...document.querySelectorAll('[data-testid=user-message]')].map((e) => e.innerText),
    answers: views.map((v) => v.querySelector('.answer').innerText.split(/\\s+/)
                                 .filter((w) => w === 'tick').length),
    current: [...document.querySelectorAll('#conversations button.current')]
               .map((b) => b.innerText),
    stop: !document.getElementById('stop').hidden,
  };
}"""


def _shown(page: Any) -> dict[str, Any]:
    """What the user sees: user messages, ticks in each answer, the current conversation."""
    return dict(page.evaluate(_SHOWN))


def _ticks(page: Any) -> int:
    """Ticks of the newest answer on screen (0 if none)."""
    return max([0, *_shown(page)["answers"][-1:]])


def _reload_mid_run(page: Any, url: str, hold: Hold) -> str:
    """Send, see it stream, reload with ``hold`` on the conversation GETs, and wait until the
    re-join's GET is held (``rejoinRun`` inside ``openConversation``, the page not busy yet);
    the run's id."""
    page.goto(url + "/")
    answer = _send(page, "slow please")
    playwright.expect(answer).to_contain_text("tick tick tick")
    live = json.loads(page.evaluate("sessionStorage.getItem('service.live')"))
    page.route(CONVERSATION, hold)
    page.reload()
    assert _until(lambda: len(hold.held) == 1, page), "the re-join never asked for its conversation"
    return str(live["run_id"])


def _status_of(env: Env) -> Callable[[str], str]:
    """A run's status on the server, asked from the browser's thread."""
    async def run_status(run_id: str) -> str:
        return str((await env.client.get(f"/api/runs/{run_id}")).json()["status"])

    return lambda run_id: trio.from_thread.run(run_status, run_id)


async def _cancel_pending(env: Env) -> None:
    """Cancel every run still going (the tests' runs last a minute)."""
    for conv in (await env.client.get("/api/conversations")).json()["data"]:
        messages = (await env.client.get(f"/api/conversations/{conv['id']}")).json()["messages"]
        for m in messages:
            if m["role"] == "assistant" and m["status"] == "pending" and m["run_id"]:
                await env.client.post(f"/api/runs/{m['run_id']}/cancel")


# -- the click's GET comes back after the re-join has drawn its view: the answer is wiped ----


def _wiped_session(url: str, page: Any) -> dict[str, Any]:
    hold = Hold(2)
    streams = Streams(page)
    sidebar = Hold(1, armed=False)
    page.route(SIDEBAR, sidebar)
    streams.run_id = _reload_mid_run(page, url, hold)
    page.get_by_test_id("conversation").first.click()
    _until(lambda: len(hold.held) == 2, page, within=QUIET_MS / 1000)
    hold.release(0)  # the re-join's conversation: the re-join goes on and streams
    assert _until(lambda: _ticks(page) > 0, page), "the re-join never showed the answer"
    before = _ticks(page)
    sidebar.armed = True  # the click's sidebar refresh: slow (the review saw it take seconds)
    hold.release(1)
    _until(lambda: bool(sidebar.held), page, within=QUIET_MS / 1000)
    # While the sidebar list is slow, the answer the user was reading must stay and grow.
    grew = _until(lambda: _ticks(page) > before + 10, page, within=5)
    during = _shown(page)
    sidebar.armed = False
    sidebar.release_all()
    page.wait_for_timeout(QUIET_MS)
    return {"before": before, "grew": grew, "during": during, "after": _shown(page),
            "open": streams.open()}


async def test_reload_then_quick_click_keeps_the_answer_on_screen(settings: Settings) -> None:
    """The click's ``openConversation`` gets its conversation after ``rejoinRun`` drew its
    view: ``$("messages").replaceChildren()`` throws that view away (its stream goes on into a
    detached element), the reply is drawn as stored (empty: the run is going), and the answer
    comes back only once the click's ``loadConversations()`` has answered and its ``watch``
    has replayed the run from its first event. While the sidebar's list is slow the user sees
    an empty answer that does not move (the review: "without the answer for seconds")."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(LONG)
        seen = await _in_browser(partial(_wiped_session, env.server.url))
        await _cancel_pending(env)
    during = seen["during"]
    assert seen["grew"], (
        f"the re-join showed {seen['before']} ticks; after the click, with the sidebar's list "
        f"slow to answer, the page shows answers of {during['answers']} ticks for 5 s "
        f"(Stop visible: {during['stop']}): the re-joined answer was wiped")
    assert len(seen["after"]["answers"]) == 1, seen["after"]
    assert len(seen["open"]) == 1, (
        f"the page holds {len(seen['open'])} streams of the run (Last-Event-IDs "
        f"{seen['open']}), one feeding a view no longer on screen")


# -- the click's GET comes back first: two views of one reply, two streams of one run ---------


def _twice_session(url: str, page: Any) -> dict[str, Any]:
    hold = Hold(2)
    streams = Streams(page)
    streams.run_id = _reload_mid_run(page, url, hold)
    page.get_by_test_id("conversation").first.click()
    if _until(lambda: len(hold.held) == 2, page, within=QUIET_MS / 1000):
        hold.release(1)  # the click's conversation first: it draws the reply, starts a watch
        _until(lambda: bool(streams.open()), page, within=QUIET_MS / 1000)
    hold.release(0)  # then the re-join's: aborted, it returns; rejoinRun follows all the same
    assert _until(lambda: _ticks(page) > 0, page), "no answer on screen"
    before = _shown(page)["answers"]
    page.wait_for_timeout(QUIET_MS)
    return {"before": before, "after": _shown(page), "open": streams.open()}


async def test_reload_then_quick_click_shows_one_view_of_the_reply(settings: Settings) -> None:
    """The click's ``openConversation(id)`` is served before the re-join's: it does not skip
    the run being re-joined, so it draws its reply and starts a ``watch`` of it; the aborted
    re-join's ``openConversation`` returns without a word and ``rejoinRun`` marks the page
    busy and appends its own view, followed by a second stream of the same run."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(LONG)
        seen = await _in_browser(partial(_twice_session, env.server.url))
        await _cancel_pending(env)
    after = seen["after"]
    assert after["users"] == ["slow please"], after
    assert len(after["answers"]) == 1, (
        f"one reply is going; the page shows {len(after['answers'])} answers of "
        f"{after['answers']} ticks, fed by {len(seen['open'])} streams of the run "
        f"(Last-Event-IDs {seen['open']})")
    assert len(seen["open"]) == 1, seen["open"]


# -- a click on another conversation in that moment: the run's answer lands in it --------------


def _elsewhere_session(url: str, page: Any) -> dict[str, Any]:
    hold = Hold(2)
    streams = Streams(page)
    streams.run_id = _reload_mid_run(page, url, hold)
    page.get_by_test_id("conversation").filter(has_text="quiet").click()
    if _until(lambda: len(hold.held) == 2, page, within=QUIET_MS / 1000):
        hold.release(1)  # "quiet" drawn (no messages)
        _until(lambda: _shown(page)["current"] == ["quiet"], page, within=QUIET_MS / 1000)
    hold.release(0)
    page.wait_for_timeout(QUIET_MS)
    _until(lambda: _ticks(page) > 0, page, within=2)
    return {"shown": _shown(page), "open": streams.open()}


async def test_reload_then_quick_click_elsewhere_does_not_mix_conversations(
    settings: Settings,
) -> None:
    """A click on another conversation in the same moment: the page opens it (the re-join's
    ``openConversation`` aborted), then ``rejoinRun`` goes on regardless and appends the run's
    answer, with Stop, under the other conversation (which the page now takes as current:
    the next message would go there)."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(LONG)
        await env.conversation(title="quiet")
        seen = await _in_browser(partial(_elsewhere_session, env.server.url))
        await _cancel_pending(env)
    shown = seen["shown"]
    on_run = shown["users"] == ["slow please"] and len(shown["answers"]) == 1
    on_quiet = shown["users"] == [] and shown["answers"] == [] and shown["current"] == ["quiet"]
    assert on_run or on_quiet, (
        f"the page shows user messages {shown['users']}, answers of {shown['answers']} ticks, "
        f"current {shown['current']}, Stop visible {shown['stop']}: the run's answer under "
        f"another conversation")


# -- held streams: the duplicate is the browser's sixth connection, and Stop waits for a free one


def _stop_session(url: str, status: Callable[[str], str], page: Any) -> dict[str, Any]:
    hold = Hold(2)
    streams = Streams(page)
    page.goto(url + "/")
    page.get_by_test_id("conversation").filter(has_text="busy").click()
    playwright.expect(page.get_by_test_id("assistant-message")).to_have_count(4)
    answer = _send(page, "slow please")  # the page now holds 5 streams: 4 watched, its own
    playwright.expect(answer).to_contain_text("tick tick tick")
    live = json.loads(page.evaluate("sessionStorage.getItem('service.live')"))
    streams.run_id = live["run_id"]
    page.route(CONVERSATION, hold)
    page.reload()
    assert _until(lambda: len(hold.held) == 1, page), "the re-join never asked for its conversation"
    page.get_by_test_id("conversation").filter(has_text="busy").click()
    if _until(lambda: len(hold.held) == 2, page, within=QUIET_MS / 1000):
        hold.release(1)
        _until(lambda: bool(streams.open()), page, within=QUIET_MS / 1000)
    hold.release(0)
    stop = page.get_by_test_id("stop")
    playwright.expect(stop).to_be_visible()
    assert _until(lambda: _ticks(page) > 0, page), "no answer on screen"
    cancels: list[Any] = []
    page.on("request", lambda r: cancels.append(r) if r.url.endswith("/cancel") else None)
    clicked = time.monotonic()
    stop.click()
    hidden = _until(lambda: not stop.is_visible(), page, within=5)
    took = time.monotonic() - clicked
    return {"hidden": hidden, "took": took, "open": streams.open(), "cancel_sent": bool(cancels),
            "request_start": cancels[0].timing["requestStart"] if cancels else None,
            "status": status(streams.run_id)}


async def test_reload_then_quick_click_does_not_queue_stop_behind_held_streams(
    settings: Settings,
) -> None:
    """Chromium opens at most 6 HTTP/1.1 connections to one host and queues any request past
    them, and every followed run holds one. A conversation with four replies going elsewhere
    and the tab's own run: a plain reload holds five (four ``watch``es and the re-join), the
    click's duplicate ``watch`` of the re-joined run makes six, and the next request of the
    page (here the user's Stop, ``POST /api/runs/{id}/cancel``) waits in the browser, never
    reaching the server, until one of those runs ends."""
    async with e2e(settings, "llamacpp") as env, trio.open_nursery() as nursery:
        env.sim.script(*[LONG] * 5)
        busy = await env.conversation(title="busy")
        for _ in range(4):
            await _pending_elsewhere(env, nursery, busy)
        status = _status_of(env)
        seen = await _in_browser(partial(_stop_session, env.server.url, status))
        await _cancel_pending(env)
    assert seen["hidden"], (
        f"Stop was pressed and nothing happened for {seen['took']:.1f} s: the page made its "
        f"request ({seen['cancel_sent']}) but Chromium never sent it (requestStart "
        f"{seen['request_start']}), the run is still {seen['status']!r} on the server; it is "
        f"queued behind {len(seen['open'])} open streams of the run (Last-Event-IDs "
        f"{seen['open']}) and four watched runs")


# -- many replies going elsewhere: the page's own requests must not queue behind them -------


WATCH_MAX = 3  # service/web/chat.js: replies going elsewhere followed at once on one page


def _crowded_session(url: str, status: Callable[[str], str], page: Any) -> dict[str, Any]:
    streams = Streams(page)
    page.goto(url + "/")
    page.get_by_test_id("conversation").filter(has_text="busy").click()
    playwright.expect(page.get_by_test_id("assistant-message")).to_have_count(6)
    answers = page.get_by_test_id("assistant-message")
    page.get_by_test_id("message-input").fill("slow please")
    sent = time.monotonic()
    page.get_by_test_id("send").click()
    shown = _until(lambda: answers.count() == 7 and "tick tick tick" in answers.nth(6).inner_text(),
                   page, within=10)
    took = time.monotonic() - sent
    live = json.loads(page.evaluate("sessionStorage.getItem('service.live')") or "null")
    if not shown or not live:
        return {"shown": False, "took": took}
    streams.run_id = live["run_id"]
    stop = page.get_by_test_id("stop")
    stop.click()
    hidden = _until(lambda: not stop.is_visible(), page, within=10)
    notes = page.get_by_test_id("run-note").all_inner_texts()
    return {"shown": True, "took": took, "hidden": hidden, "status": status(live["run_id"]),
            "notes": notes, "growing": _shown(page)["answers"][:6]}


async def test_a_conversation_with_many_replies_going_elsewhere_leaves_the_page_usable(
    settings: Settings,
) -> None:
    """Chromium opens at most 6 HTTP/1.1 connections to one host; each reply the page follows
    holds one. With six replies of a conversation going elsewhere, following all of them left
    the user's own message (and then Stop) queued in the browser, never sent. The page follows
    a few (the newest) and says of the others that they are still going."""
    async with e2e(settings, "llamacpp") as env, trio.open_nursery() as nursery:
        env.sim.script(*[LONG] * 7)
        busy = await env.conversation(title="busy")
        for _ in range(6):
            await _pending_elsewhere(env, nursery, busy)
        status = _status_of(env)
        seen = await _in_browser(partial(_crowded_session, env.server.url, status))
        await _cancel_pending(env)
    assert seen["shown"], (f"the user's message got no answer on screen in {seen['took']:.1f} s "
                           "(its request queued behind the followed replies)")
    assert seen["hidden"], seen
    assert seen["status"] == "cancelled", seen
    still = [n for n in seen["notes"] if "still" in n]
    assert len(still) == 6 - WATCH_MAX, seen["notes"]
