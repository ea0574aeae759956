"""Review (dec06e) of the operations endpoints (/metrics, /readyz), the metrics, the embedded
llama.cpp backend and the recording interceptor: each test fails on the reviewed code because
of the defect its docstring names. Real servers on 127.0.0.1 (the app under hypercorn on port 0,
the simulator); every wait is bounded."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from service.settings import load_settings
from service.sim import Simulator
from service.sim.server import open_simulator

from .servers import running_server

GUARD = 60


async def test_a_model_name_with_a_lone_surrogate_does_not_break_metrics(tmp_path: Path) -> None:
    """A fleet server lists a model whose id holds a lone surrogate (valid JSON: "\\ud800";
    the service already cleans such text everywhere it stores or streams it).

    Wrong: the fleet's ``service_backend_model{model=...}`` gauge takes the id as it is, and
    prometheus_client's exposition (UTF-8) cannot encode it: every ``GET /metrics`` is a 500
    from then on (the label never goes away), a monitoring outage caused by one upstream's
    model list.

    Right: /metrics keeps answering 200 with valid Prometheus text (the label value cleaned,
    as the service cleans any upstream text)."""
    async with open_simulator(Simulator(("sim-model", "odd\ud800name"))) as sim:
        fleet = tmp_path / "fleet.toml"
        fleet.write_text(f'[[server]]\nname = "one"\nkind = "llamacpp"\nurl = "{sim.url}"\n')
        settings = load_settings(db=tmp_path / "s.db", backends_file=fleet,
                                 default_model="sim-model")
        async with running_server(settings, from_settings=True) as srv, srv.client() as c:
            with trio.fail_after(GUARD):
                while True:  # the fleet's model list, refreshed in the background
                    listed = (await c.get("/api/backends")).json()["data"][0]
                    if len(listed.get("models") or ()) >= 2:
                        break
                    await trio.sleep(0.05)
                metrics = await c.get("/metrics")
    assert metrics.status_code == 200, metrics.text[:300]
    assert 'service_backend_model{backend="one",model="sim-model"} ' in metrics.text


async def test_the_embedded_server_starts_with_an_http_proxy_in_the_environment(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The host has ``HTTP_PROXY`` set (common on corporate machines and CI runners) to a proxy
    that cannot reach this process's loopback (here: nothing listens there).

    Wrong: ``embedded_llama_server``'s readiness poll (``_Health.wait_ready``) uses an
    ``httpx.AsyncClient`` that trusts the environment, so its ``GET http://127.0.0.1:PORT/health``
    goes to the proxy and never reaches llama.cpp: the start waits for the whole
    ``startup_timeout`` (120 s by default) and fails with "not healthy", although the server
    was up in milliseconds. ``SERVICE_BACKEND=embedded`` and ``python -m service --demo`` cannot
    start on such a host. The service's own clients set ``trust_env=False`` for exactly this
    ("a loopback LLM server must not go through an HTTP(S)_PROXY", backends/clients.py).

    Right: the loopback health poll ignores proxy settings; the server is ready at once."""
    from service.backends.embedded import _free_port, embedded_llama_server

    dead_proxy = f"http://127.0.0.1:{_free_port()}"
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, dead_proxy)
    with trio.fail_after(GUARD):
        async with embedded_llama_server(tiny_model, alias="tiny",
                                         startup_timeout=10) as server:
            assert server.load_seconds < 10


async def test_a_call_past_the_embedded_servers_slots_is_queued_visibly(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SERVICE_BACKEND=embedded (and ``--demo``): the service starts llama.cpp with 4 slots
    (``embedded_llama_server``'s ``n_parallel=4``, docs/operations.md: "split between its 4
    slots") but wraps it in an interceptor limited to ``SERVICE_BACKEND_CONCURRENCY`` (64).

    Wrong: with the 4 slots held, a fifth call is not queued by the service at all: it is sent
    and waits silently in llama.cpp's own queue: no ``queued`` event for its run (the
    interceptor's ``on_queued`` is never told), ``service_llm_queue_wait_seconds`` and its
    record's ``queue_wait`` say 0 (the wait is counted in its time to first token instead), and
    a wait for a slot longer than the idle budget (SERVICE_LLM_IDLE_TIMEOUT, 60 s: a real
    model's long answers) ends as a first-chunk timeout, not the documented ``backend_busy``
    503 with Retry-After after ``SERVICE_BACKEND_QUEUE_TIMEOUT`` (docs/architecture.md,
    "Backends": a call that finds every slot taken waits in a first-come queue, visibly).

    Right: the interceptor's limit matches the slots the service gave its embedded server, so
    the fifth call waits in the service's queue and is told its place (1: next) at once."""
    from service.backends.base import ChatMessage, ChatRequest

    for var in ("SERVICE_DEFAULT_MODEL", "SERVICE_EMBEDDED_CTX", "SERVICE_EMBEDDED_MAX_TOKENS",
                "SERVICE_BACKEND_CONCURRENCY"):
        monkeypatch.delenv(var, raising=False)
    # Four slots of 2,048 tokens (the default 4,096 is two: ``slots_for``).
    settings = load_settings(db=tmp_path / "s.db", backend="embedded", gguf=tiny_model,
                             embedded_ctx=4 * 2048)
    async with running_server(settings, from_settings=True) as srv:
        backend = srv.services.backend
        assert backend is not None
        release = trio.Event()
        holding = 0
        told: list[int] = []

        def ask(queued: object = None) -> ChatRequest:
            return ChatRequest(messages=(ChatMessage("user", "hello"),), model=None,
                               max_tokens=900, on_queued=queued)  # type: ignore[arg-type]

        async def hold() -> None:
            nonlocal holding
            async with backend.stream(ask()) as chunks:
                async for _ in chunks:
                    break
                holding += 1
                await release.wait()  # its slot stays taken: the stream is open

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(hold)
                while holding < 4:  # noqa: ASYNC110 (four streams open, each past its first chunk)
                    await trio.sleep(0.01)
                with trio.move_on_after(3):  # the fifth: told its place, or answered unqueued
                    async with backend.stream(ask(told.append)) as chunks:
                        async for _ in chunks:
                            break
                release.set()
    assert told[:1] == [1], (
        "a fifth call past the embedded server's 4 slots was never queued by the service")
