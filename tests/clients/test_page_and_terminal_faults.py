"""The browser page and the terminal client against faults, found by a review: each test fails
on the tree it was written against because of a real defect.

The real server on port 0 with its backend built by the lifespan on the real simulator
(service/sim) on loopback (tests/e2e.py); browser tests drive Debian's ``chromium`` through
Playwright in a worker thread (tests/clients/test_chat_page.py's helpers), terminal tests run
``python -m service chat`` on a pseudo-terminal."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from functools import partial
from typing import Any

import pytest
import trio

from service.settings import Settings
from service.sim.scenario import Reply as SimReply

from ..e2e import e2e
from ..run_ends import run_over
from ..servers import ROOT
from .test_chat_cli import GUARD, _controlling_tty, _env
from .test_chat_page import CHROMIUM, _in_browser, _send
from .test_page_follow_regressions import _pending_elsewhere

playwright = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.slow
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")


# -- a terminal: the raw bytes a client wrote, and what a terminal would show of them ----------

ROWS, COLS = 40, 100  # _env()'s LINES and COLUMNS


class Screen:
    """A minimal VT100: a terminal ROWS x COLS with its scrollback, fed the client's bytes.
    Enough for what rich writes (text, CR, LF, cursor up, erase line, SGR and private modes);
    like a real terminal, the cursor cannot move above the top of the screen, and what
    scrolled off it stays in the scrollback as it was."""

    def __init__(self) -> None:
        self.lines: list[list[str]] = [[]]
        self.row = 0  # absolute (scrollback included)
        self.col = 0

    @property
    def top(self) -> int:
        return max(0, len(self.lines) - ROWS)

    def _line_feed(self) -> None:
        self.row += 1
        if self.row == len(self.lines):
            self.lines.append([])

    def _put(self, ch: str) -> None:
        if self.col >= COLS:
            self.col = 0
            self._line_feed()
        line = self.lines[self.row]
        while len(line) < self.col:
            line.append(" ")
        if self.col < len(line):
            line[self.col] = ch
        else:
            line.append(ch)
        self.col += 1

    def feed(self, text: str) -> None:
        i = 0
        while i < len(text):
            ch = text[i]
            if ch == "\x1b":
                m = re.match(r"\x1b\[([0-?]*)([ -/]*)([@-~])", text[i:])
                if m is None:
                    m = re.match(r"\x1b(\][^\x07\x1b]*(\x07|\x1b\\)|[@-Z\\-_])", text[i:])
                    i += m.end() if m else 1
                    continue
                params, final = m.group(1), m.group(3)
                n = int(params) if params.isdigit() else 1
                if final == "A":
                    self.row = max(self.top, self.row - n)
                elif final == "B":
                    for _ in range(n):
                        self._line_feed()
                elif final == "G":
                    self.col = n - 1
                elif final == "K":
                    line = self.lines[self.row]
                    if params in ("", "0"):
                        del line[self.col:]
                    elif params == "2":
                        line.clear()
                    else:
                        del line[: self.col]
                i += m.end()
                continue
            if ch == "\r":
                self.col = 0
            elif ch == "\n":
                self.col = 0
                self._line_feed()
            elif ch >= " ":
                self._put(ch)
            i += 1

    def text(self) -> list[str]:
        return ["".join(line).rstrip() for line in self.lines]


@asynccontextmanager
async def _pty_chat(*args: str) -> AsyncIterator[tuple[trio.Process, trio.lowlevel.FdStream]]:
    master, slave = os.openpty()
    try:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "service", "chat", *args], cwd=ROOT, env=_env(),
            stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
            preexec_fn=_controlling_tty)
    finally:
        os.close(slave)
    stream = trio.lowlevel.FdStream(master)
    try:
        yield process, stream
    finally:
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(5, shield=True):
            await process.wait()
            await stream.aclose()


async def _read_all(stream: trio.lowlevel.FdStream) -> bytes:
    raw = b""
    with trio.fail_after(GUARD):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:  # EIO: the child closed its end
                return raw
            if not chunk:
                return raw
            raw += chunk


# -- the terminal client ---------------------------------------------------------------------


async def test_cli_a_long_answer_is_shown_once(settings: Settings) -> None:
    """An answer taller than the terminal, streamed on a terminal: rich's Live display
    (``vertical_overflow="visible"``) redraws the whole answer on every token, but can only move
    the cursor back up to the top of the screen; what scrolled off is drawn again and again.
    The user's scrollback holds the answer's first lines many times over."""
    lines = [f"line {i:03d} of the answer" for i in range(60)]
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(SimReply(text="\n\n".join(lines), interval=0.005))
        async with _pty_chat("show me a long answer", "--url", env.server.url) as (proc, master):
            raw = await _read_all(master)
            with trio.fail_after(GUARD):
                status = await proc.wait()
    screen = Screen()
    screen.feed(raw.decode(errors="replace"))
    shown = screen.text()
    assert status == 0, "\n".join(shown)
    counts = {line: sum(1 for s in shown if s.strip() == line) for line in lines}
    twice = {line: n for line, n in counts.items() if n != 1}
    assert not twice, (f"{len(twice)} of {len(lines)} lines are not shown exactly once, e.g. "
                       f"{list(twice.items())[:3]}; the terminal holds {len(shown)} lines")


# -- the chat page -------------------------------------------------------------------------


async def _the_reply(env: Any, conv: str) -> dict[str, Any]:
    messages = (await env.client.get(f"/api/conversations/{conv}")).json()["messages"]
    return [m for m in messages if m["role"] == "assistant"][-1]  # type: ignore[no-any-return]


def _second_tab_session(url: str, run_over: Any, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    page.get_by_test_id("conversation").first.click()  # the run started elsewhere goes on
    answer = page.get_by_test_id("assistant-message").last
    answer.wait_for()
    shown_then = answer.locator(".answer").inner_text()
    run_over()  # the run has ended, its whole answer is stored
    with suppress(AssertionError):  # a fixed page shows it all: bounded either way
        playwright.expect(answer.locator(".answer")).to_have_text(
            re.compile(r"^\s*(tick ){39}tick\s*$"), timeout=5000)
    return {"then": shown_then, "now": answer.locator(".answer").inner_text(),
            "notes": answer.locator(".note").all_inner_texts(),
            "stop_visible": page.get_by_test_id("stop").is_visible(),
            "send_enabled": page.get_by_test_id("send").is_enabled()}


@needs_chromium
async def test_page_a_conversation_opened_mid_run_is_not_shown_as_ended(
    settings: Settings,
) -> None:
    """A second tab (or the page opened again after its tab was closed) opens a conversation
    whose run is still going: the page draws the stored reply (``pending``, its text still in
    the run's events: empty) as an ended, empty answer (no note, no Stop, Send enabled) and
    never follows the run, though it knows the reply's run_id and how to re-join; once the
    run ends and the store has the whole answer, the page still shows nothing."""
    async with e2e(settings, "llamacpp") as env, trio.open_nursery() as nursery:
        env.sim.script(SimReply(text="tick " * 40, interval=0.05))
        conv = await env.conversation(title="elsewhere")
        # A page that started the run, then went away.
        run_id = await _pending_elsewhere(env, nursery, conv)

        def ended() -> None:
            trio.from_thread.run(run_over, env.client, run_id)

        seen = await _in_browser(partial(_second_tab_session, env.server.url, ended))
        stored = await _the_reply(env, conv)
    assert stored["status"] == "complete"
    assert stored["content"].split() == ["tick"] * 40
    assert seen["now"].split() == stored["content"].split(), (
        f"the run ended with 40 ticks stored; the page shows {seen['now'].count('tick')} "
        f"(it showed {seen['then'].count('tick')} when opened), notes {seen['notes']}, "
        f"Stop visible: {seen['stop_visible']}, Send enabled: {seen['send_enabled']}")


def _shutdown_session(url: str, drain: Any, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    answer = _send(page, "slow please")
    playwright.expect(answer).to_contain_text("tick tick tick")
    drain()  # the service shuts down (a deploy, a restart): the run is cut
    playwright.expect(page.get_by_test_id("stop")).to_be_hidden()
    live = answer.locator(".note").all_inner_texts()
    page.reload()
    page.get_by_test_id("conversation").first.click()
    after = page.get_by_test_id("assistant-message").last
    after.wait_for()
    return {"live": live, "reload": after.locator(".note").all_inner_texts(),
            "banner": page.get_by_test_id("error-banner").inner_text()}


@needs_chromium
async def test_page_a_shutdown_is_not_shown_as_the_users_stop(settings: Settings) -> None:
    """The service shuts down mid-answer: the stream says ``shutdown`` ("the service is
    shutting down"), the run ends ``cancelled`` and the store keeps ``error: "shutdown"`` on
    the reply. The page ignores both and says "stopped", exactly what it says after the
    user's own Stop, live and after a reload: the user is never told the answer was cut by
    the service (nor that asking again will do)."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(SimReply(text="tick " * 40, interval=0.05))
        supervisor = env.server.services.require_supervisor()

        def drain() -> None:
            trio.from_thread.run(supervisor.drain, 0.5)

        seen = await _in_browser(partial(_shutdown_session, env.server.url, drain))
        (conv,) = (await env.client.get("/api/conversations")).json()["data"]
        stored = await _the_reply(env, conv["id"])
    assert stored["status"] == "cancelled", stored
    assert stored["error"] == "shutdown", stored
    for when in ("live", "reload"):
        notes = " | ".join(seen[when]) + " | " + seen["banner"]
        assert "shut" in notes.lower(), (
            f"{when}: the page says {seen[when]} (banner {seen['banner']!r}); the store says "
            f"the run was cut by a shutdown")


def _deleted_session(url: str, delete: Any, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    answer = _send(page, "slow please")
    playwright.expect(answer).to_contain_text("tick tick")
    page.goto("about:blank")  # away mid-run; the tab keeps the run it follows
    delete()  # meanwhile (another tab, another client) the conversation is deleted
    page.goto(url + "/")
    banner = page.get_by_test_id("error-banner")
    playwright.expect(banner).to_be_visible()  # this once: fair, the run it followed is gone
    first = banner.inner_text()
    page.reload()
    with suppress(AssertionError):  # a fixed page shows no banner: waits its bound, goes on
        playwright.expect(banner).to_be_visible(timeout=3000)
    return {"first": first, "again": banner.inner_text() if banner.is_visible() else "",
            "live": page.evaluate("sessionStorage.getItem('service.live')")}


@needs_chromium
async def test_page_a_run_that_is_gone_is_not_rejoined_on_every_reload(
    settings: Settings,
) -> None:
    """The tab followed a run whose conversation was then deleted: the re-join fails with a
    404, and the page keeps the run in sessionStorage, so every reload of the tab tries again
    and shows the same error banner, for as long as the tab lives."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(SimReply(text="tick " * 40, interval=0.05))

        async def delete_it() -> None:
            (conv,) = (await env.client.get("/api/conversations")).json()["data"]
            assert (await env.client.delete(f"/api/conversations/{conv['id']}")).status_code == 204

        def delete() -> None:
            trio.from_thread.run(delete_it)

        seen = await _in_browser(partial(_deleted_session, env.server.url, delete))
    assert seen["first"]
    assert not seen["again"], (
        f"after a reload the page shows {seen['again']!r} again (first: {seen['first']!r}); "
        f"sessionStorage still holds {seen['live']}")


def _odd_key_session(url: str, page: Any) -> str:
    page.goto(url + "/")
    banner = page.get_by_test_id("error-banner")
    playwright.expect(banner).to_contain_text("enter a key")
    page.get_by_test_id("key-input").fill("k1\u2019")  # pasted: a typographic quote
    page.get_by_test_id("key-save").click()
    playwright.expect(banner).not_to_contain_text("enter a key")
    playwright.expect(banner).to_be_visible()
    return str(banner.inner_text())


@needs_chromium
async def test_page_a_key_that_cannot_be_sent_is_not_reported_as_an_outage(
    settings: Settings,
) -> None:
    """A key with a character outside Latin-1 cannot go into an Authorization header: fetch()
    throws before sending, and the page reports "cannot reach the service" (and keeps the key,
    so it says so on every load), while the service is up and would answer 401."""
    async with e2e(settings, "llamacpp", api_keys=("k1",)) as env:
        banner = await _in_browser(partial(_odd_key_session, env.server.url))
        assert (await env.client.get("/healthz")).status_code == 200
    assert "cannot reach" not in banner, f"the page says {banner!r}; the service is up"
    assert "key" in banner.lower(), banner
