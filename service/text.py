"""Text from upstreams as real Unicode (shared by the adapters and the store)."""

from __future__ import annotations

import re

__all__ = ["TextJoiner", "clean_text"]


_SURROGATE = re.compile("[\ud800-\udfff]")


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
        if not text or _SURROGATE.search(text) is None:
            return text
        if "\ud800" <= text[-1] <= "\udbff":  # its low half may start the next piece
            text, self._held = text[:-1], text[-1]
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")

    def flush(self) -> str:
        """What is held at the end of the stream: a half that never got its pair."""
        held, self._held = self._held, ""
        return "\ufffd" if held else ""


def clean_text(text: str) -> str:
    """``text`` with surrogate pairs joined and lone surrogates replaced (see TextJoiner)."""
    if _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
