"""Frozen records the store reads and writes. Pure data, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "Conversation",
    "LLMCallOutcome",
    "LLMCallRecord",
    "Message",
    "MessageStatus",
    "RunEventRecord",
    "RunRecord",
]


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
class RunEventRecord:
    run_id: str
    seq: int
    type: str
    data: dict[str, Any]
    created_at: float
    # ``data`` as compact JSON, when already encoded (stored and sent as is: encoded once).
    raw: str | None = field(default=None, compare=False, repr=False)


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
