"""PostgreSQL: an instance whose lease cannot be renewed while its store answers (the lease row
locked by another transaction; the lease's own connection refused at max_connections) stops its
runs, new ones too, and ``/readyz`` says so (503): before, it said ready while every run it took
was stopped within seconds (found by a review). A real server on loopback in this process, a
real PostgreSQL; the lock is a real transaction of another connection. Real time: ~15 s."""

from __future__ import annotations

import threading

import psycopg
import pytest
import trio

from service.settings import load_settings

from ..fakes import Reply, ScriptedBackend
from ..servers import running_server

pytestmark = pytest.mark.slow
GUARD = 40  # seconds any wait may take before the test fails (a lease is 15 s)


def _hold_lease_row(url: str, process_id: str, held: threading.Event,
                    release: threading.Event) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("SELECT 1 FROM instances WHERE id = %s FOR UPDATE", (process_id,))
        held.set()
        release.wait(2 * GUARD)
        conn.rollback()


async def test_readyz_is_503_while_this_instances_lease_cannot_be_renewed(pg_url: str) -> None:
    backend = ScriptedBackend(lambda req: Reply("tick " * 400, gap=0.05))  # 20 s
    async with running_server(load_settings(db=pg_url), backend) as srv, \
            srv.client() as client:
        assert (await client.get("/readyz")).status_code == 200
        store = srv.services.require_store()
        held, release = threading.Event(), threading.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, _hold_lease_row, pg_url,
                               store.process_id, held, release)
            try:
                await trio.to_thread.run_sync(held.wait, GUARD)
                conv = (await client.post("/api/conversations", json={})).json()["id"]
                r = await client.post(f"/api/conversations/{conv}/messages",
                                      json={"content": "go", "stream": False},
                                      timeout=GUARD)
                with trio.fail_after(GUARD):
                    while (ready := await client.get("/readyz")).status_code == 200:  # noqa: ASYNC110 (polled, as a load balancer does)
                        await trio.sleep(0.2)
            finally:
                release.set()
            with trio.fail_after(GUARD):  # a renewal lands again: ready again
                while (again := await client.get("/readyz")).status_code != 200:  # noqa: ASYNC110
                    await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
    assert r.status_code != 200 or r.json().get("status") != "succeeded", r.text
    assert ready.status_code == 503
    assert ready.json()["checks"]["service"] == (
        "down: this instance's lease could not be renewed"), ready.json()
    assert ready.json()["checks"]["store"] == "ok", ready.json()  # the store itself answers
    assert again.json()["status"] == "ready"
