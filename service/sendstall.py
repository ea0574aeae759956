"""A client that stops reading is dropped (hypercorn, trio worker).

Hypercorn writes each response's bytes with ``send_all`` under a shield
(``TCPServer.protocol_send``), so nothing can end a write whose peer has stopped reading but
keeps its connection open (its receive window full): the response's task, its run's
subscription and its socket were kept for as long as the client held the connection, its
``on_disconnect: cancel`` run went on for nobody, and a graceful shutdown waited for it
(hypercorn's ``graceful_timeout`` cannot cut a shielded write).

The fix: the write goes in pieces of ``_PIECE`` bytes, and a piece the peer does not take
within the stall limit closes the connection. Hypercorn then reports it closed, the app gets
``http.disconnect`` (or the WebSocket ends), and the response's runs are cancelled as for any
client that leaves. The limit is a want of progress, not a deadline for the whole write: a
slow reader that takes a piece within it is never cut. Installed once per process by
``create_app``, with the limit ``STALL_KEEPALIVES`` keep-alive intervals (60 s by default;
at least ``STALL_MIN``): a client that has not taken one piece in that long would have missed
several keep-alives.

At a shutdown (``closing``, once the runs are drained) no write waits past the server's
``graceful_timeout``: a write parked on a client that reads nothing kept the shutdown going
until the stall limit (120 s with a 30 s keep-alive: past ``--workers``' kill bound), since
hypercorn's graceful cancel cannot reach a shielded scope. A client only briefly behind still
gets everything it reads within the graceful timeout.
"""

from __future__ import annotations

import math
import os
from contextvars import ContextVar
from typing import Any

import trio
from hypercorn.events import Closed, RawData
from hypercorn.protocol.events import Response
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio import tcp_server

from .logs import get_logger

__all__ = ["STALL_KEEPALIVES", "STALL_MIN", "closing", "install", "serving", "stall_limit"]

log = get_logger("service.server")

STALL_KEEPALIVES = 4  # keep-alive intervals a write may wait for the peer to take a piece
STALL_MIN = 2.0  # seconds, at least
_PIECE = 64 * 1024  # bytes written at a time (progress is one piece taken)

_stall = [60.0]  # seconds; set by install()
_original = tcp_server.TCPServer.protocol_send
_h11_stream_send = H11Protocol.stream_send
# Set while HTTP/1.1 writes a response's head: its body's first bytes come right after.
_HEAD: ContextVar[bool] = ContextVar("service_sendstall_head", default=False)
_WRITES = "_service_writes"  # the attribute of a server's hypercorn Config holding its _Writes


class _Writes:
    """One server's writes in progress, and the trio time past which none may wait (its
    graceful deadline, once it is closing)."""

    __slots__ = ("cut", "open")

    def __init__(self) -> None:
        self.cut = math.inf
        self.open: set[trio.CancelScope] = set()


def _writes(config: Any) -> _Writes:
    writes: _Writes | None = config.__dict__.get(_WRITES)
    if writes is None:
        writes = config.__dict__[_WRITES] = _Writes()
    return writes


def serving(config: Any) -> None:
    """A server starts serving with ``config``: no cut (a Config may serve again)."""
    config.__dict__[_WRITES] = _Writes()


def closing(config: Any) -> None:
    """The server serving with ``config`` closes its connections now (its shutdown trigger
    fired, the runs drained): no write of it waits past ``config.graceful_timeout``, those
    parked included."""
    writes = _writes(config)
    writes.cut = min(writes.cut, trio.current_time() + float(config.graceful_timeout))
    for scope in writes.open:
        scope.deadline = min(scope.deadline, writes.cut)


async def _protocol_send(self: Any, event: Any) -> None:
    if not isinstance(event, RawData):
        await _original(self, event)
        return
    # A free lock is taken without a scheduling round (trio's ``Lock.acquire`` yields even
    # then): the bytes leave now, not after every other ready task has run once more. The
    # cancellation point it was is kept.
    lock: trio.Lock = self.send_lock
    await trio.lowlevel.checkpoint_if_cancelled()
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()
    try:
        data, stall = event.data, _stall[0]
        writes = _writes(self.config)
        try:
            # One scope, as hypercorn's: shielded (a write is not cut short by the app's
            # cancellation), but with its own deadline, moved on as each piece is taken.
            with trio.CancelScope(shield=True,
                                  deadline=min(trio.current_time() + stall, writes.cut)) as scope:
                writes.open.add(scope)
                try:
                    if _HEAD.get() and type(self.stream) is trio.SocketStream:
                        # A response's head: written now, without the round trio's
                        # ``send_all`` takes after it (the body's first bytes would wait
                        # that round for every other ready task).
                        sent = _write_now(self.stream, data)
                        if sent < len(data):
                            await self.stream.send_all(memoryview(data)[sent:])
                    elif len(data) <= _PIECE:  # nearly every write: one frame
                        await self.stream.send_all(data)
                    else:
                        view = memoryview(data)
                        for at in range(0, len(view), _PIECE):
                            await self.stream.send_all(view[at:at + _PIECE])
                            scope.deadline = min(trio.current_time() + stall, writes.cut)
                finally:
                    writes.open.discard(scope)
            if scope.cancelled_caught:
                if trio.current_time() >= writes.cut:
                    log.warning("shutting down: a client still not reading at the graceful "
                                "timeout; its connection is closed")
                else:
                    log.warning("a client took nothing for %gs: its connection is closed",
                                stall)
                await self.stream.aclose()
                await self.protocol.handle(Closed())
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            # Busy: hypercorn's ``_close`` sends its EOF without the send lock, so a write
            # racing a connection's close (an early 413 closed at its linger) found the stream
            # in use: the connection is closing, as for the other two (it logged a traceback).
            await self.protocol.handle(Closed())
    finally:
        lock.release()


def _write_now(stream: trio.SocketStream, data: bytes) -> int:
    """Bytes of ``data`` the socket takes at once (no wait, no scheduling round); 0 on any
    error, which ``send_all`` then reports in trio's words."""
    try:
        return os.write(stream.socket.fileno(), data)
    except OSError:  # BlockingIOError (its buffer full), a peer gone, a socket closed
        return 0


async def _stream_send(self: H11Protocol, event: Any) -> None:
    if isinstance(event, Response):
        head = _HEAD.set(True)
        try:
            await _h11_stream_send(self, event)
        finally:
            _HEAD.reset(head)
    else:
        await _h11_stream_send(self, event)


def stall_limit() -> float:
    """Seconds a response may wait for its client to take a piece (set by ``install``)."""
    return _stall[0]


def install(keepalive: float) -> None:
    """Drop clients that stop reading for ``STALL_KEEPALIVES`` x ``keepalive`` seconds."""
    _stall[0] = max(STALL_KEEPALIVES * keepalive, STALL_MIN)
    tcp_server.TCPServer.protocol_send = _protocol_send  # type: ignore[method-assign]
    H11Protocol.stream_send = _stream_send  # type: ignore[method-assign]
