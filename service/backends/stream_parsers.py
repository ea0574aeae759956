"""Incremental, pure (sync, no I/O) readers for the two streaming wire formats of LLM servers.

* :class:`NDJSONSplitter`: Ollama's newline-delimited JSON. ``feed`` bytes split at any boundary,
  get the complete lines out; ``flush`` at end of stream returns a last line that had no newline.
* :class:`SSEParser`: Server-Sent Events (the WHATWG event-stream grammar) as OpenAI-compatible
  servers send them. ``feed`` bytes, get :class:`SSEEvent` and :class:`SSEComment` items out, in
  order. Comment lines (``: keep-alive``) are reported separately so that callers can tell a
  keep-alive from progress.

Both bound the length of a line, and the SSE parser that of an event's data too
(:class:`LineTooLong`), so a peer cannot grow memory without end.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DEFAULT_MAX_LINE",
    "LineTooLong",
    "NDJSONSplitter",
    "SSEComment",
    "SSEEvent",
    "SSEItem",
    "SSEParser",
]

DEFAULT_MAX_LINE = 4 * 1024 * 1024


class LineTooLong(ValueError):
    """A line exceeded the configured maximum before its end arrived."""


class NDJSONSplitter:
    """Split a byte stream into lines at ``\\n``; a trailing ``\\r`` and blank lines are dropped."""

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self._buffer = bytearray()
        self._max_line = max_line

    def __repr__(self) -> str:
        return f"<NDJSONSplitter buffered={len(self._buffer)}>"

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return every line completed by it (without the line ending)."""
        if not data:
            return []
        buf = self._buffer
        start_scan = len(buf)
        buf += data
        lines: list[bytes] = []
        start = 0
        pos = buf.find(b"\n", start_scan)
        while pos != -1:
            line = bytes(buf[start:pos])
            if line.endswith(b"\r"):
                line = line[:-1]
            if line.strip():
                lines.append(line)
            start = pos + 1
            pos = buf.find(b"\n", start)
        del buf[:start]
        if len(buf) > self._max_line:
            raise LineTooLong(f"line longer than {self._max_line} bytes")
        return lines

    def flush(self) -> bytes | None:
        """End of stream: return the unterminated last line, if it holds anything."""
        line = bytes(self._buffer).rstrip(b"\r")
        self._buffer.clear()
        return line if line.strip() else None


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


@dataclass(frozen=True, slots=True)
class SSEComment:
    """A ``:`` line: a keep-alive, never progress."""

    text: str = ""


SSEItem = SSEEvent | SSEComment


class SSEParser:
    """Incremental event-stream parser.

    Lines end with ``\\r\\n``, ``\\n`` or a lone ``\\r`` (a ``\\r`` at the end of one ``feed`` and
    a ``\\n`` at the start of the next are one line ending). A blank line dispatches the event
    gathered so far; an event without ``data`` is dropped, as the spec says.
    """

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self._buffer = bytearray()
        self._max_line = max_line
        self._skip_lf = False  # the previous feed ended with "\r": a leading "\n" belongs to it
        self._data: list[str] = []
        self._data_size = 0  # characters in _data: an event is bounded like a line
        self._event = ""
        self._last_id: str | None = None
        self._retry: int | None = None

    def __repr__(self) -> str:
        return f"<SSEParser buffered={len(self._buffer)} pending_data_lines={len(self._data)}>"

    def feed(self, data: bytes) -> list[SSEItem]:
        """Add ``data``; return every event and comment completed by it, in order."""
        if not data:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if data[:1] == b"\n":
                data = data[1:]
        buf = self._buffer
        # What is kept from the last feed holds no line ending: the search starts at the new
        # bytes (from the start, a line growing in small reads was scanned again at each).
        old = len(buf)
        buf += data
        items: list[SSEItem] = []
        start = 0
        size = len(buf)
        # Each search resumes where it found its last match (a search per line from the start
        # of the rest was quadratic in the lines of one feed).
        cr = buf.find(b"\r", old)
        lf = buf.find(b"\n", old)
        while start < size:
            if cr != -1 and cr < start:
                cr = buf.find(b"\r", start)
            if lf != -1 and lf < start:
                lf = buf.find(b"\n", start)
            if cr == -1 and lf == -1:
                break
            if cr == -1 or (lf != -1 and lf < cr):
                end, nxt = lf, lf + 1
            elif cr + 1 < size:
                end, nxt = cr, cr + 2 if buf[cr + 1] == 0x0A else cr + 1
            else:  # "\r" is the last byte: the line is complete; a "\n" may follow next feed
                end, nxt = cr, cr + 1
                self._skip_lf = True
            self._line(bytes(buf[start:end]), items)
            start = nxt
        del buf[:start]
        if len(buf) > self._max_line:
            raise LineTooLong(f"line longer than {self._max_line} bytes")
        return items

    def _line(self, raw: bytes, items: list[SSEItem]) -> None:
        line = raw.decode("utf-8", errors="replace")
        if not line:
            self._dispatch(items)
            return
        if line.startswith(":"):
            text = line[1:]
            items.append(SSEComment(text[1:] if text.startswith(" ") else text))
            return
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "error" and not self._data:
            # Not an SSE field: llama.cpp's server sends an error in a stream as an
            # ``error: {json}`` line (then ``data: [DONE]``). Kept as an "error" event, so the
            # upstream's message is not lost.
            name, self._event = "data", "error"
        if name == "data":
            self._data.append(value)
            self._data_size += len(value) + 1
            if self._data_size > self._max_line:
                raise LineTooLong(f"event data longer than {self._max_line} bytes")
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
        # other field names are ignored, as the spec says

    def _dispatch(self, items: list[SSEItem]) -> None:
        if self._data:
            items.append(
                SSEEvent(
                    data="\n".join(self._data),
                    event=self._event or "message",
                    id=self._last_id,
                    retry=self._retry,
                )
            )
        self._data = []
        self._data_size = 0
        self._event = ""
        self._retry = None

