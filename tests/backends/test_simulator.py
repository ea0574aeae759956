"""The simulator's wire output, checked raw (no adapter), over real loopback sockets."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from functools import partial

import httpx
import pytest
import trio

from service.sim import Reply, Simulator, open_simulator

GUARD = 10


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with open_simulator() as s:
        yield s


@pytest.fixture
async def http(sim: Simulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sim.url, timeout=GUARD) as c:
        yield c


CHAT = {"model": "sim-model", "messages": [{"role": "user", "content": "hi you"}]}


async def test_ollama_ndjson_shape(sim: Simulator, http: httpx.AsyncClient) -> None:
    sim.script("Hello there")
    r = await http.post("/api/chat", json=CHAT)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/x-ndjson"
    assert r.headers["transfer-encoding"] == "chunked"
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert [x["message"]["content"] for x in lines] == ["Hello ", "there", ""]
    assert all(x["done"] is False for x in lines[:-1])
    last = lines[-1]
    assert last["done"] is True
    assert last["done_reason"] == "stop"
    assert {"total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
            "eval_count", "eval_duration", "created_at", "model"} <= set(last)
    assert last["prompt_eval_count"] == 3
    assert last["eval_count"] == 2


async def test_openai_sse_shape(sim: Simulator, http: httpx.AsyncClient) -> None:
    sim.script("Hi")
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    r = await http.post("/v1/chat/completions", json=body)
    assert r.headers["content-type"] == "text/event-stream"
    frames = r.text.split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""]
    objs = [json.loads(f.removeprefix("data: ")) for f in frames[:-2]]
    assert all(o["object"] == "chat.completion.chunk" and o["model"] == "sim-model" for o in objs)
    assert objs[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert objs[1]["choices"][0]["delta"] == {"content": "Hi"}
    assert objs[2]["choices"][0]["finish_reason"] == "stop"
    assert objs[3]["choices"] == []
    assert objs[3]["usage"]["completion_tokens"] == 1
    assert "predicted_per_second" in objs[3]["timings"]


async def test_openai_without_include_usage_has_no_usage_chunk(sim: Simulator,
                                                               http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert "usage" not in r.text
    assert r.text.endswith("data: [DONE]\n\n")


async def test_non_streamed_answers(sim: Simulator, http: httpx.AsyncClient) -> None:
    sim.script("one", "two")
    r = await http.post("/api/chat", json={**CHAT, "stream": False})
    assert r.json()["message"]["content"] == "one"
    assert r.json()["done"] is True
    r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.json()["object"] == "chat.completion"
    assert r.json()["choices"][0]["message"]["content"] == "two"


async def test_listing_and_health(sim: Simulator, http: httpx.AsyncClient) -> None:
    tags = (await http.get("/api/tags")).json()
    assert tags["models"][0]["name"] == "sim-model"
    assert "details" in tags["models"][0]
    models = (await http.get("/v1/models")).json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == "sim-model"
    assert (await http.get("/")).text == "Ollama is running"
    sim.set_loading(1)
    loading = await http.post("/v1/chat/completions", json=CHAT)
    assert loading.status_code == 503
    r = await http.get("/health")
    assert r.status_code == 503
    assert (r.json() == {
        "error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}})
    assert (await http.get("/health")).json() == {"status": "ok"}


async def test_error_bodies_per_protocol(sim: Simulator, http: httpx.AsyncClient) -> None:
    r = await http.post("/api/chat", json={**CHAT, "model": "ghost"})
    assert r.status_code == 404
    assert (r.json() == {
        "error": 'model "ghost" not found, try pulling it first'})
    r = await http.post("/v1/chat/completions", json={**CHAT, "model": "ghost"})
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found_error"
    r = await http.post("/api/chat", content=b"{nope")
    assert r.status_code == 400


async def test_scenario_header_and_script_order(sim: Simulator, http: httpx.AsyncClient) -> None:
    sim.script("first", Reply(status=500, error="second fails"))
    header = {"X-Sim-Scenario": json.dumps({"text": "from header"})}
    r = await http.post("/api/chat", json={**CHAT, "stream": False}, headers=header)
    assert r.json()["message"]["content"] == "from header"
    assert sim.scripted == 2  # the header does not consume the script
    r = await http.post("/api/chat", json={**CHAT, "stream": False})
    assert r.json()["message"]["content"] == "first"
    r = await http.post("/api/chat", json={**CHAT, "stream": False})
    assert r.status_code == 500
    assert r.json() == {"error": "second fails"}
    r = await http.post("/api/chat", json={**CHAT, "stream": False})
    assert r.json()["message"]["content"].startswith("tok0 ")  # the default reply


async def test_die_mid_stream_is_recorded(sim: Simulator, http: httpx.AsyncClient) -> None:
    sim.script(Reply(tokens=5, die_after=2))
    with pytest.raises(httpx.RemoteProtocolError):
        await http.post("/api/chat", json=CHAT)
    record = sim.streams[0]
    with trio.fail_after(GUARD):
        await record.closed.wait()
    assert record.died
    assert record.chunks_sent == 2
    assert not record.completed


async def test_client_leaving_is_recorded(sim: Simulator, http: httpx.AsyncClient) -> None:
    sim.script(Reply(tokens=5, hang_after=1))
    async with http.stream("POST", "/api/chat", json=CHAT) as r:
        async for _ in r.aiter_lines():
            break
    record = sim.streams[0]
    with trio.fail_after(GUARD):
        await record.closed.wait()
    assert record.client_gone
    assert record.client_gone_at is not None
    assert record.chunks_sent == 1
    assert record.first_chunk_at is not None


async def test_wait_streams(sim: Simulator, http: httpx.AsyncClient) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(http.post, "/api/chat", json=CHAT))
        with trio.fail_after(GUARD):
            records = await sim.wait_streams(1)
    assert records[0].protocol == "ollama"
    assert records[0].body["messages"] == CHAT["messages"]
