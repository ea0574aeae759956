"""Review of f4c87ad (a stored conversation's history fitted to the model's context per call,
``AgentContext.call_llm`` / ``_shorten``) and da89ca3 (the reader's retry window).

The real server on port 0, the simulator on loopback (its context in its own tokens: words, plus
one per message), as tests/agents/test_history_fits_context.py.
"""

from __future__ import annotations

from functools import partial

from service.settings import Settings
from service.sim import Reply
from service.sim.scenario import prompt_tokens

from .agents.test_history_fits_context import _ask as _ask_as
from .agents.test_history_fits_context import _question, _said
from .e2e import e2e

_ask = partial(_ask_as, statuses=(200, 400))


async def test_auto_agent_shortens_the_history_after_its_classifier_call_was_refused(
    settings: Settings,
) -> None:
    """What a user sees: a long conversation with the default ``auto`` agent, and a long
    question (a pasted text) that, with the classifier's own system prompt, is over the model's
    context: the classification is refused (the rule decides: ``chat``, as documented), then
    the chat call with the conversation's history is refused too, and the run fails
    ``400 context_length_exceeded``. The same message with ``agent: "chat"`` is answered (its
    older turns left out): the question fits on its own.

    What should happen: the chosen agent's calls are fitted as any run's (docs/api.md: "Only a
    turn too long without any older one is the 400"): the older turns left out, answered.

    Root cause: ``AgentContext._shorten`` advances ``_fit_level`` through every level while
    none of them would leave out anything of ``sent``; the classifier's prompt holds no
    history message, so its refusal uses up all three levels (``_fit_level == 3``), and the
    chat call's refusal then finds none left: ``_shorten`` returns False at once and the error
    is raised. (The levels are the run's, and a call without history must not spend them.)"""
    async with e2e(settings, "llamacpp") as env:
        env.sim.default = Reply(text="ok")
        conv = await env.conversation()
        for turn in (1, 2, 3):
            result = await _ask(env, conv, _question(turn), agent="chat")
            assert result["run"]["status"] == "succeeded", result
        long_question = _question(4, words=60)  # 61 of the simulator's tokens
        # The question fits on its own (61); with the classifier's system prompt (40-odd
        # words) or with any older turn (23 each) it does not.
        context = 70
        env.sim.default = Reply(text="ok", context=context)
        before = len(env.sim.streams)
        result = await _ask(env, conv, long_question, agent="auto")
        calls = env.sim.streams[before:]
        classify = calls[0]
        assert classify.status == 400, calls
        assert prompt_tokens(classify.body) > context, calls
        assert result.get("run", {}).get("status") == "succeeded", (result, calls)
        assert calls[-1].status == 200, calls
        assert _said(calls[-1].body).endswith(long_question)
