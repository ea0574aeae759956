"""``python -m service chat``: a terminal client of a running service.

``python -m service chat "a question"`` streams the answer to stdout and exits 0 (1 with the
error on stderr if the run or a request fails, 130 if interrupted, 141 if its output was
closed: ``| head``, the run then cancelled). Without a message it is an
interactive chat on one conversation (its history is the conversation's); fed from a pipe, it
exits 1 at the end of its input if a turn failed. The answer is rendered
as Markdown on a terminal; the agent's steps (thoughts, tool calls and results, the plan) are
dimmed, and go to stderr when stdout is not a terminal, so a pipe gets the answer alone.

Ctrl-C during an answer cancels the run on the server (``POST /api/runs/{id}/cancel``: it ends
``cancelled`` with its partial answer stored) and the client shows how it ended; a second Ctrl-C
exits at once, once that cancel is sent (within 2 s). Ctrl-C or Ctrl-D at the prompt exits.
The terminal closed (SIGHUP) or a ``kill`` (SIGTERM) during an answer is a quit: the run is
cancelled (its cancel sent within 2 s), and the client exits 129 or 143, as a shell reports
the signal.
A stream dropped mid-answer (a Wi-Fi change, a proxy restarting), or ended by an error frame,
or whose re-join is refused for now (5xx, 429), is re-joined where it broke (``Last-Event-ID``;
the run goes on meanwhile: ``on_disconnect: continue``; one dropped before its ``run.started``
came is found on the conversation), for up to 30 s without an event or a keep-alive (a
re-join that brings one starts the count again: a long answer survives any number of cuts).
A service that sends nothing, not even its keep-alives, for ``READ_TIMEOUT`` seconds (or four of its
keep-alive intervals) fails the turn with one line. A turn given up cancels its run, so that
the store does not go on to hold an answer the user was told failed. Text the terminal's
encoding cannot show is shown as "?" (a Latin-1 locale), and character references in an
answer (``&#x202E;``) cannot bring back the controls taken out of its text. A run that does not
succeed ends showing its reply as stored (``run.finished``'s ``content``: of a ReAct turn, its
answer's part only).

Each turn is one ``trio.run``: the prompt is a plain blocking ``input()`` between turns, and
SIGINT is trio's (a signal receiver) only while a turn runs.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import ssl
import sys
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from .chat_render import Renderer, _safe
from .chat_stream import ChatError, Lines, LineTooLong, Malformed, SSEParser
from .text import clean_text

__all__ = ["ChatError", "LineTooLong", "Lines", "Malformed", "SSEParser"]

EXIT_INTERRUPTED = 130
EXIT_OUTPUT_CLOSED = 141  # as a shell reports a writer stopped by SIGPIPE (``| head``)
READ_TIMEOUT = 60.0  # seconds of nothing before a turn fails (a stream: four keep-alives)
# A dropped stream is re-joined for up to _REJOIN_FOR seconds without a word from the service
# (an event or a keep-alive: a service or a proxy restarting takes seconds), each after up to
# _REJOIN_PAUSE_MAX or the Retry-After it gave (after which one is always tried); a re-join
# that brings a word starts the count again (a long or quiet run behind a proxy that cuts
# streams is followed to its end).
_REJOIN_FOR = 30.0
_REJOIN_PAUSE_MAX = 5.0
_RETRY_AFTER_MAX = 30.0  # seconds: a longer Retry-After is waited this long
_QUIT_CANCEL_WAIT = 2.0  # seconds a second Ctrl-C waits for the run's cancel to be sent
_STEPS = ("thought", "tool.call", "tool.result", "plan", "step.started", "step.finished",
          "decision")
_TITLE_CHARS = 60

_CUT = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)  # a handshake cut short


class Interrupted(Exception):
    """The second Ctrl-C of a turn, or the terminal closed (SIGHUP) or a SIGTERM during one:
    leave now, with ``status``."""

    def __init__(self, status: int = EXIT_INTERRUPTED) -> None:
        super().__init__(status)
        self.status = status


# A turn's signals: Ctrl-C stops the answer (twice: quits); the others quit at once.
_QUITS = tuple(s for s in (getattr(signal, "SIGHUP", None), signal.SIGTERM) if s is not None)


@dataclass
class Options:
    url: str
    key: str | None
    agent: str | None
    model: str | None
    conversation: str | None
    message: str | None


@dataclass
class Turn:
    """One question: its run (once known) and whether it was asked to stop."""

    run_id: str | None = None
    conversation: str | None = None  # once made or known: kept if the turn then fails
    cancelling: bool = False
    cancelled: bool = False  # the service took its cancel
    cancel_asked: bool = False  # its cancel was sent (its answer may be on its way)
    stopped: trio.Event = field(default_factory=trio.Event)  # ... set then
    status: str | None = None
    error: dict[str, Any] | None = None  # the run's own error event (stored: it has an id)
    # An error frame with no id that ended the stream (the store away, the service shutting
    # down): why that stream ended, not the run's error. A re-join's stream forgets it.
    notice: dict[str, Any] | None = None
    last_id: str | None = None  # the last event shown: where a re-join resumes
    heard: float | None = None  # trio time of the stream's last event or keep-alive
    known: trio.Event = field(default_factory=trio.Event)  # run_id is set


def _seconds(value: str | None) -> float:
    try:
        seconds = float(value or 0)
    except ValueError:
        return 0.0
    return seconds if 0 < seconds < 86_400 else 0.0


def _error_of(resp: httpx.Response) -> str:
    try:
        error = resp.json()["error"]
        return f"{resp.status_code} {error['type']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{resp.status_code} {resp.reason_phrase}"


class Client:
    def __init__(self, opts: Options, http: httpx.AsyncClient, renderer: Renderer) -> None:
        self.opts, self.http, self.renderer = opts, http, renderer

    async def create_conversation(self, first: str) -> str:
        body: dict[str, Any] = {"title": first.strip()[:_TITLE_CHARS] or None}
        if self.opts.agent:
            body["agent"] = self.opts.agent
        if self.opts.model:
            body["model"] = self.opts.model
        resp = await self.http.post("/api/conversations", json=body)
        if resp.status_code != 201:
            raise ChatError(f"cannot create a conversation: {_error_of(resp)}")
        return str(resp.json()["id"])

    async def ask(self, conversation: str | None, content: str,
                  turn: Turn | None = None) -> tuple[str | None, Turn]:
        """One turn (a new conversation first if ``conversation`` is None): its run's events
        streamed to the renderer. A Ctrl-C cancels the run on the server; one before the
        message was sent (a new conversation being made) leaves it unsent."""
        turn = turn or Turn()
        turn.conversation = conversation
        # A dropped stream is re-joined (the run goes on meanwhile); Ctrl-C cancels the run.
        body: dict[str, Any] = {"content": content, "stream": True, "on_disconnect": "continue"}
        if self.opts.agent:
            body["agent"] = self.opts.agent
        if self.opts.model:
            body["model"] = self.opts.model
        with trio.open_signal_receiver(signal.SIGINT, *_QUITS) as interrupts:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._on_interrupts, interrupts, turn, nursery)
                if conversation is None:
                    conversation = turn.conversation = await self.create_conversation(content)
                if turn.cancelling:
                    turn.status = "cancelled"
                    self.renderer.note("[stopped before the message was sent]")
                else:
                    await self._stream(conversation, body, turn)
                nursery.cancel_scope.cancel()
        return conversation, turn

    async def _stream(self, conversation: str, body: dict[str, Any], turn: Turn) -> None:
        """The run's events, from its POST; a stream dropped before the run's end (a Wi-Fi
        change, a proxy restarting) is re-joined where it broke (``Last-Event-ID``), for up
        to ``_REJOIN_FOR`` seconds without an event or a keep-alive, waiting longer each time.
        A turn given up (a stream gone silent, or its re-joins failing) cancels its run, which
        would go on otherwise."""
        path = f"/api/conversations/{conversation}/messages"
        # The message's key: sent again (its stream dropped before its run was known), it gets
        # the run the first POST began if that reached the service, and begins it if not.
        key = {"Idempotency-Key": secrets.token_hex(16)}
        failure: Exception | None = None
        told = 0.0  # the seconds the service said to wait before the next re-join
        since = trio.current_time()  # the last event shown, or the turn's start
        attempt = 0  # re-joins since then
        pause = 0.0  # before the next re-join
        posted = False
        while True:
            if not posted:
                posted = True
                request = self.http.stream("POST", path, json=body, headers=key,
                                           timeout=httpx.Timeout(30.0, read=None))
            else:
                # Doubling from 0.5 s up to _REJOIN_PAUSE_MAX, or the service's Retry-After
                # when it gave one (a store restarting: 5 s), bounded by _RETRY_AFTER_MAX;
                # cut short by a Ctrl-C's cancel taken meanwhile (its end is shown at once).
                with trio.move_on_after(pause):
                    await turn.stopped.wait()
                if turn.run_id is None:
                    # Dropped before its run was known (X-Run-Id, with the headers): the same
                    # POST, its key telling the service it is the same message. (Its run was
                    # looked for on the conversation: the last two messages, which took an
                    # earlier turn's run when the same words had been asked before.)
                    request = self.http.stream("POST", path, json=body, headers=key,
                                               timeout=httpx.Timeout(30.0, read=None))
                else:
                    request = self.http.stream(
                        "GET", f"/api/runs/{turn.run_id}/events",
                        headers={"Last-Event-ID": turn.last_id or "0"},
                        timeout=httpx.Timeout(30.0, read=None))
            heard, after_cancel = turn.heard, turn.cancelled
            try:
                await self._follow(request, turn)
                return
            except (httpx.TransportError, httpx.DecodingError, _Silent, _Retry) as exc:
                # (A body that breaks, a corrupt gzip, is a stream lost as a cut one is.)
                if turn.status is not None:
                    return  # its end was shown: the body's last bytes do not matter
                if (tls := _tls_failure(exc)) is not None:
                    # A certificate refused is no transient fault: not tried again for
                    # _REJOIN_FOR seconds (it was, and then said nothing of the certificate).
                    if turn.run_id is None:
                        raise ChatError(f"cannot reach the service: {tls}") from None
                    failure = ChatError(f"the service cannot be reached again: {tls}")
                elif after_cancel:
                    # Its Ctrl-C's cancel was taken, and a re-join since could not show the
                    # end: the turn ends as the user's stop (the run is cancelled), not as a
                    # failure, and no second cancel is sent.
                    turn.status = "cancelled"
                    self.renderer.note(f"[stopped; its end could not be shown: {exc}]")
                    return
                else:
                    if turn.heard != heard and turn.heard is not None:
                        # It spoke: a new count (what went before is past).
                        since, attempt, failure = turn.heard, 0, None
                    failure = _telling(failure, exc)
                    told = exc.after if isinstance(exc, _Retry) else 0.0
                    attempt += 1
                    pause = max(min(0.5 * 2 ** (attempt - 1), _REJOIN_PAUSE_MAX),
                                min(told, _RETRY_AFTER_MAX))
                    # (After a Retry-After past the count's end, one more re-join all the same.)
                    if (not isinstance(exc, _Silent)
                            and trio.current_time() - since <= _REJOIN_FOR):
                        continue
                    # Given up: a stream silent for four keep-alive intervals (the service
                    # wedged: a re-join would wait as long again), or re-joined enough.
            except ChatError as exc:
                if turn.run_id is None:
                    raise
                failure = _telling(failure, exc)
            except BrokenPipeError:
                # The output was closed (``| head`` has what it wanted): the user left, as
                # with Ctrl-C. Its run is cancelled (it would go on: on_disconnect continue);
                # what is still written goes nowhere, not into a traceback.
                _output_to_devnull()
                failure = OutputClosed("the output was closed before the answer ended"
                                       + ("; its run was cancelled" if turn.run_id else ""))
            if turn.run_id is not None:
                await self._give_up(turn)
            assert failure is not None
            raise failure

    async def _follow(self, request: Any, turn: Turn) -> None:
        # The stream's reads have no timeout of httpx's: a watchdog allows four of the
        # service's keep-alive intervals (its X-Keepalive-Interval; SERVICE_SSE_KEEPALIVE may
        # be long), READ_TIMEOUT until it is known.
        with trio.CancelScope() as watchdog:
            silence = READ_TIMEOUT
            watchdog.deadline = trio.current_time() + silence
            async with request as resp:
                if resp.status_code == 204:  # re-joined past its end: its end was not seen
                    turn.error = turn.error or turn.notice or {
                        "type": "stream_ended", "message": "the run ended while re-joining"}
                elif resp.status_code != 200:
                    await resp.aread()
                    if turn.run_id is not None and (resp.status_code >= 500
                                                    or resp.status_code == 429):
                        # A re-join refused for now (the store away, a proxy restarting):
                        # tried again.
                        raise _Retry(_error_of(resp),
                                     _seconds(resp.headers.get("Retry-After")))
                    raise ChatError(_error_of(resp))
                turn.notice = None  # a stream again: an earlier one's end says nothing now
                if turn.run_id is None and (run_id := resp.headers.get("X-Run-Id")):
                    # Its run, with the headers: a stream cut before run.started is
                    # re-joined by it (its POST sent again otherwise, with its key).
                    # (A Ctrl-C before it is sent its cancel with run.started, re-joined.)
                    turn.run_id = run_id
                    turn.known.set()
                silence = max(silence, 4 * _seconds(resp.headers.get("X-Keepalive-Interval")))
                parser, lines = SSEParser(), Lines()
                async for text in resp.aiter_text():
                    for line in lines.feed(text):
                        watchdog.deadline = trio.current_time() + silence
                        if line.startswith(":"):  # a keep-alive: the run goes on, we hear of it
                            turn.heard = trio.current_time()
                        frame = parser.feed(line)
                        if frame is not None:
                            await self._take(frame, turn)
        if watchdog.cancelled_caught:
            raise _Silent(f"the service stopped answering (nothing for {silence:g} s; run "
                          f"{turn.run_id or 'not started'})")
        if turn.status is None:
            why = turn.notice or turn.error or {"type": "stream_ended",
                                                "message": "no run.finished"}
            # (The run goes on: re-joined, as an error frame that ends a stream asks.)
            message = (f"the stream ended before the run did: {why.get('type')}: "
                       f"{why.get('message')} (run {turn.run_id})")
            if turn.run_id is None:
                raise ChatError(message)
            raise _Retry(message, _seconds(str(why.get("retry_after") or "")))

    async def _take(self, frame: dict[str, Any], turn: Turn) -> None:
        """A frame shown, its id kept for a re-join (the Last-Event-ID: a number; "1\u00e9"
        broke it); one at or below the last shown is not shown again. One that is not an event
        of the API ends the turn with one line."""
        event_id: str = frame.get("id") or ""
        # (The API's ids are 64-bit: past 19 digits int() itself may refuse, at 4,300.)
        number = event_id.isascii() and event_id.isdigit() and len(event_id) <= 19
        if number and turn.last_id is not None and int(event_id) <= int(turn.last_id):
            return  # shown already: a proxy that dropped the re-join's Last-Event-ID replays
        if number:
            if event_id != turn.last_id:  # (a new one: the run moved on)
                turn.heard = trio.current_time()
            turn.last_id = event_id
        try:
            await self._show(frame, turn)
        except (TypeError, AttributeError, KeyError, ValueError) as exc:
            # A field of another type than the API's ({"text": null}, a plan's steps a number).
            raise Malformed(f"a {frame.get('event') or 'message'} event this client cannot "
                            f"read ({exc!r})") from None
        if event_id and not number:
            raise Malformed(f"an event's id is not a number of the API: {event_id[:40]!r}")

    async def _show(self, frame: dict[str, Any], turn: Turn) -> None:
        kind, data = frame.get("event", ""), frame["data"]
        if kind == "run.started":
            turn.run_id = data["run_id"]
            turn.known.set()
            self.renderer.started(data.get("agent", ""))
            if turn.cancelling and not turn.cancel_asked:  # Ctrl-C came before it was known
                await self._cancel(turn)
        elif kind == "token":
            self.renderer.token(data.get("text", ""))
        elif kind in _STEPS:
            self.renderer.step(kind, data)
        elif kind == "message":
            self.renderer.message(data.get("content", ""))
        elif kind == "error":
            if frame.get("id"):
                turn.error = data
            else:
                turn.notice = data
        elif kind == "run.finished":
            turn.status = data.get("status")
            if turn.error is None and data.get("error") not in (None, "cancelled by request"):
                # Ended by something else than the user's own cancel (the service shutting
                # down, another client): said, not a bare "[run cancelled]".
                turn.error = {"type": turn.status, "message": data["error"]}
            content = data.get("content")
            self.renderer.finished(turn.status or "unknown", turn.error,
                                   content if isinstance(content, str) else None)

    async def _on_interrupts(self, interrupts: Any, turn: Turn,
                             nursery: trio.Nursery) -> None:
        async for signum in interrupts:
            if turn.cancelling or signum in _QUITS:
                if not turn.cancelled and turn.status is None and turn.conversation is not None:
                    # Its stream going away does not stop it (on_disconnect: continue): the
                    # cancel is sent before the chat quits, within a bound (once the run is
                    # known, if its start is still being stored).
                    with trio.move_on_after(_QUIT_CANCEL_WAIT, shield=True), \
                            contextlib.suppress(httpx.HTTPError):
                        await turn.known.wait()
                        await self._cancel(turn)
                raise Interrupted(EXIT_INTERRUPTED if signum == signal.SIGINT else 128 + signum)
            turn.cancelling = True
            self.renderer.note("[cancelling the run; Ctrl-C again to quit]")
            if turn.run_id is not None:
                nursery.start_soon(self._cancel, turn)

    async def _give_up(self, turn: Turn) -> None:
        """The turn fails (its stream lost, its re-joins too): its run is cancelled, within a
        bound, so that the store does not go on to hold an answer the user was told failed
        (``on_disconnect: continue`` keeps it going otherwise)."""
        with trio.move_on_after(_QUIT_CANCEL_WAIT, shield=True), \
                contextlib.suppress(httpx.HTTPError):
            await self._cancel(turn)

    async def _cancel(self, turn: Turn) -> None:
        turn.cancel_asked = True
        resp = await self.http.post(f"/api/runs/{turn.run_id}/cancel")
        turn.cancelled = resp.status_code == 202
        if turn.cancelled:
            turn.stopped.set()
        if resp.status_code != 202:
            self.renderer.note(f"[cancel failed: {_error_of(resp)}]")


def _tls_failure(exc: BaseException) -> str | None:
    """What a TLS handshake refused (a certificate, a peer speaking no TLS), if that is why
    ``exc`` happened; not a handshake cut short (a proxy restarting): a retry may pass."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError) and not isinstance(seen, _CUT):
            said = getattr(seen, "verify_message", None) or getattr(seen, "reason", None)
            return f"TLS: {said or seen}"
        seen = seen.__cause__ or seen.__context__
    return None


def _reason(exc: BaseException) -> str:
    """The first thing ``exc`` or one of its causes says (some say nothing themselves)."""
    seen: BaseException | None = exc
    while seen is not None:
        if str(seen):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__


def _telling(said: Exception | None, new: Exception) -> Exception:
    """What a turn given up says: the service's own first reason (an error frame, a refused
    re-join's, a silence), before a connection's failure, which says only that it broke."""
    lost = (httpx.TransportError, httpx.DecodingError)
    return new if said is None or (isinstance(said, lost) and not isinstance(new, lost)) else said


class OutputClosed(ChatError):
    """Where the answer goes was closed (a pipe's reader exited)."""


def _output_to_devnull() -> None:
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


class _Silent(ChatError):
    """A stream that sent nothing, not even keep-alives, for four of their intervals."""


class _Retry(ChatError):
    """A run's stream that may be re-joined: refused for now (5xx, 429), or ended before the
    run did (an error frame). ``after``: the seconds the service said to wait (its
    Retry-After, or an error frame's ``retry_after``), 0 if it said none."""

    def __init__(self, message: str, after: float = 0.0) -> None:
        super().__init__(message)
        self.after = after


def _http(opts: Options) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {opts.key}"} if opts.key else {}
    # A run may be quiet for a while (a model loading, a tool working), but its stream is not:
    # the service sends a keep-alive every SERVICE_SSE_KEEPALIVE (15 s). Nothing at all for
    # READ_TIMEOUT (four of them) is a service that stopped answering.
    return httpx.AsyncClient(base_url=opts.url, headers=headers,
                             timeout=httpx.Timeout(30.0, read=READ_TIMEOUT))


async def _one_turn(opts: Options, renderer: Renderer, conversation: str | None,
                    content: str, turn: Turn | None = None) -> tuple[str | None, Turn]:
    async with _http(opts) as http:
        return await Client(opts, http, renderer).ask(conversation, content, turn)


def _run_turn(opts: Options, renderer: Renderer, conversation: str | None,
              content: str) -> tuple[str | None, Turn | None, int]:
    """One turn; the conversation, the turn, and an exit status if it should end the chat."""
    # A line that is not UTF-8 (a Latin-1 file piped in) comes with lone surrogates, which
    # no JSON encoder takes: they become U+FFFD, as the service stores them.
    content = clean_text(content)
    turn = Turn()
    try:
        try:
            conversation, turn = trio.run(_one_turn, opts, renderer, conversation, content, turn)
        except BaseException:
            with contextlib.suppress(OSError):  # a terminal hung up (EIO): nothing to reset
                renderer.reset()
            # A conversation made before the turn failed is the chat's: the next turn goes on
            # in it (it would start another, and the chat's turns would split across two).
            conversation = turn.conversation or conversation
            raise
    except KeyboardInterrupt:
        renderer.note("[interrupted]")
        return conversation, None, EXIT_INTERRUPTED
    except Interrupted as quit_:
        return conversation, None, _interrupted(renderer, quit_)
    except BaseExceptionGroup as group:
        # A single failure from the turn's nursery.
        found = group.subgroup((Interrupted, ChatError, httpx.HTTPError))
        if found is None:
            raise
        exc = found.exceptions[0]
        while isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
        if isinstance(exc, Interrupted):
            return conversation, None, _interrupted(renderer, exc)
        if isinstance(exc, OutputClosed):
            _report(renderer, exc)
            return conversation, None, EXIT_OUTPUT_CLOSED
        return conversation, None, _report(renderer, exc)
    except (ChatError, httpx.HTTPError) as exc:
        status = _report(renderer, exc)
        return conversation, None, EXIT_OUTPUT_CLOSED if isinstance(exc, OutputClosed) else status
    return conversation, turn, 0


def _interrupted(renderer: Renderer, exc: Interrupted) -> int:
    if exc.status != 128 + getattr(signal, "SIGHUP", -1):  # (no terminal to tell)
        renderer.note("[interrupted]")
    return exc.status


def _report(renderer: Renderer, exc: BaseException) -> int:
    if isinstance(exc, httpx.ReadTimeout):
        renderer.err.print(f"service chat: the service stopped answering (nothing for "
                           f"{READ_TIMEOUT:g} s)", markup=False, highlight=False)
    elif isinstance(exc, httpx.HTTPError):
        renderer.err.print(_safe("service chat: cannot reach the service: "
                                 + (_tls_failure(exc) or _reason(exc))),
                           markup=False, highlight=False)
    else:
        renderer.err.print(_safe(f"service chat: {exc}"), markup=False, highlight=False)
    return 1

