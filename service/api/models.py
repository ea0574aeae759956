"""Request and response models of the HTTP API (pydantic).

The same models validate input and generate ``/openapi.json`` (through quart-schema).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..store import Conversation, Message

__all__ = [
    "MAX_CONTENT_CHARS",
    "MAX_MODEL_CHARS",
    "AgentName",
    "ChatCompletionOut",
    "ConversationList",
    "ConversationOut",
    "ConversationWithMessages",
    "CreateConversation",
    "ErrorBody",
    "ErrorDetail",
    "HealthOut",
    "ListConversationsQuery",
    "MessageOut",
    "OpenAIModel",
    "OpenAIModelList",
    "ReadyOut",
    "iso",
]

AgentName = Literal["chat", "react", "plan_execute", "auto"]

# Limits of a message's fields, the same over HTTP (PostMessage) and the WebSocket (WsMessage).
MAX_CONTENT_CHARS = 1_000_000
MAX_MODEL_CHARS = 200


def iso(ts: float | None) -> str | None:
    """Unix seconds to an RFC 3339 UTC timestamp with milliseconds."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Strict(BaseModel):
    # Unknown fields are refused (422 naming them): a typo must not be silently ignored.
    model_config = ConfigDict(extra="forbid")


class CreateConversation(_Strict):
    title: str | None = Field(None, max_length=500)
    system: str | None = Field(None, max_length=100_000, description="system prompt")
    model: str | None = Field(None, max_length=200)
    agent: AgentName | None = None


class ListConversationsQuery(_Strict):
    limit: int = Field(20, ge=1, le=100)
    before: str | None = Field(None, max_length=200, description="cursor from a page's `next`")


class ConversationOut(BaseModel):
    id: str
    title: str | None
    system: str | None
    model: str | None
    agent: str | None
    created_at: str
    updated_at: str

    @classmethod
    def of(cls, c: Conversation) -> ConversationOut:
        return cls(
            id=c.id, title=c.title, system=c.system, model=c.model, agent=c.agent,
            created_at=iso(c.created_at) or "", updated_at=iso(c.updated_at) or "",
        )


class MessageOut(BaseModel):
    id: str
    role: str
    content: str
    status: Literal["pending", "complete", "cancelled", "error"]
    created_at: str
    run_id: str | None
    error: str | None = None

    @classmethod
    def of(cls, m: Message) -> MessageOut:
        return cls(
            id=m.id, role=m.role, content=m.content, status=m.status.value,
            created_at=iso(m.created_at) or "", run_id=m.run_id, error=m.error,
        )


class ConversationWithMessages(ConversationOut):
    messages: list[MessageOut]


class ConversationList(BaseModel):
    data: list[ConversationOut]
    next: str | None


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class HealthOut(BaseModel):
    status: str = Field(description='"ok", or "down" (503) if the process can run nothing')
    error: str | None = None


class ReadyOut(BaseModel):
    status: str = Field(description='"ready" (200) or "not ready" (503)')
    checks: dict[str, str] = Field(description='"ok" or "down: <why>" for each part')
    down: list[str]


class OpenAIModel(BaseModel):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str


class OpenAIModelList(BaseModel):
    object: str = "list"
    data: list[OpenAIModel]


class ChatCompletionOut(BaseModel):
    """A ``chat.completion``; with ``stream: true`` the answer is instead ``text/event-stream``
    of ``chat.completion.chunk`` objects, then ``data: [DONE]``."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: dict[str, Any] | None = None


def error_body(type_: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"type": type_, "message": message, **extra}}


class PostMessage(_Strict):
    content: str = Field(min_length=1, max_length=MAX_CONTENT_CHARS)
    agent: AgentName | None = Field(None, description="default: the conversation's, else chat")
    model: str | None = Field(None, max_length=MAX_MODEL_CHARS)
    stream: bool = False
    on_disconnect: Literal["cancel", "continue"] = "cancel"
    timeout: float | None = Field(None, gt=0, le=86_400, description="run deadline, seconds")


class RunOut(BaseModel):
    id: str
    conversation_id: str
    agent: str
    model: str | None
    status: Literal["queued", "running", "succeeded", "failed", "cancelled", "timed_out"]
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    error: str | None = None
    usage: dict[str, Any] = Field(default_factory=dict)


class MessageResult(BaseModel):
    run: RunOut
    message: MessageOut


class RunEventsQuery(_Strict):
    after: int | None = Field(None, ge=0, le=2**63 - 1, description="resume after this event id")


class CancelOut(BaseModel):
    id: str
    status: str
