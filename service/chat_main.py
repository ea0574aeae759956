"""``python -m service chat``'s command line: its options, one question or an interactive chat,
and the exit status (the client itself, its turns and their faults: ``service/chat.py``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import httpx
from rich.console import Console

from .chat import _QUITS, EXIT_INTERRUPTED, EXIT_OUTPUT_CLOSED, Options, _run_turn
from .chat_render import Renderer, _safe

__all__ = ["main"]


def _one_shot(opts: Options, renderer: Renderer, message: str) -> int:
    _, turn, status = _run_turn(opts, renderer, opts.conversation, message)
    if turn is None:
        return status
    if turn.status == "succeeded":
        return 0
    return EXIT_INTERRUPTED if turn.cancelling else 1


def _interactive(opts: Options, renderer: Renderer) -> int:
    conversation = opts.conversation
    renderer.note(f"chatting with {opts.url} (Ctrl-C stops an answer, Ctrl-D quits)")
    failed = False  # a turn failed: a script feeding the chat is told by the exit status
    while True:
        try:
            line = renderer.out.input("[bold]you>[/bold] ")
        except EOFError:  # Ctrl-D: the chat is over
            renderer.out.print()
            return 1 if failed and not sys.stdin.isatty() else 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt: interrupted, as a shell says it
            renderer.out.print()
            return EXIT_INTERRUPTED
        if not line.strip():
            continue
        conversation, turn, status = _run_turn(opts, renderer, conversation, line)
        if turn is None and status in (EXIT_INTERRUPTED, EXIT_OUTPUT_CLOSED,
                                       *(128 + q for q in _QUITS)):
            return status
        # A failed request is reported and the chat goes on (the service may come back).
        if status or (turn is not None and turn.status != "succeeded" and not turn.cancelling):
            failed = True


def _bad(why: str) -> NoReturn:
    print(_safe(f"service chat: {why}"), file=sys.stderr)
    raise SystemExit(2)


def _parse(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(prog="python -m service chat",
                                     description="a terminal client of a running service")
    parser.add_argument("message", nargs="?",
                        help="ask this, print the answer and exit (else an interactive chat)")
    parser.add_argument("--url", default=os.environ.get("SERVICE_CHAT_URL",
                                                        "http://127.0.0.1:8000"),
                        help="the service's base URL (default: $SERVICE_CHAT_URL or "
                             "http://127.0.0.1:8000)")
    parser.add_argument("--key", default=os.environ.get("SERVICE_CHAT_KEY"),
                        help="one of SERVICE_API_KEYS (default: $SERVICE_CHAT_KEY; the "
                             "variable keeps it out of the process list)")
    parser.add_argument("--agent", choices=("chat", "react", "plan_execute", "auto"))
    parser.add_argument("--model")
    parser.add_argument("--conversation", metavar="ID",
                        help="go on with this conversation (default: a new one)")
    args = parser.parse_args(argv)
    # One line each, as a failed turn's (not a traceback from httpx at the first request).
    try:
        url = httpx.URL(args.url)
    except httpx.InvalidURL as exc:
        _bad(f"--url {args.url!r}: {exc}")
    if url.scheme not in ("http", "https") or not url.host:
        _bad(f"--url {args.url!r}: not an http(s) URL")
    if args.key is not None and not (args.key.isascii() and args.key.isprintable()):
        # An HTTP header takes ASCII only (a curly quote pasted with the key, say).
        _bad("--key (or $SERVICE_CHAT_KEY): not printable ASCII, so not a key")
    return Options(url=args.url.rstrip("/"), key=args.key, agent=args.agent, model=args.model,
                   conversation=args.conversation, message=args.message)


def main(argv: Sequence[str] | None = None) -> int:
    opts = _parse(sys.argv[2:] if argv is None else argv)
    # A terminal in a legacy locale (Latin-1) cannot show every character of an answer:
    # shown as "?" there, not a UnicodeEncodeError that cut the answer with a traceback.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and stream.errors == "strict":
            stream.reconfigure(errors="replace")
    renderer = Renderer(Console(), Console(stderr=True))
    if opts.message is not None:
        return _one_shot(opts, renderer, opts.message)
    return _interactive(opts, renderer)
