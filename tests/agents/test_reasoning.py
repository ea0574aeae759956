"""A reasoning model's thinking: streamed as ``thought`` events (and ``reasoning_content`` on
``/v1``), never part of the answer or of what is stored as the reply."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from service.runs import RunSpec, RunStatus
from service.settings import Settings

from ..fakes import Reply, ScriptedBackend, supervisor_env
from ..servers import running_server
from ..streams import parse_sse

_THINKING = ("Let me ", "think. ")


async def test_thinking_streams_as_thought_events_not_as_the_answer(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    backend = ScriptedBackend(lambda req: Reply("The answer.", thinking=_THINKING))
    async with supervisor_env(tmp_path, backend) as env:
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, "why?"))
        await handle.finished.wait()
        assert handle.status is RunStatus.succeeded
        events = await env.store.list_run_events(handle.id)
        thoughts = [e.data for e in events if e.type == "thought"]
        assert thoughts == [{"text": t, "reasoning": True} for t in _THINKING]
        assert "".join(e.data["text"] for e in events if e.type == "token") == "The answer."
        (message,) = [e.data for e in events if e.type == "message"]
        assert message["content"] == "The answer."
        stored = await env.store.get_messages(conv)
        assert [m.content for m in stored if m.role == "assistant"] == ["The answer."]


async def test_v1_streams_thinking_as_reasoning_content(settings: Settings) -> None:
    backend = ScriptedBackend(lambda req: Reply("The answer.", thinking=_THINKING)
                              if req.messages[-1].content == "why?" else Reply("Plain."))
    async with running_server(settings, backend) as srv, srv.client() as client:
        r = await client.post("/v1/chat/completions", json={
            "stream": True, "messages": [{"role": "user", "content": "why?"}]})
        assert r.status_code == 200
        deltas = [f["data"]["choices"][0]["delta"] for f in parse_sse(r.text)
                  if f["data"] != "[DONE]" and f["data"].get("choices")]
        reasoning = [d["reasoning_content"] for d in deltas if "reasoning_content" in d]
        content = "".join(d.get("content") or "" for d in deltas)
        assert reasoning == list(_THINKING)
        assert content == "The answer."
        # The thinking comes first, as the model produced it.
        first_content = next(i for i, d in enumerate(deltas) if d.get("content"))
        assert all("reasoning_content" in d for d in deltas[1:first_content])
        # The non-stream answer's content is the answer alone; the thinking is beside it, as
        # llama.cpp's server answers (it was dropped: a client got it only by streaming).
        r = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "why?"}]})
        message = r.json()["choices"][0]["message"]
        assert message["content"] == "The answer."
        assert message["reasoning_content"] == "".join(_THINKING)
        # A model that does not think: no such field.
        r = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}]})
        assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": "Plain."}
