"""The clients people use directly, under faults found by a review (each test failed before
its fix): the chat page at ``/`` and ``python -m service chat``.

Browser tests reuse tests/clients/test_chat_page.py's helpers (Debian's ``chromium`` through
Playwright in a worker thread while trio serves the real app); terminal tests run the client as
a user does (a subprocess; a pseudo-terminal that is its controlling terminal)."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from io import StringIO
from typing import Any

import httpx
import pytest
import trio
from rich.console import Console

from service import chat
from service.backends.base import ChatRequest
from service.errors import StoreUnavailable
from service.settings import Settings

from ..fakes import Reply, ScriptedBackend
from ..proxies import cuttable
from ..servers import ROOT, RunningServer, running_server
from .test_chat_cli import GUARD, _chat, _controlling_tty, _env
from .test_chat_page import CHROMIUM, _answers, _in_browser, _send

playwright = pytest.importorskip("playwright.sync_api")


# -- helpers ---------------------------------------------------------------------------------


async def _conversation(client: httpx.AsyncClient) -> dict[str, Any]:
    (conv,) = (await client.get("/api/conversations")).json()["data"]
    return (await client.get(f"/api/conversations/{conv['id']}")).json()  # type: ignore[no-any-return]


async def _wait_run_over(client: httpx.AsyncClient, srv: RunningServer, run_id: str) -> str:
    with trio.fail_after(GUARD):
        while True:
            status = (await client.get(f"/api/runs/{run_id}")).json()["status"]
            if (status not in ("queued", "running")
                    and srv.services.require_supervisor().get(run_id) is None):
                return str(status)
            await trio.sleep(0.05)


# -- the chat page ---------------------------------------------------------------------------


def _stop_early_session(url: str, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    page.get_by_test_id("message-input").fill("slow please")
    page.get_by_test_id("send").click()
    stop = page.get_by_test_id("stop")
    playwright.expect(stop).to_be_visible()  # offered at once, before the run is known
    stop.click()
    answer = page.get_by_test_id("assistant-message").last
    answer.wait_for()
    playwright.expect(stop).to_be_hidden()  # the run is over
    return {"text": answer.inner_text()}


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
async def test_page_stop_clicked_before_run_started_cancels_the_run(settings: Settings) -> None:
    """Stop is shown (and enabled) while the run is "starting", but a click then is dropped:
    the run goes on to the end and the store says ``succeeded``."""
    async with running_server(settings, ScriptedBackend(_answers)) as srv, \
            srv.client() as client:
        supervisor = srv.services.require_supervisor()
        start = supervisor.start

        async def slow_start(spec: Any) -> Any:  # a slow first write (a busy store)
            await trio.sleep(1.5)
            return await start(spec)

        supervisor.start = slow_start  # type: ignore[method-assign]
        seen = await _in_browser(partial(_stop_early_session, srv.url))
        conv = await _conversation(client)
        (reply,) = [m for m in conv["messages"] if m["role"] == "assistant"]
        status = await _wait_run_over(client, srv, reply["run_id"])
    assert status == "cancelled", (
        f"Stop was clicked, the page showed {seen['text'].count('tick')} ticks, "
        f"the store says the run {status}")


def _error_frame_session(url: str, outage: Callable[[bool], None], page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    answer = _send(page, "slow please")
    playwright.expect(answer).to_contain_text("tick tick tick")
    page.goto("about:blank")  # away mid-run (on_disconnect: continue: the run goes on)
    outage(True)  # the run has ended; the store cannot be read now
    rejoins: list[str] = []
    page.on("requestfinished", lambda r: rejoins.append(r.url) if "/events" in r.url else None)
    page.goto(url + "/")  # back: re-joins, and the service answers with an error frame
    note = page.get_by_test_id("run-error").last
    note.wait_for()
    # The page re-joins again, and is answered the same way (each after the reader's own
    # retries, ~10 s): said once, not once per re-join.
    for _ in range(60):
        if len(rejoins) >= 2:
            break
        page.wait_for_timeout(500)
    shown = {"note": note.inner_text(), "banner": page.get_by_test_id("error-banner").inner_text(),
             "notes": page.get_by_test_id("run-error").all_inner_texts(),
             "rejoins": len(rejoins)}
    outage(False)  # the store is back: the page re-joins, or a reload (as it says) does
    answers = page.get_by_test_id("assistant-message").locator(".answer")
    page.wait_for_timeout(3000)
    if answers.count() == 0 or answers.last.inner_text().split() != ["tick"] * 40:
        page.reload()
        page.wait_for_timeout(3000)
    shown["after_reload"] = answers.all_inner_texts()
    return shown


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
async def test_page_error_frame_on_rejoin_is_shown_and_reload_rejoins(settings: Settings) -> None:
    """When the store fails while a re-join re-reads it, the service ends the stream with an
    ``error`` frame and no ``run.finished`` ("the client may re-join later"). The page drops
    that error, says "reload to re-join", and forgets the run, so a reload shows nothing."""
    async with running_server(settings, ScriptedBackend(_answers)) as srv, \
            srv.client() as client:
        store = srv.services.require_store()

        def unavailable(op: str) -> None:  # the run's events cannot be read
            if op in ("list_run_events", "list_events_of_runs"):
                raise StoreUnavailable("the database is away")

        async def set_outage(on: bool) -> None:
            if on:
                conv = await _conversation(client)
                (reply,) = [m for m in conv["messages"] if m["role"] == "assistant"]
                await _wait_run_over(client, srv, reply["run_id"])
            store.faults.before_read = unavailable if on else None

        def outage(on: bool) -> None:
            trio.from_thread.run(set_outage, on)

        seen = await _in_browser(partial(_error_frame_session, srv.url, outage))
    shown = f"{seen['note']} | {seen['banner']}"
    assert "store" in shown.lower(), f"the store's error is not shown: {shown!r}"
    notes = seen["notes"]
    assert seen["rejoins"] >= 2, seen
    assert len(notes) == len(set(notes)), f"the same note shown again and again: {notes}"
    assert [a.split() for a in seen["after_reload"]][-1:] == [["tick"] * 40], seen["after_reload"]


def _dropped_session(url: str, cut: Callable[[], None], page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    answer = _send(page, "slow please")
    playwright.expect(answer).to_contain_text("tick tick tick")
    cut()  # the connection drops mid-run; the run goes on (on_disconnect: continue)
    page.wait_for_timeout(4000)  # the run (2 s in all) has ended by now
    return {"text": answer.inner_text(),
            "banner": page.get_by_test_id("error-banner").inner_text()}


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
async def test_page_dropped_connection_rejoins_with_last_event_id(settings: Settings) -> None:
    """A dropped stream ends the page's following with a bare "network error" and a cut
    answer, while the run goes on and the store gets all of it."""
    async with running_server(settings, ScriptedBackend(_answers)) as srv, \
            srv.client() as client, cuttable(srv) as proxy:

        def cut() -> None:
            trio.from_thread.run_sync(proxy.cut)

        seen = await _in_browser(partial(_dropped_session, proxy.url, cut))
        conv = await _conversation(client)
        (reply,) = [m for m in conv["messages"] if m["role"] == "assistant"]
    assert reply["content"].split() == ["tick"] * 40  # the store has it all
    assert seen["text"].split() == ["tick"] * 40, (
        f"the page shows {seen['text'].count('tick')} of 40 ticks; banner: {seen['banner']!r}")


def _refused_session(url: str, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    page.get_by_test_id("message-input").fill("hello there")
    page.get_by_test_id("send").click()
    banner = page.get_by_test_id("error-banner")
    playwright.expect(banner).to_be_visible()
    playwright.expect(page.get_by_test_id("send")).to_be_enabled()
    return {"banner": banner.inner_text(),
            "users": page.get_by_test_id("user-message").all_inner_texts(),
            "input": page.get_by_test_id("message-input").input_value()}


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
async def test_page_refused_run_shows_no_message_the_store_lacks(settings: Settings) -> None:
    """A 429 (too many runs): the page shows the question as sent, and clears what was typed,
    though the service refused it and the store has no such message."""
    busy = settings.model_copy(update={"max_runs": 1})
    async with running_server(busy, ScriptedBackend(_answers)) as srv, \
            srv.client() as client, trio.open_nursery() as nursery:
        other = (await client.post("/api/conversations", json={"title": "other"})).json()["id"]
        started = trio.Event()

        async def hold_the_only_slot() -> None:
            async with client.stream("POST", f"/api/conversations/{other}/messages",
                                     json={"content": "long story", "stream": True}) as resp:
                async for _ in resp.aiter_lines():
                    started.set()

        nursery.start_soon(hold_the_only_slot)
        await started.wait()
        seen = await _in_browser(partial(_refused_session, srv.url))
        convs = (await client.get("/api/conversations")).json()["data"]
        (mine,) = [c for c in convs if c["id"] != other]
        stored = (await client.get(f"/api/conversations/{mine['id']}")).json()["messages"]
        nursery.cancel_scope.cancel()
    assert "too_many_runs" in seen["banner"] or "runs in flight" in seen["banner"]
    assert seen["users"] == [m["content"] for m in stored if m["role"] == "user"], (
        f"the page shows {seen['users']}, the store has {stored}; input now {seen['input']!r}")


# -- the terminal client ---------------------------------------------------------------------


class RawTerminal:
    """The client on a pseudo-terminal, keeping the raw bytes it wrote (escape codes too)."""

    def __init__(self, process: trio.Process, master: trio.lowlevel.FdStream) -> None:
        self.process, self.master, self.raw = process, master, b""

    @property
    def screen(self) -> str:
        return re.sub(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-Z\\-_])", "",
                      self.raw.decode(errors="replace"))

    async def type(self, keys: str) -> None:
        await self.master.send_all(keys.encode())

    async def wait_for(self, pattern: str, *, after: int = 0, within: float = GUARD) -> int:
        with trio.move_on_after(within):
            while (found := re.search(pattern, self.screen[after:])) is None:
                try:
                    chunk = await self.master.receive_some(65536)
                except trio.BrokenResourceError:
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"{pattern!r} never showed:\n{self.screen}")
                self.raw += chunk
            return after + found.end()
        raise AssertionError(f"{pattern!r} did not show in {within} s:\n{self.screen}")

    async def drain(self) -> None:
        with trio.move_on_after(GUARD):
            while True:
                try:
                    chunk = await self.master.receive_some(65536)
                except trio.BrokenResourceError:
                    return
                if not chunk:
                    return
                self.raw += chunk


@asynccontextmanager
async def _raw_terminal(url: str) -> AsyncIterator[RawTerminal]:
    master, slave = os.openpty()
    try:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "service", "chat", "--url", url], cwd=ROOT, env=_env(),
            stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
            preexec_fn=_controlling_tty)
    finally:
        os.close(slave)
    stream = trio.lowlevel.FdStream(master)
    try:
        yield RawTerminal(process, stream)
    finally:
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(5, shield=True):
            await process.wait()
            await stream.aclose()


_OSC_TITLE = "\x1b]0;PWNED\x1b\\"  # sets the terminal's window title
_CLEAR = "\x1b[2J"  # clears the screen


def _hostile(req: ChatRequest) -> Reply:
    q = req.messages[-1].content
    if q.startswith("escape"):
        return Reply(f"safe {_OSC_TITLE}text {_CLEAR}done",
                     thinking=[f"thinking {_OSC_TITLE.replace('PWNED', 'THOUGHT')}"])
    return _answers(req)


@pytest.mark.slow
async def test_cli_model_text_cannot_drive_the_terminal(settings: Settings) -> None:
    """Model text (answer and thoughts) goes to the terminal with its escape sequences:
    rich passes ESC through, so a model (or a prompt injection in a tool's output) can set the
    window title, clear the screen, or make the terminal answer into the client's input."""
    async with running_server(settings, ScriptedBackend(_hostile)) as srv, \
            _raw_terminal(srv.url) as term:
        at = await term.wait_for(r"you> ")
        await term.type("escape please\r")
        at = await term.wait_for(r"done", after=at)
        await term.wait_for(r"you> ", after=at)
        await term.type("\x04")
        with trio.fail_after(GUARD):
            await term.process.wait()
    assert b"\x1b]0;THOUGHT" not in term.raw, "a thought's OSC sequence reached the terminal"
    assert b"\x1b]0;PWNED" not in term.raw, "the answer's OSC sequence reached the terminal"
    assert _CLEAR.encode() not in term.raw, "the answer's clear-screen reached the terminal"


@pytest.mark.slow
async def test_cli_second_ctrl_c_leaves_the_cursor_visible(settings: Settings) -> None:
    """The second Ctrl-C exits 130 with rich's Live display still started: the cursor it hid
    (ESC [?25l) is never shown again, the user's shell is left without a cursor."""
    async with running_server(settings, ScriptedBackend(_answers)) as srv, \
            _raw_terminal(srv.url) as term:
        at = await term.wait_for(r"you> ")
        await term.type("slow again\r")
        at = await term.wait_for(r"tick tick", after=at)
        await term.type("\x03")
        await term.wait_for(r"Ctrl-C again to quit", after=at)
        await term.type("\x03")
        with trio.fail_after(GUARD):
            assert await term.process.wait() == 130
        await term.drain()
    hidden, shown = term.raw.rfind(b"\x1b[?25l"), term.raw.rfind(b"\x1b[?25h")
    assert hidden >= 0  # the live answer hid it
    assert shown > hidden, "the client exited with the terminal's cursor hidden"


@pytest.mark.slow
async def test_cli_dropped_stream_leaves_no_stale_answer(settings: Settings) -> None:
    """A stream that breaks mid-answer, and stays unreachable through the client's re-joins,
    is reported and the chat goes on, but the renderer kept the dead turn's live display and
    text: the next answer was drawn after the old partial one, and the cursor stayed hidden
    at the prompt."""
    async with running_server(settings, ScriptedBackend(_answers)) as srv, \
            cuttable(srv) as proxy, _raw_terminal(proxy.url) as term:
        at = await term.wait_for(r"you> ")
        await term.type("slow please\r")
        at = await term.wait_for(r"tick tick", after=at)
        proxy.cut(refuse=True)
        # (The client re-joins for 30 s without a word from the service, then says so.)
        at = await term.wait_for(r"cannot reach the service", after=at, within=2 * GUARD)
        at = await term.wait_for(r"you> ", after=at)
        proxy.refusing = False
        raw_at = len(term.raw)
        await term.type("hello\r")
        end = await term.wait_for(r"echo: hello", after=at)
        await term.wait_for(r"you> ", after=end)
        second_turn = term.screen[at:end]
        await term.type("\x04")
        with trio.fail_after(GUARD):
            await term.process.wait()
    assert "tick" not in second_turn, f"the dead turn's answer is drawn again:\n{second_turn}"
    assert term.raw.rfind(b"\x1b[?25h", 0, raw_at) > term.raw.rfind(b"\x1b[?25l", 0, raw_at)


# A service that ends a run's stream with an error frame and no run.finished, as
# service/api/runs.py's _event_stream does when the store fails while the stream re-reads it.
_ERROR_FRAME_STREAM = (
    b'id: 1\nevent: run.started\ndata: {"run_id":"run_1","conversation_id":"conv_1",'
    b'"agent":"chat","model":"m"}\n\n'
    b'id: 2\nevent: token\ndata: {"text":"partial "}\n\n'
    b'event: error\ndata: {"type":"store_unavailable","message":"the store cannot be read"}\n\n'
)


async def _serve_error_frame(stream: trio.SocketStream) -> None:
    async with stream:
        data = b""
        while b"\r\n\r\n" not in data:
            if not (chunk := await stream.receive_some(65536)):
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(m.group(1)) if (m := re.search(rb"(?i)content-length: *(\d+)", head)) else 0
        while len(body) < length:
            body += await stream.receive_some(65536)
        if head.startswith(b"POST /api/conversations/conv_1/messages"):
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                  b"Connection: close\r\n\r\n" + _ERROR_FRAME_STREAM)
        else:
            out = b'{"id": "conv_1"}'
            await stream.send_all(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                                  b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(out)
                                  + out)


@pytest.mark.slow
async def test_cli_reports_an_error_frame_that_ends_the_stream() -> None:
    """The stream ends with ``error`` and no ``run.finished``: the client exits 1 with nothing
    on stderr (the error is kept in the turn and never shown)."""
    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, _serve_error_frame, 0,
                                                  host="127.0.0.1"))
        url = f"http://127.0.0.1:{listener.socket.getsockname()[1]}"
        out = await _chat("hello", "--url", url)
        nursery.cancel_scope.cancel()
    assert out.returncode == 1
    assert b"store_unavailable" in out.stderr, (
        f"exit {out.returncode}, stdout {out.stdout!r}, stderr {out.stderr!r}")


def _drain_session(url: str, drain: Callable[[], None], page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    answer = _send(page, "long story")
    playwright.expect(answer).to_contain_text("tick tick tick")
    drain()  # the service shuts down (SIGTERM): a "shutdown" event, then the run is cancelled
    playwright.expect(page.get_by_test_id("stop")).to_be_hidden()
    return {"answer": answer.locator(".answer").inner_text(),
            "steps": answer.get_by_test_id("steps").locator("li").all_text_contents(),
            "notes": answer.locator(".note").all_inner_texts()}


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
async def test_page_shutdown_event_keeps_the_answer(settings: Settings) -> None:
    """A ``shutdown`` event (docs/api.md; also ``queued`` and ``decision``) is taken for a step:
    the answer so far is moved into the folded steps with a bogus "step undefined done", and
    the answer shown is only what came after, while the store keeps all of it."""
    async with running_server(settings, ScriptedBackend(_answers)) as srv, \
            srv.client() as client:
        supervisor = srv.services.require_supervisor()

        def drain() -> None:
            trio.from_thread.run(supervisor.drain, 0.5)

        seen = await _in_browser(partial(_drain_session, srv.url, drain))
        conv = await _conversation(client)
    (reply,) = [m for m in conv["messages"] if m["role"] == "assistant"]
    assert "step undefined done" not in seen["steps"], seen
    assert seen["answer"].split() == reply["content"].split(), (
        f"the page shows {seen['answer'].count('tick')} ticks as the answer, the store "
        f"{reply['content'].count('tick')}; steps: {seen['steps']}")


# -- the terminal client: the service's error text ------------------------------------------

_ESC = "\x1b]0;PWNED\x1b\\\x1b[2J"  # sets the window title, clears the screen


def _run_chat_turn(monkeypatch: pytest.MonkeyPatch,
                   handler: Any) -> tuple[int, str]:
    def http(opts: chat.Options) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=opts.url, transport=httpx.MockTransport(handler))

    monkeypatch.setattr(chat, "_http", http)
    out, err = StringIO(), StringIO()
    renderer = chat.Renderer(Console(file=out, force_terminal=True, color_system=None),
                             Console(file=err, force_terminal=True, color_system=None))
    opts = chat.Options(url="http://svc", key=None, agent=None, model=None,
                        conversation="conv_1", message="hi")
    _, _, status = chat._run_turn(opts, renderer, "conv_1", "hi")
    return status, out.getvalue() + err.getvalue()


def test_cli_error_text_from_the_service_cannot_drive_the_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fix strips control characters from model text and run errors, but a failed
    request's error (``_error_of`` -> ``_report``) goes to the terminal as the service wrote
    it: rich passes ESC through."""
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"error": {
            "type": "backend_error", "message": f"upstream said: {_ESC}bye"}})

    status, shown = _run_chat_turn(monkeypatch, handler)
    assert status == 1
    assert "upstream said" in shown
    assert "\x1b" not in shown, repr(shown)


def test_cli_error_frame_text_cannot_drive_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream ending on an error frame (no run.finished) is reported with the frame's
    message, unfiltered."""
    error = json.dumps({"type": "backend_error", "message": f"upstream said: {_ESC}bye"})
    stream = (
        'id: 1\nevent: run.started\ndata: {"run_id":"run_1","conversation_id":"conv_1",'
        '"agent":"chat","model":"m"}\n\n'
        f"event: error\ndata: {error}\n\n"
    )

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                              content=stream.encode())

    status, shown = _run_chat_turn(monkeypatch, handler)
    assert status == 1
    assert "upstream said" in shown
    assert "\x1b" not in shown, repr(shown)


def test_cli_says_why_a_run_it_did_not_cancel_was_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run cut by the service's shutdown was shown as a bare "[run cancelled]", as the
    user's own Ctrl-C is (found by the clients review, with the page's twin)."""
    stream = (
        'id: 1\nevent: run.started\ndata: {"run_id":"run_1","conversation_id":"conv_1",'
        '"agent":"chat","model":"m"}\n\n'
        'id: 2\nevent: token\ndata: {"text":"par"}\n\n'
        'id: 3\nevent: run.finished\ndata: {"status":"cancelled","usage":{},'
        '"error":"shutdown"}\n\n'
    )

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                              content=stream.encode())

    _, shown = _run_chat_turn(monkeypatch, handler)
    assert "[run cancelled: shutdown]" in shown, shown
