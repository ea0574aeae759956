"""Review of 6144579..HEAD (service/): the lifespan's loops in one cancel scope, and the
OpenAPI document's statuses. Each test fails on the code as reviewed, for the defect its
docstring names."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from service.settings import Settings

from .e2e import GUARD, e2e
from .servers import running_server


def _leaves(exc: BaseException, seen: set[int] | None = None) -> list[BaseException]:
    """The errors in ``exc``: its groups' leaves and what they were raised while handling."""
    seen = set() if seen is None else seen
    if id(exc) in seen:
        return []
    seen.add(id(exc))
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub, seen)]
    chained = exc.__cause__ or exc.__context__
    return [exc, *(_leaves(chained, seen) if chained is not None else [])]


async def test_a_worker_with_a_fleet_starts_with_its_gauges_loop(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What is wrong: a worker of ``python -m service --workers N`` (``PROMETHEUS_MULTIPROC_DIR``
    set, service/workers.py ``serve_workers``) whose backend is a fleet (``SERVICE_BACKEND=auto``,
    the default, is always a ``FleetBackend``; so is a fleet file or a URL list) no longer
    starts: the lifespan's startup fails with ``RuntimeError: Each CancelScope may only be
    used for a single 'with' block`` (hypercorn: "Lifespan failure in startup"), so every
    worker of a multi-worker service with the default backend dies at start.

    What is right: the service starts and serves (here ``/healthz`` and ``/api/backends``
    answer 200), with both background loops (the fleet's refresh and the gauges) running until
    the lifespan's shutdown stops them.

    Root cause: service/lifespan.py ``_start_services`` creates ONE ``trio.CancelScope``
    (``loops``) and starts both ``_within(loops, _keep_fleet_fresh, ...)`` and
    ``_within(loops, svc.metrics.keep_gauges_fresh)``; ``_within`` enters that scope with
    ``with scope:`` in each task, and trio refuses a second entry of a cancel scope. The
    RuntimeError in quart-trio's app nursery cancels the supervisor and fails the startup."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))  # as serve_workers sets it
    answered: dict[str, int] = {}
    failure: list[BaseException] = []
    try:
        with trio.fail_after(GUARD):
            async with e2e(settings, "auto") as env:
                for path in ("/healthz", "/api/backends"):
                    answered[path] = (await env.client.get(path)).status_code
    except trio.Cancelled:
        raise
    except BaseException as exc:  # the startup's failure (a group), shown below
        failure = _leaves(exc)
    # (A Cancelled's text names the child task's exception that cancelled its nursery.)
    said = sorted({str(e) if isinstance(e, trio.Cancelled) else repr(e) for e in failure})
    assert not failure, f"the server did not start: {said}"
    assert answered == {"/healthz": 200, "/api/backends": 200}


async def test_openapi_documents_the_413_of_a_cancel_and_a_delete(settings: Settings) -> None:
    """What is wrong: ``POST /api/runs/{run_id}/cancel`` and ``DELETE
    /api/conversations/{conversation_id}`` answer 413 ``body_too_large`` to a body over
    ``SERVICE_MAX_BODY_BYTES`` (on purpose: service/factory.py ``_begin`` "The body's cap
    holds where a handler reads no body too (a cancel, a delete)"), refused before the handler
    as the newly documented 403 is; but /openapi.json lists no 413 for them (cancel: 202, 403,
    404, 503). The commit that made the document list the statuses answered "before anything
    else runs" (403 everywhere) still leaves this one out, so a client or gateway checking
    answers against the document meets a status it says cannot happen.

    What is right: every operation the cap applies to that answers 413 lists 413 (with the
    error body's schema), as the operations with a request body already do.

    Root cause: service/factory.py ``_truthful`` adds ``_BODY_ERRORS`` (with 413) only to
    operations with a ``requestBody``, while ``_begin`` applies the body cap to every request
    (pre-existing gap, not closed by the 403/503 additions of 20f7197)."""
    conf = settings.model_copy(update={"max_body_bytes": 1024})
    big = {"pad": "x" * 4096}
    async with running_server(conf) as srv, srv.client() as client:
        with trio.fail_after(GUARD):
            spec = (await client.get("/openapi.json")).json()
            cases = [("post", "/api/runs/{run_id}/cancel", "/api/runs/run_0/cancel"),
                     ("delete", "/api/conversations/{conversation_id}",
                      "/api/conversations/c_0")]
            wrong = []
            for method, template, path in cases:
                r = await client.request(method.upper(), path, json=big)
                documented = sorted(spec["paths"][template][method]["responses"])
                if str(r.status_code) not in documented:
                    wrong.append(f"{method.upper()} {template}: answered {r.status_code} "
                                 f"({r.json()['error']['type']}); documented {documented}")
    assert wrong == [], "\n".join(wrong)
