"""Runs: one agent answering one message, each in its own cancel scope under one supervisor."""

from ..store.records import RunEvent
from .handle import ResumeFrom, RunHandle, Subscription
from .lifecycle import TERMINAL, RunStatus, check_transition
from .supervisor import RunSpec, RunSupervisor

__all__ = [
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
