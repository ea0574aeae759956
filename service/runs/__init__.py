"""Runs: one agent answering one message, each in its own cancel scope under one supervisor."""

from .events import EVENT_TYPES, RunEvent
from .handle import ResumeFrom, RunHandle, Subscription
from .lifecycle import TERMINAL, RunStatus, check_transition
from .supervisor import RunSpec, RunSupervisor

__all__ = [
    "EVENT_TYPES",
    "TERMINAL",
    "ResumeFrom",
    "RunEvent",
    "RunHandle",
    "RunSpec",
    "RunStatus",
    "RunSupervisor",
    "Subscription",
    "check_transition",
]
