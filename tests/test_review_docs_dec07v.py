"""Review of today's docs (c7cf2d7..HEAD) against the code: claims pinned, defects marked."""

from __future__ import annotations

import base64
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from service.backends.fleet import fleet_from_settings
from service.settings import Settings
from service.store import open_store
from service.store.ownership import LEASE
from service.store.records import MESSAGES, decode_cursor, encode_cursor

from .pg import signalled_while_waiting_for_a_migration
from .servers import ROOT, running_server
from .store.test_backups import SQLITE_BACKUP


def _old_decode(cursor: str) -> int:
    """The decoder before the cursor kinds (c7cf2d7's records.decode_cursor)."""
    raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    assert raw.startswith("s")
    seq = int(raw[1:])
    assert 0 <= seq < 2**63
    return seq


def _old_encode(seq: int) -> str:
    return base64.urlsafe_b64encode(f"s{seq}".encode()).decode().rstrip("=")


def test_message_cursors_old_and_new_read_the_same_position() -> None:
    """docs/api.md:22: "a message cursor handed out by an older version still pages, and an
    older instance reads a newer one"; and a messages_next passed to the list is a 422."""
    for seq in (1, 9, 10, 12345, 2**62):
        assert decode_cursor(_old_encode(seq), MESSAGES) == seq
        assert _old_decode(encode_cursor(seq, MESSAGES)) == seq
        with pytest.raises(ValueError, match="messages"):
            decode_cursor(encode_cursor(seq, MESSAGES))


def test_num_ctx_setting_reaches_the_ollama_servers_of_a_fleet_file(tmp_path: Path) -> None:
    """Fixed (the setting is now the file's Ollama servers' default; was DEFECT:)
    docs/operations.md:68 says SERVICE_OLLAMA_NUM_CTX is "the context window ... each
    request asks of Ollama's servers"; with SERVICE_BACKENDS_FILE set, fleet_from_settings
    (service/backends/fleet.py:240) returns load_fleet_file's specs, whose num_ctx is only the
    file's own: the setting is silently dropped (no warning, no exit 2), and Ollama truncates
    the prompt as if it were unset. Either apply it as the file's default or document (and
    refuse/warn) that it does not apply under a fleet file."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[[server]]\nname = "o"\nkind = "ollama"\nurl = "http://127.0.0.1:1"\n')
    settings = Settings(backends_file=fleet, ollama_num_ctx=8192)  # type: ignore[call-arg]
    assert [s.num_ctx for s in fleet_from_settings(settings)] == [8192]


def test_sigint_during_the_migration_wait_stops_the_start_exit_0(pg_url: str) -> None:
    """docs/operations.md:98-101: a signal during the rest of the start (waiting for another
    instance's schema migration) stops it: one line, exit 0 (tested for SIGTERM; here SIGINT)."""
    got = signalled_while_waiting_for_a_migration(
        pg_url, [sys.executable, "-m", "service", "--bind", "127.0.0.1:0", "--config",
                 str(ROOT / "hypercorn.toml")], signal.SIGINT)
    rest = got.rest
    assert got.returncode == 0, got.seen + rest
    assert rest.strip().splitlines()[-1] == (
        "service: stopped by a signal before it started serving"), rest


def test_sqlite_backup_one_liner_on_a_missing_path_fails(tmp_path: Path) -> None:
    """Fixed (was: docs/deploy.md's one-liner opened its source with sqlite3.connect, which
    creates a missing file: a mistyped path "backed up" an empty database, exit 0, and left an
    empty file at the mistyped path). The source is opened read-only now (``mode=ro``)."""
    src, copy = tmp_path / "typo.db", tmp_path / "copy.db"
    done = subprocess.run([sys.executable, "-c", SQLITE_BACKUP, str(src), str(copy)],
                          capture_output=True, check=False)
    assert done.returncode != 0
    assert not src.exists()
    assert not copy.exists()


async def test_a_run_under_way_in_a_sqlite_backup_is_closed_when_the_copy_serves(
        settings: Settings, tmp_path: Path) -> None:
    """docs/deploy.md:193-195: "A run that was under way when the copy was taken is closed like
    a killed instance's run (at once, or when its lease in the copy lapses), with what it had
    stored" (tests/store/test_backups.py only opens the copy: this serves it)."""
    db, copy = tmp_path / "live.db", tmp_path / "copy.db"
    async with open_store(db) as store:
        conv = await store.create_conversation(title="kept")
        run_id = (await store.begin_run(conv.id, content="q", agent="chat", model=None)).run.id
        await trio.run_process([sys.executable, "-c", SQLITE_BACKUP, str(db), str(copy)])
    served = settings.model_copy(update={"db": copy})
    async with running_server(served) as srv, srv.client() as client:
        status = "running"
        with trio.fail_after(LEASE + 15):
            while status in ("queued", "running"):
                await trio.sleep(0.5)
                status = (await client.get(f"/api/runs/{run_id}")).json()["status"]
        assert status == "failed"
