"""Frozen records the store reads and writes. Pure data, no I/O."""

from __future__ import annotations

import base64
import json
import math
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

from ..errors import StoreError
from ..text import clean_text

__all__ = [
    "CONVERSATIONS",
    "KEPT_EVENTS_SQL",
    "MESSAGES",
    "PRUNE_ROWS",
    "STEP_EVENTS",
    "BegunRun",
    "Conversation",
    "LLMCallOutcome",
    "LLMCallRecord",
    "Message",
    "MessageStatus",
    "RunEvent",
    "RunRecord",
    "begun_run",
    "call_row",
    "conversation_row",
    "decode_cursor",
    "encode_cursor",
    "ends_a_step",
    "event_rows",
    "message_row",
    "new_id",
    "newest_history",
    "run_row",
    "strict_json",
]

# A run's events after which the text streamed so far was a step's (a ReAct thought, the text
# beside a tool call), not the answer: the clients show it as the step, and a reply cut short
# keeps only the text after the last of them.
STEP_EVENTS = frozenset({"thought", "tool.call", "tool.result", "plan", "step.started",
                         "step.finished"})


# The events of a finished run that the retention (SERVICE_EVENTS_RETENTION_DAYS) keeps, as a
# SQL list: its start, its answer or why there is none, and its end (one row each). A re-join
# of a pruned run is still told what the run's row and its reply say.
KEPT_EVENTS_SQL = "'run.started', 'message', 'error', 'run.finished'"
# Events deleted per write transaction by a pruning (the retention's, a conversation's delete):
# no other write of the process waits long behind one.
PRUNE_ROWS = 5000


def ends_a_step(type_: str, data: dict[str, Any]) -> bool:
    """Whether the text streamed before this event was a step's. A reasoning model's thinking
    (``thought`` with ``reasoning``: it may come between answer tokens) is not a step: the
    answer's text goes on around it (/v1 shows it as ``reasoning_content``)."""
    return type_ in STEP_EVENTS and not (type_ == "thought" and data.get("reasoning"))


class MessageStatus(StrEnum):
    pending = "pending"  # an assistant message whose run is still producing it
    complete = "complete"  # final
    cancelled = "cancelled"  # the run was cancelled / timed out; content is the partial text
    error = "error"  # the run failed; ``error`` says why


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    title: str | None
    system: str | None
    model: str | None
    agent: str | None
    owner: str | None
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class Message:
    id: str
    conversation_id: str
    role: str
    content: str
    status: MessageStatus
    run_id: str | None
    error: str | None
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class RunRecord:
    id: str
    conversation_id: str
    owner: str | None
    agent: str
    model: str | None
    status: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    usage: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RunEvent:
    """One event of one run, as made, stored, read back and sent: ``seq`` counts from 1 within
    the run. ``raw`` is ``data`` as compact JSON, encoded once (stored and sent as is); left
    out, it is encoded here, and data JSON cannot carry (NaN, infinities, other types) is
    replaced by its text first (``strict_json``)."""

    run_id: str
    seq: int
    type: str
    data: dict[str, Any]
    created_at: float
    raw: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.raw:
            return
        try:
            raw = json.dumps(self.data, separators=(",", ":"), allow_nan=False)
        except ValueError:  # NaN/Infinity (a model's arguments, a tool's output): not JSON
            object.__setattr__(self, "data", strict_json(self.data))
            raw = json.dumps(self.data, separators=(",", ":"), allow_nan=False)
        object.__setattr__(self, "raw", raw)

    @classmethod
    def make(cls, run_id: str, seq: int, type_: str, data: dict[str, Any],
             created_at: float) -> RunEvent:
        return cls(run_id, seq, type_, data, created_at)

    def wire(self) -> dict[str, Any]:
        """The WebSocket shape: ``{"run_id", "id", "type", "data"}``."""
        return {"run_id": self.run_id, "id": self.seq, "type": self.type, "data": self.data}

    def wire_json(self) -> str:
        """``wire()`` as JSON text, reusing the encoded data."""
        return (f'{{"run_id":{json.dumps(self.run_id)},"id":{self.seq},'
                f'"type":{json.dumps(self.type)},"data":{self.raw}}}')


def event_rows(rows: Iterable[Sequence[Any]], max_chars: int | None = None) -> list[RunEvent]:
    """Stored events (rows of run_id, seq, type, data, created_at, in order) up to the one
    whose JSON takes their total past ``max_chars`` characters, that one included (never
    none), or all of them. ``rows`` is read no further: a cursor's rest stays in the
    database."""
    out: list[RunEvent] = []
    size = 0
    for r in rows:
        out.append(RunEvent(r[0], r[1], r[2], json.loads(r[3]), r[4], r[3]))
        size += len(r[3])
        if max_chars is not None and size >= max_chars:
            break
    return out


def stored_data(raw: str) -> dict[str, Any]:
    """A stored event's data as recovery reads it: ``{}`` for a row that does not decode (a
    rotted byte: SQLite keeps no checksum), so one bad row cannot stop a start or the upkeep
    that closes a dead instance's runs; what it held is lost, the rest is kept."""
    try:
        value = json.loads(raw)
    except (ValueError, TypeError):
        return {}
    return value if isinstance(value, dict) else {}


def unreadable(exc: BaseException, what: str) -> BaseException:
    """A stored row that does not decode (``json``, UTF-8) as a ``StoreError`` naming it, not
    an exception no caller expects from a store (a start failed with a traceback); anything
    else as it is."""
    if isinstance(exc, json.JSONDecodeError | UnicodeDecodeError):
        error = StoreError(f"{what}: the store holds data it cannot read ({exc})")
        error.__cause__ = exc
        return error
    return exc


def strict_json(value: Any) -> Any:
    """``value`` with what JSON cannot carry replaced by its text: NaN and infinities (which
    Python's json reads and writes, but browsers' JSON.parse refuses), and non-JSON types."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):  # keys as json.dumps writes them (True -> "true", ...)
        return {k if isinstance(k, str) else json.dumps(strict_json(k)).strip('"'): strict_json(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)


class LLMCallOutcome(StrEnum):
    ok = "ok"
    error = "error"
    cancelled = "cancelled"
    timed_out = "timed_out"


@dataclass(frozen=True, slots=True)
class LLMCallRecord:
    """One call through the interceptor. Times are seconds (wall clock for ``started_at``)."""

    id: str
    backend: str
    model: str
    outcome: LLMCallOutcome
    started_at: float
    run_id: str | None = None
    queue_wait: float | None = None
    ttft: float | None = None  # time to first token, from the upstream request
    duration: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tokens_estimated: bool = False  # True when the stream was cut before usage arrived
    error: str | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


# A cursor names its kind. A conversation list's is ``s<seq>``; a conversation's messages' is
# ``s0<seq>`` (a seq is never 0): an older instance (a rolling upgrade) still reads it as the
# same position (its ``int()`` takes the leading zero), and so does this code a message cursor
# handed out before the kinds, ``s<seq>``. So a message cursor passed to the list is told (a
# 422, not a page of the wrong table); a list's passed to a message page cannot be told from
# an old message cursor, and is read as a position, as before.
CONVERSATIONS = "s"
MESSAGES = "s0"


def encode_cursor(seq: int, kind: str = CONVERSATIONS) -> str:
    return base64.urlsafe_b64encode(f"{kind}{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str, kind: str = CONVERSATIONS) -> int:
    invalid = f"invalid cursor: {cursor!r}"
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        digits = raw[1:]
        seq = int(digits)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(invalid) from exc
    if not raw.startswith("s") or not digits.isascii() or not digits.isdigit() or seq >= 2**63:
        raise ValueError(invalid)
    if kind == CONVERSATIONS and digits.startswith("0"):
        raise ValueError(f"a cursor of a page of a conversation's messages, not of this list: "
                         f"{cursor!r}")
    return seq


def begun_run(
    run_id: str, user_id: str, reply_id: str, conv: Conversation, history: list[Message],
    content: str, agent: str | None, model: str | None, owner: str | None,
    default_model: str | None, now: float,
) -> BegunRun:
    """The records of a new run on ``conv`` (agent and model resolved from it if not given)."""
    the_agent = agent or conv.agent or "chat"
    the_model = model or conv.model or default_model
    run = RunRecord(run_id, conv.id, owner, the_agent, the_model, "queued", now, None, None,
                    None, {})
    user = Message(user_id, conv.id, "user", clean_text(content), MessageStatus.complete,
                   run_id, None, now, now)
    reply = Message(reply_id, conv.id, "assistant", "", MessageStatus.pending, run_id, None,
                    now, now)
    started = RunEvent(run_id, 1, "run.started", {
        "run_id": run_id, "conversation_id": conv.id, "agent": the_agent, "model": the_model,
    }, now)
    return BegunRun(run, user, reply, conv, history, started)


class BegunRun(NamedTuple):
    """What ``Store.begin_run`` wrote and read."""

    run: RunRecord
    user: Message
    reply: Message
    conversation: Conversation
    history: list[Message]  # the conversation's messages before this run's
    started: RunEvent  # event 1


# Rows as both stores select them (the columns in the records' order), decoded.
def conversation_row(row: Sequence[Any]) -> Conversation:
    return Conversation(*row)


def message_row(row: Sequence[Any]) -> Message:
    m = list(row)
    m[4] = MessageStatus(m[4])
    return Message(*m)


def run_row(row: Sequence[Any]) -> RunRecord:
    r = list(row)
    r[10] = json.loads(r[10]) if r[10] else {}
    return RunRecord(*r)


def call_row(row: Sequence[Any]) -> LLMCallRecord:
    c = list(row)
    c[3] = LLMCallOutcome(c[3])
    c[11] = bool(c[11])
    return LLMCallRecord(*c)


HISTORY_SLICE = 200  # messages a new run's history is read in, newest first


def newest_history(fetch: Callable[[int | None, int], list[tuple[int, Message]]],
                   chars: int | None) -> list[Message]:
    """A conversation's messages for a new run's history, oldest first: all of them (``chars``
    None), or the newest whose text reaches ``chars`` (SERVICE_HISTORY_CHARS), back to a user
    message, so that the oldest turn read is whole: no older turn could be kept by the trim
    (``agents.history.trim_history`` keeps the newest whole turns that fit), so none is read.
    Read in slices, newest first (``fetch(before_seq, limit)``: (seq, message) pairs, newest
    first): every run read every message of its conversation, under the write lock, to send
    the model its last few dozen.

    The text counted is what the history keeps: not a reply that failed or is still pending
    and not a question no reply answered (``agents.history.build_history`` leaves those out),
    so a failed turn's text does not stop the read short of turns that fit."""
    budget = math.inf if chars is None else chars
    newest: list[Message] = []
    size = 0
    answered = False  # the message just after (newer than) this one is a reply that counts
    before: int | None = None
    while True:
        rows = fetch(before, HISTORY_SLICE)
        for seq, m in rows:
            newest.append(m)
            before = seq
            if m.role == "user":
                if answered:
                    size += len(m.content)
                if size > budget:
                    return newest[::-1]
                answered = False
            else:
                counts = (m.status not in (MessageStatus.pending, MessageStatus.error)
                          and bool(m.content))
                if counts:
                    size += len(m.content)
                answered = m.role == "assistant" and counts
        if len(rows) < HISTORY_SLICE:
            return newest[::-1]

