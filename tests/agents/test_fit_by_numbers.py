"""A history over the model's context is fitted by the refusal's numbers when it says them.

llama.cpp's refusal says the prompt's tokens and the context (``n_prompt_tokens``, ``n_ctx``),
and the answer-room check says its count; the history is then shortened by what is over,
not by a half: a conversation a little over its context forgot half its older turns at once.
The simulator's llama.cpp protocol on loopback (its tokens: words, plus one per message), and
``fitted_history`` itself.
"""

from __future__ import annotations

from typing import Any

import pytest

from service.agents.history import fitted_history, sent_chars
from service.backends.base import ChatMessage
from service.settings import Settings
from service.sim import Reply
from service.sim.scenario import prompt_tokens

from ..e2e import e2e
from .test_history_fits_context import _ask, _said

# Turns of different sizes (words of each question): a fit by characters is not a fit by turns.
SIZES = [31, 7, 18, 40, 12, 25, 9, 33, 15, 22, 6, 28]
CONTEXT = 120


def _question(turn: int) -> str:
    return f"q{turn} " + " ".join(["word"] * (SIZES[turn - 1] - 1))


def _tokens(messages: list[dict[str, Any]]) -> int:
    return prompt_tokens({"messages": messages})


@pytest.mark.parametrize("last", range(6, len(SIZES) + 1))
async def test_a_history_over_the_context_keeps_every_older_turn_that_fits(
    settings: Settings, last: int,
) -> None:
    """Of a conversation of turns of many sizes, the answered call has as many of the newest
    older turns as fit the context (one more would not), after at most four tries."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.default = Reply(text="ok")
        conv = await env.conversation()
        for turn in range(1, last):
            assert (await _ask(env, conv, _question(turn)))["run"]["status"] == "succeeded"
        env.sim.default = Reply(text="ok", context=CONTEXT)
        before = len(env.sim.streams)
        result = await _ask(env, conv, _question(last))
        assert result["run"]["status"] == "succeeded", result
        tries = env.sim.streams[before:]
        assert 1 <= len(tries) <= 4, [t.status for t in tries]  # at most the levels' tries
        answered = tries[-1].body["messages"]
        assert _tokens(answered) <= CONTEXT
        said = _said(tries[-1].body)
        kept = [t for t in range(1, last) if f"q{t} " in said]
        if _tokens(tries[0].body["messages"]) <= CONTEXT:
            assert len(tries) == 1  # it fitted whole
            return
        # The newest turns, and not one fewer than fit: with the next older one the prompt
        # would be over (llama.cpp takes at most n_ctx - 1 tokens).
        oldest = min(kept, default=last)
        assert kept == list(range(oldest, last)), kept
        assert oldest > 1
        one_more = [{"role": "user", "content": _question(oldest - 1)},
                    {"role": "assistant", "content": "ok"}]
        assert _tokens([*one_more, *answered]) >= CONTEXT, (kept, _tokens(answered))


def _turns(n: int, size: int = 10) -> list[ChatMessage]:
    history = [ChatMessage("system", "be brief")]
    for i in range(n):
        history += [ChatMessage("user", f"{i:02d}" + "x" * (size - 2)),
                    ChatMessage("assistant", "y" * size)]
    return [*history, ChatMessage("user", "the question")]


def test_fitted_history_drops_the_oldest_turns_by_what_is_over() -> None:
    given = _turns(10)  # 10 older turns of 20 characters, 212 + 12 of the rest
    # 44 tokens over: at first taken as 44 characters (a character a token: no text is much
    # denser), so three turns of 20, not two.
    fitted = fitted_history(given, given, 224, 180)
    assert fitted is not None
    assert [m.content[:2] for m in fitted if m.role == "user"][:2] == ["03", "04"]
    assert fitted[0].role == "system"
    assert fitted[-1].content == "the question"


def test_fitted_history_cuts_again_at_what_the_dropped_turns_cost() -> None:
    """Turns of 20 characters at 5 tokens each: the whole (10 turns, 60 tokens) is 20 over
    40; the first cut (20 characters) drops one turn, and the prompt is 55; the next cut
    takes the dropped turn's 4 characters a token (nine tenths of it), and drops three more:
    40 tokens, as many turns as fit."""
    given = _turns(10)
    first = fitted_history(given, given, 60, 40)
    assert first is not None
    assert len(first) == len(given) - 2
    second = fitted_history(given, first, 55, 40, before=(60, sent_chars(given)))
    assert second is not None
    assert next(m.content[:2] for m in second if m.role == "user") == "04"


def test_fitted_history_measures_what_is_still_sent() -> None:
    given = _turns(10)
    sent = [m for m in given if not m.content.startswith(("00", "01"))]
    sent = [m for i, m in enumerate(sent) if i not in (1, 2)]  # their answers too
    assert len(sent) == len(given) - 4
    # Sent without two turns, 184 tokens, 180 fit: one more turn out, not three.
    fitted = fitted_history(given, sent, 184, 180)
    assert fitted is not None
    assert next(m.content[:2] for m in fitted if m.role == "user") == "03"


def test_fitted_history_leaves_nothing_new_out_is_none() -> None:
    given = _turns(2)
    only_question = [given[0], given[-1]]
    assert fitted_history(given, only_question, 500, 100) is None  # no older turn left in it
    assert fitted_history(given, given, 100, 100) is None  # not over
    assert fitted_history([ChatMessage("user", "q")], [ChatMessage("user", "q")], 9, 1) is None
