"""Review (dec07a) of the Ollama adapter (service/backends/ollama.py and the HTTP plumbing it
reads its streams with) and of ``auto``'s failover as far as Ollama is involved, against what a
real Ollama server sends and accepts (ollama/ollama docs/api.md, docs.ollama.com/api/errors,
Ollama's server/routes.go). The failing tests, one defect each:

1. Under ``auto`` a conversation that failed over once from Ollama to the lower tier (a 503,
   a restart, a first-chunk timeout) stays on the lower tier for good, though Ollama is back
   and idle: ``FleetBackend.route`` (service/backends/router.py) ranks the conversation's
   server ("home") before ``priority``, and ``served`` made the fallback its home.
2. Ollama's own error for a tool call it cannot parse quotes the model's output (``error
   parsing tool call: raw='...'``); read mid-stream by ``OllamaChunks._chunk`` with the loose
   "context" word match, the model's slip becomes ``context_length_exceeded`` (400, param
   ``messages``), as the client is told and the run is stored.

Two passing tests pin Ollama's wire shapes (tool calls in several chunks; the documented
mid-stream error line, told and stored alike). Each upstream is a real server on 127.0.0.1:0:
the protocol-true simulator (``service.sim``) or raw bytes written by the test
(``tests/raw_upstream.py``), read through the service's own client and adapters. Nothing here
depends on time; timeouts are hang guards only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from service.backends.base import ChatMessage, ChatRequest
from service.backends.http import Budgets, make_client
from service.backends.ollama import OllamaBackend
from service.backends.openai_compat import OpenAICompatBackend
from service.backends.router import FleetBackend, Member
from service.errors import BackendResponseError, ContextLengthExceeded
from service.settings import BackendKind, Settings
from service.sim import Reply, Simulator, open_simulator

from .raw_upstream import END, NDJSON_HEAD, call_raw, chunk, json_response, serve_routes
from .servers import running_server

GUARD = 30  # seconds any test here may take before it fails (a hang guard)
BUDGETS = Budgets(connect=3.0, first_chunk=10.0, gap=5.0, call=100.0)
TAGS = json_response("200 OK", json.dumps({"models": [
    {"name": "llama3:latest", "model": "llama3:latest"}]}).encode())


def _turn(text: str, conversation: str) -> ChatRequest:
    # No model named (as a native conversation on ``auto`` without SERVICE_DEFAULT_MODEL):
    # each server answers with its own.
    return ChatRequest(messages=(ChatMessage("user", text),), model=None,
                       conversation_id=conversation)


# -- 1. auto: a conversation that failed over once to the lower tier stays there --------------


async def test_auto_conversation_returns_to_ollama_after_a_one_off_failover() -> None:
    """Defect: under ``auto`` Ollama's servers come before llama.cpp's, and "a lower tier is
    a fallback, not an overflow" (docs/architecture.md, "Backend fleets"). (router.py's own
    step 3a ranks the conversation's server first, for its prompt cache; that is right within
    a tier, and is what goes wrong across tiers.) Ollama answers one call 503 (its queue
    full: ``server busy, please try again. maximum pending requests exceeded``); that call
    fails over to the llama.cpp server, which becomes the conversation's "home"
    (``FleetBackend.served``). Ollama is fine again at once (one failure: no cool-down, and
    a 503 with a status does not mark it unready), yet every later turn of the conversation
    goes to the lower tier: ``route``'s sort key puts ``not home`` before ``priority``. The
    affinity exists for the prompt cache, which a server of another tier (another model:
    none is named) does not have for this conversation; the conversation has silently
    changed models for good (with the embedded demo as the lower tier: to gibberish).
    Expected: the next turn goes back to Ollama."""
    ollama = Simulator(("llama3:latest",), default=Reply(text="from ollama"))
    ollama.script(Reply(status=503, error="server busy, please try again.  maximum pending "
                                         "requests exceeded"))
    llama = Simulator(("sim-model",), default=Reply(text="from llamacpp"))
    answers: list[tuple[str, str]] = []
    with trio.fail_after(GUARD):
        async with open_simulator(ollama), open_simulator(llama), \
                make_client(BUDGETS) as client:
            fleet = FleetBackend(
                [OllamaBackend("ollama", ollama.url, client, BUDGETS),
                 OpenAICompatBackend("llamacpp", llama.url, client, BUDGETS)],
                [Member(kind="ollama", priority=0), Member(kind="llamacpp", priority=1)],
                inventory_ttl=600.0)
            try:
                for text, conversation in (("first", "conv-1"), ("other", "conv-2"),
                                           ("second", "conv-1"), ("third", "conv-1")):
                    result = await fleet.chat(_turn(text, conversation))
                    answers.append((result.backend, result.message.content))
            finally:
                await fleet.aclose()
    # The first turn fell back, as it should; Ollama then serves a new conversation at once
    # (it is up, idle, not cooling down: the failover left it usable).
    assert answers[:2] == [("llamacpp", "from llamacpp"), ("ollama", "from ollama")], answers
    assert [s.status for s in ollama.streams[:2]] == [503, 200], ollama.streams
    # The first conversation's later turns go back to it too, the higher tier.
    assert answers[2:] == [("ollama", "from ollama")] * 2, answers


async def test_auto_conversation_stays_on_the_fallback_as_its_client_and_store_see_it(
    settings: Settings,
) -> None:
    """Defect (the client's view of the one above, the backend built from the settings as in
    production: ``SERVICE_BACKEND=auto``, no default model): a native conversation whose first
    turn met a one-off Ollama failure (a 503 before any token) is answered by the llama.cpp
    server from then on; its second turn's stream names ``sim-model``, the store's run says
    ``sim-model`` and its one LLM call went to ``llamacpp``, though Ollama is up and
    ``/api/backends`` shows it ready and not cooling down."""
    ollama = Simulator(("llama3:latest",), default=Reply(text="from ollama"))
    ollama.script(Reply(status=503, error="server busy, please try again.  maximum pending "
                                         "requests exceeded"))
    llama = Simulator(("sim-model",), default=Reply(text="from llamacpp"))
    with trio.fail_after(GUARD):
        async with open_simulator(ollama), open_simulator(llama):
            conf = settings.model_copy(update={
                "backend": BackendKind.auto, "ollama_url": ollama.url,
                "llamacpp_url": llama.url})
            async with running_server(conf, from_settings=True) as server, \
                    server.client() as c:
                conv = (await c.post("/api/conversations", json={})).json()["id"]
                replies = []
                for text in ("first", "second"):
                    r = await c.post(f"/api/conversations/{conv}/messages",
                                     json={"content": text})
                    assert r.status_code == 200, r.text
                    replies.append(r.json())
                run = (await c.get(f"/api/runs/{replies[1]['run']['id']}")).json()
                calls = (await c.get("/api/llm-calls",
                                     params={"run_id": run["id"]})).json()["data"]
                members = {b["name"]: b for b in (await c.get("/api/backends")).json()["data"]}
    assert replies[0]["message"]["content"] == "from llamacpp", replies[0]
    assert (members["ollama"]["ready"], members["ollama"]["cooldown"]) == (True, None), members
    assert replies[1]["message"]["content"] == "from ollama", replies[1]
    assert run["model"] == "llama3:latest", run
    assert [c["backend"] for c in calls] == ["ollama"], calls


# -- pinned: Ollama's own wire shapes, as its docs give them -----------------------------------


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _message(content: str = "", *, done: bool = False, **extra: Any) -> dict[str, Any]:
    message = {"role": "assistant", "content": content, **extra.pop("message", {})}
    return {"model": "llama3:latest", "created_at": "2026-12-07T00:00:00Z",
            "message": message, "done": done, **extra}


def _ndjson(*lines: bytes) -> Callable[[trio.SocketStream], Awaitable[None]]:
    async def respond(stream: trio.SocketStream) -> None:
        await stream.send_all(NDJSON_HEAD)
        for data in lines:
            await stream.send_all(chunk(data))
        await stream.send_all(END)
    return respond


async def test_ollama_tool_calls_from_several_chunks_are_all_kept() -> None:
    """Pinned: since streaming tool calls (ollama.com/blog/streaming-tool), Ollama sends each
    parsed call in a chunk of its own, before the ``done`` one, with ``arguments`` as a JSON
    object and no id, and says ``done_reason: "stop"``; several calls may share a chunk.
    Every call is kept, each with an id of its own, and the answer ends ``tool_calls``."""
    def call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        return {"function": {"name": name, "arguments": arguments}}
    respond = _ndjson(
        _line(_message("Let me look. ")),
        _line(_message(message={"tool_calls": [call("get_weather", {"city": "Paris"})]})),
        _line(_message(message={"tool_calls": [call("get_weather", {"city": "Rome"}),
                                                call("get_time", {"tz": "CET"})]})),
        _line(_message(done=True, done_reason="stop", prompt_eval_count=12, eval_count=30)))
    with trio.fail_after(GUARD):
        out = await call_raw(respond, protocol="ollama")
    assert out.error is None, out
    calls = [c for ch in out.chunks for c in ch.tool_calls]
    assert [(c.name, c.arguments) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"}),
        ("get_time", {"tz": "CET"})]
    assert len({c.id for c in calls}) == 3, calls
    last = out.chunks[-1]
    assert (last.done, last.finish_reason, last.usage.prompt_tokens,
            last.usage.completion_tokens) == (True, "tool_calls", 12, 30), last
    assert out.text == "Let me look. "


async def test_ollama_error_line_mid_answer_is_told_and_stored_alike(settings: Settings) -> None:
    """Pinned: "If an error occurs mid-stream, the error will be returned as an object in the
    application/x-ndjson format with an error property. Since the response has already
    started, the status code of the response will not be changed" (docs.ollama.com/api/errors:
    ``{"error":"an error was encountered while running the model"}``, no ``done``). The native
    stream's client sees the tokens, an ``error`` event and a failed ``run.finished``; the
    store then holds the same: the partial reply, the error, the run failed."""
    chat = NDJSON_HEAD + b"".join(chunk(x) for x in (
        _line(_message("Hello ")), _line(_message("world")),
        _line({"error": "an error was encountered while running the model"}))) + END
    routes = {"/api/tags": TAGS, "/api/ps": json_response("200 OK", b'{"models": []}'),
              "/api/chat": chat}
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_routes, routes)
            conf = settings.model_copy(update={
                "backend": BackendKind.ollama, "ollama_url": f"http://127.0.0.1:{port}"})
            async with running_server(conf, from_settings=True) as server, \
                    server.client() as c:
                conv = (await c.post("/api/conversations", json={})).json()["id"]
                r = await c.post(f"/api/conversations/{conv}/messages",
                                 json={"content": "hi", "stream": True})
                stored = (await c.get(f"/api/conversations/{conv}")).json()["messages"][-1]
                run = (await c.get(f"/api/runs/{stored['run_id']}")).json()
            nursery.cancel_scope.cancel()
    events = [(e, json.loads(d)) for e, d in re.findall(r"event: (\S+)\ndata: (.*)\n", r.text)]
    told = "".join(d["text"] for e, d in events if e == "token")
    errors = [d for e, d in events if e == "error"]
    finished = events[-1]
    assert told == "Hello world", events
    assert [e["type"] for e in errors] == ["backend_response_error"], events
    assert (finished[0], finished[1]["status"]) == ("run.finished", "failed"), events
    assert (stored["content"], stored["status"]) == ("Hello world", "error"), stored
    assert stored["error"] == "an error was encountered while running the model", stored
    assert (run["status"], run["error"]) == ("failed", stored["error"]), run


# -- 2. a model's malformed tool call, quoted in Ollama's error, read as "prompt too long" -------

# Ollama's streamed error when it cannot parse the tool call its model wrote quotes the model's
# output: ``error parsing tool call: raw='...', err=...`` (ollama/ollama#12884: thinking chunks,
# then this line mid-stream, after the 200; #17638, #12064: the same words). The raw text is the
# model's, here a file it was writing.
TOOL_PARSE_ERROR = (
    "error parsing tool call: raw='{\"path\":\"notes.md\",\"content\":\"Keep each summary "
    "short: a page that is too long for the context window gets cut.', "
    "err=unexpected end of JSON input")


def _thinking_then_tool_parse_error() -> bytes:
    return NDJSON_HEAD + b"".join(chunk(x) for x in (
        _line(_message(message={"thinking": "I will write the notes file."})),
        _line({"error": TOOL_PARSE_ERROR}))) + END


async def test_a_tool_call_parse_error_is_not_a_context_error_at_the_adapter() -> None:
    """Defect: ``OllamaChunks._chunk`` (service/backends/ollama.py) runs
    ``ContextLengthExceeded.said`` over a mid-stream error line's whole text with the loose
    ``_WORDS`` pattern (``too long.{0,60}context``); Ollama's tool-call parse error embeds the
    model's own output (``raw='...'``), and any such output near those words ("too long for
    the context window") makes the model's malformed tool call a ``ContextLengthExceeded``:
    the request's fault, 400 ``context_length_exceeded``, param ``messages``. Expected: the
    upstream's failure as such (``BackendResponseError``, 502)."""
    async def respond(stream: trio.SocketStream) -> None:
        await stream.send_all(_thinking_then_tool_parse_error())
    with trio.fail_after(GUARD):
        out = await call_raw(respond, protocol="ollama")
    assert isinstance(out.error, BackendResponseError), repr(out.error)
    assert not isinstance(out.error, ContextLengthExceeded), repr(out.error)


async def test_a_tool_call_parse_error_reaches_a_v1_client_as_a_backend_error(
    settings: Settings,
) -> None:
    """Defect (the client's view of the one above): a ``/v1`` client whose model wrote a
    malformed tool call is told 400 ``context_length_exceeded`` (param ``messages``: "your
    prompt is too long"), an error OpenAI SDK users handle by cutting their history, and the
    run is stored with that type; expected 502 ``backend_response_error`` carrying Ollama's
    words, and the same in the store."""
    routes = {"/api/tags": TAGS, "/api/ps": json_response("200 OK", b'{"models": []}'),
              "/api/chat": _thinking_then_tool_parse_error()}
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_routes, routes)
            conf = settings.model_copy(update={
                "backend": BackendKind.ollama, "ollama_url": f"http://127.0.0.1:{port}"})
            async with running_server(conf, from_settings=True) as server, \
                    server.client() as c:
                r = await c.post("/v1/chat/completions", json={
                    "model": "llama3", "messages": [{"role": "user", "content": "notes?"}],
                    "tools": [{"type": "function", "function": {
                        "name": "write_file", "parameters": {"type": "object"}}}]})
                error = r.json()["error"]
                run = (await c.get(f"/api/runs/{error['run_id']}")).json()
            nursery.cancel_scope.cancel()
    assert (r.status_code, error["type"]) == (502, "backend_response_error"), r.text
    assert error["message"].startswith("error parsing tool call"), error
    assert (run["status"], run["error"]) == ("failed", error["message"]), run
