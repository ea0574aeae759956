"""Review (dec07y): one combined fault scenario against real processes, then every client's
view checked against the store.

Two real service processes share one real PostgreSQL database and one simulated llama.cpp
upstream with paced multi-token replies. Sixteen concurrent clients stream answers: SSE clients
with an ``Idempotency-Key`` that drop mid-answer and re-send the request (to the other
instance) or re-join with ``Last-Event-ID``; WebSocket clients that drop the socket and resume
with ``join`` (after the last id shown) or re-send the keyed message on a new socket to the
other instance; and a couple that cancel their run on the other instance. Meanwhile one
instance that owns runs is killed with SIGKILL and, later, PostgreSQL is restarted. At the end
(after the lease and a margin) every run a client was shown is checked against the store:
terminal, what was shown a prefix of what is stored (same ids, types, data; ids 1..n with no
gap per client view), no ``run.finished`` the store contradicts, one question per keyed request
(unless its first run ended without its answer), and no upstream generation left open.
"""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from service.sim import Reply, Simulator, open_simulator

from .operations.test_instances import instance
from .pg import PostgresServer, pg_url, postgres  # noqa: F401 (fixtures)
from .streams import parse_sse, read_sse

TERMINAL = {"succeeded", "failed", "cancelled", "timed_out"}
CLIENT_BUDGET = 60.0  # seconds each client may take to see its run's end
STREAM_TIMEOUT = httpx.Timeout(25, connect=5)


@dataclass
class Client:
    name: str
    kind: str
    conv: str = ""
    key: str = ""
    content: str = ""
    # run_id -> every framed event shown, in the order shown (duplicates of re-sends kept)
    views: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    errors: list[Any] = field(default_factory=list)  # id-less error frames / replies shown
    current: str = ""  # the run the client follows now
    oddities: list[str] = field(default_factory=list)
    deadline: float = 0.0
    drops: int = 0  # further drops after the first
    asked_anew: bool = False  # re-sent its key after its run ended without its answer

    def shown(self, run_id: str, frame: dict[str, Any]) -> None:
        self.views.setdefault(run_id, []).append(frame)

    def last_id(self, run_id: str) -> int:
        return max((f["id"] for f in self.views.get(run_id, [])), default=0)

    def finished(self, run_id: str) -> bool:
        return any(f["event"] == "run.finished" for f in self.views.get(run_id, []))

    def tokens(self, run_id: str) -> int:
        return len({f["id"] for f in self.views.get(run_id, []) if f["event"] == "token"})

    def status(self, run_id: str) -> str | None:
        return next((f["data"]["status"] for f in self.views.get(run_id, [])
                     if f["event"] == "run.finished"), None)

    def next_drop(self, rng: random.Random) -> int | None:
        """Where to drop the connection next (unique tokens shown), while drops are left."""
        if self.drops <= 0 or not self.current:
            return None
        self.drops -= 1
        return self.tokens(self.current) + rng.randint(4, 16)


class Fleet:
    """The instances alive: a client asks the one it is told, or else any one alive."""

    def __init__(self, https: dict[str, httpx.AsyncClient]) -> None:
        self.https = https
        self.alive = list(https)
        self.owned: dict[str, str] = {}  # run_id -> the instance a client started it on

    def pick(self, want: str) -> tuple[str, httpx.AsyncClient]:
        name = want if want in self.alive else self.alive[0]
        return name, self.https[name]

    def other(self, name: str) -> str:
        others = [n for n in self.alive if n != name]
        return others[0] if others else self.alive[0]


def _sse_sink(client: Client, run_id: str, drop_after: int | None) -> Callable[
        [dict[str, Any]], bool]:
    def sink(frame: dict[str, Any]) -> bool:
        if "id" not in frame:
            client.errors.append(frame)
            return True
        client.shown(run_id, {"id": int(frame["id"]), "event": frame["event"],
                              "data": frame["data"]})
        if frame["event"] == "run.finished":
            return True
        return drop_after is not None and client.tokens(run_id) >= drop_after
    return sink


async def _post_stream(client: Client, fleet: Fleet, want: str, drop_after: int | None,
                       during: Callable[[str], Awaitable[None]] | None = None) -> None:
    """POST the keyed message as a stream on ``want`` (or another instance alive), read until
    ``drop_after`` tokens (then drop) or its end; retried on a refusal or a lost connection
    before its headers (the same key: no second run)."""
    while trio.current_time() < client.deadline:
        name, http = fleet.pick(want)
        try:
            async with http.stream(
                    "POST", f"/api/conversations/{client.conv}/messages",
                    json={"content": client.content, "stream": True,
                          "on_disconnect": "continue"},
                    headers={"Idempotency-Key": client.key}, timeout=STREAM_TIMEOUT) as r:
                if r.status_code != 200:
                    await r.aread()
                    client.oddities.append(f"POST on {name}: {r.status_code} {r.text[:120]}")
                    await trio.sleep(0.5)
                    continue
                run_id = r.headers["X-Run-Id"]
                fleet.owned.setdefault(run_id, name)
                client.current = run_id
                client.views.setdefault(run_id, [])
                if during is None:
                    await read_sse(r, _sse_sink(client, run_id, drop_after))
                else:
                    acting = False
                    async with trio.open_nursery() as nursery:
                        async def act(rid: str) -> None:
                            nonlocal acting
                            while client.tokens(rid) < (drop_after or 3):  # noqa: ASYNC110
                                await trio.sleep(0.05)
                            acting = True
                            await during(rid)

                        nursery.start_soon(act, run_id)
                        try:
                            await read_sse(r, _sse_sink(client, run_id, None))
                        except httpx.HTTPError as e:
                            client.oddities.append(f"stream on {name}: {type(e).__name__}")
                        if not acting:  # its stream ended first: its cancel is not sent
                            nursery.cancel_scope.cancel()
                return
        except (httpx.HTTPError, KeyError) as e:
            client.oddities.append(f"POST on {name}: {type(e).__name__}")
            if client.current:
                return  # it has its run: follow it
            await trio.sleep(0.5)


async def _follow(client: Client, fleet: Fleet, want: str, rng: random.Random) -> None:
    """Re-join the client's current run with ``Last-Event-ID`` until it is shown its end,
    dropping the stream again while it has drops left."""
    run_id = client.current
    while run_id and not client.finished(run_id) and trio.current_time() < client.deadline:
        name, http = fleet.pick(want)
        last = client.last_id(run_id)
        headers = {"Last-Event-ID": str(last)} if last else {}
        try:
            async with http.stream("GET", f"/api/runs/{run_id}/events", headers=headers,
                                   timeout=STREAM_TIMEOUT) as r:
                if r.status_code != 200:
                    await r.aread()
                    client.oddities.append(
                        f"re-join {run_id} after {last} on {name}: {r.status_code} "
                        f"{r.text[:160]}")
                else:
                    await read_sse(r, _sse_sink(client, run_id, client.next_drop(rng)))
        except httpx.HTTPError as e:
            client.oddities.append(f"re-join on {name}: {type(e).__name__}")
        if not client.finished(run_id):
            want = fleet.other(name)
            await trio.sleep(rng.uniform(0.2, 1.0))


def _ws_url(http: httpx.AsyncClient) -> str:
    return str(http.base_url).rstrip("/").replace("http://", "ws://") + "/api/ws"


async def _ws_session(client: Client, fleet: Fleet, want: str, first: dict[str, Any],
                      drop_after: int | None) -> None:
    """One socket on ``want``: send ``first``, take the run's events until ``drop_after``
    tokens (then drop the socket), its end, an error reply, or a lost socket."""
    name, http = fleet.pick(want)
    try:
        with trio.move_on_after(max(0.1, client.deadline - trio.current_time())):
            async with open_websocket_url(_ws_url(http)) as ws:
                await ws.send_message(json.dumps(first))
                while True:
                    msg = json.loads(await ws.get_message())
                    if "run_id" in msg and "id" in msg:
                        run_id = str(msg["run_id"])
                        fleet.owned.setdefault(run_id, name)
                        client.current = run_id
                        client.shown(run_id, {"id": int(msg["id"]), "event": msg["type"],
                                              "data": msg["data"]})
                        if msg["type"] == "run.finished":
                            return
                        if drop_after is not None and client.tokens(run_id) >= drop_after:
                            return
                    elif msg.get("type") == "error":
                        client.errors.append(msg)
                        return
    except Exception as e:  # a socket lost to a kill, a refused handshake
        client.oddities.append(f"ws on {name}: {type(e).__name__}: {e}"[:200])


async def _ws_client(client: Client, fleet: Fleet, home: str, drop_after: int,
                     rng: random.Random, resend: bool) -> None:
    message = {"type": "message", "conversation_id": client.conv, "content": client.content,
               "on_disconnect": "continue", "idempotency_key": client.key}
    while not client.current and trio.current_time() < client.deadline:
        await _ws_session(client, fleet, home, message, drop_after)
        if not client.current:
            await trio.sleep(0.5)
    where = fleet.other(home)
    while (client.current and not client.finished(client.current)
           and trio.current_time() < client.deadline):
        await trio.sleep(rng.uniform(0.2, 1.5))
        if resend:
            await _ws_session(client, fleet, where, message, client.next_drop(rng))
        else:
            await _ws_session(client, fleet, where, {
                "type": "join", "run_id": client.current,
                "after": client.last_id(client.current)}, client.next_drop(rng))
        where = fleet.other(where)
        if resend and client.status(client.current) in ("failed", "cancelled") \
                and len(client.views) == 1:
            # Its run ended without its answer: the key is let go, the retry asks anew.
            first = client.current
            client.asked_anew = True
            while client.current == first and trio.current_time() < client.deadline:
                await _ws_session(client, fleet, where, message, None)
                await trio.sleep(0.3)


async def _sse_client(client: Client, fleet: Fleet, home: str, drop_after: int,
                      rng: random.Random, resend: bool) -> None:
    await _post_stream(client, fleet, home, drop_after)
    if client.current and not client.finished(client.current):
        await trio.sleep(rng.uniform(0.2, 1.5))
        if resend:
            await _post_stream(client, fleet, fleet.other(home), client.next_drop(rng))
    await _follow(client, fleet, fleet.other(home), rng)
    if resend and client.status(client.current) in ("failed", "cancelled"):
        # Its run ended without its answer: the key is let go, the retry asks anew.
        client.asked_anew = True
        await _post_stream(client, fleet, home, None)
        await _follow(client, fleet, home, rng)


async def _cancel_client(client: Client, fleet: Fleet, home: str, drop_after: int,
                         rng: random.Random) -> None:
    async def cancel(run_id: str) -> None:
        for _ in range(20):
            name, http = fleet.pick(fleet.other(home))
            try:
                r = await http.post(f"/api/runs/{run_id}/cancel", timeout=15)
                client.oddities.append(f"cancel on {name}: {r.status_code} {r.text[:120]}")
                if r.status_code == 202:
                    return
            except httpx.HTTPError as e:
                client.oddities.append(f"cancel on {name}: {type(e).__name__}")
            await trio.sleep(0.5)

    await _post_stream(client, fleet, home, drop_after, during=cancel)
    await _follow(client, fleet, home, rng)


def _dedup(frames: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """A client's view of a run with re-sent frames dropped, and what breaks "ids 1..n in
    order, a repeated id the same frame"."""
    seen: dict[int, dict[str, Any]] = {}
    problems = []
    for f in frames:
        if f["id"] in seen:
            if seen[f["id"]] != f:
                problems.append(f"id {f['id']} shown twice differently: {seen[f['id']]} / {f}")
        elif f["id"] != len(seen) + 1:
            problems.append(f"id {f['id']} shown after {len(seen)} (gap or reorder)")
            seen[f["id"]] = f
        else:
            seen[f["id"]] = f
    return [seen[i] for i in sorted(seen)], problems


@pytest.mark.slow
async def test_clients_through_a_kill_and_a_database_restart_agree_with_the_store(
    tmp_path: Path, pg_url: str, postgres: PostgresServer,  # noqa: F811 (fixture)
) -> None:
    rng = random.Random(20261207)
    sim = Simulator(("sim-model",), default=Reply(tokens=160, interval=0.08),
                    strict_models=False)
    pg_down = False
    async with (open_simulator(sim) as running,
                instance(pg_url, running.url, tmp_path, "b") as (_, b)):
        try:
            async with instance(pg_url, running.url, tmp_path, "a") as (proc_a, a):
                fleet = Fleet({"a": a, "b": b})
                # Even ones start on a (those before its kill at 3.5 s own runs there), odd on b.
                kinds = ["sse-resend", "sse-rejoin", "ws-resend", "ws-join", "ws-join",
                         "cancel", "sse-rejoin", "sse-resend", "cancel", "ws-resend",
                         "sse-resend", "sse-rejoin", "ws-resend", "ws-join", "sse-resend",
                         "sse-rejoin"]
                clients = [Client(f"c{i}-{k}", k) for i, k in enumerate(kinds)]
                for c in clients:
                    c.conv = (await b.post("/api/conversations", json={})).json()["id"]
                    c.key = f"key-{c.name}"
                    c.content = f"question of {c.name}"
                kill_at: dict[str, Any] = {}

                async def run_client(i: int, c: Client) -> None:
                    await trio.sleep(i * 0.4)
                    c.deadline = trio.current_time() + CLIENT_BUDGET
                    c.drops = rng.randint(4, 9)  # re-joins through both faults
                    home = "ab"[i % 2]
                    drop_after = rng.randint(3, 25)
                    if c.kind.startswith("sse"):
                        await _sse_client(c, fleet, home, drop_after, rng,
                                          c.kind == "sse-resend")
                    elif c.kind.startswith("ws"):
                        await _ws_client(c, fleet, home, drop_after, rng,
                                         c.kind == "ws-resend")
                    else:
                        await _cancel_client(c, fleet, home, drop_after, rng)

                async def faults() -> None:
                    nonlocal pg_down
                    await trio.sleep(3.5)
                    kill_at["live_on_a"] = sorted(
                        r for r, n in fleet.owned.items() if n == "a"
                        and not any(c.finished(r) for c in clients))
                    fleet.alive.remove("a")
                    proc_a.kill()
                    await proc_a.wait()
                    await trio.sleep(5.5)
                    pg_down = True
                    await trio.to_thread.run_sync(postgres.stop, "fast")
                    await trio.sleep(3.0)
                    await trio.to_thread.run_sync(postgres.start)
                    pg_down = False

                with trio.fail_after(CLIENT_BUDGET + 30):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(faults)
                        for i, c in enumerate(clients):
                            nursery.start_soon(run_client, i, c)
        finally:
            if pg_down:
                with trio.move_on_after(30, shield=True):
                    await trio.to_thread.run_sync(postgres.start)

        assert kill_at["live_on_a"], "the SIGKILL hit an instance that owned no live run"
        report: list[str] = [f"runs live on a at its kill: {kill_at['live_on_a']}"]
        failures: list[str] = []

        # Every run any client was shown ends in the store (a's after its lease: 15 s).
        run_ids = sorted({r for c in clients for r in c.views})
        stored_status: dict[str, str] = {}
        with trio.fail_after(45):
            for run_id in run_ids:
                while True:
                    r = await b.get(f"/api/runs/{run_id}")
                    if r.status_code == 200 and r.json()["status"] in TERMINAL:
                        stored_status[run_id] = r.json()["status"]
                        break
                    await trio.sleep(0.25)
        stored_events: dict[str, list[dict[str, Any]]] = {}
        for run_id in run_ids:
            with trio.fail_after(20):
                r = await b.get(f"/api/runs/{run_id}/events")
            stored_events[run_id] = [
                {"id": int(f["id"]), "event": f["event"], "data": f["data"]}
                for f in parse_sse(r.text) if "id" in f]

        checked_runs = checked_events = 0
        all_replies = 0
        for c in clients:
            for run_id, frames in c.views.items():
                shown, problems = _dedup(frames)
                failures += [f"{c.name} {run_id}: {p}" for p in problems]
                stored = stored_events[run_id]
                if stored[: len(shown)] != shown:
                    i = next(i for i, f in enumerate(shown)
                             if i >= len(stored) or stored[i] != f)
                    failures.append(f"{c.name} {run_id}: shown {shown[i]} but stored "
                                    f"{stored[i] if i < len(stored) else 'nothing'}")
                for f in shown:
                    if f["event"] == "run.finished" and \
                            f["data"]["status"] != stored_status[run_id]:
                        failures.append(f"{c.name} {run_id}: told {f['data']['status']}, "
                                        f"store says {stored_status[run_id]}")
                if stored and stored[-1]["event"] != "run.finished":
                    failures.append(f"{run_id}: stored events do not end with run.finished")
                checked_runs += 1
                checked_events += len(shown)
            if c.current and not c.finished(c.current):
                failures.append(f"{c.name}: never shown the end of {c.current} "
                                f"({c.oddities[-3:]}, {c.errors[-2:]})")

            # One question per keyed request, unless a run ended without its answer.
            conv = (await b.get(f"/api/conversations/{c.conv}")).json()
            users = [m for m in conv["messages"] if m["role"] == "user"]
            replies = [m for m in conv["messages"] if m["role"] == "assistant"]
            statuses = [stored_status.get(m["run_id"]) or
                        (await b.get(f"/api/runs/{m['run_id']}")).json()["status"]
                        for m in replies]
            if len(users) != len(replies) or any(
                    s == "succeeded" for s in statuses[:-1]) or len(users) < 1:
                failures.append(f"{c.name}: {len(users)} question(s), runs {statuses}")
            if c.asked_anew and len(c.views) < 2:
                failures.append(f"{c.name}: its key re-sent after its run ended "
                                f"{statuses} began no new run")
            if len(users) > 1:
                report.append(f"{c.name}: asked anew after {statuses[:-1]}")
            all_replies += len(replies)
            # Every token shown is in the reply as stored (a partial answer kept whole).
            content = {m["run_id"]: m["content"] for m in replies}
            for run_id, frames in c.views.items():
                text = "".join(f["data"]["text"] for f in _dedup(frames)[0]
                               if f["event"] == "token")
                if run_id in content and not content[run_id].startswith(text):
                    failures.append(f"{c.name} {run_id}: shown {text[-40:]!r}..., stored reply "
                                    f"{content[run_id][-40:]!r} ({len(text)}/"
                                    f"{len(content[run_id])} chars)")
            not_in_conv = set(c.views) - {m["run_id"] for m in replies}
            if not_in_conv:
                failures.append(f"{c.name}: shown runs {not_in_conv} not in its conversation")

        # No upstream generation left open.
        with trio.move_on_after(20):
            for s in running.streams:
                await s.closed.wait()
        open_streams = [s for s in running.streams if not s.closed.is_set()]
        if open_streams:
            failures.append(f"simulator streams left open: {open_streams}")
        if len(running.streams) > all_replies:  # a second generation for one run
            failures.append(f"{len(running.streams)} simulator streams for {all_replies} runs")

        report.append(f"checked {checked_runs} client views of {len(run_ids)} runs, "
                      f"{checked_events} events; statuses "
                      f"{sorted(stored_status.values())}; simulator streams "
                      f"{len(running.streams)} for {all_replies} runs")
        for c in clients:
            if c.oddities or c.errors:
                report.append(f"{c.name}: {c.oddities[:6]} {c.errors[:3]}")
        print("\n".join(report))
        assert not failures, "\n".join(failures)
