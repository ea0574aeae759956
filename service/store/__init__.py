"""The crash-safe conversation store: the :class:`Store` protocol and its two implementations.

``SERVICE_DB`` picks one: a ``postgresql://`` (or ``postgres://``) URL is PostgreSQL
(:mod:`.postgres`), anything else a SQLite file path (:mod:`.sqlite`). Callers type against
:class:`Store` and make one with :func:`make_store` / :func:`open_store`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from .base import Store
from .records import (
    BegunRun,
    Conversation,
    LLMCallOutcome,
    LLMCallRecord,
    Message,
    MessageStatus,
    RunEvent,
    RunRecord,
    new_id,
)
from .sqlite import SQLiteStore

__all__ = [
    "BegunRun",
    "Conversation",
    "LLMCallOutcome",
    "LLMCallRecord",
    "Message",
    "MessageStatus",
    "RunEvent",
    "RunRecord",
    "SQLiteStore",
    "Store",
    "describe_store",
    "is_postgres_url",
    "make_store",
    "new_id",
    "open_store",
]

_PG_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(db: str | os.PathLike[str]) -> bool:
    """Whether ``SERVICE_DB`` names a PostgreSQL database (else it is a SQLite path)."""
    return isinstance(db, str) and db.lower().startswith(_PG_SCHEMES)


def describe_store(db: str | os.PathLike[str]) -> str:
    """``SERVICE_DB`` as it may be logged: a PostgreSQL URL without its password."""
    if is_postgres_url(db):
        from .pg_url import describe_url

        return describe_url(str(db))
    return str(db)


def make_store(db: str | os.PathLike[str], **kwargs: Any) -> Store:
    """The store ``db`` names, not opened yet. ``kwargs`` go to the store's class (``metrics``
    for both; ``synchronous``, ``threaded``, ``wal_size_limit``... are SQLite's and are
    dropped for PostgreSQL; ``statement_timeout`` is PostgreSQL's and is dropped for
    SQLite)."""
    if is_postgres_url(db):
        from .postgres import PostgresStore  # psycopg is loaded only when it is used

        pg = {k: v for k, v in kwargs.items() if k in PostgresStore.OPTIONS}
        return PostgresStore(str(db), **pg)
    kwargs.pop("statement_timeout", None)
    return SQLiteStore(Path(db), **kwargs)


@asynccontextmanager
async def open_store(db: str | os.PathLike[str], **kwargs: Any) -> AsyncIterator[Any]:
    """``async with open_store(db) as store:`` opens (creating or migrating the schema) the store
    ``db`` names (see :func:`make_store`) and closes it after. Typed ``Any`` so that tests can
    reach the implementation's own knobs; the service itself types against :class:`Store`."""
    store = make_store(db, **kwargs)
    await store.open()
    try:
        yield store
    finally:
        await store.aclose()
