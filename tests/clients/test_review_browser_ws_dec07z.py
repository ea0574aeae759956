"""Outside review (dec07z): ``/api/ws`` as a real browser uses it. Debian's chromium, driven by
Playwright for Python in a worker thread, opens the socket with the browser's own ``WebSocket``
API from a page of the service's own origin (``page.evaluate``), as a web app would; trio
serves the real app under hypercorn on 127.0.0.1. What the page saw is compared with what the
store says afterwards."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from service.backends.base import ChatRequest
from service.factory import create_app
from service.metrics import Metrics
from service.settings import Settings
from service.tokens import TokenSigner

from ..fakes import Reply, ScriptedBackend
from ..servers import RunningServer, running_server
from ..streams import parse_sse

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")]

T = TypeVar("T")
WAIT_MS = 20_000
GUARD = 60  # seconds a whole browser session may take

# The page's side: sockets by name, each recording its messages (parsed as a browser's
# JSON.parse does), its error event and its close event (code, reason, wasClean, and how many
# messages had come before it).
_HARNESS = """() => {
  window.socks = {};
  window.wsOpen = (name, url) => new Promise((done) => {
    const rec = {msgs: [], raw: [], error: false, opened: false, close: null};
    const s = new WebSocket(url);
    window.socks[name] = {s, rec};
    s.onopen = () => { rec.opened = true; done("open"); };
    s.onmessage = (e) => { rec.raw.push(e.data); rec.msgs.push(JSON.parse(e.data)); };
    s.onerror = () => { rec.error = true; };
    s.onclose = (e) => {
      rec.close = {code: e.code, reason: e.reason, wasClean: e.wasClean, after: rec.msgs.length};
      done("closed");
    };
  });
  window.wsSend = (name, msg) =>
    window.socks[name].s.send(typeof msg === "string" ? msg : JSON.stringify(msg));
  window.wsRec = (name) => window.socks[name].rec;
  window.wsEnded = (name, runId) => window.socks[name].rec.msgs.some(
    (m) => m.type === "run.finished" && m.run_id === runId);
}"""


def _answers(req: ChatRequest) -> Reply:
    q = req.messages[-1].content
    if q.startswith("long"):
        return Reply("tick " * 400, gap=0.05)  # 20 s: cut long before
    if q.startswith("slow"):
        return Reply("tick " * 40, gap=0.05)  # 2 s
    return Reply(f"echo: {q}")


@contextmanager
def _page() -> Any:
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.set_default_timeout(WAIT_MS)
            yield page
        finally:
            browser.close()


async def _in_browser(fn: Callable[[Any], T]) -> T:
    def session() -> T:
        with _page() as page:
            return fn(page)

    with trio.fail_after(GUARD):
        return await trio.to_thread.run_sync(session)


def _ws(url: str, token: str | None = None) -> str:
    out = url.replace("http://", "ws://") + "/api/ws"
    return out + (f"?access_token={token}" if token else "")


def _open_page(url: str, page: Any) -> None:
    page.goto(url + "/")  # the service's own origin: its Origin check lets the socket open
    page.evaluate(_HARNESS)


def _wait(page: Any, js: str, arg: Any = None) -> None:
    page.wait_for_function(js, arg=arg, timeout=WAIT_MS)


def _msgs(page: Any, name: str) -> list[dict[str, Any]]:
    return list(page.evaluate("(n) => wsRec(n).msgs", name))


async def _conversation(srv: RunningServer, headers: dict[str, str] | None = None) -> str:
    async with srv.client(headers=headers or {}) as client:
        return str((await client.post("/api/conversations", json={})).json()["id"])


async def _stored(srv: RunningServer, conv: str,
                  headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    async with srv.client(headers=headers or {}) as client:
        return list((await client.get(f"/api/conversations/{conv}")).json()["messages"])


async def _on_a_new_conversation(
        srv: RunningServer, session: Callable[[str, str, Any], dict[str, Any]],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``session(url, conv, page)`` run in the browser on a new conversation: what it
    returned, and the conversation's stored messages after it."""
    conv = await _conversation(srv)
    seen = await _in_browser(partial(session, srv.url, conv))
    return seen, await _stored(srv, conv)


async def _sse_events(srv: RunningServer, run_id: str) -> list[dict[str, Any]]:
    async with srv.client() as client:
        r = await client.get(f"/api/runs/{run_id}/events")
        assert r.status_code == 200, r.text
        return parse_sse(r.text)


def _as_ws(frames: list[dict[str, Any]], run_id: str) -> list[dict[str, Any]]:
    return [{"run_id": run_id, "id": int(f["id"]), "type": f["event"], "data": f["data"]}
            for f in frames]


def _text(events: list[dict[str, Any]]) -> str:
    return "".join(e["data"]["text"] for e in events if e.get("type") == "token")


# 1 ---------------------------------------------------------------------------------------


UNICODE = "héllo 👋🏽 שלום عربى \U0001d518 \u200f e\u0301 — end"


def _stream_session(url: str, conv: str, page: Any) -> dict[str, Any]:
    _open_page(url, page)
    assert page.evaluate("(u) => wsOpen('a', u)", _ws(url)) == "open"
    page.evaluate("([c, t]) => wsSend('a', {type: 'message', conversation_id: c, content: t})",
                  [conv, UNICODE])
    _wait(page, "() => wsRec('a').msgs.some((m) => m.type === 'run.finished')")
    return {"msgs": _msgs(page, "a"), "close": page.evaluate("() => wsRec('a').close")}


async def test_a_run_streamed_to_the_browser_is_what_the_store_says(settings: Settings) -> None:
    async with running_server(settings, ScriptedBackend(_answers)) as srv:
        conv = await _conversation(srv)
        seen = await _in_browser(partial(_stream_session, srv.url, conv))
        msgs = seen["msgs"]
        assert seen["close"] is None  # the socket stays open after a run
        run_id = msgs[0]["run_id"]
        assert [m["id"] for m in msgs] == list(range(1, len(msgs) + 1))
        assert msgs[0]["type"] == "run.started"
        assert msgs[-1]["type"] == "run.finished"
        assert msgs[-1]["data"]["status"] == "succeeded"
        assert _text(msgs) == f"echo: {UNICODE}"
        assert msgs == _as_ws(await _sse_events(srv, run_id), run_id)
        stored = await _stored(srv, conv)
    assert [(m["role"], m["content"], m["status"]) for m in stored] == [
        ("user", UNICODE, "complete"), ("assistant", f"echo: {UNICODE}", "complete")]
    assert stored[1]["run_id"] == run_id


# 2 ---------------------------------------------------------------------------------------


def _rejoin_session(url: str, conv: str, page: Any) -> dict[str, Any]:
    _open_page(url, page)
    page.evaluate("(u) => wsOpen('a', u)", _ws(url))
    page.evaluate("(c) => wsSend('a', {type: 'message', conversation_id: c, content: 'slow',"
                  " on_disconnect: 'continue'})", conv)
    _wait(page, "() => wsRec('a').msgs.filter((m) => m.type === 'token').length >= 5")
    # The page loses its socket: its own close, mid-run.
    page.evaluate("() => { window.socks.a.s.onmessage = null; window.socks.a.s.close(); }")
    shown = _msgs(page, "a")
    run_id, last = shown[0]["run_id"], shown[-1]["id"]
    page.evaluate("(u) => wsOpen('b', u)", _ws(url))
    page.evaluate("([r, n]) => wsSend('b', {type: 'join', run_id: r, after: n})", [run_id, last])
    _wait(page, "(r) => wsEnded('b', r)", run_id)
    return {"shown": shown, "rest": _msgs(page, "b"),
            "close_a": page.evaluate("() => wsRec('a').close")}


async def test_a_socket_closed_by_the_page_mid_run_resumes_by_join_with_no_gap(
        settings: Settings) -> None:
    backend = ScriptedBackend(_answers)
    async with running_server(settings, backend) as srv:
        seen, stored = await _on_a_new_conversation(srv, _rejoin_session)
    events = seen["shown"] + seen["rest"]
    assert seen["close_a"]["code"] == 1005  # the page's own close(): no status given
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))  # no gap, no duplicate
    assert events[-1]["data"]["status"] == "succeeded"  # "continue": the run went on
    assert _text(events) == "tick " * 40
    assert stored[-1]["content"] == _text(events)
    assert len(backend.streams) == 1


# 3 ---------------------------------------------------------------------------------------


def _navigate_away_session(url: str, conv: str, page: Any) -> dict[str, Any]:
    _open_page(url, page)
    page.evaluate("(u) => wsOpen('a', u)", _ws(url))
    page.evaluate("(c) => wsSend('a', {type: 'message', conversation_id: c, content: 'long'})",
                  conv)
    _wait(page, "() => wsRec('a').msgs.filter((m) => m.type === 'token').length >= 3")
    shown = _msgs(page, "a")
    page.goto("about:blank")  # the page navigates away: the browser closes its socket
    _open_page(url, page)
    page.evaluate("(u) => wsOpen('b', u)", _ws(url))
    page.evaluate("([r, n]) => wsSend('b', {type: 'join', run_id: r, after: n})",
                  [shown[0]["run_id"], shown[-1]["id"]])
    _wait(page, "(r) => wsEnded('b', r)", shown[0]["run_id"])
    return {"shown": shown, "rest": _msgs(page, "b")}


async def test_navigating_away_cancels_a_cancel_run_and_a_join_sees_that_end(
        settings: Settings) -> None:
    backend = ScriptedBackend(_answers)
    async with running_server(settings, backend) as srv:
        seen, stored = await _on_a_new_conversation(srv, _navigate_away_session)
        async with srv.client() as client:
            run = (await client.get(f"/api/runs/{seen['shown'][0]['run_id']}")).json()
    events = seen["shown"] + seen["rest"]
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    end = events[-1]
    assert end["type"] == "run.finished"
    assert end["data"]["status"] == "cancelled" == run["status"]
    assert stored[-1]["status"] == "cancelled"
    assert 0 < stored[-1]["content"].count("tick") < 400
    assert end["data"]["content"] == stored[-1]["content"]
    assert backend.streams[0].cancelled


# 4 ---------------------------------------------------------------------------------------


def _resend_session(url: str, conv: str, page: Any) -> dict[str, Any]:
    _open_page(url, page)
    msg = {"type": "message", "conversation_id": conv, "content": "slow and keyed",
           "on_disconnect": "continue", "idempotency_key": "browser-key-1"}
    page.evaluate("(u) => wsOpen('a', u)", _ws(url))
    page.evaluate("(m) => wsSend('a', m)", msg)
    _wait(page, "() => wsRec('a').msgs.some((m) => m.type === 'token')")
    page.evaluate("() => window.socks.a.s.close()")
    first = _msgs(page, "a")
    page.evaluate("(u) => wsOpen('b', u)", _ws(url))
    page.evaluate("(m) => wsSend('b', m)", msg)  # the same message, the same key, again
    run_id = first[0]["run_id"]
    _wait(page, "(r) => wsEnded('b', r)", run_id)
    return {"first": first, "again": _msgs(page, "b")}


async def test_a_keyed_message_sent_again_on_a_new_socket_gets_the_first_run(
        settings: Settings) -> None:
    backend = ScriptedBackend(_answers)
    async with running_server(settings, backend) as srv:
        seen, stored = await _on_a_new_conversation(srv, _resend_session)
    run_id = seen["first"][0]["run_id"]
    again = seen["again"]
    assert {m["run_id"] for m in again} == {run_id}
    assert [m["id"] for m in again] == list(range(1, len(again) + 1))  # from the first event
    assert seen["first"] == again[:len(seen["first"])]
    assert again[-1]["data"]["status"] == "succeeded"
    assert len(backend.streams) == 1
    assert [m["role"] for m in stored] == ["user", "assistant"]


# 5 ---------------------------------------------------------------------------------------


@dataclass
class _Stoppable:
    srv: RunningServer
    stop: trio.Event


@asynccontextmanager
async def _stoppable_server(settings: Settings, backend: ScriptedBackend,
                            ) -> AsyncIterator[_Stoppable]:
    """As ``running_server``, with its shutdown trigger in the test's hands."""
    app = create_app(settings, metrics=Metrics(), backend=backend)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.graceful_timeout = 5
    config.accesslog = None
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config, shutdown_trigger=stop.wait))
        try:
            yield _Stoppable(RunningServer(binds[0], app.extensions["service"]), stop)
        finally:
            stop.set()


def _shutdown_session(url: str, conv: str, stop: trio.Event, page: Any) -> dict[str, Any]:
    _open_page(url, page)
    page.evaluate("(u) => wsOpen('idle', u)", _ws(url))
    page.evaluate("(u) => wsOpen('a', u)", _ws(url))
    page.evaluate("(c) => wsSend('a', {type: 'message', conversation_id: c, content: 'long'})",
                  conv)
    _wait(page, "() => wsRec('a').msgs.filter((m) => m.type === 'token').length >= 3")
    trio.from_thread.run_sync(stop.set)  # the service shuts down
    _wait(page, "() => wsRec('a').close !== null && wsRec('idle').close !== null")
    return {"msgs": _msgs(page, "a"), "close": page.evaluate("() => wsRec('a').close"),
            "error": page.evaluate("() => wsRec('a').error"),
            "idle": page.evaluate("() => wsRec('idle')")}


async def test_a_shutdown_closes_the_browser_socket_1001_after_the_run_end(
        settings: Settings) -> None:
    short = settings.model_copy(update={"shutdown_drain": 0.5})
    backend = ScriptedBackend(_answers)
    async with _stoppable_server(short, backend) as s:
        conv = await _conversation(s.srv)
        seen = await _in_browser(partial(_shutdown_session, s.srv.url, conv, s.stop))
    msgs, close = seen["msgs"], seen["close"]
    assert close["code"] == 1001, close
    assert close["wasClean"], close
    assert not seen["error"], close
    assert close["after"] == len(msgs)
    assert seen["idle"]["close"]["code"] == 1001, seen["idle"]
    assert not seen["idle"]["error"]
    assert "shutdown" in [m["type"] for m in msgs]
    end = msgs[-1]
    assert end["type"] == "run.finished"
    async with running_server(settings) as again:  # the same SQLite file, a fresh server
        stored = await _stored(again, conv)
        async with again.client() as client:
            run = (await client.get(f"/api/runs/{end['run_id']}")).json()
    assert end["data"]["status"] == run["status"] == "cancelled"
    assert stored[-1]["content"] == end["data"]["content"]


# 6 ---------------------------------------------------------------------------------------


_TOKENS = """async ([svc, key, conv, expired]) => {
  const out = {};
  const r = await fetch(svc + "/api/tokens", {method: "POST",
                                              headers: {Authorization: "Bearer " + key}});
  const {token} = await r.json();
  const ws = svc.replace("http://", "ws://") + "/api/ws";
  for (const [name, url] of [["none", ws], ["wrong", ws + "?access_token=abc.def.ghi"],
                             ["expired", ws + "?access_token=" + expired],
                             ["good", ws + "?access_token=" + token]]) {
    out[name] = await wsOpen(name, url);
  }
  wsSend("good", {type: "message", conversation_id: conv, content: "with a token"});
  await new Promise((done) => {
    const t = setInterval(() => {
      if (wsRec("good").msgs.some((m) => m.type === "run.finished")) {
        clearInterval(t); done();
      }
    }, 50);
  });
  for (const name of ["none", "wrong", "expired", "good"]) {
    out[name + "_rec"] = wsRec(name);
  }
  return out;
}"""


def _tokens_session(url: str, conv: str, expired: str, page: Any) -> Any:
    _open_page(url, page)
    return page.evaluate(_TOKENS, [url, "k1", conv, expired])


async def test_a_browser_socket_opens_with_a_token_and_not_without(settings: Settings) -> None:
    keyed = settings.model_copy(update={"api_keys": ("k1",)})
    auth = {"Authorization": "Bearer k1"}
    expired, _ = TokenSigner((b"k1",)).issue(b"k1", time.time() - 600)  # genuine, expired
    async with running_server(keyed, ScriptedBackend(_answers)) as srv:
        conv = await _conversation(srv, auth)
        out = await _in_browser(partial(_tokens_session, srv.url, conv, expired))
        stored = await _stored(srv, conv, auth)
        async with srv.client() as client:
            r = await client.get("/api/ws", params={"access_token": expired}, headers={
                "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    for name in ("none", "wrong", "expired"):
        assert out[name] == "closed", name
        rec = out[name + "_rec"]
        assert rec["error"], rec
        assert not rec["opened"], rec
        assert rec["close"]["code"] == 1006, rec
    assert out["good"] == "open"
    msgs = out["good_rec"]["msgs"]
    assert msgs[-1]["data"]["status"] == "succeeded"
    assert _text(msgs) == "echo: with a token"
    assert [m["content"] for m in stored] == ["with a token", "echo: with a token"]
    # What the browser cannot show, a client reading the handshake's answer can: it says so.
    assert r.status_code == 401
    assert "expired" in r.json()["error"]["message"]


# 7 ---------------------------------------------------------------------------------------


_BAD_INPUT = """async ([conv, limit]) => {
  const msg = (extra) => JSON.stringify(
    {type: "message", conversation_id: conv, idempotency_key: "k", ...extra});
  wsSend("a", "{not json");
  wsSend("a", "[1, NaN]");
  wsSend("a", msg({content: "x".repeat(limit), idempotency_key: "big"}));
  // over the limit in UTF-8 bytes, under it in JS string length
  wsSend("a", msg({content: String.fromCodePoint(0x1F600).repeat(limit / 4 + 10)}));
  wsSend("a", msg({content: "lone \\ud800 surrogate", idempotency_key: "lone"}));
  wsSend("a", {type: "join", run_id: "r".repeat(300)});
  wsSend("a", {type: "wave"});
  // the socket stays: a good message after the bad ones is answered
  wsSend("a", {type: "message", conversation_id: conv, content: "still here"});
  return true;
}"""


def _bad_input_session(url: str, conv: str, limit: int, page: Any) -> dict[str, Any]:
    _open_page(url, page)
    page.evaluate("(u) => wsOpen('a', u)", _ws(url))
    page.evaluate(_BAD_INPUT, [conv, limit])
    _wait(page, "() => wsRec('a').msgs.filter((m) => m.type === 'run.finished').length >= 1"
                " && wsRec('a').msgs.filter((m) => m.type === 'error').length >= 5")
    seen = {"before": _msgs(page, "a"), "open": page.evaluate("() => wsRec('a').close")}
    page.evaluate("(c) => wsSend('a', {type: 'message', conversation_id: c, content: 'long'})",
                  conv)
    _wait(page, "() => wsRec('a').msgs.filter((m) => m.type === 'token').length >= 8")
    # Past twice the limit: the socket is closed with 1009, its reason naming the cap, and its
    # "cancel" run is cancelled.
    page.evaluate("(n) => wsSend('a', 'x'.repeat(n))", 2 * limit + 10)
    _wait(page, "() => wsRec('a').close !== null")
    seen["close"] = page.evaluate("() => wsRec('a').close")
    seen["long_run"] = _msgs(page, "a")[-1]["run_id"]
    return seen


async def test_bad_messages_from_a_browser_get_error_replies_and_the_socket_stays(
        settings: Settings) -> None:
    limit = 4096
    small = settings.model_copy(update={"max_body_bytes": limit})
    async with running_server(small, ScriptedBackend(_answers)) as srv:
        conv = await _conversation(srv)
        seen = await _in_browser(partial(_bad_input_session, srv.url, conv, limit))
        async with srv.client() as client:
            with trio.fail_after(20):
                while True:  # the run's end is stored soon after the socket's close
                    run = (await client.get(f"/api/runs/{seen['long_run']}")).json()
                    if run["status"] != "running":
                        break
                    await trio.sleep(0.05)
        stored = await _stored(srv, conv)
    assert seen["open"] is None
    errors = [m for m in seen["before"] if m["type"] == "error"]
    kinds = [e["error"]["type"] for e in errors]
    assert kinds == ["malformed_json", "malformed_json", "body_too_large", "body_too_large",
                     "invalid_request", "invalid_request", "invalid_request"], errors
    assert all(e["error"]["message"] for e in errors)
    assert "4096 bytes" in errors[2]["error"]["message"]
    assert errors[4]["error"]["message"].startswith("content: "), errors[4]  # lone surrogate
    assert errors[4]["request"]["idempotency_key"] == "lone"
    assert errors[5]["error"]["message"].startswith("run_id: "), errors[5]
    assert errors[-1]["request"] == {"type": "wave"}
    assert run["status"] == "cancelled"
    runs = [m for m in seen["before"] if m.get("type") == "run.finished"]
    assert all(r["data"]["status"] == "succeeded" for r in runs)
    contents = [m["content"] for m in stored if m["role"] == "user"]
    assert contents == ["still here", "long"]
    # the lone surrogate: refused, or stored as valid text (U+FFFD), never a broken store
    for text in contents:
        text.encode("utf-8")
    json.dumps(stored, ensure_ascii=False).encode("utf-8")
    assert seen["close"]["code"] == 1009, seen["close"]
    assert str(2 * limit) in seen["close"]["reason"], seen["close"]


# 8 ---------------------------------------------------------------------------------------


def _idle_session(url: str, conv: str, page: Any) -> dict[str, Any]:
    _open_page(url, page)
    page.evaluate("(u) => wsOpen('a', u)", _ws(url))
    page.wait_for_timeout(4000)  # idle: only the server's pings, which the browser answers
    closed = page.evaluate("() => wsRec('a').close")
    page.evaluate("(c) => wsSend('a', {type: 'message', conversation_id: c, content: 'hi'})",
                  conv)
    if closed is None:
        _wait(page, "() => wsRec('a').msgs.some((m) => m.type === 'run.finished')"
                    " || wsRec('a').close !== null")
    return {"closed": closed, "msgs": _msgs(page, "a")}


async def test_an_idle_browser_socket_is_kept_by_its_pongs(settings: Settings) -> None:
    fast = settings.model_copy(update={"sse_keepalive": 0.3})
    async with running_server(fast, ScriptedBackend(_answers)) as srv:
        conv = await _conversation(srv)
        seen = await _in_browser(partial(_idle_session, srv.url, conv))
    assert seen["closed"] is None, seen["closed"]
    assert seen["msgs"][-1]["type"] == "run.finished"
    assert _text(seen["msgs"]) == "echo: hi"



_CROSS = """async ([ws, conv]) => {
  const out = {};
  const rec = {msgs: [], close: null, error: false, opened: false};
  out.state = await new Promise((done) => {
    const s = new WebSocket(ws);
    s.onopen = () => { rec.opened = true;
      s.send(JSON.stringify({type: "message", conversation_id: conv, content: "from afar"})); };
    s.onmessage = (e) => { const m = JSON.parse(e.data); rec.msgs.push(m);
      if (m.type === "run.finished" || m.type === "error") { s.close(); } };
    s.onerror = () => { rec.error = true; };
    s.onclose = (e) => { rec.close = e.code; done(rec); };
  });
  return out;
}"""



def _cross_session(page_url: str, ws: str, conv: str, page: Any) -> Any:
    page.goto(page_url)
    return page.evaluate(_CROSS, [ws, conv])


async def test_a_listed_origin_opens_the_socket_with_a_token_an_unlisted_one_cannot(
        settings: Settings) -> None:
    # test_chat_page covers an unlisted origin with no keys, and a listed one over SSE: here a
    # WebSocket with a token, from a listed origin and from an unlisted one.
    from .test_chat_page import _other_site

    auth = {"Authorization": "Bearer k1"}
    async with _other_site() as listed, _other_site() as unlisted:
        allowed = settings.model_copy(update={"api_keys": ("k1",), "cors_origins": (listed,)})
        async with running_server(allowed, ScriptedBackend(_answers)) as srv:
            conv = await _conversation(srv, auth)
            async with srv.client() as client:
                tok = (await client.post("/api/tokens", headers=auth)).json()["token"]
            ok = await _in_browser(partial(_cross_session, listed + "/p", _ws(srv.url, tok),
                                           conv))
            no = await _in_browser(partial(_cross_session, unlisted + "/p",
                                           _ws(srv.url, tok), conv))
            stored = await _stored(srv, conv, auth)
    assert ok["state"]["opened"]
    assert ok["state"]["msgs"][-1]["data"]["status"] == "succeeded"
    assert _text(ok["state"]["msgs"]) == "echo: from afar"
    assert no["state"]["opened"] is False
    assert no["state"]["error"]
    assert no["state"]["close"] == 1006
    assert [m["content"] for m in stored] == ["from afar", "echo: from afar"]
