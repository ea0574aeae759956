"""Found by a review of /v1, fleets and tools under faults (2026-12-05); each test failed before
its fix: a passing store-read failure ended a /v1 stream whose run was stored succeeded (its SDK
ran the completion again), and a tool's NUL and lone surrogates went into its tool.result events.
Real hypercorn servers on 127.0.0.1:0; each test runs on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from service.backends.base import ToolCall
from service.errors import StoreUnavailable
from service.runs import RunHandle
from service.runs.reader import EventReader
from service.settings import Settings
from service.text import not_text_at
from service.tools import tool

from .fakes import Reply, ScriptedBackend
from .servers import running_server

pytestmark = pytest.mark.both_stores
GUARD = 20  # seconds any single wait may take before the test fails


def _sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """A native SSE body's events: (type, data)."""
    out = []
    for block in text.split("\n\n"):
        kind = data = None
        for line in block.split("\n"):
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: "):
                data = line[len("data: "):]
        if kind and data is not None:
            out.append((kind, json.loads(data)))
    return out


# -- 1. /v1: a passing store-read failure after the run succeeded is an error to its client ------


async def test_v1_stream_of_a_run_stored_succeeded_is_not_answered_with_an_error(
    settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The completion's run has ended and its end is stored: succeeded, the whole answer in the
    # store. The /v1 stream reads the run's events from the store (its reader is behind the
    # handle's in-memory window: a small window here stands in for a long run and a slow
    # reader), and that one read fails with StoreUnavailable (a connection lost; "nothing
    # stored is lost, a retry later is worth it"). The client is answered 503
    # store_unavailable with Retry-After - an OpenAI SDK retries it and runs the whole
    # completion again - while GET /api/runs/{id} says the run succeeded: the client is told
    # something other than what the store says (docs/operations.md), and one request leaves
    # two succeeded runs. The handle.cancel() meant to stop the run changes nothing: it ended.
    monkeypatch.setattr(RunHandle.__init__, "__kwdefaults__",
                        {**(RunHandle.__init__.__kwdefaults__ or {}), "window": 2})
    backend = ScriptedBackend(lambda req: Reply("a b c d e f g h"))
    reads: list[str] = []
    original = EventReader._read_once

    async def read_after_the_end(self: EventReader) -> list[Any]:
        # The read comes once the run's end is in the store (a slow reader), and fails once
        # (the next read finds the store back).
        if reads:
            return await original(self)
        store = self._store
        with trio.fail_after(GUARD):
            while (await store.get_run(self.run_id)).status in ("queued", "running"):  # noqa: ASYNC110
                await trio.sleep(0.01)
        reads.append(self.run_id)

        def lost(op: str) -> None:
            if op in ("list_run_events", "list_events_of_runs"):
                raise StoreUnavailable("store read failed: the connection was lost")

        store.faults.before_read = lost
        try:
            return await original(self)
        finally:
            store.faults.before_read = None

    monkeypatch.setattr(EventReader, "_read_once", read_after_the_end)
    async with running_server(settings, backend) as srv, srv.client() as client:
        with trio.fail_after(GUARD):
            r = await client.post("/v1/chat/completions", json={
                "stream": True, "messages": [{"role": "user", "content": "q"}]})
        monkeypatch.setattr(EventReader, "_read_once", original)
        assert reads, "the stream never read the store: the fault was not reached"
        run = (await client.get(f"/api/runs/{reads[0]}")).json()
    told = (r.status_code, r.headers.get("retry-after"), r.text[:300])
    assert run["status"] == "succeeded", run
    assert r.status_code == 200, f"the run is stored succeeded, its client was told {told}"
    assert "data: [DONE]" in r.text, f"the run is stored succeeded, its client was told {told}"


# -- 2. a tool's output is not text, and goes to clients as it came -------------------------------

NOT_TEXT = "nul:\x00 lone high:\ud800 lone low:\udfff"


@tool("dump_bytes", "Read a binary file as text (what a careless tool gives back).",
      {"type": "object", "properties": {}})
def dump_bytes() -> dict[str, Any]:
    return {"text": NOT_TEXT, "lines": [NOT_TEXT]}


@tool("dump_fails", "Fail, quoting the binary file.", {"type": "object", "properties": {}})
def dump_fails() -> str:
    raise ValueError(f"cannot parse {NOT_TEXT!s}")


async def test_a_tools_nul_and_lone_surrogates_reach_no_client_and_no_event(
    settings: Settings,
) -> None:
    # Everything else that is not Unicode text is cleaned at the boundary (U+FFFD): a model's
    # tokens and tool-call arguments (service/text.py: "a lone surrogate is not text: UTF-8
    # cannot encode it, so neither the store nor a client could take it"), a client's fields
    # are refused (422). A tool's output and error are not: the tool.result event is stored
    # and sent on SSE and the WebSocket with "\u0000" and lone "\ud800"/"\udfff" escapes
    # (RFC 8259 8.2: unpredictable; serde_json refuses them, and a client decoding the frame
    # then re-encoding it as UTF-8 fails), while the model was given the cleaned text: the
    # event does not say what the model saw.
    conf = settings.model_copy(update={"tools": (__name__,)})
    backend = ScriptedBackend(lambda req: (
        Reply("Final Answer: done") if req.messages[-1].role == "tool" else
        Reply("", tool_calls=[ToolCall("c1", "dump_bytes", {}), ToolCall("c2", "dump_fails", {})])))
    async with running_server(conf, backend) as srv, srv.client() as client:
        conv = (await client.post("/api/conversations", json={})).json()["id"]
        with trio.fail_after(GUARD):
            r = await client.post(f"/api/conversations/{conv}/messages", json={
                "content": "read it", "agent": "react", "stream": True})
        streamed = [d for kind, d in _sse(r.text) if kind == "tool.result"]
        run_id = _sse(r.text)[0][1]["run_id"]
        run = (await client.get(f"/api/runs/{run_id}")).json()
        stored = [d for kind, d in _sse((await client.get(f"/api/runs/{run_id}/events")).text)
                  if kind == "tool.result"]
        seen = [m.content for m in backend.streams[-1].request.messages if m.role == "tool"]
    assert run["status"] == "succeeded", run  # the run itself is fine, on both stores
    assert len(streamed) == len(stored) == 2, (streamed, stored)
    assert all(not_text_at(s) is None for s in seen), seen  # the model got text
    bad = [(where, not_text_at(d)) for where, results in (("streamed", streamed),
                                                           ("stored", stored))
           for d in results if not_text_at(d) is not None]
    assert not bad, f"tool.result events hold what is not text: {bad}"


# -- 3. /v1: a store that stays away under a running stream: its error chunk says when to retry ---


async def test_v1_stream_cut_by_a_store_away_says_retry_after_in_its_error_chunk(
    settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The reader is behind the handle's window (a small one here), so it reads the store, which
    # then stays away past the reader's retries (two keep-alive intervals). The stream ends
    # with an error chunk; like an SSE or WebSocket error frame it says when a retry is worth
    # it (2026-12-06: it had no retry_after; failed before).
    monkeypatch.setattr(RunHandle.__init__, "__kwdefaults__",
                        {**(RunHandle.__init__.__kwdefaults__ or {}), "window": 2})
    conf = settings.model_copy(update={"sse_keepalive": 0.2})
    backend = ScriptedBackend(lambda req: Reply("tick " * 2000))
    original = EventReader._read_once
    reads: list[str] = []

    async def away_after_two(self: EventReader) -> list[Any]:
        reads.append(self.run_id)
        if len(reads) > 1:
            raise StoreUnavailable("store read failed: the database is restarting")
        return await original(self)

    monkeypatch.setattr(EventReader, "_read_once", away_after_two)
    async with running_server(conf, backend) as srv, srv.client() as client:
        with trio.fail_after(GUARD):
            r = await client.post("/v1/chat/completions", json={
                "stream": True, "messages": [{"role": "user", "content": "q"}]})
    assert r.status_code == 200, r.text[:300]
    chunks = [json.loads(line[len("data: "):]) for line in r.text.split("\n")
              if line.startswith("data: {")]
    assert len(chunks) > 1, r.text[:300]  # the answer had begun: a chunk ends it
    error = chunks[-1].get("error")
    assert error is not None, (len(reads), chunks[-2:], r.text[-300:])
    assert (error["type"], error["code"]) == ("store_unavailable", "store_unavailable"), error
    assert error.get("retry_after") == StoreUnavailable.retry_after, error
    assert "data: [DONE]" not in r.text
