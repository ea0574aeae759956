"""What clients are told versus what the store has, under faults found by a review (each
test failed before its fix).

Real server on 127.0.0.1, real simulator upstream, faults injected only through
``store.faults``; on both stores.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from service.settings import Settings
from service.sim import Reply
from service.store.faults import InjectedFault

from ..e2e import GUARD, EventStream, after_tokens, e2e, read_events, tokens
from ..servers import start_service

pytestmark = pytest.mark.both_stores


async def _wait(predicate: Any, what: str, guard: float = 3 * GUARD) -> None:
    with trio.fail_after(guard):
        while not await predicate():  # noqa: ASYNC110 (polling the store's answer)
            await trio.sleep(0.05)


async def test_rejoin_on_another_instance_gets_every_token_the_store_has(
    settings: Settings, tmp_path: Path
) -> None:
    # Instance A runs the run; instance B (another process on the same store) serves a re-join.
    # A batch of the run's tokens is refused once while in flight, and the run's final state,
    # queued behind it, lands: the store has the run's end with a hole in its events, which
    # A writes again a moment later. A client re-joining on B must still get every token the
    # store has (and will have): the stored reply is the concatenation of the tokens.
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(tokens=30, interval=0.03))
        store = env.server.services.require_store()
        sup = env.server.services.require_supervisor()
        proc, b_url = await start_service(settings.db, env.sim.url, tmp_path, name="b")
        try:
            conv = await env.conversation()
            armed = threading.Event()
            release = threading.Event()
            tick = threading.Event()  # never set: a pause in the writer thread
            calls = [0]
            handles: list[Any] = []

            def before_commit() -> None:  # in A's writer thread, before COMMIT
                if not armed.is_set():
                    return
                calls[0] += 1
                if calls[0] == 1:
                    # The batch in flight (tokens): held until the run has ended and its
                    # final state is on its way (before the fix: queued behind this batch,
                    # then landing without it), then refused (an I/O error).
                    deadline = time.monotonic() + 2 * GUARD
                    while not handles[0].closed:
                        assert time.monotonic() < deadline
                        tick.wait(0.005)
                    tick.wait(0.3)
                    raise InjectedFault("disk I/O error")
                if not handles[0].final_stored:
                    return  # the final state (and what goes before it) lands
                release.wait(2 * GUARD)  # then nothing more (a refused batch's retry) for now

            store.faults.before_commit = before_commit
            async with env.post_stream(conv, "go", on_disconnect="continue") as r:
                stream = EventStream(r)
                with trio.fail_after(GUARD):
                    seen = await stream.read(after_tokens(5))
                run_id = seen[0].data["run_id"]
                handles.append(sup.get(run_id))
                armed.set()
                async with httpx.AsyncClient(base_url=b_url, timeout=GUARD) as b:

                    async def stored_end() -> bool:
                        run = (await b.get(f"/api/runs/{run_id}")).json()
                        return bool(run["status"] == "succeeded")

                    await _wait(stored_end, "the run's end in the store")
                    with trio.fail_after(GUARD):
                        async with b.stream("GET", f"/api/runs/{run_id}/events") as rb:
                            rejoined = await read_events(rb)
                release.set()
                with trio.fail_after(GUARD):
                    seen += await stream.read()
            store.faults.before_commit = None
        finally:
            release.set()
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(GUARD, shield=True):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
        reply = await env.reply_of(conv, run_id)
        assert reply["status"] == "complete"
        assert "".join(tokens(seen)) == reply["content"]  # the owner's client: all of it
        assert rejoined[-1].type == "run.finished"
        # The re-join on B: every token the store has, in order, no hole.
        assert [e.id for e in rejoined] == list(range(1, len(rejoined) + 1))
        assert "".join(tokens(rejoined)) == reply["content"]
