"""Short-lived access tokens for browsers (pure logic).

A page's ``EventSource`` and ``WebSocket`` cannot send an ``Authorization`` header, so a page
that holds a key trades it (``POST /api/tokens``) for a token it may put in the URL
(``?access_token=``) of ``GET /api/runs/{id}/events`` and ``GET /api/ws``, and nowhere else.

A token is ``<expiry>.<nonce>.<signature>``: the expiry in Unix seconds, a random nonce, and an
HMAC-SHA256 over both with a secret derived from the key that asked for it. It names no key and
no owner (a URL can end up in a proxy's log); the service finds its key by checking the
signature against each key's secret, so every worker (and every process with the same keys)
accepts every other's tokens, a token sees exactly its key's data, and removing a key revokes
its tokens.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

__all__ = ["TOKEN_TTL", "TokenSigner", "expiry"]

TOKEN_TTL = 300  # seconds a token is accepted
_PURPOSE = b"service browser access token v1"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class TokenSigner:
    """Issues and checks tokens for ``keys``; with no keys (auth off) tokens are still issued
    (a page need not know whether keys are set) and signed with a per-process secret."""

    def __init__(self, keys: tuple[bytes, ...]) -> None:
        self._secrets = [(key, hmac.new(key, _PURPOSE, hashlib.sha256).digest())
                         for key in keys] or [(b"", secrets.token_bytes(32))]

    def __repr__(self) -> str:
        return f"<TokenSigner keys={len(self._secrets)} ttl={TOKEN_TTL}s>"

    def issue(self, key: bytes, now: float) -> tuple[str, int]:
        """A token for ``key`` and its expiry (Unix seconds)."""
        secret = next((s for k, s in self._secrets if hmac.compare_digest(k, key)),
                      self._secrets[0][1])
        expires = int(now) + TOKEN_TTL
        payload = f"{expires}.{secrets.token_urlsafe(12)}"
        return f"{payload}.{_sign(secret, payload)}", expires

    def verify(self, token: str, now: float) -> bytes | None:
        """The key whose token this is, if it is one and has not expired."""
        expires = expiry(token)
        if expires is None or expires <= now:
            return None
        payload, _, signature = token.rpartition(".")
        given = signature.encode(errors="replace")
        found = None
        for key, secret in self._secrets:  # every one, in constant time
            if hmac.compare_digest(_sign(secret, payload).encode(), given):
                found = key
        return found


def expiry(token: str) -> int | None:
    """When a token says it expires (seconds since the epoch; in its clear text, signed:
    only :meth:`TokenSigner.verify` says whether it is genuine), or None if it is no token."""
    expires = token.rpartition(".")[0].partition(".")[0]
    if not (expires.isascii() and expires.isdigit() and len(expires) <= 12):
        return None
    return int(expires)


def _sign(secret: bytes, payload: str) -> str:
    return _b64(hmac.new(secret, payload.encode(), hashlib.sha256).digest())
