"""``python -m service.sim --port 11434``: run the simulator standalone (e.g. for benchmarks)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from functools import partial

import trio

from .app import Simulator
from .scenario import Reply
from .server import serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m service.sim", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--model", action="append", dest="models",
                        help="a model to serve (repeatable; default: sim-model)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per answer")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between tokens")
    parser.add_argument("--first-delay", type=float, default=0.0,
                        help="seconds before the first token")
    parser.add_argument("--loading-probes", type=int, default=0,
                        help="answer /health 503 'Loading model' this many times first")
    parser.add_argument("--any-model", action="store_true",
                        help="accept any model name instead of answering 404")
    args = parser.parse_args(argv)
    sim = Simulator(
        tuple(args.models or ("sim-model",)),
        default=Reply(tokens=args.tokens, interval=args.interval, first_delay=args.first_delay),
        strict_models=not args.any_model,
    )
    sim.set_loading(args.loading_probes)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(partial(serve, sim, args.host, args.port))
            print(f"simulator listening on http://{args.host}:{port}", file=sys.stderr, flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(run)


if __name__ == "__main__":
    main()
