"""Adversarial review of 7166f1d..HEAD (service, docs): SQLite's conversation delete picking
batches with a cursor, Ollama's tool-call wait (``SERVICE_LLM_TOOL_CALL_TIMEOUT``), and new runs
and conversations refused while the committer holds refused writes.

Virtual time (``autojump_clock``, the simulator in memory) wherever a clock could do it; the one
test through the real server (an Idempotency-Key repeated while writes are refused) waits on
the server's own answers only, bounded by ``GUARD``."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import open_websocket_url

from service.backends import ChatMessage, ChatRequest, build_backend
from service.backends.clients import make_client
from service.backends.http import Budgets
from service.errors import (
    AlreadyBegun,
    BackendError,
    ConfigError,
    NotFound,
    StoreError,
    StoreUnavailable,
)
from service.runs import RunSpec
from service.settings import load_settings
from service.sim import Reply as SimReply
from service.sim import Simulator, mock_transport
from service.store import MessageStatus, RunEvent, SQLiteStore
from service.store.faults import InjectedFault

from .fakes import Reply, ScriptedBackend, supervisor_env
from .servers import running_server
from .streams import ws_send, ws_until, ws_url

GUARD = 60.0
TOOLS = ({"type": "function", "function": {"name": "calculator", "parameters": {
    "type": "object", "properties": {"expression": {"type": "string"}}}}},)


# -- 1. SQLite's conversation delete: batches picked from a cursor -------------------------------


async def _finished_run(store: SQLiteStore, conv: str, tokens: int, owner: str | None) -> str:
    begun = await store.begin_run(conv, content="q", agent="chat", model="m", owner=owner)
    run = begun.run.id
    await store.append_run_events(
        [RunEvent(run, i, "token", {"text": "t"}, 0.0) for i in range(2, tokens + 2)])
    await store.finish_run(
        run, status="succeeded", message_id=begun.reply.id, content="t" * tokens,
        message_status=MessageStatus.complete, error=None, usage={},
        events=[RunEvent(run, tokens + 2, "message", {"content": "t"}, 0.0),
                RunEvent(run, tokens + 3, "run.finished", {"status": "succeeded"}, 0.0)])
    return str(run)


def _count(path: Path, sql: str, *args: Any) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute(sql, args).fetchone()[0])
    finally:
        conn.close()


async def test_sqlite_delete_with_a_failed_batch_budgets_out_mid_run_and_owners_is_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sound. 130 finished runs (more than one pick of 100), 10 events each to prune with a
    budget of 7 rows a write (every run's budget runs out mid-run), one run still running, and
    another owner's conversation beside it. Another owner's delete: NotFound, nothing touched.
    A prune write that fails (its COMMIT refused) fails the delete (StoreUnavailable, the
    conversation still there: ``_write`` does not retry a function, so the closure's cursor
    moved in the failed attempt is dropped with the call); the delete asked again removes every
    run, event and message of it, in a bounded number of writes (the one restart ends), and
    the other conversation stays whole."""
    monkeypatch.setattr("service.store.sqlite_queries.PRUNE_ROWS", 7)
    path = tmp_path / "d.db"
    store = SQLiteStore(path, threaded=False)
    await store.open()
    try:
        conv = (await store.create_conversation(owner="o1")).id
        other = (await store.create_conversation(owner="o2")).id
        for _ in range(130):
            await _finished_run(store, conv, 10, "o1")
        kept = await _finished_run(store, other, 10, "o2")
        live = (await store.begin_run(conv, content="q2", agent="chat", model="m",
                                      owner="o1")).run.id
        await store.append_run_events([RunEvent(live, 2, "token", {"text": "t"}, 0.0)])
        before = _count(path, "SELECT COUNT(*) FROM run_events")

        with pytest.raises(NotFound):
            await store.delete_conversation(conv, owner="o2")
        assert _count(path, "SELECT COUNT(*) FROM run_events") == before

        commits, failed = 0, False

        def fail_third() -> None:
            nonlocal commits, failed
            if "delete_conversation" in store.faults.committing:
                commits += 1
                if commits == 3 and not failed:
                    failed = True
                    raise InjectedFault("disk I/O error")

        store.faults.before_commit = fail_third
        with pytest.raises(StoreUnavailable):
            await store.delete_conversation(conv, owner="o1")
        assert (await store.get_conversation(conv, owner="o1")).id == conv
        commits = 0
        with trio.fail_after(GUARD):
            await store.delete_conversation(conv, owner="o1")
        store.faults.clear()
        # 130 runs x 10 rows / 7 a write, plus a mark each: about 200 writes, not unbounded.
        assert commits < 400, commits
        assert _count(path, "SELECT COUNT(*) FROM runs WHERE conversation_id = ?", conv) == 0
        assert _count(path, "SELECT COUNT(*) FROM messages WHERE conversation_id = ?", conv) == 0
        assert _count(path, "SELECT COUNT(*) FROM run_events WHERE run_id != ?", kept) == 0
        assert len(await store.list_run_events(kept, limit=100)) == 13
        with pytest.raises(NotFound):
            await store.delete_conversation(conv, owner="o1")
    finally:
        await store.aclose()


# -- 2. Ollama offered tools: SERVICE_LLM_TOOL_CALL_TIMEOUT ----------------------------------------


@asynccontextmanager
async def _fleet(tmp_path: Path, sim: Simulator, server: str, **settings: Any
                 ) -> AsyncIterator[Any]:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[[server]]\nname = "o"\nkind = "ollama"\nurl = "http://sim"\n' + server)
    s = load_settings(db=tmp_path / "s.db", backend="ollama", backends_file=fleet,
                      default_model="sim-model", **settings)
    async with make_client(Budgets(), transport=mock_transport(sim)) as client:
        backend = build_backend(s, client)
        try:
            yield backend
        finally:
            await backend.aclose()


async def _silent_for(backend: Any, *, tools: bool, options: tuple[Any, ...] = ()
                      ) -> tuple[float, BackendError]:
    request = ChatRequest((ChatMessage("user", "compute"),), model="sim-model",
                          tools=TOOLS if tools else (), options=options)
    start = trio.current_time()

    async def read_all() -> None:
        async with backend.stream(request) as chunks:
            async for _ in chunks:
                pass

    with pytest.raises(BackendError) as caught:
        await read_all()
    return trio.current_time() - start, caught.value


@pytest.mark.parametrize(("server", "tools", "options", "after", "says"), [
    ("timeouts = { idle = 30 }\n", True, (), 180.0, "no first chunk within 180s"),
    ("timeouts = { idle = 30 }\n", True, (("tool_choice", "none"),), 30.0,
     "no first chunk within 30s"),
    ("timeouts = { idle = 30 }\n", False, (), 30.0, "no first chunk within 30s"),
    ("timeouts = { idle = 300 }\n", True, (), 300.0, "no first chunk within 300s"),
    ("timeouts = { idle = 30, call = 100 }\n", True, (), 100.0, "call exceeded 100s"),
], ids=["own idle, tools", "tool_choice none", "no tools", "own longer idle", "own call"])
async def test_a_fleet_ollama_servers_bounds_with_and_without_tools(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, server: str, tools: bool,
    options: tuple[Any, ...], after: float, says: str,
) -> None:
    """Sound. A backends file's Ollama server with its own ``timeouts``, silent after its
    headers: offered tools it is given up at SERVICE_LLM_TOOL_CALL_TIMEOUT (180 s), its error
    naming the setting; ``tool_choice: "none"`` (no tools sent) and no tools keep the server's
    idle bound (30 s) and do not name it; a server whose idle (300 s) is longer keeps it; the
    server's call bound (100 s) still ends the wait, said as a call timeout."""
    sim = Simulator(default=SimReply(tokens=5, hang_after=0), strict_models=False)
    async with _fleet(tmp_path, sim, server) as backend:
        took, error = await _silent_for(backend, tools=tools, options=options)
    assert took == pytest.approx(after)
    assert says in error.message, error.message
    assert ("SERVICE_LLM_TOOL_CALL_TIMEOUT" in error.message) is (after == 180.0), error.message


async def test_the_auto_backends_ollama_uses_the_setting(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Sound. ``SERVICE_BACKEND=auto`` with an Ollama URL and SERVICE_LLM_TOOL_CALL_TIMEOUT=90:
    a silent Ollama offered tools is given up at 90 s (a chunk gap, after two chunks), the
    error naming the setting."""
    sim = Simulator(default=SimReply(tokens=5, hang_after=2), strict_models=False)
    s = load_settings(db=tmp_path / "s.db", backend="auto", ollama_url="http://sim",
                      default_model="sim-model", llm_tool_call_timeout=90)
    async with make_client(Budgets(), transport=mock_transport(sim)) as client:
        backend = build_backend(s, client)
        try:
            took, error = await _silent_for(backend, tools=True)
        finally:
            await backend.aclose()
    assert took == pytest.approx(90.0)
    assert error.type == "chunk_gap_timeout"
    assert "no chunk for 90s" in error.message, error.message
    assert "SERVICE_LLM_TOOL_CALL_TIMEOUT" in error.message, error.message


@pytest.mark.parametrize("value", ["0", "-5", "soon"])
def test_a_bad_tool_call_timeout_is_a_start_error_naming_it(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """Sound. SERVICE_LLM_TOOL_CALL_TIMEOUT 0, negative or not a number: a ConfigError naming
    the variable (the start's one line), not a service that never waits."""
    monkeypatch.setenv("SERVICE_LLM_TOOL_CALL_TIMEOUT", value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "SERVICE_LLM_TOOL_CALL_TIMEOUT" in str(caught.value)


def test_operations_md_documents_the_setting() -> None:
    """Sound. docs/operations.md has the setting's row with its default."""
    text = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    row = next(line for line in text.splitlines()
               if line.startswith("| `SERVICE_LLM_TOOL_CALL_TIMEOUT`"))
    assert "| `180` |" in row
    assert "Ollama" in row


# -- 3. new runs and conversations refused while the committer holds refused writes ------------


async def _until(condition: Callable[[], bool]) -> None:
    """A look every 50 ms (the committer's state has no event to wait on)."""
    for _ in range(int(GUARD / 0.05)):
        if condition():
            return
        await trio.sleep(0.05)
    raise AssertionError("never came")


def _refuse(store: Any, *ops: str) -> None:
    def hook() -> None:
        if set(ops) & set(store.faults.committing):
            raise InjectedFault("database or disk is full")
    store.faults.before_commit = hook


@pytest.mark.parametrize("via", ["http", "ws"])
async def test_a_keyed_repeat_gets_its_run_while_the_store_refuses_held_writes(
    tmp_path: Path, via: str,
) -> None:
    """Fixed (was: DEFECT: input: POST .../messages with an Idempotency-Key starts a run; the
    store then refuses the runs' event batches (held in memory: /readyz 503); the client, its
    connection lost, sends the same request again with the same key (the only way a non-streamed
    client finds its run). What happens: 503 ``store_unavailable`` (``refuse_while_refusing``
    raises before ``begin_run``, which would have found the key and answered with the run; the
    store still reads, and took the one-row write). What should: the run the first request began
    (as when refused for ``TooManyRuns``, runs.py and ws.py look it up by ``run_of_key``): 200,
    its events. Cause: service/runs/supervisor.py:304
    (``self.committer.refuse_while_refusing()`` before the key is looked at);
    service/api/runs.py:199-212 and service/api/ws.py:391-404 answer a repeat only for
    TooManyRuns. Fix: on StoreUnavailable from that check with an idempotency key, look the key
    up (``run_of_key``, a read) and answer with its run, as for TooManyRuns; only a key not
    found is refused.)
    ``runs.py`` and ``ws.py`` now look the key up on StoreUnavailable too."""
    backend = ScriptedBackend(lambda req: Reply("tick " * 60, gap=0.1))
    settings = load_settings(db=tmp_path / "s.db")
    async with running_server(settings, backend) as srv, srv.client() as c:
        with trio.fail_after(GUARD):
            conv = (await c.post("/api/conversations", json={})).json()["id"]
            body = {"content": "hello", "stream": True, "on_disconnect": "continue"}
            headers = {"Idempotency-Key": "k-1"}
            url = f"/api/conversations/{conv}/messages"
            async with c.stream("POST", url, json=body, headers=headers) as first:
                assert first.status_code == 200
                run_id = first.headers["X-Run-Id"]
            store: Any = srv.services.require_store()
            supervisor = srv.services.require_supervisor()
            _refuse(store, "append_run_events", "finish_run")
            try:
                await _until(lambda: supervisor.committer.refusing)
                assert (await c.get("/readyz")).status_code == 503
                if via == "http":
                    async with c.stream("POST", url, json=body, headers=headers) as again:
                        got = {"status": again.status_code, "run_id": again.headers.get(
                            "X-Run-Id"), "type": "" if again.status_code == 200 else "error"}
                else:  # the WebSocket's message repeating the key (ws.py ``_start_run``)
                    async with open_websocket_url(ws_url(srv)) as ws:
                        await ws_send(ws, conversation_id=conv, content="hello",
                                      idempotency_key="k-1")
                        (got,) = await ws_until(ws, lambda m: True)
            finally:
                store.faults.clear()
            handle = supervisor.get(run_id)
            if handle is not None:
                await handle.finished.wait()
    assert got["type"] != "error", got
    assert got.get("run_id") == run_id, got


async def test_new_runs_and_conversations_are_refused_with_json_and_retry_after(
    tmp_path: Path,
) -> None:
    """Sound. While the committer holds a refused batch: POST /api/conversations, POST
    .../messages (unkeyed) and POST /v1/chat/completions (streamed or not) are 503 JSON
    ``store_unavailable`` with Retry-After, /readyz 503 says the same, and a re-join of the
    running run (GET its events) still answers 200; once writes land again, new ones are
    taken."""
    backend = ScriptedBackend(lambda req: Reply("tick " * 60, gap=0.1))
    settings = load_settings(db=tmp_path / "s.db")
    async with running_server(settings, backend) as srv, srv.client() as c:
        with trio.fail_after(GUARD):
            conv = (await c.post("/api/conversations", json={})).json()["id"]
            url = f"/api/conversations/{conv}/messages"
            async with c.stream("POST", url, json={"content": "a", "stream": True,
                                                   "on_disconnect": "continue"}) as first:
                run_id = first.headers["X-Run-Id"]
            store: Any = srv.services.require_store()
            supervisor = srv.services.require_supervisor()
            _refuse(store, "append_run_events", "finish_run")
            try:
                await _until(lambda: supervisor.committer.refusing)
                answers = [
                    await c.post("/api/conversations", json={}),
                    await c.post(url, json={"content": "b"}),
                    await c.post("/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": "c"}]}),
                    await c.post("/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": "c"}], "stream": True}),
                ]
                ready = await c.get("/readyz")
                async with c.stream("GET", f"/api/runs/{run_id}/events") as rejoin:
                    rejoined = rejoin.status_code
            finally:
                store.faults.clear()
            await _until(lambda: not supervisor.committer.refusing)
            after = await c.post("/api/conversations", json={})
            handle = supervisor.get(run_id)
            if handle is not None:
                await handle.finished.wait()
    for r in answers:
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "store_unavailable", r.text
        assert r.headers.get("Retry-After"), r.headers
    assert ready.status_code == 503
    assert rejoined == 200
    assert after.status_code == 201, after.text


async def test_a_final_state_the_store_cannot_take_for_its_own_reason_does_not_refuse_forever(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fixed (was: DEFECT: input: a run's final state is refused by the store (a full volume)
    past its 15 s budget: kept for a retry, the committer ``refusing`` (right). Space returns,
    but that one row now fails for its own reason (a plain StoreError: a constraint, a value the
    store will not take; committer.py's branch "this run's (a row the store cannot take)"). What
    happens: ``_refused`` stays True (only a final write that lands clears it), so ``refusing``
    stays True for good: every new run and conversation of the instance is 503, and /readyz 503,
    forever, though the store takes every other write; before this change a new run's landed end
    cleared it, and now none can start. What should: the store's latest answer is not a refusal,
    so the instance is not refusing: new runs are taken. Cause:
    service/runs/committer.py:116-117 (``self._refused and bool(self._final_retries)``) with
    ``retry_final_writes``'s StoreError branch (committer.py:438-440) leaving ``_refused`` set;
    made permanent by service/runs/supervisor.py:304. Fix: in that branch set ``self._refused =
    False`` (the store answered), or count as refusing only the kept states whose latest failure
    was StoreUnavailable or a timeout.) The store's answer that is no refusal now clears
    ``_refused``, on retry and in the first tries alike."""
    backend = ScriptedBackend(lambda req: Reply("done"))
    async with supervisor_env(tmp_path, backend) as env:
        conv = await env.conversation()
        store: Any = env.store
        _refuse(store, "finish_run")
        handle = await env.supervisor.start(RunSpec(conv, "hi", agent="chat"))
        await trio.sleep(30)  # past FINAL_WRITE_BUDGET: kept for a retry
        assert env.supervisor.committer.refusing
        store.faults.clear()
        finish = store.finish_run

        async def its_own_trouble(run_id: str, **kwargs: Any) -> bool:
            if run_id == handle.id:  # this one row: refused for itself, not for the store
                raise StoreError("store write failed: CHECK constraint failed")
            return bool(await finish(run_id, **kwargs))

        monkeypatch.setattr(store, "finish_run", its_own_trouble)
        await trio.sleep(120)  # many retry passes (every 2 s), each failing for the row
        # The store takes other writes.
        other = await env.conversation()
        try:
            started = await env.supervisor.start(RunSpec(other, "next", agent="chat"))
        except StoreUnavailable as exc:
            c = env.supervisor.committer
            pytest.fail(f"still refusing after 120 s of a store taking writes: {exc.message} "
                        f"(held events {c.pending}, kept ends {c.unstored})")
        await started.finished.wait()
        assert handle.id != started.id


async def test_a_keyed_repeat_answered_by_the_supervisor_when_writes_are_taken(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Sound (baseline for the defect above): without refused writes, a repeat with the same
    key is AlreadyBegun naming the first run; and after a refused batch lands again, the
    committer stops refusing (no state stuck from an event batch)."""
    backend = ScriptedBackend(lambda req: Reply("tick " * 30, gap=1.0))
    async with supervisor_env(tmp_path, backend) as env:
        conv = await env.conversation()
        spec = RunSpec(conv, "hi", agent="chat", idempotency_key="k")
        handle = await env.supervisor.start(spec)
        with pytest.raises(AlreadyBegun) as begun:
            await env.supervisor.start(RunSpec(conv, "hi", agent="chat", idempotency_key="k"))
        assert begun.value.run_id == handle.id
        _refuse(env.store, "append_run_events")
        await trio.sleep(3)
        assert env.supervisor.committer.refusing
        with pytest.raises(StoreUnavailable):
            await env.supervisor.start(RunSpec(conv, "new", agent="chat"))
        env.store.faults.clear()
        await trio.sleep(5)
        assert not env.supervisor.committer.refusing
        await handle.finished.wait()
        assert handle.status.value == "succeeded"
        fresh = await env.supervisor.start(RunSpec(conv, "new", agent="chat"))
        await fresh.finished.wait()

