"""``python -m service.bench.instances --db postgresql://...``: two service processes sharing
one PostgreSQL database (issue 14's cross-instance bars).

* **follow**: N runs stream on instance A while a subscriber follows each on instance B
  (``GET /api/runs/{id}/events``); for every token, the delay between A's own client seeing it
  (A publishes after commit) and B's subscriber seeing it: what reaching another instance adds.
* **cancel**: runs on A cancelled through B; the time from the cancel request until A's client
  gets the run's end (``run.finished`` cancelled; A closes the upstream stream as it cancels).

Simulator and both services are processes of their own on loopback; bounded, stops by itself.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from .procs import raise_fd_limit, start_service, start_simulator
from .stats import summary_ms

__all__ = ["main"]


async def _stream_on(http: httpx.AsyncClient, seen: dict[int, float], run_ids: list[str],
                     ended: dict[str, float], content: str = "go") -> None:
    """Start a run on ``http``'s instance and note when each event arrives."""
    conv = (await http.post("/api/conversations", json={})).json()["id"]
    body = {"content": content, "stream": True, "on_disconnect": "continue"}
    buf = ""
    async with http.stream("POST", f"/api/conversations/{conv}/messages", json=body) as r:
        async for chunk in r.aiter_text():
            now = time.perf_counter()
            buf += chunk
            while "\n\n" in buf:
                frame, buf = buf.split("\n\n", 1)
                fields = dict(line.split(": ", 1) for line in frame.splitlines()
                              if ": " in line and not line.startswith(":"))
                if "id" not in fields:
                    continue
                seen[int(fields["id"])] = now
                if fields.get("event") == "run.started":
                    run_ids.append(json.loads(fields["data"])["run_id"])
                elif fields.get("event") == "run.finished":
                    ended[run_ids[-1] if run_ids else ""] = now


async def _follow_on(http: httpx.AsyncClient, run_id: str, seen: dict[int, float]) -> None:
    async with http.stream("GET", f"/api/runs/{run_id}/events") as r:
        async for chunk in r.aiter_text():
            now = time.perf_counter()
            for frame in chunk.split("\n\n"):
                for line in frame.splitlines():
                    if line.startswith("id: "):
                        seen[int(line[4:])] = now


async def follow(a: str, b: str, runs: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=2 * runs + 10)
    delays: list[float] = []
    async with (httpx.AsyncClient(base_url=a, timeout=60, limits=limits) as ha,
                httpx.AsyncClient(base_url=b, timeout=60, limits=limits) as hb):

        async def one() -> None:
            on_a: dict[int, float] = {}
            on_b: dict[int, float] = {}
            ids: list[str] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stream_on, ha, on_a, ids, {})
                with trio.fail_after(30):
                    while not ids:  # noqa: ASYNC110 (the stream's first event)
                        await trio.sleep(0.005)
                nursery.start_soon(_follow_on, hb, ids[0], on_b)
            # Events B saw live (its backlog read at the start is not what is measured).
            first_live = min(on_b, default=0) + 3
            delays.extend(on_b[s] - on_a[s] for s in on_b if s in on_a and s >= first_live)

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for _ in range(runs):
                    nursery.start_soon(one)
                    await trio.sleep(0.01)
    return {"runs": runs, **summary_ms(delays)}


async def cancel(a: str, b: str, sim: str, runs: int) -> dict[str, Any]:
    """Runs on A cancelled through B: until A's upstream stream is closed (the simulator's
    record, on the shared monotonic clock), and until A's client has the run's end."""
    waits: list[float] = []
    asked: dict[str, float] = {}
    async with (httpx.AsyncClient(base_url=a, timeout=60) as ha,
                httpx.AsyncClient(base_url=b, timeout=60) as hb,
                httpx.AsyncClient(base_url=sim, timeout=60) as hs):
        since = (await hs.get("/sim/streams?since=0")).json()["count"]

        async def one(i: int) -> None:
            on_a: dict[int, float] = {}
            ids: list[str] = []
            ended: dict[str, float] = {}
            tag = f"cancel-{i}"
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stream_on, ha, on_a, ids, ended, tag)
                with trio.fail_after(30):
                    while len(on_a) < 3:  # noqa: ASYNC110 (a few tokens in)
                        await trio.sleep(0.005)
                asked[tag] = time.perf_counter()
                await hb.post(f"/api/runs/{ids[0]}/cancel")
            waits.append(ended[ids[0]] - asked[tag])

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for i in range(runs):
                    nursery.start_soon(one, i)
                    await trio.sleep(0.02)
        records = (await hs.get(f"/sim/streams?since={since}")).json()["records"]
    closed = [r["client_gone_at"] - asked[r["tag"]] for r in records
              if r["tag"] in asked and r["client_gone_at"] is not None]
    return {"runs": runs, "upstream_closed": summary_ms(closed), "end_seen_on_a": summary_ms(waits)}


async def run(db: str, runs: int) -> dict[str, Any]:
    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="bench-instances-") as tmp:
        work = Path(tmp)
        sim = await start_simulator(work)
        a = b = None
        try:
            a = await start_service(work, sim.port, db=db, name="a")
            b = await start_service(work, sim.port, db=db, name="b")
            urls = f"http://127.0.0.1:{a.port}", f"http://127.0.0.1:{b.port}"
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{sim.port}") as control:
                # 20 tokens/s a run: 2,000 tokens/s at 100 runs, as the relay scenario.
                await control.post("/sim/config", json={"tokens": 60, "interval": 0.05})
                followed = await follow(*urls, runs)
                await control.post("/sim/config", json={"tokens": 2000, "interval": 0.05})
                cancelled = await cancel(*urls, f"http://127.0.0.1:{sim.port}", runs)
            return {"follow": followed, "cancel": cancelled}
        finally:
            for proc in (b, a, sim):
                if proc is not None:
                    proc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m service.bench.instances")
    parser.add_argument("--db", required=True, help="a PostgreSQL URL both instances share")
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    print(json.dumps(trio.run(run, args.db, args.runs), indent=2))


if __name__ == "__main__":
    main()
