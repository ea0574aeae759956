"""The native HTTP API for conversations and runs, reviewed (2026-12-05): each test fails on
the code it was written against, because of a defect a demanding client would hit.

Real server on 127.0.0.1 port 0 (hypercorn's trio worker), the real simulator upstream
(``tests/e2e.py``), store faults only through ``store.faults``.
"""

from __future__ import annotations

from typing import Any

import httpx
import trio

from service.errors import StoreUnavailable
from service.settings import Settings, load_settings
from service.sim import Reply

from ..e2e import GUARD, EventStream, after_tokens, e2e
from ..streams import parse_sse


async def _follow_a_bit(env: Any, conv: str, n: int = 2, **body: Any) -> str:
    """Start a streamed ``continue`` run, read its first ``n`` tokens, leave; its id."""
    async with env.post_stream(conv, on_disconnect="continue", **body) as r:
        events = await EventStream(r).read(after_tokens(n))
    return str(events[0].data["run_id"])


# -- 1. an id with a NUL character on PostgreSQL ----------------------------------------------

async def test_an_id_with_a_nul_character_is_a_404_on_postgresql_not_a_500(pg_url: str) -> None:
    """Every native endpoint taking an id in its path hands it to the store as it came. On
    PostgreSQL (``SERVICE_DB=postgresql://...``) a text parameter cannot hold a NUL, so
    ``GET /api/conversations/a%00b``, ``GET /api/runs/a%00b`` (and ``/events``), ``POST
    /api/runs/a%00b/cancel``, ``DELETE /api/conversations/a%00b`` and ``POST
    /api/conversations/a%00b/messages`` answer 500 ``store_error`` ("PostgreSQL text fields
    cannot contain NUL (0x00) bytes"), while the same requests on SQLite are 404.

    API.md: 404 for an unknown id, and the 5xx statuses are the service's or a backend's
    trouble, not a client's bad input (operations.md lists "a NUL character in any request
    field, on PostgreSQL: 500 -> 422", fixed for bodies and queries, not for paths). Expected:
    404 ``not_found`` on either store (no such id can exist: ids are ``conv_``/``run_`` + hex).
    """
    settings = load_settings(db=pg_url)
    async with e2e(settings, "llamacpp") as env:
        requests = [("GET", "/api/conversations/{}"), ("DELETE", "/api/conversations/{}"),
                    ("GET", "/api/runs/{}"), ("GET", "/api/runs/{}/events"),
                    ("POST", "/api/runs/{}/cancel"), ("POST", "/api/conversations/{}/messages")]
        got = {}
        with trio.fail_after(GUARD):
            for method, path in requests:
                body = {"content": "hi"} if path.endswith("/messages") else None
                r = await env.client.request(method, path.format("a%00b"), json=body)
                got[f"{method} {path}"] = (r.status_code, r.json()["error"]["type"])
        assert got == {f"{m} {p}": (404, "not_found") for m, p in requests}, got


# -- 2. HEAD on a live run's events ------------------------------------------------------------

async def test_a_head_of_a_live_runs_events_does_not_hold_the_connection_until_the_run_ends(
    settings: Settings,
) -> None:
    """``HEAD /api/runs/{id}/events`` (``curl -I``, a link checker, a proxy's probe) is answered
    with the headers at once, but the server then runs the whole SSE body generator (the
    EventReader) for a response that has no body, until the run ends: its connection is busy
    all that time, so the client's next request on that keep-alive connection (here a plain
    ``GET /api/runs/{id}``) waits for the end of the run (up to ``SERVICE_RUN_TIMEOUT``, 300 s;
    for ever for a run another instance follows). "Nothing hangs".

    Expected: a HEAD gets the stream's headers and its connection is free at once (the body
    generator is not run for a HEAD), so the next request is answered promptly.
    """
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(tokens=6, hang_after=3))  # a run that goes on (a slow answer)
        conv = await env.conversation()
        with trio.fail_after(GUARD):
            run_id = await _follow_a_bit(env, conv)
        # One connection: the next request goes where the HEAD went, as a keep-alive client's.
        async with httpx.AsyncClient(base_url=env.server.url, timeout=30,
                                     limits=httpx.Limits(max_connections=1)) as client:
            with trio.fail_after(GUARD):
                head = await client.head(f"/api/runs/{run_id}/events")
            assert head.status_code == 200
            with trio.move_on_after(3) as waited:
                r = await client.get(f"/api/runs/{run_id}")
            assert not waited.cancelled_caught, (
                "the request after a HEAD of a live run's events waited for the run's end")
            assert r.json()["status"] == "running"


# -- 3. retry_after in an SSE stream's store_unavailable frame ----------------------------------

async def test_an_sse_streams_store_unavailable_frame_says_when_to_retry(
    settings: Settings,
) -> None:
    """A stream whose re-read of the store fails past its retries ends with an ``error`` frame
    ``store_unavailable`` (docs/api.md), but the frame is ``exc.to_dict()`` only: no
    ``retry_after``. docs/api.md (Errors): "A native SSE stream has already answered 200, so
    its ``error`` event carries the type (and ``retry_after`` where there is one)";
    ``store_unavailable`` has one (5 s: its HTTP answers say ``Retry-After: 5``, and the
    WebSocket's error frame for the same failure of the same reader says ``"retry_after": 5``,
    whose helper ``_service_error`` is documented as doing what "an SSE stream's error event"
    does). A client told nothing re-joins at once, into the same outage.

    Expected: the SSE frame carries ``"retry_after": 5``, as the WebSocket's does.
    """
    quick = settings.model_copy(update={"sse_keepalive": 0.2})  # read retries: 0.4 s
    async with e2e(quick, "llamacpp") as env:
        env.sim.script(Reply(tokens=3))
        conv = await env.conversation()
        with trio.fail_after(GUARD):
            r = await env.client.post(f"/api/conversations/{conv}/messages",
                                      json={"content": "go"})
            run_id = r.json()["run"]["id"]

            def away(op: str) -> None:
                if op in ("list_run_events", "list_events_of_runs"):
                    raise StoreUnavailable("store read failed: the database is restarting")

            env.server.services.require_store().faults.before_read = away
            try:
                r = await env.client.get(f"/api/runs/{run_id}/events")
            finally:
                env.server.services.require_store().faults.before_read = None
        frames = parse_sse(r.text)
        assert r.status_code == 200
        assert frames[-1]["event"] == "error", frames
        assert frames[-1]["data"]["type"] == "store_unavailable", frames[-1]
        assert frames[-1]["data"].get("retry_after") == 5, frames[-1]
