"""Review (dec06) of the LLM-call records: failing tests for defects found by an operator's audit
of what the interceptor records (``service/backends/interceptor.py``,
``service/runs/call_records.py``) and of what the store, the run's usage and /metrics say."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import trio
from trio.testing import MockClock

from service.backends.base import ChatChunk
from service.backends.http import make_client
from service.backends.interceptor import Interceptor
from service.backends.ollama import OllamaBackend
from service.backends.openai_compat import OpenAICompatBackend
from service.errors import BackendResponseError
from service.metrics import Metrics
from service.runs import RunSpec, RunStatus
from service.runs.call_records import CallRecords
from service.sim import Reply, Simulator, mock_transport
from service.store import SQLiteStore
from service.store.records import LLMCallOutcome

from ..backend_helpers import BUDGETS, FakeRecorder, mock_client, req
from ..fakes import supervisor_env
from ..raw_upstream import END, FINISH, SSE_HEAD, chunk, delta, serve_raw, sse

GUARD = 600  # virtual seconds: no test here may run longer


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def test_a_stuck_store_holds_the_call_past_the_record_timeout(
    autojump_clock: MockClock, tmp_path: Path,
) -> None:
    """Defect: the interceptor bounds a record's write by ``record_timeout`` (5 s: "a stuck
    store must not hold the caller forever"), but through the service's real recorder
    (``CallRecords`` over the store) the write the record's own call starts runs its batch
    under ``GroupCommit``'s shield, so the interceptor's ``move_on_after(record_timeout)`` cannot
    end it: a call whose upstream answered in full holds its run for as long as the store is
    stuck (here 300 s), not 5 s, and ``CallRecords`` never gets to keep the record for later."""
    with trio.fail_after(GUARD):
        store = SQLiteStore(tmp_path / "runs.db", threaded=False, metrics=Metrics())
        await store.open()
        try:
            sim = Simulator(default=Reply(tokens=3))
            inner = OpenAICompatBackend("llamacpp", "http://sim", mock_client(sim), BUDGETS)
            records = CallRecords(store)
            backend = Interceptor(inner, records, Metrics())

            async def stuck_writer() -> None:
                await trio.sleep(300)  # a writer stuck with the batch taken (a disk stall)

            store.faults.before_batch = stuck_writer
            got_done_at: list[float] = []
            async with trio.open_nursery() as nursery:
                await nursery.start(records.run)  # as the supervisor runs it
                async with backend.stream(req()) as chunks:
                    async for chunk in chunks:
                        if chunk.done:
                            got_done_at.append(trio.current_time())
                held = trio.current_time() - got_done_at[0]
                store.faults.before_batch = None
                nursery.cancel_scope.cancel()
            assert held <= backend.record_timeout + 1, (
                f"the call was held {held:g}s after its last chunk by a stuck store")
        finally:
            store.faults.before_batch = None
            await store.aclose()


@pytest.mark.parametrize("protocol", ["openai", "ollama"])
async def test_a_mid_stream_error_message_is_recorded_unbounded(
    autojump_clock: MockClock, protocol: str,
) -> None:
    """Defect: an upstream's error object sent mid-stream (``{"error": ...}`` after the 200)
    becomes the call's ``error`` untruncated: the OpenAI adapter's ``_event`` and Ollama's
    ``_chunk`` pass the whole message to ``BackendResponseError`` (only an error *status*
    body, llama.cpp's ``event: error`` line and a context-length message are cut to 500
    characters), and the interceptor records ``_error_text`` as it is. One upstream can so put
    a line of up to 4 MB (the parsers' line bound) into each row of ``llm_calls`` (and
    /api/llm-calls serves up to 500 rows at once; ``CallRecords`` keeps up to 10,000 of them in
    memory while the store refuses them)."""
    huge = "the upstream says: " + "x" * 200_000
    sim = Simulator(default=Reply(tokens=5, error_after=2, error=huge))
    inner = (OpenAICompatBackend("llamacpp", "http://s", mock_client(sim), BUDGETS)
             if protocol == "openai" else OllamaBackend("ollama", "http://s", mock_client(sim),
                                                        BUDGETS))
    recorder = FakeRecorder()
    backend = Interceptor(inner, recorder, Metrics())

    async def consume() -> None:
        async with backend.stream(req()) as chunks:
            async for _ in chunks:
                pass

    with trio.fail_after(GUARD), pytest.raises(BackendResponseError):
        await consume()
    [row] = recorder.rows
    assert row.outcome is LLMCallOutcome.error
    assert len(row.error or "") <= 1000, (
        f"{backend.name}: a record's error holds {len(row.error or ''):,} characters")


async def test_a_call_that_reached_its_done_chunk_is_recorded_cancelled() -> None:
    """Defect: the interceptor's contract is "``ok`` (the stream reached its done chunk)",
    but ``classify_outcome`` looks at ``finished`` only when no exception ended the block: a
    cancel (a client's, a shutdown) that lands after the done chunk was relayed, while the
    adapter reads the rest of the body (``_drain``: up to 1 s against a server, or a proxy,
    that sends ``[DONE]`` and its usage and ends the chunked body a moment later), makes a
    whole, server-counted (billed) answer a ``cancelled`` row and a
    ``service_llm_calls{outcome="cancelled"}`` sample."""
    usage = sse({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}})

    async def respond(stream: trio.SocketStream) -> None:
        await stream.send_all(SSE_HEAD + chunk(delta(content="hello ")) + chunk(
            delta(content="world")) + chunk(FINISH[:-len(b"data: [DONE]\n\n")] + usage
                                            + b"data: [DONE]\n\n"))
        await trio.sleep(0.5)  # the body's end comes a moment after [DONE]
        await stream.send_all(END)

    recorder, metrics = FakeRecorder(), Metrics()
    seen: list[ChatChunk] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_raw, respond)
            async with make_client(BUDGETS) as client:
                inner = OpenAICompatBackend("llamacpp", f"http://127.0.0.1:{port}", client,
                                            BUDGETS)
                backend = Interceptor(inner, recorder, metrics)
                with trio.CancelScope() as run:
                    async with backend.stream(req(run_id="r")) as chunks:
                        async for c in chunks:
                            seen.append(c)
                            if c.done:
                                run.cancel()  # the client's cancel arrives as the answer ends
            nursery.cancel_scope.cancel()
    assert seen[-1].done
    assert seen[-1].usage is not None
    assert seen[-1].usage.estimated is False  # the server's own count: a whole answer
    [row] = recorder.rows
    assert (row.prompt_tokens, row.completion_tokens, row.tokens_estimated) == (7, 2, False)
    assert row.outcome is LLMCallOutcome.ok, (row.outcome, row.error)
    assert sample(metrics, "service_llm_calls_total", backend="llamacpp", outcome="ok") == 1


async def test_an_out_of_range_token_count_costs_the_call_its_record(
    autojump_clock: MockClock, tmp_path: Path,
) -> None:
    """Defect: ``token_count`` takes any non-negative int an upstream reports (``eval_count``,
    ``prompt_eval_count``, ``usage.*_tokens``) with no upper bound, and the interceptor records
    it as it is; the store's INTEGER column cannot hold it (SQLite: 64 bits; PostgreSQL's
    ``INTEGER``: 32 bits, so a count over 2,147,483,647 is enough there), the insert fails with
    a ``StoreError`` that ``CallRecords`` does not keep, and the call's row is lost for good,
    while ``service_llm_calls`` and ``service_llm_tokens`` counted it."""
    lines = [
        {"model": "sim-model", "message": {"role": "assistant", "content": "hi"}, "done": False},
        {"model": "sim-model", "message": {"role": "assistant", "content": ""}, "done": True,
         "done_reason": "stop", "prompt_eval_count": 2**64, "eval_count": 1},
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        return httpx.Response(200, headers={"content-type": "application/x-ndjson"},
                              content=body)

    with trio.fail_after(GUARD):
        store = SQLiteStore(tmp_path / "runs.db", threaded=False, metrics=Metrics())
        await store.open()
        try:
            metrics = Metrics()
            async with make_client(BUDGETS, transport=httpx.MockTransport(handler)) as client:
                backend = Interceptor(OllamaBackend("ollama", "http://o", client, BUDGETS),
                                      CallRecords(store), metrics)
                async with backend.stream(req()) as chunks:
                    async for _ in chunks:
                        pass
            assert sample(metrics, "service_llm_calls_total", backend="ollama",
                          outcome="ok") == 1
            rows = await store.list_llm_calls()
            assert len(rows) == 1, "the call was counted in /metrics but has no row"
        finally:
            await store.aclose()


async def test_a_call_cut_at_the_answer_bound_counts_a_chunk_the_run_never_got(
    autojump_clock: MockClock, tmp_path: Path,
) -> None:
    """Defect: the interceptor's ``_Call.seen`` counts a chunk (``chunks += 1``, the estimate
    of a cut call) before it checks ``MAX_CALL_CHARS`` and raises; that chunk never reaches the
    agent, whose ``call_llm`` counts the chunks it got. A call cut at the bound is so recorded
    with one estimated completion token more than the run's ``usage`` (run.finished,
    GET /api/runs/{id}) counts for it: the run's usage is not the sum of its calls' tokens."""
    piece = "a" * 1_000_000 + " "  # nine pieces: the ninth passes 8 MiB
    sim = Simulator(default=Reply(text=piece * 9), strict_models=False)
    with trio.fail_after(GUARD):
        async with make_client(BUDGETS, transport=mock_transport(sim)) as client:
            adapter = OpenAICompatBackend("llamacpp", "http://sim", client, BUDGETS)
            async with supervisor_env(
                tmp_path, lambda store: Interceptor(adapter, store, Metrics()),  # type: ignore[arg-type]
            ) as env:
                conv = await env.conversation()
                handle = await env.supervisor.start(RunSpec(conv, "say a lot"))
                await handle.finished.wait()
                assert handle.status is RunStatus.failed
                calls = await env.store.list_llm_calls(run_id=handle.id)
                run = await env.store.get_run(handle.id)
    assert [c.outcome for c in calls] == [LLMCallOutcome.error]
    assert handle.usage.get("tokens_estimated")
    assert calls[0].tokens_estimated
    assert run.usage.get("completion_tokens") == sum(c.completion_tokens or 0 for c in calls), (
        run.usage, [(c.completion_tokens, c.error) for c in calls])
