"""The backend adapters against a real llama.cpp server: the embedded one, on the tiny model.

``OpenAICompatBackend``, ``AutoBackend`` and ``Interceptor`` (recording into a real ``Store``)
talk to llama.cpp's own HTTP server, started in-process per test by ``embedded_llama_server``
(pytest-trio's async fixtures are function-scoped; a start takes milliseconds). The tiny model
never emits end-of-generation and yields one printable token per SSE chunk, so every answer has
exactly ``max_tokens`` tokens and as many content chunks. Time only bounds waits
(``trio.fail_after``); no assertion depends on how fast the machine is.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

pytestmark = pytest.mark.embedded

pytest.importorskip("xllamacpp", reason="needs the embedded extra: pip install -e '.[embedded]'")
pytest.importorskip("gguf", reason="needs the embedded extra: pip install -e '.[embedded]'")

from service.backends import (  # noqa: E402 (after the skips above)
    AutoBackend,
    Budgets,
    ChatChunk,
    ChatMessage,
    ChatRequest,
    Interceptor,
    OpenAICompatBackend,
    make_client,
)
from service.backends.embedded import (  # noqa: E402
    EmbeddedLlamaServer,
    _free_port,
    embedded_llama_server,
)
from service.backends.h11transport import PlainHTTPTransport  # noqa: E402
from service.errors import BackendUnavailable  # noqa: E402
from service.metrics import Metrics  # noqa: E402
from service.store import LLMCallOutcome, LLMCallRecord, Store, open_store  # noqa: E402

from ..servers import EMBEDDED_ALIAS as ALIAS  # noqa: E402

NAME = "embedded"
RUN_ID = "run-embedded"
# Generous: these bound waits that normally end within milliseconds.
BUDGETS = Budgets(connect=5.0, first_chunk=30.0, gap=30.0, call=60.0)
POLL_BUDGET = 10.0
# A fresh interpreter importing xllamacpp and the service, on a possibly busy 2-core machine.
SUBPROCESS_BUDGET = 60.0
# No max_tokens in reach: the stream runs until the slot's context is full (>= 1024 tokens),
# far beyond the few chunks the cancellation tests read.
ENDLESS = 100_000


@pytest.fixture
async def client(llama: EmbeddedLlamaServer) -> AsyncIterator[httpx.AsyncClient]:
    # Depends on ``llama`` so that it closes first: a server stops fastest with no open stream.
    async with make_client(BUDGETS) as client:
        yield client


@pytest.fixture
def backend(llama: EmbeddedLlamaServer, client: httpx.AsyncClient) -> OpenAICompatBackend:
    return OpenAICompatBackend(NAME, llama.base_url, client, BUDGETS)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """A store holding run ``RUN_ID`` (the store records a call only for a run it has)."""
    async with open_store(tmp_path / "service.db") as store:
        conv = await store.create_conversation()
        await store.begin_run(conv.id, content="q", agent="chat", model=None, run_id=RUN_ID)
        yield store


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody else takes it), not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def request(max_tokens: int | None, *, model: str | None = ALIAS) -> ChatRequest:
    return ChatRequest(
        messages=(ChatMessage("user", "Tell me about the weather."),),
        model=model,
        max_tokens=max_tokens,
        run_id=RUN_ID,
    )


async def stream_all(backend: Any, req: ChatRequest) -> list[ChatChunk]:
    chunks: list[ChatChunk] = []
    async with backend.stream(req) as stream:
        async for chunk in stream:
            chunks.append(chunk)
    return chunks


def assert_complete(chunks: list[ChatChunk], max_tokens: int, *, backend: str = NAME) -> None:
    """Content chunks, then one final chunk with the usage: exactly ``max_tokens`` tokens."""
    *content, final = chunks
    assert content
    assert all(c.text and not c.done and c.usage is None for c in content)
    assert "".join(c.text for c in content).isprintable()
    assert final.done
    assert final.text == ""
    assert final.finish_reason == "length"
    assert final.usage is not None
    assert final.usage.completion_tokens == max_tokens
    assert final.usage.prompt_tokens
    assert not final.usage.estimated
    assert final.timings is not None
    assert final.timings["predicted_n"] == max_tokens
    assert len(content) == max_tokens  # one printable token per SSE chunk
    assert {c.backend for c in chunks} == {backend}
    assert {c.model for c in chunks} == {ALIAS}


async def processing_slots(client: httpx.AsyncClient, base_url: str) -> list[bool]:
    response = await client.get(f"{base_url}/slots")
    assert response.status_code == 200
    return [slot["is_processing"] for slot in response.json()]


async def wait_slots_idle(client: httpx.AsyncClient, base_url: str) -> None:
    with trio.fail_after(POLL_BUDGET):
        while True:
            if not any(await processing_slots(client, base_url)):
                return
            await trio.sleep(0.01)


def pool_in_use(client: httpx.AsyncClient) -> tuple[int, int]:
    """(requests in flight, connections neither idle nor closed) of the client's pool."""
    transport = client._transport
    assert isinstance(transport, PlainHTTPTransport)
    return transport.requests, transport.counts()[0]


async def calls(store: Store) -> list[LLMCallRecord]:
    return list(reversed(await store.list_llm_calls(run_id=RUN_ID)))  # oldest first


def calls_counted(metrics: Metrics, backend: str, outcome: str) -> float | None:
    return metrics.registry.get_sample_value(
        "service_llm_calls_total", {"backend": backend, "outcome": outcome}
    )


# --- the llama.cpp adapter -------------------------------------------------------------------


async def test_models_and_health(backend: OpenAICompatBackend) -> None:
    with trio.fail_after(POLL_BUDGET):
        models = await backend.list_models()
        health = await backend.health()
    assert [(m.id, m.backend) for m in models] == [(ALIAS, NAME)]
    assert models[0].details["object"] == "model"
    assert (health.reachable, health.ready, health.error) == (True, True, None)
    assert health.name == NAME
    assert health.latency is not None


async def test_chat_without_a_model_uses_the_listed_one(backend: OpenAICompatBackend) -> None:
    with trio.fail_after(POLL_BUDGET):
        result = await backend.chat(request(16, model=None))
    assert result.message.role == "assistant"
    assert result.message.content.isprintable()
    assert result.message.content
    assert (result.model, result.backend, result.finish_reason) == (ALIAS, NAME, "length")
    assert result.usage.completion_tokens == 16
    assert result.usage.prompt_tokens
    assert not result.usage.estimated
    assert result.timings is not None
    assert result.timings["predicted_n"] == 16


async def test_stream_ends_with_usage_and_timings(
    backend: OpenAICompatBackend, client: httpx.AsyncClient
) -> None:
    with trio.fail_after(POLL_BUDGET):
        chunks = await stream_all(backend, request(24))
    assert_complete(chunks, 24)
    # The body was read to its end: the connection went back to the pool.
    assert pool_in_use(client) == (0, 0)


async def test_interceptor_records_usage_into_the_store(
    backend: OpenAICompatBackend, store: Store
) -> None:
    metrics = Metrics()
    intercepted = Interceptor(backend, store, metrics)
    with trio.fail_after(POLL_BUDGET):
        chunks = await stream_all(intercepted, request(20))
        rows = await calls(store)
    assert_complete(chunks, 20)
    [row] = rows
    assert (row.backend, row.model, row.outcome, row.error) == (NAME, ALIAS, "ok", None)
    assert row.completion_tokens == 20
    assert row.prompt_tokens == chunks[-1].usage.prompt_tokens  # type: ignore[union-attr]
    assert not row.tokens_estimated
    assert row.ttft is not None
    assert row.duration is not None
    assert 0 <= row.ttft <= row.duration
    assert calls_counted(metrics, NAME, "ok") == 1
    assert metrics.registry.get_sample_value(
        "service_llm_tokens_total", {"backend": NAME, "kind": "completion"}
    ) == 20


# --- /health while the model loads ---------------------------------------------------------

# The child process runs the embedded server's own parameters on ``model_path`` and serves
# until its stdin closes. (Not embedded_llama_server itself: it rejects a path that is not a
# regular file, and the gate below is a FIFO.)
LOADING_CHILD = """
import sys
from pathlib import Path

import xllamacpp

from service.backends import embedded

params = embedded._params(
    xllamacpp, Path(sys.argv[1]), int(sys.argv[2]),
    n_parallel=1, n_ctx=512, threads=1, alias=sys.argv[3], verbosity=1,
)
params.fit_params = True  # (the default) its probe is the open that the test's FIFO holds
server = xllamacpp.Server(params)
sys.stdin.read()
"""


def open_gate(gate: Path) -> bool:
    """Release a loader blocked opening the FIFO ``gate``; False if nobody has it open yet."""
    try:
        fd = os.open(gate, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no reader (yet)
            return False
        raise
    os.close(fd)  # the reader sees end-of-file
    return True


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
async def test_health_reports_loading_model(tiny_model: Path, tmp_path: Path) -> None:
    # The real server answers 503 "Loading model" while it loads, but it loads the tiny model in
    # ~30 ms holding the GIL, so an in-process client never sees it. Here a child process serves,
    # and the model path is a FIFO: llama.cpp's loader blocks in open() until we open the other
    # end, which holds the server in "loading" for as long as the test needs.
    # Releasing it: the real model is renamed over the path, then the FIFO is closed. The open
    # it held (llama.cpp's fit_params probe, which only logs its failure) reads an empty file;
    # the model load that follows opens the real one. The port comes from a probe, so another
    # process could take it first: that would show as a failed child, never as a false pass.
    gate = tmp_path / "gate.fifo"
    model_path = tmp_path / "model.gguf"
    os.mkfifo(gate)
    os.link(gate, model_path)  # the same FIFO under the name the child loads
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", LOADING_CHILD, str(model_path), str(port), ALIAS],
        stdin=subprocess.PIPE,
    )
    try:
        async with make_client(BUDGETS) as client:
            backend = OpenAICompatBackend(NAME, url, client, BUDGETS)
            with trio.fail_after(SUBPROCESS_BUDGET):
                while not (health := await backend.health()).reachable:
                    assert proc.poll() is None, "the child exited before it listened"
                    await trio.sleep(0.02)
            assert (health.reachable, health.ready) == (True, False)
            assert health.error == "Loading model"

            # Requests fail fast with a typed 503 (AutoBackend fails over on it).
            with trio.fail_after(POLL_BUDGET), pytest.raises(BackendUnavailable) as caught:
                await backend.chat(request(4))
            assert caught.value.details.get("upstream_status") == 503
            assert "Loading model" in caught.value.message

            real = tmp_path / "real.gguf"
            shutil.copyfile(tiny_model, real)
            os.replace(real, model_path)  # the FIFO stays reachable as ``gate``
            with trio.fail_after(POLL_BUDGET):
                while True:
                    if open_gate(gate):
                        break
                    await trio.sleep(0.01)
                while not (health := await backend.health()).ready:
                    assert proc.poll() is None, "the child failed to load the model"
                    assert health.error == "Loading model"
                    await trio.sleep(0.01)
                result = await backend.chat(request(4))
            assert result.usage.completion_tokens == 4
    finally:
        proc.kill()
        with trio.move_on_after(POLL_BUDGET, shield=True):
            assert proc.stdin is not None
            await proc.stdin.aclose()
            await proc.wait()



# --- leaving a stream early ------------------------------------------------------------------


@pytest.fixture
async def one_slot(tiny_model: Path) -> AsyncIterator[EmbeddedLlamaServer]:
    # One slot of 2048 tokens: an endless stream is still generating when we look at /slots.
    async with embedded_llama_server(tiny_model, n_parallel=1, n_ctx=2048, alias=ALIAS) as server:
        yield server


async def leave_mid_stream(
    backend: Any, client: httpx.AsyncClient, base_url: str, how: str, *, after: int = 5
) -> int:
    """Read ``after`` chunks of an endless stream, then cancel or break; the chunks received."""
    received = 0
    with trio.fail_after(POLL_BUDGET), trio.CancelScope() as leave:
        async with backend.stream(request(ENDLESS)) as chunks:
            async for chunk in chunks:
                assert chunk.text
                assert not chunk.done
                received += 1
                if received == after:
                    assert await processing_slots(client, base_url) == [True]
                    if how == "cancel":
                        leave.cancel()  # lands at the adapter's next network read
                    else:
                        break
    assert leave.cancelled_caught == (how == "cancel")
    return received


async def assert_released(
    backend: OpenAICompatBackend, client: httpx.AsyncClient, base_url: str
) -> None:
    """The slot is free, no connection is checked out, and the next request is served."""
    await wait_slots_idle(client, base_url)
    assert pool_in_use(client) == (0, 0)
    with trio.fail_after(POLL_BUDGET):
        chunks = await stream_all(backend, request(8))
    assert_complete(chunks, 8)
    assert pool_in_use(client) == (0, 0)


@pytest.mark.parametrize("how", ["cancel", "break"])
async def test_leaving_a_stream_frees_the_slot_and_the_connection(
    one_slot: EmbeddedLlamaServer, how: str
) -> None:
    async with make_client(BUDGETS) as client:
        backend = OpenAICompatBackend(NAME, one_slot.base_url, client, BUDGETS)
        received = await leave_mid_stream(backend, client, one_slot.base_url, how)
        # The adapter checks for cancellation before each chunk, buffered or not.
        assert received == 5
        await assert_released(backend, client, one_slot.base_url)


@pytest.mark.parametrize("how", ["cancel", "break"])
async def test_interceptor_records_a_stream_left_early(
    one_slot: EmbeddedLlamaServer, store: Store, how: str
) -> None:
    metrics = Metrics()
    async with make_client(BUDGETS) as client:
        backend = OpenAICompatBackend(NAME, one_slot.base_url, client, BUDGETS)
        intercepted = Interceptor(backend, store, metrics)
        received = await leave_mid_stream(intercepted, client, one_slot.base_url, how)
        await assert_released(backend, client, one_slot.base_url)

    [row] = await calls(store)
    assert (row.backend, row.model, row.outcome) == (NAME, ALIAS, LLMCallOutcome.cancelled)
    # Usage never arrived: the tokens are the content chunks the consumer saw, estimated.
    assert (row.prompt_tokens, row.completion_tokens, row.tokens_estimated) == (
        None, received, True
    )
    assert row.ttft is not None
    assert row.duration is not None
    assert row.error
    assert calls_counted(metrics, NAME, "cancelled") == 1


# --- the auto backend ------------------------------------------------------------------------


async def test_auto_fails_over_to_the_embedded_server(
    llama: EmbeddedLlamaServer,
    client: httpx.AsyncClient,
    backend: OpenAICompatBackend,
    store: Store,
    refused_port: int,
) -> None:
    metrics = Metrics()
    dead = OpenAICompatBackend("dead", f"http://127.0.0.1:{refused_port}", client, BUDGETS)
    auto = AutoBackend([Interceptor(dead, store, metrics), Interceptor(backend, store, metrics)])

    with trio.fail_after(POLL_BUDGET):
        chunks = await stream_all(auto, request(12))
    assert_complete(chunks, 12)  # every chunk, the first included, from the embedded server

    dead_row, ok_row = await calls(store)
    assert (dead_row.backend, dead_row.outcome) == ("dead", LLMCallOutcome.error)
    assert "BackendUnavailable" in (dead_row.error or "")
    assert (dead_row.ttft, dead_row.completion_tokens) == (None, None)
    assert (ok_row.backend, ok_row.outcome, ok_row.error) == (NAME, LLMCallOutcome.ok, None)
    assert ok_row.completion_tokens == 12
    assert ok_row.ttft is not None
    assert calls_counted(metrics, "dead", "error") == 1
    assert calls_counted(metrics, NAME, "ok") == 1

    with trio.fail_after(POLL_BUDGET):
        models = await auto.list_models()
        health = await auto.health()
    assert [(m.id, m.backend) for m in models] == [(ALIAS, NAME)]
    assert (health.reachable, health.ready) == (True, True)
    assert (health.error or "").startswith("dead: ")
    assert pool_in_use(client) == (0, 0)


# --- concurrency -----------------------------------------------------------------------------


async def test_four_concurrent_streams_complete(
    backend: OpenAICompatBackend, client: httpx.AsyncClient
) -> None:
    # The server's four slots batch these continuously; each keeps its own exact length.
    lengths = (32, 40, 48, 56)
    results: dict[int, list[ChatChunk]] = {}

    async def one(max_tokens: int) -> None:
        results[max_tokens] = await stream_all(backend, request(max_tokens))

    with trio.fail_after(POLL_BUDGET):
        async with trio.open_nursery() as nursery:
            for max_tokens in lengths:
                nursery.start_soon(one, max_tokens)

    assert sorted(results) == sorted(lengths)
    for max_tokens, chunks in results.items():
        assert_complete(chunks, max_tokens)
    assert pool_in_use(client) == (0, 0)


async def test_under_auto_the_default_model_does_not_rename_the_embedded_model(
    tiny_model: Path, tmp_path: Path
) -> None:
    # Found in review: SERVICE_DEFAULT_MODEL (meant for Ollama) became the GGUF's alias, so a
    # request for that model, with Ollama down, was answered by the GGUF under its name.
    from service.settings import load_settings

    from ..servers import running_server

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{unused.getsockname()[1]}"  # bound, not listening
        settings = load_settings(db=tmp_path / "s.db", backend="auto", gguf=tiny_model,
                                 ollama_url=dead, llamacpp_url=dead, default_model="llama3:8b")
        async with running_server(settings, from_settings=True) as srv, srv.client() as c:
            models = (await c.get("/v1/models")).json()["data"]
    assert {(m["id"], m["owned_by"]) for m in models} == {(tiny_model.stem, "embedded")}


async def test_the_embedded_model_answers_its_own_name_only(tiny_model: Path,
                                                            tmp_path: Path) -> None:
    # Found in review: llama.cpp answers any model name with its one model, so a request for
    # "gpt-4o" (or, under auto with Ollama down, for an Ollama model) got the GGUF's answer
    # with a 200, where API.md says 404 for an unknown model.
    from service.settings import load_settings

    from ..servers import running_server

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{unused.getsockname()[1]}"
        for kind in ("embedded", "auto"):
            settings = load_settings(db=tmp_path / f"{kind}.db", backend=kind, gguf=tiny_model,
                                     ollama_url=dead, llamacpp_url=dead)
            async with running_server(settings, from_settings=True) as srv, \
                    srv.client() as c:
                r = await c.post("/v1/chat/completions", json={
                    "model": "gpt-4o", "max_tokens": 3,
                    "messages": [{"role": "user", "content": "hi"}]})
                assert (kind, r.status_code, r.json()["error"]["type"]) == (
                    kind, 404, "model_not_found")
                r = await c.post("/v1/chat/completions", json={
                    "model": tiny_model.stem, "max_tokens": 3,
                    "messages": [{"role": "user", "content": "hi"}]})
                assert (kind, r.status_code, r.json()["model"]) == (kind, 200, tiny_model.stem)
