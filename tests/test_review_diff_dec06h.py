"""A review of the diff 5cbba80..HEAD (re-join patience counted from keep-alives, a fleet whose
servers refuse the key, ``models.retrieve``).

Each test fails on the code as it is, because of a defect these commits introduced or left.
Real sockets: the real server on loopback, real model servers (a refusing one, a closed port),
the real chat page in Debian's chromium, a TCP proxy between page and service.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from io import StringIO
from typing import Any

import httpx
import pytest
import trio
from rich.console import Console

from service import chat
from service.settings import BackendKind, Settings
from service.sim.scenario import Reply as SimReply

from .clients.test_chat_page import CHROMIUM, _in_browser, _send
from .e2e import e2e
from .fakes import Reply, ScriptedBackend
from .proxies import CuttableProxy, port_of, serving
from .run_ends import first_reply, run_over
from .servers import running_server
from .test_review_diff_dec05c import _turn
from .test_review_diff_dec06g import _TICKS, _refuse_every_request

playwright = pytest.importorskip("playwright.sync_api")

GUARD = 90  # seconds any wait may take before the test fails


def _closed_port() -> int:
    """A loopback port nothing listens on (a model server down: every connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def _refusing_server() -> AsyncIterator[str]:
    """A model server whose copy of the service's API key is wrong: 401 to everything."""
    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(
            trio.serve_tcp, _refuse_every_request, 0, host="127.0.0.1"))
        yield f"http://127.0.0.1:{listener.socket.getsockname()[1]}"
        nursery.cancel_scope.cancel()


# -- 1. a fleet: one server refuses the key, the other is down: "auth failed, do not retry" ---


async def test_fleet_one_server_refusing_the_key_one_down_is_worth_a_retry(
        settings: Settings) -> None:
    """Two llama.cpp servers behind one ``SERVICE_LLAMACPP_URL``: the first refuses the
    service's key (401: it was restarted with a new one), the second is down for a moment
    (connection refused: a restart, an upgrade). An OpenAI SDK client gets a 502
    ``backend_auth_failed`` with ``x-should-retry: false``: it does not retry, and its user (and
    the operator reading the error) is told the fleet's key is wrong, though only one server
    refused it and the other, once back, would answer. It should be a 503 worth a retry (as
    before this diff, and as ``models.retrieve`` says for the same fleet: ``list_models``
    raises ``BackendAuthFailed`` only when *every* server refused). The commit meant "a fleet
    whose servers *all* refuse the key"; ``auto._all_failed`` counts only the servers that
    answered (a server down is left out of ``answered``), so one refusal among servers that
    are down is taken for all of them."""
    async with _refusing_server() as refusing:
        conf = settings.model_copy(update={
            "backend": BackendKind.llamacpp,
            "llamacpp_url": f"{refusing},http://127.0.0.1:{_closed_port()}"})
        async with running_server(conf, from_settings=True) as srv, \
                httpx.AsyncClient(base_url=srv.url, timeout=GUARD) as client:
            with trio.fail_after(GUARD):
                chat = await client.post("/v1/chat/completions", json={
                    "model": "sim-model", "messages": [{"role": "user", "content": "hi"}]})
                listed = await client.get("/v1/models/sim-model")
    said = (chat.status_code, chat.headers.get("x-should-retry"), chat.text[:300])
    # The same fleet, the same moment: models.retrieve says "retry" (503), the chat "do not".
    assert listed.status_code == 503, (listed.status_code, listed.text[:300])
    assert chat.status_code == 503, said
    assert chat.headers.get("x-should-retry") != "false", said


# -- 2. the page: a re-join whose connection is never answered wedges the page for good -------


class HoldsNextConnections(CuttableProxy):
    """A proxy in front of the service that, for the next ``holds`` connections, takes the
    request and never answers (a proxy restarting that kept the socket and lost the request,
    a NAT entry gone stale): no status, no close. The rest pass."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.holds = 0
        self.held = 0

    async def _serve(self, client: trio.SocketStream) -> None:
        if self.holds <= 0:
            await super()._serve(client)
            return
        self.holds -= 1
        self.held += 1
        async with client:
            while await client.receive_some(65536):
                pass  # read and dropped, never answered (until the test ends)


def _held_rejoin_session(url: str, hold_next: Any, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    answer = _send(page, "how many ticks?")
    playwright.expect(answer).to_contain_text("tick tick tick")
    hold_next()  # the stream drops; the page's next re-join is taken and never answered
    try:
        # REJOIN_FOR (30 s) and a re-join after that, with room to spare.
        playwright.expect(page.get_by_test_id("send")).to_be_enabled(timeout=80_000)
        busy = False
    except AssertionError:
        busy = True
    return {"busy": busy, "text": answer.locator(".answer").inner_text(),
            "notes": answer.locator(".note").all_inner_texts()}


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
async def test_page_rejoin_that_is_never_answered_is_not_waited_for_ever(
        settings: Settings) -> None:
    """The chat page's stream drops mid-answer, and the proxy in front of the service takes
    the page's first re-join and never answers it (no status, no close); later connections
    pass. The user sees the reply stop mid-sentence with Stop still showing and Send
    disabled, for good: no note, no "reload to re-join", and no new message can be sent; the
    run meanwhile succeeded. The page should bound a re-join as it bounds everything else
    (REJOIN_FOR without a word from the service), then try again (and get the rest of the
    answer) or say it gave up. ``followEvents`` awaits the re-join's ``fetch`` with no
    timeout (``live.signal`` is undefined for the page's own run) and only counts
    ``REJOIN_FOR`` between attempts; ``sseFrames``'s silence watchdog starts only once the
    headers came. (The terminal's watchdog covers the headers too.)"""
    async with e2e(settings, "llamacpp") as env, \
            serving(HoldsNextConnections(port_of(env.server))) as proxy:
        env.sim.script(SimReply(text="tick " * _TICKS, interval=0.05))

        def hold_next() -> None:
            def now() -> None:
                proxy.holds = 1
                proxy.cut()
            trio.from_thread.run_sync(now)

        seen = await _in_browser(partial(_held_rejoin_session, proxy.url, hold_next))
        stored = await env.the_reply()
        held = proxy.held
    assert held == 1, "the page's re-join never reached the proxy"
    assert not seen["busy"], ("the page is still re-joining, Send disabled, "
                              f"{len(seen['text'].split())} of {_TICKS} words shown", seen["notes"])
    assert seen["text"].split() == stored["content"].split() == ["tick"] * _TICKS, seen["notes"]


# -- 3. a tool_choice forcing a function it does not name: answered as "auto" -----------------


_WEATHER: Any = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
_NEWS: Any = {"type": "function", "function": {"name": "get_news", "parameters": {
    "type": "object", "properties": {}}}}


@pytest.mark.parametrize("choice", [
    {"type": "function", "function": {}},
    {"type": "function", "function": {"name": 5}},
    {"type": "function"},
], ids=["no-name", "name-not-a-string", "no-function"])
async def test_v1_tool_choice_forcing_a_function_it_does_not_name_is_a_422(
        settings: Settings, choice: Any) -> None:
    """A client forces a tool call with a ``tool_choice`` whose function has no name (``{}``),
    a name that is not a string (``5``), or no ``function`` at all. The service accepts it and
    the run goes on as if the choice were ``auto``: on Ollama every tool is offered and the
    model may answer in text, while the client waits for the call it forced (the defect fixed
    in this session for a named choice). It should be a 422 naming ``tool_choice``, as OpenAI
    refuses it (400 "Missing required parameter: 'tool_choice.function.name'", or its type) and
    as this diff now refuses a ``function`` that is not an object. The new check in
    ``_a_named_tool_is_offered`` looks at the ``function``'s type only; a missing or non-string
    ``name`` then skips the "named a tool not offered" check (``isinstance(named, str)``)."""
    async with e2e(settings, "ollama") as env:
        with trio.fail_after(GUARD):
            r = await env.client.post("/v1/chat/completions", json={
                "model": "sim-model", "messages": [{"role": "user", "content": "weather?"}],
                "tools": [_WEATHER, _NEWS], "tool_choice": choice})
    assert r.status_code in (400, 422), (r.status_code, r.text[:300])
    assert "tool_choice" in r.text, r.text[:300]



# -- 4. the terminal: Ctrl-C during a long Retry-After, the cancel accepted: a failed turn ------


class EventsInMaintenance(CuttableProxy):
    """A proxy in front of the service (one request per connection) whose streaming route is
    in maintenance while ``refusing_events``: ``GET /api/runs/.../events`` is answered 503
    with ``Retry-After: 30``; every other request (a cancel) passes."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.refusing_events = False
        self.answered = 0  # re-joins answered 503
        self.cancels = 0  # cancels passed on

    async def _serve(self, client: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = await client.receive_some(65536)
            if not data:
                await client.aclose()
                return
            head += data
        line = head.split(b"\r\n", 1)[0]
        if self.refusing_events and line.startswith(b"GET /api/runs/") and b"/events" in line:
            self.answered += 1
            body = b'{"error": {"type": "maintenance", "message": "back soon"}}'
            async with client:
                await client.send_all(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"Retry-After: 30\r\n" + f"Content-Length: {len(body)}\r\n".encode()
                    + b"Connection: close\r\n\r\n" + body)
            return
        if line.startswith(b"POST /api/runs/") and line.split(b" ")[1].endswith(b"/cancel"):
            self.cancels += 1
        # One request per connection: the service closes it after its answer.
        head = head.replace(b"\r\n", b"\r\nConnection: close\r\n", 1)
        with trio.CancelScope() as scope:
            self._open.add(scope)
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.port)
                async with client, upstream, trio.open_nursery() as nursery:
                    await upstream.send_all(head)
                    nursery.start_soon(self._pump, client, upstream)
                    nursery.start_soon(self._pump, upstream, client)
            except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                self._open.discard(scope)


@pytest.mark.slow
async def test_terminal_ctrl_c_during_a_long_retry_after_ends_the_turn_as_stopped(
        settings: Settings) -> None:
    """The terminal's stream is cut mid-answer and its re-join answered 503 ``Retry-After:
    30`` (the streaming route in maintenance; cancels still pass). During that wait the user
    presses Ctrl-C once: "[cancelling the run; Ctrl-C again to quit]", and the service accepts
    the cancel (202: the run ends ``cancelled``, its partial answer stored). The user then
    waits out the rest of the 30 s with nothing happening, and the turn ends as a *failure*:
    "service chat: peer closed connection without sending complete message body" (the cut's
    error, the first since the last event: neither the stop nor the maintenance is said; a
    one-shot chat exits 1, not 130; a chat fed from a pipe exits 1), and a second cancel is
    sent for a run already stopped. It should end as the user's own stop: the run was
    cancelled as asked; at most its end is re-joined once to show it. ``_stream`` never looks
    at ``turn.cancelling``/``turn.cancelled``: it goes on sleeping the Retry-After, then
    re-joins past the 30 s count (the "one more re-join after a Retry-After" of this diff),
    is refused and gives up as for an outage."""
    backend = ScriptedBackend([Reply("tick " * _TICKS, gap=0.05)])
    async with running_server(settings, backend) as srv, srv.client() as client, \
            serving(EventsInMaintenance(port_of(srv))) as proxy, trio.open_nursery() as nursery:
        conv = (await client.post("/api/conversations", json={})).json()["id"]
        out, err = StringIO(), StringIO()
        renderer = chat.Renderer(Console(file=out, force_terminal=False),
                                 Console(file=err, force_terminal=False, width=200))
        opts = chat.Options(url=proxy.url, key=None, agent=None, model=None,
                            conversation=conv, message=None)
        outcome: list[Any] = []
        nursery.start_soon(_turn, opts, renderer, conv, "count the ticks", outcome)
        with trio.fail_after(GUARD):
            while len(out.getvalue().split()) < 5:  # noqa: ASYNC110
                await trio.sleep(0.02)
            proxy.refusing_events = True
            proxy.cut()
            while not proxy.answered:  # noqa: ASYNC110 (the re-join refused: now waiting)
                await trio.sleep(0.02)
            await trio.sleep(0.5)
            os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C, once
            while not outcome:  # noqa: ASYNC110
                await trio.sleep(0.05)
        reply = await first_reply(client, conv)
        run = await run_over(client, reply["run_id"])
    assert run["status"] == "cancelled", run  # the cancel was accepted: stopped as asked
    assert outcome == [None], (outcome, err.getvalue()[-400:])
