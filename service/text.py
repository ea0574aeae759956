"""Text from upstreams as real Unicode (shared by the adapters and the store)."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["TextJoiner", "clean_json", "clean_text", "cut_at_stop", "not_text_at",
           "redact_userinfo"]


_SURROGATE = re.compile("[\ud800-\udfff]")
# Not text: a surrogate (see TextJoiner), or NUL (U+0000: valid JSON, but PostgreSQL's text
# cannot hold it, nor can C strings; it becomes U+FFFD like a lone surrogate).
_NOT_TEXT = re.compile("[\x00\ud800-\udfff]")


class TextJoiner:
    """Model text as real Unicode: UTF-16 surrogate halves that an upstream split across two
    chunks (``"\\ud83d"``, then ``"\\ude00"``: JSON allows it, some JavaScript servers do it) are
    joined into their character, and a lone half becomes U+FFFD. A lone surrogate is not text:
    UTF-8 cannot encode it, so neither the store nor a client could take it."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held = ""  # a high surrogate that ended the previous piece

    def feed(self, text: str) -> str:
        if self._held:
            text, self._held = self._held + text, ""
        if not text or _NOT_TEXT.search(text) is None:
            return text
        text = text.replace("\x00", "\ufffd")
        if _SURROGATE.search(text) is None:
            return text
        if "\ud800" <= text[-1] <= "\udbff":  # its low half may start the next piece
            text, self._held = text[:-1], text[-1]
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")

    def flush(self) -> str:
        """What is held at the end of the stream: a half that never got its pair."""
        held, self._held = self._held, ""
        return "\ufffd" if held else ""


def clean_text(text: str) -> str:
    """``text`` with surrogate pairs joined, lone surrogates and NUL replaced by U+FFFD (see
    TextJoiner)."""
    if _NOT_TEXT.search(text) is None:
        return text
    text = text.replace("\x00", "\ufffd")
    if _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def clean_json(value: Any) -> Any:
    """A JSON-shaped value (dicts, lists, tuples, strings, keys included) with every string
    cleaned as by :func:`clean_text`; ``value`` itself when it holds no surrogate."""
    if not_text_at(value) is None:
        return value
    return _cleaned(value)


def _cleaned(value: Any) -> Any:
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {_cleaned(k): _cleaned(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cleaned(v) for v in value)
    return value


def not_text_at(value: Any, path: str = "") -> str | None:
    """Where a JSON-shaped value holds what is not text: a lone surrogate (``"\\ud800"`` is
    valid JSON, but UTF-8 cannot encode it) or NUL (``"\\u0000"``: PostgreSQL cannot store
    it). ``""`` for ``value`` itself, else a dotted path (``"0.function.name"``, a key holding
    one shown cleaned); None when it holds none."""
    keys = _not_text_keys(value)
    if keys is None:
        return None
    # A key is named cleaned: the path goes into error messages, which must be text. It is
    # made once something is found (made at every child, a long key's path was copied for
    # each of its children: a 900 KB request held the event loop for 4 s).
    for key in reversed(keys):
        path = f"{path}.{clean_text(str(key))}" if path else clean_text(str(key))
    return path


def _not_text_keys(value: Any) -> list[Any] | None:
    """The keys down to what is not text in ``value``, innermost first; None if none is."""
    if isinstance(value, str):
        return [] if _lone(value) else None
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if isinstance(key, str) and _lone(key):
            return [key]
        if (found := _not_text_keys(item)) is not None:
            found.append(key)
            return found
    return None


def _lone(text: str) -> bool:
    # A surrogate pair that survived json.loads (it joins escaped pairs) is not text either.
    return _NOT_TEXT.search(text) is not None


_USERINFO = re.compile(r"//[^\n]*@")


def redact_userinfo(text: str) -> str:
    """URL credentials in ``text`` ("http://user:pass@host" -> "http://***@host"), whatever the
    password holds (a "/", a space, a quote, an "@" of its own): from "//" to the line's last
    "@". It may hide more than the credentials; it never shows them."""
    return _USERINFO.sub("//***@", text)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """``text`` up to the first of the stop sequences (as a model's server cuts its answer)."""
    ends = [i for seq in stop if seq and (i := text.find(seq)) >= 0]
    return text[:min(ends)] if ends else text
