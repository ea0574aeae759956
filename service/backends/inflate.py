"""A compressed upstream body, inflated by the service a bounded piece at a time.

The service asks upstreams for ``identity``; a server or proxy may compress all the same. httpx
would inflate each network read whole (64 KB of gzip: 64 MB at once), before any bound of ours
could apply, so bodies are read raw and inflated here, at most ``max_out`` bytes per call.

What it reads as the formats' own tools do: several gzip members one after the other (RFC
1952), zero bytes after the last member (padding: skipped, as Python's ``gzip`` module does),
and ``deflate`` with its zlib header or without one (raw deflate, which some servers send, as
httpx also reads: told apart by the first two bytes, however the body is cut). Anything else
is ``zlib.error``. Linear in the input: what follows a member is never kept growing (zlib's
``unused_data`` is recopied at each call once a stream has ended).
"""

from __future__ import annotations

import zlib

__all__ = ["ENCODINGS", "Inflater"]

ENCODINGS = ("gzip", "x-gzip", "deflate")  # the content-encodings it reads

_AUTO = 47  # wbits: a zlib or a gzip header, detected
_RAW = -zlib.MAX_WBITS  # wbits: raw deflate, no header


class Inflater:
    """``take`` raw bytes, then ``inflate`` until it returns ``b""`` (it needs more input)."""

    def __init__(self, encoding: str) -> None:
        # gzip: its header or zlib's, detected; deflate: decided from its first two bytes.
        self._wbits: int | None = None if encoding == "deflate" else _AUTO
        self._z = zlib.decompressobj(self._wbits or _AUTO)
        self._input = b""  # taken, not inflated yet

    def __repr__(self) -> str:
        return f"<Inflater wbits={self._wbits} pending={len(self._input)}>"

    def take(self, data: bytes) -> None:
        self._input = self._input + data if self._input else data

    def inflate(self, max_out: int) -> bytes:
        """Up to ``max_out`` (>= 1) inflated bytes of what was taken; ``b""`` once all of it is
        inflated. ``zlib.error`` for a body that is not what its encoding says."""
        assert max_out >= 1  # 0 would be zlib's "no bound"
        if self._wbits is None:  # "deflate": with zlib's header (as the RFC says) or raw
            if len(self._input) < 2:
                return b""
            self._wbits = _AUTO if _headed(self._input) else _RAW
            self._z = zlib.decompressobj(self._wbits)
        while self._input:
            if self._z.eof:  # a member ended: zero padding, or the next member
                self._input = self._input.lstrip(b"\0")
                if not self._input:
                    break
                self._z = zlib.decompressobj(self._wbits)
            z = self._z
            out = z.decompress(self._input, max_out)
            self._input = z.unused_data if z.eof else z.unconsumed_tail
            if out:
                return out
        return b""


def _headed(start: bytes) -> bool:
    """Whether a body starts with a zlib header (RFC 1950: deflate, and its check bits) or a
    gzip one; else it is raw deflate."""
    if start[:2] == b"\x1f\x8b":
        return True
    return start[0] & 0x0F == 8 and (start[0] << 8 | start[1]) % 31 == 0
