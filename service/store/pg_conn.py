"""A bound on every wait for PostgreSQL's answer, which the server cannot enforce itself.

``statement_timeout`` is enforced by the server. A server that is frozen (its host paused, its
storage hung, the process stopped) or a network that drops every packet without a reset
enforces nothing: libpq waits for an answer that never comes, and the worker thread waiting
with it cannot be cancelled from trio. Measured before this module (PostgreSQL stopped with
SIGSTOP): a ``ping`` inside ``trio.move_on_after(20)`` was still waiting two minutes later;
``/readyz``, every run's commit and the shutdown's wait for the last batch with it.

psycopg funnels every wait for the server (a query and its results, a ``COMMIT``, a
``ROLLBACK``, the pool's check) through ``Connection.wait``. :class:`BoundedConnection` gives
each such wait a deadline, ``answer_within`` seconds: one round trip, so a server that answers
each statement within ``statement_timeout`` is never cut however many statements a transaction
has. Past it the connection is closed in the waiting thread itself (nothing from another
thread touches it), and the wait fails with psycopg's ``OperationalError``
(``StoreUnavailable`` to the store's caller); the pool drops the closed connection. The store
sets ``answer_within`` to ``statement_timeout`` plus a margin: a server that is running
answers by then, if only with the statement's cancellation.

A wait given its own timeout (``notifies(timeout=...)``) keeps it.

:class:`BoundedWait` bounds the wait before that: for a worker thread, all of the pool's busy.
"""

from __future__ import annotations

import inspect
import time
from contextvars import ContextVar
from typing import Any, TypeVar

import psycopg
import psycopg_pool
import trio
from psycopg.abc import PQGen

from ..logs import get_logger

__all__ = ["ACQUIRE_BY", "BoundedConnection", "BoundedWait"]

log = get_logger("service.store")

RV = TypeVar("RV")

# When (``time.monotonic()``) the store operation under way must have its thread and its pooled
# connection: one bound for both waits, set by the operation (``PostgresStore._acquiring``). Each
# had a bound of its own, and a read that waited for a thread, then for a connection, waited
# up to twice acquire_timeout.
ACQUIRE_BY: ContextVar[float | None] = ContextVar("ACQUIRE_BY", default=None)

_INTERVAL: float = inspect.signature(psycopg.Connection.wait).parameters["interval"].default


class BoundedConnection(psycopg.Connection[Any]):
    """A psycopg connection whose every wait for the server ends after ``answer_within``."""

    answer_within: float | None = None  # seconds; None: unbounded, as psycopg's own

    def wait(self, gen: PQGen[RV], interval: float = _INTERVAL,
             timeout: float | None = None) -> RV:
        limit = self.answer_within
        if timeout is not None or limit is None:
            return super().wait(gen, interval, timeout)
        try:
            return super().wait(gen, interval, limit)
        except psycopg.OperationalError as exc:
            if not _timed_out(exc):
                raise
            # Somewhere in the protocol's exchange: the connection cannot be used again.
            self.pgconn.finish()
            log.warning("the database did not answer within %g s: its connection is closed",
                        limit)
            raise psycopg.OperationalError(
                f"the database did not answer within {limit:g} s") from None


def _timed_out(exc: BaseException) -> bool:
    # psycopg's wait raises its private _WaitTimeout (an OperationalError) when its timeout
    # passes; matched by name, so a rename shows as a failing test, not an import error.
    return type(exc).__name__ == "_WaitTimeout"


class BoundedWait:
    """A thread limiter whose wait is bounded: with every thread of the pool busy (statements
    stuck on a lock or a stalled server) a query waits at most ``acquire_timeout`` for one, as
    it would for a pooled connection, then fails ``StoreUnavailable`` (a 503 to retry), not
    for as long as the busy ones take. ``trio.to_thread.run_sync`` takes any object with these
    two methods."""

    def __init__(self, limiter: trio.CapacityLimiter, timeout: float) -> None:
        self._limiter = limiter
        self._timeout = timeout

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        timeout = self._timeout
        by = ACQUIRE_BY.get()
        if by is not None:
            timeout = min(timeout, max(0.0, by - time.monotonic()))
        with trio.move_on_after(timeout):
            await self._limiter.acquire_on_behalf_of(borrower)
            return
        raise psycopg_pool.PoolTimeout(
            f"no connection to the database within {self._timeout:g} s (every one busy)")

    def release_on_behalf_of(self, borrower: object) -> None:
        self._limiter.release_on_behalf_of(borrower)
