"""What the request handlers reach: the app's long-lived services, owned by its lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from quart import current_app, g

from ..metrics import Metrics
from ..settings import Settings
from ..store import Store

if TYPE_CHECKING:
    from ..backends.base import Backend
    from ..runs import RunSupervisor
    from ..tools import ToolRegistry

__all__ = ["Services", "current_owner", "services"]


@dataclass
class Services:
    settings: Settings
    metrics: Metrics
    store: Store | None = None
    backend: Backend | None = None
    supervisor: RunSupervisor | None = None
    tools: ToolRegistry | None = None
    draining: bool = False
    extras: dict[str, Any] = field(default_factory=dict)

    def require_store(self) -> Store:
        assert self.store is not None, "the store is opened by the app's lifespan"
        return self.store

    def require_supervisor(self) -> RunSupervisor:
        assert self.supervisor is not None, "the supervisor is started by the app's lifespan"
        return self.supervisor


def services() -> Services:
    return current_app.extensions["service"]  # type: ignore[no-any-return]


def current_owner() -> str | None:
    """The owner tag of this request's API key (None when auth is off)."""
    return getattr(g, "owner", None)
