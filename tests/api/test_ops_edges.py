"""The operations endpoints (/readyz, /api/backends) at their edges (a review of 2026-12-05;
each test failed before its fix). Real servers on 127.0.0.1 (the app under hypercorn on port 0,
the simulator); every wait is bounded.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from service.backends.base import BackendHealth
from service.settings import load_settings
from service.sim import Simulator
from service.sim.app import error_response
from service.sim.server import open_simulator
from service.store.faults import InjectedFault

from ..fakes import Reply, ScriptedBackend
from ..servers import running_server

GUARD = 60
SECRET = "sk-Gw4yS3cret77"
PASSWORD = "Pr0xyPw-55"


async def _silent_server(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,  # noqa: ASYNC114
                         ) -> None:
    """A host that accepts connections and never answers (a frozen server, a hung proxy)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])

    async def handle(stream: trio.abc.Stream) -> None:
        await trio.sleep_forever()

    await trio.serve_listeners(handle, listeners)


async def test_readyz_stays_ready_while_one_fleet_member_hangs(tmp_path: Path) -> None:
    """A fleet of two servers: "good" answers everything, "hung" accepts connections and
    never answers. API.md: /readyz is 200 "when the store and at least one backend answer".

    Wrong: /readyz answers 503 `backend: down: no answer within 2 s` right after the start and
    again every few seconds (whenever the hung member's cached health is older than
    SERVICE_HEALTH_TTL), each time after a 2 s wait, although "good" is ready the whole time
    (/api/backends says so). The fleet's health waits for every member's probe, and the
    hung member's probe (2 s, `probe_timeout`) outlasts /readyz's own 2 s deadline, which
    then drops the healthy member's answer too. An orchestrator takes the instance out of
    rotation periodically because an unrelated member hangs.

    Right: 200 on every poll while "good" is ready (the hung one may be named in `checks`
    details, but the instance is ready)."""
    async with open_simulator(Simulator(("sim-model",))) as sim, trio.open_nursery() as nursery:
        port = await nursery.start(_silent_server)
        fleet = tmp_path / "fleet.toml"
        fleet.write_text(
            f'[[server]]\nname = "good"\nkind = "llamacpp"\nurl = "{sim.url}"\n'
            f'[[server]]\nname = "hung"\nkind = "llamacpp"\nurl = "http://127.0.0.1:{port}"\n')
        settings = load_settings(db=tmp_path / "s.db", backends_file=fleet,
                                 default_model="sim-model")
        answers: list[tuple[float, int, Any]] = []
        async with running_server(settings, from_settings=True) as srv, srv.client() as c:
            start = trio.current_time()
            with trio.fail_after(GUARD):
                # Long enough to cover a health-cache cycle (SERVICE_HEALTH_TTL, 5 s).
                while trio.current_time() - start < 9:
                    r = await c.get("/readyz")
                    answers.append((round(trio.current_time() - start, 2), r.status_code,
                                    r.json()["checks"]))
                    if r.status_code != 200:
                        break
                    await trio.sleep(0.5)
                backends = {b["name"]: b["ready"]
                            for b in (await c.get("/api/backends")).json()["data"]}
        nursery.cancel_scope.cancel()
    assert backends["good"] is True
    assert [a for a in answers if a[1] != 200] == [], answers


class _EchoingGateway(Simulator):
    """An OpenAI-compatible gateway that refuses the probe's credentials and, as many do,
    echoes the Authorization header it was sent in its error message."""

    def route(self, method: str, path: str, headers: dict[str, str],
              body: bytes) -> Any:
        if method == "GET" and path.split("?", 1)[0] in ("/health", "/v1/models", "/models"):
            self.requests.append((method, path))
            sent = headers.get("authorization", "")
            return error_response(401, f"invalid credentials: {sent}", openai=True), None
        return super().route(method, path, headers, body)


@pytest.mark.parametrize("where", ["fleet_header", "url_credentials"])
async def test_a_probe_error_echoing_the_upstream_credential_is_not_shown(
        tmp_path: Path, where: str) -> None:
    """The backend's health probe gets a 401 whose message echoes the credential the service
    sent (a fleet file's `headers` value, or the Basic header made from a URL's user:password).
    docs/operations.md: those "are sent ... and never shown (/api/backends, error
    messages, ...)"; service/errors.py registers them as secrets for exactly this echo.

    Wrong: /api/backends' `last_error` and /readyz's `checks.backend` show the echoed
    credential in full (the chat-call path scrubs it; the health probe path does not:
    OpenAICompatBackend.health puts the upstream's error text into BackendHealth.error as is).

    Right: the probe's error text is scrubbed like every other upstream text ("***")."""
    async with open_simulator(_EchoingGateway(("sim-model",))) as sim:
        if where == "fleet_header":
            fleet = tmp_path / "fleet.toml"
            fleet.write_text(f'[[server]]\nname = "gw"\nkind = "llamacpp"\nurl = "{sim.url}"\n'
                             f'headers = {{ Authorization = "Bearer {SECRET}" }}\n')
            settings = load_settings(db=tmp_path / "s.db", backends_file=fleet,
                                     default_model="sim-model")
            secrets = [SECRET]
        else:
            url = sim.url.replace("http://", f"http://svc:{PASSWORD}@")
            settings = load_settings(db=tmp_path / "s.db", backend="llamacpp",
                                     llamacpp_url=url, default_model="sim-model")
            secrets = [PASSWORD, base64.b64encode(f"svc:{PASSWORD}".encode()).decode()]
        async with running_server(settings, from_settings=True) as srv, srv.client() as c:
            with trio.fail_after(GUARD):
                seen = {"/api/backends": (await c.get("/api/backends")).text,
                        "/readyz": (await c.get("/readyz")).text}
    assert ("GET", "/health") in sim.requests  # the probe did reach the gateway
    assert "invalid credentials" in seen["/api/backends"]  # its error is shown...
    leaks = {path: [s for s in secrets if s in text] for path, text in seen.items()}
    assert leaks == {"/api/backends": [], "/readyz": []}, seen  # ...without the credential


async def test_readyz_is_not_ready_when_the_store_cannot_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store starts refusing every commit (an I/O error: a volume gone read-only or full)
    while the service is idle. docs/operations.md: "/readyz is 503 while the store cannot
    write (it probes with a one-row write)"; API.md: a store that cannot write makes "/readyz
    503".

    Wrong: /readyz answers 200 "store: ok" (it only pings with a SELECT; the write probe runs
    only once some other write has failed), while the very next POST gets 503
    store_unavailable. It turns 503 only after a client's write (or the lease renewal, up to
    5 s later) has failed.

    Right: /readyz 503 naming the store as soon as the store cannot commit, before a client
    has been refused. (A probe that landed answers for a second; here for no time, so the
    second /readyz probes again.)"""
    import service.api.ops as ops

    monkeypatch.setattr(ops, "_WRITE_PROBE_FRESH", 0.0)
    settings = load_settings(db=tmp_path / "s.db")
    async with running_server(settings) as srv, srv.client() as c:
        with trio.fail_after(GUARD):
            assert (await c.get("/readyz")).status_code == 200
            store: Any = srv.services.require_store()  # (its faults hook: both stores)

            def refuse() -> None:
                raise InjectedFault("disk I/O error")

            store.faults.before_commit = refuse
            try:
                ready = await c.get("/readyz")
                post = await c.post("/api/conversations", json={})
            finally:
                store.faults.clear()
    assert post.status_code == 503, post.text  # the store cannot write...
    assert post.json()["error"]["type"] == "store_unavailable"
    assert (ready.status_code, ready.json()["down"]) == (503, ["store"]), ready.text




@pytest.fixture
def idle_jump_clock() -> trio.testing.MockClock:
    """Virtual time that jumps to the next deadline once the process has been idle for half a
    second of real time: a real server (its store's threads, its sockets) runs as usual, and a
    wait on a timeout takes the timeout's exact length however fast the machine is."""
    return trio.testing.MockClock(autojump_threshold=0.5)


async def test_readyz_asks_the_store_and_the_backends_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, idle_jump_clock: trio.testing.MockClock
) -> None:
    """The store's writes hang (a volume stalled) and the backend never answers its health
    check. API.md: each check of /readyz is bounded (2 s).

    Wrong: the backend was asked only once the store's check had given up: the answer came
    after 4 s, past many load balancers' probe timeout, which then counts a timeout rather
    than the 503 naming what is down.

    Right: both asked at once; the 503 naming both comes after 2 s (in virtual time: the bound
    is the service's own, not the machine's speed)."""
    import service.api.ops as ops

    class SilentBackend(ScriptedBackend):
        async def health(self) -> BackendHealth:
            await trio.sleep_forever()
            raise AssertionError("unreachable")

    monkeypatch.setattr(ops, "_WRITE_PROBE_FRESH", 0.0)
    settings = load_settings(db=tmp_path / "s.db")
    async with running_server(settings, SilentBackend()) as srv, srv.client() as c:
        store: Any = srv.services.require_store()
        await store.faults.hold_writes()
        try:
            asked = trio.current_time()
            r = await c.get("/readyz")
            answered = trio.current_time()
        finally:
            store.faults.release_writes()
    assert r.status_code == 503
    body = r.json()
    assert body["checks"] == {"store": "down: no answer within 2 s",
                              "backend": "down: no answer within 2 s"}, body
    assert body["down"] == ["store", "backend"]
    assert answered - asked == pytest.approx(2.0, abs=0.1)


async def test_readyz_is_not_ready_while_the_store_refuses_the_runs_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A nearly full volume: the write probe's one row lands (it replaces a page), the runs'
    event batches do not. Here the store refuses every insert of a run event (a trigger, so
    only those writes fail) while a run streams.

    Wrong: /readyz said 200 "store: ok" (its probe landed) while every token of the run was
    held, unshown, and its end could not be stored: a load balancer kept sending runs here.

    Right: 503 naming the store while the runs' writes are refused and held; 200 again once
    they land, and the run ends whole (nothing held was lost)."""
    import sqlite3

    import service.api.ops as ops

    monkeypatch.setattr(ops, "_WRITE_PROBE_FRESH", 0.0)
    db = tmp_path / "s.db"
    settings = load_settings(db=db)
    text = "tick " * 100

    def sql(statement: str) -> None:
        with sqlite3.connect(db, timeout=30) as conn:
            conn.execute(statement)

    backend = ScriptedBackend(lambda req: Reply(text, gap=0.02))
    async with running_server(settings, backend) as srv, srv.client() as c:
        with trio.fail_after(GUARD):
            conv = (await c.post("/api/conversations", json={})).json()["id"]
            assert (await c.get("/readyz")).status_code == 200
            answers: list[Any] = []

            async def ask() -> None:
                answers.append(await c.post(f"/api/conversations/{conv}/messages",
                                            json={"content": "go"}))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask)
                await trio.sleep(0.2)  # started: its tokens are being stored
                await trio.to_thread.run_sync(sql, """
                    CREATE TRIGGER review_full BEFORE INSERT ON run_events
                    BEGIN SELECT RAISE(FAIL, 'database or disk is full'); END""")
                while (ready := await c.get("/readyz")).status_code == 200:  # noqa: ASYNC110 (the store's answer)
                    await trio.sleep(0.05)
                assert ready.json()["down"] == ["store"], ready.text
                assert "refuses" in ready.json()["checks"]["store"], ready.text
                await trio.to_thread.run_sync(sql, "DROP TRIGGER review_full")
                while (ready := await c.get("/readyz")).status_code != 200:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            (answer,) = answers
            assert answer.status_code == 200, answer.text
            assert answer.json()["message"]["content"] == text
            stored = (await c.get(f"/api/conversations/{conv}")).json()["messages"]
            assert stored[-1]["content"] == text
