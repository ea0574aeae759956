"""A stored conversation's history leaves its answer room in a llama.cpp server's slot.

llama.cpp's server accepts a prompt that fills its slot and then stops the answer where the
slot ends (``finish_reason: "length"`` after a token or a few). While the history can be
shortened, the adapter refuses such a prompt itself (``service/backends/room.py``) and the
agent leaves the oldest turns out, as when the server refuses a prompt over the slot. The real
engine on loopback; the check's own faults (a server without ``/props``, a ``/tokenize`` that
fails or hangs) on a small in-process HTTP app, where the real server cannot be made to fail.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from service.backends.room import (
    PROPS_TTL,
    RETRY_AFTER,
    TIMEOUT,
    ContextRoom,
    reserve,
    slot_context,
)
from service.errors import ContextLengthExceeded
from service.settings import load_settings

from ..e2e import e2e
from ..servers import running_server
from .test_history_fits_context import EMBEDDED_GUARD

SLOT = 2048  # the embedded default's slot (4,096 split two ways)
CAP = 48  # the answers' cap (SERVICE_EMBEDDED_MAX_TOKENS)


def _embedded(monkeypatch: pytest.MonkeyPatch, model: Path, db: Path) -> Any:
    pytest.importorskip("xllamacpp", reason="needs the embedded extra")
    for var in ("SERVICE_DEFAULT_MODEL", "SERVICE_EMBEDDED_CTX", "SERVICE_EMBEDDED_MAX_TOKENS",
                "SERVICE_HISTORY_CHARS", "SERVICE_BACKEND_CONCURRENCY"):
        monkeypatch.delenv(var, raising=False)
    return load_settings(db=db, backend="embedded", gguf=model, default_model="tiny",
                         embedded_max_tokens=CAP)


async def _prompt_tokens(c: httpx.AsyncClient, messages: list[dict[str, str]]) -> int:
    """``messages``' prompt tokens as the server counts them (/v1 sends them whole)."""
    r = await c.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
    assert r.status_code == 200, r.text[:300]
    return int(r.json()["usage"]["prompt_tokens"])


async def follow_up_to(c: httpx.AsyncClient, conv: str, tokens: int) -> str:
    """A follow-up ("and then? ", then "ab ": a token each) that brings the stored
    conversation ``conv`` to ``tokens`` prompt tokens, as the model's server counts them."""
    stored = (await c.get(f"/api/conversations/{conv}")).json()["messages"]
    history = [{"role": m["role"], "content": m["content"]} for m in stored]
    filler = have = 0
    for _ in range(6):
        follow_up = "and then? " + "ab " * filler
        have = await _prompt_tokens(c, [*history, {"role": "user", "content": follow_up}])
        if have == tokens:
            return follow_up
        filler += tokens - have
    raise AssertionError(f"a follow-up of {have} prompt tokens, not {tokens}")


async def a_table_then_a_follow_up_to(c: httpx.AsyncClient, tokens: int) -> tuple[str, str]:
    """A new conversation holding a pasted table and its whole answer, and a follow-up that
    brings it to ``tokens`` prompt tokens (``follow_up_to``)."""
    conv = (await c.post("/api/conversations", json={"agent": "chat"})).json()["id"]
    r = await c.post(f"/api/conversations/{conv}/messages",
                     json={"content": "12.5, 33.1, 47.0, 58.9\n" * 70})
    assert r.json()["run"]["usage"]["completion_tokens"] == CAP, r.text[:300]
    return conv, await follow_up_to(c, conv, tokens)


@pytest.mark.embedded
async def test_a_follow_up_at_the_slots_end_gets_its_whole_answer(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The default slots (2,048 tokens, answers capped at 48): a pasted table, then a
    follow-up that brings the history to 8 tokens under the slot's end. The follow-up and the
    turn after it get their 48 tokens. Before, the follow-up got 8, stored as if the model had
    said all it had to say; the check now refuses that prompt before it is sent and the agent
    leaves the older turn out."""
    settings = _embedded(monkeypatch, tiny_model, tmp_path / "s.db")
    async with running_server(settings, from_settings=True) as srv, srv.client() as c:
        c.timeout = httpx.Timeout(EMBEDDED_GUARD)
        with trio.fail_after(EMBEDDED_GUARD):
            conv, follow_up = await a_table_then_a_follow_up_to(c, SLOT - 8)
            for content in (follow_up, "and after that?"):
                r = await c.post(f"/api/conversations/{conv}/messages",
                                 json={"content": content})
                assert r.status_code == 200, r.text[:300]
                run = r.json()["run"]
                assert run["status"] == "succeeded", run
                assert run["usage"]["completion_tokens"] == CAP, run["usage"]
            calls = (await c.get("/api/llm-calls", params={"limit": 20})).json()["data"]
            stored = (await c.get(f"/api/conversations/{conv}")).json()["messages"]
            metrics = (await c.get("/metrics")).text
    # The follow-up's whole history was refused here, before it was sent (and the next
    # turn's too: the fit is found per run), and shortened: counted, not recorded as LLM
    # calls (none was made), nor in the runs' usage.
    assert "service_history_shortened_total 2.0" in metrics
    assert [x for x in calls if x["outcome"] != "ok"] == []
    assert run["usage"]["llm_calls"] == 1
    # Nothing of the conversation was lost: every turn stored, each answer whole.
    assert [m["role"] for m in stored] == ["user", "assistant"] * 3
    assert all(m["status"] == "complete" for m in stored)


@pytest.mark.embedded
async def test_a_question_alone_that_fills_the_slot_is_still_answered(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A first message (nothing older to leave out) that leaves its answer only a few tokens:
    sent as it is and answered with what room there is (llama.cpp's own behaviour, told as
    ``length``), not refused by the check that only makes room by shortening a history."""
    settings = _embedded(monkeypatch, tiny_model, tmp_path / "s.db")
    async with running_server(settings, from_settings=True) as srv, srv.client() as c:
        c.timeout = httpx.Timeout(EMBEDDED_GUARD)
        with trio.fail_after(EMBEDDED_GUARD):
            filler = 1500
            for _ in range(4):
                content = "ab " * filler
                have = await _prompt_tokens(c, [{"role": "user", "content": content}])
                if have == SLOT - 8:
                    break
                filler += SLOT - 8 - have
            assert have == SLOT - 8, have
            conv = (await c.post("/api/conversations", json={"agent": "chat"})).json()["id"]
            r = await c.post(f"/api/conversations/{conv}/messages", json={"content": content})
            calls = (await c.get("/api/llm-calls", params={"limit": 20})).json()["data"]
    assert r.status_code == 200, r.text[:300]
    assert r.json()["run"]["status"] == "succeeded"
    assert 0 < r.json()["run"]["usage"]["completion_tokens"] <= 8
    assert [x["outcome"] for x in calls if x["outcome"] != "ok"] == []


@pytest.mark.embedded
@pytest.mark.parametrize(("n_predict", "shortened"), [(CAP, 0), (None, 1)])
async def test_a_fleet_files_n_predict_is_the_room_a_remote_llamacpp_answer_gets(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n_predict: int | None,
    shortened: int,
) -> None:
    """A llama.cpp server the service does not start (a fleet file's) caps its answers at
    48 (``--n-predict``), which its ``/props`` does not tell. Said in the file
    (``n_predict = 48``), a follow-up 100 tokens under the slot's end is sent whole, its
    history kept, and answered in full; not said, the answer is given a quarter of the slot
    and the history is shortened (the older turn left out) though it would have fitted."""
    from service.backends.embedded import embedded_llama_server

    for var in ("SERVICE_DEFAULT_MODEL", "SERVICE_HISTORY_CHARS", "SERVICE_BACKEND_CONCURRENCY"):
        monkeypatch.delenv(var, raising=False)
    async with embedded_llama_server(tiny_model, n_predict=CAP, alias="tiny") as llama:
        await _ask_a_remote_server(llama, tmp_path, n_predict, shortened)


async def _ask_a_remote_server(llama: Any, tmp_path: Path, n_predict: int | None,
                               shortened: int) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(f'[[server]]\nname = "remote"\nkind = "llamacpp"\n'
                     f'url = "{llama.base_url}"\n'
                     + (f"n_predict = {n_predict}\n" if n_predict is not None else ""))
    settings = load_settings(db=tmp_path / "s.db", backend="llamacpp", backends_file=fleet,
                             default_model=llama.model)
    async with running_server(settings, from_settings=True) as srv, srv.client() as c:
        c.timeout = httpx.Timeout(EMBEDDED_GUARD)
        with trio.fail_after(EMBEDDED_GUARD):
            conv, follow_up = await a_table_then_a_follow_up_to(c, SLOT - 100)
            r = await c.post(f"/api/conversations/{conv}/messages", json={"content": follow_up})
            metrics = (await c.get("/metrics")).text
    run = r.json()["run"]
    assert run["status"] == "succeeded", run
    assert run["usage"]["completion_tokens"] == CAP, run["usage"]
    assert f"service_history_shortened_total {shortened}.0" in metrics
    # Sent whole (the table and its answer in the prompt) or without the older turn.
    assert (run["usage"]["prompt_tokens"] == SLOT - 100) == (shortened == 0), run["usage"]


async def test_a_server_without_props_costs_one_probe_and_the_calls_go_as_before(
    settings: Any,
) -> None:
    """An OpenAI-compatible server that is not llama.cpp (the simulator: no ``/props``): a
    conversation with older turns is answered turn after turn, the check asks ``/props`` once
    (not again for ``RETRY_AFTER``) and never counts tokens."""
    async with e2e(settings, "llamacpp") as env:
        conv = await env.conversation()
        for turn in range(4):
            r = await env.client.post(f"/api/conversations/{conv}/messages",
                                      json={"content": f"question {turn}"})
            assert r.status_code == 200, r.text
            assert r.json()["run"]["status"] == "succeeded"
        assert env.sim.requests.count(("GET", "/props")) == 1, env.sim.requests
        assert not [p for _, p in env.sim.requests if p in ("/apply-template", "/tokenize")]
        assert sum(p == "/v1/chat/completions" for _, p in env.sim.requests) == 4


# -- the check's own faults, on a small in-process llama.cpp stand-in ------------------------

# As llama.cpp says it (its params' n_predict is -1 even with --n-predict set).
PROPS = {"default_generation_settings": {"n_ctx": 1000, "params": {"n_predict": -1}}}
CAP_100 = 100  # the server's cap, as configured (``answer_cap``)
LONG = {"messages": [{"role": "user", "content": "x " * 950}], "stream": True}


class _Server:
    """``/props``, ``/apply-template`` and ``/tokenize`` as llama.cpp answers them (a token a
    word), each replaceable by a fault."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.props: Any = PROPS
        self.tokenize_status = 200
        self.hang: str | None = None  # a path that never answers

    async def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.asked.append(path)
        if path == self.hang:
            await trio.sleep_forever()
        if path == "/props":
            await trio.sleep(0.1)  # others come meanwhile
            if self.props is None:
                return httpx.Response(404, json={"error": "no route"})
            return httpx.Response(200, json=self.props)
        body = json.loads(request.content)
        if path == "/apply-template":
            assert "stream" not in body
            return httpx.Response(200, json={"prompt": " ".join(
                m["content"] for m in body["messages"])})
        if path == "/tokenize":
            if self.tokenize_status != 200:
                return httpx.Response(self.tokenize_status, json={"error": {"message": "boom"}})
            return httpx.Response(200, json={"tokens": list(range(len(body["content"].split())))})
        return httpx.Response(404, json={"error": "no route"})


async def _room(server: _Server) -> tuple[ContextRoom, httpx.AsyncClient]:
    client = httpx.AsyncClient(transport=httpx.MockTransport(server.handler))
    return ContextRoom("stand-in", "http://127.0.0.1:9", client, {}, cap=CAP_100), client


async def test_a_prompt_without_room_is_refused_and_one_with_room_goes() -> None:
    server = _Server()
    room, client = await _room(server)
    async with client:
        # 950 tokens and the server's cap of 100 are over the slot's 1,000.
        with pytest.raises(ContextLengthExceeded,
                           match=r"\(950 tokens\) leaves its answer 50 of the 100 tokens"):
            await room.refuse_without_room(LONG, None)
        # With the request's own, smaller cap there is room.
        await room.refuse_without_room(LONG, 50)
        # A short prompt is let go by the bound alone: no tokens counted.
        server.asked.clear()
        await room.refuse_without_room({"messages": [{"role": "user", "content": "hi"}]}, None)
        assert server.asked == []


async def test_the_check_gives_way_to_a_failing_or_silent_server(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A ``/tokenize`` that fails or never answers, a ``/props`` missing: the call goes (no
    refusal), each small request bounded by ``TIMEOUT``, and the server is not asked again
    for ``RETRY_AFTER`` (a hanging ``/tokenize`` would cost every call ``TIMEOUT``); a found
    ``/props`` is read again after ``PROPS_TTL``."""
    server = _Server()
    room, client = await _room(server)
    async with client:
        server.tokenize_status = 500
        await room.refuse_without_room(LONG, None)  # not counted: goes
        asked = len(server.asked)
        await room.refuse_without_room(LONG, None)  # not asked again for a while
        assert len(server.asked) == asked
        await trio.sleep(RETRY_AFTER)
        server.tokenize_status = 200
        server.hang = "/tokenize"
        start = trio.current_time()
        await room.refuse_without_room(LONG, None)
        assert trio.current_time() - start == pytest.approx(0.1 + TIMEOUT)  # /props, then it
        start = trio.current_time()
        await room.refuse_without_room(LONG, None)
        assert trio.current_time() == start  # not asked again: no wait
        await trio.sleep(RETRY_AFTER)
        server.hang = None
        with pytest.raises(ContextLengthExceeded):
            await room.refuse_without_room(LONG, None)
        props = server.asked.count("/props")
        await room.refuse_without_room(LONG, 10)  # /props kept
        assert server.asked.count("/props") == props
        await trio.sleep(PROPS_TTL)
        server.props = None
        await room.refuse_without_room(LONG, None)  # read again: now missing, so unchecked
        await room.refuse_without_room(LONG, None)
        assert server.asked.count("/props") == props + 1
        await trio.sleep(RETRY_AFTER)
        server.props = PROPS
        with pytest.raises(ContextLengthExceeded):
            await room.refuse_without_room(LONG, None)
        assert server.asked.count("/props") == props + 2


async def test_a_burst_of_calls_reads_props_once(autojump_clock: trio.testing.MockClock) -> None:
    server = _Server()
    room, client = await _room(server)
    async with client, trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(room.refuse_without_room, LONG, 10)
    assert server.asked.count("/props") == 1


@pytest.mark.parametrize(("body", "n_ctx"), [
    ({}, None),
    ({"default_generation_settings": {"n_ctx": True}}, None),
    ({"default_generation_settings": {"n_ctx": 0}}, None),
    ({"default_generation_settings": {"n_ctx": "2048"}}, None),
    ({"default_generation_settings": {"n_ctx": 2048}}, 2048),
    ({"default_generation_settings": {"n_ctx": 8192, "params": {"n_predict": -1}}}, 8192),
    ([], None),
])
def test_slot_context_reads_llamacpp_props(body: Any, n_ctx: int | None) -> None:
    assert slot_context(body) == n_ctx


def test_the_answers_room_is_the_smallest_cap_at_most_a_quarter_of_the_slot() -> None:
    assert reserve(2048) == 512
    assert reserve(2048, None, None) == 512
    assert reserve(2048, 256) == 256
    assert reserve(2048, 256, 64) == 64
    assert reserve(2048, 1000, 256) == 256
    assert reserve(2048, 0) == 512
    assert reserve(2048, None, 48) == 48
    # A cap of the whole slot or more ("no cap" in effect) turned the check off.
    assert reserve(2048, None, 2048) == 512
    assert reserve(8192, 100_000) == 2048
