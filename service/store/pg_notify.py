"""LISTEN/NOTIFY on PostgreSQL: what a commit announces to other instances (ids only; the rows
are the truth). The writes of one group-commit transaction announce together: one NOTIFY per
transaction (:func:`announcing`, :func:`send_notifications`), sent just before its COMMIT
and delivered with it."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

__all__ = ["CHANNEL", "announcing", "notify", "send_notifications"]

Conn = psycopg.Connection[Any]

CHANNEL = "service_runs"  # LISTEN/NOTIFY: ids only; the rows are the truth
_NOTIFY_MAX = 7000  # bytes of payload (PostgreSQL's limit is 8000): past it, "*" (every run)


class _Announced(threading.local):
    """What the write transaction running in this thread announces at its COMMIT."""

    items: list[str] | None = None


_announced = _Announced()


def notify(c: Conn, items: Iterable[str]) -> None:
    """Wake other instances' readers of these runs (run ids; ``cancel:<run id>`` for a cancel
    asked) once the transaction commits: the items of all the writes of a batch go in one
    notification (:func:`announcing`), sent just before its COMMIT."""
    if _announced.items is None:  # not in a batch: at this write's own commit
        send_notifications(c, items)
    else:
        _announced.items.extend(items)


@contextmanager
def announcing() -> Iterator[list[str]]:
    """A write transaction in this thread: what its writes announce (a write rolled back to
    its savepoint takes its items back out), to be sent with :func:`send_notifications`."""
    items: list[str] = []
    _announced.items = items
    try:
        yield items
    finally:
        _announced.items = None


def send_notifications(c: Conn, items: Iterable[str]) -> None:
    """One NOTIFY for ``items`` (past PostgreSQL's payload limit: ``*``, every run)."""
    payload = ",".join(sorted(set(items)))
    if payload:
        c.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload if len(payload) <= _NOTIFY_MAX
                                                 else "*"))
