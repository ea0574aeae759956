"""``python -m service copy-store``: a SQLite store moved into PostgreSQL (docs/deploy.md).

Real parts throughout: the service on its SQLite file, serving real traffic from the
simulator (runs answered over the native API and ``/v1``, one cut by a SIGKILL mid-stream); the
copy as its own process; the service again on a fresh PostgreSQL database. What the API
answered on SQLite is what it answers on PostgreSQL afterwards, and what a client was shown
before the kill is in the copied store. The refusals (a source in use, a destination not
empty, bad arguments) write nothing, and a copy killed mid-way leaves the destination empty,
to be run again.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio

from service.sim import Reply, Simulator, open_simulator
from service.store import MessageStatus, RunEvent, open_store
from service.store.copy import TABLES

from ..operations.test_instances import GUARD, instance
from ..pg import PASSWORD, PASSWORD_USER
from ..streams import parse_sse

pytestmark = pytest.mark.slow


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


async def _copy(*args: Path | str) -> Done:
    """``python -m service copy-store ARGS``, its own process."""
    with trio.fail_after(GUARD):
        done = await trio.run_process(
            [sys.executable, "-m", "service", "copy-store", *map(str, args)],
            capture_stdout=True, capture_stderr=True, check=False)
    return Done(done.returncode, done.stdout.decode(), done.stderr.decode())


async def _start_copy(*args: Path | str, cwd: Path | None = None) -> trio.Process:
    """The copy in a process of its own, its output in pipes (``_until_said``, ``_finish``)."""
    return await trio.lowlevel.open_process(
        [sys.executable, "-m", "service", "copy-store", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)


async def _until_said(proc: trio.Process, text: bytes) -> bytes:
    """Read the copy's stderr until it says ``text`` (a progress line); what was read."""
    assert proc.stderr is not None
    said = b""
    with trio.fail_after(GUARD * 2):
        while text not in said:
            chunk = await proc.stderr.receive_some()
            assert chunk, said
            said += chunk
    return said


def _big(db: Path, events: int) -> None:
    """Events up to ``events`` for the file's first run: a table whose COPY takes a while."""
    with sqlite3.connect(db) as conn:
        run_id = conn.execute("SELECT id FROM runs").fetchone()[0]
        conn.executemany(
            "INSERT INTO run_events (run_id, seq, type, data, created_at) VALUES (?, ?, ?, ?, ?)",
            ((run_id, seq, "token", json.dumps({"text": f"t{seq}"}), 1.0)
             for seq in range(10, events)))


def _rows(url: str) -> dict[str, int]:
    """Rows per copied table (0 for a table that is not there: a copy that did not happen
    leaves no schema either)."""
    with psycopg.connect(url) as conn:
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # type: ignore
                if conn.execute("SELECT to_regclass(%s)", (t,)).fetchone()[0]  # type: ignore
                else 0 for t, _ in TABLES}


async def _seen(http: httpx.AsyncClient, conv_ids: list[str], run_ids: list[str]
                ) -> dict[str, Any]:
    """What the API answers about these conversations and runs (times and all)."""
    seen: dict[str, Any] = {"list": (await http.get("/api/conversations",
                                                     params={"limit": 100})).json()}
    for cid in conv_ids:
        seen[cid] = (await http.get(f"/api/conversations/{cid}")).json()
    for rid in run_ids:
        seen[rid] = (await http.get(f"/api/runs/{rid}")).json()
        r = await http.get(f"/api/runs/{rid}/events")
        seen[rid + "/events"] = [f for f in parse_sse(r.text) if "id" in f]
        seen[rid + "/calls"] = (await http.get("/api/llm-calls",
                                               params={"run_id": rid})).json()
    return seen


async def test_the_api_answers_on_postgresql_what_it_answered_on_sqlite(
        tmp_path: Path, pg_url: str) -> None:
    db = tmp_path / "service.db"
    sim = Simulator(("sim-model",), default=Reply(text="the answer is 42"))
    async with open_simulator(sim) as s:
        async with instance(str(db), s.url, tmp_path, "sqlite") as (_, http):
            convs, runs = [], []
            for n in range(3):
                conv = (await http.post("/api/conversations", json={"title": f"talk {n}"})
                        ).json()
                convs.append(conv["id"])
                for q in ("first", "second"):
                    r = await http.post(f"/api/conversations/{conv['id']}/messages",
                                        json={"content": f"{q} question {n}"})
                    assert r.status_code == 200, r.text
                    runs.append(r.json()["run"]["id"])
            r = await http.post("/v1/chat/completions", json={
                "model": "sim-model", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text
            runs.append(r.json()["id"].removeprefix("chatcmpl-"))
            before = await _seen(http, convs, runs)

        done = await _copy(db, pg_url)
        assert done.returncode == 0, done.stderr
        counts = _rows(pg_url)
        assert counts["runs"] == len(runs)
        assert counts["conversations"] == 4  # /v1's own too
        assert f"copied {db} into postgresql://" in done.stdout
        assert f"{counts['run_events']:,} run events" in done.stdout

        async with instance(pg_url, s.url, tmp_path, "pg") as (_, http):
            assert await _seen(http, convs, runs) == before
            # New rows go on after the copied ones (the identities were moved on).
            r = await http.post(f"/api/conversations/{convs[0]}/messages",
                                json={"content": "third question"})
            assert r.status_code == 200, r.text
            got = (await http.get(f"/api/conversations/{convs[0]}")).json()
            assert [m["content"] for m in got["messages"]][-2:] == [
                "third question", "the answer is 42"]
            new = (await http.post("/api/conversations", json={"title": "new"})).json()
            page = (await http.get("/api/conversations")).json()["data"]
            assert page[0]["id"] == new["id"]


async def test_a_run_cut_by_a_kill_is_closed_on_postgresql_with_what_its_client_saw(
        tmp_path: Path, pg_url: str) -> None:
    db = tmp_path / "service.db"
    sim = Simulator(("sim-model",), default=Reply(tokens=400, interval=0.02))
    async with open_simulator(sim) as s:
        buf = ""
        async with instance(str(db), s.url, tmp_path, "sqlite") as (proc, http):
            conv = (await http.post("/api/conversations", json={})).json()["id"]
            try:
                async with http.stream("POST", f"/api/conversations/{conv}/messages",
                                       json={"content": "go", "stream": True}) as r:
                    async for chunk in r.aiter_text():
                        buf += chunk
                        if buf.count("event: token") >= 20:
                            proc.kill()  # SIGKILL, mid-stream
                            await proc.wait()
            except httpx.HTTPError:
                pass
        frames = [f for f in parse_sse(buf[: buf.rfind("\n\n") + 2]) if "id" in f]
        run_id = next(f["data"]["run_id"] for f in frames if f["event"] == "run.started")
        shown = "".join(f["data"]["text"] for f in frames if f["event"] == "token")
        assert shown

        done = await _copy(db, pg_url)
        assert done.returncode == 0, done.stderr
        assert "1 runs were left in progress by a process that died" in done.stdout

        async with instance(pg_url, s.url, tmp_path, "pg") as (_, http):
            with trio.fail_after(GUARD):
                while (run := (await http.get(f"/api/runs/{run_id}")).json())[  # noqa: ASYNC110 (another process)
                        "status"] == "running":
                    await trio.sleep(0.1)
            assert run["status"] == "failed"
            assert "interrupted" in run["error"]
            msgs = (await http.get(f"/api/conversations/{conv}")).json()["messages"]
            assert msgs[-1]["content"].startswith(shown)


async def test_a_source_in_use_is_refused_and_nothing_is_written(
        tmp_path: Path, pg_url: str) -> None:
    db = tmp_path / "service.db"
    async with open_simulator() as s, instance(str(db), s.url, tmp_path, "sqlite") as (proc, _):
        done = await _copy(db, pg_url)
    assert done.returncode == 1
    assert f"is in use: a service process holds it (pid {proc.pid} on" in done.stderr
    with psycopg.connect(pg_url) as conn:  # not even the schema was made
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = "
                            "current_schema()").fetchone()[0] == 0  # type: ignore[index]
    assert (await _copy(db, pg_url)).returncode == 0  # stopped, it copies


async def _filled(db: Path, conversations: int = 2) -> None:
    async with open_store(db) as store:
        for n in range(conversations):
            conv = await store.create_conversation(title=f"c{n}")
            begun = await store.begin_run(conv.id, content="q", agent="chat", model=None)
            await store.append_run_events([RunEvent.make(
                begun.run.id, seq, "token", {"text": f"t{seq}"}, time.time())
                for seq in range(2, 6)])
            assert await store.finish_run(
                begun.run.id, status="succeeded", message_id=begun.reply.id,
                content="t2t3t4t5", message_status=MessageStatus.complete, error=None,
                usage={})


async def test_a_destination_that_is_not_empty_is_left_as_it_was(
        tmp_path: Path, pg_url: str) -> None:
    db = tmp_path / "service.db"
    await _filled(db)
    async with open_store(pg_url) as store:
        kept = await store.create_conversation(title="already there")
    done = await _copy(db, pg_url)
    assert done.returncode == 1
    assert "is not empty (1 rows in conversations)" in done.stderr
    assert _rows(pg_url)["conversations"] == 1
    async with open_store(pg_url) as store:
        assert (await store.get_conversation(kept.id)).title == "already there"


async def test_nul_characters_of_older_files_are_stored_as_the_service_stores_them(
        tmp_path: Path, pg_url: str) -> None:
    db = tmp_path / "service.db"
    await _filled(db, 1)
    with sqlite3.connect(db) as conn:  # as an older version could leave them
        conn.execute("UPDATE conversations SET title = ?", ("a\x00b",))
    done = await _copy(db, pg_url)
    assert done.returncode == 0, done.stderr
    assert "1 texts held NUL characters" in done.stdout
    async with open_store(pg_url) as store:
        convs, _ = await store.list_conversations()
        assert [c.title for c in convs] == ["a\ufffdb"]


@pytest.mark.parametrize("case", ["missing", "not-a-store", "newer", "reversed", "no-server",
                                  "wrong-password"])
async def test_what_cannot_be_copied_is_one_line_and_never_a_password(
        case: str, tmp_path: Path, pg_url: str) -> None:
    db = tmp_path / "service.db"
    dest = pg_url
    if case == "not-a-store":
        sqlite3.connect(db).execute("CREATE TABLE t (x)").connection.commit()
    elif case == "newer":
        await _filled(db, 1)
        with sqlite3.connect(db) as conn:
            conn.execute("PRAGMA user_version = 99")
    elif case != "missing":
        await _filled(db, 1)
    base = pg_url.rsplit("/", 1)[0].split("@", 1)[1]  # host:port
    if case == "no-server":
        dest = f"postgresql://{PASSWORD_USER}:{PASSWORD}@127.0.0.1:1/x"
    elif case == "wrong-password":
        dest = f"postgresql://{PASSWORD_USER}:Wrong-{PASSWORD}@{base}/postgres"
    args = (dest, str(db)) if case == "reversed" else (str(db), dest)
    done = await _copy(*args)
    out = done.stdout + done.stderr
    assert "Traceback" not in out
    assert PASSWORD not in out
    expected = {
        "missing": (1, "no SQLite file at"),
        "not-a-store": (1, "is not a store of this service (no table conversations)"),
        "newer": (1, "is at schema version 99"),
        "reversed": (2, "a SQLite file into PostgreSQL"),
        "no-server": (1, "cannot connect to postgresql://pwuser@127.0.0.1:1/x"),
        "wrong-password": (1, "cannot connect to"),
    }[case]
    assert (done.returncode, expected[1] in done.stderr) == (expected[0], True), out
    if case != "reversed":
        assert len(done.stderr.strip().splitlines()) == 1, out


async def test_a_copy_killed_mid_way_leaves_nothing_and_can_be_run_again(
        tmp_path: Path, pg_url: str) -> None:
    db = tmp_path / "service.db"
    await _filled(db, 1)
    _big(db, 400_000)  # a big table: the kill lands inside its COPY
    proc = await _start_copy(db, pg_url)
    await _until_said(proc, b"run_events: 100,000 rows...")
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        assert pipe is not None
        await pipe.aclose()
    with psycopg.connect(pg_url) as conn:  # no rows, and no schema either
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = "
                            "current_schema()").fetchone()[0] == 0  # type: ignore[index]
    done = await _copy(db, pg_url)
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(db) as conn:
        events = conn.execute("SELECT count(*) FROM run_events").fetchone()[0]
    assert events > 400_000 - 10
    assert _rows(pg_url)["run_events"] == events


async def test_new_rows_are_numbered_after_the_files_last_even_a_deleted_one(
        tmp_path: Path, pg_url: str) -> None:
    # SQLite's AUTOINCREMENT never gives a deleted row's number again; nor does the copy's
    # database (a list cursor names a number).
    db = tmp_path / "service.db"
    await _filled(db, 3)
    async with open_store(db) as store:
        newest = (await store.list_conversations(limit=1))[0][0]
        await store.delete_conversation(newest.id)
    with sqlite3.connect(db) as conn:
        last = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'conversations'"
                            ).fetchone()[0]
        kept = conn.execute("SELECT max(seq) FROM conversations").fetchone()[0]
    assert last > kept
    assert (await _copy(db, pg_url)).returncode == 0
    async with open_store(pg_url) as store:
        new = await store.create_conversation()
    with psycopg.connect(pg_url) as conn:
        seq = conn.execute("SELECT seq FROM conversations WHERE id = %s", (new.id,)).fetchone()
    assert seq == (last + 1,)


async def test_numbers_the_destination_gave_before_are_not_given_again(
        tmp_path: Path, pg_url: str) -> None:
    # An empty destination whose rows were deleted (an instance ran on it once): its identity
    # had moved past them; the copy does not set it back below.
    db = tmp_path / "service.db"
    await _filled(db, 1)
    async with open_store(pg_url) as store:
        for _ in range(5):
            gone = await store.create_conversation()
            await store.delete_conversation(gone.id)
    assert (await _copy(db, pg_url)).returncode == 0
    async with open_store(pg_url) as store:
        new = await store.create_conversation()
    with psycopg.connect(pg_url) as conn:
        seq = conn.execute("SELECT seq FROM conversations WHERE id = %s", (new.id,)).fetchone()
    assert seq == (6,)
