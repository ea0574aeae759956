"""What a turn of ``python -m service chat`` shows: the answer as Markdown (live on a
terminal, plain in a pipe), the agent's steps dimmed (on stderr in a pipe), and text from the
service without terminal control characters. The protocol is ``service.chat``'s."""

from __future__ import annotations

import json
import re
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.text import Text

__all__ = ["Renderer"]


# C0 and C1 controls (ESC, CSI: a model's text must not drive the terminal) and the bidi
# overrides, embeddings and isolates (they reorder what follows them on the screen).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _safe(text: str) -> str:
    """Text from the service (model output, errors) without terminal control characters. A
    carriage return is dropped, not marked: a model's CRLF line ends (split across tokens or
    not) are its line ends, and a lone one would only move the cursor back over the line."""
    return _CONTROL.sub("\ufffd", text.replace("\r", ""))


class _SafeMarkdown(Markdown):
    """Markdown whose parsed text is made safe again: markdown-it decodes character references
    (``&#x202E;``, ``&#8295;``) into the very controls ``_safe`` took out of the raw text."""

    def __init__(self, markup: str) -> None:
        super().__init__(markup)
        tokens = list(self.parsed)
        while tokens:
            token = tokens.pop()
            token.content = _safe(token.content)
            tokens.extend(token.children or ())


class Renderer:
    """What a turn shows: the answer as Markdown (live on a terminal), the steps dimmed."""

    def __init__(self, out: Console, err: Console) -> None:
        self.out, self.err = out, err
        self.tty = out.is_terminal
        # Steps go with the answer on a terminal, to stderr in a pipe.
        self.steps = out if self.tty else err
        self._live: Live | None = None
        # Both grow a token at a time, as pieces joined when read: ``+=`` on an attribute
        # copies the whole text each time (160,000 tokens took 30 s in a pipe). Whether one
        # holds anything is asked of its pieces (only non-empty ones): a read between two
        # appends (a thinking piece between answer tokens) would join them again.
        self._segment_parts: list[str] = []  # the text of the current LLM call (a step's or
        # the answer's)
        self._stream_tokens = self.tty  # in a pipe: only for the chat agent (no steps)
        self._printed_parts: list[str] = []  # the text written as it came (a pipe, or a
        # tall answer)
        self._plain = not self.tty  # text written as it comes, no live Markdown
        # A reasoning model's thinking that came while an answer was written as it comes on
        # the terminal: shown once that text's line has ended (it would cut the answer).
        self._held: list[Text] = []
        self._thinking = False  # a line of a reasoning model's thinking is being written

    @property
    def _segment(self) -> str:
        return _joined(self._segment_parts)

    @_segment.setter
    def _segment(self, text: str) -> None:
        self._segment_parts = [text] if text else []

    @property
    def _printed(self) -> str:
        return _joined(self._printed_parts)

    @_printed.setter
    def _printed(self, text: str) -> None:
        self._printed_parts = [text] if text else []

    def started(self, agent: str) -> None:
        if not self.tty and agent == "chat":
            self._stream_tokens = True

    def token(self, text: str) -> None:
        self._end_thinking()
        text = _safe(text)
        if text:
            self._segment_parts.append(text)
        if not self._stream_tokens:
            return
        if not self._plain:
            rendered = _SafeMarkdown(self._segment)
            if len(self.out.render_lines(rendered, pad=False)) < self.out.size.height:
                if self._live is None:
                    self._live = Live(console=self.out, auto_refresh=False,
                                      vertical_overflow="visible")
                    self._live.start()
                self._live.update(rendered, refresh=True)
                return
            # Taller than the screen: a live display redraws only what is on screen, so each
            # redraw would print again what has scrolled off (hundreds of copies of the first
            # lines of a long answer). From here it is written as it comes, once.
            self._stop_live(None)
            self._plain, text = True, self._segment
        self.out.file.write(text)
        self.out.file.flush()
        if text:
            self._printed_parts.append(text)

    def step(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "thought" and data.get("reasoning"):
            # A reasoning model's thinking is not a step: it may come between answer tokens,
            # and the answer goes on around it. Shown apart (above a live answer; on stderr
            # in a pipe), the answer's text kept: it had been dimmed, or cut and then written
            # again whole. It comes a piece (a token) at a time: one running line, not a
            # line per piece.
            piece = _safe(str(data.get("text", "")))
            if self._printed_parts and self.steps is self.out:
                if self._held and self._held[-1].plain.startswith("· thinking: "):
                    self._held[-1].append(piece)
                else:
                    self._held.append(Text("· thinking: " + piece, style="dim"))
            elif self._live is not None:
                # Above a live answer (a rare turn: thinking between its tokens): a line each.
                self.steps.print(Text("· thinking: " + piece, style="dim"))
            else:
                if not self._thinking:
                    self.steps.print(Text("· thinking: ", style="dim"), end="")
                    self._thinking = True
                self.steps.print(Text(piece, style="dim"), end="")
            return
        self._end_thinking()
        line = Text(_safe(_describe(kind, data)), style="dim")
        if self._printed_parts:  # written as it came: ended with its line
            self._end_plain()
        elif self.tty and self._segment_parts:
            # The text so far was a step's (a ReAct thought), not the answer.
            self._stop_live(Text(self._segment.strip(), style="dim"))
            self._show_held()
        self._segment = ""
        self.steps.print(line)

    def message(self, content: str) -> None:
        """The final answer (after its tokens, if any were shown)."""
        self._end_thinking()
        content = _safe(content)
        if self._printed_parts and content.startswith(self._printed):
            self.out.file.write(content[len(self._printed):] + "\n")
        elif self._printed_parts:
            # What was written as it came was not the answer (a step's text, then an answer
            # of its own: ReAct at its step limit): the answer follows it, whole.
            self.out.file.write("\n")
            self.out.file.flush()
            if self.tty:
                self.out.print(_SafeMarkdown(content))
            else:
                self.out.file.write(content + "\n")
        elif self.tty:
            self._stop_live(_SafeMarkdown(content))
        else:
            self.out.file.write(content + "\n")
        self.out.file.flush()
        self._segment = self._printed = ""
        self._plain = not self.tty
        self._show_held()

    def finished(self, status: str, error: dict[str, Any] | None,
                 content: str | None = None) -> None:
        """The run's end; ``content``: a reply cut short, as the store keeps it (a ReAct
        turn's answer part, not the thought that was streamed)."""
        self._end_thinking()
        if content is not None and status != "succeeded":
            if content.strip():
                self.message(content)
            else:
                self.reset()
        elif self._printed_parts:
            self._end_plain()
        else:
            self._stop_live(_SafeMarkdown(self._segment) if self._segment.strip() else None)
            self._show_held()
        if status != "succeeded":
            kind = error.get("type") if error else None
            said = error.get("message") if error else None
            # (Either may be missing: a proxy's frame, an older service's.)
            parts = [str(p) for p in (kind if kind != status else None, said) if p]
            why = f": {': '.join(parts)}" if parts else ""
            self.err.print(Text(_safe(f"[run {status}{why}]"), style="dim"))

    def reset(self) -> None:
        """A turn that did not end normally: stop the live display, forget its text."""
        self._end_thinking()
        self._stop_live(None)
        if self._printed_parts:
            self.out.file.write("\n")  # the text written as it came: its line ends
            self.out.file.flush()
        self._segment = self._printed = ""
        self._plain = not self.tty
        self._show_held()

    def _end_plain(self) -> None:
        """Text written as it came is done: its line ends; the next is live again."""
        self.out.file.write("\n")
        self.out.file.flush()
        self._printed = ""
        self._plain = not self.tty
        self._show_held()

    def _end_thinking(self) -> None:
        """A running line of thinking ends (something else is shown)."""
        if self._thinking:
            self.steps.print()
            self._thinking = False

    def _show_held(self) -> None:
        for line in self._held:
            self.steps.print(line)
        self._held.clear()

    def note(self, text: str) -> None:
        self._end_thinking()
        self.err.print(Text(_safe(text), style="dim"))

    def _stop_live(self, final: Any) -> None:
        if self._live is not None:
            self._live.update(final if final is not None else Text(""), refresh=True)
            self._live.stop()
            self._live = None
        elif final is not None and self.tty:
            self.out.print(final)


def _describe(kind: str, data: dict[str, Any]) -> str:
    line = _what(kind, data)
    # A plan step's own work (its steps run at once): which step it was for.
    step = data.get("step")
    return line if step is None else f"· [step {step}] {line.removeprefix('· ')}"


def _what(kind: str, data: dict[str, Any]) -> str:
    if kind == "thought":
        return f"· thinking: {data.get('text', '')}"
    if kind == "tool.call":
        arguments = json.dumps(data.get("arguments", {}), ensure_ascii=False)
        return f"· tool {data.get('name')}({arguments})"
    if kind == "tool.result":
        if "error" in data:
            return f"· tool error: {data['error']}"
        return f"· tool result: {_short(data.get('output'))}"
    if kind == "plan":
        steps = data.get("steps", [])
        return "· plan: " + "; ".join(str(s.get("task", s)) for s in steps)
    if kind == "step.started":
        return f"· step {data.get('id')}: {data.get('task', '')}"
    if kind == "decision":  # the auto agent's choice
        return f"· agent: {data.get('agent')} (chosen by {data.get('method')})"
    if "error" in data:  # a plan step that failed (its tool, its model call)
        return f"· step {data.get('id')} failed: {_short(data['error'])}"
    return f"· step {data.get('id')} done"


def _joined(parts: list[str]) -> str:
    """The pieces as one text, kept as one piece (read again, it is not joined again)."""
    if len(parts) > 1:
        parts[:] = ["".join(parts)]
    return parts[0] if parts else ""


def _short(value: object, limit: int = 200) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + "…"
