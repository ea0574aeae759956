"""Review of 82f38cc..HEAD: a stored conversation's history over the model's context is
shortened and its run tried again (``run_fitting`` / ``shorter_history``).

The real server on port 0, the simulator on loopback (its context in its own tokens: words, plus
one per message), as tests/agents/test_history_fits_context.py.
"""

from __future__ import annotations

from functools import partial

import pytest
import trio

from service.settings import Settings
from service.sim import Reply
from service.sim.scenario import prompt_tokens

from .agents.test_history_fits_context import WORDS, _question, _said
from .agents.test_history_fits_context import _ask as _ask_as
from .e2e import GUARD, EventStream, e2e

_ask = partial(_ask_as, statuses=(200, 400))


async def test_a_history_over_the_context_is_shortened_also_when_its_call_waited_in_the_queue(
    settings: Settings,
) -> None:
    """What a user sees: on a busy service (every backend slot taken, the run's call waits in
    the queue), a long conversation's next message fails ``400 context_length_exceeded``; the
    same message on an idle service is answered (its oldest turns dropped). Load decides whether
    the conversation is dead.

    What should happen: the history is shortened and the run tried again, as on an idle
    service: a ``queued`` event tells a place in a queue, nothing of the run's answer.

    Root cause: ``run_fitting`` tries again only while ``handle.emitted_seq`` is unchanged, and
    the interceptor's ``on_queued`` (``AgentContext._queued``) emits a ``queued`` event before
    the call goes upstream, so a call that waited for a slot counts as "told"."""
    async with e2e(settings, "llamacpp", backend_concurrency=1) as env:
        env.sim.default = Reply(text="ok")
        long_conv = await env.conversation()
        for turn in (1, 2, 3):
            assert (await _ask(env, long_conv, _question(turn)))["run"]["status"] == "succeeded"
        # From here on the model's context (70) holds three questions and two answers, not
        # the fourth turn's whole history (90).
        env.sim.default = Reply(text="ok", context=70)

        # Another conversation's answer holds the only slot (it hangs after one token).
        env.sim.script(Reply(text="busy answer here", hang_after=1))
        other = await env.conversation()
        with trio.fail_after(GUARD):
            async with env.post_stream(other, "hi") as busy:
                busy_events = EventStream(busy)
                started = await busy_events.read(lambda ev: any(e.type == "token" for e in ev))
                busy_run = next(e.data for e in started if e.type == "run.started")["run_id"]

                async with env.post_stream(long_conv, _question(4)) as waiting:
                    events = EventStream(waiting)
                    await events.read(lambda ev: any(e.type == "queued" for e in ev))
                    # The slot is free again: the waiting run's call goes upstream.
                    r = await env.client.post(f"/api/runs/{busy_run}/cancel")
                    assert r.status_code == 202, r.text
                    rest = await events.read()
        finished = [e for e in rest if e.type == "run.finished"]
        assert finished, rest
        assert finished[-1].data["status"] == "succeeded", rest
        answered = env.sim.streams[-1]
        assert answered.status == 200
        assert _said(answered.body).endswith(_question(4))


async def test_a_react_turn_whose_tool_result_tips_the_history_over_the_context_is_answered(
    settings: Settings,
) -> None:
    """What a user sees: a long conversation with the ``react`` agent: the model calls a tool,
    the tool runs, and the call that reads its result is refused as over the context; the run
    fails ``context_length_exceeded``, and so does every later question that needs a tool (a
    failed turn is left out of the history, so each next prompt is the same size): the
    conversation is dead for ``react``, as it was for every agent before this change.
    docs/api.md now says "only a question too long on its own is the 400".

    What should happen: the history's oldest turns are dropped from the later calls' prompts
    too (the run's messages from the current turn on, tool results included, kept), without
    running the tool again; the run answers.

    Root cause: ``run_fitting`` only restarts a run that has told nothing; after a
    ``tool.call`` was emitted it re-raises, and nothing else shortens the history part of a
    later call's prompt (``ReActAgent.loop`` keeps sending ``[system, *ctx.history, ...]``)."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.default = Reply(text="ok")
        conv = await env.conversation()
        for turn in (1, 2, 3):
            result = await _ask(env, conv, _question(turn), agent="react")
            assert result["run"]["status"] == "succeeded", result
        # The fourth turn's first prompt: the third's, its answer "ok" (2) and the question (21).
        first = prompt_tokens(env.sim.streams[-1].body) + 2 + WORDS + 1
        context = first  # the first call fits exactly; the one with the tool's result does not
        env.sim.default = Reply(text="ok", context=context)
        env.sim.script(Reply(tool_calls=({"name": "calculator",
                                           "arguments": {"expression": "2+2"}},),
                             context=context))
        before = len(env.sim.streams)
        result = await _ask(env, conv, _question(4), agent="react")
        calls = env.sim.streams[before:]
        assert calls[0].status == 200, calls  # the tool was called: the run has told it
        assert prompt_tokens(calls[0].body) == context
        assert result.get("run", {}).get("status") == "succeeded", (result, calls)
        assert _said(calls[-1].body).find(_question(4)) >= 0


@pytest.mark.parametrize("kind", ["llamacpp", "ollama"])
async def test_the_second_try_keeps_a_quarter_of_the_older_turns_not_an_eighth(
    settings: Settings, kind: str,
) -> None:
    """What a user sees: in a long conversation whose history is a little over the model's
    context, the answer has forgotten more than it had to: of eight earlier turns, where the
    two newest fit (a quarter of their text, the documented second try), the model was sent
    only the newest one.

    What should happen (docs/api.md, ``run_fitting``'s docstring): the tries keep a half of
    the older turns' text, then a quarter, then none.

    Root cause: ``run_fitting`` assigns each shorter history to ``ctx.history`` and the next
    try calls ``shorter_history(ctx.history, 0.25)`` on that already halved history: a quarter
    of a half, an eighth of the older turns' text (and so on for any further fraction).

    Since: a refusal that says its numbers (llama.cpp's) is fitted by them, and the second
    try after it keeps the two turns that fit; Ollama's says none: the levels."""
    async with e2e(settings, kind) as env:
        env.sim.default = Reply(text="ok")
        conv = await env.conversation()
        for turn in range(1, 9):  # eight older turns of one size: 23 of the simulator's tokens
            assert (await _ask(env, conv, _question(turn)))["run"]["status"] == "succeeded"
        # Two older turns and the question (67) fit; three (90) do not.
        env.sim.default = Reply(text="ok", context=70)
        before = len(env.sim.streams)
        result = await _ask(env, conv, _question(9))
        assert result["run"]["status"] == "succeeded", result
        tries = env.sim.streams[before:]
        # Whole (8 older turns), a half (4), refused; then a quarter of the eight: two turns.
        # By llama.cpp's numbers (since): whole, then a first cut, refused; then the two
        # turns that fit.
        assert [t.status for t in tries] == [400, 400, 200], tries
        said = _said(tries[-1].body)
        assert "q7 " in said, said
        assert "q8 " in said, said
        assert "q6 " not in said, said
