"""Found by a review of the WebSocket endpoint under faults (2026-12-05); each test failed before
its fix: a peer answering no ping on a quiet run lived on with its cancel run (service/wsping.py
now closes a socket that has sent nothing for four ping intervals); a client reading nothing
held a shutdown until the stall limit (service/sendstall.py: no write waits past the graceful
timeout once the runs are drained); a client briefly behind at a shutdown got its runs' ends
and then a 1006 (close_when_drained gave up silently after 5 s). Real hypercorn servers on
127.0.0.1:0 with the scripted backend; the client is tests/api/test_ws_and_v1_faults.py's raw
wsproto socket (a test decides when, and whether, it reads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio
from wsproto.events import CloseConnection, Message, Ping

from service.settings import load_settings

from .api.test_ws_and_v1_faults import GUARD, RawWS, _conversation, socket_with_a_run
from .fakes import Reply, ScriptedBackend
from .servers import running_server


async def _pings_and_close(ws: RawWS) -> tuple[int, Any]:
    """Reads what is there, answering nothing: the pings found, and how it ended (a close
    frame, None for a cut connection, or "open")."""
    pings, end = 0, "open"
    with trio.move_on_after(1):
        while True:
            data = await ws.stream.receive_some(65536)
            if not data:
                return pings, None
            ws.conn.receive_data(data)
            for e in ws.conn.events():
                if isinstance(e, Ping):
                    pings += 1
                elif isinstance(e, CloseConnection):
                    return pings, e
    return pings, end


async def _behind(srv: Any) -> tuple[RawWS, str]:
    """A socket with a tiny receive buffer that asked for a run, read its first reply and then
    nothing for 0.5 s: its window is full. The socket and the run's id."""
    conv = await _conversation(srv)
    ws = await RawWS.open(srv, rcvbuf=4096)
    await ws.send({"type": "message", "conversation_id": conv, "content": "q"})
    started = await ws.recv()
    assert isinstance(started, dict), started
    await trio.sleep(0.5)
    return ws, started["run_id"]


# -- 1. a peer that answers no ping, on a quiet run ---------------------------------------------


async def test_a_ws_peer_that_answers_no_ping_on_a_quiet_run_is_dropped_and_its_run_cancelled(
    tmp_path: Path,
) -> None:
    # docs/architecture.md: "A client that stops reading altogether but keeps its connection
    # open is dropped once it has taken nothing for four keep-alive intervals ... its response
    # ends as if it had left, so its cancel runs stop." On a WebSocket the server pings every
    # keep-alive interval (docs/api.md), and a pong is the proof a client reads. This client
    # (a frozen tab, a peer behind a dead NAT mapping) reads nothing and answers no ping while
    # its run is quiet (a model thinking, a slow tool). The pings are 2 bytes each: they never
    # fill a socket buffer, so sendstall's write bound never fires, and nothing looks at pongs
    # (hypercorn 0.18 has no pong timeout; service/wsping.py only sends). The socket and its
    # on_disconnect=cancel run live on for nobody: until SERVICE_RUN_TIMEOUT ends the run, and
    # until TCP gives up on the socket (never, for a peer that is alive but wedged).
    keepalive = 0.25  # pings every 0.25 s; the write bound is its minimum, 2 s
    backend = ScriptedBackend(lambda req: Reply("a b c d", hang_after=1))  # then quiet
    settings = load_settings(db=tmp_path / "s.db", sse_keepalive=keepalive)
    waited = 24 * keepalive  # six times the "four keep-alive intervals"
    # As service.server.build_config serves it: pinged every SERVICE_SSE_KEEPALIVE.
    async with (running_server(settings, backend, websocket_ping_interval=keepalive) as srv,
                socket_with_a_run(srv) as (ws, handle)):
        # From here on the client reads nothing, and so answers no ping.
        with trio.move_on_after(waited):
            await handle.finished.wait()
        status, reason = handle.status.value, handle.cancel_reason
        upstream_open = not backend.streams[0].closed
        pings, end = await _pings_and_close(ws)  # what the server sent meanwhile
    assert pings >= 4, f"the server sent {pings} pings in {waited} s (keep-alive {keepalive})"
    # Now: ('running', None, True), end 'open': 20+ pings unanswered, the socket and its run
    # still up.
    assert (status, upstream_open) == ("cancelled", False), (
        f"{waited} s and {pings} unanswered pings after the client stopped reading, its "
        f"cancel run is {status} (reason {reason}), upstream open: {upstream_open}, "
        f"socket: {end}")


# -- 2. a client that reads nothing at a shutdown ------------------------------------------------

BIG = ("x" * 4000 + " ") * 3100  # 12 MB of tokens: far more than socket buffers hold


async def test_a_ws_client_that_reads_nothing_does_not_hold_a_shutdown_past_graceful_timeout(
    tmp_path: Path,
) -> None:
    # CHANGELOG: a client that stops reading "can no longer hold a shutdown past
    # graceful_timeout"; docs/operations.md: after the drain "hypercorn close[s] listeners and
    # connections (graceful_timeout, 5 s)"; service/workers.py's kill bound counts the drain,
    # the final writes, closing and graceful_timeout. But a socket's send loop parked in a
    # write to a client that reads nothing is under sendstall's *shielded* scope, whose only
    # deadline is the stall limit (4 keep-alive intervals, 60 s by default, counted from the
    # write's start or its last progress): hypercorn's graceful cancel cannot reach it, so the
    # shutdown waits for the stall limit, not graceful_timeout. With SERVICE_SSE_KEEPALIVE=30
    # (a proxy with a 60 s idle timeout) that is 120 s, past --workers' 75 s kill bound.
    keepalive = 3.0  # the stall limit is 12 s
    graceful = 1.0
    limit = 6.0  # drain 0.3 s + graceful 1 s + a wide margin; well under the 12 s stall limit
    backend = ScriptedBackend(lambda req: Reply(BIG, hang_after=3000))
    settings = load_settings(db=tmp_path / "s.db", sse_keepalive=keepalive, shutdown_drain=0.3)
    leaving = trio.Event()
    unstuck: list[float] = []
    ws: RawWS | None = None
    run_id = ""

    async def unstick() -> None:
        await leaving.wait()
        await trio.sleep(limit)
        unstuck.append(trio.current_time())
        assert ws is not None
        await ws.stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(unstick)
        async with running_server(settings, backend, graceful_timeout=graceful) as srv:
            ws, run_id = await _behind(srv)  # the client reads nothing more
            leaving.set()
            start = trio.current_time()
        took = trio.current_time() - start
        nursery.cancel_scope.cancel()
    await ws.stream.aclose()
    # What the store holds of the run (checked on a fresh server on the same store).
    async with running_server(settings, backend) as srv, srv.client() as client:
        run = (await client.get(f"/api/runs/{run_id}")).json()
    assert (run["status"], run.get("error")) == ("cancelled", "shutdown"), run
    # Now: the shutdown ended only when the test closed the client's socket, `limit` s later.
    assert not unstuck, (
        f"the shutdown took {took:.1f} s with graceful_timeout={graceful}: it ended only when "
        "the client that read nothing closed its socket")


# -- 3. close_when_drained gives up: a client told nothing of the close --------------------------


async def test_a_ws_client_that_paused_across_a_shutdown_gets_its_runs_ends_and_then_1001(
    tmp_path: Path,
) -> None:
    # docs/api.md: "At a shutdown, once the runs are drained and their ends sent, every
    # socket is closed with 1001 Going Away." close_when_drained waits _CLOSE_WAIT (5 s) for
    # the socket's forwarders, then gives up *silently*: no 1001 is ever queued. A client that
    # is briefly behind at the shutdown (a backgrounded tab, a congested link: 6 s without
    # reading, far inside the 60 s stall limit) then reads on, gets every event and its run's
    # run.finished - and the socket stays open, saying nothing, until hypercorn's
    # graceful_timeout cuts the TCP connection: the client sees 1006 (an abnormal drop: a
    # network failure, not a restart), though the server had all the time to say 1001.
    backend = ScriptedBackend(lambda req: Reply(BIG, hang_after=500))  # 2 MB, then quiet
    settings = load_settings(db=tmp_path / "s.db", shutdown_drain=0.3)  # stall limit 60 s
    graceful = 12.0
    paused = 6.0  # > _CLOSE_WAIT
    seen: list[Any] = []
    run_id = ""

    async with (trio.open_nursery() as nursery,
                running_server(settings, backend, graceful_timeout=graceful) as srv):
        ws, run_id = await _behind(srv)  # the client is behind

        async def pause_then_read() -> None:
            await trio.sleep(paused)
            with trio.fail_after(graceful + GUARD):
                while True:
                    while ws.pending:
                        e = ws.pending.pop(0)
                        if isinstance(e, Message):
                            seen.append(e.data)
                        elif isinstance(e, CloseConnection):
                            seen.append(e)
                            return
                    if not await ws._pump():  # answers pings, as a browser does
                        seen.append(None)  # cut without a close frame: 1006
                        return

        nursery.start_soon(pause_then_read)
    # (leaving: the shutdown drains the run, then hypercorn waits for the socket)
    await ws.stream.aclose()
    text = "".join(m for m in seen if isinstance(m, str))
    assert '"type":"run.finished"' in text, "the run's end never reached the client"
    told = json.loads(text[text.rindex('{"run_id"'):])["data"]["status"]
    async with running_server(settings, backend) as srv, srv.client() as client:
        run = (await client.get(f"/api/runs/{run_id}")).json()
    assert run["status"] == told, (told, run)  # the client was told what the store holds
    end = seen[-1]
    # Now: None - the connection cut at graceful_timeout, 6 s after the client had read its
    # run's end, with no close frame.
    assert isinstance(end, CloseConnection), (
        f"the client read its run's run.finished, then the connection was cut without a "
        f"close frame ({end!r}: a 1006) at graceful_timeout; run {run_id}")
    assert end.code == 1001, end
