"""A review of the two human clients, the chat page (service/web/chat.js) and the terminal
client (service/chat.py): what a user sees against what the store holds afterwards. Each test
fails on the tree it was written against because of a real defect.

Browser tests drive Debian's ``chromium`` through Playwright in a worker thread
(tests/clients/test_chat_page.py's helpers) against the real server on loopback with the real
simulator behind it (tests/e2e.py); terminal tests drive the real client (a subprocess, or its
``Renderer``/``Client`` in this process against the real server)."""

from __future__ import annotations

import sys
from contextlib import suppress
from functools import partial
from typing import Any

import pytest
import trio

from service.settings import Settings
from service.sim.scenario import Reply as SimReply

from .clients.test_chat_cli import GUARD as CLI_GUARD
from .clients.test_chat_cli import _answers, _chat, _env
from .clients.test_chat_page import CHROMIUM, _in_browser, _send
from .clients.test_page_and_terminal_faults import Screen, _pty_chat, _read_all
from .clients.test_page_follow_regressions import _pending_elsewhere
from .e2e import GUARD, e2e
from .fakes import ScriptedBackend
from .proxies import cuttable, freezable
from .run_ends import replies, run_over
from .servers import ROOT, running_server

playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.slow
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")


_REACT_TURN = "Thought: I know this one without a tool.\nFinal Answer: " + "tick " * 80


# -- the terminal client ---------------------------------------------------------------------


async def _terminal_shows(url: str, tty: bool, *args: str) -> tuple[int, str]:
    """``python -m service chat ARGS --url URL`` to its end: its exit status and what it
    showed (on a pseudo-terminal: the screen, scrollback included; else its stdout)."""
    if not tty:
        done = await _chat(*args, "--url", url)
        return done.returncode, done.stdout.decode()
    async with _pty_chat(*args, "--url", url) as (proc, master):
        raw = await _read_all(master)
        with trio.fail_after(GUARD):
            status = await proc.wait()
    screen = Screen()
    screen.feed(raw.decode(errors="replace"))
    return status, "\n".join(screen.text())


@pytest.mark.parametrize("tty", [True, False], ids=["terminal", "pipe"])
async def test_cli_a_react_answer_cut_short_is_shown_as_stored(
    settings: Settings, tty: bool,
) -> None:
    """A ReAct run (text protocol) times out during its answering turn. The store keeps, as
    docs/api.md says, only what follows the turn's "Final Answer:" label (``answer_so_far``),
    and no ``message`` tells the client so. On a terminal the client's ``Renderer.finished``
    draws its raw segment as the answer: the user reads "Thought: I know this one ...
    Final Answer: tick ..." where the store says the reply is "tick ...". In a pipe a
    non-chat agent's tokens are held back (``_stream_tokens``) and ``finished`` draws the
    held segment only on a terminal: stdout gets nothing at all of the partial answer the
    store keeps. (A Ctrl-C, a failure or a turn cut while still a thought do the same.)"""
    async with e2e(settings, "llamacpp", run_timeout=1.5) as env:
        env.sim.script(SimReply(text=_REACT_TURN, interval=0.05))
        status, shown = await _terminal_shows(env.server.url, tty, "how many ticks?",
                                              "--agent", "react")
        (conv,) = (await env.client.get("/api/conversations")).json()["data"]
        (stored,) = await replies(env.client, conv["id"])
    assert stored["status"] == "cancelled", stored  # (a timed-out reply)
    assert stored["content"].startswith("tick"), stored
    assert status == 1, shown
    answer = [w for w in shown.split() if w == "tick" or w.startswith(("Thought", "Answer"))]
    assert answer == stored["content"].split(), (
        f"the store keeps the cut reply {stored['content'][:30]!r}... "
        f"({len(stored['content'].split())} ticks); the client showed:\n{shown[-600:]}")


async def test_cli_a_line_that_is_not_utf8_does_not_kill_the_chat(settings: Settings) -> None:
    """A line of input that is not UTF-8 (a Latin-1 file piped in, a terminal in another
    encoding: "caf\\xe9"): Python reads it with ``surrogateescape`` (a lone surrogate,
    U+DCE9), the client hands it to httpx as JSON, and httpx's ``.encode("utf-8")`` raises
    UnicodeEncodeError. ``_run_turn`` catches only ChatError and httpx.HTTPError: the whole
    chat dies with a Python traceback, and the lines after it are never asked, though the
    service takes such text (the store keeps a lone surrogate as U+FFFD). The same line as
    a one-shot argument does the same."""
    async with running_server(settings, ScriptedBackend(_answers)) as srv, \
            srv.client() as client:
        with trio.fail_after(CLI_GUARD):
            done = await trio.run_process(
                [sys.executable, "-m", "service", "chat", "--url", srv.url], cwd=ROOT,
                env=_env(), stdin=b"caf\xe9 au lait\nhello after\n", capture_stdout=True,
                capture_stderr=True, check=False)
        convs = (await client.get("/api/conversations")).json()["data"]
    out, err = done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")
    assert "Traceback" not in err, f"exit {done.returncode}; stderr ends:\n{err[-700:]}"
    assert "**echo**: hello after" in out, (out, err[-300:], convs)


async def test_cli_a_dropped_stream_rejoins_the_run(settings: Settings) -> None:
    """The terminal's stream drops mid-answer (a Wi-Fi change, a proxy restart) while the
    service is fine. The page posts ``on_disconnect: "continue"`` and re-joins with
    ``Last-Event-ID``; the terminal client posts the default ``cancel`` and has no re-join:
    the drop cancels the run on the server ("client disconnected"), the client says
    "cannot reach the service" (it can: the next request goes through) and exits 1 with
    half an answer. The answer the user asked for is lost for a blip the service's re-join
    exists for."""
    async with e2e(settings, "llamacpp") as env, cuttable(env.server) as proxy, \
            trio.open_nursery() as nursery:
        env.sim.script(SimReply(text="tick " * 60, interval=0.05))  # 3 s
        result: list[Any] = []

        async def one_shot() -> None:
            result.append(await _chat("count ticks", "--url", proxy.url))

        nursery.start_soon(one_shot)
        with trio.fail_after(GUARD):
            while not (convs := (await env.client.get("/api/conversations")).json()["data"]):  # noqa: ASYNC110
                await trio.sleep(0.05)
        await trio.sleep(1.0)  # mid-answer
        proxy.cut()
        with trio.fail_after(CLI_GUARD):
            while not result:  # noqa: ASYNC110
                await trio.sleep(0.05)
        conv = convs[0]["id"]
        with trio.fail_after(GUARD):
            while (await replies(env.client, conv))[-1]["status"] == "pending":  # noqa: ASYNC110
                await trio.sleep(0.05)
        (stored,) = await replies(env.client, conv)
    done = result[0]
    shown = done.stdout.decode()
    assert stored["status"] == "complete", (
        f"the drop cancelled the run: stored {stored['status']} ({stored.get('error')}), "
        f"{len(stored['content'].split())} of 60 ticks; the client exited {done.returncode} "
        f"saying {done.stderr.decode().strip()!r}")
    assert shown.split() == stored["content"].split(), shown


# -- the chat page -------------------------------------------------------------------------


def _watched_drop_session(url: str, cut: Any, stop_it: Any, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    page.get_by_test_id("conversation").filter(has_text="elsewhere").click()
    answer = page.get_by_test_id("assistant-message").last
    playwright.expect(answer).to_contain_text("tick tick tick tick")
    cut()  # the Wi-Fi changes: the page's stream of the watched run drops
    page.wait_for_timeout(1500)  # the page has re-joined (after 0.5 s)
    during = answer.locator(".answer").inner_text()
    stop_it()  # the run's starter presses Stop
    playwright.expect(answer.get_by_test_id("run-note")).to_be_visible()  # its end was shown
    return {"text": answer.locator(".answer").inner_text(), "during": during,
            "notes": answer.locator(".note").all_inner_texts()}


@needs_chromium
async def test_page_a_watched_reply_rejoins_without_repeating_its_tokens(
    settings: Settings,
) -> None:
    """The page opens a conversation whose reply another client's run is still writing and
    follows it (``watch``). Its stream drops (a network change): ``followRun`` re-joins with
    ``Last-Event-ID: live.last_id``, but ``follow`` only updates ``live.last_id`` when
    ``!live.watch``, so a watched run is always re-joined from 0: every event so far is
    replayed and appended to the text already on screen: the user sees the reply's first
    part twice for the rest of the run. A run that succeeds heals it (its ``message``
    replaces the text); one that is stopped, fails or times out has no ``message``, and the
    page keeps showing more text than the stored reply holds, with a note saying it ended."""
    async with e2e(settings, "llamacpp") as env, trio.open_nursery() as nursery, \
            cuttable(env.server) as proxy:
        env.sim.script(SimReply(text="tick " * 80, interval=0.05))  # 4 s
        conv = await env.conversation(title="elsewhere")
        run_id = await _pending_elsewhere(env, nursery, conv)

        def cut() -> None:
            trio.from_thread.run_sync(proxy.cut)

        async def cancel() -> None:
            assert (await env.client.post(f"/api/runs/{run_id}/cancel")).status_code == 202
            await run_over(env.client, run_id)

        def stop_it() -> None:
            trio.from_thread.run(cancel)

        seen = await _in_browser(partial(_watched_drop_session, proxy.url, cut, stop_it))
        (stored,) = await replies(env.client, conv)
    assert stored["status"] == "cancelled", stored
    n = len(stored["content"].split())
    assert 0 < n < 80, stored
    assert seen["text"].split() == stored["content"].split(), (
        f"the store holds the cancelled reply's {n} ticks; the page shows "
        f"{seen['text'].count('tick')} (notes {seen['notes']}; "
        f"{seen['during'].count('tick')} shown just after the re-join)")


def _react_stop_session(url: str, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    page.get_by_test_id("agent-picker").select_option("react")
    answer = _send(page, "how many ticks?")
    playwright.expect(answer).to_contain_text("tick tick tick tick")
    page.get_by_test_id("stop").click()
    playwright.expect(answer.get_by_test_id("run-note")).to_have_text("stopped")
    live = answer.locator(".answer").inner_text()
    page.reload()
    page.get_by_test_id("conversation").first.click()
    again = page.get_by_test_id("assistant-message").last
    playwright.expect(again.get_by_test_id("run-note")).to_have_text("stopped")
    return {"live": live, "reload": again.locator(".answer").inner_text(),
            "steps": answer.get_by_test_id("steps").locator("li").all_text_contents()}


@needs_chromium
async def test_page_a_stopped_react_answer_is_shown_as_stored(settings: Settings) -> None:
    """A ReAct run (text protocol) is stopped during its answering turn. Its tokens are the
    model's raw turn, "Thought: ...\nFinal Answer: tick tick ...": the page draws them as the
    answer, and since a stopped run sends no ``message`` nothing ever replaces them. The
    store keeps, as docs/api.md says, only what follows "Final Answer:" (``answer_so_far``).
    Live, the page shows the user a reply that starts "Thought: I know this one ... Final
    Answer:"; a reload shows the stored one, without them: the page contradicts the store
    (and itself). The same happens to a run that fails or times out mid-turn, and to a
    turn cut while still a thought/action, whose stored reply is empty."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(SimReply(text=_REACT_TURN, interval=0.05))
        seen = await _in_browser(partial(_react_stop_session, env.server.url))
        (conv,) = (await env.client.get("/api/conversations")).json()["data"]
        (stored,) = await replies(env.client, conv["id"])
    assert stored["status"] == "cancelled", stored
    assert stored["content"].startswith("tick"), stored
    assert seen["reload"].split() == stored["content"].split()  # a reload shows the store
    assert seen["live"].split() == stored["content"].split(), (
        f"live, after Stop, the page's answer is {seen['live'][:70]!r}...; the stored reply "
        f"(and the page after a reload) is {stored['content'][:40]!r}...")


KEEPALIVE = 1.0  # SERVICE_SSE_KEEPALIVE for the test; X-Keepalive-Interval says so


def _silent_session(url: str, freeze: Any, run_over: Any, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    answer = _send(page, "tell me")
    playwright.expect(answer).to_contain_text("tick tick tick")
    freeze()  # the stream goes silent: no tokens, no keep-alives, no FIN
    run_over()
    # Four missed keep-alives is "a service that stopped answering" (docs/api.md): a page
    # that notices re-joins (new connections pass) or says so. Allowed: 10 of them.
    with suppress(AssertionError):
        playwright.expect(page.get_by_test_id("stop")).to_be_hidden(
            timeout=int(10 * KEEPALIVE * 1000))
    return {"text": answer.locator(".answer").inner_text(),
            "notes": answer.locator(".note").all_inner_texts(),
            "banner": page.get_by_test_id("error-banner").inner_text(),
            "stop_visible": page.get_by_test_id("stop").is_visible()}


@needs_chromium
async def test_page_a_stream_gone_silent_is_noticed(settings: Settings) -> None:
    """The page's stream goes silent mid-answer without being closed (a laptop lid closed
    and opened, a NAT that forgot the connection, a wedged proxy): no tokens and none of the
    service's keep-alives (every ``X-Keepalive-Interval`` seconds, "a few of them missed is a
    service that stopped answering", docs/api.md) arrive. ``sseFrames`` waits on
    ``reader.read()`` with no watchdog (the terminal client has one), so the page hangs
    silently for ever: the half answer, Stop still offered, no note, no re-join, while the
    run has long ended and the store holds the whole answer."""
    async with e2e(settings, "llamacpp", sse_keepalive=KEEPALIVE) as env, \
            freezable(env.server) as proxy:
        env.sim.script(SimReply(text="tick " * 60, interval=0.05))  # 3 s

        def freeze() -> None:
            trio.from_thread.run_sync(proxy.freeze)

        async def all_over() -> None:
            (conv,) = (await env.client.get("/api/conversations")).json()["data"]
            with trio.fail_after(GUARD):
                while (await replies(env.client, conv["id"]))[-1]["status"] == "pending":  # noqa: ASYNC110
                    await trio.sleep(0.05)

        def ended() -> None:
            trio.from_thread.run(all_over)

        seen = await _in_browser(partial(_silent_session, proxy.url, freeze, ended))
        (conv,) = (await env.client.get("/api/conversations")).json()["data"]
        (stored,) = await replies(env.client, conv["id"])
    assert stored["status"] == "complete", stored
    told = seen["notes"] or seen["banner"].strip()
    assert told or seen["text"].split() == stored["content"].split(), (
        f"{10 * KEEPALIVE:g} s after the stream went silent (keep-alive every {KEEPALIVE:g} s) "
        f"the page still shows {seen['text'].count('tick')} of the stored "
        f"{len(stored['content'].split())} ticks, Stop visible: {seen['stop_visible']}, "
        f"no note, no banner")

