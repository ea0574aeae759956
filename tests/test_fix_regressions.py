"""Regressions a review found in the fixes of 2026-12-04 (3f927d0..dd7411e), each test failing
before its own fix: a conversation moved off its full server while its whole tier was full, a
WebSocket Stop that needed the store (and held the socket's next cancel behind it), pings that
kept a closed socket (and the shutdown) for their interval, a tiny SERVICE_DB_TIMEOUT read as
none; and a guard for dd7411e (priority before a free slot: a fallback is not an overflow)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from service.backends import build_backend
from service.backends.base import ChatMessage, ChatRequest
from service.backends.http import Budgets, make_client
from service.backends.router import FleetBackend
from service.errors import StoreUnavailable
from service.settings import Settings, load_settings
from service.store import open_store
from service.store.ownership import process_tag

from .fakes import Reply, ScriptedBackend
from .servers import running_server
from .streams import ws_reply, ws_url


def _ask(conversation: str | None = None) -> ChatRequest:
    return ChatRequest(messages=(ChatMessage("user", "hello"),), model=None,
                       conversation_id=conversation)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(Budgets(connect=5, first_chunk=30, gap=30, call=60)) as c:
        yield c


# -- the router: priority is a fallback, not an overflow -------------------------------------


async def test_auto_keeps_ollama_first_and_the_embedded_fallback_last_when_ollama_is_busy(
    tmp_path: Any, client: httpx.AsyncClient,
) -> None:
    # docs/architecture.md (as changed today): "... then lower `priority` (under `auto`
    # Ollama's servers before llama.cpp's; a lower tier is a fallback, not an overflow), a
    # server with a free slot before a full one". The router's key puts "a free slot" BEFORE
    # priority: once Ollama's SERVICE_BACKEND_CONCURRENCY slots are taken, the next call goes
    # to llama.cpp, and with both full to the embedded tiny model: an overflow, not a fallback.
    conf = load_settings(db=tmp_path / "service.db", backend="auto",
                         ollama_url="http://127.0.0.1:9", llamacpp_url="http://127.0.0.1:10",
                         backend_concurrency=1)
    fleet = build_backend(conf, client, embedded_url="http://127.0.0.1:11")
    assert isinstance(fleet, FleetBackend)
    names = [b.name for b in fleet.backends]
    assert names == ["ollama", "llamacpp", "embedded"]
    assert fleet.route(_ask())[0].name == "ollama"  # all idle: as documented
    fleet._state[id(fleet.backends[0])].in_flight = 1  # Ollama's one slot taken
    busy_ollama = [b.name for b in fleet.route(_ask())]
    fleet._state[id(fleet.backends[1])].in_flight = 1  # and llama.cpp's
    both_busy = [b.name for b in fleet.route(_ask())]
    await fleet.aclose()
    assert busy_ollama == names, f"Ollama full: {busy_ollama}"
    assert both_busy == names, f"Ollama and llama.cpp full: {both_busy}"


# -- WebSocket cancel: a live run of this process now needs the store ------------------------


async def test_ws_cancel_of_a_live_run_of_this_key_does_not_need_the_store(
    settings: Settings,
) -> None:
    # Before today a WS cancel of a run live in this process (started on another socket of
    # the same key, or by POST) was done in memory: supervisor.get + owner check. It now reads
    # the store first (get_run) and fails with store_unavailable while the database is away:
    # the Stop does nothing exactly when the store is in trouble, though the run is right here.
    backend = ScriptedBackend([Reply("a long answer", first_delay=30)])
    async with running_server(settings, backend) as srv, srv.client() as c:
        conv = (await c.post("/api/conversations", json={})).json()["id"]
        async with open_websocket_url(ws_url(srv)) as first, \
                open_websocket_url(ws_url(srv)) as second:
            await first.send_message(json.dumps(
                {"type": "message", "conversation_id": conv, "content": "think long"}))
            with trio.fail_after(10):
                _, started = await ws_reply(first)
            assert started["type"] == "run.started"
            run_id = started["run_id"]
            stream = await backend.wait_stream(0)

            def reads_fail(op: str) -> None:
                if op == "get_run":
                    raise StoreUnavailable("the database is away (injected)")

            srv.services.require_store().faults.before_read = reads_fail
            await second.send_message(json.dumps({"type": "cancel", "run_id": run_id}))
            replies: list[dict[str, Any]] = []
            with trio.move_on_after(2):
                while not stream.cancelled:
                    with trio.move_on_after(0.05):
                        replies.append(json.loads(await second.get_message()))
            srv.services.require_store().faults.clear()
            cancelled = stream.cancelled  # (before the first socket closes: that cancels it)
        errors = [m for m in replies if m.get("type") == "error"]
        assert not errors, f"the cancel of a live run was refused: {errors}"
        assert cancelled, "the live run was not cancelled"


async def test_a_conversation_whose_tier_is_full_stays_on_its_own_server(
    client: httpx.AsyncClient,
) -> None:
    # dd7411e put priority back before room, but "home" (the conversation's server first)
    # is still decided by `any_room` over every usable server, lower tiers included. Two
    # priority-0 servers both full and an idle priority-1 (fallback) server: the call stays in
    # tier 0 and waits in a queue either way, but no longer on the conversation's own server
    # (its prompt cache): the rendezvous hash picks, and half the conversations queue on the
    # other full server, losing the cache for nothing.
    from service.backends.openai_compat import OpenAICompatBackend
    from service.backends.router import Member

    servers = [OpenAICompatBackend(name, f"http://127.0.0.1:{port}", client)
               for name, port in (("gpu-a", 9), ("gpu-b", 10), ("fallback", 11))]
    fleet = FleetBackend(servers, [Member(capacity=1), Member(capacity=1),
                                   Member(priority=1, capacity=1)])
    moved = []
    for n in range(20):
        conversation = f"conversation-{n}"
        fleet.served(servers[0], _ask(conversation))  # its last turn ran on gpu-a
        fleet._state[id(servers[0])].in_flight = 1
        fleet._state[id(servers[1])].in_flight = 1  # both tier-0 servers full
        first = fleet.route(_ask(conversation))[0].name
        if first != "gpu-a":
            moved.append((conversation, first))
    await fleet.aclose()
    assert not moved, f"sent away from its own (equally full) server: {moved}"


async def test_a_ws_cancel_waiting_for_the_store_does_not_hold_the_sockets_other_cancels(
    settings: Settings,
) -> None:
    # ws.py keeps its receive loop free for cancels ("Refused, not waited for: the loop must
    # stay free for cancels"; a run's start goes in its own task). The cancel of a run of
    # another instance is now awaited IN the loop, and it is a store write (request_cancel):
    # while the store is slow to take writes (a batch in progress, a slow disk, PostgreSQL
    # frozen: up to statement_timeout + 5 s per wait), the Stop of the socket's OWN run, sent
    # next, waits behind it, though it needs no store at all.
    backend = ScriptedBackend([Reply("a long answer", first_delay=30)])
    async with running_server(settings, backend) as srv, srv.client() as c, open_store(
            settings.db, process_id=process_tag(os.getppid())) as other:
        conv = (await c.post("/api/conversations", json={})).json()["id"]
        elsewhere = (await other.begin_run(conv, content="q", agent="chat", model=None)).run.id
        conv2 = (await c.post("/api/conversations", json={})).json()["id"]
        store = srv.services.require_store()
        async with open_websocket_url(ws_url(srv)) as ws:
            await ws.send_message(json.dumps(
                {"type": "message", "conversation_id": conv2, "content": "think long"}))
            with trio.fail_after(10):
                _, started = await ws_reply(ws)
            assert started["type"] == "run.started"
            stream = await backend.wait_stream(0)
            await store.faults.hold_writes()  # the store slow to take a write
            try:
                await ws.send_message(json.dumps({"type": "cancel", "run_id": elsewhere}))
                await ws.send_message(json.dumps(
                    {"type": "cancel", "run_id": started["run_id"]}))
                with trio.move_on_after(2):
                    await stream.closed_event.wait()
                own_stopped = stream.cancelled
            finally:
                store.faults.release_writes()
    assert own_stopped, "the socket's own run was not stopped within 2 s: its cancel waited " \
        "behind another run's cancel, itself waiting for a store write"


async def test_a_closed_websocket_does_not_hold_the_shutdown_for_the_ping_interval(
    settings: Settings,
) -> None:
    # build_config now sets hypercorn's websocket_ping_interval (SERVICE_SSE_KEEPALIVE, 15 s).
    # Hypercorn's ping task sleeps the interval inside the connection's task group and looks
    # at `closed` only when it wakes: a socket the client has closed keeps its connection task
    # (and its file descriptor) up to 15 s, and a shutdown then waits it out, up to
    # graceful_timeout, though no request is in flight.
    from service.server import build_config

    from .servers import ROOT

    production = build_config(ROOT / "hypercorn.toml", ["127.0.0.1:0"],
                              max_body_bytes=settings.max_body_bytes,
                              keepalive=settings.sse_keepalive)
    assert production.websocket_ping_interval == settings.sse_keepalive
    async with running_server(settings, graceful_timeout=5,
                              websocket_ping_interval=production.websocket_ping_interval
                              ) as srv:
        async with open_websocket_url(ws_url(srv)) as ws:
            await ws.send_message(json.dumps({"type": "ping"}))
            await ws_reply(ws)  # an error reply: the socket works
        # the client has closed it
        start = trio.current_time()
    took = trio.current_time() - start
    assert took < 1.0, f"the shutdown took {took:.1f}s with no request in flight"


def test_a_small_db_timeout_does_not_turn_statement_timeout_off(tmp_path: Any) -> None:
    # SERVICE_DB_TIMEOUT (new today) takes any value > 0, and the store sends it as
    # int(seconds * 1000) ms: a value under 1 ms (0.0005) becomes "statement_timeout=0", which
    # PostgreSQL takes as NO timeout at all, the opposite of what was asked.
    from service.store.postgres import PostgresStore

    conf = load_settings(db=tmp_path / "service.db", db_timeout=0.0005)  # accepted
    store = PostgresStore("postgresql://u@127.0.0.1:1/db", statement_timeout=conf.db_timeout)
    options = store._connect_kwargs()["options"]
    assert "statement_timeout=0" not in options.split(), options


@pytest.mark.parametrize("variable", ["SERVICE_SHUTDOWN_DRAIN", "SERVICE_RUN_TIMEOUT",
                                      "SERVICE_HEALTH_TTL"])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_a_seconds_setting_that_is_not_a_finite_number_is_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    # (Suspected by the lifecycle review of 2026-12-06.) SERVICE_SHUTDOWN_DRAIN=inf was taken:
    # a shutdown then waited as long as any run lasted; SERVICE_RUN_TIMEOUT=inf gave runs no
    # deadline at all.
    from service.errors import ConfigError
    from service.settings import load_settings

    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as refused:
        load_settings()
    assert variable in refused.value.message
