"""A review of the commits of 2026-12-05 4dffd78 (``/v1`` runs owned by their request through
``RunSpec.on_handle``; ``CancelOwnedRuns`` cancels them as ``http.disconnect`` passes) and
6e50e9f (a stream's ``on_disconnect: continue`` counts once its ``run.started`` was sent; the
terminal's re-joins, give-ups and second Ctrl-C; a call's first thought or tool call names its
model). Each test shows a defect those commits introduced or left, and fails on the code it
was written against.

Real servers on 127.0.0.1 (the app under hypercorn on port 0 in this process), a TCP proxy in
front of it where the network matters, and the real terminal client (its ``Client`` in this
process).

(A third test, an HTTP/2 ``continue`` stream left before its ``run.started`` reached the
client, was dropped with the server side of 6e50e9f: by design a ``continue`` run goes on
whoever left, its result stored on the conversation, tests/backends/test_end_to_end.py.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from io import StringIO
from typing import Any

import httpx
import trio
import trio.testing
from rich.console import Console

from service import chat
from service.backends.base import ChatRequest
from service.errors import StoreUnavailable
from service.settings import Settings

from .fakes import ScriptedBackend, by_content
from .proxies import CuttableProxy, port_of, serving
from .run_ends import first_reply, run_over
from .servers import running_server

GUARD = 30  # seconds any wait may take before the test fails


class GatedBackend(ScriptedBackend):
    """A scripted backend whose answers start only once ``gate`` is set (a model loading)."""

    def __init__(self, script: Any) -> None:
        super().__init__(script)
        self.gate = trio.Event()

    @asynccontextmanager
    async def stream(self, request: ChatRequest) -> AsyncIterator[Any]:
        await self.gate.wait()
        async with super().stream(request) as chunks:
            yield chunks


def _renderer() -> tuple[chat.Renderer, StringIO]:
    out = StringIO()
    return chat.Renderer(Console(file=out, force_terminal=False),
                         Console(file=StringIO(), force_terminal=False, width=200)), out


async def _turn(opts: chat.Options, renderer: chat.Renderer, conv: str, content: str,
                outcome: list[Any]) -> None:
    """One terminal turn; its failure (as ``_run_turn`` takes them) or None in ``outcome``."""
    try:
        await chat._one_turn(opts, renderer, conv, content)
    except* (chat.ChatError, httpx.HTTPError) as group:
        outcome.append(group.exceptions[0])
    else:
        outcome.append(None)


# -- 1. run.started sent by the service, lost on the way to the terminal --------------------------


class LosesRunStarted(CuttableProxy):
    """Passes the client's bytes and the response's head, but none of the service's bytes from
    the frame ``run.started`` on (they are lost in the network: a Wi-Fi change, a proxy dying
    with its buffer); ``withheld`` is set once that frame has reached the proxy."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.withheld = trio.Event()

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream) -> None:
        from_service = src.socket.getpeername()[1] == self.port
        losing = False  # this connection's (the network recovers: new connections pass)
        while data := await src.receive_some(65536):
            if (from_service and not self.withheld.is_set()) or losing:
                if losing:
                    continue
                at = data.find(b"event: run.started")
                if at >= 0:
                    self.withheld.set()
                    losing = True
                    data = data[:data.rfind(b"id: ", 0, at)]
            if data:
                await dst.send_all(data)
        await dst.send_eof()


async def test_cli_a_stream_lost_before_run_started_reached_it_fails_the_turn_the_run_goes_on(
    settings: Settings,
) -> None:
    """6e50e9f: a POST stream's ``continue`` run stays owned by its request until its first
    frame (``run.started``) was *sent*, then is disowned (``_event_stream``): "from now on the
    client can re-join it". Sent is not received. When the connection breaks between the
    service's write and the terminal's read (the frame lost in a proxy's or the network's
    buffers), the service lets the run go on (``continue``), while the terminal, which never
    learned the run's id, gives the turn up without re-joining and without cancelling
    (``_stream``: ``if turn.run_id is None: raise``): "cannot reach the service", exit 1 for a
    one-shot. The run goes on, generates its whole answer for nobody, and the store holds
    it ``complete`` / ``succeeded``: the terminal told the user the turn failed, the store
    says it succeeded (and the next turn's history holds an answer the user never saw).

    Root cause: service/chat.py:370-371 (a drop before ``run.started`` was read is re-raised,
    though the conversation is known and its newest reply names the run) with
    service/api/runs.py:141-145 (the run is disowned once the frame was handed to the
    transport). Fix: on a drop before the run's id is known, the terminal looks the run up
    (``GET /api/conversations/{id}``: the reply its POST made, newer than the turn) and
    re-joins it from 0, or cancels it when it gives up (``_give_up``)."""
    backend = GatedBackend(by_content)
    async with running_server(settings, backend) as srv, srv.client() as client, \
            serving(LosesRunStarted(port_of(srv))) as proxy, trio.open_nursery() as nursery:
        conv = (await client.post("/api/conversations", json={})).json()["id"]
        renderer, out = _renderer()
        opts = chat.Options(url=proxy.url, key=None, agent=None, model=None,
                            conversation=conv, message=None)
        outcome: list[Any] = []
        nursery.start_soon(_turn, opts, renderer, conv, "hello there", outcome)
        with trio.fail_after(GUARD):
            await proxy.withheld.wait()
            # The service has written run.started and waits for the run's first token; the
            # terminal waits for the frame.
            await trio.testing.wait_all_tasks_blocked()
            proxy.cut()
            backend.gate.set()  # the model answers
            while not outcome:  # noqa: ASYNC110
                await trio.sleep(0.02)
        reply = await first_reply(client, conv)
        assert reply["run_id"] is not None, reply
        run = await run_over(client, reply["run_id"])
        stored = await first_reply(client, conv)
    assert outcome[0] is None or run["status"] == "cancelled", (
        f"the terminal gave the turn up ({outcome[0]!r}) without its run's id; the run went "
        f"on and ended {run['status']!r}, its reply stored {stored['status']!r}: "
        f"{stored['content']!r}")
    if outcome[0] is None:
        assert "echo: hello there" in out.getvalue(), out.getvalue()


# -- 2. a re-join answered with an error ----------------------------------------------------------


async def test_cli_a_rejoin_answered_503_fails_the_turn_and_leaves_its_run_going(
    settings: Settings,
) -> None:
    """The terminal's POST stream drops mid-run (a proxy restarting: the case re-joins are
    for). Its re-join (``GET /api/runs/{id}/events``) is answered 503 ``store_unavailable``
    (the store slow for a moment; a restarting proxy's 502 does the same): an answer the API
    calls worth a retry. ``_follow`` raises it as a ``ChatError``, which ``_stream`` catches
    neither to re-join again (only ``TransportError`` and ``_Silent`` are) nor to give the
    turn up (``_give_up``, 6e50e9f: "a turn given up ... its re-joins failing ... cancels its
    run"). The turn fails at once ("503 store_unavailable ..."), the ``continue`` run goes on
    for nobody, and the store holds its whole answer ``succeeded``: what the terminal said
    (failed) and what the store holds disagree, with two re-joins of the three left unused.

    Root cause: service/chat.py:364-378 (``_stream`` handles ``TransportError``/``_Silent``
    only) with :391-393 (a re-join's non-200 answer is a plain ``ChatError``). Fix: a
    re-join's 5xx (and 429) counts as a failed re-join (retried up to ``_REJOINS``); any
    failure that ends the turn once the run is known goes through ``_give_up``."""
    backend = GatedBackend(by_content)
    async with running_server(settings, backend) as srv, srv.client() as client, \
            serving(CuttableProxy(port_of(srv))) as proxy, trio.open_nursery() as nursery:
        conv = (await client.post("/api/conversations", json={})).json()["id"]
        renderer, out = _renderer()
        opts = chat.Options(url=proxy.url, key=None, agent=None, model=None,
                            conversation=conv, message=None)
        outcome: list[Any] = []
        nursery.start_soon(_turn, opts, renderer, conv, "hello there", outcome)
        with trio.fail_after(GUARD):
            while (reply := await first_reply(client, conv))["run_id"] is None:  # noqa: ASYNC110
                await trio.sleep(0.02)
            await trio.testing.wait_all_tasks_blocked()  # run.started shown, the model silent
        store = srv.services.require_store()
        get_run = store.get_run
        refused: list[str] = []

        async def once_unavailable(run_id: str, **kwargs: Any) -> Any:
            if not refused:
                refused.append(run_id)
                raise StoreUnavailable("the store is slow; retry")
            return await get_run(run_id, **kwargs)

        store.get_run = once_unavailable  # type: ignore[method-assign]
        proxy.cut()  # the POST's stream drops; the terminal re-joins (after 0.5 s)
        with trio.fail_after(GUARD):
            while not outcome and not refused:  # noqa: ASYNC110
                await trio.sleep(0.02)
            backend.gate.set()  # the model answers
            while not outcome:  # noqa: ASYNC110
                await trio.sleep(0.02)
        store.get_run = get_run  # type: ignore[method-assign]
        run = await run_over(client, reply["run_id"])
        stored = await first_reply(client, conv)
    assert refused, "the terminal did not re-join"
    assert outcome[0] is None or run["status"] == "cancelled", (
        f"the terminal failed the turn on its re-join's answer ({outcome[0]!r}); the run went "
        f"on and ended {run['status']!r}, its reply stored {stored['status']!r}: "
        f"{stored['content']!r}")
    if outcome[0] is None:
        assert "echo: hello there" in out.getvalue(), out.getvalue()
