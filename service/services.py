"""The app's long-lived services, owned by its lifespan: what the request handlers and the server
reach (the handlers through ``service.api.state.services()``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from .metrics import Metrics
from .settings import Settings
from .store import Store

if TYPE_CHECKING:
    from .backends.base import Backend
    from .runs import RunSupervisor
    from .tools import ToolRegistry

__all__ = ["Services"]


@dataclass
class Services:
    settings: Settings
    metrics: Metrics
    store: Store | None = None
    backend: Backend | None = None
    supervisor: RunSupervisor | None = None
    tools: ToolRegistry | None = None
    draining: bool = False
    # The app's start: cancelled by a shutdown begun before it is over (``lifespan``).
    starting: trio.CancelScope = field(default_factory=trio.CancelScope)
    # Set once a shutdown's drain is over (every run ended): WebSockets then close (1001).
    drained: trio.Event = field(default_factory=trio.Event)
    # Set if the run supervisor failed (a bug in one of its loops): the process can run nothing
    # more and shuts down, exit 1, so that what runs it starts another (``server.run_server``).
    broken: trio.Event = field(default_factory=trio.Event)
    extras: dict[str, Any] = field(default_factory=dict)

    def require_store(self) -> Store:
        assert self.store is not None, "the store is opened by the app's lifespan"
        return self.store

    def require_supervisor(self) -> RunSupervisor:
        assert self.supervisor is not None, "the supervisor is started by the app's lifespan"
        return self.supervisor
