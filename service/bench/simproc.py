"""The simulator as the benchmark's upstream: a separate process with a small control surface.

    python -m service.bench.simproc [--port 0]     # prints "PORT <n>" on stdout once listening

On top of :class:`service.sim.Simulator` (everything else is unchanged):

* ``POST /sim/config`` with a JSON :class:`~service.sim.Reply`: the default reply from now on;
* ``GET /sim/streams?since=N[&sends_after=T]``: the stream records with ``seq >= N`` (compact),
  times converted to ``time.perf_counter()`` so they compare with the load client's clock
  (CLOCK_MONOTONIC is shared between processes; trio's clock adds a per-process offset); with
  ``record_sends`` configured, also each token's send time from ``T`` on;
* its garbage collector runs only between scenarios (on ``/sim/config``): the simulator is a
  measuring instrument (a stand-in for a C++ server), and its own collector pauses would be
  counted as the service's latency;
* plain streamed OpenAI replies (the default reply, no failures) are rendered lazily, step by
  step, so thousands of long streams cost no memory or CPU up front.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import json
import sys
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import trio

from ..sim import Reply, Simulator
from ..sim.scenario import Send, SimResponse, Sleep, Step, json_response
from ..sim.server import serve

__all__ = ["BenchSimulator", "main"]


def _tag(body: dict[str, Any]) -> str:
    """The last message's content: the load client puts its stream's tag there."""
    messages = body.get("messages") or []
    if messages and isinstance(messages[-1], dict):
        return str(messages[-1].get("content") or "")[:64]
    return ""


def _lazy_openai(reply: Reply, seq: int, model: str, usage: bool,
                 sends: list[float] | None) -> Iterator[Step]:
    """The same bytes as ``render_openai`` for a plain text reply, produced on demand."""
    created = int(time.time())
    head = f'{{"id": "chatcmpl-sim{seq}", "object": "chat.completion.chunk", "created": {created}'
    head += f', "model": {json.dumps(model)}, "system_fingerprint": "sim", "choices": '

    def event(delta: str, finish: str = "null") -> bytes:
        return (f'data: {head}[{{"index": 0, "delta": {delta}, "logprobs": null, '
                f'"finish_reason": {finish}}}]}}\n\n').encode()

    if reply.first_delay > 0:
        yield Sleep(reply.first_delay)
    for i in range(reply.tokens):
        if i and reply.interval > 0:
            yield Sleep(reply.interval)
        chunk = event(f'{{"content": "tok{i} "}}')
        if i == 0:
            chunk = event('{"role": "assistant", "content": null}') + chunk
        yield Send(chunk)
        if sends is not None:  # resumed right after the server wrote this token to the socket
            sends.append(trio.current_time())
    yield Send(event("{}", '"stop"'))
    if usage:
        n = reply.tokens
        yield Send((f'data: {head}[], "usage": {{"completion_tokens": {n}, "prompt_tokens": 1, '
                    f'"total_tokens": {n + 1}}}}}\n\n').encode())
    yield Send(b"data: [DONE]\n\n")


class BenchSimulator(Simulator):
    """A :class:`Simulator` with ``/sim/config`` and ``/sim/streams`` (see the module doc)."""

    record_sends = False  # keep each token's send time (``/sim/config`` "record_sends")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sends: dict[int, list[float]] = {}

    def route(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[SimResponse, Any]:
        bare, _, query = path.partition("?")
        if bare == "/sim/config" and method == "POST":
            data = json.loads(body or b"{}")
            gc.collect()  # between scenarios: never while one is being measured
            self.record_sends = bool(data.pop("record_sends", False))
            self.default = Reply(**data)
            return json_response(200, {"default": data}), None
        if bare == "/sim/streams" and method == "GET":
            args = dict(p.partition("=")[::2] for p in query.split("&") if p)
            after = float(args["sends_after"]) if "sends_after" in args else None
            return json_response(200, self._records(int(args.get("since", 0)), after)), None
        return super().route(method, path, headers, body)

    def _chat(self, openai: bool, payload: dict[str, Any], model: str | None,
              headers: dict[str, str], record: Any) -> SimResponse:
        reply = self.default
        if (openai and payload.get("stream") is True and not self.loading_probes
                and not self.scripted and "x-sim-scenario" not in headers
                and reply == Reply(tokens=reply.tokens, interval=reply.interval,
                                   first_delay=reply.first_delay)):
            record.reply = reply
            usage = bool((payload.get("stream_options") or {}).get("include_usage"))
            sends = self.sends.setdefault(record.seq, []) if self.record_sends else None
            return SimResponse(200, "text/event-stream",
                               body=_lazy_openai(reply, record.seq, str(model), usage, sends))  # type: ignore[arg-type]
        return super()._chat(openai, payload, model, headers, record)

    def _records(self, since: int, sends_after: float | None) -> dict[str, Any]:
        shift = time.perf_counter() - trio.current_time()

        def t(value: float | None) -> float | None:
            return None if value is None else value + shift

        records = []
        for r in self.streams[since:]:
            rec = {"seq": r.seq, "tag": _tag(r.body), "status": r.status,
                   "started": t(r.started_at), "first_chunk": t(r.first_chunk_at),
                   "finished": t(r.finished_at), "chunks": r.chunks_sent,
                   "completed": r.completed, "client_gone": r.client_gone,
                   "client_gone_at": t(r.client_gone_at)}
            if sends_after is not None and r.seq in self.sends:
                # Token k's send time for k >= sends_from (perf_counter clock).
                times = self.sends[r.seq]
                first = bisect.bisect_left(times, sends_after - shift)
                rec["sends_from"] = first
                rec["sends"] = [round(x + shift, 6) for x in times[first:]]
            records.append(rec)
        return {"count": len(self.streams), "records": records}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m service.bench.simproc", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    sim = BenchSimulator(("bench",), strict_models=False)
    gc.disable()  # collected on each /sim/config, between scenarios (see the module doc)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(partial(serve, sim, args.host, args.port))
            print(f"PORT {port}", flush=True)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
