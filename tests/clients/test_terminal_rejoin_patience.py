"""How long the terminal client keeps re-joining a run whose stream dropped (``Client._stream``).

It re-joined three times in all (after 0.5, 1 and 2 s), counted over the whole turn, then gave
the turn up and cancelled its run:
* a network (or a proxy, or the service restarting) away for longer than 3.5 s cancelled a
  run that would have gone on to its answer;
* a long answer behind a proxy that cuts every stream after a while was cancelled at the
  fourth cut, though every re-join before it had brought the rest of the answer.

Now re-joins go on for 30 s without an event (each after up to 5 s), and a re-join that brings
events starts the count again. The real terminal client in this process, the real server on
loopback, a TCP proxy between them that really drops and refuses connections.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from service import chat
from service.settings import Settings

from ..fakes import Reply, ScriptedBackend
from ..proxies import CuttableProxy, port_of, serving
from ..run_ends import first_reply, run_over
from ..servers import running_server
from ..test_review_diff_dec05c import _renderer, _turn

GUARD = 60  # seconds any wait may take before the test fails
_TICKS = 200  # 10 s at 50 ms a token


async def _more_shown(out: Any, outcome: list[Any], words: int) -> None:
    """Until the terminal has shown ``words`` more words (or the turn ended)."""
    before = len(out.getvalue().split())
    while len(out.getvalue().split()) < before + words and not outcome:  # noqa: ASYNC110
        await trio.sleep(0.02)


@asynccontextmanager
async def _a_long_turn(settings: Settings) -> AsyncIterator[tuple[Any, ...]]:
    """A terminal turn, through a proxy, whose answer is ``_TICKS`` words 50 ms apart: the
    service's client, the proxy, the conversation, the terminal's output, the turn's outcome
    (its failure, or None once it is over)."""
    backend = ScriptedBackend([Reply("tick " * _TICKS, gap=0.05)])
    async with running_server(settings, backend) as srv, srv.client() as client, \
            serving(CuttableProxy(port_of(srv))) as proxy, trio.open_nursery() as nursery:
        conv = (await client.post("/api/conversations", json={})).json()["id"]
        renderer, out = _renderer()
        opts = chat.Options(url=proxy.url, key=None, agent=None, model=None,
                            conversation=conv, message=None)
        outcome: list[Any] = []
        nursery.start_soon(_turn, opts, renderer, conv, "count the ticks", outcome)
        yield client, proxy, conv, out, outcome


async def _ended(client: Any, conv: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The turn's run once it has ended, and its stored reply."""
    reply = await first_reply(client, conv)
    run = await run_over(client, reply["run_id"])
    return run, await first_reply(client, conv)


async def test_terminal_follows_a_long_answer_through_many_cuts(settings: Settings) -> None:
    """A proxy cuts the terminal's stream six times, each after the re-join before brought more
    of the answer: the turn ends with the whole answer, as stored, and its run succeeded. (At
    the fourth cut the terminal gave up and cancelled the run.)"""
    async with _a_long_turn(settings) as (client, proxy, conv, out, outcome):
        with trio.fail_after(GUARD):
            for _ in range(6):
                await _more_shown(out, outcome, 5)
                proxy.cut()
            while not outcome:  # noqa: ASYNC110
                await trio.sleep(0.05)
        run, stored = await _ended(client, conv)
    assert outcome == [None], outcome
    assert run["status"] == "succeeded", run
    assert out.getvalue().split() == stored["content"].split() == ["tick"] * _TICKS


async def test_terminal_rejoins_after_a_six_second_outage(settings: Settings) -> None:
    """The network is down for 6 s in the middle of an answer (every connection refused; the
    run goes on, ``on_disconnect: continue``). Once it is back, the terminal re-joins and
    shows the whole answer; its run succeeded. (It gave up 3.5 s after the cut and cancelled
    the run.)"""
    async with _a_long_turn(settings) as (client, proxy, conv, out, outcome):
        with trio.fail_after(GUARD):
            await _more_shown(out, outcome, 5)
            proxy.cut(refuse=True)
            await trio.sleep(6)  # a real outage: the network is down this long
            proxy.refusing = False
            while not outcome:  # noqa: ASYNC110
                await trio.sleep(0.05)
        run, stored = await _ended(client, conv)
        refused = proxy.refused
    assert refused, "no re-join was tried while the network was down"
    assert outcome == [None], outcome
    assert run["status"] == "succeeded", run
    assert out.getvalue().split() == stored["content"].split() == ["tick"] * _TICKS
