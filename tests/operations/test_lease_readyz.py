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
    backend = ScriptedBackend(lambda req: Reply(  # 20 s, but a short one once ready again
        "ok" if req.messages[-1].content == "short" else "tick " * 400, gap=0.05))
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
                # Meanwhile new runs are refused (503), not accepted and stopped at once.
                refused = await client.post(f"/api/conversations/{conv}/messages",
                                            json={"content": "again", "stream": False})
                refused_v1 = await client.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "hi"}], "stream": True})
                runs_while_lapsing = (await client.get(
                    f"/api/conversations/{conv}")).json()
            finally:
                release.set()
            with trio.fail_after(GUARD):  # a renewal lands again: ready again
                while (again := await client.get("/readyz")).status_code != 200:  # noqa: ASYNC110
                    await trio.sleep(0.2)
            # Ready again: runs are taken again.
            after = await client.post(f"/api/conversations/{conv}/messages",
                                      json={"content": "short", "stream": False}, timeout=GUARD)
            nursery.cancel_scope.cancel()
    assert r.status_code != 200 or r.json().get("status") != "succeeded", r.text
    assert ready.status_code == 503
    assert ready.json()["checks"]["service"] == (
        "down: this instance's lease could not be renewed"), ready.json()
    assert ready.json()["checks"]["store"] == "ok", ready.json()  # the store itself answers
    assert again.json()["status"] == "ready"
    for answer in (refused, refused_v1):
        assert answer.status_code == 503, answer.text
        assert "could not renew its lease" in answer.json()["error"]["message"], answer.text
        assert int(answer.headers["retry-after"]) > 0
    # The stopped run says why, and when a retry is worth it (it said nothing of that before);
    # the refused one left nothing in the conversation.
    assert "could not renew its lease" in r.text, r.text
    assert r.status_code == 503, r.text
    assert r.headers.get("retry-after") == "5", r.headers
    assert [m["content"] for m in runs_while_lapsing["messages"] if m["role"] == "user"] == [
        "go"], runs_while_lapsing
    assert after.status_code == 200, after.text
    assert after.json()["run"]["status"] == "succeeded", after.text
