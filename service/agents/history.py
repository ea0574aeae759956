"""A stored conversation's history as an agent's calls send it: built from the store's messages,
trimmed to SERVICE_HISTORY_CHARS, and shortened further when the model's server says it is over
its context (``AgentContext.call_llm``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace

from ..backends.base import ChatMessage
from ..store import Conversation, Message, MessageStatus

__all__ = ["REFIT_KEEP", "add_user", "build_history", "fitted_history", "sent_chars",
           "shorter_history", "trim_history", "with_system"]


def build_history(conv: Conversation, messages: list[Message]) -> list[ChatMessage]:
    """The conversation as the agent sees it: system prompt, earlier turns, the question last.

    Earlier replies that were cut (cancelled) are kept with what they said; still pending
    replies (another run's) are left out, and so are failed turns, the question with its
    reply: a question the model's server refused (too long for its context) was sent again
    with every later message, each refused the same way, the conversation dead for good.
    Any question left without an answer that said something (failed, cancelled before its
    first token, still pending) is left out with it: two user messages in a row are refused by
    the chat templates that want user and assistant to alternate (Mistral's, Gemma's).
    """
    history: list[ChatMessage] = []
    if conv.system:
        history.append(ChatMessage("system", conv.system))
    for m in messages:
        if m.role == "assistant" and (
                m.status in (MessageStatus.pending, MessageStatus.error) or not m.content):
            continue
        if m.status in (MessageStatus.pending, MessageStatus.error):
            continue
        if m.role == "user" and history and history[-1].role == "user":
            history.pop()  # the question before: never answered
        history.append(ChatMessage(m.role, m.content))
    return history


def with_system(prompt: str, history: Sequence[ChatMessage]) -> list[ChatMessage]:
    """An agent's messages: its system prompt first, with the history's own leading system
    messages (a conversation's, a ``/v1`` client's) joined to it. Two system messages in a
    row are refused by the chat templates that take one (Gemma's folds the first into the
    user's turn, and the second breaks its alternation): every ReAct and plan run of a
    conversation with a system prompt failed there, while chat answered."""
    lead = 0
    while lead < len(history) and history[lead].role == "system":
        lead += 1
    texts = [prompt, *(m.content for m in history[:lead] if m.content)]
    return [ChatMessage("system", "\n\n".join(texts)), *history[lead:]]


def add_user(messages: list[ChatMessage], text: str) -> None:
    """``text`` as the user's next words: joined to the last message if that is the user's
    already (a ReAct observation, the question), as two user messages in a row are refused
    by the chat templates that want user and assistant to alternate."""
    if messages and messages[-1].role == "user":
        last = messages[-1]
        messages[-1] = replace(last, content=f"{last.content}\n\n{text}")
    else:
        messages.append(ChatMessage("user", text))


def trim_history(messages: Sequence[ChatMessage], budget_chars: int) -> list[ChatMessage]:
    """Keep system messages, the current turn, and the newest older turns that fit in
    ``budget_chars``, in their order.

    (A stored conversation's history: a ``/v1`` request's messages go to the model whole.)
    The current turn (the last user message and everything after it) is always kept whole,
    even over budget: without the question, or with tool results cut from the call that asked
    for them, the model cannot answer (and OpenAI-style servers refuse a ``tool`` message
    whose call is not in the history). Older ones go in whole turns (a user message and what
    followed it): kept message by message, a reply went without the question it answered, and
    the chat templates that want user and assistant to alternate (Mistral's, Gemma's) had the
    model's server refuse the prompt.
    """
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    if last_user is None:
        return list(messages)
    used = sum(_size(m) for i, m in enumerate(messages) if m.role == "system" or i >= last_user)
    keep: set[int] = set()
    for turn in reversed(_older_turns(messages) or ()):
        size = sum(_size(messages[i]) for i in turn)
        if used + size > budget_chars:
            break
        keep.update(turn)
        used += size
    return [m for i, m in enumerate(messages)
            if m.role == "system" or i >= last_user or i in keep]  # in their order


def shorter_history(messages: Sequence[ChatMessage], keep: float) -> list[ChatMessage] | None:
    """``messages`` with its oldest turns (a user message and what followed it) dropped until
    at most ``keep`` of the older turns' characters are left, at least one turn dropped; the
    system messages and the current turn kept. None when no older turn is left to drop."""
    turns = _older_turns(messages)
    if turns is None:
        return None
    sizes = [sum(_size(messages[i]) for i in turn) for turn in turns]
    left, budget = sum(sizes), keep * sum(sizes)
    dropped: set[int] = set()
    for turn, size in zip(turns, sizes, strict=True):
        if dropped and left <= budget:
            break
        dropped.update(turn)
        left -= size
    return [m for i, m in enumerate(messages) if i not in dropped]


# How much of the older turns' text each try after a refusal keeps: a half, a quarter, none.
REFIT_KEEP = (0.5, 0.25, 0.0)
# A fit by a refusal's numbers turns the tokens over into characters of the oldest turns. At
# first their characters per token are not known, and the prompt's average is no guide (a
# paste of figures, two characters a token, after turns of prose at five): a cut at the
# average dropped turns that fit, or cut so little that each try was refused again. So the
# first cut takes FIRST_CHARS_PER_TOKEN (text is hardly denser), and each later try of the
# same call the characters per token that the turns dropped in between turned out to cost
# (the two refusals' numbers): too short a cut is cut again, none drops what fits.
FIRST_CHARS_PER_TOKEN = 1.0
# Of the measured characters per token, the share taken: the next turns may be denser than
# the ones measured (a template's tokens per message weigh more on a short turn).
MEASURED_SHARE = 0.9


def fitted_history(given: Sequence[ChatMessage], sent: Sequence[ChatMessage],
                   prompt: int, most: int,
                   before: tuple[int, int] | None = None) -> list[ChatMessage] | None:
    """``given`` (the history as the run got it) with as few of its oldest turns left out as
    bring ``sent`` (a prompt of ``prompt`` tokens, the server said, of which it takes at most
    ``most``) under that, by their characters: what is over, at ``FIRST_CHARS_PER_TOKEN``, or
    at what the turns left out since ``before`` (the same call's last refused try: its tokens
    and characters) cost; at least one turn. None when that leaves nothing more out of
    ``sent`` than it already leaves out."""
    if prompt <= most:
        return None
    chars = sum(_size(m) for m in sent)
    per_token = FIRST_CHARS_PER_TOKEN
    if before is not None and before[0] > prompt and before[1] > chars:
        per_token = MEASURED_SHARE * (before[1] - chars) / (before[0] - prompt)
    cut = (prompt - most) * per_token  # characters
    older = _older_turns(given)
    if older is None:
        return None
    in_sent = {id(m) for m in sent}
    sizes = [sum(_size(given[i]) for i in turn) for turn in older]
    kept = sum(size for turn, size in zip(older, sizes, strict=True)
               if any(id(given[i]) in in_sent for i in turn))
    total = sum(sizes)
    if total <= 0:
        return None
    shorter = shorter_history(given, max(0.0, kept - cut) / total)
    if shorter is None:
        return None
    out = {id(m) for m in given} - {id(m) for m in shorter}
    return shorter if out & in_sent else None


def sent_chars(sent: Sequence[ChatMessage]) -> int:
    """The characters of a call's messages, as ``fitted_history`` measures them."""
    return sum(_size(m) for m in sent)


def _older_turns(messages: Sequence[ChatMessage]) -> list[list[int]] | None:
    """The indexes of the messages before the last user message (the system's left out),
    turn by turn (a user message and what followed it); None when there are none."""
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    if last_user is None:
        return None
    turns: list[list[int]] = []
    for i, m in enumerate(messages[:last_user]):
        if m.role == "system":
            continue
        if m.role == "user" or not turns:
            turns.append([])
        turns[-1].append(i)
    return turns or None


def _size(m: ChatMessage) -> int:
    """A message's characters: its text and its tool calls' arguments."""
    return len(m.content) + sum(
        len(c.invalid_arguments or json.dumps(c.arguments)) for c in m.tool_calls)
