"""Backends and fleets (a review of 2026-12-04): a slot kept by a call cancelled as it was
handed over, a conversation queued on its full server while another idles, a host whose
connects hang tried by call after call, the shared pool sized for one server, a removed model
left in the metrics. Each test failed before its fix, against the real simulator."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager, suppress
from pathlib import Path

import httpx
import pytest
import trio

from service.backends import build_backend, client_from_settings
from service.backends.base import ChatMessage, ChatRequest
from service.backends.http import Budgets, make_client
from service.backends.interceptor import Interceptor
from service.backends.ollama import OllamaBackend
from service.backends.openai_compat import OpenAICompatBackend
from service.backends.router import FleetBackend, Member
from service.metrics import Metrics
from service.settings import load_settings
from service.sim import Reply, Simulator, open_simulator

from ..backend_helpers import FakeRecorder, req

GUARD = 10


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with open_simulator(Simulator(("sim-model",), default=Reply(tokens=3))) as s:
        yield s


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(Budgets(connect=5, first_chunk=30, gap=30, call=60)) as c:
        yield c


# -- the slot queue ------------------------------------------------------------------------------


async def test_a_call_cancelled_as_it_is_handed_the_slot_gives_it_back(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    """The same leak without any timing: a queued call whose run is cancelled (its client
    left, a cancel request, the run's deadline) in the instant the slot is handed to it keeps
    the slot for ever. Only calls with ``on_queued`` (every agent's) take the leaking path."""
    backend = Interceptor(OllamaBackend("ollama", sim.url, client), FakeRecorder(), Metrics(),
                          concurrency=1, queue_timeout=30)
    sim.script(Reply(tokens=3, interval=0.1))
    scope = trio.CancelScope()

    async def waiter() -> None:
        with scope:
            async with backend.stream(req(on_queued=lambda place: None)) as chunks:
                async for _ in chunks:
                    pass

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            async with backend.stream(req()) as chunks:
                nursery.start_soon(waiter)
                async for _ in chunks:
                    pass
            scope.cancel()  # the slot was just handed to the waiter, which has not run yet
    assert scope.cancelled_caught
    assert backend.limiter.borrowed_tokens == 0
    with trio.fail_after(GUARD):
        assert (await backend.chat(req())).message.content


# -- the fleet -----------------------------------------------------------------------------------


@asynccontextmanager
async def two_sims(**kw: object) -> AsyncIterator[tuple[Simulator, Simulator]]:
    async with open_simulator(Simulator(("sim-model",), default=Reply(tokens=3))) as a, \
            open_simulator(Simulator(("sim-model",), default=Reply(tokens=3))) as b:
        yield a, b


def ask(conversation: str | None = None, model: str = "sim-model", **kw: object
        ) -> ChatRequest:
    return ChatRequest(messages=(ChatMessage("user", "hello"),), model=model,
                       conversation_id=conversation, **kw)  # type: ignore[arg-type]


async def test_a_conversation_whose_server_is_full_is_not_queued_while_another_is_idle(
    client: httpx.AsyncClient,
) -> None:
    """Affinity outranks load: a follow-up turn whose server has every slot taken waits in that
    server's queue (up to SERVICE_BACKEND_QUEUE_TIMEOUT, 30 s by default) while the other
    server of the fleet is idle; it reaches the idle one only after the queue wait fails."""
    async with two_sims() as (a, b):
        members = [Interceptor(OpenAICompatBackend(name, sim.url, client), FakeRecorder(),
                               Metrics(), concurrency=1, queue_timeout=3.0)
                   for name, sim in (("gpu-a", a), ("gpu-b", b))]
        fleet = FleetBackend(members, [Member(capacity=1), Member(capacity=1)])
        with trio.fail_after(GUARD):
            first = await fleet.chat(ask("conv"))
        home = first.backend
        home_sim, other_sim = (a, b) if home == "gpu-a" else (b, a)
        home_sim.script(Reply(tokens=40, interval=0.1))  # ~4 s on the one slot
        taken, done = trio.Event(), trio.Event()

        async def hold() -> None:
            async with fleet.stream(ask("conv")) as holder:
                await anext(aiter(holder))  # the home server's one slot is taken
                taken.set()
                await done.wait()

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(hold)
                await taken.wait()
                started = trio.current_time()
                second = await fleet.chat(ask("conv"))
                waited = trio.current_time() - started
                done.set()
        assert second.message.content
        assert waited < 1.0, (f"waited {waited:.1f}s for {second.backend} while "
                              f"{other_sim.url} was idle")


@contextmanager
def blackhole(port: int) -> Iterator[None]:
    """A listener on ``port`` whose accept queue is full: a connect to it hangs (SYNs dropped),
    as to a host that went away behind a router."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(0)
    fill = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        with suppress(BlockingIOError):
            c.connect(("127.0.0.1", port))
        fill.append(c)
    try:
        yield
    finally:
        for c in fill:
            c.close()
        listener.close()


async def test_a_member_whose_connects_hang_is_skipped_like_one_that_refuses() -> None:
    """A server whose host went away (connects time out) is tried again by the next calls, each
    paying the whole connect budget, until three failures cool it down; a server that refuses
    is skipped for health_ttl after the first (FleetBackend._failed only marks
    BackendUnavailable / TLS errors, not ConnectTimeout)."""
    async with make_client(Budgets(connect=1.0, first_chunk=10, gap=10, call=30)) as client, \
            open_simulator(Simulator(("sim-model",), default=Reply(tokens=2))) as b:
        async with open_simulator(Simulator(("sim-model",), default=Reply(tokens=2))) as a:
            port = a.port
            tried_a = FakeRecorder()  # every call gpu-a was tried for
            members = [Interceptor(OpenAICompatBackend(name, url, client), recorder, Metrics())
                       for name, url, recorder in (("gpu-a", a.url, tried_a),
                                                   ("gpu-b", b.url, FakeRecorder()))]
            fleet = FleetBackend(members, inventory_ttl=3600, health_ttl=30)
            with trio.fail_after(GUARD):
                served = {(await fleet.chat(ask())).backend for _ in range(4)}
            assert served == {"gpu-a", "gpu-b"}
        before = len(tried_a.rows)
        with blackhole(port):
            with trio.fail_after(4 * GUARD):
                for _ in range(6):
                    assert (await fleet.chat(ask())).backend == "gpu-b"
        waited = [r.error for r in tried_a.rows[before:]]
        assert len(waited) <= 1, f"calls that waited for gpu-a's connect: {waited}"


async def test_a_fleet_at_its_configured_concurrency_does_not_run_out_of_connections(
    tmp_path: Path,
) -> None:
    """Each server of a fleet gets SERVICE_BACKEND_CONCURRENCY slots, but the one shared HTTP
    client is sized for one server (concurrency * 3 + 8 connections). Eight servers of two
    slots each (16 streams) overflow its 14 connections: the calls past it wait for a pooled
    connection, then fail ConnectTimeout ("no free connection in the pool"), counted against
    healthy servers, although every server had a free slot for them."""
    async with AsyncExitStack() as stack:
        sims = [await stack.enter_async_context(open_simulator(Simulator(
            ("sim-model",), default=Reply(tokens=8, interval=0.25)))) for _ in range(8)]
        conf = load_settings(db=tmp_path / "service.db", backend="llamacpp",
                             llamacpp_url=",".join(s.url for s in sims),
                             backend_concurrency=2, llm_connect_timeout=1.0)
        client = await stack.enter_async_context(client_from_settings(conf))
        recorder = FakeRecorder()
        fleet = build_backend(conf, client, recorder=recorder, metrics=Metrics())
        assert isinstance(fleet, FleetBackend)
        await fleet.refresh_if_stale()
        results: list[str] = []

        async def one(i: int) -> None:
            results.append((await fleet.chat(ask(f"conversation-{i}"))).backend)

        with trio.fail_after(4 * GUARD):
            async with trio.open_nursery() as nursery:
                for i in range(16):
                    nursery.start_soon(one, i)
        await fleet.aclose()
    assert len(results) == 16
    failed = [(r.backend, r.error) for r in recorder.rows if r.outcome.value != "ok"]
    assert not failed, failed



async def test_a_model_removed_from_a_server_leaves_the_metrics(
    client: httpx.AsyncClient,
) -> None:
    """``service_backend_model`` is only ever set, never cleared: a model deleted from a server
    (``ollama rm``) is still exported as available (1) for the life of the process, so a
    dashboard or alert on it keeps routing people to a model no server has."""
    async with open_simulator(Simulator(("keep", "gone"))) as sim:
        metrics = Metrics()
        fleet = FleetBackend([OllamaBackend("box", sim.url, client)], inventory_ttl=0,
                             metrics=metrics)
        with trio.fail_after(GUARD):
            await fleet.refresh_if_stale()
            fleet.export_metrics()
            labels = {"backend": "box", "model": "gone"}
            assert metrics.registry.get_sample_value("service_backend_model", labels) == 2
            sim.models = ["keep"]
            await fleet.refresh_if_stale()
        assert fleet.inventories[0].models == frozenset({"keep"})
        fleet.export_metrics()
        assert metrics.registry.get_sample_value("service_backend_model", labels) in (None, 0)


async def test_an_ollama_model_asked_without_its_tag_is_routed_to_the_server_that_has_it(
    client: httpx.AsyncClient,
) -> None:
    """Ollama takes ``llama3`` for ``llama3:latest`` and lists only the latter: the router
    matched names exactly, found no server with the model, and sent the call to any server
    (one without the model answers 404 after a round trip, and "loaded" was ignored)."""
    async with open_simulator(Simulator(("llama3:latest",))) as a, \
            open_simulator(Simulator(("other:7b",))) as b:
        fleet = FleetBackend([OllamaBackend(name, sim.url, client)
                              for name, sim in (("box-a", a), ("box-b", b))],
                             [Member(kind="ollama"), Member(kind="ollama")], inventory_ttl=3600)
        with trio.fail_after(GUARD):
            await fleet.refresh_if_stale()
        for conversation in ("c1", "c2", "c3", None):
            order = [b.name for b in fleet.route(ask(conversation, model="llama3"))]
            assert order == ["box-a"], order
        await fleet.aclose()
