"""Review (dec07z): ``python -m service --workers 2`` on ONE host sharing the default SQLite
store, under faults, with every client's view checked against the store.

The SQLite, one-host, ``--workers`` counterpart of ``test_review_chaos_dec07y.py``. Real
processes (the parent and its spawned workers), the simulated llama.cpp upstream on a real
socket, real signals. Each connection is placed on a chosen worker (new connections until the
kernel hands one to it, found from /proc as ``tests/operations/test_workers_faults.py`` does).
At the end the same SQLite file is read (directly and through a fresh single server) and each
client's view (run ids, events, tokens shown, the end it was told) is compared with it.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, connect_websocket_url

from service.sim import Reply, Simulator, open_simulator

from .operations.test_workers import _children
from .operations.test_workers_faults import _alive, _owner_pid, _reap, _start, _stop
from .servers import pid_serving_port, start_service
from .streams import parse_sse, read_sse

pytestmark = pytest.mark.slow

GUARD = 30.0
STREAM_TIMEOUT = httpx.Timeout(GUARD, connect=5)
TERMINAL = {"succeeded", "failed", "cancelled", "timed_out"}


# -- placing a connection on a worker --------------------------------------------------------


async def _http_on(url: str, pid: int, pids: set[int]) -> httpx.AsyncClient:
    """A client whose one kept-alive connection is served by worker ``pid``."""
    for _ in range(300):
        http = httpx.AsyncClient(base_url=url, timeout=STREAM_TIMEOUT,
                                 limits=httpx.Limits(max_connections=1))
        r = await http.get("/healthz")
        port = r.extensions["network_stream"].get_extra_info("client_addr")[1]
        if pid_serving_port(port, pids) == pid:
            return http
        await http.aclose()
    raise AssertionError(f"no connection reached worker {pid} of {pids}")


@asynccontextmanager
async def _ws_on(url: str, pid: int, pids: set[int]) -> AsyncIterator[WebSocketConnection]:
    """A WebSocket served by worker ``pid``. Left by dropping its TCP connection (a client
    that is gone: no closing handshake; trio-websocket's own close raced a server ping
    into a LocalProtocolError of its reader task)."""
    ws_url = url.replace("http://", "ws://") + "/api/ws"
    placed = False
    for _ in range(300):
        async with trio.open_nursery() as nursery:
            ws = await connect_websocket_url(nursery, ws_url)
            try:
                local = ws.local
                assert not isinstance(local, str)
                if pid_serving_port(local.port, pids) == pid:
                    placed = True
                    yield ws
            finally:
                nursery.cancel_scope.cancel()
                stream = ws._stream  # a drop, not a close
                if isinstance(stream, trio.SocketStream):
                    stream.socket.close()
        if placed:
            break
    else:
        raise AssertionError(f"no socket reached worker {pid} of {pids}")


# -- what a client was shown ----------------------------------------------------------------


@dataclass
class View:
    """One client's view of one run: its segments (each a connection), in order."""

    name: str
    run_id: str = ""
    conv: str = ""
    segments: list[tuple[str, int, list[dict[str, Any]]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def frames(self) -> list[dict[str, Any]]:
        return [f for _, _, seg in self.segments for f in seg]

    def last_id(self) -> int:
        return max((f["id"] for f in self.frames()), default=0)

    def tokens(self) -> int:
        return len({f["id"] for f in self.frames() if f["event"] == "token"})

    def told(self) -> str | None:
        return next((f["data"]["status"] for f in self.frames()
                     if f["event"] == "run.finished"), None)

    def text(self) -> str:
        seen: dict[int, str] = {}
        for f in self.frames():
            if f["event"] == "token":
                seen.setdefault(f["id"], f["data"]["text"])
        return "".join(seen[i] for i in sorted(seen))

    def segment(self, kind: str, pid: int, start: int) -> list[dict[str, Any]]:
        """A new segment, checked at the end to run ``start``, ``start + 1``, ... (no gap, no
        duplicate)."""
        seg: list[dict[str, Any]] = []
        self.segments.append((f"{kind}@{start}", pid, seg))
        return seg

    def check_segments(self) -> None:
        for kind, pid, seg in self.segments:
            start = int(kind.split("@")[1])
            ids = [f["id"] for f in seg]
            if ids != list(range(start, start + len(ids))):
                self.problems.append(f"{self.name} {kind} on {pid}: ids {ids[:6]}...{ids[-3:]} "
                                     f"(expected from {start}, no gap, no duplicate)")


def _stop_after(view: View, tokens: int | None) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda _seg: tokens is not None and view.tokens() >= tokens


async def _read_sse(resp: httpx.Response, seg: list[dict[str, Any]],
                    stop: Callable[[list[dict[str, Any]]], bool]) -> None:
    def on_frame(f: dict[str, Any]) -> bool:
        seg.append({"id": int(f.get("id", 0)), "event": f.get("event", "message"),
                    "data": f["data"]})
        return f.get("event") == "run.finished" or "id" not in f or stop(seg)

    await read_sse(resp, on_frame)


async def _read_ws(ws: WebSocketConnection, view: View, seg: list[dict[str, Any]],
                   stop: Callable[[list[dict[str, Any]]], bool]) -> None:
    while True:
        msg = json.loads(await ws.get_message())
        if "run_id" not in msg or "id" not in msg:
            view.notes.append(f"ws message {str(msg)[:160]}")
            if msg.get("type") == "error":
                return
            continue
        if view.run_id and msg["run_id"] != view.run_id:
            view.problems.append(f"{view.name}: socket sent run {msg['run_id']}, "
                                 f"expected {view.run_id}")
            return
        view.run_id = str(msg["run_id"])
        seg.append({"id": int(msg["id"]), "event": msg["type"], "data": msg["data"]})
        if msg["type"] == "run.finished" or stop(seg):
            return


async def _sse_post(url: str, pid: int, pids: set[int], view: View, key: str,
                    stop_tokens: int | None, *, on_disconnect: str = "continue",
                    start: int = 1) -> httpx.Response | None:
    """POST the keyed message as a stream on worker ``pid``; read until ``stop_tokens``
    tokens are shown (then drop) or its end. Returns the response (headers) or None."""
    http = await _http_on(url, pid, pids)
    try:
        async with http.stream(
                "POST", f"/api/conversations/{view.conv}/messages",
                json={"content": f"question of {view.name}", "stream": True,
                      "on_disconnect": on_disconnect},
                headers={"Idempotency-Key": f"key-{view.name}"} if key else {}) as r:
            if r.status_code != 200:
                await r.aread()
                view.problems.append(f"{view.name}: POST on {pid}: {r.status_code} {r.text}")
                return None
            run_id = r.headers["X-Run-Id"]
            if view.run_id and run_id != view.run_id:
                view.problems.append(f"{view.name}: re-send on {pid} named run {run_id}, "
                                     f"first was {view.run_id}")
            view.run_id = view.run_id or run_id
            seg = view.segment("post", pid, start)
            try:
                await _read_sse(r, seg, _stop_after(view, stop_tokens))
            except httpx.HTTPError as e:
                view.notes.append(f"POST stream on {pid}: {type(e).__name__}")
            return r
    finally:
        await http.aclose()


async def _sse_rejoin(url: str, pid: int, pids: set[int], view: View,
                      stop_tokens: int | None) -> None:
    http = await _http_on(url, pid, pids)
    last = view.last_id()
    try:
        async with http.stream("GET", f"/api/runs/{view.run_id}/events",
                               headers={"Last-Event-ID": str(last)} if last else {}) as r:
            if r.status_code != 200:
                await r.aread()
                view.problems.append(f"{view.name}: re-join on {pid} after {last}: "
                                     f"{r.status_code} {r.text[:200]}")
                return
            seg = view.segment("rejoin", pid, last + 1)
            try:
                await _read_sse(r, seg, _stop_after(view, stop_tokens))
            except httpx.HTTPError as e:
                view.notes.append(f"re-join on {pid}: {type(e).__name__}")
    finally:
        await http.aclose()


async def _ws_session(url: str, pid: int, pids: set[int], view: View, first: dict[str, Any],
                      start: int, stop_tokens: int | None) -> None:
    async with _ws_on(url, pid, pids) as ws:
        try:
            await ws.send_message(json.dumps(first))
            seg = view.segment(first["type"], pid, start)
            await _read_ws(ws, view, seg, _stop_after(view, stop_tokens))
        except ConnectionClosed as e:
            view.notes.append(f"ws on {pid}: {e}"[:200])


async def _ws_rejoin(url: str, pid: int, pids: set[int], view: View,
                     stop_tokens: int | None) -> None:
    """A WebSocket ``join`` of the view's run after the last id it was shown."""
    last = view.last_id()
    await _ws_session(url, pid, pids, view, {"type": "join", "run_id": view.run_id,
                                             "after": last}, last + 1, stop_tokens)


def _message(view: View) -> dict[str, Any]:
    return {"type": "message", "conversation_id": view.conv,
            "content": f"question of {view.name}", "on_disconnect": "continue",
            "idempotency_key": f"key-{view.name}"}


# -- the store's view --------------------------------------------------------------------------


def _db_rows(db: Path) -> dict[str, tuple[str, str | None]]:
    """{run id: (status, error)} straight from the SQLite file (read only)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        cols = [r[1] for r in conn.execute("PRAGMA table_info(runs)")]
        err = "error" if "error" in cols else "NULL"
        return {r[0]: (r[1], r[2]) for r in
                conn.execute(f"SELECT id, status, {err} FROM runs")}
    finally:
        conn.close()


@dataclass
class Stored:
    status: dict[str, str]
    events: dict[str, list[dict[str, Any]]]
    messages: dict[str, list[dict[str, Any]]]  # conversation -> messages


async def _fresh_view(tmp_path: Path, sim_url: str, views: list[View]) -> Stored:
    """The same SQLite file opened by a fresh single server: each run's status and events,
    each conversation's messages."""
    proc, base = await start_service(tmp_path / "s.db", sim_url, tmp_path, name="fresh",
                                     env_extra={"SERVICE_SHUTDOWN_DRAIN": "1"})
    out = Stored({}, {}, {})
    try:
        async with httpx.AsyncClient(base_url=base, timeout=GUARD) as http:
            for v in views:
                if v.run_id and v.run_id not in out.status:
                    out.status[v.run_id] = (await http.get(f"/api/runs/{v.run_id}")).json()[
                        "status"]
                    r = await http.get(f"/api/runs/{v.run_id}/events")
                    out.events[v.run_id] = [
                        {"id": int(f["id"]), "event": f["event"], "data": f["data"]}
                        for f in parse_sse(r.text) if "id" in f]
                if v.conv and v.conv not in out.messages:
                    out.messages[v.conv] = (await http.get(
                        f"/api/conversations/{v.conv}")).json()["messages"]
    finally:
        with trio.move_on_after(2 * GUARD, shield=True):
            await _stop(proc, GUARD)
        if proc.returncode is None:
            proc.kill()
    return out


def _compare(views: list[View], stored: Stored, rows: dict[str, tuple[str, str | None]],
             ) -> list[str]:
    """What breaks "each client's view is the store's": segments with gaps or duplicates,
    frames shown that are not stored as shown, an end the store contradicts, tokens shown
    missing from the stored reply, a second question for a keyed request."""
    failures: list[str] = []
    for v in views:
        v.check_segments()
        failures += v.problems
        if not v.run_id:
            failures.append(f"{v.name}: never shown a run ({v.notes[-3:]})")
            continue
        shown: dict[int, dict[str, Any]] = {}
        for f in v.frames():
            if f["id"] in shown and shown[f["id"]] != f:
                failures.append(f"{v.name}: id {f['id']} shown twice differently")
            shown.setdefault(f["id"], f)
        events = {f["id"]: f for f in stored.events.get(v.run_id, [])}
        for i, f in sorted(shown.items()):
            if events.get(i) != f:
                failures.append(f"{v.name} {v.run_id}: shown {f}, stored {events.get(i)}")
                break
        status = stored.status.get(v.run_id)
        row = rows.get(v.run_id)
        if row is None or row[0] != status:
            failures.append(f"{v.name} {v.run_id}: file says {row}, fresh server {status}")
        if v.told() is not None and v.told() != status:
            failures.append(f"{v.name} {v.run_id}: told {v.told()}, store says {status}")
        msgs = stored.messages.get(v.conv, [])
        users = [m for m in msgs if m["role"] == "user"]
        replies = [m for m in msgs if m["role"] == "assistant" and m["run_id"] == v.run_id]
        if len(users) != 1 or len(replies) != 1:
            failures.append(f"{v.name}: {len(users)} question(s), {len(replies)} replies of "
                            f"{v.run_id} in its conversation")
        elif not replies[0]["content"].startswith(v.text()):
            failures.append(f"{v.name} {v.run_id}: shown {len(v.text())} chars "
                            f"{v.text()[-30:]!r}, stored reply {len(replies[0]['content'])} "
                            f"{replies[0]['content'][-30:]!r}")
    return failures


async def _wait_until_tokens(views: list[View], n: int) -> None:
    with trio.fail_after(GUARD):
        while any(v.tokens() < n for v in views):  # noqa: ASYNC110 (other tasks)
            await trio.sleep(0.05)


# -- two workers on one SQLite file, and the verdict -------------------------------------------


@dataclass
class Workers:
    """``python -m service --workers 2`` on the simulator ``sim``, its store ``tmp/s.db``."""

    sim: Simulator
    tmp: Path
    proc: trio.Process
    url: str
    log: Path
    pids: set[int] = field(default_factory=set)
    code: int | None = None
    stopped: bool = False

    @property
    def db(self) -> Path:
        return self.tmp / "s.db"

    async def conversations(self, n: int) -> list[str]:
        async with httpx.AsyncClient(base_url=self.url, timeout=GUARD) as http:
            return [(await http.post("/api/conversations", json={})).json()["id"]
                    for _ in range(n)]

    async def views(self, *names: str) -> list[View]:
        """A view of each name, each with a new conversation of its own."""
        convs = await self.conversations(len(names))
        return [View(name, conv=conv) for name, conv in zip(names, convs, strict=True)]

    async def _end(self) -> None:
        """SIGTERM to the parent (bounded), then whatever is left killed; once."""
        if self.stopped:
            return
        self.stopped = True
        with trio.move_on_after(2 * GUARD, shield=True):
            self.code = await _stop(self.proc)
        _reap(self.proc)

    async def stop(self) -> None:
        """Stop the service (as at the block's end): the parent must exit 0."""
        await self._end()
        assert self.code == 0, (await trio.Path(self.log).read_text())[-3000:]

    async def fresh_view(self, views: list[View]) -> Stored:
        return await _fresh_view(self.tmp, self.sim.url, views)

    async def against_store(self, views: list[View], compared: list[View] | None = None,
                            ) -> tuple[Stored, list[str]]:
        """The store's view of ``views`` (the file read directly, and through a fresh single
        server), and what breaks "each client's view is the store's" for ``compared`` (all
        of ``views`` by default)."""
        rows = _db_rows(self.db)
        stored = await self.fresh_view(views)
        return stored, _compare(views if compared is None else compared, stored, rows)

    async def assert_none(self, failures: list[str], *context: str) -> None:
        """No failure, and no upstream generation left open (each waited for, 15 s)."""
        with trio.move_on_after(15):
            for s in self.sim.streams:
                await s.closed.wait()
        left = [s for s in self.sim.streams if not s.closed.is_set()]
        assert not failures, "\n".join([*failures, *context])
        assert not left, left


@asynccontextmanager
async def _two_workers(tmp_path: Path, reply: Reply) -> AsyncIterator[Workers]:
    """The simulator (``reply`` by default) and ``--workers 2`` on it for the block; the
    service stopped and reaped at the block's end if ``Workers.stop`` did not."""
    sim = Simulator(("sim-model",), default=reply, strict_models=False)
    async with open_simulator(sim) as running:
        proc, url, log = await _start(tmp_path, running.url, 2)
        w = Workers(running, tmp_path, proc, url, log)
        try:
            w.pids = _children(proc.pid)
            yield w
        finally:
            await w._end()  # noqa: ASYNC102 (bounded and shielded inside)


# -- the tests ---------------------------------------------------------------------------------


async def test_keyed_resends_and_rejoins_across_workers_name_one_run_with_no_gap(
    tmp_path: Path,
) -> None:
    # Clients over SSE and WebSocket, keyed: start on one worker, drop, re-send the keyed
    # request on the other worker (must name the same run, events from the first), drop,
    # re-join on the other worker after the last id shown (no gap, no duplicate).
    async with _two_workers(tmp_path, Reply(tokens=80, interval=0.04)) as w:
        url, pids = w.url, w.pids
        a, b = sorted(pids)
        views = await w.views(*(f"c{i}-{'sse' if i % 2 == 0 else 'ws'}" for i in range(8)))
        owners: dict[str, int] = {}

        async def sse_client(v: View, home: int, other: int) -> None:
            await _sse_post(url, home, pids, v, "k", 4)
            owners[v.name] = home
            r = await _sse_post(url, other, pids, v, "k", 12)  # the re-send
            if r is not None and r.headers.get("Idempotent-Replayed") != "true":
                v.problems.append(f"{v.name}: re-send not marked Idempotent-Replayed")
            await _sse_rejoin(url, other, pids, v, 25)
            while v.told() is None and not v.problems:
                await _sse_rejoin(url, other if v.tokens() % 2 else home, pids, v, None)

        async def ws_client(v: View, home: int, other: int) -> None:
            await _ws_session(url, home, pids, v, _message(v), 1, 4)
            owners[v.name] = home
            await _ws_session(url, other, pids, v, _message(v), 1, 12)  # the re-send
            await _ws_rejoin(url, other, pids, v, None)

        with trio.fail_after(GUARD + 10):
            async with trio.open_nursery() as nursery:
                for i, v in enumerate(views):
                    home, other = (a, b) if i % 4 < 2 else (b, a)
                    nursery.start_soon(sse_client if i % 2 == 0 else ws_client,
                                       v, home, other)
        for v in views:
            if v.run_id and _owner_pid(w.db, v.run_id) != owners[v.name]:
                v.problems.append(f"{v.name}: run owned by {_owner_pid(w.db, v.run_id)}, "
                                  f"started on {owners[v.name]}")
        await w.stop()
        _, failures = await w.against_store(views)
        failures += [f"{v.name}: told {v.told()} {v.notes}" for v in views
                     if v.told() != "succeeded"]
        if len(w.sim.streams) != len(views):
            failures.append(f"{len(w.sim.streams)} upstream generations for {len(views)} "
                            "keyed requests")
        await w.assert_none(failures)


async def test_sigkill_of_a_worker_mid_stream_ends_every_client_as_the_store_says(
    tmp_path: Path,
) -> None:
    # Five keyed runs (3 SSE, 2 WebSocket) streaming on worker A, each followed by a
    # re-joiner on worker B. A is killed (SIGKILL): the followers on B get an end, A's own
    # clients re-join on B after the last id shown and get the rest and the end, the end says
    # what the store says (failed, "interrupted", closed by the survivor), every token shown
    # is in the stored reply, A is replaced and the replacement serves, no upstream left open.
    async with _two_workers(tmp_path, Reply(tokens=400, interval=0.05)) as w:
        url, pids = w.url, w.pids
        victim, survivor = sorted(pids)
        owners = await w.views(*(f"o{i}-{'sse' if i < 3 else 'ws'}" for i in range(5)))
        followers: list[View] = []
        killed = trio.Event()

        async def owner_client(v: View) -> None:
            if v.name.endswith("sse"):
                await _sse_post(url, victim, pids, v, "k", None)
            else:
                await _ws_session(url, victim, pids, v, _message(v), 1, None)
            await killed.wait()
            alive = pids - {victim}
            with trio.fail_after(GUARD):
                while v.told() is None and not v.problems:
                    if v.name.endswith("sse"):
                        await _sse_rejoin(url, survivor, alive, v, None)
                    else:
                        await _ws_rejoin(url, survivor, alive, v, None)

        async def follower(v: View, of: View) -> None:
            with trio.fail_after(GUARD):
                while not of.run_id:  # noqa: ASYNC110 (another task)
                    await trio.sleep(0.05)
            v.run_id, v.conv = of.run_id, of.conv
            with trio.fail_after(GUARD):
                await _sse_rejoin(url, survivor, pids, v, None)
            if v.told() is None:
                v.problems.append(f"{v.name}: its stream on the survivor ended with no "
                                  f"end ({v.notes[-2:]})")

        async def kill() -> None:
            await _wait_until_tokens(owners + followers, 5)
            for v in owners:
                if _owner_pid(w.db, v.run_id) != victim:
                    v.problems.append(f"{v.name}: not owned by the victim")
            os.kill(victim, signal.SIGKILL)
            killed.set()

        with trio.fail_after(2 * GUARD):
            async with trio.open_nursery() as nursery:
                for v in owners:
                    f = View(f"f-{v.name}")
                    followers.append(f)
                    nursery.start_soon(owner_client, v)
                    nursery.start_soon(follower, f, v)
                nursery.start_soon(kill)
        rows = _db_rows(w.db)
        closed_by_survivor = {v.run_id: rows[v.run_id] for v in owners}
        # The replacement comes up and serves.
        with trio.fail_after(GUARD):
            while len(now := _children(w.proc.pid)) < 2 or victim in now:  # noqa: ASYNC110
                await trio.sleep(0.1)
        (fresh,) = now - {survivor}
        with trio.fail_after(GUARD):
            while True:
                text = await trio.Path(w.log).read_text()
                if "starting another" in text and text.count(" up (pid") >= 3:
                    break
                await trio.sleep(0.1)
        w.sim.script(Reply(tokens=3))
        http = await _http_on(url, fresh, now)
        try:
            conv = (await http.post("/api/conversations", json={})).json()["id"]
            r = await http.post(f"/api/conversations/{conv}/messages",
                                json={"content": "after the kill"})
        finally:
            await http.aclose()
        served = (r.status_code, r.json().get("run", {}).get("status"))
        await w.stop()
        stored, failures = await w.against_store(owners + followers, owners)
        for f in followers:  # a follower's question is its owner's (one each)
            f.check_segments()
            failures += f.problems
            if f.told() != stored.status.get(f.run_id):
                failures.append(f"{f.name}: told {f.told()}, store {stored.status[f.run_id]}")
        for run_id, (status, error) in closed_by_survivor.items():
            if status != "failed" or "interrupt" not in str(error).lower():
                failures.append(f"{run_id}: closed by the survivor as {status} {error!r}")
        if served != (200, "succeeded"):
            failures.append(f"the replacement worker served {served}")
        await w.assert_none(failures)


async def test_a_cancel_sent_to_the_worker_that_does_not_own_the_run(tmp_path: Path) -> None:
    # A run streaming on worker A is cancelled through worker B: over HTTP (POST .../cancel)
    # and over a WebSocket on B (a `cancel` message, from a socket that joined the run and
    # from one that did not). Each run ends `cancelled` for every client following it, its
    # partial answer stored with every token shown, its upstream closed.
    async with _two_workers(tmp_path, Reply(tokens=400, interval=0.05)) as w:
        url, pids = w.url, w.pids
        a, b = sorted(pids)
        views = await w.views("http-cancel", "ws-cancel", "ws-join-cancel")
        http_v, ws_v, join_v = views
        joiner = View("joiner-on-b")
        cancels: list[str] = []

        async def http_cancel() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: _sse_post(url, a, pids, http_v, "k", None,
                                                     on_disconnect="cancel"))
                await _wait_until_tokens([http_v], 5)
                c = await _http_on(url, b, pids)
                try:
                    r = await c.post(f"/api/runs/{http_v.run_id}/cancel")
                finally:
                    await c.aclose()
                cancels.append(f"http {r.status_code} {r.text[:100]}")

        async def ws_cancel() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: _ws_session(url, a, pids, ws_v, _message(ws_v),
                                                       1, None))
                await _wait_until_tokens([ws_v], 5)
                async with _ws_on(url, b, pids) as ws:
                    await ws.send_message(json.dumps({"type": "cancel",
                                                      "run_id": ws_v.run_id}))
                    await trio.sleep(0.5)  # a reply, if any, is noted

        async def ws_join_cancel() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: _ws_session(url, a, pids, join_v,
                                                       _message(join_v), 1, None))
                await _wait_until_tokens([join_v], 5)
                joiner.run_id, joiner.conv = join_v.run_id, join_v.conv
                async with _ws_on(url, b, pids) as ws:
                    await ws.send_message(json.dumps({"type": "join",
                                                      "run_id": join_v.run_id}))
                    seg = joiner.segment("join", b, 1)
                    await _read_ws(ws, joiner, seg, _stop_after(joiner, 3))
                    await ws.send_message(json.dumps({"type": "cancel",
                                                      "run_id": join_v.run_id}))
                    await _read_ws(ws, joiner, seg, lambda _s: False)

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(http_cancel)
                nursery.start_soon(ws_cancel)
                nursery.start_soon(ws_join_cancel)
        owned = {v.name: _owner_pid(w.db, v.run_id) for v in views}
        await w.stop()
        stored, failures = await w.against_store(views)
        joiner.check_segments()
        failures += joiner.problems
        failures += [f"{v.name}: told {v.told()}" for v in views if v.told() != "cancelled"]
        if joiner.told() != "cancelled":
            failures.append(f"joiner on b told {joiner.told()} ({joiner.notes})")
        failures += [f"{n} owned by {p}, not worker a {a}" for n, p in owned.items() if p != a]
        if not cancels or not cancels[0].startswith("http 202"):
            failures.append(f"cancel answers {cancels}")
        for v in views:  # its partial answer stored, with every token shown (and no more)
            reply = [m for m in stored.messages[v.conv] if m["role"] == "assistant"]
            if reply and reply[0]["content"] != v.text():
                failures.append(f"{v.name}: shown {len(v.text())} chars, stored "
                                f"{len(reply[0]['content'])}")
        await w.assert_none(failures)


async def test_sigterm_to_the_master_mid_traffic_drains_every_worker_to_exit_0(
    tmp_path: Path,
) -> None:
    # Eight clients (SSE and WebSocket, on_disconnect cancel and continue) stream long
    # answers on both workers; SIGTERM to the parent: every worker drains (drain 1 s, then the
    # rest are stopped with their partial answer stored), the parent exits 0, no process is
    # left, and each client was told an end the store agrees with.
    async with _two_workers(tmp_path, Reply(tokens=400, interval=0.05)) as w:
        url, pids, proc = w.url, w.pids, w.proc
        a, b = sorted(pids)
        views = await w.views(*(f"t{i}-{'sse' if i % 2 == 0 else 'ws'}" for i in range(8)))
        took = 0.0

        async def client(i: int, v: View) -> None:
            home = (a, b)[i % 4 // 2]
            mode = "cancel" if i % 3 == 0 else "continue"
            if i % 2 == 0:
                await _sse_post(url, home, pids, v, "k", None, on_disconnect=mode)
            else:
                msg = _message(v) | {"on_disconnect": mode}
                await _ws_session(url, home, pids, v, msg, 1, None)

        async def stop() -> None:
            nonlocal took
            await _wait_until_tokens(views, 5)
            began = trio.current_time()
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(GUARD):
                await proc.wait()
            took = trio.current_time() - began

        with trio.fail_after(2 * GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop)
                for i, v in enumerate(views):
                    nursery.start_soon(client, i, v)
        await w.stop()
        with trio.fail_after(10):
            while _alive(pids):  # noqa: ASYNC110 (other processes)
                await trio.sleep(0.1)
        failures = [f"{r}: left {s} in the file after the drain"
                    for r, (s, _) in _db_rows(w.db).items() if s not in TERMINAL]
        failures += (await w.against_store(views))[1]
        failures += [f"{v.name}: never told an end ({v.notes[-3:]})" for v in views
                     if v.told() is None]
        await w.assert_none(failures, f"took {took:.1f}")


async def test_one_key_sent_to_both_workers_at_once_begins_one_run(tmp_path: Path) -> None:
    # The same keyed message sent at the same moment to both workers (over HTTP to both, or
    # over HTTP to one and a WebSocket to the other): the two processes race on the key in
    # the shared SQLite file. Both requests must name ONE run, shown the same events, with
    # one question stored and one upstream generation.
    async with _two_workers(tmp_path, Reply(tokens=20, interval=0.02)) as w:
        url, pids = w.url, w.pids
        a, b = sorted(pids)
        views: list[View] = []
        convs = await w.conversations(6)
        for round_ in range(6):
            go = trio.Event()
            pair = [View(f"r{round_}-x"), View(f"r{round_}-y")]
            for v in pair:
                v.conv = convs[round_]
            views += pair

            async def send(v: View, pid: int, ws: bool, go: trio.Event) -> None:
                await go.wait()
                if ws:
                    await _ws_session(url, pid, pids, v, _message(v), 1, None)
                else:
                    await _sse_post(url, pid, pids, v, "k", None)

            # The same key and content for both (the names differ only in the view).
            pair[1].name = pair[0].name = f"r{round_}"
            with trio.fail_after(GUARD):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send, pair[0], a, False, go)
                    nursery.start_soon(send, pair[1], b, round_ % 2 == 1, go)
                    await trio.sleep(0.3)
                    go.set()  # each then places its connection on its worker and sends
        await w.stop()
        failures = []
        for x, y in zip(views[::2], views[1::2], strict=True):
            if x.run_id != y.run_id:
                failures.append(f"{x.name}: one key, two runs {x.run_id} and {y.run_id} "
                                f"({x.notes} {y.notes})")
        failures += (await w.against_store(views))[1]
        if len(w.sim.streams) != 6:
            failures.append(f"{len(w.sim.streams)} upstream generations for 6 keys")
        await w.assert_none(failures)


async def test_a_keyed_resend_after_its_worker_died_asks_anew_on_the_survivor(
    tmp_path: Path,
) -> None:
    # A keyed run on worker A; A is killed; the survivor closes the run (failed,
    # "interrupted"), which lets its key go: the same keyed request re-sent to the survivor
    # (over HTTP, and over a WebSocket for a second conversation) begins a new run that
    # answers, and the conversation holds the failed turn and the answered one.
    async with _two_workers(tmp_path, Reply(tokens=400, interval=0.05)) as w:
        url, pids = w.url, w.pids
        victim, survivor = sorted(pids)
        first = await w.views("k-sse", "k-ws")
        again = [View(v.name, conv=v.conv) for v in first]
        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: _sse_post(url, victim, pids, first[0], "k", 5))
                nursery.start_soon(lambda: _ws_session(url, victim, pids, first[1],
                                                       _message(first[1]), 1, 5))
        os.kill(victim, signal.SIGKILL)
        alive = {survivor}
        with trio.fail_after(GUARD):  # each follows its run to the end the survivor gives
            for v in first:
                while v.told() is None:
                    await _sse_rejoin(url, survivor, alive, v, None)
        w.sim.script(Reply(tokens=6), Reply(tokens=6))
        with trio.fail_after(GUARD):
            await _sse_post(url, survivor, alive, again[0], "k", None)
            await _ws_session(url, survivor, alive, again[1], _message(again[1]), 1, None)
        await w.stop()
        stored = await w.fresh_view(first + again)
        failures = []
        for v, x in zip(first, again, strict=True):
            if (v.told(), x.told()) != ("failed", "succeeded") or v.run_id == x.run_id:
                failures.append(f"{v.name}: first {v.run_id} told {v.told()}, re-send "
                                f"{x.run_id} told {x.told()} ({x.notes})")
            roles = [(m["role"], m["run_id"] if m["role"] == "assistant" else "")
                     for m in stored.messages[v.conv]]
            if roles != [("user", ""), ("assistant", v.run_id), ("user", ""),
                         ("assistant", x.run_id)]:
                failures.append(f"{v.name}: conversation {roles}")
            for y in (v, x):
                y.check_segments()
                failures += y.problems
                if y.told() != stored.status.get(y.run_id):
                    failures.append(f"{y.name}: told {y.told()}, stored "
                                    f"{stored.status.get(y.run_id)}")
        await w.assert_none(failures)
