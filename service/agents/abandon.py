"""A tool's async call that a timeout or a cancel can leave behind (``call_abandonable``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..errors import is_interrupt, split_cancelled
from ..logs import get_logger

__all__ = ["call_abandonable"]

log = get_logger("service.agents")


async def call_abandonable(nursery: trio.Nursery, limiter: trio.CapacityLimiter,
                           fn: Callable[[], Awaitable[Any]]) -> Any:
    """``await fn()`` in a task of ``nursery`` (the supervisor's), waited for here. Cancelled
    here (the tool timeout, the run's cancel, its deadline, a shutdown's drain), the call's own
    scope is cancelled and it is not waited for. An async tool that shields itself (an SDK
    protecting its flush) held its run past all of them, awaited inline; now only its task
    lingers, owned by ``nursery``, as an abandoned sync tool's thread does. Python cannot stop
    a coroutine that shields itself: the supervisor's own end still waits for it.

    Each call holds a token of ``limiter`` (the tool's: ``TOOL_THREADS``) until its task ends,
    abandoned or not, as a sync tool's thread does: runs that each left a call hanging
    otherwise piled up tasks (and whatever they hold) without bound; past it a call waits for
    a token within its timeout. What the tool raises is raised here, a ``BaseException`` too
    (a tool's ``SystemExit`` in a group stopped the whole supervisor, not its run)."""
    done = trio.Event()
    box: list[tuple[bool, Any]] = []  # (raised, the value or the exception)
    scope = trio.CancelScope()
    token = object()  # the call's borrower of ``limiter``: released by its task at its end
    await limiter.acquire_on_behalf_of(token)

    async def call() -> None:
        try:
            with scope:
                try:
                    box.append((False, await fn()))
                except BaseException as exc:  # noqa: ASYNC103 (Cancelled is re-raised)
                    # Only a cancellation leaves this task: anything else is the tool's
                    # failure, for its caller (a cleanup failing as the call is abandoned
                    # came out in a group with the Cancelled and stopped the supervisor).
                    cancelled, failure = split_cancelled(exc)
                    if scope.cancel_called and is_interrupt(failure):
                        raise  # abandoned: nobody reads the box; a SIGINT is the process's
                    if failure is not None:
                        box.append((True, failure))
                        if scope.cancel_called:  # abandoned: its caller is gone
                            log.warning("an abandoned tool call failed: %r", failure)
                    if cancelled is not None:
                        raise cancelled from None  # noqa: ASYNC104 (it is the Cancelled)
        finally:
            limiter.release_on_behalf_of(token)
            done.set()

    try:
        nursery.start_soon(call)
    except BaseException:
        limiter.release_on_behalf_of(token)
        raise
    try:
        await done.wait()
    except BaseException:  # noqa: ASYNC103 (re-raised: the caller is cancelled, the call too)
        scope.cancel()
        raise
    if not box:  # its task was cancelled from outside (the supervisor stopping)
        raise RuntimeError("the tool's call was cancelled")
    raised, value = box[0]
    if raised:
        raise value
    return value

