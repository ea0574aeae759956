"""A review of the terminal client (service/chat.py, service/chat_render.py) on 2026-12-05: what
a user at a terminal hits when the network or the service misbehaves. Each test fails on the
tree it was written against because of a real defect.

The service is the real app on port 0 with the real simulator behind it (tests/e2e.py); the
client is driven in this process (``chat._one_turn``, as ``_run_turn`` runs it) through a small
TCP proxy on loopback that can refuse or cut connections, or as a user runs it (a
subprocess) where only its arguments matter."""

from __future__ import annotations

import subprocess
import sys
from io import StringIO
from typing import Any

import httpx
import pytest
import trio
from rich.console import Console

from service import chat
from service.errors import StoreUnavailable
from service.settings import Settings
from service.sim.scenario import Reply as SimReply

from ..e2e import GUARD, e2e
from ..fakes import Reply, ScriptedBackend
from ..proxies import cuttable
from ..run_ends import run_over
from ..servers import ROOT, running_server
from .test_chat_cli import _env


def _renderer() -> tuple[chat.Renderer, StringIO, StringIO]:
    out, err = StringIO(), StringIO()
    return (chat.Renderer(Console(file=out, force_terminal=False),
                          Console(file=err, force_terminal=False, width=200)), out, err)


def _opts(url: str, conv: str | None) -> chat.Options:
    return chat.Options(url=url, key=None, agent=None, model=None, conversation=conv,
                        message=None)


async def _turn(opts: chat.Options, renderer: chat.Renderer, conv: str | None, content: str,
                outcome: list[Any]) -> None:
    """One terminal turn as ``_run_turn`` takes it: its Turn, or its failure, in ``outcome``."""
    try:
        _, turn = await chat._one_turn(opts, renderer, conv, content)
    except* (chat.ChatError, httpx.HTTPError) as group:
        exc: BaseException = group
        while isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
        outcome.append(exc)
    else:
        outcome.append(turn)


async def _messages(client: httpx.AsyncClient, conv: str) -> list[dict[str, Any]]:
    r = await client.get(f"/api/conversations/{conv}")
    return r.json()["messages"]  # type: ignore[no-any-return]


# -- 1. a POST that never reached the service, and a question asked before -----------------------


async def test_cli_a_message_that_never_reached_the_service_does_not_replay_the_last_answer(
    settings: Settings,
) -> None:
    """The user asks the same thing twice in a chat ("go on", "yes", "more": short replies
    repeat). The second time, the POST never reaches the service (the connection is closed
    before a response: a service restarting behind its proxy, a Wi-Fi change). ``_stream``
    takes that for a stream dropped before ``run.started`` and, 0.5 s later, looks the run up
    on the conversation (``_find_run``): the last two messages are "user: <the same text>"
    and an assistant reply with a ``run_id``, which is the *previous* turn's. The client
    re-joins that old run from 0, prints its old answer again as this turn's answer, and the
    turn succeeds (exit 0 for a one-shot), while the service never got the message: the store
    holds one question, the user was shown an answer to two.

    Expected: a run is taken as this turn's only if it is newer than the turn (a reply
    created after the POST was sent, or one still pending); else the turn fails with "cannot
    reach the service" (or the message is sent again): never the old answer as a new one.
    (Now the client sends the POST again with the message's Idempotency-Key, which begins the
    run if the first never arrived and gets its run if it did.)"""
    async with e2e(settings, "llamacpp") as env, cuttable(env.server) as proxy:
        conv = await env.conversation()
        env.sim.script(SimReply(text="the first answer, about dogs."),
                       SimReply(text="a second answer, about cats."))
        renderer, out, _ = _renderer()
        first: list[Any] = []
        with trio.fail_after(GUARD):
            await _turn(_opts(proxy.url, conv), renderer, conv, "go on", first)
        assert isinstance(first[0], chat.Turn), first
        assert first[0].status == "succeeded", first
        shown_before = out.getvalue()
        assert "dogs" in shown_before, shown_before

        proxy.refusing = True  # the next connection (the second turn's POST) is closed
        outcome: list[Any] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_turn, _opts(proxy.url, conv), renderer, conv, "go on", outcome)
            with trio.fail_after(GUARD):
                while not proxy.refused:  # noqa: ASYNC110
                    await trio.sleep(0.01)
                proxy.refusing = False  # the service is reachable again (its re-join)
                while not outcome:  # noqa: ASYNC110
                    await trio.sleep(0.02)
        messages = await _messages(env.client, conv)
    asked = [m["content"] for m in messages if m["role"] == "user"]
    shown_now = out.getvalue()[len(shown_before):]
    turn = outcome[0]
    # Its POST is sent again with its Idempotency-Key (it never reached the service: it is
    # asked now, once), and the turn shows the new answer, never the previous turn's again.
    assert asked == ["go on", "go on"], asked
    assert isinstance(turn, chat.Turn), turn
    assert turn.status == "succeeded", turn
    assert "cats" in shown_now, shown_now
    assert "dogs" not in shown_now, shown_now
    assert turn.run_id != first[0].run_id, (
        f"the second turn's message never reached the service (the store holds {asked}), yet "
        f"the turn ended {turn.status!r} on the previous turn's run {turn.run_id}, showing "
        f"its answer again as the new one: {shown_now!r}")


# -- 2. a re-join told to come back later ---------------------------------------------------------


async def test_cli_a_rejoin_refused_with_retry_after_is_tried_again_when_told(
    settings: Settings,
) -> None:
    """The terminal's stream drops mid-answer; its re-joins are answered 503
    ``store_unavailable`` with ``Retry-After: 5`` (the store away for a moment: "nothing that
    was stored is lost; a retry later is worth it", service/errors.py). The client ignores the
    header: it re-joins after 0.5, 1 and 2 s (``_stream``), its whole budget spent 3.5 s after
    the cut, before the time the service named, and then gives the turn up and cancels the
    run (``_give_up``). Here the store is back 4 s after the cut, within what the service
    said: the user is told the turn failed, and the answer, which the run was still writing,
    is cut short and stored ``cancelled``.

    Expected: a re-join refused with a Retry-After waits (at least) that long before the next
    one (bounded), so that a store away for less than it said costs no answer: the turn
    succeeds with the whole answer, and the run too."""
    text = " ".join(f"w{i}" for i in range(120))
    async with e2e(settings, "llamacpp") as env, cuttable(env.server) as proxy:
        conv = await env.conversation()
        env.sim.script(SimReply(text=text, interval=0.06))  # about 7 s
        store = env.server.services.require_store()
        away_until = [float("inf")]
        refused: list[float] = []

        def away_for_a_moment(op: str) -> None:  # the store's own fault hook, for its reads
            if op == "get_run" and trio.current_time() < away_until[0]:
                refused.append(trio.current_time())
                raise StoreUnavailable("store read failed: the database is restarting")

        renderer, out, err = _renderer()
        outcome: list[Any] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_turn, _opts(proxy.url, conv), renderer, conv,
                                   "write a lot", outcome)
                with trio.fail_after(GUARD):
                    while "w10" not in out.getvalue():  # noqa: ASYNC110
                        await trio.sleep(0.02)
                store.faults.before_read = away_for_a_moment
                cut_at = trio.current_time()
                away_until[0] = cut_at + 4.0  # shorter than the Retry-After: 5 it answers
                proxy.cut()
                with trio.fail_after(30):
                    while not outcome:  # noqa: ASYNC110
                        await trio.sleep(0.05)
        finally:
            store.faults.before_read = None
        (reply,) = [m for m in await _messages(env.client, conv) if m["role"] == "assistant"]
        run = await run_over(env.client, reply["run_id"])
    assert refused, "the client did not re-join"
    tried = ", ".join(f"{t - cut_at:.1f}" for t in refused)
    turn = outcome[0]
    assert isinstance(turn, chat.Turn), (
        f"the service answered its re-joins 503 with Retry-After: 5; the client re-joined at "
        f"{tried} s after the cut and gave up ({turn!r}; stderr {err.getvalue()!r}); the "
        f"store was back at 4.0 s; the run ended {run['status']!r} with "
        f"{len(reply['content'].split())} of 120 words")
    assert turn.status == "succeeded", turn
    assert run["status"] == "succeeded", run
    assert out.getvalue().split() == text.split(), out.getvalue()[-200:]


# -- 3. arguments a user may give -----------------------------------------------------------------


@pytest.mark.parametrize("args", [
    pytest.param(["--key", "k\u00e9y\u2019"], id="key-not-ascii"),
    pytest.param(["--url", "http://[::1"], id="url-malformed"),
])
def test_cli_a_bad_argument_is_one_line_not_a_traceback(args: list[str]) -> None:
    """``python -m service chat hi --key <key>`` with a key that cannot go into an HTTP header
    (a typo, a curly quote pasted with it, a non-breaking space; ``$SERVICE_CHAT_KEY`` the same)
    and ``--url`` with a URL httpx cannot parse (``http://[::1``, a missing bracket): the
    client dies with a Python traceback (``UnicodeEncodeError`` from httpx's ``Headers``;
    ``httpx.InvalidURL``, which is not an ``httpx.HTTPError``), raised from ``_http`` inside
    ``trio.run`` where ``_run_turn`` catches only ``ChatError``/``httpx.HTTPError``. The
    interactive chat dies the same way at its first turn. Expected: a one-line error on
    stderr naming the bad option (as argparse or ``_report`` would), exit status 1 or 2, no
    traceback."""
    env = _env()
    done = subprocess.run(
        [sys.executable, "-m", "service", "chat", "hi", "--url", "http://127.0.0.1:9",
         *args], cwd=ROOT, env=env, capture_output=True, timeout=GUARD * 3, check=False)
    err = done.stderr.decode(errors="replace")
    assert "Traceback" not in err, f"exit {done.returncode}, stderr:\n{err[-1500:]}"
    assert done.returncode in (1, 2), (done.returncode, err)
    assert len(err.strip().splitlines()) <= 2, err


# -- 4. a reasoning model's thinking --------------------------------------------------------------


async def test_cli_a_reasoning_models_thinking_reads_as_text_not_a_line_per_piece(
    settings: Settings,
) -> None:
    """A reasoning model (Ollama's ``message.thinking``, llama.cpp's ``reasoning_content``)
    streams its thinking token by token, and the service passes each piece on as its own
    ``thought`` event with ``reasoning: true`` (service/agents/base.py: "piece by piece").
    ``Renderer.step`` prints every ``thought`` as a step line of its own: the user's terminal
    (stderr in a pipe) gets "· thinking: The", "· thinking: user", "· thinking: asks", ...,
    one line per token: hundreds of lines for a real model's thinking, unreadable, and
    pushing the answer and the conversation out of the scrollback. (The simulator has no
    thinking; the scripted backend streams it as a model does, one chunk per word.)

    Expected: consecutive reasoning pieces are shown as the running text they are (one dimmed
    "thinking" block that grows), not one line per piece; the answer stays apart."""
    thought = ("The user greets me, so I should greet them back and offer some help "
               "with whatever they need today.")
    pieces = [w + " " for w in thought.split()]
    backend = ScriptedBackend(lambda req: Reply("Hello! How can I help?", thinking=pieces))
    async with running_server(settings, backend) as srv:
        renderer, out, err = _renderer()
        outcome: list[Any] = []
        with trio.fail_after(GUARD):
            await _turn(_opts(srv.url, None), renderer, None, "hi", outcome)
    assert isinstance(outcome[0], chat.Turn), outcome
    assert outcome[0].status == "succeeded", outcome
    assert out.getvalue() == "Hello! How can I help?\n", out.getvalue()  # the answer alone
    shown = err.getvalue()
    lines = [line for line in shown.splitlines() if "thinking" in line]
    assert len(lines) <= 2, (
        f"the model's thinking ({len(pieces)} pieces of one sentence) was shown as "
        f"{len(lines)} lines:\n{shown}")
    assert thought in " ".join(shown.split()), shown


def test_an_error_frame_with_no_message_is_shown_not_a_keyerror() -> None:
    # (Suspected by the process review of 2026-12-06.) A run's end whose error names only its
    # type (a proxy's or an older service's frame): Renderer.finished read error["message"]
    # and raised KeyError out of the turn, a traceback.
    renderer, _, err = _renderer()
    renderer.finished("failed", {"type": "backend_unavailable"})
    renderer.finished("failed", {"message": "no type"})
    shown = err.getvalue()
    assert "[run failed: backend_unavailable]" in shown, shown
    assert "[run failed: no type]" in shown, shown
