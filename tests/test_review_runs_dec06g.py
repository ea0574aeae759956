"""A review of the run lifecycle (service/runs/ and how service/api/ uses it): what a client is
told against what the store holds afterwards. Each test fails on the code it was written
against, because of the defect its docstring names.

Real server on 127.0.0.1 (the app under hypercorn's trio worker on port 0, its backend built by
the lifespan from the settings) with the real simulator upstream on loopback (tests/e2e.py).
"""

from __future__ import annotations

from typing import Any

import trio

from service.settings import Settings
from service.sim import Reply as SimReply

from .e2e import GUARD, e2e

# A ReAct turn (the text protocol) that gives its answer as the action's JSON input, with a
# JSON escape that decodes to NUL: valid JSON, and what a model may write (a C string's "\0").
NUL_ANSWER_TURN = 'Thought: I know it.\nAction: answer\nAction Input: {"answer": "a\\u0000b"}'


async def test_a_non_stream_answer_is_the_text_the_store_keeps_not_a_nul_it_never_holds(
    settings: Settings,
) -> None:
    """A ``react`` run whose model gives its answer as an action's JSON input holding
    ``"\\u0000"`` (the parser decodes the JSON: the answer holds a NUL).

    What a user sees: ``POST /api/conversations/{id}/messages`` (stream: false) answers
    ``message.content`` ``"a\\u0000b"`` (a NUL), and ``POST /v1/chat/completions`` with
    ``agent: react`` answers the same in ``choices[0].message.content``; but the store keeps
    ``"a\\ufffdb"`` (GET /api/conversations/{id} shows U+FFFD), and the run's own ``message``
    event (SSE, WebSocket, a re-join) says ``"a\\ufffdb"`` too. So the client that asked
    without streaming is told a text that the conversation, every other client and the next
    turn's history contradict (a diff, a hash or a cache keyed on the answer never matches;
    a C client cuts the NUL-terminated string at "a"). A lone surrogate (``"\\ud800"``) goes
    the same way: the response carries an escape no UTF-8 text can hold.

    What should happen: every answer is told as the store keeps it (service/text.py
    ``clean_text``), as the ``message`` event and a failed run's error already are
    (architecture.md: "no event holds them, and what is told is what the store keeps").

    Root cause: ``RunSupervisor._finish`` (service/runs/supervisor.py, the ``succeeded``
    branch) sets ``handle.final_text`` to the raw ``answer``; the store cleans it in
    ``finish_run`` and ``RunHandle._number`` cleans the event, but ``post_message``
    (service/api/runs.py) and ``chat_completions`` (service/api/openai.py) answer
    ``handle.final_text`` as it is.
    """
    async with e2e(settings, "llamacpp") as env:
        conv = await env.conversation()
        with trio.fail_after(GUARD):
            env.sim.script(SimReply(text=NUL_ANSWER_TURN))
            r = await env.client.post(f"/api/conversations/{conv}/messages",
                                      json={"content": "what is it?", "agent": "react"})
            assert r.status_code == 200, r.text
            body: dict[str, Any] = r.json()
            run_id = body["run"]["id"]
            native_told = body["message"]["content"]
            stored = (await env.reply_of(conv, run_id))["content"]
            event = [e.data["content"] for e in await env.run_events(run_id)
                     if e.type == "message"]

            env.sim.script(SimReply(text=NUL_ANSWER_TURN))
            r = await env.client.post("/v1/chat/completions", json={
                "model": "sim-model", "agent": "react",
                "messages": [{"role": "user", "content": "what is it?"}]})
            assert r.status_code == 200, r.text
            v1_told = r.json()["choices"][0]["message"]["content"]
            v1_run = r.json()["id"].removeprefix("chatcmpl-")  # the run's id (openai.py)
            v1_conv = (await env.client.get(f"/api/runs/{v1_run}")).json()["conversation_id"]
            v1_stored = (await env.reply_of(v1_conv, v1_run))["content"]
    assert event == [stored], (event, stored)
    assert (native_told, v1_told) == (stored, v1_stored), (
        f"told {native_told!r} (native) and {v1_told!r} (/v1); the store keeps {stored!r} "
        f"and {v1_stored!r}")

