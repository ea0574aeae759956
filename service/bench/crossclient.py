"""The cross-instance scenario's load client: a process of its own (several run side by side).

    python -m service.bench.crossclient follow|cancel --a PORT --b PORT --runs N --start-at T
        [--part I --parts K] [--gap S] [--cancel-after S --cancel-spread S]

Runs ``I, I+K, I+2K, ...`` of ``N`` (the runs are shared out over ``K`` processes), run ``j``
starting at ``T + j * gap`` (``T``: a ``time.perf_counter()`` value; CLOCK_MONOTONIC is shared
by every process of the machine, so all times here compare with the simulator's and the other
clients'). Prints one JSON object on stdout: the raw times, and this process's own CPU.

* ``follow``: a native run streamed on A (``on_disconnect: continue``); once its ``run.started``
  names the run, a subscriber on B (``GET /api/runs/{id}/events``). For each event both saw,
  B's arrival minus A's; only events A's client got after B's subscription answered count (the
  backlog B reads first is not what is measured).
* ``cancel``: a native run streamed on A, cancelled through B (``POST /api/runs/{id}/cancel``)
  at ``cancel_after`` plus a random share of ``cancel_spread`` seconds after the last run
  started; reports when each cancel was sent (by its tag, which the simulator records as the
  upstream request's last message) and when A's client saw the run's end.

Raw sockets and a minimal chunked/SSE reader, as the main load client (``client.py``): nothing
here should be what saturates.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import trio

from .client import post_json

__all__ = ["main"]

_HOST = "127.0.0.1"
OnFrame = Callable[[int, bytes, bytes, float], None]  # id, event, data, arrival


def _request(method: str, port: int, path: str, body: dict[str, Any] | None) -> bytes:
    data = json.dumps(body).encode() if body is not None else b""
    head = (f"{method} {path} HTTP/1.1\r\nHost: {_HOST}:{port}\r\n"
            "Accept: text/event-stream\r\nConnection: close\r\n")
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    return head.encode() + b"\r\n" + data


class _SseReader:
    """Incremental: HTTP head, chunked transfer coding, then SSE frames with an ``id:``."""

    def __init__(self, on_frame: OnFrame) -> None:
        self.on_frame = on_frame
        self.status = 0
        self.head_at = 0.0
        self.done = False
        self._raw = b""  # bytes not yet de-chunked
        self._body = b""  # de-chunked bytes not yet split into frames
        self._in_head = True

    def feed(self, data: bytes, now: float) -> None:
        if self.done:
            return  # the last chunk's trailer
        raw = self._raw + data
        if self._in_head:
            end = raw.find(b"\r\n\r\n")
            if end < 0:
                self._raw = raw
                return
            self.status = int(raw[9:12])
            self.head_at = now
            self._in_head = False
            raw = raw[end + 4:]
        body = self._body
        while True:
            eol = raw.find(b"\r\n")
            if eol < 0:
                break
            size = int(raw[:eol].split(b";")[0], 16)
            if size == 0:
                self.done = True
                raw = b""
                break
            if len(raw) < eol + 2 + size + 2:
                break
            body += raw[eol + 2:eol + 2 + size]
            raw = raw[eol + 2 + size + 2:]
        self._raw = raw
        if b"\n\n" in body:
            *frames, body = body.split(b"\n\n")
            for frame in frames:
                if not frame.startswith(b"id: "):
                    continue  # a comment (keep-alive)
                lines = frame.split(b"\n")
                event = data_ = b""
                for line in lines[1:]:
                    if line.startswith(b"event: "):
                        event = line[7:]
                    elif line.startswith(b"data: "):
                        data_ = line[6:]
                self.on_frame(int(lines[0][4:]), event, data_, now)
        self._body = body


async def _sse(port: int, method: str, path: str, body: dict[str, Any] | None,
               reader: _SseReader) -> None:
    stream = await trio.open_tcp_stream(_HOST, port)
    try:
        await stream.send_all(_request(method, port, path, body))
        while not reader.done:
            data = await stream.receive_some(65536)
            if not data:
                break
            reader.feed(data, time.perf_counter())
            if reader.status and reader.status != 200:
                raise RuntimeError(f"HTTP {reader.status} for {method} {path}")
    finally:
        stream.socket.close()


class _Run:
    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.run_id = ""
        self.started = trio.Event()
        self.tokens = 0
        self.a_seen: dict[int, float] = {}
        self.b_seen: dict[int, float] = {}
        self.token_seqs: list[int] = []  # the k-th token event's seq (the simulator's token k)
        self.finished_at: float | None = None

    def on_a(self, seq: int, event: bytes, data: bytes, now: float) -> None:
        self.a_seen[seq] = now
        if event == b"token":
            self.tokens += 1
            self.token_seqs.append(seq)
        elif event == b"run.started":
            self.run_id = json.loads(data)["run_id"]
            self.started.set()
        elif event == b"run.finished":
            self.finished_at = now

    def on_b(self, seq: int, event: bytes, data: bytes, now: float) -> None:
        self.b_seen[seq] = now


async def _follow_one(a: int, b: int, run: _Run, out: dict[str, Any]) -> None:
    status, conv = await post_json(_HOST, a, "/api/conversations", {})
    if status != 201:
        raise RuntimeError(f"creating a conversation: HTTP {status}")
    on_a, on_b = _SseReader(run.on_a), _SseReader(run.on_b)
    body = {"content": run.tag, "stream": True, "on_disconnect": "continue"}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_sse, a, "POST", f"/api/conversations/{conv['id']}/messages", body,
                           on_a)
        with trio.fail_after(30):
            await run.started.wait()
        nursery.start_soon(_sse, b, "GET", f"/api/runs/{run.run_id}/events", None, on_b)
    live = [run.b_seen[s] - t for s, t in run.a_seen.items()
            if s in run.b_seen and on_b.head_at and t > on_b.head_at]
    out["delays"] += live
    # Each event's arrival on A and on B (None: not live on B: B's backlog), and which of the
    # simulator's tokens it is (-1: not a token): set against the simulator's send time and
    # the event's commit time in the database, where the time goes.
    b_from = on_b.head_at or float("inf")
    token = {s: k for k, s in enumerate(run.token_seqs)}
    out["runs"][run.run_id] = {"tag": run.tag, "events": [
        [s, t, run.b_seen[s] if s in run.b_seen and t > b_from else None, token.get(s, -1)]
        for s, t in run.a_seen.items()]}
    out["missing_on_b"] += sum(s not in run.b_seen for s in run.a_seen)
    first, last = min(run.a_seen.values()), max(run.a_seen.values())
    out["spans"].append([first, last])


async def _cancel_one(a: int, b: int, run: _Run, cancel_at: float, out: dict[str, Any]) -> None:
    status, conv = await post_json(_HOST, a, "/api/conversations", {})
    if status != 201:
        raise RuntimeError(f"creating a conversation: HTTP {status}")
    on_a = _SseReader(run.on_a)
    body = {"content": run.tag, "stream": True, "on_disconnect": "continue"}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_sse, a, "POST", f"/api/conversations/{conv['id']}/messages", body,
                           on_a)
        with trio.fail_after(30):
            await run.started.wait()
        out["spans"].append([time.perf_counter(), cancel_at])
        await trio.sleep_until(trio.current_time() + max(0.0, cancel_at - time.perf_counter()))
        asked = time.perf_counter()
        status, _ = await post_json(_HOST, b, f"/api/runs/{run.run_id}/cancel", {})
        out["asked"][run.tag] = asked
        if status >= 300:
            out["cancel_errors"] += 1
    if run.finished_at is not None:
        out["end_seen"].append(run.finished_at - asked)


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"part": args.part, "delays": [], "runs": {}, "missing_on_b": 0,
                           "spans": [],
                           # perf_counter -> the wall clock (the database's commit times)
                           "wall_offset": time.time() - time.perf_counter(),
                           "asked": {}, "end_seen": [], "cancel_errors": 0, "errors": []}
    mine = list(range(args.part, args.runs, args.parts))
    last_start = args.start_at + (args.runs - 1) * args.gap
    rng = random.Random(args.part)

    async def one(j: int) -> None:
        await trio.sleep(max(0.0, args.start_at + j * args.gap - time.perf_counter()))
        run = _Run(f"x{args.part}-{j}-{os.getpid()}")
        try:
            if args.scenario == "follow":
                await _follow_one(args.a, args.b, run, out)
            else:
                at = last_start + args.cancel_after + rng.uniform(0, args.cancel_spread)
                await _cancel_one(args.a, args.b, run, at, out)
        except (OSError, RuntimeError, trio.TooSlowError, ValueError) as exc:
            out["errors"].append(f"{type(exc).__name__}: {exc}"[:200])

    cpu0 = os.times()
    t0 = time.perf_counter()
    with trio.move_on_after(args.limit):
        async with trio.open_nursery() as nursery:
            for j in mine:
                nursery.start_soon(one, j)
    cpu1 = os.times()
    out["cpu_s"] = round(cpu1.user + cpu1.system - cpu0.user - cpu0.system, 3)
    out["life_cpu_s"] = round(cpu1.user + cpu1.system, 3)  # with start-up and imports
    out["wall_s"] = round(time.perf_counter() - t0, 3)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m service.bench.crossclient", description=__doc__)
    p.add_argument("scenario", choices=["follow", "cancel"])
    p.add_argument("--a", type=int, required=True, help="instance A's port")
    p.add_argument("--b", type=int, required=True, help="instance B's port")
    p.add_argument("--runs", type=int, required=True)
    p.add_argument("--part", type=int, default=0)
    p.add_argument("--parts", type=int, default=1)
    p.add_argument("--start-at", type=float, default=0.0)
    p.add_argument("--gap", type=float, default=0.01)
    p.add_argument("--cancel-after", type=float, default=0.5)
    p.add_argument("--cancel-spread", type=float, default=2.0)
    p.add_argument("--limit", type=float, default=120.0)
    args = p.parse_args(argv)
    gc.disable()  # an instrument: no collector pauses counted as the services' latency
    json.dump(trio.run(_main, args), sys.stdout)


if __name__ == "__main__":
    main()
