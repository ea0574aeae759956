"""Interceptor: one record per call with the right outcome, metrics, limiter queue wait."""

from __future__ import annotations

import pytest
import trio
from trio.testing import MockClock

from service.backends.auto import AutoBackend
from service.backends.base import ChatChunk
from service.backends.interceptor import Interceptor
from service.backends.ollama import OllamaBackend
from service.backends.openai_compat import OpenAICompatBackend
from service.errors import BackendBusy, BackendResponseError, FirstChunkTimeout
from service.metrics import Metrics
from service.sim import Reply, Simulator
from service.store.records import LLMCallOutcome

from ..backend_helpers import BUDGETS, FakeRecorder, mock_client, req


def intercepted(reply: Reply, *, delay: float = 0.0, concurrency: int = 4
                ) -> tuple[Simulator, Interceptor, FakeRecorder, Metrics]:
    sim = Simulator(default=reply)
    recorder, metrics = FakeRecorder(delay=delay), Metrics()
    inner = OpenAICompatBackend("llamacpp", "http://sim", mock_client(sim), BUDGETS)
    return sim, Interceptor(inner, recorder, metrics, concurrency=concurrency), recorder, metrics


async def consume(backend: Interceptor | AutoBackend, seen: list[ChatChunk] | None = None,
                  **kw: object) -> list[ChatChunk]:
    seen = [] if seen is None else seen
    async with backend.stream(req(**kw)) as chunks:
        async for chunk in chunks:
            seen.append(chunk)
    return seen


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def test_ok_call_recorded(autojump_clock: MockClock) -> None:
    _, backend, recorder, metrics = intercepted(
        Reply(tokens=4, headers_delay=1, first_delay=2, interval=0.5))
    await consume(backend, run_id="run-1")
    [row] = recorder.rows
    assert row.outcome is LLMCallOutcome.ok
    assert row.error is None
    assert (row.backend, row.model, row.run_id) == ("llamacpp", "sim-model", "run-1")
    assert row.queue_wait == 0
    assert row.ttft == 3
    assert row.duration == 4.5
    assert (row.prompt_tokens, row.completion_tokens, row.tokens_estimated) == (3, 4, False)
    assert sample(metrics, "service_llm_calls_total", backend="llamacpp", outcome="ok") == 1
    assert sample(metrics, "service_llm_tokens_total", backend="llamacpp", kind="completion") == 4
    assert sample(metrics, "service_llm_ttft_seconds_sum", backend="llamacpp") == 3


async def test_error_call_recorded(autojump_clock: MockClock) -> None:
    _, backend, recorder, metrics = intercepted(Reply(tokens=5, error_after=2, error="oom"))
    with pytest.raises(BackendResponseError):
        await consume(backend)
    [row] = recorder.rows
    assert row.outcome is LLMCallOutcome.error
    assert "oom" in (row.error or "")
    assert row.completion_tokens == 2
    assert row.tokens_estimated
    assert sample(metrics, "service_llm_calls_total", backend="llamacpp", outcome="error") == 1


async def test_timeout_recorded(autojump_clock: MockClock) -> None:
    _, backend, recorder, _ = intercepted(Reply(first_delay=100))
    with pytest.raises(FirstChunkTimeout):
        await consume(backend)
    [row] = recorder.rows
    assert row.outcome is LLMCallOutcome.timed_out
    assert row.duration == BUDGETS.first_chunk
    assert row.ttft is None
    assert row.completion_tokens is None


async def test_cancelled_call_recorded_even_with_a_slow_store(autojump_clock: MockClock) -> None:
    sim, backend, recorder, _ = intercepted(Reply(tokens=10, interval=1), delay=2)
    seen: list[ChatChunk] = []
    with trio.move_on_after(3.5):
        await consume(backend, seen)
    assert len(seen) == 4  # at 0, 1, 2, 3
    [row] = recorder.rows  # written under a shield although the caller was cancelled
    assert row.outcome is LLMCallOutcome.cancelled
    # What happened, not trio's Cancelled text naming an internal task (found in review).
    assert row.error == "cancelled (the run was cancelled, timed out or shut down)"
    assert row.completion_tokens == 4
    assert row.tokens_estimated
    assert row.duration == 3.5
    assert sim.streams[0].client_gone


async def test_stuck_store_is_bounded(autojump_clock: MockClock) -> None:
    _, backend, recorder, metrics = intercepted(Reply(tokens=2), delay=1000)
    start = trio.current_time()
    await consume(backend)
    assert trio.current_time() == start + backend.record_timeout
    assert recorder.rows == []
    assert sample(metrics, "service_llm_calls_total", backend="llamacpp", outcome="ok") == 1


async def test_a_call_cut_by_its_runs_deadline_is_recorded_timed_out(
    autojump_clock: MockClock,
) -> None:
    # Found by the secrets-and-metrics review: a call cut by the run's deadline was recorded
    # and counted "cancelled", as a client's cancel is; the run itself is timed_out.
    _, backend, recorder, metrics = intercepted(Reply(tokens=50, interval=1.0))
    deadline = trio.current_time() + 5
    with trio.move_on_at(deadline):
        await consume(backend, deadline=deadline)
    [row] = recorder.rows
    assert (row.outcome, row.error) == (LLMCallOutcome.timed_out,
                                        "timed out (the run's deadline passed)")
    assert sample(metrics, "service_llm_calls_total", backend="llamacpp",
                  outcome="timed_out") == 1
    # A cancel before the deadline is still a cancel.
    with trio.move_on_after(2):
        await consume(backend, deadline=trio.current_time() + 5)
    assert recorder.rows[-1].outcome is LLMCallOutcome.cancelled


async def test_leaving_early_is_cancelled(autojump_clock: MockClock) -> None:
    _, backend, recorder, _ = intercepted(Reply(tokens=10))
    async with backend.stream(req()) as chunks:
        async for _ in chunks:
            break
    [row] = recorder.rows
    assert row.outcome is LLMCallOutcome.cancelled
    assert row.completion_tokens == 1


async def test_limiter_queue_wait(autojump_clock: MockClock) -> None:
    _, backend, recorder, metrics = intercepted(Reply(tokens=3, interval=2), concurrency=1)
    async with trio.open_nursery() as nursery:
        for run in ("first", "second"):
            nursery.start_soon(lambda r=run: consume(backend, run_id=r))
            await trio.testing.wait_all_tasks_blocked()
    rows = {r.run_id: r for r in recorder.rows}
    assert rows["first"].queue_wait == 0
    assert rows["first"].duration == 4
    assert rows["second"].queue_wait == 4
    assert rows["second"].duration == 4
    assert sample(metrics, "service_llm_queue_wait_seconds_count", backend="llamacpp") == 2


async def test_error_in_a_nursery_arrives_grouped(autojump_clock: MockClock) -> None:
    _, backend, recorder, _ = intercepted(Reply(status=500, error="kaput"))
    with pytest.RaisesGroup(pytest.RaisesExc(BackendResponseError, match="kaput")):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume, backend)  # the agent's call runs beside other work
            nursery.start_soon(trio.sleep_forever)
    assert recorder.rows[0].outcome is LLMCallOutcome.error


async def test_auto_over_interceptors_records_each_attempt(autojump_clock: MockClock) -> None:
    a, b = Simulator(default=Reply(status=503, error="busy")), Simulator(default=Reply(tokens=2))
    recorder, metrics = FakeRecorder(), Metrics()
    auto = AutoBackend([
        Interceptor(OllamaBackend("ollama", "http://a", mock_client(a), BUDGETS),
                    recorder, metrics),
        Interceptor(OpenAICompatBackend("llamacpp", "http://b", mock_client(b), BUDGETS),
                    recorder, metrics),
    ])
    await consume(auto, run_id="r")
    assert [(r.backend, r.outcome, r.run_id) for r in recorder.rows] == [
        ("ollama", LLMCallOutcome.error, "r"), ("llamacpp", LLMCallOutcome.ok, "r")]


async def test_interceptor_over_auto_records_the_serving_backend(autojump_clock: MockClock
                                                                 ) -> None:
    a, b = Simulator(default=Reply(die_after=0)), Simulator(default=Reply(tokens=2))
    recorder = FakeRecorder()
    auto = AutoBackend([OllamaBackend("ollama", "http://a", mock_client(a), BUDGETS),
                        OpenAICompatBackend("llamacpp", "http://b", mock_client(b), BUDGETS)])
    await consume(Interceptor(auto, recorder, Metrics()))
    [row] = recorder.rows
    assert row.backend == "llamacpp"
    assert row.outcome is LLMCallOutcome.ok


async def test_a_call_failing_before_its_first_chunk_records_the_default_model(
    autojump_clock: MockClock,
) -> None:
    # Found in review: with SERVICE_DEFAULT_MODEL set and no model named (a native run), a call
    # the backend refused showed model "" in /api/llm-calls.
    sim = Simulator(default=Reply(status=500))
    recorder = FakeRecorder()
    inner = OllamaBackend("ollama", "http://o", mock_client(sim), BUDGETS,
                          default_model="sim-model")
    backend = Interceptor(inner, recorder, Metrics())
    with pytest.raises(BackendResponseError):
        await consume(backend, model=None)
    [row] = recorder.rows
    assert (row.outcome, row.model) == (LLMCallOutcome.error, "sim-model")


@pytest.mark.parametrize("kind", ["llamacpp", "ollama"])
async def test_a_call_cut_before_its_first_chunk_records_the_model_the_backend_chose(
    autojump_clock: MockClock, kind: str,
) -> None:
    # Found in review: with no model named and no SERVICE_DEFAULT_MODEL, the adapter takes
    # the first model its server lists; a call cancelled (or failed) before its first chunk
    # was recorded with model "" although the request named the listed model upstream.
    sim = Simulator(default=Reply(headers_delay=60))
    recorder = FakeRecorder()
    inner = (OpenAICompatBackend(kind, "http://s", mock_client(sim), BUDGETS) if kind == "llamacpp"
             else OllamaBackend(kind, "http://s", mock_client(sim), BUDGETS))
    backend = Interceptor(inner, recorder, Metrics())
    with trio.move_on_after(5):
        await consume(backend, model=None)
    [row] = recorder.rows
    assert (row.outcome, row.model) == (LLMCallOutcome.cancelled, "sim-model")
    # and refused before its first chunk, too
    sim.default = Reply(status=500)
    with pytest.raises(BackendResponseError):
        await consume(backend, model=None)
    assert (recorder.rows[1].outcome, recorder.rows[1].model) == (LLMCallOutcome.error,
                                                                    "sim-model")


async def test_a_queued_call_is_told_its_place_and_waits_at_most_the_queue_timeout(
    autojump_clock: MockClock,
) -> None:
    # One slot, held 10 s; three calls queue behind it, the queue timeout is 7 s.
    sim = Simulator(default=Reply(tokens=5, interval=2.5))
    inner = OpenAICompatBackend("llamacpp", "http://sim", mock_client(sim), BUDGETS)
    recorder = FakeRecorder()
    backend = Interceptor(inner, recorder, Metrics(), concurrency=1, queue_timeout=7,
                          queue_report_every=1)
    told: dict[str, list[tuple[float, int]]] = {}
    failed: dict[str, tuple[float, BaseException]] = {}

    async def call(run: str) -> None:
        def queued(place: int) -> None:
            told.setdefault(run, []).append((trio.current_time(), place))

        try:
            async with backend.stream(req(run_id=run, on_queued=queued)) as chunks:
                async for _ in chunks:
                    pass
        except BackendBusy as exc:
            failed[run] = (trio.current_time(), exc)

    async with trio.open_nursery() as nursery:
        for run in ("holder", "a", "b"):
            nursery.start_soon(call, run)
            await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(3)
        nursery.start_soon(call, "late")  # queued behind a and b, at 3 s
        await trio.testing.wait_all_tasks_blocked()
    assert "holder" not in told  # a free slot: never queued
    assert told["a"] == [(0, 1)]
    assert told["b"] == [(0, 2)]
    assert told["late"] == [(3, 3), (8, 1)]  # a and b gave up at 7: next, told at its tick
    # Nobody got the slot within 7 s: each waited exactly that long, then 503 with Retry-After.
    assert {run: at for run, (at, _) in failed.items()} == {"a": 7, "b": 7, "late": 10}
    assert all(exc.status == 503 and exc.retry_after == 5 for _, exc in failed.values())
    assert len(sim.streams) == 1  # the upstream never saw the ones that gave up
    rows = {r.run_id: r for r in recorder.rows}
    assert rows["late"].queue_wait == 7
    assert rows["late"].outcome is LLMCallOutcome.error


def test_long_queue_waits_and_store_writes_have_buckets_of_their_own() -> None:
    """A wait for a backend slot lasts up to SERVICE_BACKEND_QUEUE_TIMEOUT (30 s), a store
    write up to its budget (10 s): their histograms stopped at 5 s, so a 7 s and a 29 s wait
    were both "+Inf" and an operator could not tell a slow queue from a stuck one."""
    from service.metrics import Metrics

    m = Metrics()
    m.llm_queue_wait.labels(backend="b").observe(7)
    m.llm_queue_wait.labels(backend="b").observe(29)
    m.store_latency.labels("append_run_events").observe(9)
    text = m.render().decode()
    assert 'service_llm_queue_wait_seconds_bucket{backend="b",le="10.0"} 1.0' in text
    assert 'service_llm_queue_wait_seconds_bucket{backend="b",le="30.0"} 2.0' in text
    assert 'service_store_seconds_bucket{le="10.0",op="append_run_events"} 1.0' in text
