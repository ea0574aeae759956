"""Prometheus metrics of the service, on one registry (served at ``/metrics``)."""

from __future__ import annotations

import os
from collections.abc import Callable

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["METRICS", "Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
GAUGES_EVERY = 1.0  # seconds between a worker's refreshes of its live gauges (--workers)
# Up to a minute too: a wait for a backend slot lasts up to SERVICE_BACKEND_QUEUE_TIMEOUT (30 s)
# and a store write up to its budget (10 s); past 5 s all of them fell in +Inf.
_FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                 10, 30, 60)


class Metrics:
    """All metrics, created on a private registry so tests can build their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "service_http_requests", "HTTP requests by method, route and status",
            ["method", "route", "status"], registry=r,
        )
        self.runs = Counter("service_runs", "Finished runs by status", ["status"], registry=r)
        # With several workers (--workers), the sum over the live ones.
        self.runs_in_flight = Gauge("service_runs_in_flight", "Runs in flight", registry=r,
                                    multiprocess_mode="livesum")
        self.llm_calls = Counter(
            "service_llm_calls", "LLM calls by backend and outcome", ["backend", "outcome"],
            registry=r,
        )
        self.history_shortened = Counter(
            "service_history_shortened",
            "LLM calls made again with a stored conversation's oldest turns left out (over the "
            "model's context, or leaving the answer no room)", registry=r,
        )
        self.llm_latency = Histogram(
            "service_llm_call_seconds", "Whole LLM call duration", ["backend"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.llm_ttft = Histogram(
            "service_llm_ttft_seconds", "LLM time to first token", ["backend"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.llm_queue_wait = Histogram(
            "service_llm_queue_wait_seconds", "Wait for the backend's concurrency limiter",
            ["backend"], buckets=_FAST_BUCKETS, registry=r,
        )
        self.llm_tokens = Counter(
            "service_llm_tokens", "Tokens by backend and kind (prompt/completion)",
            ["backend", "kind"], registry=r,
        )
        self.tool_calls = Counter(
            "service_tool_calls", "Tool calls by tool and outcome", ["tool", "outcome"], registry=r,
        )
        # Per backend server (a fleet router's members), set before each render.
        self.backend_in_flight = Gauge(
            "service_backend_in_flight", "LLM calls open on a backend server", ["backend"],
            registry=r, multiprocess_mode="livesum",
        )
        self.backend_queued = Gauge(
            "service_backend_queued",
            "LLM calls waiting for one of a backend server's slots (SERVICE_BACKEND_CONCURRENCY)",
            ["backend"], registry=r, multiprocess_mode="livesum",
        )
        self.backend_up = Gauge(
            "service_backend_up", "1: calls are routed to it; 0: cooling down or not ready",
            ["backend"], registry=r, multiprocess_mode="livemax",
        )
        self.backend_cooldown = Gauge(
            "service_backend_cooldown_seconds", "Seconds until calls are routed to it again",
            ["backend"], registry=r, multiprocess_mode="livemax",
        )
        self.backend_models = Gauge(
            "service_backend_model",
            "A model a backend server serves: 1 available, 2 loaded, 0 no longer listed",
            ["backend", "model"], registry=r, multiprocess_mode="livemax",
        )
        # Run before rendering: whoever owns a live value sets its gauges here.
        self.collectors: list[Callable[[], None]] = []
        self.store_latency = Histogram(
            "service_store_seconds", "Store operation latency", ["op"],
            buckets=_FAST_BUCKETS, registry=r,
        )

    def collect(self) -> None:
        """Set the gauges whose owners keep live values (the fleet's up, cool-down, models)."""
        for collect in list(self.collectors):
            collect()

    # Only ever started with nursery.start_soon by the app's lifespan, which owns it.
    async def keep_gauges_fresh(self, every: float = GAUGES_EVERY) -> None:
        """With several workers, each keeps its gauges fresh: a worker's file is read by
        whichever worker renders ``/metrics``, and a value set only when that worker rendered
        went stale (a backend shown up that every worker had in cool-down, a cool-down that
        had ended)."""
        while True:
            self.collect()
            await trio.sleep(every)

    def render(self) -> bytes:
        """The text exposition; with several workers (``--workers``: each writes its values to
        ``PROMETHEUS_MULTIPROC_DIR``), every worker's, summed."""
        self.collect()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


METRICS = Metrics()
