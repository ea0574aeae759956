"""Which browser origins may call the service, and the CORS headers they get (pure logic).

A browser attaches ``Origin`` to every cross-origin request, to every POST, and to every
WebSocket handshake; curl and the SDKs send none. A request whose ``Origin`` is neither the
service's own (the scheme, host and port the request was sent to) nor listed in
``SERVICE_CORS_ORIGINS`` is refused (403) before anything else runs: a page on another origin
cannot drive the service, even with no keys set, not even by a ``no-cors`` POST or a WebSocket
(which CORS does not cover). Listed origins get the CORS headers on every response, streams
included, and their preflights are answered without a key (a browser sends none with them).

With no keys set, the service's own origin is trusted only under a host name no other site
can point at it: an IP address, ``localhost`` or a ``*.localhost`` name (browsers resolve those
to the loopback themselves). Under any other name a page may be another site whose DNS name now
points at this service (DNS rebinding): its ``Origin`` and ``Host`` agree, and only the key it
does not have, or that name listed in ``SERVICE_CORS_ORIGINS``, tells it apart.

Origins are compared in one normal form, ``scheme://host:port`` with the default port spelled
out, so ``http://localhost`` and ``http://LOCALHOST:80`` are the same origin.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

__all__ = ["OriginPolicy", "normal_origin"]

_DEFAULT_PORTS = {"http": 80, "https": 443}
# What a page may send and read beyond the CORS-safelisted headers.
_ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
_ALLOW_HEADERS = "Authorization, Content-Type, Idempotency-Key, Last-Event-ID, X-Request-ID"
# X-Should-Retry: OpenAI's SDKs obey it before the status (a cancelled completion's 409).
_EXPOSE_HEADERS = ("X-Request-ID, Retry-After, WWW-Authenticate, X-Should-Retry, "
                   "X-Keepalive-Interval, X-Run-Id, Idempotent-Replayed")
_ALLOWED = frozenset(n.strip().lower() for n in _ALLOW_HEADERS.split(","))
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,100}")
_REQUESTED_MAX = 40  # header names a preflight may ask for beyond the ones above
_PREFLIGHT_MAX_AGE = "600"


def normal_origin(origin: str) -> str | None:
    """``scheme://host:port`` of an http(s) origin, or None if ``origin`` is not one (``null``,
    a path, credentials, another scheme)."""
    parts = urlsplit(origin.strip())
    scheme = parts.scheme.lower()
    if (scheme not in _DEFAULT_PORTS or not parts.hostname or parts.username is not None
            or parts.path not in ("", "/") or parts.query or parts.fragment):
        return None
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError:
        return None
    host = parts.hostname
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


class OriginPolicy:
    """The service's own origin (per request) and the listed ones are allowed."""

    def __init__(self, listed: Iterable[str]) -> None:
        self.listed = frozenset(o for o in map(normal_origin, listed) if o is not None)
        self._listed_hosts = frozenset(_hostname(o) for o in self.listed)

    def __repr__(self) -> str:
        return f"<OriginPolicy listed={sorted(self.listed)}>"

    def own(self, scheme: str, host: str) -> str | None:
        """The origin a request was sent to: its scheme (ws/wss counted as http/https) and its
        Host header."""
        web = "https" if scheme in ("https", "wss") else "http"
        return normal_origin(f"{web}://{host}") if host else None

    def allows(self, origin: str, *, scheme: str, host: str, keyed: bool = True) -> bool:
        """Whether a page of ``origin`` may call; ``keyed``: the service requires a key (else
        its own origin counts only under a name no other site can point at it)."""
        normal = normal_origin(origin)
        if normal is None:
            return False
        if normal in self.listed:
            return True
        return normal == self.own(scheme, host) and (keyed or _not_rebindable(normal))

    def serves_host(self, host: str) -> bool:
        """Whether a request sent to ``host`` (its Host header) is answered by a service with
        no keys: at a name no other site's DNS can point here (an IP address, ``localhost``,
        a ``*.localhost`` name) or a listed origin's. Under any other name the caller may be
        another site's page whose name was pointed at this service (DNS rebinding): a
        browser sends no ``Origin`` on its same-origin GETs, so the origin check alone let it
        read every conversation."""
        name = _hostname(f"//{host}")
        return not name or _not_rebindable(f"http://{host}") or name in self._listed_hosts

    def cors_headers(self, origin: str) -> dict[str, str]:
        """The headers a listed origin gets on every response (none for the others: the
        service's own origin needs none)."""
        if normal_origin(origin) not in self.listed:
            return {}
        return {"Access-Control-Allow-Origin": origin,
                "Access-Control-Expose-Headers": _EXPOSE_HEADERS}

    def preflight_headers(self, origin: str, requested: str | None = None) -> dict[str, str]:
        """A listed origin's preflight: ``requested`` (its ``Access-Control-Request-Headers``)
        are allowed too. The origin is trusted, and clients add headers of their own: the
        OpenAI SDKs send ``X-Stainless-*`` ones, which a fixed list refused, so a page could
        not use them."""
        asked = {n.lower() for n in (part.strip() for part in (requested or "").split(","))
                 if _HEADER_NAME.fullmatch(n)}
        allowed = ", ".join([_ALLOW_HEADERS, *sorted(asked - _ALLOWED)[:_REQUESTED_MAX]])
        return {**self.cors_headers(origin),
                "Access-Control-Allow-Methods": _ALLOW_METHODS,
                "Access-Control-Allow-Headers": allowed,
                "Access-Control-Max-Age": _PREFLIGHT_MAX_AGE}


def _hostname(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").rstrip(".")
    except ValueError:  # a malformed Host ("[::1"): no name
        return ""


def _not_rebindable(origin: str) -> bool:
    """Whether ``origin``'s host is one no other site's DNS name can stand for: an IP address,
    ``localhost`` or a ``*.localhost`` name."""
    host = _hostname(origin)
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
