"""Run events: typed payloads (the wire shapes of API.md "Run events") and the event record.

Pure data; the run owns numbering (seq from 1) and the supervisor owns persistence and fan-out.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

__all__ = [
    "EVENT_TYPES",
    "EventType",
    "RunEvent",
    "RunFinishedData",
    "RunStartedData",
    "TokenData",
    "ToolCallData",
    "ToolResultData",
    "strict_json",
]

EventType = Literal[
    "run.started",
    "queued",
    "token",
    "thought",
    "tool.call",
    "tool.result",
    "plan",
    "step.started",
    "step.finished",
    "decision",
    "message",
    "error",
    "shutdown",
    "run.finished",
]
EVENT_TYPES: frozenset[str] = frozenset(EventType.__args__)  # type: ignore[attr-defined]


class RunStartedData(TypedDict):
    run_id: str
    conversation_id: str
    agent: str
    model: str | None


class TokenData(TypedDict):
    text: str


class ToolCallData(TypedDict):
    name: str
    arguments: dict[str, Any]
    call_id: str


class ToolResultData(TypedDict, total=False):
    call_id: str
    output: Any
    error: str


class RunFinishedData(TypedDict):
    status: str
    usage: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RunEvent:
    """One event of one run; ``seq`` counts from 1 within the run."""

    run_id: str
    seq: int
    type: str
    data: dict[str, Any]
    created_at: float
    raw: str  # ``data`` as compact JSON, encoded once: stored and sent as is

    @classmethod
    def make(cls, run_id: str, seq: int, type_: str, data: dict[str, Any],
             created_at: float) -> RunEvent:
        try:
            raw = json.dumps(data, separators=(",", ":"), allow_nan=False)
        except ValueError:  # NaN/Infinity (a model's arguments, a tool's output): not JSON
            data = strict_json(data)
            raw = json.dumps(data, separators=(",", ":"), allow_nan=False)
        return cls(run_id, seq, type_, data, created_at, raw)

    def wire(self) -> dict[str, Any]:
        """The WebSocket shape: ``{"run_id", "id", "type", "data"}``."""
        return {"run_id": self.run_id, "id": self.seq, "type": self.type, "data": self.data}

    def wire_json(self) -> str:
        """``wire()`` as JSON text, reusing the encoded data."""
        return (f'{{"run_id":{json.dumps(self.run_id)},"id":{self.seq},'
                f'"type":{json.dumps(self.type)},"data":{self.raw}}}')


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
