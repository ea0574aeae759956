"""A review of the commits of 2026-12-05 after cc87a94 (3384e5a, 7bbf2ea, 182daad, 4dffd78):
the terminal client's ``on_disconnect: continue`` and its ways out of a turn, and the model a
run closed by another instance is stored with. Each test shows a defect those commits
introduced or left, and fails on the code it was written against.

Real servers on 127.0.0.1 (the app under hypercorn on port 0 in this process; a run's owner
that dies is a real ``python -m service`` process killed with SIGKILL), the real simulator
upstream where the backend matters, the real terminal client (a process on a pseudo-terminal,
or its ``Client`` in this process).
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from io import StringIO
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from rich.console import Console

from service import chat
from service.backends.base import ChatRequest
from service.settings import Settings
from service.sim import Reply as SimReply
from service.sim import Simulator, open_simulator

from .clients.test_chat_cli import GUARD as CLI_GUARD
from .clients.test_chat_cli import _terminal
from .e2e import e2e
from .fakes import Reply, ScriptedBackend, by_content
from .proxies import CuttableProxy, freezable, port_of, serving
from .run_ends import first_reply, run_over
from .servers import running_server, start_service

GUARD = 60  # seconds any wait may take before the test fails (a process start included)


# -- 1. the terminal's second Ctrl-C before its run is known -------------------------------------


def _short_answer(req: ChatRequest) -> Reply:
    # Paced (5 s), so that a cancel sent once the run is known finds it still going.
    return Reply("the whole answer, generated for nobody " * 10, gap=0.1)


@pytest.mark.slow
async def test_cli_a_second_ctrl_c_before_the_run_is_known_leaves_it_running(
    settings: Settings,
) -> None:
    """The terminal now posts ``on_disconnect: continue`` (7bbf2ea), so its stream going away
    no longer stops its run; "a second Ctrl-C sends the cancel before quitting" is meant to
    cover that. But ``_on_interrupts`` sends that cancel only ``if turn.run_id is not None``:
    a Ctrl-C pressed twice while the POST is still waiting for ``run.started`` (the store slow
    to commit the run's first write: a write taken into a commit lands whole, its caller
    waits for it shielded) quits at once and sends nothing. The run's write lands, the run
    starts, and it runs to its end for nobody: upstream generation the user stopped twice,
    stored ``succeeded`` while the terminal said "[cancelling the run ...]" and
    "[interrupted]". Before 7bbf2ea (``on_disconnect: cancel``) the dropped POST cancelled it
    (``CancelOwnedRuns``).

    Root cause: service/chat.py:425-436 (``_on_interrupts``: no run id, no cancel) with
    service/chat.py:329 (``on_disconnect: continue`` for the whole POST). Fix: on a second
    Ctrl-C before ``run.started``, keep the POST's stream for a bounded while (the same
    ``_QUIT_CANCEL_WAIT``) to learn the run id and cancel it; or post ``on_disconnect:
    cancel`` and switch to re-joinable only once the run is known (a re-join never cancels).

    Fixed the first way: the second Ctrl-C waits (at most 2 s) for the run's id and cancels
    it. A write that takes longer than that leaves the run to its ``continue``: its result is
    stored on the conversation, which the user has (the service does not cancel a
    ``continue`` run whose client left before its id: tests/backends/test_end_to_end.py)."""
    async with running_server(settings, ScriptedBackend(_short_answer)) as srv, \
            srv.client() as client:
        store = srv.services.require_store()
        begin = store.begin_run
        asked, answer = trio.Event(), trio.Event()

        async def slow_first_write(*args: Any, **kwargs: Any) -> Any:
            # A write taken into a slow commit: it lands whole, its caller cancelled or not.
            asked.set()
            with trio.CancelScope(shield=True):
                await answer.wait()
                return await begin(*args, **kwargs)

        store.begin_run = slow_first_write  # type: ignore[method-assign]
        async with _terminal(srv) as term:
            at = await term.wait_for(r"you> ")
            await term.type("please answer\r")
            with trio.fail_after(CLI_GUARD):
                await asked.wait()  # the POST waits for its run's first write
            await term.type("\x03")
            at = await term.wait_for(r"Ctrl-C again to quit", after=at)
            await term.type("\x03")
            answer.set()  # the commit completes (within the client's bound for its cancel)
            with trio.fail_after(CLI_GUARD):
                status = await term.process.wait()
            await term.drain()
        assert status == 130, term.screen
        (conv,) = (await client.get("/api/conversations")).json()["data"]
        with trio.fail_after(GUARD):
            while (reply := await first_reply(client, conv["id"]))["run_id"] is None:  # noqa: ASYNC110
                await trio.sleep(0.05)
        run = await run_over(client, reply["run_id"])
        reply = await first_reply(client, conv["id"])
    assert run["status"] == "cancelled", (
        f"the user pressed Ctrl-C twice before the run was known and the terminal quit "
        f"(exit {status}); the run went on and ended {run['status']!r}, its reply "
        f"{reply['content']!r} stored as {reply['status']!r}")


# -- 2. the terminal's silence watchdog ----------------------------------------------------------


SILENCE = 1.5  # chat.READ_TIMEOUT for the test (60 s in the client): four keep-alives and more


async def test_cli_a_stream_gone_silent_fails_the_turn_while_its_run_goes_on(
    settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The terminal's stream goes silent mid-answer without being closed (a laptop lid, a NAT
    that forgot the connection, a wedged proxy): no token, no keep-alive. Its watchdog gives
    up after four keep-alive intervals (``READ_TIMEOUT`` at least) and fails the turn: "the
    service stopped answering". It neither re-joins (only a ``TransportError`` is re-joined;
    the page re-joins a silent stream) nor cancels the run, and since 7bbf2ea the run is
    ``on_disconnect: continue``: it goes on and is stored ``succeeded``, whole. The user was
    told the turn failed (exit 1 for a one-shot) while the store holds the complete answer
    the client never showed, and the service was answering all along (new connections pass).
    Before 7bbf2ea the give-up closed the POST and cancelled the run: what the client said
    and what the store held agreed.

    Root cause: service/chat.py:352-367 (``_stream`` re-joins on ``httpx.TransportError``
    only) and :383-396 (``_follow``: the watchdog's give-up is a ``ChatError``). Fix: treat a
    silent stream as a dropped one: re-join with ``Last-Event-ID`` (up to ``_REJOINS``), and
    cancel the run (bounded) when the turn is given up for good."""
    monkeypatch.setattr(chat, "READ_TIMEOUT", SILENCE)
    async with e2e(settings, "llamacpp", sse_keepalive=0.25) as env, \
            freezable(env.server) as proxy, trio.open_nursery() as nursery:
        env.sim.script(SimReply(text="tick " * 60, interval=0.05))  # 3 s
        conv = await env.conversation()
        out, err = StringIO(), StringIO()
        renderer = chat.Renderer(Console(file=out, force_terminal=False),
                                 Console(file=err, force_terminal=False, width=200))
        opts = chat.Options(url=proxy.url, key=None, agent=None, model=None,
                            conversation=conv, message=None)
        outcome: list[Any] = []

        async def turn() -> None:
            try:
                await chat._one_turn(opts, renderer, conv, "count ticks")
            except* (chat.ChatError, httpx.HTTPError) as group:  # as _run_turn takes them
                outcome.append(group.exceptions[0])
            else:
                outcome.append(None)

        nursery.start_soon(turn)
        store = env.server.services.require_store()
        with trio.fail_after(GUARD):
            while (reply := await first_reply(env.client, conv))["run_id"] is None:  # noqa: ASYNC110
                await trio.sleep(0.02)
            run_id = reply["run_id"]
            while sum(e.type == "token" for e in await store.list_run_events(run_id)) < 5:  # noqa: ASYNC110
                await trio.sleep(0.02)
            proxy.freeze()
            while not outcome:  # noqa: ASYNC110
                await trio.sleep(0.05)
        run = await run_over(env.client, run_id)
        stored = await first_reply(env.client, conv)
    shown = out.getvalue()
    assert outcome[0] is None or run["status"] == "cancelled", (
        f"the terminal gave up the turn ({outcome[0]}); the run went on and ended "
        f"{run['status']!r} with its reply stored {stored['status']!r}, "
        f"{len(stored['content'].split())} ticks, of which the terminal showed "
        f"{shown.count('tick')}")
    if outcome[0] is None:
        assert shown.split() == stored["content"].split(), shown


# -- 3. the model of a dead owner's run after a call that named one and streamed no text ---------


@asynccontextmanager
async def _owner(settings: Settings, cwd: Path, **env: str
                 ) -> AsyncIterator[tuple[trio.Process, httpx.AsyncClient]]:
    """The run's owner: ``python -m service`` on the test's store, in a process of its own
    (so that it can die as a process dies: SIGKILL, no ``finally``)."""
    proc, base = await start_service(settings.db, env.pop("SERVICE_LLAMACPP_URL"), cwd,
                                     name="owner", env_extra=env)
    try:
        async with httpx.AsyncClient(base_url=base, timeout=GUARD) as http:
            yield proc, http
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.move_on_after(GUARD, shield=True):
            await proc.wait()


ACTION = ('Thought: I need the calculator for this.\nAction: calculator\n'
          'Action Input: {"expression": "23 * 68"}')


@pytest.mark.both_stores
async def test_a_dead_owners_run_keeps_the_model_its_owner_named_without_a_token(
    settings: Settings, tmp_path: Path,
) -> None:
    """A ``react`` run names no model. Its first turn (a text-protocol action) streams from
    ``sim-model``: its first token carries ``model: sim-model`` (182daad). Its second turn is
    answered by another model (``sim-model-b``: a fleet's other server, an alias resolved
    differently) with native tool calls only: no text, so no token. The live owner now names
    ``sim-model-b`` (``GET /api/runs/{id}``; its ``run.finished`` would say so, and it would
    store it). The third turn hangs; the owner dies (SIGKILL) and another instance closes
    the run.

    Told vs stored: the client was told ``sim-model-b``; the store (``GET /api/runs/{id}``,
    and the ``run.finished`` every follower is told) says ``sim-model``. The model is only
    persisted on a token, and ``_tell_model`` waits for a token that never came.

    Root cause: service/agents/base.py:319-335 (``_answered_by`` keeps the new model in
    ``_tell_model`` until a token carries it) with service/store/ownership.py:193-195 and
    :222-232 (the survivor reads the model from ``token`` events only). Fix: persist the
    named model when it changes whatever the call streams (e.g. on the ``tool.call`` /
    ``thought`` event that the call emits first, or an event of its own), or have the
    survivor take the model from the last event of the run that carries one."""
    sim = Simulator(("sim-model",))
    sim.script(
        SimReply(text=ACTION),
        SimReply(text="", model="sim-model-b",
                 tool_calls=({"name": "calculator", "arguments": {"expression": "1564 / 4"}},)),
        SimReply(text="", hang_after=0, model="sim-model-b"),
    )
    async with (open_simulator(sim), running_server(settings) as survivor,
                survivor.client() as b):
        store = survivor.services.require_store()
        with trio.fail_after(GUARD):
            async with _owner(settings, tmp_path, SERVICE_LLAMACPP_URL=sim.url) as (proc, a):
                conv = (await a.post("/api/conversations", json={})).json()["id"]
                async with a.stream("POST", f"/api/conversations/{conv}/messages", json={
                        "content": "what is 23 * 68, divided by 4?", "stream": True,
                        "agent": "react", "on_disconnect": "continue"}) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data:") and '"run_id"' in line:
                            break
                reply = await first_reply(a, conv)
                run_id = reply["run_id"]
                # (another process's commits: polled) both tool calls done, the third turn on
                while sum(e.type == "tool.result"  # noqa: ASYNC110
                          for e in await store.list_run_events(run_id)) < 2:
                    await trio.sleep(0.02)
                while (live := (await a.get(f"/api/runs/{run_id}")).json())["model"] != \
                        "sim-model-b":  # noqa: ASYNC110
                    await trio.sleep(0.02)
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
            async with b.stream("GET", f"/api/runs/{run_id}/events") as r:
                await r.aread()
            stored = (await b.get(f"/api/runs/{run_id}")).json()
            events = await store.list_run_events(run_id)
    told = [e.data.get("model") for e in events if e.type == "token" and "model" in e.data]
    assert told == ["sim-model"], told
    assert live["model"] == "sim-model-b", live
    assert stored["status"] == "failed", stored
    finished = events[-1]
    assert finished.type == "run.finished", finished
    assert (stored["model"], finished.data.get("model")) == ("sim-model-b", "sim-model-b"), (
        f"the live owner told model {live['model']!r}; once it died the run is stored with "
        f"{stored['model']!r} and its run.finished says {finished.data.get('model')!r}")


# -- 4. the terminal's stream dropped after its run.finished -------------------------------------


class CutAfterTheEnd(CuttableProxy):
    """Passes everything until a response's ``run.finished`` frame, which it passes whole,
    then drops the connection before the rest of the body (the chunked body's end): a
    connection lost right after the run's end was delivered."""

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream) -> None:
        seen = b""
        while data := await src.receive_some(65536):
            seen += data
            at = seen.find(b"event: run.finished")
            end = seen.find(b"\n\n", at) if at >= 0 else -1
            if end >= 0:
                await dst.send_all(data[:end + 2 - (len(seen) - len(data))])
                self.cut()  # both connections dropped, the body's end not sent
                return
            await dst.send_all(data)
        await dst.send_eof()


async def test_cli_a_stream_dropped_after_its_run_finished_is_not_a_failed_turn(
    settings: Settings,
) -> None:
    """The terminal's stream delivers the whole answer and the run's ``run.finished``
    (``succeeded``), then the connection drops before the body's last bytes (a proxy or Wi-Fi
    blip at that moment). 7bbf2ea's ``_stream`` re-joins a dropped stream, but for one whose
    end was already seen (``turn.status is not None``) it re-raises the ``TransportError``:
    the turn fails, "service chat: cannot reach the service: ...", exit 1 for a one-shot
    (and a piped chat's exit status says a turn failed), right under an answer it showed
    whole and the store keeps ``succeeded``.

    Root cause: service/chat.py:365-367: ``turn.status is not None`` is grouped with the
    cases that cannot be re-joined and raises; a stream that broke after the run's end has
    nothing left to show. Fix: ``if turn.status is not None: return`` (the turn is over)
    before deciding whether to re-join."""
    async with running_server(settings, ScriptedBackend(by_content)) as srv, \
            srv.client() as client, serving(CutAfterTheEnd(port_of(srv))) as proxy:
        conv = (await client.post("/api/conversations", json={})).json()["id"]
        out, err = StringIO(), StringIO()
        renderer = chat.Renderer(Console(file=out, force_terminal=False),
                                 Console(file=err, force_terminal=False, width=200))
        opts = chat.Options(url=proxy.url, key=None, agent=None, model=None,
                            conversation=conv, message=None)
        failure: BaseException | None = None
        turn: chat.Turn | None = None
        with trio.fail_after(GUARD):
            try:
                _, turn = await chat._one_turn(opts, renderer, conv, "hello there")
            except* (chat.ChatError, httpx.HTTPError) as group:  # as _run_turn takes them
                failure = group.exceptions[0]
        stored = await first_reply(client, conv)
    assert stored["status"] == "complete", stored
    assert "echo: hello there" in out.getvalue(), out.getvalue()  # shown whole, and its end
    assert failure is None, (
        f"the terminal showed the whole answer and its run.finished (succeeded; stored "
        f"{stored['status']!r}), then failed the turn with {failure!r}")
    assert turn is not None
    assert turn.status == "succeeded", turn
