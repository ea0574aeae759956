"""Second review of ``python -m service copy-store`` (2026-12-08), probing the first review's
fixes: the at-rest watch (``PRAGMA data_version``), the schema made in the copy's transaction
(an instance started on the destination meanwhile), the destination's state.

The ``Fixed (was: ...)`` test failed before its fix in the same session; ``Sound:`` tests
held and add coverage.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import psycopg
import pytest

from service.sim import Reply, Simulator, open_simulator
from service.store.copy import CopyError, copy_store
from service.store.schema import PG_MIGRATIONS

from ..operations.test_instances import instance
from .test_copy_store import _big, _copy, _filled, _rows, _start_copy, _until_said
from .test_review_copy_store_dec08 import _finish, _tables

pytestmark = pytest.mark.slow


async def test_a_commit_while_the_copy_connects_to_postgresql_is_not_noticed(
        tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed (was: DEFECT: the watch's ``PRAGMA data_version`` is read before the snapshot in
    ``_open_source`` (as its comment says it must be), but that value is thrown away: the
    baseline compared before COMMIT is read again at the top of ``_Copy.run()``, after the
    snapshot began, after the at-rest check and after ``psycopg.connect`` (up to its 10 s
    connect timeout on a slow network). A commit to the file in that window (a service started
    on it then) moves the version before the baseline is taken, so it is not seen: the copy
    lacks the rows that commit wrote, and says "copied" (exit 0). The baseline should be the
    value read before the snapshot (kept from ``_open_source``), so that any commit after the
    snapshot began refuses the copy. (Here the commit is made by another connection while the
    copy connects to PostgreSQL.).)"""
    db = tmp_path / "service.db"
    await _filled(db)
    real = psycopg.connect

    def connect(*args: object, **kwargs: object) -> psycopg.Connection:
        with sqlite3.connect(db) as conn:  # another writer, after the copy's snapshot began
            conn.execute("INSERT INTO conversations (id, title, created_at, updated_at) "
                         "VALUES ('c_late', 'written during the copy', 1, 1)")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(psycopg, "connect", connect)
    refused, summary = "", ""
    try:
        summary = copy_store(db, pg_url)
    except CopyError as exc:
        refused = str(exc)
    monkeypatch.undo()
    with sqlite3.connect(db) as conn:
        in_file = conn.execute("SELECT count(*) FROM conversations").fetchone()[0]
    assert "was written while it was copied" in refused, (
        f"copied ({summary!r}): {_rows(pg_url)['conversations']} conversations of the "
        f"file's {in_file}; the one committed during the copy is lost")
    assert _tables(pg_url) == []


async def test_an_instance_started_on_the_destination_during_the_copy_serves_the_copy(
        tmp_path: Path, pg_url: str) -> None:
    """Sound: a service started on the (empty) PostgreSQL database while the copy runs waits
    at the schema's migration lock that the copy's transaction holds, then serves the copied
    rows (new ones numbered after them); the copy is not disturbed (exit 0)."""
    db = tmp_path / "service.db"
    await _filled(db, 1)
    _big(db, 300_000)
    proc = await _start_copy(db, pg_url)
    try:
        await _until_said(proc, b"conversations: 1 rows")
        sim = Simulator(("sim-model",), default=Reply(text="after the move"))
        async with open_simulator(sim) as s, \
                instance(pg_url, s.url, tmp_path, "pg") as (_, http):
            done = await _finish(proc)
            assert done.returncode == 0, done
            convs = (await http.get("/api/conversations")).json()["data"]
            assert [c["title"] for c in convs] == ["c0"]
            r = await http.post(f"/api/conversations/{convs[0]['id']}/messages",
                                json={"content": "new"})
            assert r.status_code == 200, r.text
    finally:
        if proc.returncode is None:
            proc.kill()
    assert _rows(pg_url)["runs"] == 2


async def test_a_source_with_no_rows_and_a_destination_an_instance_once_ran_on(
        tmp_path: Path, pg_url: str) -> None:
    """Sound: a file with no rows copies (0 of each); a destination at this code's schema
    that an instance started on once (its ``instances``/``probes`` rows, no data) is empty
    enough; the first conversation made afterwards is numbered 1."""
    db = tmp_path / "service.db"
    await _filled(db, 0)
    sim = Simulator(("sim-model",), default=Reply(text="ok"))
    async with open_simulator(sim) as s:
        async with instance(pg_url, s.url, tmp_path, "pg") as (_, http):
            assert (await http.get("/readyz")).status_code == 200
        done = await _copy(db, pg_url)
        assert done.returncode == 0, done
        assert "copied" in done.stdout
        assert "0 conversations" in done.stdout
        async with instance(pg_url, s.url, tmp_path, "pg2") as (_, http):
            conv = (await http.post("/api/conversations", json={})).json()
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT seq FROM conversations WHERE id = %s",
                            (conv["id"],)).fetchone() == (1,)


async def test_a_destination_at_a_newer_schema_is_refused_untouched(
        tmp_path: Path, pg_url: str) -> None:
    """Sound: an empty database at a schema newer than this code's is refused in one line,
    exit 1, its schema version untouched."""
    db = tmp_path / "service.db"
    await _filled(db, 1)
    newer = len(PG_MIGRATIONS) + 1
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (%s)", (newer,))
    done = await _copy(db, pg_url)
    assert done.returncode == 1, done
    assert len(done.stderr.strip().splitlines()) == 1, done
    assert f"schema version {newer} is newer than this code" in done.stderr
    assert _tables(pg_url) == ["schema_version"]
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchone() == (newer,)
