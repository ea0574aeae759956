"""The terminal client's reading of a stream: its text cut into lines, none held past a bound,
and the lines into the API's SSE frames (``service.chat`` shows them)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ChatError", "LineTooLong", "Lines", "Malformed", "SSEParser"]

_LINE_MAX = 32 << 20  # characters of one line of a stream (an event's whole answer fits)


class ChatError(Exception):
    """A request failed: its one line goes to stderr."""


class Malformed(ChatError):
    """A frame that is not an event of the API (a broken proxy, another server at the URL)."""


@dataclass
class SSEParser:
    """Frames of an SSE stream, fed line by line: ``{"id", "event", "data"}`` (data parsed as
    JSON); comments (keep-alives) are dropped."""

    _fields: dict[str, str] = field(default_factory=dict)
    _data: list[str] = field(default_factory=list)

    def feed(self, line: str) -> dict[str, Any] | None:
        if line:
            if not line.startswith(":"):
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "data":
                    self._data.append(value)
                else:
                    self._fields[name] = value
            return None
        frame: dict[str, Any] | None = None
        fields, data = self._fields, self._data
        self._fields, self._data = {}, []
        if data:
            try:
                parsed = json.loads("\n".join(data))
            except ValueError as exc:
                raise Malformed(f"an event's data is not JSON ({exc})") from None
            if not isinstance(parsed, dict):
                raise Malformed(f"an event's data is not an object: {str(parsed)[:80]}")
            frame = {**fields, "data": parsed}
        return frame


class LineTooLong(ChatError):
    """A line of the stream past ``_LINE_MAX`` characters."""


@dataclass
class Lines:
    """A stream's text cut into lines (at LF, CRLF or a lone CR), none held past ``limit``
    characters (httpx's ``aiter_lines`` held a line that never ends whole)."""

    limit: int = _LINE_MAX
    _pending: list[str] = field(default_factory=list)
    _size: int = 0
    _cr: bool = False  # the last text ended with a CR: an LF first in the next is its pair

    def feed(self, text: str) -> list[str]:
        if self._cr and text.startswith("\n"):
            text = text[1:]
        self._cr = text.endswith("\r")
        parts = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        lines = []
        for part in parts[:-1]:
            self._pending.append(part)
            lines.append("".join(self._pending))
            self._pending, self._size = [], 0
        if parts[-1]:
            self._size += len(parts[-1])
            if self._size > self.limit:
                raise LineTooLong(f"the service sent a line of over {self.limit:,} characters")
            self._pending.append(parts[-1])
        return lines
