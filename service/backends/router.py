"""FleetBackend: several servers, routed by model, conversation and load; failover as AutoBackend.

Routing one call
----------------
1. Usable members: not cooling down, not known unready (AutoBackend's rules); nobody left:
   everyone.
2. Of those, the ones that serve the call's model (its ``model``, else the default model).
   Which models a server serves is asked from it (Ollama ``/api/tags`` and ``/api/ps``;
   OpenAI-compatible ``/v1/models``) or given in the fleet file. If no usable member is known to
   serve it, all usable ones are tried (their 404 becomes ``model_not_found``).
3. Ordered by, in turn:
   a. the conversation's server first: the one that served its last call, while it is usable,
      serves the model and is of the best priority up (a failover to a lower tier is not kept
      once the higher one is back). Its prompt cache holds the conversation: the next turn's
      first token comes much sooner there (README, "Backend fleets");
   b. ``priority`` (lower first; under ``auto`` Ollama's servers before llama.cpp's);
   c. a server that has the model loaded now (Ollama's ``/api/ps``), while it has a free slot;
   d. fewest calls in flight per unit of ``weight``;
   e. ties: by rendezvous hashing of the conversation id and the servers' names (each process
      of ``--workers`` sends a new conversation where the others would, and conversations
      spread evenly), or a rotation for a call without a conversation.
4. Then AutoBackend's failover: each in turn until one gives a first chunk; never after.

What the servers serve is refreshed every ``inventory_ttl`` seconds: by a :meth:`keep_fresh` task
if one runs, else by the call that finds it stale (bounded by ``inventory_timeout``; concurrent
calls use what is known meanwhile; only the very first calls wait for it). A server whose model
list cannot be read (refused, TLS, timeout) is marked not ready for ``health_ttl``, as a failed
health probe would; so is one a call could not reach at all (refused, reset before any answer,
TLS).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import httpx
import trio
from prometheus_client import Gauge

from ..errors import (
    BackendBusy,
    BackendError,
    BackendProtocolError,
    BackendResponseError,
    BackendUnavailable,
    ModelNotFound,
)
from ..metrics import Metrics
from ..text import clean_text
from .auto import AutoBackend
from .base import Backend, BackendHealth, ChatRequest, ollama_latest
from .http import BackendTLSError

__all__ = ["FleetBackend", "Inventory", "Member"]

_AFFINITY_MAX = 100_000  # conversations remembered (least recently used forgotten first)


@dataclass(frozen=True, slots=True)
class Member:
    """How the router weighs one server (from its ServerSpec)."""

    weight: float = 1.0
    priority: int = 0
    capacity: int = 64  # its concurrency limit: "loaded" stops counting once it is full
    models: tuple[str, ...] = ()  # given in the fleet file; empty: asked from the server
    kind: str = ""


@dataclass(frozen=True, slots=True)
class Inventory:
    models: frozenset[str] | None = None  # None: not known (yet)
    loaded: frozenset[str] | None = None
    at: float = float("-inf")
    error: str | None = None


class FleetBackend(AutoBackend):
    """AutoBackend whose order is chosen per call (see the module docstring)."""

    def __init__(
        self,
        backends: Sequence[Backend],
        members: Sequence[Member] | None = None,
        *,
        default_model: str | None = None,
        inventory_ttl: float = 5.0,
        inventory_timeout: float = 1.0,
        owned_clients: Sequence[httpx.AsyncClient] = (),
        metrics: Metrics | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(backends, **kwargs)  # type: ignore[arg-type]
        self.members = list(members) if members is not None else [Member() for _ in backends]
        if len(self.members) != len(self.backends):
            raise ValueError("one Member per backend")
        self.default_model = default_model
        self.inventory_ttl = inventory_ttl
        self.inventory_timeout = inventory_timeout
        self.inventories = [
            Inventory(models=frozenset(m.models), loaded=None) if m.models else Inventory()
            for m in self.members]
        self._index = {id(b): i for i, b in enumerate(self.backends)}
        self._affinity: OrderedDict[str, int] = OrderedDict()
        self._exported: dict[int, frozenset[str]] = {}  # models each server's gauge shows
        self._turn = 0
        self._names = [b.name.encode() + b"\0" for b in self.backends]  # hashed before a key
        self._refreshed_at = float("-inf")
        self._refreshing: trio.Event | None = None
        self._kept_fresh = False  # a keep_fresh task refreshes; calls never wait for it
        self._owned = list(owned_clients)
        self.metrics = metrics
        self._gauges = None
        if metrics is not None:
            self._gauges = [(metrics.backend_in_flight.labels(backend=b.name),
                             metrics.backend_queued.labels(backend=b.name))
                            for b in self.backends]
            metrics.collectors.append(self.export_metrics)
            for b in self.backends:
                if hasattr(b, "load_changed"):  # an Interceptor: its slots and queue
                    b.load_changed = partial(self._in_flight_changed, b)

    def __repr__(self) -> str:
        parts = [f"{b.name}(in_flight={self.in_flight(b)}, failures="
                 f"{self._state[id(b)].failures})" for b in self.backends]
        return f"<FleetBackend [{', '.join(parts)}] conversations={len(self._affinity)}>"

    # -- routing ----------------------------------------------------------------------------

    async def order(self, request: ChatRequest) -> list[Backend]:
        if request.model or self.default_model:
            await self.refresh_if_stale()
        self._export_in_flight()
        return self.route(request)

    def route(self, request: ChatRequest) -> list[Backend]:
        """The order for ``request`` from what is known now (no I/O)."""
        now = trio.current_time()
        model = request.model or self.default_model
        count = len(self.backends)
        up = [i for i, b in enumerate(self.backends) if self._skip_reason(b, now) is None]
        usable = up or list(range(count))
        if model is not None:
            # The model's servers first, up or not: with its only server down, the call goes
            # there (and fails 503, to be retried), not to servers without it (a 404
            # model_not_found a client takes for good). A server whose list is unknown may
            # serve it while it is up.
            serving = [i for i in range(count)
                       if ((inv := self.inventories[i]).models is None and i in up)
                       or (inv.models is not None and self._serves(i, inv.models, model))]
            if serving:
                live = [i for i in serving if i in up]
                if live:
                    usable = live
                else:
                    # All of them down: they come first (their failure is a 503), then the
                    # lower tiers that are up (under auto, llama.cpp's server answers any
                    # model name while Ollama is away); never another server of their tier.
                    best = min(self.members[i].priority for i in serving)
                    usable = serving + [i for i in up if i not in serving
                                        and self.members[i].priority > best]
        affine: int | None = None
        conversation = request.conversation_id
        if conversation is not None and (affine := self._affinity.get(conversation)) is not None:
            self._affinity.move_to_end(conversation)
        if conversation is not None:
            # Rendezvous hashing on the conversation and the servers' names: every process
            # (--workers) breaks ties the same way, so its turns meet the same cache. (Not
            # CRC-32 seeded with the conversation's: it is linear in its seed, so each score
            # was the name's own XOR one mask, and 3 servers split 50/25/25.)
            ident = conversation.encode()
            tie = [-int.from_bytes(hashlib.blake2b(name + ident, digest_size=8).digest())
                   for name in self._names]
        else:
            turn = self._turn
            self._turn = turn + 1  # no conversation: a rotation
            tie = [(i - turn) % count for i in range(count)]
        states = [self._state[id(b)] for b in self.backends]
        room = [states[i].in_flight < self.members[i].capacity for i in range(count)]
        # Whether a server of the conversation's own tier has a free slot (a lower tier is no
        # reason to leave its server: the call stays in the tier and queues either way).
        tier_room = affine is not None and any(
            room[i] for i in usable if self.members[i].priority == self.members[affine].priority)
        if affine is not None:
            # Only within the best tier that is up: a conversation that failed over once to a
            # lower tier (a 503, a restart, a cool-down) goes back to the higher one once it is
            # up again (the lower tier is a fallback, not the conversation's new home; under
            # auto with no model named, another model too).
            # (Nothing up: its server stays first, as good a try as any.)
            live = [i for i in usable if i in up]
            if live and self.members[affine].priority > min(
                    self.members[i].priority for i in live):
                affine = None

        def key(i: int) -> tuple[bool, int, bool, bool, float, int]:
            member, inflight = self.members[i], states[i].in_flight
            loaded = self.inventories[i].loaded
            warm = (model is not None and loaded is not None and self._serves(i, loaded, model)
                    and room[i])
            # The conversation's server while it has a free slot (or none has): a prompt cache
            # is not worth a wait in its queue while another server is idle. Priority still
            # comes before room: a lower tier (auto's embedded fallback) is not an overflow.
            home = i == affine and (room[i] or not tier_room)
            return (not home, member.priority, not room[i], not warm,
                    inflight / member.weight, tie[i])

        usable.sort(key=key)
        return [self.backends[i] for i in usable]

    def _serves(self, i: int, models: frozenset[str], model: str) -> bool:
        """Whether ``models`` (server ``i``'s) has ``model``; Ollama takes a name without a
        tag for its ``:latest`` and lists it with the tag."""
        return model in models or (self.members[i].kind == "ollama"
                                   and ollama_latest(model) in models)

    def has_model(self, backend: Backend, request: ChatRequest) -> bool:
        model = request.model or self.default_model
        i = self._index[id(backend)]
        models = self.inventories[i].models
        return model is not None and models is not None and self._serves(i, models, model)

    def served(self, backend: Backend, request: ChatRequest) -> None:
        conversation = request.conversation_id
        if conversation is None:
            return
        self._affinity[conversation] = self._index[id(backend)]
        self._affinity.move_to_end(conversation)
        if len(self._affinity) > _AFFINITY_MAX:
            self._affinity.popitem(last=False)

    def _failed(self, backend: Backend, exc: BackendError) -> None:
        super()._failed(backend, exc)
        unreachable = isinstance(exc, BackendUnavailable | BackendTLSError) and not isinstance(
            exc, BackendBusy) and exc.details.get("upstream_status") is None
        if unreachable or isinstance(exc.__cause__, httpx.ConnectTimeout):
            # No answer at all (refused, reset, TLS; a connect that timed out: a host gone
            # behind a router, which the next calls would each wait the whole connect budget
            # for): as good as a failed probe. Known not ready for health_ttl: other
            # conversations do not try it first meanwhile.
            st = self._state[id(backend)]
            st.health = BackendHealth(backend.name, backend.url, reachable=False, ready=False,
                                      error=exc.message)
            st.health_at = trio.current_time()
            self._state_changed()

    def _state_changed(self) -> None:
        # At once, not only before a render: with several workers /metrics shows the highest
        # of the workers' files, and one written only when its worker rendered went stale.
        if self._gauges is not None:
            self.export_metrics()

    def server_of(self, conversation_id: str) -> Backend | None:
        """The server a conversation's next call goes to first, if it has one."""
        i = self._affinity.get(conversation_id)
        return None if i is None else self.backends[i]

    # -- what each server serves ------------------------------------------------------------

    async def _refresh_inventories(self) -> None:
        if self._refreshing is not None:
            if all(inv.models is None for inv in self.inventories):
                await self._refreshing.wait()  # nothing known yet: worth the wait
            return
        self._refreshing = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                for i, backend in enumerate(self.backends):
                    nursery.start_soon(self._refresh_one, i, backend)
            self._refreshed_at = trio.current_time()
        finally:
            self._refreshing.set()
            self._refreshing = None

    async def _refresh_one(self, i: int, backend: Backend) -> None:
        member = self.members[i]
        inventory = getattr(backend, "inventory", None)
        if inventory is None:
            return
        error: str | None = None
        with trio.move_on_after(self.inventory_timeout) as scope:
            try:
                models, loaded = await inventory()
            except (ModelNotFound, BackendResponseError, BackendProtocolError) as exc:
                # It answers, but not this question (a server without a model list, or one
                # behind a gateway answering it with a page: it was set aside for good while
                # it served chats, its health probe never run again).
                self.inventories[i] = Inventory(self.inventories[i].models, None,
                                                trio.current_time(), exc.message)
                return
            except BackendError as exc:
                error = exc.message
        if scope.cancelled_caught:
            error = f"no model list within {self.inventory_timeout:g}s"
        now = trio.current_time()
        if error is not None:
            # Unreachable (refused, TLS, timeout): known not ready for health_ttl, as a failed
            # health probe would make it; its last known models stay.
            st = self._state[id(backend)]
            st.health = BackendHealth(backend.name, backend.url, reachable=False, ready=False,
                                      error=error)
            st.health_at = now
            self.inventories[i] = Inventory(self.inventories[i].models,
                                            self.inventories[i].loaded, now, error)
            self._state_changed()
            return
        if member.models:
            models = frozenset(member.models)
        self.inventories[i] = Inventory(models, loaded, now)

    async def refresh_if_stale(self) -> None:
        """Ask every server what it serves, if that is older than ``inventory_ttl`` (and no
        :meth:`keep_fresh` task does it)."""
        if self._kept_fresh and any(inv.models is not None for inv in self.inventories):
            return
        if trio.current_time() - self._refreshed_at >= self.inventory_ttl:
            await self._refresh_inventories()

    # Only ever started with nursery.start (flake8's startable list is project config).
    async def keep_fresh(  # noqa: ASYNC114
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Refresh what every server serves every ``inventory_ttl`` seconds until cancelled,
        so that no call waits for it. For the nursery that owns the app's long-lived tasks:
        ``await nursery.start(fleet.keep_fresh)``; without it, calls refresh it themselves."""
        await self._refresh_inventories()
        self._kept_fresh = True
        task_status.started()
        try:
            while True:
                await trio.sleep(self.inventory_ttl)
                await self._refresh_inventories()
        finally:
            self._kept_fresh = False

    # -- metrics ----------------------------------------------------------------------------

    def _in_flight_changed(self, backend: Backend) -> None:
        # At once, not only before a render: with several workers /metrics sums every
        # worker's last value, and another worker's would be stale.
        if self._gauges is not None:
            self._set_load(self._gauges[self._index[id(backend)]], backend)

    def _set_load(self, gauges: tuple[Gauge, Gauge], backend: Backend) -> None:
        open_calls, queued = self.load(backend)
        gauges[0].set(open_calls)
        gauges[1].set(queued)

    def _export_in_flight(self) -> None:
        if self._gauges is not None:
            for gauges, backend in zip(self._gauges, self.backends, strict=True):
                self._set_load(gauges, backend)

    def export_metrics(self) -> None:
        """Set the per-server gauges (run before ``/metrics`` renders)."""
        if self.metrics is None:
            return
        self._export_in_flight()
        now = trio.current_time()
        m = self.metrics
        for i, backend in enumerate(self.backends):
            st = self._state[id(backend)]
            name = backend.name
            m.backend_up.labels(backend=name).set(0 if self._skip_reason(backend, now) else 1)
            left = st.cooldown_until - now
            m.backend_cooldown.labels(backend=name).set(left if left > 0 else 0)
            inv = self.inventories[i]
            for model in inv.models or ():
                loaded = inv.loaded is not None and model in inv.loaded
                # (A label as text: an id with a lone surrogate, valid JSON from a server's
                # list, cannot be encoded, and /metrics was a 500 from then on.)
                m.backend_models.labels(backend=name, model=clean_text(model)).set(
                    2 if loaded else 1)
            if inv.models is not None:  # (unknown, e.g. unreachable: left as last known)
                # A model the server no longer lists (an `ollama rm`) goes to 0: removed, a
                # label would stay in the other workers' files (multiprocess mode).
                for model in self._exported.get(i, frozenset()) - inv.models:
                    m.backend_models.labels(backend=name, model=clean_text(model)).set(0)
                self._exported[i] = inv.models

    async def aclose(self) -> None:
        if self.metrics is not None and self.export_metrics in self.metrics.collectors:
            self.metrics.collectors.remove(self.export_metrics)
        try:
            await super().aclose()
        finally:
            with trio.CancelScope(shield=True):  # closing sockets: must happen when cancelled
                for client in self._owned:
                    await client.aclose()
