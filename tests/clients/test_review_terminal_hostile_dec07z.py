"""Adversarial review of ``python -m service chat`` (2026-12-07): what a hostile model (prompt
injection) or a hostile or broken server/proxy at ``--url`` can make the user's terminal get.

Every test runs the real client as a subprocess (in a pipe, or on a pseudo-terminal where the
client renders live Markdown) against a hostile HTTP/SSE peer written here on 127.0.0.1:0.
A test that failed before its fix says so in its docstring ("Fixed (was: DEFECT: ...)")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from functools import partial
from typing import Any

import pytest
import trio

from ..servers import ROOT
from .test_chat_cli import GUARD, _env
from .test_terminal_turn_faults import _read_request

pytestmark = pytest.mark.slow

Handler = Callable[[bytes, trio.SocketStream], Awaitable[None]]

_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
         b"X-Run-Id: run_1\r\nConnection: close\r\n\r\n")
_ACCEPTED = (b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\n"
             b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")

# What a hostile model or server writes to take over the terminal: an OSC 52 clipboard write,
# an OSC 8 hyperlink, clear-screen, a DCS request, CSI as the C1 control U+009B, bidi overrides.
_PAYLOAD = ("A\x1b]52;c;aGFja2Vk\x07B\x1b]8;;http://evil.invalid/\x1b\\link\x1b]8;;\x1b\\"
            "C\x1b[2JD\x1bP1$qm\x1b\\E\u009b31mF\x9b2JG\u202eRLO\u202c\u2066I\u2069H")
_ENTITIES = ("ent &#x1b;[2J &#155;31m &#x202E;rlo&#x202C; &#8294;iso&#8297; "
             "[x](http://a.invalid/&#x1b;]52;c;eA==&#x07;) end")


def _sse(events: list[tuple[str, Any]], first: int = 1) -> bytes:
    return b"".join(
        f"id: {i}\nevent: {kind}\ndata: {json.dumps(data)}\n\n".encode()
        for i, (kind, data) in enumerate(events, first))


def _started() -> tuple[str, Any]:
    return ("run.started", {"run_id": "run_1", "conversation_id": "conv_1", "agent": "chat",
                            "model": "m"})


@asynccontextmanager
async def _peer(handler: Handler, log: list[bytes] | None = None) -> AsyncIterator[str]:
    """A loopback HTTP peer: each connection's request head is logged, then ``handler``."""
    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            head = await _read_request(stream)
            if log is not None:
                log.append(head)
            if b"/cancel " in head.split(b"\r\n", 1)[0]:
                await stream.send_all(_ACCEPTED)
                return
            with suppress(trio.BrokenResourceError):
                await handler(head, stream)

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        yield f"http://127.0.0.1:{listener.socket.getsockname()[1]}"
        nursery.cancel_scope.cancel()


def _argv(url: str, *extra: str, read_timeout: float | None = None) -> list[str]:
    args = ["hello", "--url", url, "--conversation", "conv_1", *extra]
    if read_timeout is None:
        return [sys.executable, "-m", "service", "chat", *args]
    # (The same client with a shorter READ_TIMEOUT: a test cannot wait its 60 s.)
    code = (f"import sys, service.chat as c; c.READ_TIMEOUT = {read_timeout!r}; "
            "from service.chat_main import main; sys.exit(main(sys.argv[1:]))")
    return [sys.executable, "-c", code, *args]


async def _piped(argv: list[str], guard: float = GUARD) -> trio.CompletedProcess[bytes]:
    with trio.fail_after(guard):
        return await trio.run_process(argv, cwd=ROOT, env=_env(), capture_stdout=True,
                                      capture_stderr=True, check=False)


async def _on_pty(argv: list[str]) -> tuple[int, bytes]:
    """The client on a pseudo-terminal (live Markdown): its exit status and every raw byte the
    terminal got (stdout and stderr)."""
    master, slave = os.openpty()
    try:
        process = await trio.lowlevel.open_process(argv, cwd=ROOT, env=_env(), stdin=slave,
                                                   stdout=slave, stderr=slave,
                                                   start_new_session=True)
    finally:
        os.close(slave)
    stream = trio.lowlevel.FdStream(master)
    raw = b""
    try:
        with trio.fail_after(GUARD):
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:  # EIO: the child closed its side
                    break
                if not chunk:
                    break
                raw += chunk
            status = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(5, shield=True):
                await process.wait()
        await stream.aclose()
    return status, raw


def _hostile_in(raw: bytes) -> list[str]:
    """The injected sequences that reached the terminal as controls."""
    text = raw.decode("utf-8", errors="surrogateescape")
    signs = {"OSC 52": "\x1b]52", "OSC 8 to evil": "\x1b]8;;http://evil", "OSC to a.invalid":
             "\x1b]52;c;eA", "clear screen": "\x1b[2J", "DCS": "\x1bP", "BEL": "\x07",
             "C1 CSI U+009B": "\u009b", "raw byte 0x9b": "\udc9b", "RLO": "\u202e",
             "PDF": "\u202c", "LRI": "\u2066", "PDI": "\u2069"}
    return [name for name, sign in signs.items() if sign in text]


def _everywhere(text: str) -> bytes:
    """A run whose every field the client shows carries ``text``."""
    return _sse([
        _started(),
        ("thought", {"text": text, "reasoning": True}),
        ("token", {"text": text[:3]}), ("token", {"text": text[3:]}),
        ("token", {"text": "\n\n" + _ENTITIES}),
        ("thought", {"text": "react " + text}),
        ("tool.call", {"name": text, "arguments": {text: text, "k": [text]}, "call_id": "c1"}),
        ("tool.result", {"output": text, "call_id": "c1"}),
        ("tool.result", {"error": text, "call_id": "c1"}),
        ("plan", {"steps": [{"id": 1, "task": text}]}),
        ("step.started", {"id": text, "task": text}),
        ("step.finished", {"id": 1, "error": text}),
        ("decision", {"agent": text, "method": text}),
        ("message", {"content": text + "\n\n" + _ENTITIES}),
        ("error", {"type": text, "message": text}),
        ("run.finished", {"status": "failed", "error": text, "content": text, "usage": {}}),
    ])


async def _everywhere_peer(head: bytes, stream: trio.SocketStream) -> None:
    await stream.send_all(_HEAD + _everywhere(_PAYLOAD))


async def test_injected_controls_do_not_reach_a_terminal_from_any_field() -> None:
    """OSC 52, OSC 8, CSI 2J, DCS, C1 CSI (U+009B and the raw byte 0x9B), bidi overrides and
    isolates, also as HTML character references in Markdown, in tokens, thinking, tool names,
    argument keys and values, results, plan tasks, step ids, the auto agent's decision, error
    frames and run.finished: none reaches a pseudo-terminal (live Markdown) as a control."""
    async with _peer(_everywhere_peer) as url:
        status, raw = await _on_pty(_argv(url))
    assert status == 1, raw
    assert b"Traceback" not in raw, raw.decode(errors="replace")
    assert b"link" in raw  # the text itself is shown
    assert b"RLO" in raw
    assert not _hostile_in(raw), (_hostile_in(raw), raw)


async def test_injected_controls_do_not_reach_a_pipe() -> None:
    """The same run with stdout and stderr piped (no live display): not one ESC, BEL, C1 or
    bidi control in either (rich writes no styles to a pipe)."""
    async with _peer(_everywhere_peer) as url:
        out = await _piped(_argv(url))
    assert out.returncode == 1, out.stderr
    for raw in (out.stdout, out.stderr):
        assert b"\x1b" not in raw, raw
        assert not _hostile_in(raw), raw


async def test_server_error_bodies_and_reason_phrases_are_made_safe() -> None:
    """A 4xx whose JSON error and obs-text reason phrase (raw 0x9B bytes) carry controls, on
    creating the conversation (no --conversation) and on the message's POST: one line on
    stderr, nothing hostile in it."""
    body = json.dumps({"error": {"type": "bad\x1b[2J", "message": _PAYLOAD}}).encode()

    async def refuse(head: bytes, stream: trio.SocketStream) -> None:
        await stream.send_all(
            b"HTTP/1.1 418 Tea\x9b2Jpot\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)

    async def refuse_plain(head: bytes, stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 503 Gone\x9b2J\xc2\x9b31m\r\nContent-Length: 0\r\n"
                              b"Connection: close\r\n\r\n")

    for handler in (refuse, refuse_plain):
        async with _peer(handler) as url:
            for argv in (_argv(url), [sys.executable, "-m", "service", "chat", "hi", "--url",
                                      url]):
                out = await _piped(argv)
                assert out.returncode == 1, out.stderr
                assert b"Traceback" not in out.stderr, out.stderr.decode(errors="replace")
                assert b"\x1b" not in out.stderr, out.stderr
                assert not _hostile_in(out.stderr), out.stderr


async def test_a_redirect_to_another_origin_is_not_followed_with_the_key() -> None:
    """A server (or a proxy) answering 307/302 to another origin (another port on loopback):
    the client must not follow it, above all not with ``Authorization: Bearer <key>``."""
    stolen: list[bytes] = []

    async def thief(head: bytes, stream: trio.SocketStream) -> None:
        await stream.send_all(_HEAD + _sse([_started(), ("message", {"content": "stolen"}),
                                            ("run.finished", {"status": "succeeded"})]))

    async with _peer(thief, stolen) as elsewhere:
        for code in (b"307 Temporary Redirect", b"302 Found", b"308 Permanent Redirect"):
            async def redirect(head: bytes, stream: trio.SocketStream, code: bytes = code) -> None:
                await stream.send_all(b"HTTP/1.1 " + code + b"\r\nLocation: " + elsewhere.encode()
                                      + b"/steal\r\nContent-Length: 0\r\n"
                                      b"Connection: close\r\n\r\n")

            async with _peer(redirect) as url:
                for argv in (_argv(url, "--key", "s3cret-key"),
                             [sys.executable, "-m", "service", "chat", "hi", "--url", url,
                              "--key", "s3cret-key"]):
                    out = await _piped(argv)
                    assert out.returncode == 1, out.stderr
                    assert b"stolen" not in out.stdout
    assert not [h for h in stolen if b"s3cret-key" in h], stolen
    assert not stolen, stolen


async def test_a_tls_url_with_a_bad_certificate_is_refused() -> None:
    """Fixed (was: DEFECT: ``https://`` to a peer whose certificate no trusted CA signed is
    refused (no request, no key sent: safe), but the user is not told why: stderr is the one
    line ``service chat: cannot reach the service: `` with an empty reason (httpx's ConnectError
    from the trio backend has an empty message, the SSL error being only its ``__cause__``), and
    only after ~33 s, the POST re-sent ~10 times as if a dropped stream (a certificate failure
    is no transient fault). At fault: service/chat.py ``_report`` (prints ``{exc}`` alone, empty
    here) and ``_stream``'s ``except (httpx.TransportError, ...)`` that re-joins a connect
    failure of the first POST for ``_REJOIN_FOR``.)"""
    import socket
    import ssl
    import threading

    trustme = pytest.importorskip("trustme")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(context)
    served: list[bytes] = []
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(GUARD)

    def serve() -> None:  # (a thread: stdlib TLS, blocking; each connection)
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with suppress(OSError), conn, context.wrap_socket(conn, server_side=True) as tls:
                served.append(tls.recv(65536))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        port = listener.getsockname()[1]
        out = await _piped(_argv(f"https://127.0.0.1:{port}", "--key", "s3cret-key"),
                           guard=GUARD + 30)
    finally:
        listener.close()
    assert out.returncode == 1, out.stderr
    assert not served  # refused: nothing (no key) sent over it
    assert b"Traceback" not in out.stderr
    assert b"certificate" in out.stderr.lower(), out.stderr


async def test_a_non_ascii_event_id_does_not_crash_the_rejoin() -> None:
    """Fixed (was: DEFECT: the stream's ``id: 1é`` (a broken proxy, another encoding) becomes
    the re-join's ``Last-Event-ID`` header, which httpx encodes as ASCII: the re-join after a
    cut raises ``UnicodeEncodeError`` (not an ``httpx.HTTPError``), which ``_run_turn`` does not
    catch: the user gets a Python traceback, and the run is not cancelled (``_give_up`` never
    runs). At fault: service/chat.py ``_stream``, ``headers={"Last-Event-ID": turn.last_id or
    "0"}`` (turn.last_id taken as is in ``_follow``: ``turn.last_id = frame["id"]``).)"""
    log: list[bytes] = []

    async def cut(head: bytes, stream: trio.SocketStream) -> None:
        if head.startswith(b"POST "):
            await stream.send_all(_HEAD + b'id: 1\xc3\xa9\nevent: run.started\ndata: '
                                  b'{"run_id":"run_1","agent":"chat"}\n\nid: 2\xc3\xa9\n'
                                  b'event: token\ndata: {"text":"partial"}\n\n')
        else:  # each re-join refused for now
            await stream.send_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                                  b"Connection: close\r\n\r\n")

    async with _peer(cut, log) as url:
        out = await _piped(_argv(url), guard=GUARD + 40)
    err = out.stderr.decode(errors="replace")
    assert "Traceback" not in err, err
    assert out.returncode == 1, err
    assert any(h.startswith(b"POST /api/runs/run_1/cancel") for h in log), log


async def test_a_rejoin_replayed_from_the_start_shows_each_event_once() -> None:
    """Fixed (was: DEFECT: a proxy or cache in front of the service that drops the
    ``Last-Event-ID`` header (or a service behind it that answers every re-join from the run's
    start) replays the events the user was already shown, and the client showed every frame it
    got: the answer's start twice. At fault: service/chat.py ``Client._take``, which took any
    numeric id as new.) An event at or below the last one shown is skipped; the re-join still
    says where it broke."""
    log: list[bytes] = []
    events = [_started(), ("token", {"text": "Hel"}), ("token", {"text": "lo"}),
              ("thought", {"text": "pondering"}), ("token", {"text": " world"}),
              ("run.finished", {"status": "succeeded"})]

    async def replaying(head: bytes, stream: trio.SocketStream) -> None:
        if head.startswith(b"POST "):  # cut after the first four events
            await stream.send_all(_HEAD + _sse(events[:4]))
        else:  # the re-join: the whole run again, whatever Last-Event-ID said
            await stream.send_all(_HEAD + _sse(events))

    async def whole(head: bytes, stream: trio.SocketStream) -> None:
        await stream.send_all(_HEAD + _sse(events))

    async with _peer(whole) as url:
        uncut = await _piped(_argv(url))
    async with _peer(replaying, log) as url:
        out = await _piped(_argv(url))
    err = out.stderr.decode(errors="replace")
    assert out.returncode == 0, err
    # What the same run shows uncut (its thought between two pieces of the answer: a new line).
    assert out.stdout == uncut.stdout, (out.stdout, uncut.stdout)
    assert out.stdout.decode().replace("\n", "") == "Hello world", out.stdout
    assert err.count("pondering") == 1, err
    rejoin = next(h for h in log if h.startswith(b"GET /api/runs/run_1/events"))
    assert b"last-event-id: 4" in rejoin.lower(), rejoin


@pytest.mark.parametrize("frame", [
    b"event: token\ndata: {not json\n\n",
    b"event: token\ndata: [1, 2]\n\n",
    b"event: token\ndata: null\n\n",
    b'event: token\ndata: {"text": null}\n\n',
    b'event: message\ndata: {"content": 5}\n\n',
    b'event: plan\ndata: {"steps": 7}\n\n',
    b'event: error\ndata: "boom"\n\n',
], ids=["bad-json", "list", "null", "text-null", "content-int", "steps-int", "error-str"])
async def test_a_malformed_frame_is_one_line_not_a_traceback(frame: bytes) -> None:
    """Fixed (was: DEFECT, where it failed: a frame whose ``data:`` is not JSON, or not the
    object its type has (a broken proxy, an older or hostile service), escapes as
    ``json.JSONDecodeError``, ``AttributeError`` or ``TypeError`` from ``SSEParser.feed``
    (service/chat.py, ``json.loads``), ``Client._show`` (``data.get``) or ``Renderer``
    (``_safe(text)`` on a non-str, ``_what``'s plan loop): none is a
    ``ChatError``/``httpx.HTTPError``, so ``_run_turn`` re-raises it: a Python traceback on the
    user's terminal (documented: "1 with the error on stderr"), and the run is left going on the
    service (not cancelled).)"""
    async def broken(head: bytes, stream: trio.SocketStream) -> None:
        await stream.send_all(_HEAD + _sse([_started()]) + frame
                              + _sse([("run.finished", {"status": "succeeded"})], first=3))

    async with _peer(broken) as url:
        out = await _piped(_argv(url))
    err = out.stderr.decode(errors="replace")
    assert "Traceback" not in err, err
    assert out.returncode in (0, 1), err


async def test_a_slow_loris_stream_without_line_ends_is_given_up() -> None:
    """A stream that sends one byte every 0.3 s and never ends its line: no line, so no frame
    and no keep-alive: the turn fails after READ_TIMEOUT (3 s here) and cancels the run."""
    log: list[bytes] = []

    async def loris(head: bytes, stream: trio.SocketStream) -> None:
        if not head.startswith(b"POST "):
            await trio.sleep_forever()
        await stream.send_all(_HEAD + _sse([_started()]))
        for _ in range(200):
            await stream.send_all(b"x")
            await trio.sleep(0.3)

    async with _peer(loris, log) as url:
        started = time.monotonic()
        out = await _piped(_argv(url, read_timeout=3.0))
        took = time.monotonic() - started
    assert out.returncode == 1, out.stderr
    assert b"stopped answering" in out.stderr, out.stderr
    assert took < 30, took
    assert any(h.startswith(b"POST /api/runs/run_1/cancel") for h in log), log


def _peak_rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


async def test_an_endless_line_is_not_buffered_without_bound() -> None:
    """Fixed (was: DEFECT: a server that sends a ``data:`` line that never ends (256 MB here, at
    loopback speed): the client keeps all of it in memory (peak RSS ~300 MB measured) (httpx
    ``aiter_lines`` buffers a line whole, and nothing in ``_follow`` caps a line or an event),
    so a hostile server can push it to any size within READ_TIMEOUT (the watchdog only counts
    whole lines). Asserted: its peak RSS stays under 200 MB.)"""
    sent = 0
    chunk = b"a" * (1 << 20)

    async def endless(head: bytes, stream: trio.SocketStream) -> None:
        nonlocal sent
        await stream.send_all(_HEAD + _sse([_started()]) + b"data: {\"text\": \"")
        for _ in range(256):
            await stream.send_all(chunk)
            sent += len(chunk)
        await trio.sleep_forever()

    peak = 0
    async with _peer(endless) as url:
        process = await trio.lowlevel.open_process(
            _argv(url, read_timeout=8.0), cwd=ROOT, env=_env(),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with trio.move_on_after(GUARD):
                while process.poll() is None:
                    peak = max(peak, _peak_rss_kb(process.pid))
                    await trio.sleep(0.1)
        finally:
            if process.poll() is None:
                process.kill()
            with trio.move_on_after(5, shield=True):
                await process.wait()
    assert process.returncode == 1  # given up (a line past 32 Mi characters), not killed
    assert sent >= 32 << 20, sent
    assert peak < 200 * 1024, f"peak RSS {peak // 1024} MB after {sent >> 20} MB of one line"


async def _answer_of(tokens: int) -> float:
    """Seconds the client takes (piped, the chat agent: written as it comes) to show an answer
    of ``tokens`` tokens sent at once."""
    body = _HEAD + _sse([_started(), *[("token", {"text": "word "})] * tokens,
                         ("message", {"content": "word " * tokens}),
                         ("run.finished", {"status": "succeeded"})])

    async def fast(head: bytes, stream: trio.SocketStream) -> None:
        await stream.send_all(body)

    async with _peer(fast) as url:
        started = time.monotonic()
        out = await _piped(_argv(url), guard=240)
        took = time.monotonic() - started
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode() == "word " * tokens + "\n"
    return took


async def test_a_long_answer_is_shown_in_linear_time() -> None:
    """Fixed (was: DEFECT: each token is appended with ``self._segment += text`` and
    ``self._printed += text`` (service/chat_render.py ``Renderer.token``): on an attribute,
    CPython cannot extend the string in place, so each token copies the whole answer so far:
    quadratic. Measured as growth: 4x the tokens must take well under 16x the time (the
    process's start, the same in each, taken off).)"""
    base = await _answer_of(1)
    small = await _answer_of(40_000) - base
    large = await _answer_of(160_000) - base
    assert large / max(small, 0.05) < 8, f"40k tokens: {small:.2f} s, 160k: {large:.2f} s"
