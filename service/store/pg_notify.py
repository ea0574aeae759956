"""LISTEN/NOTIFY on PostgreSQL: what a commit announces to other instances (ids only; the rows
are the truth). The writes of one group-commit transaction announce together: one NOTIFY per
transaction (:func:`announcing`, :func:`send_notifications`), sent just before its COMMIT
and delivered with it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import psycopg

from ..logs import get_logger

__all__ = ["CHANNEL", "announcing", "listen_until", "notify", "send_notifications"]

log = get_logger("service.store")

Conn = psycopg.Connection[Any]

CHANNEL = "service_runs"  # LISTEN/NOTIFY: ids only; the rows are the truth
_NOTIFY_MAX = 7000  # bytes of payload (PostgreSQL's limit is 8000): past it, "*" (every run)
_LISTEN_CHECK = 5.0  # seconds of quiet before the listening connection is asked to answer


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


def listen_until(connect: Callable[[], AbstractContextManager[Conn]],
                 tell: Callable[[str], None], stop: threading.Event,
                 describe: Callable[[BaseException], str]) -> None:
    """The listening thread of ``PostgresStore.listen``, until ``stop``: ``tell`` each
    notification's payload, ``*`` once listening (again), ``!`` when the connection is lost
    (made again after a second). One direct connection (``connect``); its stop is looked for
    every half second, and after 5 s without a notification the server is asked to answer."""
    while not stop.is_set():
        try:
            with connect() as conn:
                conn.execute(f"LISTEN {CHANNEL}")  # type: ignore[arg-type]
                tell("*")
                heard = time.monotonic()
                while not stop.is_set():
                    for note in conn.notifies(timeout=0.5):
                        tell(note.payload)
                        heard = time.monotonic()
                    if time.monotonic() - heard >= _LISTEN_CHECK:
                        # Quiet: is anyone there? A server gone silent (frozen, or a network
                        # dropping packets) would leave this connection waiting for ever, and
                        # readers waiting for its wake-ups.
                        conn.execute("SELECT 1")
                        heard = time.monotonic()
        except psycopg.Error as exc:
            log.warning("the store's listening connection failed (again in 1 s): %s",
                        describe(exc))
            tell("!")  # readers poll meanwhile
            stop.wait(1.0)
