"""What every scenario shares: the two processes, the three targets, and CPU accounting.

Targets: ``direct`` (the simulator's OpenAI stream, the baseline), ``openai`` (the service's
``/v1/chat/completions`` stream) and ``native`` (``POST /api/conversations/{id}/messages`` with
``stream: true``; the conversation is created first and not timed).
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import os
import time
from dataclasses import dataclass
from typing import Any

import trio

from .client import StreamResult, Target, get_json, get_text, post_json, run_stream
from .procs import Proc, cpu_seconds, machine_busy

__all__ = ["Bench", "CpuWindow"]

_HOST = "127.0.0.1"


@dataclass
class CpuWindow:
    """CPU seconds of the service, the simulator and the load client over one window (and of
    the bench's other processes, such as the PostgreSQL server: ``Bench.others``)."""

    bench: Bench
    server: Proc  # the process behind the target being measured (the service, by default)
    wall: float = 0.0
    service: float = 0.0
    simulator: float = 0.0
    client: float = 0.0
    machine: float = 0.0  # the whole machine's busy share of all its cores, 0..1
    others: dict[str, float] = dataclasses.field(default_factory=dict)
    service_processes: list[float] = dataclasses.field(default_factory=list)  # each, busiest first

    def __enter__(self) -> CpuWindow:
        self._t0 = time.perf_counter()
        self._c0 = cpu_seconds()
        self._m0 = machine_busy()
        self.server.mark()
        self.bench.sim.mark()
        for proc in self.bench.others.values():
            proc.mark()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._t0
        self.client = cpu_seconds() - self._c0
        busy, total = machine_busy()
        # Every process of the machine, ours and any other's: a share of all its cores.
        self.machine = (busy - self._m0[0]) / max(total - self._m0[1], 1e-9)
        served = self.server.since_mark()
        self.service = served.cpu
        self.service_processes = sorted(served.per_pid.values(), reverse=True)
        self.simulator = self.bench.sim.since_mark().cpu
        self.others = {name: proc.since_mark().cpu for name, proc in self.bench.others.items()}

    @property
    def foreign(self) -> float:
        """CPU seconds the machine spent on processes other than the benchmark's."""
        ours = self.service + self.simulator + self.client + sum(self.others.values())
        return max(0.0, self.machine * (os.cpu_count() or 1) * self.wall - ours)

    def as_dict(self) -> dict[str, Any]:
        w = self.wall or 1.0
        out: dict[str, Any] = {
            "wall_s": round(self.wall, 2),
            "service_cpu_s": round(self.service, 2),
            "simulator_cpu_s": round(self.simulator, 2),
            "client_cpu_s": round(self.client, 2),
            "service_cpu_pct": round(100 * self.service / w, 1),
            "simulator_cpu_pct": round(100 * self.simulator / w, 1),
            "client_cpu_pct": round(100 * self.client / w, 1),
            "machine_busy_pct": round(100 * self.machine, 1),
            # CPU of processes that are not the benchmark's (another user's work on the host).
            "foreign_cpu_pct": round(100 * self.foreign / w, 1)}
        for name, cpu in self.others.items():
            out[f"{name}_cpu_s"] = round(cpu, 2)
            out[f"{name}_cpu_pct"] = round(100 * cpu / w, 1)
        if len(self.service_processes) > 1:  # --workers N: each busy process (the workers)
            out["service_process_cpu_pct"] = [round(100 * c / w, 1)
                                              for c in self.service_processes if c >= 0.01]
        return out


class Bench:
    def __init__(self, sim: Proc, service: Proc) -> None:
        self.sim = sim
        self.service = service
        self._tags = itertools.count()
        self.servers: dict[str, Proc] = {}  # a target served by another process than the service
        self.others: dict[str, Proc] = {}  # more processes to account for (e.g. "postgres")
        marker = b'"tok'  # the simulator's tokens are "tok0 ", "tok1 ", ...: a JSON string start
        self.targets = {
            "direct": Target("direct", _HOST, sim.port, "/v1/chat/completions", marker),
            "openai": Target("openai", _HOST, service.port, "/v1/chat/completions", marker),
            "native": Target("native", _HOST, service.port, "", b"event: token"),
        }

    def __repr__(self) -> str:
        return f"<Bench sim={self.sim!r} service={self.service!r}>"

    def cpu(self, target: str | None = None) -> CpuWindow:
        return CpuWindow(self, self.servers.get(target or "", self.service))

    async def configure(self, *, tokens: int, interval: float, first_delay: float = 0.0,
                        record_sends: bool = False) -> None:
        """Set the simulator's default reply (every stream of the next scenario).

        Both instruments (the simulator and this load client) run with their garbage collectors
        off during a scenario and collect here, between scenarios, so that their own pauses are
        not measured as the service's latency.
        """
        await self.wait_idle()
        gc.collect()
        status, _ = await post_json(_HOST, self.sim.port, "/sim/config", {
            "tokens": tokens, "interval": interval, "first_delay": first_delay,
            "record_sends": record_sends})
        if status != 200:
            raise RuntimeError(f"simulator config failed: HTTP {status}")

    async def wait_idle(self, limit: float = 60.0) -> None:
        """Wait until the service has no run in flight (its ``/metrics``): a scenario must not
        start while the last one's runs are still being cancelled and written (after the
        capacity ramp: thousands of final writes), or its first requests measure that."""
        with trio.move_on_after(limit):
            while True:
                status, text = await get_text(_HOST, self.service.port, "/metrics")
                if status == 200 and "\nservice_runs_in_flight 0.0\n" in text:
                    return
                await trio.sleep(0.1)

    async def sim_records(self, since: int = 0, sends_after: float | None = None
                          ) -> dict[str, Any]:
        query = f"since={since}" + (f"&sends_after={sends_after}" if sends_after else "")
        status, data = await get_json(_HOST, self.sim.port, f"/sim/streams?{query}")
        if status != 200:
            raise RuntimeError(f"simulator records failed: HTTP {status}")
        return data  # type: ignore[no-any-return]

    async def sim_marker(self) -> int:
        return int((await self.sim_records(1 << 62))["count"])

    def new_tag(self, prefix: str) -> str:
        return f"{prefix}-{next(self._tags)}"

    async def prepare(self, name: str, tag: str) -> tuple[Target, dict[str, Any]]:
        """The target and request body of one stream (for ``native``, creates its conversation)."""
        target = self.targets[name]
        if name != "native":
            return target, {"model": "bench", "stream": True,
                            "messages": [{"role": "user", "content": tag}]}
        status, conv = await post_json(_HOST, self.service.port, "/api/conversations",
                                       {"model": "bench"})
        if status != 201:
            raise RuntimeError(f"creating a conversation failed: HTTP {status}")
        path = f"/api/conversations/{conv['id']}/messages"
        return dataclasses.replace(target, path=path), {"content": tag, "stream": True}

    async def stream(self, name: str, tag: str, *, limit: float, record: bool = True,
                     close_at: float | None = None,
                     result: StreamResult | None = None) -> StreamResult:
        """One stream to ``name``, given up (as an error) after ``limit`` seconds."""
        res = result or StreamResult(name)
        with trio.move_on_after(limit) as scope:
            try:
                target, body = await self.prepare(name, tag)
            except (OSError, RuntimeError, ValueError) as exc:
                res.error = f"prepare: {exc}"
                res.settled.set()
                return res
            await run_stream(target, body, record=record, close_at=close_at, result=res)
        if scope.cancelled_caught:
            res.error = res.error or f"no end within {limit}s"
        res.settled.set()
        return res

    async def wait_upstreams_closed(self, since: int) -> None:
        """Wait until the simulator is done with every stream from ``since`` on (poll it)."""
        while True:
            recs = (await self.sim_records(since))["records"]
            if all(r["finished"] is not None for r in recs):
                return
            await trio.sleep(0.25)
