"""A review of the streaming surface (2026-12-06): SSE re-joins, the handle's window, and the
OpenAI-compatible stream. Each test asserts the right behaviour and failed on the code as
reviewed. Real hypercorn server on 127.0.0.1:0 (tests/servers.py), in-memory scripted backend
(tests/fakes.py); the official ``openai`` SDK where a client's reading matters; a passing store
read failure injected through the store's own fault hook (``store.faults.before_read``)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import trio

from service.errors import StoreUnavailable
from service.settings import Settings

from ..fakes import Reply, ScriptedBackend, by_content
from ..servers import running_server
from ..streams import parse_sse

GUARD = 30  # seconds any single wait may take before the test fails

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


def _chunks(text: str) -> list[dict[str, Any]]:
    """The JSON chunks of a /v1 stream, in order ([DONE] and comments left out)."""
    return [json.loads(line[len("data: "):]) for line in text.split("\n")
            if line.startswith("data: {")]


async def test_v1_stream_with_include_usage_has_usage_null_on_every_other_chunk(
    settings: Settings,
) -> None:
    """OpenAI's reference for ``stream_options.include_usage`` (the field API.md lists for
    ``POST /v1/chat/completions``): "an additional chunk will be streamed before the
    data: [DONE] message. The usage field on this chunk shows the token usage statistics for
    the entire request, and the choices field will always be an empty array. All other chunks
    will also include a usage field, but with a null value." The service's chunks carry no
    ``usage`` key at all (service/api/openai.py ``_chunk`` and the token fast path
    ``_token_prefix``/``_TOKEN_SUFFIX``): a client reading the raw JSON as OpenAI documents it
    (``chunk["usage"]``, typed decoders with a required nullable field) fails on the first
    chunk. Expected: with ``include_usage`` every chunk but the last has ``"usage": null``."""
    async with running_server(settings, ScriptedBackend(by_content)) as srv, \
            srv.client() as client:
        with trio.fail_after(GUARD):
            r = await client.post("/v1/chat/completions", json={
                "model": "fake-model", "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "hello there"}]})
    assert r.status_code == 200, r.text[:300]
    assert r.text.rstrip().endswith("data: [DONE]"), r.text[-200:]
    chunks = _chunks(r.text)
    *others, last = chunks
    assert last["choices"] == [], last
    assert last["usage"]["total_tokens"] > 0, last
    assert others, chunks
    missing = [c for c in others if "usage" not in c or c["usage"] is not None]
    assert not missing, (
        f"{len(missing)} of {len(others)} chunks before the usage chunk have no "
        f"\"usage\": null, e.g. {missing[0]}")


def _tool_call_answers(base_url: str) -> tuple[Any, Any]:
    """The same tool-call-only answer, non-streamed and streamed, as the openai SDK gives
    them (the stream accumulated by the SDK's own helper)."""
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    try:
        body: dict[str, Any] = {"model": "fake-model", "tools": TOOLS,
                                "messages": [{"role": "user", "content": "tools please"}]}
        plain = client.chat.completions.create(**body).choices[0].message
        with client.chat.completions.stream(**body) as stream:
            streamed = stream.get_final_completion().choices[0].message
        return plain, streamed
    finally:
        client.close()


async def test_v1_streamed_tool_call_answer_has_content_null_as_the_non_stream_one(
    settings: Settings,
) -> None:
    """A completion whose answer is tool calls and no text: the non-stream answer says
    ``content: null`` (service/api/openai.py ``chat_completions``: "OpenAI's: a message of tool
    calls and no text has content null (a client may tell the two kinds of answer apart by
    it)"). The stream of the very same answer opens with a role chunk
    ``{"role": "assistant", "content": ""}`` (``_stream``'s ``frame``: the role chunk is
    made before it is known whether text follows, though it is sent with the first frame,
    here the tool calls), so the message an OpenAI SDK accumulates from the stream has
    ``content == ""``: streamed and not, one answer reads as two kinds (OpenAI itself streams
    such an answer with ``"content": null``). API.md: "any OpenAI SDK or client works
    unchanged". Expected: the streamed message's content is null, as the non-stream one's."""
    async with running_server(settings, ScriptedBackend(by_content)) as srv:
        with trio.fail_after(GUARD):
            plain, streamed = await trio.to_thread.run_sync(_tool_call_answers, srv.url)
    assert plain.tool_calls, plain
    assert streamed.tool_calls, streamed
    assert plain.content is None, plain
    assert streamed.content == plain.content, (
        f"streamed: content={streamed.content!r}; non-stream: content={plain.content!r}")


async def _rejoin_past_with_one_read_lost(client: httpx.AsyncClient, store: Any,
                                          run_id: str) -> httpx.Response:
    """A re-join at ``Last-Event-ID: 999`` while the store loses its first read of the run's
    events (a passing ``StoreUnavailable``: a lost connection)."""
    failed: list[str] = []

    def one_lost_read(op: str) -> None:
        if op == "list_run_events" and not failed:
            failed.append(op)
            raise StoreUnavailable("store read failed: the connection was lost")

    store.faults.before_read = one_lost_read
    try:
        with trio.fail_after(GUARD):
            r = await client.get(f"/api/runs/{run_id}/events", headers={"Last-Event-ID": "999"})
    finally:
        store.faults.before_read = None
    assert failed, "the fault was not reached"
    return r


async def test_a_past_last_event_id_on_a_live_run_is_not_a_stream_that_ends_with_nothing(
    settings: Settings,
) -> None:
    """``GET /api/runs/{id}/events`` with a ``Last-Event-ID`` past a live run's events is
    refused 422 (docs/api.md: "an id past a run's last event ... gets 422 naming
    ``Last-Event-ID`` or ``after``, on a finished run as on a live one"), because followed,
    "the stream would wait for the run's end and then close without it" (service/api/runs.py
    ``run_events``). That check reads the run's event ``after`` from the store
    (``_event_type``); when that one read fails (a passing ``StoreUnavailable``: a lost
    connection), ``_event_type`` answers ``""`` ("the stream then reads the store again and
    reports its failure in a frame") and the stream is started at that id. But a run live
    on this instance is followed from its handle (``EventReader._follow_live``: ``covers()``
    holds for any id past the window's start), not by reading the store: no failure is ever
    reported, and the stream ends when the run does with no event at all: no
    ``run.finished`` (API.md: "Every stream ends with ``run.finished``, whatever happened"),
    no ``error`` frame. Expected: a 422 (or a 5xx the client may retry), or a stream that
    ends with ``run.finished`` or an ``error`` frame."""
    backend = ScriptedBackend(lambda req: Reply("tick " * 30, gap=0.02))
    async with running_server(settings, backend) as srv, srv.client() as client:
        store = srv.services.require_store()
        conv = (await client.post("/api/conversations", json={})).json()["id"]
        text = ""
        with trio.fail_after(GUARD):
            async with client.stream("POST", f"/api/conversations/{conv}/messages", json={
                    "content": "x", "stream": True, "on_disconnect": "continue"}) as r:
                async for piece in r.aiter_text():
                    text += piece
                    if "event: token" in text:
                        break
        run_id = parse_sse(text.partition("\n\n")[0])[0]["data"]["run_id"]
        r = await _rejoin_past_with_one_read_lost(client, store, run_id)
    if r.status_code == 200:
        frames = parse_sse(r.text)
        ends = [f["event"] for f in frames[-1:]]
        assert ends in (["run.finished"], ["error"]), (
            f"a 200 stream of {len(frames)} frames ({[f['event'] for f in frames][:5]}), "
            f"ended with neither run.finished nor an error frame")
    else:
        assert r.status_code == 422 or r.status_code >= 500, (r.status_code, r.text[:300])


async def test_a_past_last_event_id_on_a_finished_run_is_not_a_stream_that_ends_with_nothing(
    settings: Settings,
) -> None:
    """As above, on a finished run: ``_where_in_the_end`` answers ``"before"`` when its one
    store read fails ("the stream then reads the store again and reports the failure in a
    frame"), so ``Last-Event-ID: 999`` on a run of a handful of events starts a stream at
    999. The store is back for the stream's reads, which find nothing after 999, and the
    reader ends as for a run that is over: a 200 with no frame at all, neither the 422 the
    same request gets a moment later (docs/api.md) nor ``run.finished`` nor an ``error``
    frame. An EventSource then reconnects with the same id, and a client reading the body
    takes it for a connection cut. Expected: 422 (or a 5xx), or an ``error`` frame."""
    async with running_server(settings, ScriptedBackend(by_content)) as srv, \
            srv.client() as client:
        store = srv.services.require_store()
        conv = (await client.post("/api/conversations", json={})).json()["id"]
        r = await client.post(f"/api/conversations/{conv}/messages", json={"content": "hi"})
        run_id = r.json()["run"]["id"]
        r = await _rejoin_past_with_one_read_lost(client, store, run_id)
        again = await client.get(f"/api/runs/{run_id}/events", headers={"Last-Event-ID": "999"})
    assert again.status_code == 422, again.text[:300]  # without the fault: refused, right
    if r.status_code == 200:
        frames = parse_sse(r.text)
        assert [f["event"] for f in frames[-1:]] == ["error"], (
            f"a 200 stream of {len(frames)} frames, ended with no error frame, for an id "
            "past the run's end")
    else:
        assert r.status_code == 422 or r.status_code >= 500, (r.status_code, r.text[:300])
