"""Runs owned by the HTTP request that started them: cancelled when that request ends.

A streamed run is cancelled by its response body when the client leaves (the generator's
``finally``), and a non-streamed one by its handler. Neither covers a client that leaves after
the run has started but before its response body has begun: the request is cancelled inside
Quart or hypercorn, the body generator never runs, and the run (with its upstream generation)
would go on with nobody to read it. Seen in a test that holds the run's first write in the
store's thread while the client disconnects.

So a handler hands its run to :func:`own_run` right after starting it (no checkpoint between;
``/v1`` through ``RunSpec.on_handle``, before the run's first write lands), and the
:class:`CancelOwnedRuns` ASGI middleware cancels, when the request ends in any way or its
client disconnects (the ``http.disconnect`` message, seen as it passes), each owned run that is
still going. A run that outlives its request by design
(``on_disconnect: continue``) is simply not handed over, and a streamed run whose response
ended on its own while the run goes on (an error frame: the client may re-join) is handed back
with :func:`disown_run`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, cast

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGIReceiveEvent, ASGISendCallable, Scope

from ..logs import REQUEST_ID, get_logger
from ..runs import RunHandle

__all__ = ["CancelOwnedRuns", "disown_run", "mark_answered", "note_request", "own_run"]

log = get_logger("service.app")  # (the access lines' logger, as factory._end's)

# Set in the request's scope by the app's access line (``factory._end``, Quart's
# after_request): a request without it whose client left was cancelled before its answer, and
# gets its access line here (499, nginx's "client closed request"), with the request's id.
_ANSWERED, _REQUEST = "service.answered", "service.request_id"


def mark_answered(scope: Scope) -> None:
    """The request's access line is written (``factory._end``)."""
    cast("dict[str, Any]", scope)[_ANSWERED] = True


def note_request(scope: Scope, request_id: str) -> None:
    """The request's id, for its access line if its client leaves before the answer."""
    cast("dict[str, Any]", scope)[_REQUEST] = request_id

ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]

# The current request's runs (the list is shared with the request's tasks: they copy the
# context, not the list).
_OWNED: ContextVar[list[RunHandle] | None] = ContextVar("owned_runs", default=None)


def own_run(handle: RunHandle) -> None:
    """Cancel ``handle`` ("client disconnected") if it is still going when this request ends."""
    owned = _OWNED.get()
    if owned is not None:
        owned.append(handle)


def disown_run(handle: RunHandle) -> None:
    """Undo :func:`own_run`: ``handle`` outlives this request."""
    owned = _OWNED.get()
    if owned is not None and handle in owned:
        owned.remove(handle)


class CancelOwnedRuns:
    """ASGI middleware: see the module docstring."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __repr__(self) -> str:
        return f"<CancelOwnedRuns {self.app!r}>"

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        owned: list[RunHandle] = []
        started = time.perf_counter()
        left = False

        def cancel_owned() -> None:
            for handle in owned:
                if not handle.done:
                    handle.cancel("client disconnected")  # sync, idempotent

        async def receive_noting_a_disconnect() -> ASGIReceiveEvent:
            # At once: the handler may be held where its cancellation waits (a run's first
            # write taken into a slow commit is waited for, shielded), and the runs must not.
            nonlocal left
            message = await receive()
            if message["type"] == "http.disconnect":
                left = True
                cancel_owned()
            return message

        token = _OWNED.set(owned)
        try:
            await self.app(scope, receive_noting_a_disconnect, send)
        except trio.Cancelled:
            left = True
            raise
        finally:
            _OWNED.reset(token)
            cancel_owned()
            extras = cast("dict[str, Any]", scope)
            if left and not extras.get(_ANSWERED):
                # Its handler was cancelled before its answer: no access line came (Quart's
                # after_request does not run), and a request that "hung and failed" for its
                # client left no trace. (Its id was set in the handler's context, not here.)
                rid = REQUEST_ID.set(extras.get(_REQUEST))
                try:
                    log.info("%s %s 499 (the client left before the answer)",
                             scope["method"], scope["path"], extra={
                                 "status": 499,
                                 "ms": round((time.perf_counter() - started) * 1000, 2)})
                finally:
                    REQUEST_ID.reset(rid)
