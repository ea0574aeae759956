"""A bound on every round trip to PostgreSQL that the server cannot enforce itself.

``statement_timeout`` is enforced by the server. A server that is frozen (its host paused, its
storage hung, the process stopped) or a network that drops every packet without a reset
enforces nothing: libpq waits for an answer that never comes, and the worker thread waiting
with it cannot be cancelled from trio. Measured before this module (PostgreSQL stopped with
SIGSTOP): a ``ping`` inside ``trio.move_on_after(20)`` was still waiting two minutes later;
``/readyz``, every run's commit and the shutdown's wait for the last batch with it.

The watchdog is one thread per store. Each use of a connection (a read, a batch of writes, the
pool's check of a connection before handing it out, the listener's keep-alive query) is
watched with a deadline; a use still under way past its deadline has its socket shut down
(``shutdown(SHUT_RDWR)`` on a duplicate of libpq's descriptor: libpq's own descriptor stays
open and is closed by libpq). The waiting thread then fails at once with psycopg's
``OperationalError`` (``StoreUnavailable`` to its caller), the connection is broken, and the
pool replaces it.

A use is cut under the registry's lock, so a connection that was handed back (and perhaps
handed out again) is never cut by a deadline that was not its own.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..logs import get_logger

__all__ = ["Watchdog"]

log = get_logger("service.store")


class Watchdog:
    """Cuts a connection's use that outlives its deadline (see the module docstring)."""

    def __init__(self, limit: float, *, step: float = 0.25) -> None:
        self.limit = limit  # seconds a use may take, by default
        self._step = step  # seconds between looks
        self._lock = threading.Lock()
        # id(conn) -> the connection, its deadline, its limit, what it does
        self._watched: dict[int, tuple[Any, float, float, str]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.cut = 0  # uses cut so far (tests, logs)

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name="service-store-watchdog", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for it (a quarter of a second at most)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join()

    @contextmanager
    def watching(self, conn: Any, what: str, limit: float | None = None) -> Iterator[None]:
        """Watch ``conn`` while the block runs: past ``limit`` (the watchdog's by default),
        its socket is shut down."""
        key = id(conn)
        limit = self.limit if limit is None else limit
        with self._lock:
            self._watched[key] = (conn, time.monotonic() + limit, limit, what)
        try:
            yield
        finally:
            with self._lock:
                self._watched.pop(key, None)

    def renew(self, conn: Any, limit: float | None = None) -> None:
        """A watched use made progress (a batch's next write): its deadline starts again."""
        key = id(conn)
        limit = self.limit if limit is None else limit
        with self._lock:
            if (entry := self._watched.get(key)) is not None:
                self._watched[key] = (entry[0], time.monotonic() + limit, limit, entry[3])

    def check(self) -> int:
        """Cut every use past its deadline now; how many were cut."""
        now = time.monotonic()
        cut = 0
        with self._lock:
            for key, (conn, deadline, limit, what) in list(self._watched.items()):
                if now >= deadline:
                    del self._watched[key]
                    if _shut_down(conn):
                        cut += 1
                        log.warning(
                            "the database did not answer a %s within %g s: its "
                            "connection is closed",
                            what,
                            limit,
                        )
        self.cut += cut
        return cut

    def _run(self) -> None:
        while not self._stop.wait(self._step):
            try:
                self.check()
            except Exception:  # the watchdog must outlive any one look
                log.exception("the store's watchdog failed a look")


def _shut_down(conn: Any) -> bool:
    """Shut the socket of a psycopg connection down (both ways); False if it has none left."""
    try:
        fd = conn.pgconn.socket
    except Exception:  # closed meanwhile: nothing waits on it
        return False
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        return False
    return True
