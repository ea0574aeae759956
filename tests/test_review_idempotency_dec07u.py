"""Review of ``Idempotency-Key`` on ``POST /api/conversations/{id}/messages`` (8ef8502): a
replay (``_again``) must answer as the first request did, and a true repeat must be answered
with its run, never refused for a reason that run's own existence causes. The real server on
port 0, on both stores."""

from __future__ import annotations

import time
from contextlib import AsyncExitStack

import httpx
import pytest
import trio

from service.errors import BackendAuthFailed, BackendBusy
from service.settings import Settings

from .fakes import Reply, ScriptedBackend
from .servers import running_server
from .streams import new_conversation, parse_sse

pytestmark = pytest.mark.both_stores

GUARD = 20  # seconds any wait may take before the test fails


async def test_a_replayed_failure_keeps_the_first_ones_retry_headers(settings: Settings) -> None:
    """Fixed (was: DEFECT: ``_again`` (service/api/runs.py, the ``json_error(status, type_,
    ...)`` of its failed branch) builds the error with none of ``run_error``'s headers: the
    first answer of an upstream's 503 ``backend_busy`` had ``Retry-After: 5`` and a
    ``backend_auth_failed`` had ``x-should-retry: false``; the replay has neither, so an SDK
    retrying with the same key (the feature's very use) retries at once, and forever, a failure
    told final the first time. Fix: build the replay's error as ``run_error`` does: ``Retry-
    After`` from the stored error event's ``retry_after``, ``x-should-retry: false`` when ``not
    worth_retry_of_type(type_)`` (better: share one helper between ``run_error`` and
    ``_again``).)"""
    backend = ScriptedBackend([
        Reply("", fail_after=0, error=BackendBusy("the backend is busy")), Reply("answered"),
        Reply("", fail_after=0, error=BackendAuthFailed("bad upstream key")), Reply("answered"),
    ])
    async with running_server(settings, backend) as srv, srv.client() as client:
        lost: list[str] = []
        with trio.fail_after(GUARD):
            for n, header in enumerate(("Retry-After", "x-should-retry")):
                conv = await new_conversation(client)
                url, key = f"/api/conversations/{conv}/messages", {"Idempotency-Key": f"k{n}"}
                first = await client.post(url, json={"content": "q"}, headers=key)
                again = await client.post(url, json={"content": "q"}, headers=key)
                assert first.status_code >= 400, first.text
                assert header in first.headers, (header, first.headers)
                # Since: a run that ended without its answer lets its key go, so the retry is
                # a request of its own (the question asked anew), with its own headers.
                assert "Idempotent-Replayed" not in again.headers
                assert again.status_code == 200, again.text
                assert again.json()["run"]["id"] != first.json()["error"]["run_id"]
                assert again.json()["message"]["content"] == "answered"
                lost.append(header)
        assert len(backend.streams) == 4
        assert lost == ["Retry-After", "x-should-retry"]


async def test_a_replay_is_not_refused_by_the_run_limit_its_own_run_fills(
        settings: Settings) -> None:
    """Fixed (was: DEFECT: ``RunSupervisor.start`` (service/runs/supervisor.py, ``if
    len(self._runs) + self._reserved >= self.max_runs: raise TooManyRuns``, and likewise the
    lease-lapsing StoreUnavailable) refuses before ``begin_run`` looks the key up: a client
    whose connection was lost retries with its key and is told 429 ``too_many_runs`` (Retry-
    After 1) though the retry begins nothing: with SERVICE_MAX_RUNS=1 the run filling the limit
    is the very run it asks for, so every retry is refused until that run ends, and its stream
    is never re-joined through the key. Fix: with an ``idempotency_key``, look the key up first
    (a read: ``store.run_of_key(conversation, key, owner)``) and answer ``AlreadyBegun`` before
    the limit/lease checks; keep the in-transaction check for the race.)"""
    limited = settings.model_copy(update={"max_runs": 1})
    backend = ScriptedBackend([Reply("one two", hang_after=1)])
    body = {"content": "q", "stream": True, "on_disconnect": "continue"}
    key = {"Idempotency-Key": "lost-connection"}
    async with running_server(limited, backend) as srv, srv.client() as client:
        conv = await new_conversation(client)
        url = f"/api/conversations/{conv}/messages"
        with trio.fail_after(GUARD):
            async with client.stream("POST", url, json=body, headers=key) as resp:
                assert resp.status_code == 200
                run_id = resp.headers["X-Run-Id"]
                text = ""
                async for chunk in resp.aiter_text():
                    text += chunk
                    if '"text"' in text:
                        break  # the connection is lost; the run goes on (hanging upstream)
            async with client.stream("POST", url, json=body, headers=key) as again:
                status, headers = again.status_code, again.headers
                got = ""
                if status == 200:
                    async for chunk in again.aiter_text():
                        got += chunk
                        if '"text"' in got:
                            break
                else:
                    got = (await again.aread()).decode()
            await client.post(f"/api/runs/{run_id}/cancel")
        assert status == 200, got
        assert headers["X-Run-Id"] == run_id
        assert parse_sse(got)[0]["event"] == "run.started"


async def test_a_retry_after_a_shutdown_503_is_not_told_a_final_409(settings: Settings) -> None:
    """Fixed (was: DEFECT: a non-stream run stopped by a shutdown is answered 503
    ``shutting_down`` (``error_status``/``error_type`` in service/api/runs.py: "worth a retry
    elsewhere"); the client retries with its key on a live instance, and ``_again`` answers from
    the stored status alone (``status_of_type(type_) or {"cancelled": RunCancelled.status
    ...}``): 409 ``cancelled``, a user's final cancel, for ever (the key stays bound to that
    run). The store knows the reason (the run's ``error``/cancel reason "shutdown"), so the
    replay contradicts the first answer. Fix: a run ended by the service, not the client
    (shutdown; also the StoreUnavailable-landed COMMIT closed as "interrupted"), should free its
    key at its end (``idempotency_key = NULL`` with the final state), so the retry begins a run;
    at least the replay must say 503 ``shutting_down`` as the first did.)"""
    quick = settings.model_copy(update={"shutdown_drain": 0.0})
    backend = ScriptedBackend([Reply("one two", hang_after=1)])
    key = {"Idempotency-Key": "k-shutdown"}
    answers: list[httpx.Response] = []
    with trio.fail_after(GUARD):
        async with (AsyncExitStack() as stack, trio.open_nursery() as nursery,
                    running_server(quick, backend) as srv):
            # (leaving: the server shuts down first, then the first request is awaited)
            client = await stack.enter_async_context(srv.client())
            conv = await new_conversation(client)
            url = f"/api/conversations/{conv}/messages"

            async def first() -> None:
                answers.append(await client.post(
                    url, json={"content": "q", "on_disconnect": "continue"}, headers=key))

            nursery.start_soon(first)
            await backend.wait_stream(0)  # the run's upstream call
            # Leaving the block shuts the server down while the run goes on.
        first_answer = answers[0]
        assert first_answer.status_code == 503, first_answer.text
        assert first_answer.json()["error"]["type"] == "shutting_down"
        async with running_server(quick, ScriptedBackend([Reply("new")])) as srv2, \
                srv2.client() as client2:
            again = await client2.post(url, json={"content": "q", "on_disconnect": "continue"},
                                       headers=key)
    assert again.status_code != 409, again.text
    assert again.json().get("error", {}).get("type") != "cancelled", again.text


async def test_a_replaying_client_leaving_cancels_nothing_and_pruned_events_still_answer(
        settings: Settings) -> None:
    # A stream replay asked with the default on_disconnect (cancel) that leaves does not stop
    # the run; a non-stream replay waits for its end (200, the whole answer), and once the
    # retention pruned its events, the kept ones (message, run.finished) still answer it.
    words = "one two three four five six seven eight"
    backend = ScriptedBackend([Reply(words, gap=0.05)])
    key = {"Idempotency-Key": "k"}
    async with running_server(settings, backend) as srv, srv.client() as client:
        conv = await new_conversation(client)
        url = f"/api/conversations/{conv}/messages"
        with trio.fail_after(GUARD):
            for body in ({"content": "q", "stream": True, "on_disconnect": "continue"},
                         {"content": "q", "stream": True}):
                async with client.stream("POST", url, json=body, headers=key) as resp:
                    assert resp.status_code == 200
                    text = ""
                    async for chunk in resp.aiter_text():
                        text += chunk
                        if '"text"' in text:
                            break
            again = await client.post(url, json={"content": "q"}, headers=key)
            assert again.status_code == 200, again.text
            assert again.json()["run"]["status"] == "succeeded"
            assert again.json()["message"]["content"] == words
            store = srv.services.require_store()
            await store.prune_events(time.time() + 60)
            pruned = await client.post(url, json={"content": "q"}, headers=key)
        assert pruned.status_code == 200, pruned.text
        assert pruned.json()["message"] == again.json()["message"]
        assert len(backend.streams) == 1
