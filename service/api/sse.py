"""Server-sent events framing (pure): ``id:``/``event:``/``data:`` frames, comment keep-alives."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["KEEPALIVE", "sse_data", "sse_event"]

KEEPALIVE = b": keep-alive\n\n"


def _data_lines(text: str) -> str:
    # A newline inside data would end the field: each line becomes its own "data:" line.
    return "".join(f"data: {line}\n" for line in text.split("\n"))


def sse_event(seq: int | None, type_: str | None, data: Any) -> bytes:
    """One frame: ``id: <seq>\\nevent: <type>\\ndata: <json>\\n\\n``."""
    out = []
    if seq is not None:
        out.append(f"id: {seq}\n")
    if type_ is not None:
        out.append(f"event: {type_}\n")
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    out.append(f"data: {text}\n" if "\n" not in text else _data_lines(text))
    out.append("\n")
    return "".join(out).encode()


def sse_data(data: Any) -> bytes:
    """A data-only frame (the OpenAI stream shape)."""
    return sse_event(None, None, data)
