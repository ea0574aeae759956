"""A PostgreSQL URL as it may be shown (never its password), and the password's forms to
scrub from whatever libpq echoes."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ..settings import _redact

__all__ = ["conninfo", "describe_url", "url_secrets"]


def describe_url(url: str) -> str:
    """``url`` as it may be shown: ``postgresql://user@host:port/db``, never its password."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:  # not one libpq reads: shown without all before its last "@"
        return _redact(_USERINFO.sub(r"\1***@", url)).split("?", 1)[0]
    user = f"{params['user']}@" if params.get("user") else ""
    host = str(params.get("host") or "")
    port = f":{params['port']}" if params.get("port") else ""
    return f"postgresql://{user}{host}{port}/{params.get('dbname') or ''}"


# A URL's scheme and user information (greedy: a password may hold "@", "/", "?" or " ").
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://).*@", re.DOTALL)


def url_secrets(url: str) -> list[str]:
    """The password of ``url`` as libpq reads it and as it is written, in its user information
    or a ``password=`` parameter (libpq echoes a token it cannot read, such as a bad
    %-escape), longest first."""
    found = {str(conninfo(url).get("password") or "")}
    if (m := re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://[^:@/]*:(.*)@", url, re.DOTALL)):
        found |= {m.group(1), unquote(m.group(1))}
    for m in re.finditer(r"[?&]password=([^&#]*)", url):
        found |= {m.group(1), unquote(m.group(1))}
    return sorted((s for s in found if s), key=len, reverse=True)


def conninfo(url: str) -> dict[str, Any]:
    try:
        return conninfo_to_dict(url)
    except psycopg.Error:
        return {}
