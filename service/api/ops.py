"""Operations: ``/healthz``, ``/readyz``, ``/metrics``."""

from __future__ import annotations

import math

import trio
from quart import Blueprint, Response, g, jsonify
from quart_schema import document_response, hide

from ..errors import ServiceError, StoreUnavailable
from ..logs import get_logger
from ..services import Services
from ..store import Store
from .models import HealthOut, ReadyOut
from .state import services

__all__ = ["blueprint"]

blueprint = Blueprint("ops", __name__)
log = get_logger("service.api")

_READY_PROBE_DEADLINE = 2.0


class _Probe:
    """One write probe's answer (each waiter reads its own probe's, not a later one's)."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: ServiceError | None = StoreUnavailable("the write probe was stopped")


_WRITE_PROBE_FRESH = 1.0  # seconds a write probe that landed answers for


class _WriteProbe:
    """``/readyz``'s write probe: a one-row write, at most one a second (one that landed
    answers for ``_WRITE_PROBE_FRESH``), one at a time, in the supervisor's nursery: a request
    waits for it up to its deadline, never longer. A write taken by a batch lands whole
    (shielded): behind another program's SQLite lock that is the whole busy timeout (10 s),
    which held ``/readyz`` past its 2 s when it ran the probe itself. (It ran only once a
    write had failed: a store that could not commit was "ok" until some write tried, up to
    the lease renewal's 5 s later.)"""

    def __init__(self) -> None:
        self._current: _Probe | None = None
        self._landed_at = -math.inf

    def fresh(self) -> bool:
        return trio.current_time() - self._landed_at < _WRITE_PROBE_FRESH

    async def check(self, svc: Services) -> None:
        store = svc.require_store()
        probe = self._current
        if probe is None:
            probe = self._current = _Probe()
            try:
                if svc.supervisor is None:
                    raise RuntimeError("the supervisor is not serving")
                svc.supervisor.nursery.start_soon(self._probe, store, probe)
            except RuntimeError:  # not serving (yet, or any more): this request's own probe
                self._current = None
                await store.probe_write()
                self._landed_at = trio.current_time()
                return
        await probe.done.wait()
        if probe.error is not None:
            raise probe.error

    async def _probe(self, store: Store, probe: _Probe) -> None:
        try:
            await store.probe_write()
            probe.error = None
            self._landed_at = trio.current_time()
        except ServiceError as exc:
            probe.error = exc
        finally:
            self._current = None
            probe.done.set()


def _details_shown() -> bool:
    """The probes are open; with API keys set, why something is down (backend hosts, error
    texts) is shown only to a request with a key."""
    return not services().settings.api_keys or bool(g.get("authenticated", False))


@blueprint.get("/healthz")
@document_response(HealthOut, 200)
@document_response(HealthOut, 503)
async def healthz() -> Response:
    """200 while the process serves; 503 if it can no longer run anything (restart it)."""
    supervisor = services().supervisor
    if supervisor is not None and supervisor.failure is not None:
        error = supervisor.failure if _details_shown() else "the run supervisor stopped"
        resp = jsonify({"status": "down", "error": error})
        resp.status_code = 503
        return resp
    return jsonify({"status": "ok"})


@blueprint.get("/readyz")
@document_response(ReadyOut, 200)
@document_response(ReadyOut, 503)
async def readyz() -> Response:
    """200 when the store answers (and can write) and at least one backend answers, else 503
    naming what is down. The store and the backends are asked at once: each has 2 s, and the
    answer comes within those 2 s, not after the store's 2 s and then the backends' (a load
    balancer's probe timeout is often 5 s or less)."""
    svc = services()
    checks = {"store": "", "backend": ""}  # in this order in the answer
    if svc.backend is None:
        del checks["backend"]

    async def store_check() -> None:
        checks["store"] = await _store_check(svc)

    async def backend_check() -> None:
        assert svc.backend is not None
        with trio.move_on_after(_READY_PROBE_DEADLINE):
            try:
                health = await svc.backend.health()
            except ServiceError as exc:
                checks["backend"] = f"down: {exc.message}"
                return
            except Exception:  # a backend's bug: down, said here; its traceback in the log
                log.exception("the backend's health check failed")
                checks["backend"] = "down: its health check failed"
                return
            checks["backend"] = "ok" if health.ready else f"down: {health.error or 'not ready'}"
            return
        checks["backend"] = "down: no answer within 2 s"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(store_check)
        if svc.backend is not None:
            nursery.start_soon(backend_check)
    if svc.draining:
        checks["service"] = "down: shutting down"
    elif svc.supervisor is not None and svc.supervisor.failure is not None:
        checks["service"] = f"down: {svc.supervisor.failure}"
    elif svc.supervisor is not None and svc.supervisor.lease.lapsing:
        # Its lease is not being renewed (the store itself may answer): its runs are being
        # stopped, new ones too, before another instance takes it for dead.
        checks["service"] = "down: this instance's lease could not be renewed"
    ok = all(v == "ok" for v in checks.values())
    down = [k for k, v in checks.items() if v != "ok"]
    _log_change(svc, checks)
    if not _details_shown():
        checks = {k: "ok" if v == "ok" else "down" for k, v in checks.items()}
    resp = jsonify({"status": "ready" if ok else "not ready", "checks": checks, "down": down})
    resp.status_code = 200 if ok else 503
    return resp


def _log_change(svc: Services, checks: dict[str, str]) -> None:
    """A line when readiness changes (what is down and why; ready again): the reason was only
    in the body, and only for a caller with a key, so the log said `GET /readyz 503` and an
    operator had to ask each instance. Once per change, not per probe."""
    down = {k: v for k, v in checks.items() if v != "ok"}
    said = "; ".join(f"{k}: {v}" for k, v in down.items())
    if svc.extras.get("readiness", "") == said:
        return
    svc.extras["readiness"] = said
    if down:
        log.warning("not ready: %s", said)
    else:
        log.info("ready again")


async def _store_check(svc: Services) -> str:
    """``/readyz``'s store check: "ok" once it answers a read and a write commits (a full
    volume, a database that refuses writes), else why not; within 2 s."""
    with trio.move_on_after(_READY_PROBE_DEADLINE):
        try:
            store = svc.require_store()
            await store.ping()
            probe = svc.extras.setdefault("write_probe", _WriteProbe())
            # Ready when a write commits (not only a read answers). Again once one does.
            if store.write_error is not None or not probe.fresh():
                await probe.check(svc)
            if svc.supervisor is not None and svc.supervisor.committer.refusing:
                # The probe's one row landed, the runs' writes did not (a nearly full
                # volume takes a page, not a batch): this instance cannot serve runs.
                return ("down: the store refuses the runs' writes (held here for a retry, "
                        "not lost)")
            return "ok"
        except ServiceError as exc:
            return f"down: {exc.message}"
    return "down: no answer within 2 s"


@blueprint.get("/metrics")
@hide  # documented by hand (text, not a model): service.factory._OpenAPI
async def metrics() -> Response:
    """Prometheus text exposition."""
    body = services().metrics.render()
    return Response(body, content_type="text/plain; version=0.0.4; charset=utf-8")
