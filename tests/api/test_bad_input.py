"""Bad input gets a 4xx, never a 500 or a dead socket (issue 13, item 4); each test failed
before its fix."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from service.logs import JsonFormatter, TextFormatter
from service.settings import Settings
from service.sim import Reply

from ..e2e import GUARD, e2e
from ..fakes import Reply as ScriptedReply
from ..fakes import ScriptedBackend
from ..servers import running_server
from ..streams import ws_reply, ws_url

LONE = "\\ud800"  # a lone surrogate as JSON text: valid JSON, not Unicode text
JSON = {"content-type": "application/json"}


def _raw(body: dict[str, Any]) -> bytes:
    """``body`` as JSON, with every "SURR" replaced by a lone surrogate's escape."""
    return json.dumps(body).replace("SURR", LONE).encode()


def _no_surrogate(text: str) -> None:
    assert not re.search(r"\\u[dD][89a-fA-F]", text), text
    text.encode("utf-8")  # real Unicode all the way


# -- lone surrogates ---------------------------------------------------------------------------

USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(("extra", "field"), [
    ({"stop": "SURR"}, "stop"),
    ({"stop": ["ok", "SURR"]}, "stop"),
    ({"tools": [{"type": "function", "function": {"name": "SURR", "parameters": {}}}]},
     "tools"),
    ({"response_format": {"type": "json_object", "SURR": 1}}, "response_format"),
    ({"messages": [USER, {"role": "tool", "content": "x", "tool_call_id": "SURR"}]},
     "messages.1.tool_call_id"),
    ({"messages": [USER, {"role": "assistant", "tool_calls": [
        {"id": "c", "function": {"name": "f", "arguments": {"SURR": 1}}}]}]},
     "messages.1.tool_calls.0.function.arguments"),
    ({"model": "SURR"}, "model"),
])
async def test_a_lone_surrogate_in_a_v1_request_is_422_naming_the_field(
    settings: Settings, extra: dict[str, Any], field: str
) -> None:
    # Each went upstream and failed there: 500 internal_error (UnicodeEncodeError).
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(text="fine"))
        with trio.fail_after(GUARD):
            r = await env.client.post("/v1/chat/completions", headers=JSON,
                                      content=_raw({"messages": [USER], **extra}))
            assert r.status_code == 422, r.text
            assert r.json()["error"]["field"] == field
            _no_surrogate(r.text)  # the message does not echo it back
            assert (await env.client.get("/api/conversations")).json()["data"] == []
            assert env.sim.streams == []


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/api/conversations", {"title": "SURR"}, "title"),
    ("/api/conversations", {"system": "a SURR"}, "system"),
    ("MESSAGES", {"content": "SURR"}, "content"),
    ("MESSAGES", {"content": "q", "model": "SURR"}, "model"),
    ("/api/conversations", {"SURR": "x"}, "body"),
])
async def test_a_lone_surrogate_in_a_native_request_is_422_naming_the_field(
    settings: Settings, path: str, body: dict[str, Any], field: str
) -> None:
    async with running_server(settings) as srv, srv.client() as c:
        conv = (await c.post("/api/conversations", json={})).json()["id"]
        url = f"/api/conversations/{conv}/messages" if path == "MESSAGES" else path
        r = await c.post(url, headers=JSON, content=_raw(body))
        assert (r.status_code, r.json()["error"]["field"]) == (422, field), r.text


async def test_a_nul_character_in_a_request_is_422_naming_the_field(settings: Settings) -> None:
    # "\u0000" is valid JSON, but PostgreSQL's text cannot hold it: the store's write failed
    # (a 500 on PostgreSQL only). Refused as a lone surrogate is, on every store.
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(text="fine"))
        with trio.fail_after(GUARD):
            r = await env.client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "a\x00b"}]})  # sent as "\u0000"
            assert r.status_code == 422, r.text
            assert r.json()["error"]["field"] == "messages.0.content"
            conv = (await env.client.post("/api/conversations", json={})).json()["id"]
            r = await env.client.post(f"/api/conversations/{conv}/messages",
                                      json={"content": "x\x00y"})
            assert (r.status_code, r.json()["error"]["field"]) == (422, "content"), r.text
            assert env.sim.streams == []


@pytest.mark.parametrize("kind", ["llamacpp", "ollama"])
@pytest.mark.parametrize("agent", ["chat", "react", "plan_execute"])
async def test_a_lone_surrogate_from_the_model_is_cleaned(
    settings: Settings, kind: str, agent: str
) -> None:
    # A model that named a tool "ge\ud800t": the next call upstream (react, plan_execute) was a
    # 500 UnicodeEncodeError; a /v1 client got the lone surrogate back as "\ud800" (not
    # Unicode: strict JSON parsers refuse it).
    async with e2e(settings, kind) as env:
        tools = [{"type": "function", "function": {"name": "get", "parameters": {}}}]
        call = {"name": "ge\ud800t", "arguments": {"a\udc00": "b\ud800"}}
        env.sim.script(Reply(tool_calls=(call,)), *[Reply(text="done")] * 4)
        with trio.fail_after(GUARD):
            # (The client's tools go with chat only: react and plan_execute refuse them.)
            r = await env.client.post("/v1/chat/completions", json={
                "messages": [USER], "agent": agent,
                **({"tools": tools} if agent == "chat" else {})})
        assert r.status_code == 200, r.text
        _no_surrogate(r.text)
        if agent == "chat":  # the client's tool call, cleaned
            (out,) = r.json()["choices"][0]["message"]["tool_calls"]
            assert out["function"]["name"] == "ge\ufffdt"
            assert json.loads(out["function"]["arguments"]) == {"a\ufffd": "b\ufffd"}
        else:  # the model was told the tool is unknown, by its cleaned name
            assert len(env.sim.streams) >= 2
            _no_surrogate(json.dumps(env.sim.streams[1].body, ensure_ascii=False))
            assert "ge\ufffdt" in json.dumps(env.sim.streams[1].body, ensure_ascii=False)


# -- Last-Event-ID and ?after= -----------------------------------------------------------------

async def test_a_huge_last_event_id_is_422_not_500(settings: Settings) -> None:
    # int() refuses strings of over 4,300 digits (ValueError): it was a 500.
    backend = ScriptedBackend(lambda req: ScriptedReply("a b"))
    async with running_server(settings, backend) as srv, srv.client() as c:
        conv = (await c.post("/api/conversations", json={})).json()["id"]
        r = await c.post(f"/api/conversations/{conv}/messages", json={"content": "q"})
        url = f"/api/runs/{r.json()['run']['id']}/events"
        for digits in ("9" * 5000, "1" + "0" * 19, "0" * 30 + "1", "-5", "+5", "1 2"):
            r = await c.get(url, headers={"Last-Event-ID": digits})
            assert r.status_code == 422, (digits[:30], r.text)
            assert r.json()["error"]["field"] == "Last-Event-ID"
            r = await c.get(url, params={"after": digits})
            assert r.status_code == 422, (digits[:30], r.text)
            assert r.json()["error"]["field"] == "after"
        assert (await c.get(url, headers={"Last-Event-ID": "2"})).status_code == 200
        assert (await c.get(url, params={"after": "2"})).status_code == 200


# -- WebSocket ---------------------------------------------------------------------------------

async def _reply_to_me(ws: WebSocketConnection, running: str) -> tuple[str, dict[str, Any]]:
    """The next reply that is not an event of the run ``running``."""
    while True:
        text, reply = await ws_reply(ws)
        if reply.get("run_id") != running:
            return text, reply


async def test_a_ws_message_with_a_lone_surrogate_gets_an_error_and_keeps_the_socket(
    settings: Settings,
) -> None:
    # It reached the store (UnicodeEncodeError): the handler died, the socket closed (1000,
    # no error frame) and the socket's other runs were cancelled.
    backend = ScriptedBackend(lambda req: ScriptedReply(
        "slow answer", hang_after=1 if req.messages[-1].content == "hang" else None))
    async with running_server(settings, backend) as srv, srv.client() as c:
        conv = (await c.post("/api/conversations", json={})).json()["id"]
        async with open_websocket_url(ws_url(srv)) as ws:
            await ws.send_message(json.dumps(
                {"type": "message", "conversation_id": conv, "content": "hang"}))
            _, started = await ws_reply(ws)
            assert started["type"] == "run.started"
            run_id = started["run_id"]
            for bad in ({"conversation_id": "SURR", "content": "q"},
                        {"conversation_id": conv, "content": "q", "model": "SURR"},
                        {"conversation_id": conv, "content": "SURR"}):
                await ws.send_message(_raw({"type": "message", **bad}).decode())
                text, reply = await _reply_to_me(ws, run_id)
                assert reply["type"] == "error", reply
                assert reply["error"]["type"] == "invalid_request"
                _no_surrogate(text)
            await ws.send_message(_raw({"type": "cancel", "run_id": "SURR"}).decode())
            text, reply = await _reply_to_me(ws, run_id)
            assert reply["error"]["type"] == "invalid_request"
            assert reply["request"] == {"type": "cancel", "run_id": "\ufffd"}  # echoed clean
            _no_surrogate(text)
            # The socket and its run are still alive; the run ends by a cancel from here.
            assert (await c.get(f"/api/runs/{run_id}")).json()["status"] == "running"
            await ws.send_message(json.dumps({"type": "cancel", "run_id": run_id}))
            while reply.get("type") != "run.finished":
                _, reply = await ws_reply(ws)
            assert reply["data"]["status"] == "cancelled"


# -- strict JSON types -------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "body", "field"), [
    ("MESSAGES", {"content": "q", "timeout": True}, "timeout"),  # was a 1 s deadline
    ("MESSAGES", {"content": "q", "timeout": "5"}, "timeout"),
    ("MESSAGES", {"content": "q", "stream": "on"}, "stream"),
    ("MESSAGES", {"content": "q", "stream": 1}, "stream"),
    ("MESSAGES", {"content": 5}, "content"),
    ("/api/conversations", {"title": 5}, "title"),
    ("/v1/chat/completions", {"messages": [USER], "max_tokens": "5"}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [USER], "max_tokens": 5.0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [USER], "stream": "on"}, "stream"),
    ("/v1/chat/completions", {"messages": [USER], "temperature": "0.5"}, "temperature"),
    ("/v1/chat/completions", {"messages": [USER], "temperature": False}, "temperature"),
    ("/v1/chat/completions", {"messages": [USER], "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]},
     "messages.0.content"),
])
async def test_request_fields_take_their_json_types_only(
    settings: Settings, path: str, body: dict[str, Any], field: str
) -> None:
    async with running_server(settings) as srv, srv.client() as c:
        conv = (await c.post("/api/conversations", json={})).json()["id"]
        url = f"/api/conversations/{conv}/messages" if path == "MESSAGES" else path
        r = await c.post(url, json=body)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["field"] == field
        assert (await c.get(f"/api/conversations/{conv}")).json()["messages"] == []


async def test_an_int_is_still_a_number(settings: Settings) -> None:
    backend = ScriptedBackend(lambda req: ScriptedReply("ok"))
    async with running_server(settings, backend) as srv, srv.client() as c:
        conv = (await c.post("/api/conversations", json={})).json()["id"]
        r = await c.post(f"/api/conversations/{conv}/messages",
                         json={"content": "q", "timeout": 30})
        assert r.status_code == 200, r.text
        r = await c.post("/v1/chat/completions",
                         json={"messages": [USER], "temperature": 1, "top_p": 1})
        assert r.status_code == 200, r.text
        assert backend.streams[-1].request.temperature == 1.0


@pytest.mark.parametrize(("extra", "field"), [
    ({"timeout": True}, "timeout"), ({"timeout": "5"}, "timeout"), ({"content": 5}, "content"),
    ({"on_disconnect": 1}, "on_disconnect"),
])
async def test_ws_message_fields_take_their_json_types_only(
    settings: Settings, extra: dict[str, Any], field: str
) -> None:
    async with running_server(settings) as srv, srv.client() as c:
        conv = (await c.post("/api/conversations", json={})).json()["id"]
        async with open_websocket_url(ws_url(srv)) as ws:
            await ws.send_message(json.dumps(
                {"type": "message", "conversation_id": conv, "content": "q", **extra}))
            _, reply = await ws_reply(ws)
            assert reply["error"]["type"] == "invalid_request", reply
            assert reply["error"]["message"].startswith(f"{field}:")


# -- SERVICE_DB as a URL -----------------------------------------------------------------------

def _start(tmp_path: Path, db: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    env.update({"SERVICE_DB": db, "SERVICE_LOG_FORMAT": "json"})
    return subprocess.run([sys.executable, "-m", "service", "--bind", "127.0.0.1:0"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
                          check=False)


@pytest.mark.parametrize(("db", "says"), [
    ("mysql://u:secret@db.example/svc", "not a SQLite path"),
    ("sqlite:///x.db", "not a SQLite path"),
    ("postgresql:/x", "not a SQLite path"),
    ("postgresql+psycopg://u:secret@db.example/svc", "not a SQLite path"),
])
def test_a_store_url_stops_the_start_with_one_line(tmp_path: Path, db: str, says: str) -> None:
    # postgresql://... made a directory "postgresql:" and a SQLite file in it, silently.
    out = _start(tmp_path, db)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "SERVICE_DB" in lines[0]
    assert says in lines[0], lines[0]
    assert "secret" not in lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing created


# -- text logs ---------------------------------------------------------------------------------

def test_text_logs_escape_control_characters() -> None:
    # A request path with %1b[2J (ESC) cleared the operator's terminal; only \r and \n were
    # escaped.
    record = logging.LogRecord("hypercorn.access", logging.INFO, __file__, 1,
                               "GET /a%s b", ("\x1b[2J\x00\x07\t\x7f\x9b\u0085\r\nc é",), None)
    record.request_id = "r1"
    line = TextFormatter().format(record)
    assert line.endswith(
        "GET /a\\x1b[2J\\x00\\x07\\t\\x7f\\x9b\\x85\\r\\nc é b"), line
    assert all(ch.isprintable() for ch in line), line
    try:
        raise ValueError("bad \x1b]0;title\x07")
    except ValueError:
        record.exc_info = sys.exc_info()
    text = TextFormatter().format(record)
    assert "\x1b" not in text
    assert "\x07" not in text
    assert "\\x1b]0;title\\x07" in text
    assert "\nTraceback" in text  # the traceback keeps its own lines


def test_logs_name_their_process_when_asked() -> None:
    # With --workers N every process writes to one stream: each line says whose it is.
    record = logging.LogRecord("service.runs", logging.WARNING, __file__, 1, "run failed",
                               (), None)
    record.request_id = "r1"
    assert f" pid={os.getpid()} [r1] run failed" in TextFormatter(pid=True).format(record)
    assert "pid=" not in TextFormatter().format(record)
    assert json.loads(JsonFormatter(pid=True).format(record))["pid"] == os.getpid()
    assert "pid" not in json.loads(JsonFormatter().format(record))


async def test_a_422_names_unknown_fields_cut_short_and_lists_the_first_errors(
    settings: Settings,
) -> None:
    # Found in review (the WebSocket's, the same on HTTP): an unknown field's name came back
    # whole, in the message, in ``field`` and in every entry of ``errors``; with JSON's escapes
    # a 1 MB body of them was answered with several MB.
    name = "é" * 100_000
    body = {"title": "t", name: 1, **{f"x{i}{'y' * 5_000}": 1 for i in range(100)}}
    async with running_server(settings, ScriptedBackend()) as srv, srv.client() as client:
        r = await client.post("/api/conversations", json=body)
    assert r.status_code == 422, r.text[:300]
    error = r.json()["error"]
    assert error["type"] == "invalid_request"
    assert len(r.content) < 20_000, len(r.content)
    assert len(error["field"]) <= 200
    assert 0 < len(error["errors"]) <= 20
    assert error["message"].startswith(error["field"])
