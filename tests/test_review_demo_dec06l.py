"""Review (dec06l) of ``python -m service --demo`` as a new user meets it: the embedded llama.cpp
server on the tiny random-weights model with the demo's settings (``demo_overrides``: 4 slots of
8,192 tokens, answers cut at 256), the app under hypercorn on 127.0.0.1:0. Each test fails on
the reviewed code because of the defect its docstring names. Cheap: the tiny model writes 256
tokens in well under a second; every wait is bounded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from service.settings import load_settings

from .agents.test_answer_room import follow_up_to
from .servers import running_server

pytestmark = [pytest.mark.embedded]

pytest.importorskip("xllamacpp", reason="needs the embedded extra: pip install -e '.[embedded]'")
pytest.importorskip("gguf", reason="needs the embedded extra: pip install -e '.[embedded]'")

GUARD = 120  # seconds: a generous bound on any one step (the engine runs on one CPU thread)
SLOT = 8192  # the demo's slot (demo.DEMO_CTX // 4)
ANSWER = 256  # the demo's cap on an answer (demo.DEMO_MAX_TOKENS)


def _demo_settings(monkeypatch: pytest.MonkeyPatch, model: Path, db: Path) -> Any:
    from service.demo import demo_overrides

    monkeypatch.setenv("SERVICE_GGUF", str(model))
    for var in ("SERVICE_DEFAULT_MODEL", "SERVICE_EMBEDDED_CTX", "SERVICE_EMBEDDED_MAX_TOKENS",
                "SERVICE_HISTORY_CHARS", "SERVICE_BACKEND_CONCURRENCY"):
        monkeypatch.delenv(var, raising=False)
    return load_settings(db=db, **demo_overrides())


async def test_a_history_that_fills_the_slot_leaves_the_answer_no_room(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--demo``, agent ``chat``: a user pastes a long table (~6,800 tokens) and gets an
    answer, then asks a follow-up. The stored history plus the follow-up comes to just under
    the slot's 8,192 tokens.

    Was: the follow-up's answer is cut to ONE token (the slot is full: llama.cpp stops at its
    end, ``finish_reason: "length"``), and it is stored ``complete``, as if the model had said
    all it had to say. The user sees an answer of a few characters; the next message is
    answered in full again (its prompt was over the slot: refused, and the older turn
    dropped). In a long demo conversation every crossing of the slot's end gives one such cut answer
    (seen: 167 of 256 tokens at turn 17 of plain prose).

    Right: a stored conversation's history is fitted to the context *with room for the
    answer* (the backend's cap, here 256 tokens), as it is already when the prompt alone is
    over the slot: the older turn is left out and the follow-up gets its full answer.

    The cause: ``AgentContext.call_llm`` shortened the history only when the server refused
    the prompt (``ContextLengthExceeded`` before any chunk); a prompt that fits with no room to
    answer was accepted and the answer cut by the full slot. Now the adapter refuses such a
    prompt itself while the history can be shortened (``backends/room.py``: the slot and the
    answer's cap from llama.cpp's ``/props``, the prompt's tokens from its ``/tokenize``)."""
    settings = _demo_settings(monkeypatch, tiny_model, tmp_path / "demo.db")
    async with running_server(settings, from_settings=True) as srv, srv.client() as c:
        c.timeout = httpx.Timeout(GUARD)
        with trio.fail_after(GUARD):
            conv = (await c.post("/api/conversations", json={"agent": "chat"})).json()["id"]
            r = await c.post(f"/api/conversations/{conv}/messages",
                             json={"content": "12, 34, 56, 78\n" * 450, "agent": "chat"})
            assert r.status_code == 200, r.text[:300]
            assert r.json()["run"]["usage"]["completion_tokens"] == ANSWER
            # A follow-up bringing the prompt to 1 token under the slot.
            follow_up = await follow_up_to(c, conv, SLOT - 1)
            r = await c.post(f"/api/conversations/{conv}/messages",
                             json={"content": follow_up, "agent": "chat"})
            assert r.status_code == 200, r.text[:300]
            body = r.json()
    assert body["run"]["status"] == "succeeded", body["run"]
    assert body["message"]["status"] == "complete"
    # The answer got its room (the demo's 256 tokens), not the slot's last one.
    assert body["run"]["usage"]["completion_tokens"] == ANSWER, body["run"]["usage"]
