"""The tiny model generator and the embedded llama.cpp server, against the real llama.cpp.

Every server here is a real llama.cpp HTTP server on a loopback port, started in-process by
``embedded_llama_server`` with the tiny random model (loads in milliseconds). Time only bounds
polling loops (``trio.fail_after``); no assertion depends on how fast the machine is.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

pytestmark = pytest.mark.embedded

pytest.importorskip("xllamacpp", reason="needs the embedded extra: pip install -e '.[embedded]'")
gguf = pytest.importorskip("gguf", reason="needs the embedded extra: pip install -e '.[embedded]'")

from service.backends import embedded  # noqa: E402 (after the skips above)
from service.backends.embedded import (  # noqa: E402
    EmbeddedLlamaServer,
    embedded_llama_server,
    ensure_tiny_model,
)
from service.errors import BackendUnavailable, ConfigError  # noqa: E402
from service.tinymodel.tiny import (  # noqa: E402
    EOS_TOKEN,
    SPECIAL_TOKENS,
    TinyModelSpec,
    write_tiny_model,
)

from ..servers import EMBEDDED_ALIAS as ALIAS  # noqa: E402

# Generous: these bound loops that normally end within milliseconds.
POLL_BUDGET = 10.0


@pytest.fixture
async def client(llama: EmbeddedLlamaServer) -> AsyncIterator[httpx.AsyncClient]:
    timeout = httpx.Timeout(30.0, connect=5.0)
    async with httpx.AsyncClient(base_url=llama.base_url, timeout=timeout) as client:
        yield client


def chat_body(max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": ALIAS,
        "messages": [{"role": "user", "content": "Tell me about the weather."}],
        "max_tokens": max_tokens,
        "stream": True,
        **extra,
    }


@dataclass
class StreamResult:
    content: list[str] = field(default_factory=list)  # one entry per content delta
    finish_reasons: list[str] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    done: bool = False

    @property
    def text(self) -> str:
        return "".join(self.content)


async def sse_events(response: httpx.Response) -> AsyncIterator[dict[str, Any] | None]:
    """The JSON payloads of an OpenAI SSE stream; ``None`` for ``data: [DONE]``."""
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        yield None if data == "[DONE]" else json.loads(data)


def absorb(result: StreamResult, event: dict[str, Any] | None) -> None:
    if event is None:
        result.done = True
        return
    for choice in event.get("choices", []):
        if content := choice.get("delta", {}).get("content"):
            result.content.append(content)
        if choice.get("finish_reason"):
            result.finish_reasons.append(choice["finish_reason"])
    if event.get("usage"):
        result.usage = event["usage"]
    if event.get("timings"):
        result.timings = event["timings"]


async def stream_chat(client: httpx.AsyncClient, body: dict[str, Any]) -> StreamResult:
    result = StreamResult()
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        async for event in sse_events(response):
            absorb(result, event)
    return result


async def slots(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await client.get("/slots")
    assert response.status_code == 200
    result: list[dict[str, Any]] = response.json()
    return result


async def idle_slots(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    """Poll ``/slots`` until no slot is processing (callers bound this with a deadline)."""
    while True:
        state = await slots(client)
        if not any(slot["is_processing"] for slot in state):
            return state
        await trio.sleep(0.01)


# --- the generator -------------------------------------------------------------------------


def test_tiny_model_is_small_and_deterministic(tmp_path: Path) -> None:
    first = write_tiny_model(tmp_path / "a.gguf")
    again = write_tiny_model(tmp_path / "b.gguf")
    other_seed = write_tiny_model(tmp_path / "c.gguf", seed=1)

    assert first.read_bytes() == again.read_bytes()
    assert first.read_bytes() != other_seed.read_bytes()
    assert first.stat().st_size < 1_000_000
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_tiny_model_metadata(tiny_model: Path) -> None:
    fields = gguf.GGUFReader(tiny_model).fields

    def value(key: str) -> Any:
        return fields[key].contents()

    assert value("general.architecture") == "llama"
    assert value("llama.block_count") == 2
    assert value("llama.embedding_length") == 64
    assert value("llama.attention.head_count") == 4
    assert value("llama.feed_forward_length") == 128
    assert value("llama.context_length") == 8192
    assert value("tokenizer.ggml.model") == "gpt2"
    assert value("tokenizer.ggml.pre") == "gpt-2"
    assert value("tokenizer.ggml.add_bos_token") is False
    assert "<|im_start|>" in value("tokenizer.chat_template")

    tokens = value("tokenizer.ggml.tokens")
    types = value("tokenizer.ggml.token_type")
    merges = value("tokenizer.ggml.merges")
    assert len(tokens) == len(types)
    assert tokens[value("tokenizer.ggml.eos_token_id")] == EOS_TOKEN
    assert tokens[-len(SPECIAL_TOKENS) :] == list(SPECIAL_TOKENS)
    assert set(types[-len(SPECIAL_TOKENS) :]) == {gguf.TokenType.CONTROL}
    assert 256 + 200 <= len(tokens) < 1000
    # Every merge joins two known tokens into a known token (else llama.cpp rejects the vocab).
    vocab = set(tokens)
    for merge in merges:
        left, right = merge.split(" ")
        assert {left, right, left + right} <= vocab


def test_tiny_vocabulary_favours_printable_tokens() -> None:
    spec = TinyModelSpec()
    assert len(spec.merges) > 200
    assert not spec.is_printable(spec.eos_id)
    assert not spec.is_printable(spec.tokens.index("Ċ"))  # "\n"
    assert spec.is_printable(spec.tokens.index("Ġthe"))


def test_ensure_tiny_model_writes_only_when_absent(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "tiny.gguf"
    assert ensure_tiny_model(path) == path
    assert path.read_bytes().startswith(b"GGUF")
    path.write_bytes(b"not rewritten")
    assert ensure_tiny_model(path) == path
    assert path.read_bytes() == b"not rewritten"


# --- the server ----------------------------------------------------------------------------


async def test_health_models_and_tokenizer(
    llama: EmbeddedLlamaServer, client: httpx.AsyncClient
) -> None:
    assert llama.base_url == f"http://127.0.0.1:{llama.port}"
    assert llama.model == ALIAS

    health = await client.get("/health")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})

    models = (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == [ALIAS]

    # llama.cpp loaded our vocabulary and merges: words become fewer tokens than bytes.
    text = "the request and the response"
    tokens = (await client.post("/tokenize", json={"content": text})).json()["tokens"]
    assert len(tokens) < len(text.encode())
    detokenized = (await client.post("/detokenize", json={"tokens": tokens})).json()
    assert detokenized["content"] == text

    messages = [{"role": "user", "content": "Hi"}]
    prompt = (await client.post("/apply-template", json={"messages": messages})).json()
    assert prompt["prompt"] == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


async def test_streamed_chat_runs_to_max_tokens_with_usage(client: httpx.AsyncClient) -> None:
    body = chat_body(48, stream_options={"include_usage": True})
    with trio.fail_after(POLL_BUDGET):
        result = await stream_chat(client, body)

    assert result.done
    assert result.finish_reasons == ["length"]
    assert result.content
    assert result.text.isprintable()
    assert result.usage is not None
    assert result.usage["completion_tokens"] == 48
    assert result.usage["prompt_tokens"] > 0
    assert result.timings is not None
    assert result.timings["predicted_n"] == 48
    assert result.timings["predicted_per_second"] > 0


async def test_cancel_mid_stream_frees_the_slot(tiny_model: Path) -> None:
    # One slot, and no max_tokens limit in reach: the stream runs until the slot's context
    # (8192 tokens) is full, far beyond the 5 chunks read here.
    async with (
        embedded_llama_server(tiny_model, n_parallel=1, alias=ALIAS) as llama,
        httpx.AsyncClient(base_url=llama.base_url, timeout=30) as client,
    ):
        received = 0
        with trio.fail_after(POLL_BUDGET), trio.CancelScope() as leave:
            body = chat_body(100_000)
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                async for event in sse_events(response):
                    assert event is not None
                    received += 1
                    if received == 5:
                        busy = await slots(client)
                        assert [s["is_processing"] for s in busy] == [True]
                        leave.cancel()
        # Cancellation lands at the next checkpoint; lines httpx had already buffered may still
        # be delivered before it, so "received" can exceed 5.
        assert leave.cancelled_caught
        assert received >= 5

        with trio.fail_after(POLL_BUDGET):
            state = await idle_slots(client)
        # A slot that ran to the end says it has no next token; ours was stopped midway.
        for slot in state:
            for next_token in slot.get("next_token", []):
                assert next_token["has_next_token"] is True

        # The slot serves the next request.
        with trio.fail_after(POLL_BUDGET):
            result = await stream_chat(client, chat_body(8))
        assert result.finish_reasons == ["length"]


async def test_four_concurrent_streams_complete(client: httpx.AsyncClient) -> None:
    results: list[StreamResult] = []

    async def one(max_tokens: int) -> None:
        body = chat_body(max_tokens, stream_options={"include_usage": True})
        results.append(await stream_chat(client, body))

    with trio.fail_after(POLL_BUDGET):
        async with trio.open_nursery() as nursery:
            for max_tokens in (32, 40, 48, 56):
                nursery.start_soon(one, max_tokens)

    assert sorted(r.usage["completion_tokens"] for r in results if r.usage) == [32, 40, 48, 56]
    assert all(r.finish_reasons == ["length"] and r.done for r in results)
    assert all(r.text.isprintable() for r in results)


async def test_port_is_closed_after_exit(tiny_model: Path) -> None:
    async with embedded_llama_server(tiny_model, alias=ALIAS) as llama:
        stream = await trio.open_tcp_stream("127.0.0.1", llama.port)
        await stream.aclose()
    with pytest.raises(OSError, match="onnect"):
        await trio.open_tcp_stream("127.0.0.1", llama.port)


async def test_exit_while_streaming_stops_the_server(tiny_model: Path) -> None:
    first_chunk = trio.Event()
    ended: list[str] = []

    async def read_stream(client: httpx.AsyncClient) -> None:
        try:
            async with client.stream("POST", "/v1/chat/completions", json=chat_body(100_000)) as r:
                async for _ in sse_events(r):
                    first_chunk.set()
        except httpx.TransportError as exc:
            ended.append(type(exc).__name__)
        else:
            ended.append("end of stream")

    with trio.fail_after(POLL_BUDGET):
        async with trio.open_nursery() as nursery:
            async with embedded_llama_server(tiny_model, n_parallel=1, alias=ALIAS) as llama:
                client = httpx.AsyncClient(base_url=llama.base_url, timeout=30)
                nursery.start_soon(read_stream, client)
                await first_chunk.wait()
            # The server is gone while the client was still reading its stream.
            with pytest.raises(OSError, match="onnect"):
                await trio.open_tcp_stream("127.0.0.1", llama.port)
        await client.aclose()
    assert len(ended) == 1


async def test_retries_when_the_port_is_taken(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        real_free_port = embedded._free_port
        monkeypatch.setattr(embedded, "_free_port", lambda: next(ports, None) or real_free_port())

        async with embedded_llama_server(tiny_model, alias=ALIAS) as llama:
            assert llama.port != taken
            async with httpx.AsyncClient(base_url=llama.base_url) as client:
                assert (await client.get("/health")).status_code == 200


async def test_missing_model_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        async with embedded_llama_server(tmp_path / "nope.gguf"):
            pass


async def test_bad_model_file_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(BackendUnavailable, match="failed to start"):
        async with embedded_llama_server(bad):
            pass


async def test_missing_xllamacpp_is_a_config_error(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "xllamacpp", None)  # makes `import xllamacpp` fail
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[embedded\]'"):
        async with embedded_llama_server(tiny_model):
            pass


def test_port_probe_detects_a_listener() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert embedded._port_in_use(sock.getsockname()[1])
    assert not embedded._port_in_use(embedded._free_port())
