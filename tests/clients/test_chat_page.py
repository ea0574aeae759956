"""The chat page at ``/`` in a real browser (issue 15, item 5), and browsers on another origin
(items 1-3): Playwright for Python drives Debian's ``chromium`` package (Playwright's own
browser download cannot work on these machines; ``.ci/run`` installs it with apt-get). The
browser runs in a worker thread (Playwright's sync API) while trio serves the real app."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import Any, TypeVar

import pytest
import trio

from service.backends.base import ChatRequest
from service.settings import Settings
from service.store import MessageStatus

from ..fakes import Reply, ScriptedBackend
from ..servers import ROOT, running_server

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")]

T = TypeVar("T")
WAIT_MS = 20_000
# README's screenshot: SERVICE_TEST_SCREENSHOT=docs/chat.png pytest tests/clients/test_chat_page.py
SCREENSHOT = os.environ.get("SERVICE_TEST_SCREENSHOT")


def _answers(req: ChatRequest) -> Reply:
    q = req.messages[-1].content
    if q.startswith("long"):
        return Reply("tick " * 400, gap=0.05)  # 20 s: stopped long before
    if q.startswith("slow"):
        return Reply("tick " * 40, gap=0.05)  # 2 s: a reload comes in the middle
    if q.startswith("fail"):
        return Reply("", fail_after=0, error=RuntimeError("boom"))
    if q.startswith("think"):
        return Reply("Here:\n\n- one\n- `two`", thinking=["pondering deeply"])
    return Reply(f"**echo**: {q}")


@contextmanager
def _browser() -> Iterator[Any]:
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser.new_page(viewport={"width": 1100, "height": 700})
        finally:
            browser.close()


async def _in_browser(fn: Callable[[Any], T]) -> T:
    def session() -> T:
        with _browser() as page:
            page.set_default_timeout(WAIT_MS)
            return fn(page)

    return await trio.to_thread.run_sync(session)


def _send(page: Any, text: str) -> Any:
    """Type and send; the new answer's element."""
    answers = page.get_by_test_id("assistant-message")
    before = answers.count()
    page.get_by_test_id("message-input").fill(text)
    page.get_by_test_id("send").click()
    answers.nth(before).wait_for()
    return answers.nth(before)


def _chat_session(url: str, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    first = _send(page, "hello")
    playwright.expect(first.locator("strong")).to_have_text("echo")  # Markdown, rendered
    playwright.expect(first).to_contain_text("echo: hello")
    think = _send(page, "think first")
    playwright.expect(think.locator("li code")).to_have_text("two")
    steps = think.get_by_test_id("steps")
    playwright.expect(steps).to_contain_text("pondering deeply")
    assert steps.get_attribute("open") is None  # folded
    failed = _send(page, "fail now")
    playwright.expect(failed.get_by_test_id("run-error")).to_contain_text("internal error")
    # Stop: the run is cancelled on the server; the page says so.
    long = _send(page, "long story")
    playwright.expect(long).to_contain_text("tick tick")
    page.get_by_test_id("stop").click()
    playwright.expect(long.get_by_test_id("run-note")).to_have_text("stopped")
    playwright.expect(page.get_by_test_id("stop")).to_be_hidden()
    shown = long.inner_text()
    # A reload shows the conversation as stored, the partial answer marked stopped.
    page.reload()
    page.get_by_test_id("conversation").first.click()
    playwright.expect(page.get_by_test_id("assistant-message")).to_have_count(4)
    if SCREENSHOT:
        page.screenshot(path=SCREENSHOT)
    return {"ticks_shown": shown.count("tick")}


async def test_send_stream_steps_errors_and_stop(settings: Settings) -> None:
    backend = ScriptedBackend(_answers)
    async with running_server(settings, backend) as srv, srv.client() as client:
        seen = await _in_browser(partial(_chat_session, srv.url))
        (conv,) = (await client.get("/api/conversations")).json()["data"]
        assert conv["title"] == "hello"
        messages = (await client.get(f"/api/conversations/{conv['id']}")).json()["messages"]
        statuses = [m["status"] for m in messages if m["role"] == "assistant"]
        assert statuses == ["complete", "complete", "error", "cancelled"]
        assert (await backend.wait_stream(3)).cancelled  # the upstream was closed
        assert 0 < seen["ticks_shown"] < 400


def _lost_send_session(url: str, page: Any) -> dict[str, Any]:
    keys: list[str | None] = []

    def lose_the_first(route: Any) -> None:
        keys.append(route.request.headers.get("idempotency-key"))
        if len(keys) == 1:
            route.fetch()  # the service gets the message and answers it whole ...
            route.abort()  # ... and the page's connection is lost before it reads a byte
        else:
            route.continue_()

    page.goto(url + "/")
    page.route("**/messages", lose_the_first)
    page.get_by_test_id("message-input").fill("hello")
    page.get_by_test_id("send").click()
    playwright.expect(page.get_by_test_id("error-banner")).to_contain_text("cannot reach")
    page.get_by_test_id("send").click()  # the message stayed typed: sent again
    answers = page.get_by_test_id("assistant-message")
    playwright.expect(answers.first).to_contain_text("echo: hello")
    playwright.expect(page.get_by_test_id("stop")).to_be_hidden()
    return {"keys": keys, "answers": answers.count(),
            "questions": page.get_by_test_id("user-message").count()}


async def test_a_message_sent_again_after_a_lost_connection_is_asked_once(
        settings: Settings) -> None:
    # The first request reached the service and its run answered, but the page never saw the
    # answer (its connection lost): sent again, the message's key gets that run, so the
    # conversation holds the question once and the model was asked once.
    backend = ScriptedBackend(_answers)
    async with running_server(settings, backend) as srv, srv.client() as client:
        seen = await _in_browser(partial(_lost_send_session, srv.url))
        (conv,) = (await client.get("/api/conversations")).json()["data"]
        messages = (await client.get(f"/api/conversations/{conv['id']}")).json()["messages"]
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "hello"), ("assistant", "**echo**: hello")]
    assert len(backend.streams) == 1
    assert len(seen["keys"]) == 2
    assert seen["keys"][0]
    assert seen["keys"][0] == seen["keys"][1]
    assert (seen["answers"], seen["questions"]) == (1, 1)


def _reload_session(url: str, page: Any) -> dict[str, Any]:
    rejoins: list[dict[str, str]] = []
    page.on("request", lambda r: rejoins.append(r.headers) if "/events" in r.url else None)
    page.goto(url + "/")
    answer = _send(page, "slow please")
    playwright.expect(answer).to_contain_text("tick tick tick")
    page.reload()
    answer = page.get_by_test_id("assistant-message").last
    playwright.expect(page.get_by_test_id("stop")).to_be_visible()  # re-joined, still running
    playwright.expect(page.get_by_test_id("stop")).to_be_hidden()
    return {"text": answer.inner_text(), "rejoins": rejoins}


async def test_a_reload_mid_run_rejoins_with_last_event_id(settings: Settings) -> None:
    async with running_server(settings, ScriptedBackend(_answers)) as srv:
        seen = await _in_browser(partial(_reload_session, srv.url))
    (rejoin,) = seen["rejoins"]
    assert int(rejoin["last-event-id"]) > 1
    # Every token once: nothing lost across the reload, nothing repeated.
    assert seen["text"].split() == ["tick"] * 40


def _older_session(url: str, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    page.get_by_test_id("conversation").first.click()
    users = page.get_by_test_id("user-message")
    older = page.get_by_test_id("older-messages")
    seen: dict[str, Any] = {}
    playwright.expect(users).to_have_count(50)  # the newest page: 100 messages
    playwright.expect(page.get_by_test_id("assistant-message")).to_have_count(50)
    seen["first"] = users.first.inner_text()
    pane = page.get_by_test_id("messages")
    seen["at_bottom"] = pane.evaluate("p => p.scrollHeight - p.scrollTop - p.clientHeight < 48")
    older.click()
    playwright.expect(users).to_have_count(100)
    # The pane stays on what it showed: the message that was first is still in view.
    seen["kept_in_view"] = page.get_by_text(seen["first"], exact=True).evaluate(
        "(el) => { const p = el.parentElement.getBoundingClientRect();"
        " const r = el.getBoundingClientRect(); return r.bottom > p.top && r.top < p.bottom; }")
    older.click()
    playwright.expect(users).to_have_count(115)
    playwright.expect(older).to_have_count(0)  # the first message reached
    seen["users"] = users.all_inner_texts()
    seen["answers"] = page.get_by_test_id("assistant-message").all_inner_texts()
    return seen


async def test_a_long_conversation_opens_on_its_newest_messages_older_on_demand(
        settings: Settings) -> None:
    # A conversation kept for months was fetched and drawn whole at every open: now its newest
    # 100 messages, and "Earlier messages" above them for the page before, until the first.
    async with running_server(settings, ScriptedBackend(_answers)) as srv:
        store = srv.services.require_store()
        conv = (await store.create_conversation(title="long")).id
        await store.append_messages(conv, [
            item for i in range(115) for item in (
                ("user", f"q{i}", MessageStatus.complete, None),
                ("assistant", f"a{i}", MessageStatus.complete, None))])
        seen = await _in_browser(partial(_older_session, srv.url))
    assert seen["first"] == "q65"
    assert seen["at_bottom"]
    assert seen["kept_in_view"]
    assert seen["users"] == [f"q{i}" for i in range(115)]
    assert seen["answers"] == [f"a{i}" for i in range(115)]


def _keys_session(url: str, page: Any) -> str:
    page.goto(url + "/")
    playwright.expect(page.get_by_test_id("error-banner")).to_contain_text("enter a key")
    page.get_by_test_id("key-input").fill("k1")
    page.get_by_test_id("key-save").click()
    playwright.expect(page.get_by_test_id("key-form")).to_be_hidden()
    playwright.expect(page.get_by_test_id("error-banner")).to_be_hidden()
    answer = _send(page, "hello with a key")
    playwright.expect(answer).to_contain_text("echo: hello with a key")
    text = str(answer.inner_text())
    page.reload()  # the key is remembered
    playwright.expect(page.get_by_test_id("conversation")).to_have_count(1)
    playwright.expect(page.get_by_test_id("key-form")).to_be_hidden()
    return text


async def test_the_page_asks_for_a_key_when_keys_are_set(settings: Settings) -> None:
    keyed = settings.model_copy(update={"api_keys": ("k1",)})
    async with running_server(keyed, ScriptedBackend(_answers)) as srv, srv.client() as client:
        await _in_browser(partial(_keys_session, srv.url))
        assert (await client.get("/api/conversations")).status_code == 401
        mine = await client.get("/api/conversations", headers={"Authorization": "Bearer k1"})
        assert len(mine.json()["data"]) == 1


_ATTACK = """async ([svc, ws]) => {
  const out = {};
  await fetch(svc + "/api/conversations", {method: "POST", mode: "no-cors",
                                           body: '{"title": "pwned"}'});
  try { await fetch(svc + "/api/conversations"); out.read = "read"; }
  catch { out.read = "blocked"; }
  out.ws = await new Promise((done) => {
    const sock = new WebSocket(ws);
    sock.onopen = () => { sock.close(); done("open"); };
    sock.onerror = () => done("refused");
  });
  return out;
}"""


@asynccontextmanager
async def _other_site() -> AsyncIterator[str]:
    """Another origin on loopback (another port): it serves one empty page to anything."""
    page = (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 31\r\n"
            b"Connection: close\r\n\r\n<!doctype html><title>x</title>")

    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(65536)
            await stream.send_all(page)

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        yield f"http://127.0.0.1:{listener.socket.getsockname()[1]}"
        nursery.cancel_scope.cancel()


def _other_origin(other: str, script: str, args: list[str], page: Any) -> Any:
    page.goto(f"{other}/page")
    return page.evaluate(script, args)


async def test_a_page_on_another_origin_cannot_drive_the_service(settings: Settings) -> None:
    async with _other_site() as other, running_server(settings) as srv, \
            srv.client() as client:
        ws = srv.url.replace("http://", "ws://") + "/api/ws"
        out = await _in_browser(partial(_other_origin, other, _ATTACK, [srv.url, ws]))
        assert out == {"read": "blocked", "ws": "refused"}
        assert (await client.get("/api/conversations")).json()["data"] == []


_ALLOWED = """async ([svc, key]) => {
  const auth = {"Authorization": "Bearer " + key};
  const conv = await (await fetch(svc + "/api/conversations", {method: "POST",
      headers: {...auth, "Content-Type": "application/json"}, body: "{}"})).json();
  const done = await (await fetch(svc + "/api/conversations/" + conv.id + "/messages", {
      method: "POST", headers: {...auth, "Content-Type": "application/json"},
      body: JSON.stringify({content: "from elsewhere"})})).json();
  const {token} = await (await fetch(svc + "/api/tokens", {method: "POST", headers: auth}))
      .json();
  // An EventSource cannot send Authorization: the token goes in the URL, with a cache-buster.
  const events = await new Promise((resolve) => {
    const seen = [];
    const source = new EventSource(svc + "/api/runs/" + done.run.id +
                                   "/events?_=1&access_token=" + token);
    source.addEventListener("token", (e) => seen.push(JSON.parse(e.data).text));
    source.addEventListener("run.finished", () => { source.close(); resolve(seen.join("")); });
    source.onerror = () => { source.close(); resolve("error"); };
  });
  return {answer: done.message.content, events};
}"""


async def test_a_listed_origin_works_with_cors_and_a_token(settings: Settings) -> None:
    async with _other_site() as other:
        allowed = settings.model_copy(update={"api_keys": ("k1",), "cors_origins": (other,)})
        async with running_server(allowed, ScriptedBackend(_answers)) as srv:
            out = await _in_browser(partial(_other_origin, other, _ALLOWED, [srv.url, "k1"]))
    assert out == {"answer": "**echo**: from elsewhere", "events": "**echo**: from elsewhere"}


def test_the_page_escapes_model_output() -> None:
    # Markdown from a model is text: no markup of its own gets through.
    with _browser() as page:
        page.set_content("<div id=out></div>")
        source = (ROOT / "service" / "web" /
                  "markdown.js").read_text()
        html = page.evaluate(
            "([src, text]) => import('data:text/javascript,' + encodeURIComponent(src))"
            ".then((m) => m.renderMarkdown(text))",
            [source, '<img src=x onerror=alert(1)> **b** [x](javascript:alert(1)) '
                     '[ok](https://example.com/a"b)'])
    assert "<img" not in html
    assert "&lt;img" in html
    assert "<strong>b</strong>" in html
    assert 'href="javascript' not in html
    assert re.search(r'href="https://example\.com/a&quot;b"', html)
