"""Review of 33423ef..2105e1e (on_model, one close_interrupted, the terminal client's read
timeout, records.STEP_EVENTS): the defects found, each a test that failed before its fix
(2026-12-04), against the real app on a loopback port, a real client process or both stores.

1. ``STEP_EVENTS`` counts a reasoning model's ``thought`` (``reasoning: true``, emitted per
   chunk by ``AgentContext.call_llm``) as a step: every such event clears the cut reply's text
   (``RunHandle.emit``; recovery's ``seq > MAX(seq of a step event)``). For the ``chat`` agent
   those tokens are the answer: ``/v1`` (``_Framer``, ``answer_tokens``) sent them to the client
   as ``content``, and the same run's succeeded reply (``ChatAgent``: every token) keeps them.
   A reply cut after thinking that came between tokens is stored without the text the client
   was already shown.
2. ``service chat`` fails a turn after ``READ_TIMEOUT`` (60 s) of silence, "four keep-alives";
   but the keep-alive interval is the operator's ``SERVICE_SSE_KEEPALIVE`` (``gt=0``, no upper
   bound). Set above 60 s, a healthy quiet run (a model loading) fails in the client, which
   drops the stream, and the dropped stream cancels the run on the server.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from service.backends.base import ChatChunk, ChatRequest
from service.settings import Settings, load_settings

from .fakes import Reply, ScriptedBackend
from .servers import ROOT, running_server

# -- 1. a reasoning model's thinking between answer tokens ----------------------------------


class _ThinksMidAnswer(ScriptedBackend):
    """A reasoning model that thinks again in the middle of its answer (as the adapters pass
    on llama.cpp's ``reasoning_content`` / Ollama's ``thinking`` wherever they come), then
    goes quiet: the run is cut with its answer half written."""

    def __init__(self) -> None:
        super().__init__()
        self.quiet = trio.Event()

    @asynccontextmanager
    async def stream(self, request: ChatRequest) -> AsyncIterator[AsyncIterator[ChatChunk]]:
        async def chunks() -> AsyncIterator[ChatChunk]:
            yield ChatChunk(thinking="The user wants the number.")
            yield ChatChunk(text="The answer ")
            yield ChatChunk(text="is ")
            yield ChatChunk(thinking=" Double-check the units.")
            yield ChatChunk(text="42 metres")
            self.quiet.set()
            await trio.sleep_forever()

        await trio.lowlevel.checkpoint()
        yield chunks()


async def test_v1_reply_cut_after_mid_answer_thinking_is_stored_as_the_client_saw_it(
    settings: Settings,
) -> None:
    """An OpenAI client streams a chat completion; the model thinks once more mid-answer; the
    run is cancelled (``POST /api/runs/{id}/cancel``, as the page's Stop or another client
    does) with the answer half written. The client was sent ``content`` "The answer is 42
    metres" and the thinking as ``reasoning_content``; the store must hold that reply, not
    only the text after the last thought."""
    backend = _ThinksMidAnswer()
    async with running_server(settings, backend) as srv, srv.client() as client:
        content: list[str] = []
        reasoning: list[str] = []
        errors: list[dict[str, Any]] = []
        run_id = ""
        with trio.fail_after(30):
            async with client.stream("POST", "/v1/chat/completions", json={
                    "stream": True, "messages": [{"role": "user", "content": "how far?"}]}
                    ) as resp:
                assert resp.status_code == 200, await resp.aread()
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data: "):])
                    if "error" in chunk:
                        errors.append(chunk["error"])
                        continue
                    run_id = chunk["id"].removeprefix("chatcmpl-")
                    for choice in chunk["choices"]:
                        delta = choice["delta"]
                        content.append(delta.get("content") or "")
                        reasoning.append(delta.get("reasoning_content") or "")
                    if "".join(content) == "The answer is 42 metres" and not errors:
                        r = await client.post(f"/api/runs/{run_id}/cancel")
                        assert r.status_code == 202, r.text
        shown = "".join(content)
        assert shown == "The answer is 42 metres", (content, reasoning)
        assert "Double-check" in "".join(reasoning)  # shown apart, as reasoning
        assert errors, "the cut was not said"
        assert "cancel" in errors[0]["code"], errors
        run = (await client.get(f"/api/runs/{run_id}")).json()
        assert run["status"] == "cancelled", run
        conv = (await client.get(f"/api/conversations/{run['conversation_id']}")).json()
        [reply] = [m for m in conv["messages"] if m["role"] == "assistant"]
        assert reply["content"] == shown, (
            f"the /v1 client was sent the answer {shown!r} (its thinking apart, as "
            f"reasoning_content); the store keeps {reply['content']!r}: the thought between "
            f"the answer's tokens was taken for a step (records.STEP_EVENTS) and the text "
            f"before it dropped")


# (The same run recovered with its owner gone: tests/store/test_stores.py,
# test_a_dead_process_s_cut_reply_keeps_the_answer_so_far_not_its_steps_text.)


# -- 2. the terminal client's read timeout vs SERVICE_SSE_KEEPALIVE ---------------------------

KEEPALIVE = 90.0  # an operator's SERVICE_SSE_KEEPALIVE above the client's 60 s
LOADING = 66.0  # the model's first chunk comes after this long (a model loading): a quiet run


@pytest.mark.slow
async def test_terminal_client_waits_for_a_quiet_run_the_service_keeps_alive(
    tmp_path: Path,
) -> None:
    """``python -m service chat "..."`` against a service with ``SERVICE_SSE_KEEPALIVE=90``:
    the run is quiet for 66 s (the service's next keep-alive would come at 90 s) and then
    answers. The client gives up at 60 s ("the service stopped answering"), exits 1, and its
    dropped stream cancels the run, which would have succeeded. (Takes about 66 s.)"""
    settings = load_settings(db=tmp_path / "service.db", sse_keepalive=KEEPALIVE)
    backend = ScriptedBackend(lambda req: Reply("the answer after loading",
                                                first_delay=LOADING))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    env.update(COLUMNS="100", LINES="40", TERM="xterm")
    async with running_server(settings, backend) as srv, srv.client() as client:
        started = time.monotonic()
        with trio.fail_after(LOADING + 40):
            out = await trio.run_process(
                [sys.executable, "-m", "service", "chat", "--url", srv.url, "how far?"],
                cwd=ROOT, env=env, capture_stdout=True, capture_stderr=True, check=False)
        took = time.monotonic() - started
        convs = (await client.get("/api/conversations")).json()["data"]
        [conv] = convs
        msgs = (await client.get(f"/api/conversations/{conv['id']}")).json()["messages"]
        run = (await client.get(f"/api/runs/{msgs[-1]['run_id']}")).json()
    assert out.returncode == 0, (
        f"exit {out.returncode} after {took:.0f} s; stderr: {out.stderr.decode().strip()!r}; "
        f"the run ended {run['status']} ({run.get('error')}); the service was alive "
        f"(keep-alives every {KEEPALIVE:g} s, SERVICE_SSE_KEEPALIVE) and answered after "
        f"{LOADING:g} s")
    assert "the answer after loading" in out.stdout.decode(), out
    assert run["status"] == "succeeded", run
