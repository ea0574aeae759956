"""A stored conversation whose history outgrows the model's context keeps being answered.

SERVICE_HISTORY_CHARS trims a conversation's history by characters, and a model's context is
in tokens: a conversation of figures or code outgrew the demo's 8,192-token slot well within
24,000 characters, and from then on every message was a 400 ``context_length_exceeded``. Now,
a call the model's server refuses as too long is made again with the history's oldest turns
left out, and so are the run's later calls. The real server, the simulator's llama.cpp and Ollama
protocols (its context counted in its own tokens: words, plus one per message), on loopback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from service.settings import Settings, load_settings
from service.sim import Reply
from service.sim.scenario import prompt_tokens

from ..e2e import GUARD, KINDS, Env, e2e
from ..servers import running_server

EMBEDDED_GUARD = 300  # seconds: the real engine on one CPU thread

WORDS = 20  # a question's words: 21 of the simulator's tokens, its answer's "ok" 2


def _question(turn: int, words: int = WORDS) -> str:
    return f"q{turn} " + " ".join(["word"] * (words - 1))


async def _ask(env: Env, conv: str, content: str, *, statuses: tuple[int, ...] = (200,),
               **body: Any) -> dict[str, Any]:
    with trio.fail_after(GUARD):
        r = await env.client.post(f"/api/conversations/{conv}/messages",
                                  json={"content": content, **body})
    assert r.status_code in statuses, r.text
    return r.json()  # type: ignore[no-any-return]


def _said(body: dict[str, Any]) -> str:
    return " ".join(str(m.get("content") or "") for m in body["messages"])


@pytest.mark.parametrize("kind", KINDS)
async def test_a_history_over_the_context_drops_its_oldest_turns_and_is_answered(
    settings: Settings, kind: str,
) -> None:
    async with e2e(settings, kind) as env:
        # Three questions and two answers fit (67 tokens); the fourth turn's prompt (90) does
        # not.
        env.sim.default = Reply(text="ok", context=70)
        conv = await env.conversation()
        for turn in range(1, 7):
            before = len(env.sim.streams)
            result = await _ask(env, conv, _question(turn))
            assert result["run"]["status"] == "succeeded", result
            calls = env.sim.streams[before:]
            answered = calls[-1]
            assert answered.status == 200
            assert prompt_tokens(answered.body) <= 70
            # The question is sent whole, the newest turns before it, the oldest dropped.
            assert _said(answered.body).endswith(_question(turn))
            assert f"q{turn - 1} " in _said(answered.body) or turn == 1
            if turn >= 4:
                assert "q1 " not in _said(answered.body)
                assert len(calls) >= 2
                assert all(c.status == 400 for c in calls[:-1])
            assert len(calls) <= 4  # a half, a quarter, none: a few tries, not one per turn

        # Nothing was lost from the conversation: the store has every turn, each answered.
        r = await env.client.get(f"/api/conversations/{conv}")
        messages = r.json()["messages"]
        assert [m["content"] for m in messages if m["role"] == "user"] == [
            _question(t) for t in range(1, 7)]
        assert [m["content"] for m in messages if m["role"] == "assistant"] == ["ok"] * 6
        assert all(m["status"] == "complete" for m in messages), messages


@pytest.mark.parametrize("kind", KINDS)
async def test_a_question_over_the_context_alone_is_still_400_after_a_few_tries(
    settings: Settings, kind: str,
) -> None:
    async with e2e(settings, kind) as env:
        env.sim.default = Reply(text="ok", context=70)
        conv = await env.conversation()
        for turn in (1, 2):
            await _ask(env, conv, _question(turn))
        before = len(env.sim.streams)
        with trio.fail_after(GUARD):
            r = await env.client.post(f"/api/conversations/{conv}/messages",
                                      json={"content": " ".join(["long"] * 100)})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "context_length_exceeded"
        tries = env.sim.streams[before:]
        # Sent as it was, then with the older of its two turns dropped, then with neither
        # (by llama.cpp's numbers too: its first cut takes a character a token).
        assert [t.status for t in tries] == [400, 400, 400], tries
        assert "q1 " in _said(tries[0].body)
        assert "q2 " in _said(tries[0].body)
        assert "q1 " not in _said(tries[1].body)
        assert "q2 " in _said(tries[1].body)
        assert _said(tries[-1].body) == " ".join(["long"] * 100)
        # Its failed turn is left out of later prompts; the conversation goes on.
        result = await _ask(env, conv, _question(3))
        assert result["run"]["status"] == "succeeded"
        assert "long" not in _said(env.sim.streams[-1].body)


async def test_a_v1_prompt_over_the_context_is_not_cut_by_the_service(
    settings: Settings,
) -> None:
    # A /v1 client's messages are its prompt, sent whole: the model's server says it is too
    # long, once, as OpenAI would.
    async with e2e(settings, "llamacpp") as env:
        env.sim.default = Reply(text="ok", context=70)
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": _question(i)}
                    for i in range(5)]
        with trio.fail_after(GUARD):
            r = await env.client.post("/v1/chat/completions",
                                      json={"model": "sim-model", "messages": messages})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "context_length_exceeded"
        assert len(env.sim.streams) == 1


@pytest.mark.parametrize("agent", ["react", "plan_execute", "auto"])
async def test_every_agent_drops_the_oldest_turns_of_a_history_over_the_context(
    settings: Settings, agent: str,
) -> None:
    async with e2e(settings, "llamacpp") as env:
        env.sim.default = Reply(text="ok")
        conv = await env.conversation()
        await _ask(env, conv, _question(1), agent=agent)
        # The agent's own prompts (a system prompt, auto's decision) counted: room for about
        # one turn more than the first turn's largest call.
        widest = max(prompt_tokens(s.body) for s in env.sim.streams)
        env.sim.default = Reply(text="ok", context=widest + 30)
        for turn in range(2, 7):
            before = len(env.sim.streams)
            result = await _ask(env, conv, _question(turn), agent=agent)
            assert result["run"]["status"] == "succeeded", result
            assert env.sim.streams[-1].status == 200
            assert any(_said(s.body).find(_question(turn)) >= 0 and s.status == 200
                       for s in env.sim.streams[before:])
        sent = [s for s in env.sim.streams if s.status == 200]
        assert "q1 " not in _said(sent[-1].body)
        assert _question(6) in _said(sent[-1].body)
        assert any(s.status == 400 for s in env.sim.streams)
        r = await env.client.get(f"/api/conversations/{conv}")
        assert all(m["status"] == "complete" for m in r.json()["messages"])


@pytest.mark.embedded
async def test_a_long_conversation_on_the_real_engine_is_answered_turn_after_turn(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The embedded llama.cpp server (the demo's engine) on the tiny model, slots of 1,024
    tokens: messages with figures outgrow a slot within a few turns, long before 24,000
    characters of history. Before, every turn from then on was a 400."""
    pytest.importorskip("xllamacpp", reason="needs the embedded extra")
    for var in ("SERVICE_DEFAULT_MODEL", "SERVICE_EMBEDDED_CTX", "SERVICE_EMBEDDED_MAX_TOKENS",
                "SERVICE_HISTORY_CHARS", "SERVICE_BACKEND_CONCURRENCY"):
        monkeypatch.delenv(var, raising=False)
    settings = load_settings(db=tmp_path / "s.db", backend="embedded", gguf=tiny_model,
                             default_model="tiny", embedded_ctx=4 * 1024,
                             embedded_max_tokens=8)
    line = ("The meeting moved to 14:30 on Friday, room 2B; bring the Q3 figures (revenue "
            "48,200, costs 31,750, margin 34.1%, 2,117 units). ")
    async with running_server(settings, from_settings=True) as srv, srv.client() as c:
        c.timeout = httpx.Timeout(EMBEDDED_GUARD)
        with trio.fail_after(EMBEDDED_GUARD):
            conv = (await c.post("/api/conversations", json={})).json()["id"]
            for turn in range(8):
                r = await c.post(f"/api/conversations/{conv}/messages",
                                 json={"content": f"turn {turn}: " + line * 5})
                assert r.status_code == 200, (turn, r.text)
                assert r.json()["run"]["status"] == "succeeded", (turn, r.text)
            metrics = (await c.get("/metrics")).text
        # It did outgrow the slot (some calls were refused and tried again shorter: by the
        # server, or before they were sent, for leaving the answer no room).
        shortened = [line for line in metrics.splitlines()
                     if line.startswith("service_history_shortened_total ")]
        assert shortened, metrics
        assert float(shortened[0].split()[1]) >= 1, shortened


@pytest.mark.embedded
@pytest.mark.parametrize("agent", ["react", "plan_execute"])
async def test_every_agent_fits_the_default_embedded_slots(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, agent: str,
) -> None:
    """SERVICE_BACKEND=embedded on its default context (4,096): the agents' own prompts (about
    1,160 tokens on the tiny model) fit a slot. Split four ways, each slot held 1,024 and
    every react or plan_execute run was refused at once (400 context_length_exceeded)."""
    pytest.importorskip("xllamacpp", reason="needs the embedded extra")
    for var in ("SERVICE_DEFAULT_MODEL", "SERVICE_EMBEDDED_CTX", "SERVICE_EMBEDDED_MAX_TOKENS",
                "SERVICE_HISTORY_CHARS", "SERVICE_BACKEND_CONCURRENCY"):
        monkeypatch.delenv(var, raising=False)
    settings = load_settings(db=tmp_path / "s.db", backend="embedded", gguf=tiny_model,
                             default_model="tiny", embedded_max_tokens=8)
    assert settings.embedded_ctx == 4096
    async with running_server(settings, from_settings=True) as srv, srv.client() as c:
        c.timeout = httpx.Timeout(EMBEDDED_GUARD)
        with trio.fail_after(EMBEDDED_GUARD):
            conv = (await c.post("/api/conversations", json={})).json()["id"]
            r = await c.post(f"/api/conversations/{conv}/messages",
                             json={"content": "What is 2 + 2?", "agent": agent})
            calls = (await c.get("/api/llm-calls", params={"limit": 100})).json()["data"]
    refused = [call for call in calls if call["outcome"] == "error"]
    assert not refused, refused
    assert r.status_code == 200, r.text
    assert r.json()["run"]["status"] == "succeeded", r.text
