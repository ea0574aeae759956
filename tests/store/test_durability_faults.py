"""Review of the SQLite store's durability and recovery under real faults (each test fails on
the code it was written against, for the defect its docstring names).

* A stored event that no longer decodes (one byte of the file rotted, as a page of SQLite has
  no checksum) in a run left by a dead process: the start stops with a 100-line traceback, and
  a live instance's run supervisor dies for good (every later run a 500).
* A database another program holds a write transaction on: ``/readyz`` answers after the
  store's busy timeout (10 s), not within its 2 s deadline.
* A database whose pages are corrupt (``database disk image is malformed`` on every
  conversation request): ``/readyz`` says ready.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import trio

from service.api.ops import _READY_PROBE_DEADLINE
from service.settings import Settings, load_settings
from service.store import RunEvent, SQLiteStore

from ..servers import ROOT, RunningServer, running_server

GUARD = 60  # seconds: a hang fails fast; nothing here asserts speed
DEAD = "999999999:1"  # the tag of a process that is gone (no such PID, no lease)


async def _dead_run_with_a_token(db: Path, conversation_id: str | None = None) -> str:
    """A run left ``running`` by a process that is gone, with one token stored (``MARK``)."""
    store = SQLiteStore(db, process_id=DEAD)
    await store.open()
    try:
        if conversation_id is None:
            conversation_id = (await store.create_conversation()).id
        run, *_ = await store.begin_run(conversation_id, content="q", agent="chat", model=None)
        await store.append_run_events([RunEvent(run.id, 2, "token", {"text": "MARK"}, 0.0)])
    finally:
        await store.aclose()  # checkpointed: everything is in the database file itself
    return run.id


async def test_a_rotted_byte_in_an_interrupted_runs_event_stops_the_start_in_one_line(
    tmp_path: Path,
) -> None:
    """Observed: ``python -m service`` exits with a traceback of ~110 lines ending in
    ``LifespanFailureError ... 'Expecting ',' delimiter'`` (``recover_interrupted`` decodes
    every token event with ``json.loads``; its ``JSONDecodeError`` is no ``StoreError``).
    Expected: the start closes the run (or at worst stops with one line naming SERVICE_DB)."""
    db = tmp_path / "s.db"
    await _dead_run_with_a_token(db)
    # One byte of the stored event rots on disk: {"text":"MARK"} -> {"text":"MARK"]
    data = db.read_bytes()
    at = data.index(b'{"text":"MARK"}') + len(b'{"text":"MARK"')
    db.write_bytes(data[:at] + b"]" + data[at + 1:])

    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    env.update({"SERVICE_DB": str(db), "SERVICE_BACKEND": "llamacpp",
                "SERVICE_LLAMACPP_URL": "http://127.0.0.1:9"})
    log = tmp_path / "service.log"
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "service", "--bind", "127.0.0.1:0"],
            cwd=ROOT, env=env, stderr=out)
    finally:
        os.close(out)
    try:
        with trio.fail_after(GUARD):
            while proc.returncode is None and not re.search(  # noqa: ASYNC110 (another process)
                    rb"Running on http://", await trio.Path(log).read_bytes()):
                await trio.sleep(0.05)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(GUARD, shield=True):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
    text = (await trio.Path(log).read_bytes()).decode(errors="replace")
    traceback = "Traceback" in text
    assert not traceback, text[-1500:]
    if "Running on http://" not in text:  # it refused to start: one line, naming the setting
        lines = [line for line in text.splitlines() if not line.startswith("{")]
        assert len(lines) == 1, text[-3000:]
        assert lines[0].startswith("service: SERVICE_DB: "), text[-3000:]


async def test_a_rotted_event_of_a_dead_siblings_run_does_not_kill_the_run_supervisor(
    server: RunningServer, settings: Settings,
) -> None:
    """Observed: within ``RECOVER_EVERY`` (5 s) ``upkeep.recover_loop`` gets the
    ``JSONDecodeError`` of ``recover_interrupted`` (it catches ``StoreError`` only), the run
    supervisor stops for good, ``/healthz`` is 503 ("the run supervisor stopped:
    JSONDecodeError") and every new run is a 500 ("Nursery is closed to new arrivals").
    Expected: the dead sibling's run is closed (its undecodable event skipped) and this
    instance goes on serving."""
    db = Path(settings.db)
    async with server.client() as http:
        conv = (await http.post("/api/conversations", json={})).json()["id"]
        run_id = await _dead_run_with_a_token(db, conv)
        # The row as a rotted byte leaves it (the page is in this process's cache: SQL here).
        with sqlite3.connect(db) as raw:
            raw.execute("UPDATE run_events SET data = ? WHERE run_id = ? AND seq = 2",
                        ('{"text":"MARK"]', run_id))
        raw.close()
        with trio.fail_after(GUARD):
            while True:
                health = await http.get("/healthz")
                run = (await http.get(f"/api/runs/{run_id}")).json()
                if health.status_code != 200 or run["status"] != "running":
                    break
                await trio.sleep(0.1)
        assert health.status_code == 200, health.text
        assert run["status"] == "failed", run
        r = await http.post(f"/api/conversations/{conv}/messages", json={"content": "hi"})
        assert r.status_code == 200, r.text


_HOLD_THE_WRITE_LOCK = r"""
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN IMMEDIATE")
c.execute("INSERT OR REPLACE INTO heartbeat (id, at) VALUES (1, 0)")
print("locked", flush=True)
sys.stdin.read()
c.execute("ROLLBACK")
"""


async def test_readyz_keeps_its_deadline_while_another_program_holds_the_write_lock(
    server: RunningServer, settings: Settings,
) -> None:
    """Observed: once a write has failed ("database is locked"), a ``/readyz`` whose write
    probe leads a batch (the lock free between two lease renewals, or taken with the queue
    after one) answers after the store's ``busy_timeout`` (10.02 s), although its check has
    a 2 s deadline: ``probe_write`` goes through group commit, whose batches run shielded and
    are waited for (``BATCH_WAIT``). Expected: every answer within the deadline (a hang
    guard of deadline + 3 s here), 503 meanwhile."""
    bound = _READY_PROBE_DEADLINE + 3
    holder = await trio.lowlevel.open_process(
        [sys.executable, "-c", _HOLD_THE_WRITE_LOCK, str(settings.db)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None
        with trio.fail_after(GUARD):
            said = b""
            while not said.endswith(b"\n"):  # a pipe may hand the line over in pieces
                piece = await holder.stdout.receive_some()
                assert piece, f"the lock holder exited after {said!r}"
                said += piece
            assert said == b"locked\n"
        slow: list[tuple[float, str]] = []
        statuses: set[int] = set()
        async with server.client() as http:
            end = trio.current_time() + 40  # two lease renewals fail (10 s each) in this
            while trio.current_time() < end and not slow:
                start = trio.current_time()
                with trio.move_on_after(bound) as scope:
                    r = await http.get("/readyz")
                    statuses.add(r.status_code)
                if scope.cancelled_caught:
                    slow.append((start, "no answer within the bound"))
        assert not slow, f"/readyz over {bound} s while the database was locked: {slow}"
        assert 503 in statuses  # the lock was seen
    finally:
        if holder.returncode is None:
            holder.kill()
        with trio.move_on_after(GUARD, shield=True):
            await holder.wait()


async def test_readyz_is_not_ready_on_a_store_whose_pages_are_corrupt(tmp_path: Path) -> None:
    """Observed: every conversation read and write answers 500 "database disk image is
    malformed", and ``/readyz`` stays 200 ``store: ok`` (its ping reads no page; its write
    probe rewrites the heartbeat page, which is sound, and clears ``write_error``).
    Expected: once SQLite has reported corruption, ``/readyz`` is 503 naming the store (or
    the start refuses the file in one line)."""
    db = tmp_path / "s.db"
    store = SQLiteStore(db)
    await store.open()
    conv = await store.create_conversation()
    for i in range(300):
        await store.append_message(conv.id, role="user", content=f"message {i} " * 50)
    await store.aclose()
    # Pages of the messages table rot (the header, the schema's pages and the other tables'
    # kept: the schema outgrew its first page, and a rotten schema is refused at the start).
    with contextlib.closing(sqlite3.connect(db)) as c:
        pages = [p for (p,) in c.execute(
            "SELECT pageno FROM dbstat WHERE name = 'messages' AND pagetype = 'leaf'")]
    assert len(pages) > 20
    data = bytearray(db.read_bytes())
    for page in pages:
        at = (page - 1) * 4096  # its header (the page's type among it)
        data[at:at + 200] = bytes((page * 7 + i) % 251 for i in range(200))
    db.write_bytes(bytes(data))
    async with running_server(load_settings(db=db)) as srv, srv.client() as http:
        r = await http.get(f"/api/conversations/{conv.id}")
        assert r.status_code == 500, r.text
        assert "malformed" in r.text, r.text
        r = await http.post(f"/api/conversations/{conv.id}/messages", json={"content": "hi"})
        assert r.status_code >= 500, r.text
        assert "malformed" in r.text, r.text
        ready = await http.get("/readyz")
        assert ready.status_code == 503, ready.text
        assert ready.json()["checks"]["store"].startswith("down"), ready.text


async def test_a_new_store_is_readable_by_the_service_user_only(tmp_path: Path) -> None:
    """Conversations are private: the directory the store makes and its file (with the -wal and
    -shm files SQLite gives the file's mode) were 0755 and 0644 under the default umask, so
    every user of the host could read every conversation (2026-12-06; failed before). A file
    and a directory that exist keep their modes (an operator's choice)."""
    db = tmp_path / "data" / "service.db"
    old = os.umask(0o022)  # the usual umask, whatever the runner's
    try:
        store = SQLiteStore(db)
        await store.open()
        try:
            await store.create_conversation(title="private")
        finally:
            await store.aclose()
    finally:
        os.umask(old)
    assert oct(db.parent.stat().st_mode & 0o777) == oct(0o700)
    made = [p for p in db.parent.iterdir() if p.name.startswith("service.db")]
    assert {p.name for p in made} >= {"service.db"}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in made} == {
        p.name: oct(0o600) for p in made}
    # An operator's own file keeps its mode.
    theirs = tmp_path / "theirs.db"
    theirs.touch(mode=0o640)
    theirs.chmod(0o640)
    store = SQLiteStore(theirs)
    await store.open()
    await store.aclose()
    assert oct(theirs.stat().st_mode & 0o777) == oct(0o640)


async def test_a_database_file_deleted_or_replaced_while_serving_is_noticed(
    tmp_path: Path,
) -> None:
    """An operator's ``rm service.db`` (or a clean-up of a temporary directory, or a restore
    copied over it) while the service runs. Observed: nothing noticed it; every write went on
    into the unlinked file, each client told its message and answer were stored, and the next
    start made an empty database: all of it lost. (A worker restarted meanwhile opened a new
    empty file: two stores.) Expected: writes refused (503 ``store_unavailable``), ``/readyz``
    503 saying what happened and where the open file can still be copied from, nothing told
    stored that the file at the path does not hold."""
    db = tmp_path / "s.db"
    async with running_server(load_settings(db=db)) as srv, srv.client() as http:
        with trio.fail_after(GUARD):
            conv = (await http.post("/api/conversations", json={})).json()["id"]
            assert (await http.get("/readyz")).status_code == 200
            for suffix in ("", "-wal", "-shm"):  # rm s.db*
                os.unlink(f"{db}{suffix}")
            r = await http.post(f"/api/conversations/{conv}/messages", json={"content": "hi"})
            assert r.status_code == 503, r.text
            assert r.json()["error"]["type"] == "store_unavailable", r.text
            assert "deleted" in r.json()["error"]["message"], r.text
            ready = await http.get("/readyz")
            assert ready.status_code == 503, ready.text
            said = ready.json()["checks"]["store"]
            assert "deleted" in said, said
            assert "/proc/" in said, said
            r = await http.post("/api/conversations", json={})
            assert r.status_code == 503, r.text
            assert not await trio.Path(db).exists()  # no new, empty file in its place

    # Replaced by another database file (a restore over it) while serving: the same.
    db2 = tmp_path / "t.db"
    async with running_server(load_settings(db=db2)) as srv, srv.client() as http:
        with trio.fail_after(GUARD):
            assert (await http.get("/readyz")).status_code == 200
            other = SQLiteStore(tmp_path / "other.db")
            await other.open()
            await other.aclose()
            os.replace(tmp_path / "other.db", db2)
            r = await http.post("/api/conversations", json={})
            assert r.status_code == 503, r.text
            assert "replaced" in r.json()["error"]["message"], r.text
            ready = await http.get("/readyz")
            assert ready.status_code == 503, ready.text
