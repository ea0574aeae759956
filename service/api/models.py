"""Request and response models of the HTTP API (pydantic).

The same models validate input and generate ``/openapi.json`` (through quart-schema).
"""

from __future__ import annotations

import json
import math
import sys
from datetime import UTC, datetime
from functools import cache
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from ..store import Conversation, Message
from ..text import not_text_at

__all__ = [
    "MAX_CONTENT_CHARS",
    "MAX_JSON_DEPTH",
    "MAX_MODEL_CHARS",
    "AgentName",
    "ChatCompletionOut",
    "ConversationList",
    "ConversationListItem",
    "ConversationOut",
    "ConversationQuery",
    "ConversationWithMessages",
    "CreateConversation",
    "ErrorBody",
    "ErrorDetail",
    "HealthOut",
    "JsonRequest",
    "ListConversationsQuery",
    "MessageOut",
    "OpenAIModel",
    "OpenAIModelList",
    "ReadyOut",
    "Unicode",
    "is_event_id",
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


class Unicode(BaseModel):
    """Every field's strings are Unicode text: a lone surrogate (``"\\ud800"``: valid JSON,
    but UTF-8 cannot encode it, so neither the store nor an upstream could take it) is refused
    (422 naming the field), in nested lists and objects too, keys included. (An unknown
    field's name with one is pydantic-core's own 422.)"""

    @field_validator("*", mode="wrap")
    @classmethod
    def _unicode(cls, value: Any, handler: ValidatorFunctionWrapHandler,
                 info: ValidationInfo) -> Any:
        # Checked before pydantic-core sees it (it fails on a lone surrogate in a dict key),
        # except in a field of nested models: they check theirs, naming their own fields.
        field = cls.model_fields[info.field_name] if info.field_name else None
        if field is None or not _holds_model(field):
            where = not_text_at(value)
            if where is not None:
                at = f" at {where}" if where else ""
                raise ValueError(f"not text: a NUL character or a lone surrogate{at}")
        strict = cls.model_config.get("strict", False)  # a JSON body's (not a query's)
        if field is not None and strict and (types := _json_types(field)) and not _is_a(
            value, types
        ):
            # One error naming the field: pydantic's would be one per member of the union,
            # each named "field.member" ("content.str", "content.list[...]").
            raise ValueError("must be " + " or ".join(_JSON_NAMES[t] for t in types))
        return handler(value)


_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
               list: "an array", dict: "an object", type(None): "null"}


@cache
def _json_types(field: FieldInfo) -> tuple[type, ...]:
    """The JSON types a union field takes (``str | list[str] | None``: str, list, None); empty
    for a field of one type (with or without None), whose errors name it already."""
    if get_origin(field.annotation) not in (Union, UnionType):
        return ()
    types = []
    for arg in get_args(field.annotation):
        tp = get_origin(arg) or arg
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            tp = dict
        if tp not in _JSON_NAMES:
            return ()  # a Literal, an enum: pydantic says what it takes
        types.append(tp)
    return tuple(types) if len([t for t in types if t is not type(None)]) > 1 else ()


def _is_a(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True  # an integer is a number
    return isinstance(value, types)


@cache
def _holds_model(field: FieldInfo) -> bool:
    def holds(tp: Any) -> bool:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            return True
        return any(holds(arg) for arg in get_args(tp))
    return holds(field.annotation)


class NotFinite(ValueError):
    """NaN, Infinity, or a number out of a double's range in a client's JSON."""


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400
        raise NotFinite(f"{text[:20]} is out of range")
    return value


def _integer(text: str) -> int:
    value = int(text)
    if len(text) > 308 and abs(value) > sys.float_info.max:  # 1 and 400 zeros: JSON.parse's
        raise NotFinite(f"{text[:20]}... is out of range")  # Infinity, as 1e400 is
    return value


def _refuse_constant(name: str) -> Any:
    raise NotFinite(f"{name} is not a JSON value")


MAX_JSON_DEPTH = 128  # levels of arrays and objects a client's JSON may nest


def too_deep(value: Any, raw: str | bytes | None = None, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether JSON ``value`` nests arrays and objects more than ``limit`` levels deep. Python's
    parser goes as deep as the stack it runs on allows: a body parsed on a request's stack
    (~950 levels) was re-encoded for the model's server on a run's deeper one and crashed it
    (RecursionError: a 500 and a failed run). ``raw``, the text it was parsed from, skips the
    walk when it holds too few brackets to nest that deep (most bodies)."""
    if raw is not None:
        opening = (b"[", b"{") if isinstance(raw, bytes) else ("[", "{")
        if raw.count(opening[0]) + raw.count(opening[1]) <= limit:  # type: ignore[arg-type]
            return False
    stack: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def strict_json_loads(raw: str | bytes) -> Any:
    """A client's body or message as strict JSON: no NaN, Infinity, or number out of a
    double's range (Python's json reads them; passed on, a model's server refuses them, and
    echoed back they made replies that JSON.parse refuses). ``NotFinite`` (a ValueError)."""
    return json.loads(raw, parse_float=_finite, parse_int=_integer,
                      parse_constant=_refuse_constant)


class JsonRequest(Unicode):
    """A JSON body: each field takes its JSON type only (``"stream": "on"``, ``"max_tokens":
    "5"`` and ``"timeout": true`` are 422s, not coerced), except that an integer is a number."""

    model_config = ConfigDict(strict=True)


class _Strict(JsonRequest):
    # Unknown fields are refused (422 naming them): a typo must not be silently ignored.
    model_config = ConfigDict(extra="forbid")


class _Query(Unicode):
    # Query values are strings (?limit=5): converted, not strict. Unknown ones are ignored, as
    # a browser's (an EventSource cache-buster ?_=123, ?access_token=) must be.
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _empty_is_absent(cls, values: Any) -> Any:
        """An empty value (``?limit=``, ``?run_id=``, as a form or API.md's own templates leave
        it) is absent, as an empty ``?before=`` was: ``?limit=`` was a 422 and ``?run_id=``
        a 404 "no run ''"."""
        if isinstance(values, dict):
            return {k: v for k, v in values.items() if v != ""}
        return values


class CreateConversation(_Strict):
    title: str | None = Field(None, max_length=500)
    system: str | None = Field(None, max_length=100_000, description="system prompt")
    model: str | None = Field(None, max_length=200)
    agent: AgentName | None = None


class ListConversationsQuery(_Query):
    limit: int = Field(20, ge=1, le=100)
    before: str | None = Field(None, max_length=200, description="cursor from a page's `next`")


class ConversationQuery(_Query):
    limit: int | None = Field(None, ge=1, le=1000, description=(
        "the newest N messages (before `before`), oldest first; absent: all of them (a page "
        "of 100 with `before`)"))
    before: str | None = Field(None, max_length=200,
                               description="cursor from a conversation's `messages_next`")


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
    # Pass back as ``before`` for the older messages; None: the page reaches the first.
    messages_next: str | None = None


# A list item's ``system`` is cut to this (``system_truncated`` says so; the conversation's
# own GET has it whole): a /v1 client's system prompt, stored with each completion, can be
# hundreds of KB, and a page of 100 of them was tens of MB for ids and titles.
LISTED_SYSTEM_CHARS = 500


class ConversationListItem(ConversationOut):
    system_truncated: bool = False

    @classmethod
    def listed(cls, c: Conversation) -> ConversationListItem:
        item = cls(**ConversationOut.of(c).model_dump())
        if item.system is not None and len(item.system) > LISTED_SYSTEM_CHARS:
            item.system, item.system_truncated = item.system[:LISTED_SYSTEM_CHARS], True
        return item


class ConversationList(BaseModel):
    data: list[ConversationListItem]
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


class RunEventsQuery(_Query):
    after: int | None = Field(None, ge=0, le=2**63 - 1, description="resume after this event id")

    @field_validator("after", mode="before")
    @classmethod
    def _event_id(cls, value: Any) -> Any:
        if isinstance(value, str) and value and not is_event_id(value):  # (empty: absent)
            raise ValueError("must be an event id (at most 19 digits)")
        return value


def is_event_id(text: str) -> bool:
    """Whether ``text`` is an event id as a client sends one back (``?after=``,
    ``Last-Event-ID``): digits only, and few enough for ``int()`` (which refuses more than
    4,300) and for a run's 64-bit seq."""
    return 0 < len(text) <= 19 and text.isascii() and text.isdigit()


class CancelOut(BaseModel):
    id: str
    status: str
