"""Adversarial review, part 2: untrusted input parsed on the event loop (see
``test_review_parsing_dec07z.py`` for the method; this file covers what it did not).

Covered here: Ollama's native NDJSON lines (content, thinking, tool-call objects, done and
error lines), the hand-written HTTP/1.1 transport's response parsing (h11 fed as the transport
feeds it: many tiny chunks, chunk extensions, a huge chunk-size line, a head without its end,
many headers, trailers; and a real socket), upstream error bodies, the ``/v1/chat/completions``
request (thousands of messages, huge tools arrays, stop lists, logit_bias maps, giant tool-call
arguments), the history shortening of ``service/agents/history.py``, ``POST .../messages``
content and ``clean_text``, and the terminal client's renderer.

Each test feeds growing inputs and checks the growth ratio of a doubling (about 2 linear, about
4 quadratic), never an absolute speed. Tests whose docstring starts with "Fixed (was: DEFECT:"
failed before their fix.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
import trio
from rich.console import Console

from service.agents.base import unicode_request
from service.agents.history import (
    build_history,
    fitted_history,
    shorter_history,
    trim_history,
)
from service.api.models import CreateConversation, PostMessage, strict_json_loads, too_deep
from service.api.openai import _to_history
from service.api.openai_request import ChatCompletionRequest
from service.backends.base import ChatMessage, ChatRequest, ToolCall
from service.backends.h11transport import MAX_HEAD, PlainHTTPTransport
from service.backends.ollama import OllamaChunks
from service.backends.stream_parsers import NDJSONSplitter
from service.backends.upstream_errors import error_from_status, loads_json
from service.chat_render import Renderer
from service.errors import BackendError
from service.settings import load_settings
from service.store.records import Conversation, Message, MessageStatus
from service.text import clean_text, not_text_at

from .fakes import Reply, ScriptedBackend
from .growth import LINEAR, assert_linear, gaps_around
from .servers import running_server

# -- Ollama's native /api/chat NDJSON ---------------------------------------------------------

def _ollama_parse(body: bytes) -> int:
    """An Ollama body through the adapter's own steps: split (16-byte reads), ``loads_json``,
    ``OllamaChunks._chunk``. Returns the chunks that carried something."""
    splitter = NDJSONSplitter()
    chunks = OllamaChunks(None, "o", "m")  # type: ignore[arg-type]  # (no reading here)
    lines: list[bytes] = []
    for i in range(0, len(body), 16):
        lines += splitter.feed(body[i:i + 16])
    if (last := splitter.flush()) is not None:
        lines.append(last)
    got = 0
    for line in lines:
        try:
            got += chunks._chunk(loads_json(line)) is not None
        except BackendError:
            got += 1
    return got


def _line(message: dict[str, Any], **extra: Any) -> bytes:
    return json.dumps({"model": "m", "message": {"role": "assistant", **message},
                       "done": False, **extra}).encode() + b"\n"


OLLAMA_CASES: dict[str, Callable[[int], bytes]] = {
    "content tokens": lambda n: _line({"content": "ab"}) * n + _line({"content": ""}, done=True),
    "thinking tokens": lambda n: _line({"content": "", "thinking": "hm"}) * n,
    "split surrogates": lambda n: (_line({"content": "\ud83d"}) + _line({"content": "\ude00"})) * n,
    "lone surrogates and NULs": lambda n: _line({"content": "\ud800\x00" * 50}) * (n // 10),
    "empty lines that carry nothing": lambda n: _line({"content": ""}) * n,
    "tool_calls lines": lambda n: _line({"content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": {"a": 1}}}]}) * n,
    "one tool call, giant arguments": lambda n: _line({"content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": {"a": "x" * (50 * n)}}}]}),
    "one tool call, wide arguments": lambda n: _line({"content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": {f"k{i}": i for i in range(5 * n)}}}]}),
    "many tool calls in a line": lambda n: _line({"content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": {}}}] * n}),
    "giant string arguments": lambda n: _line({"content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": '{"a": "' + "y" * (50 * n) + '"}'}}]}),
    "huge error string": lambda n: json.dumps({"error": "exceeds " * (10 * n)}).encode(),
    "huge error object": lambda n: json.dumps({"error": {"a": ["x"] * (10 * n)}}).encode(),
    "done line, giant model name": lambda n: json.dumps({
        "model": "m" * (50 * n), "message": {"content": ""}, "done": True,
        "done_reason": "r" * (50 * n), "eval_count": 2**62, "total_duration": 10**18}).encode(),
}


@pytest.mark.parametrize("case", list(OLLAMA_CASES))
def test_ollama_ndjson_lines_are_linear(case: str) -> None:
    assert_linear(_ollama_parse, OLLAMA_CASES[case], 4000, f"ollama[{case}]")


def test_ollama_hostile_numbers_and_nesting_are_protocol_errors() -> None:
    for line in (b'{"message": {"content": "a"}, "eval_count": ' + b"9" * 100_000 + b"}",
                 b'{"message": ' + b"[" * 200_000 + b"}",
                 b'{"message": {"tool_calls": [{"function": {"name": "f", "arguments": '
                 + b"[" * 200_000 + b"}]}}"):
        t0 = time.process_time()
        with pytest.raises(ValueError, match=r"digits|nested|limit"):
            loads_json(line)  # NDJSONReader: BackendProtocolError("malformed NDJSON line")
        assert time.process_time() - t0 < 1.0
    chunks = OllamaChunks(None, "o", "m")  # type: ignore[arg-type]
    # Giant-but-parsed numbers in usage and durations are ignored or clamped, not a crash.
    chunk = chunks._chunk({"message": {"content": ""}, "done": True, "eval_count": 10**300,
                           "prompt_eval_count": -5, "total_duration": 1e308,
                           "eval_duration": "x"})
    assert chunk is not None
    assert chunk.done


# -- The HTTP/1.1 transport's response parsing (h11, fed as the transport feeds it) ------------

def _h11_read(data: bytes, piece: int = 16) -> int:
    """A response's events from h11 configured as ``_Connection`` configures it, fed
    ``piece`` bytes at a time (a hostile server's tiny TCP segments). Returns the events seen;
    a protocol error ends it (the transport raises MalformedResponse)."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    conn.send(h11.Request(method="POST", target="/api/chat", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    events = 0
    try:
        for i in range(0, len(data), piece):
            conn.receive_data(data[i:i + piece])
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    break
                events += 1
                if type(event) is h11.EndOfMessage:
                    return events
    except h11.RemoteProtocolError:
        return -1
    return events


_CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"

H11_CASES: dict[str, Callable[[int], bytes]] = {
    "many 1-byte chunks": lambda n: _CHUNKED_HEAD + b"1\r\nx\r\n" * (5 * n) + b"0\r\n\r\n",
    "many chunks with extensions": lambda n: (
        _CHUNKED_HEAD + b"1;a=b;c=\"d\"\r\nx\r\n" * (2 * n) + b"0\r\n\r\n"),
    "one long chunk extension": lambda n: (
        _CHUNKED_HEAD + b"1;" + b"e" * (10 * n) + b"\r\nx\r\n0\r\n\r\n"),
    "many empty-size-line zeros": lambda n: _CHUNKED_HEAD + b"0" * (10 * n) + b"1\r\nx\r\n",
    "many trailers": lambda n: _CHUNKED_HEAD + b"0\r\n" + b"T: v\r\n" * (2 * n) + b"\r\n",
    "many headers": lambda n: (b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * (2 * n)
                               + b"Content-Length: 1\r\n\r\nx"),
    "a head without its end": lambda n: b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * (2 * n),
    "one header line without end": lambda n: b"HTTP/1.1 200 OK\r\nX: " + b"v" * (10 * n),
    "a big content-length body": lambda n: (
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (20 * n) + b"z" * (20 * n)),
}


@pytest.mark.parametrize("case", list(H11_CASES))
def test_h11_response_parsing_is_linear(case: str) -> None:
    assert_linear(_h11_read, H11_CASES[case], 2000, f"h11[{case}]")


def test_h11_giant_chunk_size_and_head_are_refused_promptly() -> None:
    for data in (_CHUNKED_HEAD + b"F" * 200_000 + b"\r\n",  # a chunk-size line of 200 KB
                 _CHUNKED_HEAD + b"FFFFFFFFFFFFFFFFFFFFFFFF\r\n",  # a size past 2**64
                 b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 100_000,  # a head past MAX_HEAD
                 _CHUNKED_HEAD + b"1;" + b"e" * 200_000):  # an extension past MAX_HEAD
        t0 = time.process_time()
        assert _h11_read(data, 1024) == -1
        assert time.process_time() - t0 < 1.0


async def _serve_raw(response: bytes,  # noqa: ASYNC114
                     task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """A raw upstream on 127.0.0.1 that answers every request with ``response``, bytes as
    given (written in one go; the kernel splits it as it likes)."""
    async def handler(stream: trio.SocketStream) -> None:
        buf = b""
        with trio.move_on_after(10):
            while b"\r\n\r\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
            await stream.send_all(response)
            await stream.aclose()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


async def test_transport_reads_many_tiny_chunks_from_a_real_socket_linearly() -> None:
    """The transport's ``_Body`` over a real socket: a body of N one-byte chunks (the shape of
    a server flushing every token unbuffered) is read in time linear in N."""
    async def read(port: int) -> tuple[float, int]:
        transport = PlainHTTPTransport(limits=httpx.Limits(),
                                       tls=httpx.AsyncHTTPTransport())
        async with httpx.AsyncClient(transport=transport) as client:
            t0 = time.process_time()
            got = 0
            async with client.stream("GET", f"http://127.0.0.1:{port}/") as resp:
                async for data in resp.aiter_raw():
                    got += len(data)
            return time.process_time() - t0, got

    times: list[float] = []
    ratio = 0.0
    for _ in range(2):  # measured again once: a spike on a shared machine is no defect
        times = []
        for n in (20_000, 40_000):
            body = _CHUNKED_HEAD + b"1\r\nx\r\n" * n + b"0\r\n\r\n"
            async with trio.open_nursery() as nursery:
                port = await nursery.start(_serve_raw, body)
                with trio.fail_after(30):
                    best = min([await read(port) for _ in range(2)])
                nursery.cancel_scope.cancel()
            assert best[1] == n
            times.append(best[0])
        ratio = times[1] / max(times[0], 1e-6)
        if ratio < LINEAR or times[1] <= 0.05:
            break
    assert ratio < LINEAR or times[1] <= 0.05, (times, ratio)


# -- Upstream error bodies (read up to MAX_ERROR_BODY = 64 KiB) --------------------------------

ERROR_BODY_CASES: dict[str, Callable[[int], bytes]] = {
    "words near context": lambda n: b"exceeds too long " * n,
    "quoted raw": lambda n: b"raw='" * (3 * n) + b"', err=" * (2 * n),
    "openai object": lambda n: json.dumps({"error": {"message": "m" * (15 * n),
                                                     "type": "t", "code": 400}}).encode(),
    "error list": lambda n: json.dumps({"error": ["e"] * (4 * n)}).encode(),
    "invalid utf-8": lambda n: b"\xff\xfe" * (8 * n),
    "open brackets": lambda n: b"[" * (15 * n),
}


@pytest.mark.parametrize("case", list(ERROR_BODY_CASES))
def test_error_bodies_are_linear(case: str) -> None:
    def parse(body: bytes) -> None:
        for status in (400, 404, 429, 500, 503):
            error_from_status(status, body, backend="b", model="m")
    # 2,000 -> 4,000 units: ~32-64 KiB, the size the transport reads of an error body.
    assert_linear(parse, ERROR_BODY_CASES[case], 2000, f"error_from_status[{case}]")


# -- /v1/chat/completions: the request ---------------------------------------------------------

def _v1(body: dict[str, Any]) -> None:
    """The request path's parse: strict JSON, depth check, validation, the run's history."""
    raw = json.dumps(body)
    value = strict_json_loads(raw)
    assert not too_deep(value, raw)
    req = ChatCompletionRequest.model_validate(value)
    _to_history(req.messages)


def _deep_schema(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"p": schema, "q": {"type": "integer"}}}
    return schema


def _tool(i: int, depth: int = 60) -> dict[str, Any]:
    return {"type": "function", "function": {"name": f"t{i}", "description": "d",
                                             "parameters": _deep_schema(depth)}}


_USER = {"role": "user", "content": "hi"}

V1_CASES: dict[str, Callable[[int], dict[str, Any]]] = {
    "thousands of messages": lambda n: {"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}] * n},
    "text parts": lambda n: {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "x"}] * (2 * n)}]},
    "tool results by name": lambda n: {"messages": [
        {"role": "assistant", "tool_calls": [{"id": None, "function": {"name": f"f{i}"}}
                                             for i in range(n // 4)]}]
        + [{"role": "tool", "name": f"f{i}", "content": "r"} for i in range(n // 4)]
        + [_USER]},
    "assistant tool calls": lambda n: {"messages": [
        m for i in range(n) for m in (
            {"role": "assistant", "tool_calls": [
                {"id": f"c{i}", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
            {"role": "tool", "tool_call_id": f"c{i}", "content": "r"})] + [_USER]},
    "giant tool-call arguments": lambda n: {"messages": [
        {"role": "assistant", "tool_calls": [{"id": "c", "function": {
            "name": "f", "arguments": json.dumps({"a": ["x"] * (20 * n)})}}]},
        {"role": "tool", "tool_call_id": "c", "content": "r"}, _USER]},
    "many tools, deep schemas": lambda n: {"messages": [_USER],
                                           "tools": [_tool(i) for i in range(n // 20)],
                                           "tool_choice": {"type": "function",
                                                           "function": {"name": "t0"}}},
    "stop list": lambda n: {"messages": [_USER], "stop": ["s" * 10] * (5 * n)},
    "logit_bias map": lambda n: {"messages": [_USER],
                                 "logit_bias": {str(i): 1 for i in range(5 * n)}},
    "extra fields": lambda n: {"messages": [_USER], "metadata": {f"k{i}": "v"
                                                                 for i in range(5 * n)}},
}


@pytest.mark.parametrize("case", list(V1_CASES))
def test_v1_request_parse_is_linear(case: str) -> None:
    assert_linear(_v1, V1_CASES[case], 2000, f"/v1 request[{case}]")


def test_v1_deep_or_huge_numbers_are_refused_promptly() -> None:
    for raw in ('{"messages": [{"role": "user", "content": "x"}], "tools": '
                + "[" * 100_000 + "]" * 100_000 + "}",
                '{"messages": [{"role": "user", "content": "x"}], "seed": '
                + "9" * 100_000 + "}"):
        t0 = time.process_time()
        try:
            value = strict_json_loads(raw)
        except (ValueError, RecursionError):
            value = None
        assert value is None or too_deep(value, raw)
        assert time.process_time() - t0 < 1.0


# -- The walk for lone surrogates (every JSON field of every request; every model tool call) ---

def _long_key(n: int) -> dict[str, Any]:
    """A long key over many children: ``{"kkk...k": [0, 0, ...]}`` (10n + 2n characters)."""
    return {"k" * (10 * n): [0] * n}


def _tools_body(n: int) -> dict[str, Any]:
    return {"messages": [_USER], "tools": [{"type": "function", "function": {
        "name": "f", "parameters": _long_key(n)}}]}


def test_lone_surrogate_walk_is_linear_under_a_long_key() -> None:
    """Fixed (was: DEFECT: ``service.text.not_text_at`` is quadratic: at every child of a dict
    or list it builds the child's dotted path as a new string (``f"{path}.{key}"``), whether or
    not any surrogate is there, so the cost is (the length of the path so far) x (the number of
    children). Input: one long key over a wide list, ``{"k" * 10n: [0] * n}`` (12n characters of
    JSON). Measured on this machine (2 cores, shared): n=20,000 (240 KB) 0.10 s, 40,000 (480 KB)
    0.41 s, 80,000 (960 KB) 2.9 s; through ``ChatCompletionRequest.model_validate`` with that
    object as a tool's ``parameters``: 0.11 s at 240 KB, 0.43 s at 480 KB (4x per doubling). At
    fault: service/text.py ``not_text_at`` (lines 93-100: ``here =
    f"{path}.{clean_text(str(key))}" if path else ...`` computed before the check, for every
    item). It runs on the event loop for every JSON field of every request body
    (service/api/models.py ``Unicode._unicode``, line 84: ``tools``, ``response_format``,
    ``logit_bias``, ``content`` parts, WebSocket messages), again for every model call of a run
    (service/agents/base.py ``unicode_request``, line 49, over ``request.tools`` and
    ``options``), and on every tool call a model sends (``_unicode_call``, line 71/345: an
    upstream's arguments object, up to a 4 MiB NDJSON/SSE line). Why it matters: one request
    under the 1 MiB body limit freezes the whole process for seconds (every stream, heartbeat
    and lease renewal with it); see the end-to-end test below. A fix: build the path only when a
    surrogate is found (return the key, then prefix on the way out).)"""
    assert_linear(not_text_at, _long_key, 10_000, "not_text_at[long key]", reps=1)
    assert_linear(lambda body: ChatCompletionRequest.model_validate(body), _tools_body,
                   10_000, "ChatCompletionRequest[tools long key]", reps=1)

    def run_call(n: int) -> ChatRequest:
        return ChatRequest(messages=(ChatMessage("user", "hi"),), tools=(
            {"type": "function", "function": {"name": "f", "parameters": _long_key(n)}},))
    assert_linear(unicode_request, run_call, 10_000, "unicode_request[tools]", reps=1)


def test_lone_surrogate_walk_is_linear_when_deep() -> None:
    """Depth alone (the API's bound is MAX_JSON_DEPTH = 128 levels) with short keys: linear."""
    def make(n: int) -> Any:
        return [{"a": {"b": [list(range(5))] * (n // 10)}}]
    assert_linear(not_text_at, make, 40_000, "not_text_at[wide]")
    assert_linear(not_text_at, lambda n: [_deep_schema(100)] * (n // 400),
                   40_000, "not_text_at[deep schemas]")


HOSTILE_N = 70_000  # a 700 KB key over 70,000 zeros: a 910 KB body, under the 1 MiB limit
VICTIM_TOKENS = 600
VICTIM_GAP = 0.005


async def test_a_v1_request_with_a_long_key_does_not_stall_another_users_stream(
        tmp_path: Path) -> None:
    """Fixed (was: DEFECT: end to end, one client's ``POST /v1/chat/completions`` stalls ANOTHER
    user's live tokens. Setup: the real app under hypercorn (127.0.0.1:0) over a scripted model.
    Run A (chat) streams 600 tokens 5 ms apart (``POST /api/conversations/{id}/messages``,
    ``stream: true``). At A's 300th token, a second client posts ``/v1/chat/completions`` with
    one tool whose ``parameters`` is ``{"k" * 700_000: [0] * 70_000}`` (910 KB as ``json.dumps``
    writes it, under SERVICE_MAX_BODY_BYTES = 1 MiB). Assertion: A's largest token gap while B
    is handled < 5x its largest gap before B (floor 1 s). Measured: A's largest gap 0.008 s
    before B, 4.17 s while B was handled (501x): ``not_text_at`` in the request's validation,
    then again in the run's ``unicode_request``. At fault: service/text.py ``not_text_at``
    (quadratic path building, see the test above), called on the event loop by
    service/api/models.py ``Unicode._unicode`` and service/agents/base.py
    ``unicode_request``.)"""
    def model(req: Any) -> Reply:
        if req.messages[-1].content.startswith("victim"):
            return Reply("tok " * VICTIM_TOKENS, gap=VICTIM_GAP)
        return Reply("ok")

    hostile_body = json.dumps(_tools_body(HOSTILE_N)).encode()
    settings = load_settings(db=tmp_path / "s.db")
    statuses: list[int] = []
    async with running_server(settings, ScriptedBackend(model)) as srv, \
            srv.client() as client, srv.client() as other:
        with trio.fail_after(90):
            conv = (await client.post("/api/conversations", json={"agent": "chat"})).json()["id"]

            async def hostile() -> None:
                r = await other.post("/v1/chat/completions", content=hostile_body,
                                     headers={"Content-Type": "application/json"})
                statuses.append(r.status_code)

            baseline, stall = await gaps_around(client, conv, hostile)
    assert statuses, "the /v1 request got no answer"
    assert statuses[0] < 500, statuses
    assert stall < max(5 * baseline, 1.0), (
        f"run A's largest token gap: {baseline:.3f}s before, {stall:.3f}s while a "
        f"{len(hostile_body)}-byte /v1 request was handled ({stall / baseline:.0f}x)")


# -- History: building, trimming, shortening ---------------------------------------------------

def _stored(n: int) -> tuple[Conversation, list[Message]]:
    conv = Conversation("c", None, "sys", None, None, None, 0.0, 0.0)
    msgs = []
    for i in range(n):
        for role, status in (("user", MessageStatus.complete), ("assistant",
                             MessageStatus.complete if i % 3 else MessageStatus.error)):
            msgs.append(Message(f"m{i}{role}", "c", role, "text " * 4, status, None, None,
                                0.0, 0.0))
    return conv, msgs


def _chat(n: int) -> list[ChatMessage]:
    call = ToolCall("c", "f", {"a": "b"})
    out = [ChatMessage("system", "s")]
    for _ in range(n):
        out += [ChatMessage("user", "question " * 3), ChatMessage("assistant", "", (call,)),
                ChatMessage("tool", "result", (), "c"), ChatMessage("assistant", "answer")]
    return [*out, ChatMessage("user", "last")]


def test_history_building_and_shortening_are_linear_in_messages() -> None:
    assert_linear(lambda cm: build_history(*cm), _stored, 4000, "build_history")
    assert_linear(lambda h: trim_history(h, 10**9), _chat, 2000, "trim_history[all fit]")
    assert_linear(lambda h: trim_history(h, len(h) * 20), _chat, 2000, "trim_history[half]")
    assert_linear(lambda h: shorter_history(h, 0.5), _chat, 2000, "shorter_history[half]")
    assert_linear(lambda h: shorter_history(h, 0.0), _chat, 2000, "shorter_history[all]")
    assert_linear(lambda h: fitted_history(h, h, 10**6, 10), _chat, 2000, "fitted_history")
    assert_linear(lambda h: fitted_history(h, h[len(h) // 2:], 10**6, 10**5, (2 * 10**6,
                                                                               10**7)),
                   _chat, 2000, "fitted_history[measured]")


# -- POST .../messages content, titles --------------------------------------------------------

CONTENT_CASES: dict[str, Callable[[int], str]] = {
    "plain": lambda n: "a" * (100 * n),
    "NULs": lambda n: "\x00" * (100 * n),
    "surrogate pairs": lambda n: "\ud83d\ude00" * (50 * n),
    "lone surrogates": lambda n: "\ud800" * (100 * n),
    "mixed": lambda n: "a\x00\ud83d\ude00\udc00" * (25 * n),
}


@pytest.mark.parametrize("case", list(CONTENT_CASES))
def test_message_content_validation_and_clean_text_are_linear(case: str) -> None:
    make = CONTENT_CASES[case]

    def validate(text: str) -> None:
        with contextlib.suppress(ValueError):  # a lone surrogate or NUL: a 422 naming it
            PostMessage.model_validate({"content": text, "stream": True})
    # 5,000 -> 10,000: 500 KB to 1,000,000 characters (MAX_CONTENT_CHARS).
    assert_linear(validate, make, 5000, f"PostMessage[{case}]")
    assert_linear(clean_text, make, 5000, f"clean_text[{case}]")


def test_title_and_system_validation_are_bounded() -> None:
    for title in ("\x00" * 10**6, "t" * 10**6, "\ud800" * 10**6):
        t0 = time.process_time()
        with pytest.raises(ValueError, match="title"):
            CreateConversation.model_validate({"title": title})
        assert time.process_time() - t0 < 1.0
    assert_linear(lambda s: CreateConversation.model_validate({"system": s}),
                   lambda n: "s" * (10 * n), 5000, "CreateConversation[system]")


# -- The terminal client's renderer (client side) ----------------------------------------------

def _render_tokens(n: int) -> float:
    out = Console(file=io.StringIO(), force_terminal=False, width=100)
    err = Console(file=io.StringIO(), force_terminal=False)
    r = Renderer(out, err)
    r.started("chat")
    t0 = time.process_time()
    for _ in range(n):
        r.token("abcd ")
    return time.process_time() - t0


def test_renderer_tokens_in_a_pipe_are_linear() -> None:
    """Fixed (was: DEFECT: the terminal client's ``Renderer.token`` is quadratic in an answer's
    tokens. Input: ``python -m service chat`` in a pipe (or a terminal, once the answer is
    taller than the screen), an answer of n tokens of 5 characters. Measured in this test
    (pytest): 30,000 tokens 0.12 s, 60,000 0.43-0.48 s (ratio 3.5-3.7, three runs); a plain
    script: 50,000 (250 KB) 0.46 s, 100,000 (500 KB) 2.3 s, 200,000 (1 MB) 21 s (in some fresh
    processes the allocator hides it: 0.03/0.06/0.12 s; a bare ``obj.attr += s`` loop: 100k 3.7
    s, 200k 16 s). At fault: service/chat_render.py ``Renderer.token``, line 69 ``self._segment
    += text`` and line 88 ``self._printed += text``: CPython's in-place string concatenation
    only avoids the copy for a local variable, so each token copies everything received so far
    (twice). Why it matters: client side only (the server is not stalled), but a long answer (a
    1 MB code dump, a looping model) freezes the client's terminal for tens of seconds, growing
    with the square of the answer. A fix: keep lists of pieces (``"".join`` when needed).)"""
    for _ in range(2):  # measured again once: a spike on a shared machine is no defect
        t1 = min(_render_tokens(30_000) for _ in range(2))
        t2 = min(_render_tokens(60_000) for _ in range(2))
        ratio = t2 / max(t1, 1e-6)
        if ratio < LINEAR or t2 <= 0.05:
            break
    assert ratio < LINEAR or t2 <= 0.05, (
        f"Renderer.token: 30,000 tokens {t1:.3f}s, 60,000 tokens {t2:.3f}s, ratio {ratio:.2f}")
