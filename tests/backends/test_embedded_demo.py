"""``python -m service --demo`` runs every agent (issue 13, item 6): the demo's settings (the
embedded llama.cpp server on the generated tiny model), the real server on port 0.

The tiny model's text is gibberish (random weights), so ``react`` and ``plan_execute`` never see
a well-formed step: they must still end with a stored answer (their fallbacks), not fail. Their
prompts (a system prompt listing every tool) were 1,162 tokens, over the 1,024 each of the
embedded server's four slots had: every such run was a 502.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from service.settings import load_settings

from ..servers import running_server

pytestmark = [pytest.mark.embedded, pytest.mark.slow]  # slow: the demo model, 4 x 8,192 tokens

pytest.importorskip("xllamacpp", reason="needs the embedded extra: pip install -e '.[embedded]'")
pytest.importorskip("gguf", reason="needs the embedded extra: pip install -e '.[embedded]'")

GUARD = 120  # seconds: a run of plan_execute is a dozen LLM calls on one CPU thread


async def test_every_agent_answers_on_the_demo_setup(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.demo import DEMO_MAX_TOKENS, demo_overrides

    monkeypatch.setenv("SERVICE_GGUF", str(tiny_model))
    for var in ("SERVICE_DEFAULT_MODEL", "SERVICE_EMBEDDED_CTX", "SERVICE_EMBEDDED_MAX_TOKENS"):
        monkeypatch.delenv(var, raising=False)
    settings = load_settings(db=tmp_path / "demo.db", **demo_overrides())
    async with running_server(settings, from_settings=True) as srv, srv.client() as c:
        c.timeout = httpx.Timeout(GUARD)
        conv = (await c.post("/api/conversations", json={"title": "demo"})).json()["id"]
        for agent in ("chat", "react", "plan_execute", "auto"):
            with trio.fail_after(GUARD):
                r = await c.post(f"/api/conversations/{conv}/messages", json={
                    "content": "What is 12 * 7, and what time is it?", "agent": agent})
            assert r.status_code == 200, (agent, r.text)
            body = r.json()
            assert body["run"]["status"] == "succeeded", agent
            assert body["message"]["content"], agent

            with trio.fail_after(GUARD):
                r = await c.post("/v1/chat/completions", json={
                    "agent": agent, "messages": [{"role": "user", "content": "Hello there"}]})
            assert r.status_code == 200, (agent, r.text)
            assert r.json()["choices"][0]["message"]["content"], agent
            if agent == "chat":  # the model never stops: the demo's cap ends each answer
                assert r.json()["usage"]["completion_tokens"] == DEMO_MAX_TOKENS

        stored = (await c.get(f"/api/conversations/{conv}")).json()["messages"]
        replies = [m for m in stored if m["role"] == "assistant"]
        assert [m["status"] for m in replies] == ["complete"] * 4
        assert all(m["content"] for m in replies)
