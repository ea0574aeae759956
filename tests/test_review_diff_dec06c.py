"""Review of the changes 5b2f6ce..HEAD (2026-12-06, third pass). Each test asserts what the
docs (../shared/API.md, docs/*.md) or the changed code's own docstrings promise, and fails on
the code it was written against because of the defect its docstring names:

1. ``GET /api/llm-calls?run_id=&limit=``, API.md's own template, is a 404 (an empty
   ``run_id`` is looked up as a run id), while the change made an empty number, and an empty
   ``?before=``, mean "absent" (service/api/models.py ``_empty_number_is_absent``).
2. A fleet call where one server that has the model is down and another that has it too
   refuses the request (400, "does not support tools") is now a 503: ``model_down``
   (service/backends/auto.py ``_all_failed``) throws away every answer, the 400 included, so a
   client retries a request that will be refused for ever, and the ReAct agent's fallback to
   the text protocol (it catches ``BackendRejectedRequest``) never runs.
3. A ReAct step written in a code fence, followed by an ``Observation:`` the model made up, is
   no longer a tool call: the new "prose after the fence" rule in ``_unfenced``
   (service/agents/react_parser.py) takes the made-up observation for prose, and the turn's
   raw protocol text becomes the answer.
4. A SQLite store opened on a relative path (the default ``./data/service.db``) refuses every
   write as "deleted" once the process's working directory changes: ``file_gone``
   (service/store/sqlite.py) stats the relative path again, from wherever the process is now.
5. With the database under a symlinked directory, a deleted file's ``/readyz`` never says
   where the open file can be copied from (docs/operations.md promises ``/proc/PID/fd/N``):
   ``_open_copy`` compares the unresolved path with ``/proc/self/fd``'s resolved one.
6. ``websocket_ping_interval = "20"`` (or ``nan``), and ``keep_alive_timeout = -5.0``, in
   hypercorn.toml pass the new typed-key check (the first's default is None, so it is
   skipped; seconds are checked for finiteness only) and crash every WebSocket / every
   connection, where docs/operations.md says a known key of the wrong type is one line, exit 2.
7. ``/readyz`` says ready for the whole ``FINAL_WRITE_BUDGET`` (15 s) while a run's end is
   refused (``StoreUnavailable``) and retried inside ``EventCommitter.finish``: ``refusing``
   only looks at ``_final_retries``, which the end joins after the budget.

Real servers on 127.0.0.1:0 and real simulated upstreams; timeouts are hang guards only.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
import trio

from service.agents.react_parser import parse_react
from service.backends.base import ChatMessage, ChatRequest
from service.backends.http import Budgets, make_client
from service.backends.ollama import OllamaBackend
from service.backends.router import FleetBackend, Member
from service.errors import BackendError, BackendRejectedRequest, ConfigError
from service.server import build_config
from service.settings import load_settings
from service.sim import Reply, Simulator, open_simulator
from service.store.sqlite import SQLiteStore

from .backend_helpers import serve_in, until_refused
from .servers import running_server

GUARD = 30  # seconds any test here may take before it fails (a hang guard)
BUDGETS = Budgets(connect=3.0, first_chunk=10.0, gap=5.0, call=100.0)


# -- 1. API.md's own ?run_id=&limit= ---------------------------------------------------------------


async def test_llm_calls_with_api_md_empty_template_values_is_the_unfiltered_list(
    tmp_path: Path,
) -> None:
    """API.md: ``GET /api/llm-calls?run_id=&limit=`` -> ``{"data": [call, ...]}``. Commit
    2672f88 made an empty number its default "as an empty ?before= was (API.md's own
    ?limit=&before= was a 422)"; ``?limit=`` here is fixed, but the empty ``run_id`` is still
    looked up as a run: 404 ``no run ''`` for the template as written. An empty filter is no
    filter, as an empty ``?before=`` is no cursor."""
    async with running_server(load_settings(db=tmp_path / "s.db")) as srv, \
            srv.client() as http:
        with trio.fail_after(GUARD):
            r = await http.get("/api/llm-calls?run_id=&limit=")
            same = await http.get("/api/llm-calls")
    assert same.status_code == 200, same.text
    assert r.status_code == 200, r.text
    assert r.json() == same.json()


# -- 2. a 400 from a server with the model, another with it down ---------------------------------







async def test_a_refusal_from_a_server_with_the_model_is_kept_when_another_is_down() -> None:
    """Two Ollama servers of one fleet both list ``llama3:8b``; ``ollama-a`` has just gone
    down (refused: ``BackendUnavailable``), ``ollama-b`` answers the request 400 ("does not
    support tools": ``BackendRejectedRequest``). ``AutoBackend.stream``
    (service/backends/auto.py:258-260) sets ``model_down`` because a server known to have the
    model is down, and ``_all_failed`` (auto.py:372) then drops *every* answer
    (``answered = []``), not only the lower tiers' 404s the change was about: the call is a
    503 ``AllBackendsFailed``. Before the change it was the 400 (auto.py's own docstring: "A
    refusal (400) before an unknown model (404): the server that has the model said what is
    wrong"). A client retries a 503 for ever; ``ReActAgent.loop`` (agents/react.py) falls back
    to the text protocol only on ``BackendRejectedRequest``. Expected: the 400."""
    a = Simulator(("llama3:8b",), default=Reply(tokens=2))
    b = Simulator(("llama3:8b",), default=Reply(
        status=400, error="registry.ollama.ai/library/llama3:8b does not support tools"))
    kill = trio.CancelScope()
    request = ChatRequest(messages=(ChatMessage("user", "hello"),), model="llama3:8b")
    caught: BackendError | None = None
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, open_simulator(b) as b_srv, \
                make_client(BUDGETS) as client:
            port = await nursery.start(serve_in, a, kill)
            fleet = FleetBackend(
                [OllamaBackend("ollama-a", f"http://127.0.0.1:{port}", client, BUDGETS),
                 OllamaBackend("ollama-b", b_srv.url, client, BUDGETS)],
                [Member(kind="ollama"), Member(kind="ollama")],
                default_model="llama3:8b", inventory_ttl=600.0)
            try:
                await fleet.refresh_if_stale()  # both up: both known to have the model
                assert all(inv.models == frozenset({"llama3:8b"})
                           for inv in fleet.inventories), fleet.inventories
                kill.cancel()
                await until_refused(port)
                try:
                    await fleet.chat(request)
                except BackendError as exc:
                    caught = exc
            finally:
                await fleet.aclose()
            nursery.cancel_scope.cancel()
    assert caught is not None, "the call succeeded"
    assert isinstance(caught, BackendRejectedRequest), (
        f"ollama-b's refusal became {caught.status} {caught.type}: {caught.message}")
    assert caught.status == 400, caught


# -- 3. ReAct: a fenced step, then a made-up observation -------------------------------------------


@pytest.mark.parametrize("turn", [
    pytest.param("```\nThought: I need to compute 6*7.\nAction: calculator\n"
                 "Action Input: {\"expression\": \"6*7\"}\n```\nObservation: 42",
                 id="fenced-then-observation"),
    pytest.param("Here is my next step:\n```\nAction: calculator\n"
                 "Action Input: {\"expression\": \"6*7\"}\n```\n"
                 "Observation: (waiting for the result)\nThought: I will wait.",
                 id="preamble-fenced-then-observation-and-thought"),
])
def test_react_a_fenced_step_followed_by_a_made_up_observation_is_still_a_call(
    turn: str,
) -> None:
    """The ReAct agent sends no ``Observation:`` stop (the client's stop only), so models run
    on past their action; the module docstring: "a stray Observation: they made up. The parser
    accepts all of that", and ``up_to_the_action`` exists to cut it. Before commit 9ef8905 a
    step in a fence followed by such an observation was the calculator call. The new rule in
    ``_unfenced`` (service/agents/react_parser.py:82-85: "Prose after the fence: the example
    of an answer quoting the protocol") takes *any* text after the closing fence for prose,
    a made-up ``Observation:`` label included: the Action is masked, and the turn's raw
    protocol text (backticks, "Action:", "Action Input:") becomes the run's final answer,
    the tool never run. Expected: the calculator call with its input."""
    step = parse_react(turn, tools=["calculator"])
    assert (step.action, step.action_input) == ("calculator", {"expression": "6*7"}), step


# -- 4. SQLite: a relative path and a change of directory -----------------------------------------


async def test_a_store_on_a_relative_path_keeps_writing_after_a_chdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``SERVICE_DB`` defaults to the relative ``./data/service.db`` (docs/operations.md).
    ``SQLiteStore.file_gone`` (service/store/sqlite.py:323-342) stats ``self.path`` as given,
    at every write transaction and ping; the connections SQLite opened hold the file, so
    a later ``os.chdir`` (process-wide: a sync tool run in a thread, an embedding app) does
    not change which database is written. After one, the relative path names nothing (or
    another file): every write is refused ("the database file s.db was deleted while the
    service ran") and ``/readyz`` says down, though the file is where it was. Expected: the
    store goes on writing (the identity check is of the file opened: an absolute path taken
    at open)."""
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(home)
    store = SQLiteStore(Path("s.db"))
    await store.open()
    try:
        monkeypatch.chdir(elsewhere)
        assert (home / "s.db").exists()
        assert store.file_gone() is None, store.file_gone()
        with trio.fail_after(GUARD):
            await store.probe_write()
            await store.ping()
    finally:
        await store.aclose()


# -- 5. SQLite: a deleted file under a symlinked directory ----------------------------------------


async def test_readyz_names_the_open_copy_of_a_deleted_file_under_a_symlinked_directory(
    tmp_path: Path,
) -> None:
    """docs/operations.md: when the SQLite file is deleted while the service runs, "/readyz is
    503 saying so, with where the open file can still be copied from (/proc/PID/fd/N)".
    ``_open_copy`` (service/store/sqlite.py:399-410) looks for a ``/proc/self/fd`` link equal
    to ``os.path.abspath(path) + " (deleted)"``; the kernel's link names the *resolved*
    path. With the data directory reached through a symlink (a volume mounted elsewhere and
    linked in, /var/lib/service -> /mnt/disk), they never match: the one way to save the
    data is not named. Expected: ``/readyz`` names ``/proc/...``."""
    real = tmp_path / "volume"
    real.mkdir()
    link = tmp_path / "data"
    link.symlink_to(real, target_is_directory=True)
    db = link / "s.db"
    async with running_server(load_settings(db=db)) as srv, srv.client() as http:
        with trio.fail_after(GUARD):
            assert (await http.post("/api/conversations", json={})).status_code == 201
            assert (await http.get("/readyz")).status_code == 200
            for suffix in ("", "-wal", "-shm"):  # rm s.db*
                os.unlink(f"{real / 's.db'}{suffix}")
            ready = await http.get("/readyz")
    assert ready.status_code == 503, ready.text
    said = ready.json()["checks"]["store"]
    assert "deleted" in said, said
    assert "/proc/" in said, f"where the open file can be copied from is not named: {said}"


# -- 6. hypercorn.toml: keys the typed check lets through ----------------------------------------


@pytest.mark.parametrize(("key", "value"), [
    pytest.param("websocket_ping_interval", '"20"', id="ping-interval-string"),
    pytest.param("websocket_ping_interval", "nan", id="ping-interval-nan"),
    pytest.param("keep_alive_timeout", "-5.0", id="keep-alive-negative"),
])
def test_a_hypercorn_key_that_would_crash_connections_stops_the_start(
    tmp_path: Path, key: str, value: str,
) -> None:
    """docs/operations.md: "A key of the file that hypercorn knows must hold its type
    (``workers = "2"``, ``workers = 2.5`` and ``graceful_timeout = nan`` are one line, exit 2,
    not a traceback at start ...)". ``_check_types`` (service/server.py:54-81), as changed
    by e33ed53/95f0dc2, takes the type from hypercorn's default and checks counts for
    ``>= 0`` but seconds only for finiteness:

    * ``websocket_ping_interval`` (docs/api.md tells users to set it in hypercorn.toml) has
      the default None, so it is not checked at all: ``"20"`` reaches service/wsping.py's
      ``max(STALL_KEEPALIVES * interval, STALL_MIN)`` (``"20202020"`` against 2.0: a
      TypeError at every WebSocket), ``nan`` reaches ``trio.move_on_after`` (ValueError);
    * ``keep_alive_timeout = -5.0`` is finite, so it passes, and every connection then dies
      in hypercorn's ``_idle_timeout`` (``trio.move_on_after(-5.0)``: "`seconds` must be
      non-negative"; seen on a real server: each request "Server disconnected without
      sending a response", an exception-group traceback per connection).

    Expected: ConfigError naming the key, before the app starts."""
    path = tmp_path / "hypercorn.toml"
    path.write_text(f'worker_class = "trio"\n{key} = {value}\n')
    with pytest.raises(ConfigError) as caught:
        build_config(path, None, keepalive=15.0)
    assert key in caught.value.message


# -- 7. /readyz while a run's final state is being refused ----------------------------------------


async def test_readyz_is_not_ready_while_a_runs_final_state_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docs/operations.md (commit aa0c779): /readyz is 503 "also while the runs' own writes
    are refused and held (a nearly full volume takes the probe's one page, not a batch of
    events)". ``EventCommitter.refusing`` (service/runs/committer.py:106-112) is
    ``(_retrying and _pending) or (_refused and _final_retries)``; but a run's end is
    refused and retried inside ``finish`` for ``FINAL_WRITE_BUDGET`` (15 s) *before* it is
    put in ``_final_retries``, and ``_with_earlier`` has taken the run's held events out of
    ``_pending`` into it. For those 15 s, with every run's end refused by a full volume
    (``StoreUnavailable``, ``_refused`` already True), /readyz answers 200 "store: ok" (the
    probe's one row lands) and a load balancer keeps sending runs here. Here the store
    refuses ``finish_run`` (as a full volume does: ``StoreUnavailable``) while the probe
    lands; /readyz is asked once the end has been refused twice (well inside the budget).
    Expected: 503 naming the store; the run then ends whole once the store takes it."""
    import service.api.ops as ops
    from service.errors import StoreUnavailable

    from .fakes import Reply as ScriptedReply
    from .fakes import ScriptedBackend

    monkeypatch.setattr(ops, "_WRITE_PROBE_FRESH", 0.0)
    backend = ScriptedBackend(lambda req: ScriptedReply("done"))
    async with running_server(load_settings(db=tmp_path / "s.db"), backend) as srv, \
            srv.client() as http:
        store = srv.services.require_store()
        real_finish = store.finish_run
        full = True
        refused = trio.Event()
        count = 0

        async def finish_run(*args: object, **kwargs: object) -> bool:
            nonlocal count
            if full:
                count += 1
                if count >= 2:
                    refused.set()
                raise StoreUnavailable("store write failed: database or disk is full")
            return await real_finish(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(store, "finish_run", finish_run)
        with trio.fail_after(GUARD):
            conv = (await http.post("/api/conversations", json={})).json()["id"]
            assert (await http.get("/readyz")).status_code == 200
            answers: list[httpx.Response] = []

            async def ask() -> None:
                answers.append(await http.post(f"/api/conversations/{conv}/messages",
                                               json={"content": "go"}))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask)
                await refused.wait()  # the run's end refused twice: in finish's budget
                ready = await http.get("/readyz")
                full = False  # the volume freed: the end lands on its next try
    assert ready.status_code == 503, (
        f"/readyz said ready while every run's end is refused: {ready.text}")
    assert ready.json()["down"] == ["store"], ready.text
    (answer,) = answers
    assert answer.status_code == 200, answer.text
