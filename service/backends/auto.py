"""AutoBackend: several backends in a preferred order, with health caching and failover.

Failover algorithm (one call)
-----------------------------
1. Candidates are the backends in configured order, minus those that are *skipped*:
   - in cool-down: ``failure_threshold`` consecutive failures put a backend aside for
     ``cooldown`` seconds (a success resets the count);
   - known not ready: a health probe younger than ``health_ttl`` said it cannot serve.
   If that leaves nobody, every backend is a candidate again (trying beats refusing).
2. For each candidate in turn: open its stream and pull the *first chunk*, both inside the
   loop. Any :class:`BackendError` at this point (refused, 503, loading, unknown model, hang
   past the first-chunk budget, connection dropped, malformed first message) is remembered and
   the next candidate is tried. The failed attempt's response is closed before moving on.
   Except a prompt longer than the model's context (``ContextLengthExceeded``): the request's
   fault, not counted against the backend. The next candidates are still tried (members of a
   fleet may have different contexts), but not one whose own refusal said it takes no more
   than this prompt; if none takes it, the refusal that allowed the most is raised (the
   caller's shortened history then fits the roomiest member).
3. The first candidate that yields a chunk wins. Only now is an iterator handed to the
   consumer: it gives that first chunk, then the rest of the same stream.
4. From then on a failure propagates as it is (typed), the call is never retried elsewhere:
   the consumer may already have shown tokens, and a second answer would not continue the first.
5. If every candidate failed before its first chunk: :class:`AllBackendsFailed` with each cause.

Cancellation is never a backend failure: it propagates at once and closes the open attempt.
Health probes run with a short deadline each and are cached for ``health_ttl`` seconds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import trio

from ..errors import (
    AllBackendsFailed,
    BackendAuthFailed,
    BackendBusy,
    BackendError,
    BackendProtocolError,
    BackendRejectedRequest,
    BackendUnavailable,
    ContextLengthExceeded,
    ModelNotFound,
)
from .base import (
    Backend,
    BackendHealth,
    ChatChunk,
    ChatRequest,
    ChatResult,
    ModelInfo,
    collect_chat,
)

__all__ = ["AutoBackend", "MemberStatus"]

_CLOSE_BUDGET = 10.0  # seconds to close (and record) an attempt left by an exception


CONTEXT_MOST_TTL = 300.0  # seconds a server's refusal is believed about its context


@dataclass(slots=True)
class _State:
    """What AutoBackend knows about one backend."""

    failures: int = 0  # consecutive
    cooldown_until: float = float("-inf")
    health: BackendHealth | None = None
    health_at: float = float("-inf")
    last_error: str | None = None
    in_flight: int = 0  # attempts and streams open on it now
    # The most prompt tokens it takes, as its last refusal of a prompt over its context said
    # (believed for CONTEXT_MOST_TTL: a server restarted with another context).
    context_most: int | None = None
    context_most_until: float = float("-inf")


@dataclass(frozen=True, slots=True)
class MemberStatus:
    """What the router thinks of one member now (for ``/api/backends``)."""

    failures: int  # consecutive failed calls; a success resets it
    last_error: str | None  # of the latest failed call (or model listing) since the last success
    cooldown: float | None  # seconds until the router tries it again; None: not cooling down


class _FirstThenRest:
    """The winner's stream: the chunk pulled during failover, then the rest."""

    def __init__(self, first: ChatChunk, rest: AsyncIterator[ChatChunk], backend: str) -> None:
        self._first: ChatChunk | None = first
        self._rest = rest
        self.backend = backend

    def __repr__(self) -> str:
        return f"<FirstThenRest backend={self.backend} first_pending={self._first is not None}>"

    def __aiter__(self) -> _FirstThenRest:
        return self

    async def __anext__(self) -> ChatChunk:
        if self._first is not None:
            chunk, self._first = self._first, None
            return chunk
        return await self._rest.__anext__()


class AutoBackend:
    """Serve from the first backend that can; see the module docstring for the algorithm."""

    def __init__(
        self,
        backends: Sequence[Backend],
        *,
        name: str = "auto",
        health_ttl: float = 5.0,
        probe_timeout: float = 2.0,
        failure_threshold: int = 3,
        cooldown: float = 30.0,
    ) -> None:
        if not backends:
            raise ValueError("AutoBackend needs at least one backend")
        self.name = name
        self.backends = list(backends)
        self.url = " ".join(b.url for b in self.backends)
        self.health_ttl = health_ttl
        self.probe_timeout = probe_timeout
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self._state = {id(b): _State() for b in self.backends}

    def __repr__(self) -> str:
        now = trio.current_time()
        parts = []
        for b in self.backends:
            st = self._state[id(b)]
            flag = " cooling" if st.cooldown_until > now else ""
            parts.append(f"{b.name}(failures={st.failures}{flag})")
        return f"<AutoBackend [{', '.join(parts)}]>"

    # -- bookkeeping ------------------------------------------------------------------------

    def _succeeded(self, backend: Backend) -> None:
        st = self._state[id(backend)]
        cooling = st.cooldown_until != float("-inf")
        st.failures = 0
        st.cooldown_until = float("-inf")
        st.last_error = None
        if cooling:
            self._state_changed()

    def _failed(self, backend: Backend, exc: BackendError) -> None:
        st = self._state[id(backend)]
        st.last_error = exc.message
        if isinstance(exc, ModelNotFound) or _request_fault(exc):
            return  # the request's fault, not the backend's health
        if isinstance(exc, BackendBusy) and not exc.stalled:
            # Our own queue for its slots stayed full while they answered: it is serving (as
            # much as it is let), not failing. Failed over, not put aside (a busy server cooled
            # down for 30 s sent every call elsewhere while its slots freed up). Slots held by
            # calls its server left unanswered for the whole wait count: it is stalled.
            return
        st.failures += 1
        if st.failures >= self.failure_threshold:
            st.cooldown_until = trio.current_time() + self.cooldown
            self._state_changed()

    def _state_changed(self) -> None:
        """A backend's cool-down or readiness changed (a fleet sets its gauges then)."""

    def _skip_reason(self, backend: Backend, now: float) -> str | None:
        st = self._state[id(backend)]
        if st.cooldown_until > now:
            return f"cooling down after {st.failures} failures (last: {st.last_error})"
        if st.health is not None and now - st.health_at < self.health_ttl and not st.health.ready:
            return f"not ready: {st.health.error or 'unhealthy'}"
        return None

    def member_status(self, backend: Backend) -> MemberStatus:
        """``backend``'s failure count, last call error and remaining cool-down."""
        st = self._state[id(backend)]
        left = st.cooldown_until - trio.current_time()
        return MemberStatus(st.failures, st.last_error, left if left > 0 else None)

    def candidates(self) -> list[Backend]:
        now = trio.current_time()
        usable = [b for b in self.backends if self._skip_reason(b, now) is None]
        return usable or list(self.backends)

    async def order(self, request: ChatRequest) -> list[Backend]:
        """The members to try for ``request``, in turn (here: configured order)."""
        return self.candidates()

    def served(self, backend: Backend, request: ChatRequest) -> None:
        """``backend`` gave ``request`` its first chunk (a router remembers it)."""

    def has_model(self, backend: Backend, request: ChatRequest) -> bool:
        """Whether ``backend`` is known to have ``request``'s model (a router's model lists):
        its failure to answer is then the model's server down, not a model unknown."""
        return False

    def in_flight(self, backend: Backend) -> int:
        """Calls of this router on ``backend`` now, from their attempt's start (waiting for a
        slot included: the load it is routed by; see :meth:`load` for what is open)."""
        return self._state[id(backend)].in_flight

    def load(self, backend: Backend) -> tuple[int, int]:
        """Calls open on ``backend`` now and calls waiting for one of its slots (its
        interceptor's limiter; a member without one: every call of this router open)."""
        open_calls = getattr(backend, "open_calls", None)
        if open_calls is None:
            return self.in_flight(backend), 0
        return open_calls, backend.queued_calls  # type: ignore[attr-defined]

    def _in_flight_changed(self, backend: Backend) -> None:
        """A call opened or closed on ``backend`` (a router exporting the count sets it)."""

    # -- the Backend interface --------------------------------------------------------------

    @asynccontextmanager
    async def stream(self, request: ChatRequest) -> AsyncIterator[AsyncIterator[ChatChunk]]:
        causes: list[BackendError] = []
        too_long: ContextLengthExceeded | None = None
        for backend in await self.order(request):
            state = self._state[id(backend)]
            if (too_long is not None and too_long.tokens is not None
                    and state.context_most is not None
                    and state.context_most < too_long.tokens[0]
                    and trio.current_time() < state.context_most_until):
                continue  # it said it takes fewer tokens than this prompt has
            state.in_flight += 1  # from its attempt's start to its stream's end
            self._in_flight_changed(backend)
            try:
                stack = AsyncExitStack()
                try:
                    chunks = await stack.enter_async_context(backend.stream(request))
                    iterator = aiter(chunks)
                    try:
                        first = await anext(iterator)
                    except StopAsyncIteration:
                        raise BackendProtocolError("empty stream",
                                                   backend=backend.name) from None
                except BackendError as exc:
                    # Closes this attempt's response before the next one, telling its
                    # interceptor why (its record then says timed_out or error, not "left
                    # before the end").
                    await stack.__aexit__(type(exc), exc, exc.__traceback__)
                    if exc.backend is None:
                        exc.backend = backend.name
                    if isinstance(exc, ContextLengthExceeded):
                        # The request's fault, not counted against the backend; another of a
                        # fleet may have a larger context.
                        if exc.tokens is not None:
                            state.context_most = exc.tokens[1]
                            state.context_most_until = trio.current_time() + CONTEXT_MOST_TTL
                        if too_long is None or _allows_more(exc, too_long):
                            too_long = exc
                        continue
                    self._failed(backend, exc)
                    causes.append(exc)
                    continue
                except BaseException as exc:
                    # Shielded (and bounded): closing and recording must happen when cancelled.
                    with trio.move_on_after(_CLOSE_BUDGET, shield=True):
                        await stack.__aexit__(type(exc), exc, exc.__traceback__)
                    raise
                async with stack:
                    self.served(backend, request)
                    try:
                        yield _FirstThenRest(first, iterator, backend.name)
                    except BackendError as exc:
                        self._failed(backend, exc)  # mid-stream: counted, never retried
                        raise
                    # A success once the stream is over, not at its first chunk: a backend
                    # that always dies mid-answer must still reach its cool-down.
                    self._succeeded(backend)
                return
            finally:
                state.in_flight -= 1
                self._in_flight_changed(backend)
        if too_long is not None:
            raise too_long
        raise _all_failed(causes, serving={b.name for b in self.backends
                                           if self.has_model(b, request)},
                          members=len(self.backends))

    async def chat(self, request: ChatRequest) -> ChatResult:
        return await collect_chat(self, request)

    async def list_models(self) -> list[ModelInfo]:
        """Models of every backend that answers (ModelInfo.backend says which);
        ``BackendUnavailable`` if none does (none could say: not "no models")."""
        results: list[list[ModelInfo] | None] = [None for _ in self.backends]

        refused: list[BackendAuthFailed] = []

        async def one(i: int, backend: Backend) -> None:
            with trio.move_on_after(self.probe_timeout):
                try:
                    results[i] = await backend.list_models()
                except BackendError as exc:
                    self._state[id(backend)].last_error = exc.message
                    if isinstance(exc, BackendAuthFailed):
                        refused.append(exc)

        async with trio.open_nursery() as nursery:
            for i, backend in enumerate(self.backends):
                nursery.start_soon(one, i, backend)
        if self.backends and all(models is None for models in results):
            if len(refused) == len(self.backends):  # every one refused the service's key
                raise refused[0]
            raise BackendUnavailable("no backend answered", backend=self.name)
        return [m for models in results for m in models or ()]

    async def health_all(self, *, fresh: bool = False,
                         on_ready: Callable[[], None] | None = None) -> list[BackendHealth]:
        """Each backend's health, probed concurrently if older than ``health_ttl``;
        ``on_ready`` is called as a probe finds one ready."""
        now = trio.current_time()

        async def probe(backend: Backend) -> None:
            st = self._state[id(backend)]
            started = trio.current_time()
            health: BackendHealth | None = None
            with trio.move_on_after(self.probe_timeout):
                health = await backend.health()
            if health is None:
                health = BackendHealth(backend.name, backend.url, reachable=False, ready=False,
                                       latency=trio.current_time() - started,
                                       error=f"no answer within {self.probe_timeout:g}s")
            changed = st.health is None or st.health.ready != health.ready
            st.health, st.health_at = health, trio.current_time()
            if changed:
                self._state_changed()
            if health.ready and on_ready is not None:
                on_ready()

        async with trio.open_nursery() as nursery:
            for backend in self.backends:
                st = self._state[id(backend)]
                if fresh or st.health is None or now - st.health_at >= self.health_ttl:
                    nursery.start_soon(probe, backend)
        return [self._state[id(b)].health for b in self.backends]  # type: ignore[misc]

    async def health(self) -> BackendHealth:
        """Ready when any backend is; ``models`` joined, ``error`` names the ones down.

        Returns as soon as one is known ready (fresh from its cache, or its probe): a member
        that hangs held every answer for its probe's whole bound, and ``/readyz``, whose own
        deadline came first, said 503 while another member was ready. The probes not done
        then are given up (their members keep what was known of them)."""
        now = trio.current_time()
        known = [self._state[id(b)] for b in self.backends]
        if not any(st.health is not None and st.health.ready
                   and now - st.health_at < self.health_ttl for st in known):
            enough = trio.Event()
            async with trio.open_nursery() as nursery:

                async def probe_all() -> None:
                    await self.health_all(on_ready=enough.set)
                    enough.set()

                nursery.start_soon(probe_all)
                await enough.wait()
                nursery.cancel_scope.cancel()
        healths = [st.health or BackendHealth(b.name, b.url, reachable=False, ready=False,
                                              error="not probed yet")
                   for b, st in zip(self.backends, known, strict=True)]
        down = [f"{h.name}: {h.error}" for h in healths if not h.ready]
        latencies = [h.latency for h in healths if h.latency is not None]
        return BackendHealth(
            self.name, self.url,
            reachable=any(h.reachable for h in healths),
            ready=any(h.ready for h in healths),
            latency=min(latencies) if latencies else None,
            error="; ".join(down) or None,
            models=tuple(m for h in healths for m in h.models),
        )

    async def preload(self, model: str) -> None:
        """Preload on the first candidate that has not failed it."""
        causes: list[BackendError] = []
        for backend in self.candidates():
            try:
                await backend.preload(model)
            except BackendError as exc:
                causes.append(exc)
                continue
            return
        raise _all_failed(causes, members=len(self.backends))

    async def aclose(self) -> None:
        for backend in self.backends:
            await backend.aclose()


def _allows_more(refusal: ContextLengthExceeded, than: ContextLengthExceeded) -> bool:
    """Whether ``refusal`` says its server takes more tokens than ``than``'s."""
    return refusal.tokens is not None and (than.tokens is None
                                           or refusal.tokens[1] > than.tokens[1])


def _all_failed(causes: list[BackendError], *,
                serving: frozenset[str] | set[str] = frozenset(), members: int = 1,
                ) -> BackendError:
    """One error for a call no backend could serve.

    If every backend that answered said the model is unknown (the others being down), the
    answer is ModelNotFound (404), not "no backend reachable" (503); so for a request every
    backend that answered refused (BackendRejectedRequest, 400). When a server known to have
    the model (``serving``: a router's model lists) is among those down, only the answers of
    the servers that have it count: the others' (an unknown model, a field a lower tier does
    not take) say nothing of it, and its server being away is a 503 to retry, not a 404 or a
    400 a client takes for good.
    """
    model_down = any(isinstance(c, BackendUnavailable) and c.backend in serving for c in causes)
    answered = [c for c in causes if not isinstance(c, BackendUnavailable)
                and (not model_down or c.backend in serving)]
    # Every one that answered refused the request itself (its model unknown, a field it does
    # not take): that answer, which a client does not retry. A refusal (400) before an
    # unknown model (404): the server that has the model said what is wrong.
    # So for every server refusing the service's key (every one, each tried: a server down
    # or skipped meanwhile may take it when back): its operator's to fix, not a 503 to retry.
    refused_by_all = (all(isinstance(c, BackendAuthFailed) for c in causes)
                      and len({c.backend for c in causes}) >= members)
    if answered and (all(isinstance(c, ModelNotFound | BackendRejectedRequest) for c in answered)
                     or refused_by_all):
        first = next((c for c in answered if isinstance(c, BackendRejectedRequest)), answered[0])
        return type(first)(first.message, backend=first.backend,
                           causes=[c.to_dict() for c in causes])
    failed = AllBackendsFailed(causes)
    # Every backend busy or rate-limited for a while: the soonest of their Retry-Afters.
    waits = [c.retry_after for c in causes if c.retry_after is not None]
    if waits:
        failed.retry_after = min(waits)
    return failed


def _request_fault(exc: BackendError) -> bool:
    """An upstream 4xx about the request itself (too long for the context, bad parameters): no
    reason to set a healthy backend aside for everyone. 408 and 429 are the backend's load, 401
    and 403 its credentials (wrong for every request): those count."""
    status = exc.details.get("upstream_status")
    return (isinstance(status, int) and 400 <= status < 500
            and status not in (401, 403, 408, 429))
