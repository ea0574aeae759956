"""The PostgreSQL store against a real server (tests/pg.py): its schema, and its faults.

What both stores share is tested on both in tests/store/test_stores.py; here is what only
PostgreSQL has: the version table, a server restarted under an open store, a wrong password or an
unreachable server at open, a statement stuck behind a lock.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import trio

from service.errors import StoreError, StoreUnavailable
from service.settings import load_settings
from service.store import MessageStatus, open_store
from service.store.postgres import PostgresStore, describe_url
from service.store.schema import PG_SCHEMA_VERSION

from ..fakes import Reply, ScriptedBackend
from ..pg import (
    PASSWORD,
    PASSWORD_USER,
    PostgresServer,
    signalled_while_waiting_for_a_migration,
)
from ..servers import ROOT, running_server
from ..streams import parse_sse


async def test_schema_is_created_versioned_and_kept(pg_url: str) -> None:
    async with open_store(pg_url) as store:
        conv = await store.create_conversation(title="t")
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [
            (PG_SCHEMA_VERSION,)]
    async with open_store(pg_url) as store:  # re-opened: nothing migrated, the data kept
        assert (await store.get_conversation(conv.id)).title == "t"
        assert isinstance(store, PostgresStore)


async def test_a_newer_schema_is_refused_without_being_touched(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (%s)", (PG_SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="newer than this code"):
        async with open_store(pg_url):
            pass
    with psycopg.connect(pg_url) as conn:
        tables = {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert tables == {"schema_version"}


async def test_two_stores_opening_at_once_migrate_once(pg_url: str) -> None:
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(_open_and_close, pg_url)
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [
            (PG_SCHEMA_VERSION,)]


async def _open_and_close(url: str) -> None:
    async with open_store(url):
        pass


def test_an_instance_waiting_for_anothers_migration_says_who_and_stops_on_sigterm(
        pg_url: str) -> None:
    # The wait for another instance's migration has no bound (a migration takes what it
    # takes): it names who holds the lock, and a SIGTERM ends it (it used to wait on in a
    # thread the start could not cancel, for as long as the lock was held).
    got = signalled_while_waiting_for_a_migration(
        pg_url, [sys.executable, "-m", "service", "--bind", "127.0.0.1:0", "--config",
                 str(ROOT / "hypercorn.toml")])
    seen, rest = got.seen, got.rest
    assert "migrating-elsewhere" in seen, seen
    assert f"{got.holder_pid}" in seen, seen
    assert "Traceback" not in seen + rest, seen + rest
    assert "Running on" not in seen + rest
    assert got.returncode == 0, seen + rest
    assert rest.strip().splitlines()[-1] == (
        "service: stopped by a signal before it started serving"), rest
    with psycopg.connect(pg_url) as conn:  # nothing half-made by the start that stopped
        assert conn.execute("SELECT count(*) FROM pg_catalog.pg_tables "
                            "WHERE schemaname = current_schema()").fetchone() == (0,)


@pytest.mark.slow  # restarts the PostgreSQL server
async def test_a_restarted_database_comes_back_without_reopening_the_store(
    postgres: PostgresServer, pg_url: str
) -> None:
    async with open_store(pg_url, acquire_timeout=1.0) as store:
        conv = await store.create_conversation()
        await store.append_message(conv.id, role="user", content="before")
        postgres.stop("fast")
        try:
            # Down: writes and reads fail StoreUnavailable (503, retryable), within the bound.
            with trio.fail_after(10):
                with pytest.raises(StoreUnavailable):
                    await store.append_message(conv.id, role="user", content="while down")
                with pytest.raises(StoreUnavailable):
                    await store.get_messages(conv.id)
            assert store.write_error is not None
            with pytest.raises(StoreUnavailable, match="no connection to the database within 1 s"):
                await store.probe_write()
            # A read waiting for a connection ends with its caller's deadline, not the pool's.
            start = trio.current_time()
            with trio.move_on_after(0.3) as deadline:
                await store.ping()
            assert deadline.cancelled_caught
            assert trio.current_time() - start < 0.9
        finally:
            postgres.start()
        # Back: the pool replaces its dead connections; the same store writes again.
        start = trio.current_time()
        with trio.fail_after(30):
            while True:
                try:
                    await store.append_message(conv.id, role="user", content="after")
                    break
                except StoreUnavailable:
                    await trio.sleep(0.1)  # the pool's reconnection backs off meanwhile
        back_in = trio.current_time() - start
        assert store.write_error is None
        await store.probe_write()
        await store.ping()
        assert [m.content for m in await store.get_messages(conv.id)] == ["before", "after"]
    print(f"writes back {back_in:.2f} s after the restart")


@pytest.mark.slow  # stops the PostgreSQL server
async def test_a_read_waits_for_a_thread_and_a_connection_within_one_acquire_timeout(
    postgres: PostgresServer, pg_url: str
) -> None:
    # The database away, every thread of the store busy waiting for a connection: a read
    # that has to wait for a thread first, then for a connection, is answered
    # StoreUnavailable within acquire_timeout of its start. The two waits had a bound each,
    # so it waited up to twice that (5 + 5 s by default, /readyz aside).
    async with open_store(pg_url, pool_size=1, acquire_timeout=3.0) as store:
        conv = await store.create_conversation()
        postgres.stop("fast")
        took: dict[str, float] = {}
        try:
            async def read(name: str) -> None:
                start = trio.current_time()
                with pytest.raises(StoreUnavailable):
                    await store.get_messages(conv.id)
                took[name] = trio.current_time() - start

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read, "first")  # takes the one thread, then waits
                    await trio.sleep(1)
                    nursery.start_soon(read, "second")  # waits for the thread, then more
        finally:
            postgres.start()
    assert took["second"] < 3.0 + 1.2, took  # not 2 s for the thread + 3 s for a connection


async def test_a_wrong_password_is_one_line_without_the_password(
    postgres: PostgresServer, pg_url: str
) -> None:
    dbname = pg_url.rsplit("/", 1)[1]
    wrong = postgres.url(dbname, user=PASSWORD_USER, password="Wrong-S3cret")
    with pytest.raises(StoreError) as caught:
        async with open_store(wrong):
            pass
    message = str(caught.value)
    assert "\n" not in message
    assert "password authentication failed" in message
    assert "Wrong-S3cret" not in message
    assert f"postgresql://{PASSWORD_USER}@127.0.0.1:{postgres.port}/{dbname}" in message
    assert caught.value.__cause__ is None  # no chained error that could carry it either
    # The right one opens it.
    async with open_store(postgres.url(dbname, user=PASSWORD_USER, password=PASSWORD)) as store:
        await store.ping()


async def test_an_unreachable_server_is_one_line_without_the_password() -> None:
    with trio.socket.socket() as s:  # a port nothing listens on
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://someone:Pa%2Fss-W0rd@127.0.0.1:{port}/nowhere"
    with trio.fail_after(20), pytest.raises(StoreError) as caught:
        async with open_store(url):
            pass
    message = str(caught.value)
    assert "\n" not in message
    assert "Pa%2Fss-W0rd" not in message
    assert "Pa/ss-W0rd" not in message
    assert f"127.0.0.1:{port}" in message


def test_urls_are_shown_without_their_password() -> None:
    assert describe_url("postgresql://u:p%40ss@db.example:5433/app?sslmode=require") == (
        "postgresql://u@db.example:5433/app")
    assert describe_url("postgres://u:secret@h/app") == "postgresql://u@h/app"
    assert "secret" not in describe_url("postgresql://u:secret@[bad")


async def test_a_stuck_statement_is_cut_by_statement_timeout(pg_url: str) -> None:
    async with open_store(pg_url, statement_timeout=0.5) as store:
        conv = await store.create_conversation()
        with psycopg.connect(pg_url) as locker:  # holds the table until it rolls back
            locker.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
            start = trio.current_time()
            with trio.fail_after(10), pytest.raises(StoreUnavailable, match="statement timeout"):
                await store.append_message(conv.id, role="user", content="stuck")
            assert trio.current_time() - start < 5
            locker.rollback()
        # The thread and the connection were given back: the store goes on.
        await store.append_message(conv.id, role="user", content="ok",
                                   status=MessageStatus.complete)
        assert [m.content for m in await store.get_messages(conv.id)] == ["ok"]


# -- the service on PostgreSQL -----------------------------------------------------------------

async def test_the_service_serves_runs_from_postgres(pg_url: str, tmp_path: Path) -> None:
    settings = load_settings(db=pg_url)
    assert settings.db == pg_url
    async with running_server(settings) as srv, srv.client() as c:
        assert isinstance(srv.services.require_store(), PostgresStore)
        conv = (await c.post("/api/conversations", json={"title": "pg"})).json()
        r = await c.post(f"/api/conversations/{conv['id']}/messages", json={"content": "hi"})
        assert r.status_code == 200, r.text
        run = r.json()["run"]
        assert run["status"] == "succeeded"
        got = (await c.get(f"/api/conversations/{conv['id']}")).json()
        assert [m["role"] for m in got["messages"]] == ["user", "assistant"]
        assert got["messages"][1]["status"] == "complete"
        async with c.stream("GET", f"/api/runs/{run['id']}/events") as events:
            body = "".join([chunk async for chunk in events.aiter_text()])
        assert body.count("event: run.started") == 1
        assert body.rstrip().split("\n\n")[-1].split("\n")[1] == "event: run.finished"
        assert (await c.get("/readyz")).json()["checks"]["store"] == "ok"


def test_an_unreachable_database_stops_the_start_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    env["SERVICE_DB"] = f"postgresql://svc:Top-S3cret@127.0.0.1:{port}/svc"
    out = subprocess.run([sys.executable, "-m", "service", "--bind", "127.0.0.1:0"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert "Top-S3cret" not in out.stderr + out.stdout
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("service: SERVICE_DB: "), line
    assert f"postgresql://svc@127.0.0.1:{port}/svc" in line
    assert "Running on" not in out.stderr


@pytest.mark.slow  # restarts the PostgreSQL server
async def test_a_database_restart_mid_stream_loses_nothing(
    postgres: PostgresServer, pg_url: str
) -> None:
    # The database goes away while a run streams: its event batches are held and written
    # again, /readyz says the store is down, then up; the client gets every token once, in
    # order, and the end; the store has the whole reply.
    words = 60
    backend = ScriptedBackend([Reply("tick " * words, gap=0.05)])
    async with running_server(load_settings(db=pg_url), backend) as srv, srv.client() as c:
        conv = (await c.post("/api/conversations", json={})).json()
        seen: list[str] = []
        restarted, flowing = trio.Event(), trio.Event()
        ready_while_down: list[int] = []

        async def restart_once_tokens_flow() -> None:
            await flowing.wait()
            await trio.to_thread.run_sync(postgres.stop, "fast")
            try:
                ready_while_down.append((await c.get("/readyz")).status_code)
            finally:
                with trio.move_on_after(60, shield=True):  # the server must come back
                    await trio.to_thread.run_sync(postgres.start)
            restarted.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(restart_once_tokens_flow)
            body = ""
            async with c.stream("POST", f"/api/conversations/{conv['id']}/messages",
                                json={"content": "go", "stream": True}) as r:
                assert r.status_code == 200
                async for chunk in r.aiter_text():
                    body += chunk
                    seen[:] = [f["data"]["text"] for f in parse_sse(body)
                               if f.get("event") == "token"]
                    if len(seen) >= 5:
                        flowing.set()
        assert restarted.is_set()
        assert ready_while_down == [503]
        frames = parse_sse(body)
        assert [int(f["id"]) for f in frames] == list(range(1, len(frames) + 1))
        assert "".join(seen) == "tick " * words
        assert frames[-1]["event"] == "run.finished"
        assert frames[-1]["data"]["status"] == "succeeded"
        with trio.fail_after(30):
            while (await c.get("/readyz")).status_code != 200:  # noqa: ASYNC110 (HTTP polling)
                await trio.sleep(0.1)
        got = (await c.get(f"/api/conversations/{conv['id']}")).json()
        assert got["messages"][-1]["content"] == "tick " * words
        assert got["messages"][-1]["status"] == "complete"
