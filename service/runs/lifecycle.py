"""A run's status lifecycle: ``queued -> running -> succeeded | failed | cancelled | timed_out``."""

from __future__ import annotations

from enum import StrEnum

from ..errors import IllegalTransition

__all__ = ["TERMINAL", "RunStatus", "check_transition"]


class RunStatus(StrEnum):
    queued = "queued"  # accepted, its task not yet running the agent
    running = "running"  # the agent is working
    succeeded = "succeeded"  # the agent produced its final answer
    failed = "failed"  # the agent or a backend failed; ``error`` says why
    cancelled = "cancelled"  # cancelled explicitly, by a client leaving, or by shutdown
    timed_out = "timed_out"  # the run's deadline passed


TERMINAL = frozenset(
    {RunStatus.succeeded, RunStatus.failed, RunStatus.cancelled, RunStatus.timed_out}
)

_ALLOWED: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.queued: frozenset({RunStatus.running, RunStatus.cancelled, RunStatus.failed,
                                 RunStatus.timed_out}),
    RunStatus.running: TERMINAL,
}


def check_transition(old: RunStatus, new: RunStatus) -> None:
    """Raise IllegalTransition unless ``old -> new`` is allowed."""
    if new not in _ALLOWED.get(old, frozenset()):
        raise IllegalTransition(f"run status cannot go from {old} to {new}", old=old, new=new)
