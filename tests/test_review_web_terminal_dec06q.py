"""An outside review of the chat page (in Debian's chromium, through Playwright) and of the
terminal client (``python -m service chat``), as a demanding user uses them: each test fails on
the tree it was written against because of a real defect, said in its docstring.

The real server on port 0 with the simulated upstream (tests/e2e.py, service/sim); the browser
runs in a worker thread (tests/clients/test_chat_page.py's helpers), the terminal client as a
subprocess."""

from __future__ import annotations

import signal
import subprocess
import sys
from contextlib import suppress
from functools import partial
from typing import Any

import pytest
import trio

from service.settings import Settings
from service.sim.scenario import Reply as SimReply

from .clients.test_chat_cli import _env
from .clients.test_chat_page import CHROMIUM, _in_browser
from .e2e import e2e
from .proxies import port_of, serving
from .run_ends import only_reply, run_over
from .servers import ROOT

playwright = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.slow
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
GUARD = 30


class HeadersOnlyProxy:
    """A TCP proxy on loopback in front of the service: it passes everything, except that the
    answer to the first ``POST .../messages`` is cut right after its response headers (a
    proxy restarting, a Wi-Fi change at that moment): the request reached the service, its
    run goes on (``on_disconnect: continue``), the client saw no event of it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = ""
        self.armed = True
        self.cut = 0

    async def _serve(self, client: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.port)
        except OSError:
            await client.aclose()
            return
        cut_next = trio.Event()
        async with client, upstream, trio.open_nursery() as nursery:

            async def up() -> None:
                try:
                    while data := await client.receive_some(65536):
                        if (self.armed and data.startswith(b"POST /api/conversations/")
                                and b"/messages" in data.split(b"\r\n", 1)[0]):
                            self.armed = False
                            cut_next.set()
                        await upstream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
                nursery.cancel_scope.cancel()

            async def down() -> None:
                buffer = b""
                try:
                    while data := await upstream.receive_some(65536):
                        if cut_next.is_set():
                            buffer += data
                            end = buffer.find(b"\r\n\r\n")
                            if end >= 0:
                                await client.send_all(buffer[: end + 4])
                                self.cut += 1
                                nursery.cancel_scope.cancel()
                                return
                            continue
                        await client.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(up)
            nursery.start_soon(down)


# -- the chat page -----------------------------------------------------------------------------


def _cut_before_start_session(url: str, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    page.get_by_test_id("message-input").fill("tell me the whole story")
    page.get_by_test_id("send").click()
    answer = page.get_by_test_id("assistant-message").first
    # Its end: the answer whole, or the page's note that the stream ended (the defect's).
    whole = ("once upon a time " * 10).strip()
    ended = answer.get_by_test_id("run-error").or_(answer.filter(has_text=whole))
    playwright.expect(ended.first).to_be_visible(timeout=15_000)
    said = answer.get_by_test_id("run-error").all_inner_texts()
    shown = answer.inner_text()
    # The reload the page asked for, when it did.
    page.reload()
    page.wait_for_load_state()
    return {"said": said, "shown": shown,
            "after": page.get_by_test_id("assistant-message").all_inner_texts(),
            "live": page.evaluate("sessionStorage.getItem('service.live')")}


@needs_chromium
async def test_page_a_stream_cut_before_its_first_event_is_followed_to_its_end(
    settings: Settings,
) -> None:
    """What was wrong: the message's POST reached the service and its run started (the page
    asks ``on_disconnect: continue``, so it goes on and its answer is stored), but the
    connection broke right after the response headers, before ``run.started``. The page
    showed the user's message, cleared the input, and said "the stream ended before the run
    did; reload to re-join". The user reloaded: nothing was re-joined, no conversation open,
    the question and its answer not on screen (the run was never kept for a reload,
    ``service.live`` empty); the answer the store holds was nowhere on the page.

    What is right: the page finds the run as the terminal client does (``_find_run``: the
    conversation's last reply, right after this message) and follows it to its end.

    Root cause: service/web/chat.js, ``followEvents`` gave up when ``live.run_id`` was unknown
    and told the user to reload, while ``keep()`` (sessionStorage) is only written once the run
    is known, so ``rejoin()`` after the reload had nothing."""
    async with e2e(settings, "llamacpp") as env, \
            serving(HeadersOnlyProxy(port_of(env.server))) as proxy:
        env.sim.script(SimReply(text="once upon a time " * 10, interval=0.02))
        seen = await _in_browser(partial(_cut_before_start_session, proxy.url))
        reply = await only_reply(env.client)
        await run_over(env.client, reply["run_id"])
        reply = await only_reply(env.client)
    assert proxy.cut == 1
    assert reply["status"] == "complete", reply
    assert seen["said"] == [], seen
    assert seen["shown"].split() == reply["content"].split(), (
        f"the page said {seen['said']!r} and showed {seen['shown']!r}; after the reload it "
        f"shows answers {seen['after']} (kept for a reload: {seen['live']}); the store holds "
        f"the whole answer {reply['content'][:40]!r}...")


def _switch_while_streaming_session(url: str, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    page.get_by_test_id("conversation").filter(has_text="older notes").wait_for()
    page.get_by_test_id("new-conversation").click()
    page.get_by_test_id("message-input").fill("a long story please")
    page.get_by_test_id("send").click()
    answer = page.get_by_test_id("assistant-message").first
    playwright.expect(answer).to_contain_text("tick tick tick")
    # While it streams, the user looks at another conversation.
    page.get_by_test_id("conversation").filter(has_text="older notes").click()
    users = page.get_by_test_id("user-message")
    with suppress(AssertionError):  # a fixed page shows it: bounded either way
        playwright.expect(users.filter(has_text="what did we say about trio?")).to_have_count(
            1, timeout=5000)
    seen = {"users": users.all_inner_texts(),
            "current": page.locator("[aria-current=true]").all_inner_texts(),
            "banner": page.get_by_test_id("error-banner").inner_text(),
            "stop_visible": page.get_by_test_id("stop").is_visible()}
    # Back to the streaming conversation: its reply, still followed, once (not twice).
    before = answer.inner_text().count("tick")
    page.get_by_test_id("conversation").filter(has_text="a long story please").click()
    playwright.expect(page.get_by_test_id("user-message")).to_have_text(["a long story please"])
    replies = page.get_by_test_id("assistant-message")
    playwright.expect(replies).to_have_count(1)
    page.wait_for_function(
        "n => document.querySelector('[data-testid=assistant-message]').innerText"
        ".split('tick').length - 1 > n", arg=before + 5)
    seen["back_stop_visible"] = page.get_by_test_id("stop").is_visible()
    return seen


@needs_chromium
async def test_page_another_conversation_opens_while_an_answer_streams(
    settings: Settings,
) -> None:
    """What was wrong: while the page's own answer streams (a long report: minutes), a click on
    another conversation in the list does nothing at all: no conversation opened, no word
    why, the click swallowed; the "New conversation" button likewise. The user can read
    nothing else until the answer ends or they stop it (and lose the rest of it).

    What is right: the run goes on without the page (the page starts it with
    ``on_disconnect: continue``, and it already follows runs of a conversation opened later:
    ``watch``), so the other conversation opens; going back shows the answer (followed, or as
    stored). At the very least the page says why the click did nothing.

    Root cause: service/web/chat.js, ``openConversation`` returns at once when ``state.run``
    is set (``if (state.run && !own) return;``), and the "New conversation" handler does the
    same (``if (state.run) return;``), with nothing shown."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(SimReply(text="an old answer"), SimReply(text="tick " * 200, interval=0.05))
        older = await env.conversation(title="older notes")
        r = await env.client.post(f"/api/conversations/{older}/messages",
                                  json={"content": "what did we say about trio?"})
        assert r.status_code == 200, r.text
        seen = await _in_browser(partial(_switch_while_streaming_session, env.server.url))
        for conv in (await env.client.get("/api/conversations")).json()["data"]:
            messages = (await env.client.get(f"/api/conversations/{conv['id']}")).json()
            for m in messages["messages"]:
                if m["status"] == "pending":
                    await env.client.post(f"/api/runs/{m['run_id']}/cancel")
    assert seen["back_stop_visible"], seen  # its Stop still the user's
    assert "what did we say about trio?" in seen["users"], (
        f"a click on 'older notes' while an answer streams: the page still shows user "
        f"messages {seen['users']}, marked current {seen['current']}, banner "
        f"{seen['banner']!r}, Stop visible: {seen['stop_visible']}")


# -- the terminal client -----------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM], ids=["SIGHUP", "SIGTERM"])
async def test_cli_a_chat_ended_by_its_terminal_closing_leaves_its_run_going(
    settings: Settings, signum: int,
) -> None:
    """What is wrong: the terminal window is closed mid-answer (SIGHUP), or the client is
    stopped with ``kill`` (SIGTERM): the process dies on the signal's default action, and its
    run, started with ``on_disconnect: continue``, goes on to the end on the model, its whole
    answer stored, shown to nobody (and fed into the conversation's next turn as if the user
    had read it). The client already knows that leaving ends the run: Ctrl-C cancels it, a
    closed output (``| head``) cancels it (exit 141); a closed terminal or a ``kill`` does not.

    What is right: SIGHUP and SIGTERM end the turn as a quit does: the run is cancelled on the
    service (its partial answer stored, as with Ctrl-C), then the client exits.

    Root cause: service/chat.py, ``Client.ask`` opens a signal receiver for SIGINT only; no
    handler for SIGHUP/SIGTERM exists anywhere in the client."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(SimReply(text="tick " * 100, interval=0.05))  # 5 s in all
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "service", "chat", "tell me a long story", "--url",
             env.server.url], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL)
        assert proc.stdout is not None
        shown = b""
        with trio.fail_after(GUARD):
            while shown.count(b"tick") < 5:
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, shown
                shown += chunk
            proc.send_signal(signum)
            while chunk := await proc.stdout.receive_some(4096):
                shown += chunk
            code = await proc.wait()
        reply = await only_reply(env.client)
        run = await run_over(env.client, reply["run_id"])
        reply = await only_reply(env.client)
    assert code == 128 + signum, code  # as a shell reports the signal
    assert run["status"] == "cancelled", (
        f"the client exited {code} on {signal.Signals(signum).name} having shown "
        f"{shown.count(b'tick')} ticks; its run ended {run['status']!r} with "
        f"{reply['content'].count('tick')} ticks stored ({reply['status']})")
