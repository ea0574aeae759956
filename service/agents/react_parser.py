"""A tolerant parser for the ReAct text protocol (pure, no I/O).

The model is asked to answer in this shape::

    Thought: I need to compute it.
    Action: calculator
    Action Input: {"expression": "2 + 2"}

or, when done::

    Thought: I know the answer.
    Final Answer: 4

Real models drift: labels in other case or in bold (``**Action:**``), the input in a code fence,
on the next line, as a bare string instead of JSON, trailing chatter after the JSON, a stray
``Observation:`` they made up. The parser accepts all of that; whichever of "Action" and "Final
Answer" comes first wins; text with neither label is taken as the final answer.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

__all__ = ["InvalidInput", "ReActStep", "answer_so_far", "has_action_input", "parse_react",
           "prose_action", "up_to_the_action"]

# A label at a line's start, in the styles models write: "Action:", "**Action:**", "**Action**:",
# "__Action:__", "> Action:", "- Action:", "* Action:", "Action :", with a
# full-width colon (models answering in Chinese or Japanese). The markers after the colon close
# a bold label that opened right before its name ("**Final Answer:** 42"); with none opened (a
# bullet's "* " is no bold), they open the text's own ("Final Answer: **42**" keeps its "**").
_LABEL = (r"^[ \t>#-]*(?:[*+][ \t]+)?(?P<bold>[*_]+)?{name}"
          r"(?:[ \t]*[*_]+[ \t]*[:\uff1a]|[ \t]*[:\uff1a](?(bold)[ \t]*[*_]*))[ \t]*")
_THOUGHT = re.compile(_LABEL.format(name="thought"), re.I | re.M)
_ACTION = re.compile(_LABEL.format(name="action"), re.I | re.M)
_INPUT = re.compile(_LABEL.format(name=r"action[ _]input"), re.I | re.M)
_FINAL = re.compile(_LABEL.format(name=r"final[ _]answer"), re.I | re.M)
_OBSERVATION = re.compile(_LABEL.format(name="observation"), re.I | re.M)
_LABELS = (_THOUGHT, _ACTION, _INPUT, _FINAL, _OBSERVATION)
_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```", re.S)


_FENCE_OPEN = re.compile(r"^[ \t]*(```|~~~)|(```|~~~)[\w+.-]*[ \t]*$")


def _unfenced(text: str) -> str:
    """``text`` with the lines inside its fenced code blocks blanked (the same length:
    positions hold), where labels are searched: an ``Action:`` key in a YAML block of an
    answer is code, not a call. A fence opens at a line's start, or at its end (``Action
    Input: ```json``); one never closed runs to the end (a turn cut short). A turn whose only
    protocol is fenced (a step written in a code block, with or without a line before it, and
    no prose after it) is searched as it is: its Action Input, or its Final Answer, shows it is
    the protocol."""
    if "```" not in text and "~~~" not in text:
        return text
    out: list[str] = []
    inside: str | None = None  # the marker of the fence open
    after = 0  # where the text after the last closed fence starts
    at = 0  # where the next line starts
    for line in text.splitlines(keepends=True):
        at += len(line)
        if inside is not None:
            if line.lstrip().startswith(inside):
                inside = None  # its closing fence (kept: no label in it)
                out.append(line)
                after = at
            else:
                out.append(re.sub(r"[^\r\n]", " ", line))
            continue
        out.append(line)
        opened = _FENCE_OPEN.search(line.rstrip("\r\n"))
        if opened is not None:
            marker = opened.group(1) or opened.group(2)
            if line.count(marker) == 1:  # not ```inline``` on one line
                inside = marker
    masked = "".join(out)
    if inside is not None:  # never closed: it runs to the end
        after = len(text)
    # Prose after the fence: the example of an answer quoting the protocol, not a step (a
    # label after it, an Observation the model made up, is the step's run-on).
    tail = masked[after:].lstrip()
    prose_after = bool(tail) and not any(
        rx.match(tail) for rx in (_THOUGHT, _ACTION, _INPUT, _FINAL, _OBSERVATION))
    if (not _ACTION.search(masked) and not _FINAL.search(masked)
            and (_INPUT.search(text) or _FINAL.search(text)) and not prose_after):
        return text
    return masked


@dataclass(frozen=True)
class ReActStep:
    thought: str | None
    action: str | None = None  # a tool name
    action_input: Any = None  # a dict when the input was a JSON object, else a string
    final_answer: str | None = None

    @property
    def is_final(self) -> bool:
        return self.final_answer is not None


class InvalidInput(str):
    """An Action Input that opens a JSON object and is not one (nor a Python-style dict), even
    without its trailing commas: the model's malformed arguments. Its text, as written (for
    an answer given as an action's input, it is the answer)."""


_CLOSES = re.compile(r"\s*[}\]]")


def _without_trailing_commas(raw: str) -> str:
    """``raw`` without the commas before a closing brace or bracket (what small models write
    in JSON every day), outside its strings only (``"[0-9,]"`` is a string's text)."""
    out: list[str] = []
    in_string = escaped = False
    for i, c in enumerate(raw):
        if in_string:
            escaped, in_string = (not escaped and c == "\\"), in_string and (escaped or c != '"')
        elif c == '"':
            in_string = True
        elif c == "," and _CLOSES.match(raw, i + 1):
            continue
        out.append(c)
    return "".join(out)


# The protocol's labels as the prompt writes them (at a line's start, undecorated): a cycle the
# model made up after its final answer is written so; a report's "- **Observation:**" is not.
def _plain(name: str) -> re.Pattern[str]:
    return re.compile(rf"^{name}[ \t]*[:\uff1a]", re.I | re.M)


_PLAIN_THOUGHT, _PLAIN_OBSERVATION = _plain("thought"), _plain("observation")
_PLAIN_ACTION, _PLAIN_INPUT = _plain("action"), _plain(r"action[ _]input")
_PLAIN_FINAL = _plain(r"final[ _]answer")


def _answer_section(text: str, scan: str, start: int) -> str:
    """A final answer's text from ``start``: to its end, or up to where the model ran on into a
    cycle it made up: a plain ``Action:`` with its ``Action Input:``, or another ``Final
    Answer:``, from the first plain ``Thought:`` or ``Observation:`` that led into it. Labels
    in prose stay the answer's ("- **Observation:** the disk is full" in a report)."""
    cycle = [m.start() for m in _PLAIN_FINAL.finditer(scan, start)] + _made_up_call(scan, start)
    if not cycle:
        return text[start:].strip()
    end = min(cycle)
    led = [m.start() for rx in (_PLAIN_THOUGHT, _PLAIN_OBSERVATION)
           for m in rx.finditer(scan, start, end)]
    return text[start:min([end, *led])].strip()


def _made_up_call(scan: str, start: int) -> list[int]:
    """Where the first plain ``Action:`` from ``start`` is whose next label is an ``Action
    Input:`` (``_input_of``'s rule), if a plain ``Action Input:`` follows it: ``[its start]``,
    or ``[]``. In one pass over the labels (each at a line's start): a search to the text's end
    for each action took time growing with their number squared, and a reply of "Action:"
    lines after its final answer (80 KB) held the event loop, every stream of the process, for
    seconds."""
    inputs = [m.start() for m in _PLAIN_INPUT.finditer(scan, start)]
    if not inputs:
        return []
    labels = sorted((m.start(), rx is _INPUT) for rx in _LABELS for m in rx.finditer(scan, start))
    i = 0
    for m in _PLAIN_ACTION.finditer(scan, start):
        if m.end() > inputs[-1]:
            break  # no plain input after this action, nor after any later one
        while i < len(labels) and labels[i][0] < m.end():
            i += 1
        if i < len(labels) and labels[i][1]:
            return [m.start()]
    return []


def _section(text: str, start: int, scan: str | None = None) -> str:
    """Text from ``start`` up to the next protocol label (searched in ``scan``: the text with
    its code blanked)."""
    scan = text if scan is None else scan
    ends = [m.start() for rx in (_THOUGHT, _ACTION, _INPUT, _FINAL, _OBSERVATION)
            for m in rx.finditer(scan, start)]
    end = min(ends, default=len(text))
    return text[start:end].strip()


_LITERAL_CHARS = 10_000  # a Python-style input longer than this is taken as text


def _python_dict(raw: str) -> dict[str, Any] | None:
    """``{'expression': '2+2'}``: what small models often write for JSON. Read as a Python
    literal (``ast.literal_eval``: literals only, nothing is run), if it is a dict of
    JSON-like values; else None."""
    if len(raw) > _LITERAL_CHARS or "'" not in raw:
        return None
    try:
        value = ast.literal_eval(raw)
        json.dumps(value)  # JSON-like: no sets, bytes, tuples as keys...
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        return None
    return value


def _parse_input(raw: str) -> Any:
    raw = raw.strip()
    fence = _FENCE.match(raw)
    if fence:
        raw = fence.group(1).strip()
    if raw.startswith("{"):
        for candidate in (raw, _without_trailing_commas(raw)):
            try:
                value, _ = json.JSONDecoder().raw_decode(candidate)
                return value
            # ValueError: JSONDecodeError, and an integer of over 4,300 digits;
            # RecursionError: "[[[[..." nesting.
            except (ValueError, RecursionError):
                pass
        if (literal := _python_dict(raw)) is not None:
            return literal
        return InvalidInput(raw)
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        # A JSON string ("First line.\nSecond line."): decoded, as the model wrote it; its
        # escapes taken as text gave a tool a backslash and an n for a line break.
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):
            pass
        else:
            if isinstance(value, str):
                return value
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
        raw = raw[1:-1]
    return raw


# What models write for "no tool" in the Action slot before their final answer.
_NO_ACTION = frozenset({"none", "n/a", "na", "null", "nil", "nothing", "no action", "no tool",
                        "-"})
# ... and for "this is the answer", with the answer as the Action Input (LangChain's style).
_ANSWER_ACTION = frozenset({"final answer", "final_answer", "finish", "answer"})


def parse_react(text: str, *, final_first: bool = False,
                tools: Collection[str] = ()) -> ReActStep:
    """Parse one model turn of the ReAct protocol. Never raises.

    The first of Action and Final Answer wins, unless ``final_first`` (no tool can run any more:
    a final answer anywhere in the text is the answer). An Action of "None" (or "N/A", ...) is no
    action; one of "answer" (or "finish", ...) is the answer, unless a tool of ``tools`` has
    that name."""
    scan = _unfenced(text)
    thought_m = _THOUGHT.search(scan)
    action_m = _ACTION.search(scan)
    final_m = _FINAL.search(scan)
    thought = _section(text, thought_m.end(), scan) if thought_m else None

    if action_m and not (final_m and (final_first or final_m.start() < action_m.start())):
        name = _section(text, action_m.end(), scan).splitlines()[0:1]
        # Decorations models put around a name (backticks, quotes, bold), and the brackets of
        # the prompt's "one of [calculator, ...]".
        action = name[0].strip().strip("`*'\"[]") if name else ""
        input_m = _input_of(scan, action_m)
        if input_m:
            action_input = _parse_input(_section(text, input_m.end(), scan))
        else:
            # "Action: calculator(2+2)", the ReAct paper's "calculator[2+2]", or the input on
            # the lines after the name.
            rest = _section(text, action_m.end(), scan)
            paren = re.match(r"^([\w.-]+)\s*(?:\((.*)\)|\[(.*)\])\s*$", rest, re.S)
            if paren:
                inside = paren.group(2) if paren.group(2) is not None else paren.group(3)
                action, action_input = paren.group(1), _parse_input(inside)
            else:
                lines = rest.splitlines()
                action_input = _parse_input("\n".join(lines[1:])) if len(lines) > 1 else {}
        label = action.lower().rstrip(".") if action else ""
        if (label in _ANSWER_ACTION and action not in tools
                and action_input not in (None, {}, "")):
            return ReActStep(thought, final_answer=_answer_of(action_input).strip())
        if action and not (label in _NO_ACTION and final_m):
            # "Action: None" is no action only before a Final Answer; alone it stays a (failing)
            # tool call, whose observation lets the model correct itself.
            return ReActStep(thought, action=action, action_input=action_input)

    if final_m:
        return ReActStep(thought, final_answer=_answer_section(text, scan, final_m.end()))
    # Neither label: the whole text (minus a leading thought label) is the answer.
    answer = thought if thought_m and thought else text.strip()
    return ReActStep(None, final_answer=answer)


def _answer_of(action_input: Any) -> str:
    """An answer given as an action's input, as text: its one string value
    (``{"answer": "..."}``), else its JSON as written (not ``\\u`` escapes)."""
    if isinstance(action_input, str):
        return action_input
    if (isinstance(action_input, dict) and len(action_input) == 1
            and isinstance(text := next(iter(action_input.values())), str)):
        return text
    return json.dumps(action_input, ensure_ascii=False)


def up_to_the_action(text: str) -> str:
    """A turn up to the end of its action (and its input): what a model runs on to after it
    (an "Observation:" it made up, in any of the labels' styles, a thought or a final answer
    drawn from it) never happened, and is not shown to it again."""
    scan = _unfenced(text)
    action_m = _ACTION.search(scan)
    if action_m is None:
        return text.rstrip()
    input_m = _input_of(scan, action_m)
    start = input_m.end() if input_m else action_m.end()
    ends = [m.start() for rx in (_THOUGHT, _ACTION, _FINAL, _OBSERVATION)
            for m in rx.finditer(scan, start)]
    return text[:min(ends, default=len(text))].rstrip()


def _input_of(text: str, action_m: re.Match[str]) -> re.Match[str] | None:
    """The Action Input label of the action at ``action_m``: the next label after it, if it is
    one (an input further on, after an Observation and a Thought the model made up, belongs to
    an action of its own invention, not to this one)."""
    input_m = _INPUT.search(text, action_m.end())
    if input_m is None:
        return None
    between = [m for rx in (_THOUGHT, _ACTION, _FINAL, _OBSERVATION)
               if (m := rx.search(text, action_m.end(), input_m.start())) is not None]
    return None if between else input_m


def has_action_input(text: str) -> bool:
    """Whether a turn has an "Action Input:" label (then its Action is a call, not prose)."""
    return _INPUT.search(_unfenced(text)) is not None


def prose_action(step: ReActStep, tools: Collection[str], text: str) -> bool:
    """A first turn's "Action:" that is a line of prose, not a call: no thought before it, no
    "Action Input:", and not a tool name at all (words with spaces: "- **Action:** rotate the
    logs daily" in a summary). A call of a misspelt tool is still one (the model is told)."""
    action = (step.action or "").strip()
    return (bool(action) and action not in tools and step.thought is None
            and re.search(r"\s", action) is not None and not has_action_input(text))


def answer_so_far(text: str, *, tools: Collection[str] = (), first: bool = True,
                  native: bool = False) -> str:
    """The answer in a turn cut short (a stream that died, a cancel, a deadline), judged as
    the ReAct loop judges a whole turn: what follows its "Final Answer:" label; the text
    itself when it has no label at all (a plain answer), when its "Action:" is prose in a
    ``first`` turn (``prose_action``), or when the model called tools ``native``ly (its text
    is then its answer); the input of an answer action ("Action: Final Answer" / "Action
    Input: ..."); none while the turn is still a thought or an action (its labels are
    no answer, and the next turn's history would give them to the model as one)."""
    scan = _unfenced(text)
    final = _FINAL.search(scan)
    if final is not None:
        return _answer_section(text, scan, final.end())
    if not any(rx.search(scan) for rx in (_THOUGHT, _ACTION)):
        # No thought and no action (an "Observation:" or "Action Input:" line of its own, as
        # in an analysis): ``parse_react`` takes the whole turn as the answer, and so here.
        return text
    if native:
        return text
    step = parse_react(text, tools=tools)
    if step.is_final and _ACTION.search(scan):
        # An answer given as an action's input ("Action: Final Answer" / "Action Input: ..."),
        # as ``parse_react`` reads it whole.
        return step.final_answer or ""
    return text if first and prose_action(step, tools, text) else ""
