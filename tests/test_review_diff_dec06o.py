"""Review of f656647..HEAD (a history fitted by the refusal's numbers; unsent room refusals).

Each test fails on the reviewed code because of the defect its docstring names. The
simulator's llama.cpp protocol on loopback (its tokens: words, plus one per message; its
refusal says ``n_prompt_tokens`` and ``n_ctx``, as llama.cpp's does).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import trio

from service.settings import Settings
from service.sim import Reply, Simulator, serve
from service.sim.scenario import prompt_tokens

from .agents.test_history_fits_context import _ask, _said
from .e2e import GUARD, e2e

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _tokens(messages: list[dict[str, Any]]) -> int:
    return prompt_tokens({"messages": messages})


async def _history(env: Any, conv: str, questions: list[str]) -> None:
    for q in questions:
        assert (await _ask(env, conv, q))["run"]["status"] == "succeeded"


async def test_a_paste_of_short_tokens_after_prose_turns_is_fitted_in_a_few_tries_not_one_per_turn(
    settings: Settings,
) -> None:
    """What is wrong: a conversation of prose turns (many characters a token) whose new
    message is a paste of figures or code (few characters a token: the docstring's own
    motivating case, "with figures or code a conversation outgrew the slot") is fitted by the
    refusal's numbers one turn or two at a time: here 9 calls (8 refused by the server, each
    an ``error`` row in /api/llm-calls and an error in ``service_llm_calls``) for one message,
    where the levels it replaced took at most three tries (a half, a quarter, none) and
    tests/agents/test_history_fits_context.py says "a few tries, not one per turn".

    What is right: a few tries (at most four calls) whatever the text's characters per token.

    Root cause: service/agents/history.py ``fitted_history`` converts the tokens over into
    characters at the *whole prompt's* average characters per token (``chars / prompt``) and
    cuts only 0.9 of it, but what it cuts is the older turns, whose characters per token can
    be many times the average (the paste dominates the average); each refusal then cuts a
    small share of what is over (at least one turn), a long tail of refusals. (The tools'
    schemas, in the prompt's tokens but not in ``_size``'s characters, do the same to a ReAct
    call with native tools.) Fix: calibrate after the first cut (the next refusal's
    ``n_prompt_tokens`` says exactly what the dropped characters cost), or fall back to the
    levels when a fit by numbers was refused again, or count the candidate's tokens
    (``/tokenize``) before sending."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.default = Reply(text="ok")
        conv = await env.conversation()
        # 20 prose turns: a question of 2 words (204 characters, 3 tokens), "ok" (2 tokens).
        await _history(env, conv, [f"q{t} " + "x" * 200 for t in range(1, 21)])
        env.sim.default = Reply(text="ok", context=340)
        before = len(env.sim.streams)
        paste = "q21 " + " ".join(["7"] * 299)  # 300 words: 301 tokens, 602 characters
        result = await _ask(env, conv, paste)
        assert result["run"]["status"] == "succeeded", result
        tries = env.sim.streams[before:]
        assert _tokens(tries[-1].body["messages"]) <= 340
        assert len(tries) <= 4, [(t.status, _tokens(t.body["messages"])) for t in tries]


async def test_a_fit_by_numbers_does_not_drop_older_turns_that_fit(
    settings: Settings,
) -> None:
    """What is wrong: a conversation whose older turns are dense (few characters a token:
    figures, code, short words) and whose new message is not (a long identifier, a URL, a
    path: many characters a token) is over its context by less than one older turn, and the
    fit by the refusal's numbers drops three of them: the answered prompt (236 tokens) would
    have held two more turns in the 310-token context. docs/api.md says "as few as bring it
    under, when the refusal says its numbers".

    What is right: the newest older turns that fit are kept (one more would be over), as
    tests/agents/test_fit_by_numbers.py asserts for turns of one density.

    Root cause: service/agents/history.py ``fitted_history``: the characters to cut are the
    tokens over times the *whole prompt's* characters per token (here 6.3, pulled up by the
    new message), spent on older turns of 2 characters a token: 3 times the tokens that were
    over. Fix: measure the older turns in tokens (the server's ``/tokenize`` or the next
    refusal's numbers) rather than at the prompt's average; or convert at the older turns'
    own (smallest plausible) characters per token and let a second refusal finish the cut."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.default = Reply(text="ok")
        conv = await env.conversation()
        # 10 dense turns: a question of 30 words (61 characters, 31 tokens), "ok" (2 tokens).
        await _history(env, conv, [f"q{t} " + " ".join(["a"] * 29) for t in range(1, 11)])
        env.sim.default = Reply(text="ok", context=310)
        before = len(env.sim.streams)
        question = "q11 " + " ".join(["y" * 500] * 3)  # 4 words: 5 tokens, 1,507 characters
        result = await _ask(env, conv, question)
        assert result["run"]["status"] == "succeeded", result
        tries = env.sim.streams[before:]
        assert _tokens(tries[0].body["messages"]) > 310  # it was over
        answered = tries[-1].body["messages"]
        assert _tokens(answered) <= 310
        said = _said(tries[-1].body)
        kept = [t for t in range(1, 11) if f"q{t} " in said]
        oldest = min(kept, default=11)
        assert kept == list(range(oldest, 11)), kept
        one_more = [{"role": "user", "content": f"q{oldest - 1} " + " ".join(["a"] * 29)},
                    {"role": "assistant", "content": "ok"}]
        # With the next older turn the prompt would be refused (llama.cpp: at most n_ctx - 1).
        assert _tokens([*one_more, *answered]) >= 310, (kept, _tokens(answered))


async def test_a_fleet_member_with_a_small_context_does_not_cut_a_history_another_member_holds(
    settings: Settings, tmp_path: Path,
) -> None:
    """What is wrong: in a fleet whose servers have different contexts (a small first tier, a
    big second one), a stored conversation's prompt that the big server holds whole is sent
    to the small one first, refused as over *its* context, and the run then leaves out the
    history's oldest turns by the small server's numbers: the answered prompt lacks turns that
    the other member, which was never asked, had room for. service/backends/auto.py says of a
    ``ContextLengthExceeded`` "the same prompt does not fit elsewhere either" — false for a
    fleet of servers of different contexts.

    What is right: a prompt one member refuses as over its context is offered to the members
    that may hold it (another context) before the history is shortened by the first one's
    numbers; here the whole history is answered (by the second server).

    Root cause: service/backends/auto.py ``AutoBackend.stream`` breaks out of its candidates
    at the first ``ContextLengthExceeded`` (``too_long = exc; break``), and
    service/agents/base.py ``AgentContext.call_llm`` then shortens by that member's numbers
    (``_shorten(sent, exc.tokens)``). Fix: try the remaining candidates (not counted against
    the refusing member) and raise the refusal only when every one refused it; or shorten by
    the largest context a member said."""
    small, big = Simulator(("sim-model",)), Simulator(("sim-model",))
    small.default = Reply(text="ok", context=60)
    big.default = Reply(text="ok", context=10_000)
    fleet = tmp_path / "fleet.toml"
    async with trio.open_nursery() as nursery:
        with trio.fail_after(GUARD):
            await nursery.start(serve, small)
            await nursery.start(serve, big)
        fleet.write_text(
            f'[[server]]\nname = "small"\nkind = "llamacpp"\nurl = "{small.url}"\npriority = 0\n'
            f'[[server]]\nname = "big"\nkind = "llamacpp"\nurl = "{big.url}"\npriority = 1\n')
        async with e2e(settings, "llamacpp", backends_file=fleet) as env:
            env.sim.default = Reply(text="ok", context=10_000)
            small.default = Reply(text="ok")  # the history is made whole first
            conv = await env.conversation()
            await _history(env, conv, [f"q{t} " + " ".join(["w"] * 14) for t in range(1, 5)])
            small.default = Reply(text="ok", context=60)
            big_before, small_before = len(big.streams), len(small.streams)
            result = await _ask(env, conv, "q5 " + " ".join(["w"] * 14))
            assert result["run"]["status"] == "succeeded", result
            answered = big.streams[big_before:] + small.streams[small_before:]
            ok = [s for s in answered if s.status == 200][-1]
            said = _said(ok.body)
            assert all(f"q{t} " in said for t in range(1, 6)), (
                said, [s.status for s in small.streams[small_before:]],
                [s.status for s in big.streams[big_before:]])
        nursery.cancel_scope.cancel()


def _flat(path: Path) -> str:
    return re.sub(r"\s+", " ", path.read_text())


def test_docs_do_not_say_every_refused_call_is_recorded() -> None:
    """What is wrong: docs/architecture.md still says of the fit "the refused calls are
    recorded as any other", and docs/api.md "the refused calls are in `/api/llm-calls`"; since
    this change a call refused by the answer-room check (the usual refusal on a llama.cpp
    server that answers /props, since it is checked first, before the server's own) is
    recorded nowhere (docs/api.md's own /api/llm-calls row says it "has none").

    What is right: both say that a refusal by the server is recorded (an ``error`` row) and
    one by the room check, before the call was sent, is not (``service_history_shortened``
    counts the shortening).

    Root cause: the docs' sentences written before service/backends/interceptor.py
    ``Interceptor._finish`` skipped ``ContextLengthExceeded.unsent``; the change updated the
    /api/llm-calls row and operations.md, not these two."""
    assert "the refused calls are recorded as any other" not in _flat(
        DOCS / "architecture.md")
    assert "the refused calls are in `/api/llm-calls`" not in _flat(DOCS / "api.md")
