"""A review of PostgreSQL situations operators hit (2026-12-07): a database turned read-only (a
failover leaving ``SERVICE_DB`` on a standby, ``default_transaction_read_only``), a server's
``idle_session_timeout`` cutting idle connections, and the number of connections an instance
holds. On the session's real PostgreSQL (tests/pg.py); the store and the app are the real ones.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
import trio

from service.errors import StoreError, StoreUnavailable
from service.settings import load_settings
from service.store import make_store

from .servers import ROOT, running_server

GUARD = 20  # seconds any single wait may take before the test fails


def _dbname(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def _admin(url: str) -> psycopg.Connection:  # type: ignore[type-arg]
    """A superuser connection to the server's maintenance database (not the test's)."""
    parts = urlsplit(url)
    return psycopg.connect(parts._replace(path="/postgres").geturl(), autocommit=True)


def _kick(url: str) -> None:
    """End every other session on the test's database (a failover's cut)."""
    with _admin(url) as c:
        c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                  "WHERE datname = %s AND pid <> pg_backend_pid()", (_dbname(url),))


@contextmanager
def _read_only(url: str) -> Iterator[None]:
    """The test's database read-only for new sessions, as a standby is; the sessions it had are
    cut (a failover drops them), so the store's next connections are read-only ones."""
    name = _dbname(url)
    with _admin(url) as c:
        c.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    _kick(url)
    try:
        yield
    finally:
        with _admin(url) as c:
            c.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')


async def _conversation(store: object) -> str:
    conv = await store.create_conversation(title="t")  # type: ignore[attr-defined]
    return str(conv.id)


# -- a read-only database -------------------------------------------------------------------


async def test_read_only_database_write_is_store_unavailable(
    pg_url: str,
) -> None:
    """Fixed (was: DEFECT: a database that refuses writes because it is read-only (a failover
    left ``SERVICE_DB`` on a standby, or ``default_transaction_read_only``) is a passing state
    of the store, as a restart is; but ``cannot execute INSERT in a read-only transaction``
    (SQLSTATE 25006, psycopg's ``ReadOnlySqlTransaction``, an ``InternalError``) is mapped to a
    plain ``StoreError`` by ``PostgresStore._error`` (service/store/postgres.py, the
    ``isinstance(exc, psycopg.OperationalError | ...)`` test): HTTP 500 ``store_error`` without
    Retry-After, and the committer does not count the refusal (``refusing``). Fix: map SQLSTATE
    class 25006 (and 57P0x, admin shutdown/standby) to StoreUnavailable.)"""
    store = make_store(pg_url)
    async with store:
        await _conversation(store)
        with _read_only(pg_url):
            with trio.fail_after(GUARD):
                with pytest.raises(StoreError) as caught:
                    await _conversation(store)
            assert "read-only" in str(caught.value)
            assert isinstance(caught.value, StoreUnavailable), type(caught.value)


async def test_writes_resume_once_the_database_is_writable_again(
    pg_url: str,
) -> None:
    """Fixed (was: DEFECT: a connection made while the database was read-only (a standby, before
    its promotion; ``default_transaction_read_only`` on) stays read-only for its whole life: the
    session's default is fixed at connect. The pool (service/store/postgres.py ``_open_sync``:
    no ``max_lifetime``, so psycopg_pool's default of an hour) keeps such connections, and its
    check (``_check_connection``, an empty query) passes them, so once the database takes writes
    again every batch still fails ``read-only`` on them, for up to an hour or until a restart.
    Fix: in ``_error``/``_transaction``, on SQLSTATE 25006 close the connection (or
    ``pool.drain()``/``check()`` the pool) so that the next one is made anew; or have
    ``_check_connection`` run ``SHOW transaction_read_only`` and discard one that is.)"""
    store = make_store(pg_url)
    async with store:
        await _conversation(store)
        with _read_only(pg_url):
            with trio.fail_after(GUARD):
                for _ in range(3):  # the pool's connections are now read-only ones
                    with pytest.raises(StoreError):
                        await _conversation(store)
        # Writable again (the standby promoted; the setting reset).
        last: BaseException | None = None
        with trio.move_on_after(10):
            while True:
                try:
                    await _conversation(store)
                    return
                except StoreError as exc:
                    last = exc
                await trio.sleep(0.2)
        pytest.fail(f"writes still refused 10 s after the database was writable: {last}")


async def test_read_only_database_readyz_is_503(pg_url: str) -> None:
    """Fine: while the database refuses writes ``/readyz`` is 503, naming the store (its
    write probe, service/api/ops.py ``_store_check``), though reads still answer."""
    settings = load_settings(db=pg_url)
    async with running_server(settings) as srv, srv.client() as c:
        assert (await c.get("/readyz")).status_code == 200
        with _read_only(pg_url):
            # (A probe that landed answers for a second: polled, within a few.)
            with trio.move_on_after(5):
                while True:
                    ready = await c.get("/readyz")
                    if ready.status_code != 200:
                        break
                    await trio.sleep(0.1)
            assert ready.status_code == 503, ready.text
            assert ready.json()["down"] == ["store"], ready.text
            assert "read-only" in ready.json()["checks"]["store"]


async def test_read_only_database_new_conversation_is_503_to_retry(
    pg_url: str,
) -> None:
    """Fixed (was: DEFECT: a client creating a conversation (or posting a message) while the
    database is read-only gets HTTP 500 ``store_error`` without Retry-After, as for a bug, where
    the same database restarting gets 503 ``store_unavailable`` with ``Retry-After: 5``; SDKs do
    not retry a 500 the way they retry a 503. Cause: ``PostgresStore._error``
    (service/store/postgres.py) maps only ``OperationalError``/``InterfaceError`` to
    ``StoreUnavailable``; 25006 is an ``InternalError``. Fix: as above (SQLSTATE 25006 ->
    StoreUnavailable).)"""
    settings = load_settings(db=pg_url)
    async with running_server(settings) as srv, srv.client() as c:
        r = await c.post("/api/conversations", json={})
        assert r.status_code == 201, r.text
        with _read_only(pg_url):
            with trio.fail_after(GUARD):
                r = await c.post("/api/conversations", json={})
            assert r.headers["content-type"].startswith("application/json")
            assert r.status_code == 503, (r.status_code, r.text)
            assert r.json()["error"]["type"] == "store_unavailable", r.text
            assert "retry-after" in r.headers


async def test_instance_serves_again_once_a_read_only_spell_ends(
    pg_url: str,
) -> None:
    """Fixed (was: DEFECT: a failover's few seconds on a read-only server (the sessions cut, the
    new ones read-only) leave the instance out of service after the database takes writes again:
    ``/readyz`` stays 503 and new conversations fail, until the process is restarted (or the
    pool's connections reach psycopg_pool's one-hour ``max_lifetime``). The pool
    (``PostgresStore._open_sync``) keeps the connections it made during the spell, each read-
    only for its life, and its check (``_check_connection``, an empty query) passes them;
    ``/readyz``'s write probe and every batch fail on them. (The lease's own connection
    recovers: ``_lease_sync`` closes a new one that failed.) Fix: treat SQLSTATE 25006 as a
    connection to replace (close it before ``putconn``, or ``pool.drain()``), map it to
    ``StoreUnavailable``, and/or make the pool's check ``SHOW transaction_read_only``.)"""
    settings = load_settings(db=pg_url)
    async with running_server(settings) as srv, srv.client() as c:
        assert (await c.get("/readyz")).status_code == 200
        with _read_only(pg_url):
            # Until the pool has handed out a read-only connection (a write refused).
            with trio.fail_after(GUARD):
                while True:
                    if (await c.post("/api/conversations", json={})).status_code != 201:
                        break
                    await trio.sleep(0.1)
        # The database takes writes again: within a lease (15 s) the instance serves.
        with trio.move_on_after(15):
            while True:
                ready = await c.get("/readyz")
                made = await c.post("/api/conversations", json={})
                if ready.status_code == 200 and made.status_code == 201:
                    return
                await trio.sleep(0.25)
        pytest.fail(f"not serving 15 s after the database took writes again: "
                    f"{ready.text} {made.status_code} {made.text}")


# -- idle_session_timeout on the server -----------------------------------------------------


@contextmanager
def _idle_session_timeout(url: str, value: str) -> Iterator[None]:
    name = _dbname(url)
    with _admin(url) as c:
        c.execute(f"ALTER DATABASE \"{name}\" SET idle_session_timeout = '{value}'")
    try:
        yield
    finally:
        with _admin(url) as c:
            c.execute(f'ALTER DATABASE "{name}" RESET idle_session_timeout')


async def test_idle_session_timeout_does_not_cut_the_listener_over_and_over(
    pg_url: str,
) -> None:
    """Fixed (was: DEFECT (minor): a server's ``idle_session_timeout`` (PostgreSQL 14+; 1 s
    here, any value under the listener's 5 s ``_LISTEN_CHECK``) ends the store's listening
    connection each time it is quiet that long (service/store/pg_notify.py ``listen_until``): it
    flaps, lost and made again every ~2 s for ever, a WARNING line each time, every reader woken
    to read the store again ("*") and told to poll ("!"), and notifications sent in the gaps
    lost. The service already overrides ``idle_in_transaction_session_timeout`` for its own
    connections (``PostgresStore._connect_kwargs``) but not this. Fix: on PostgreSQL 14+ add
    ``-c idle_session_timeout=0`` to the options of its own connections (the listener and the
    lease's at least; a ``SET`` after connect, as 13 does not know the setting).)"""
    with _idle_session_timeout(pg_url, "1s"):
        store = make_store(pg_url)
        async with store:
            heard: list[str] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.listen, heard.append)  # type: ignore[attr-defined]
                with trio.fail_after(GUARD):
                    while True:
                        if "*" in heard:
                            break
                        await trio.sleep(0.05)
                await trio.sleep(4)  # four of the server's timeouts
                nursery.cancel_scope.cancel()
            assert "!" not in heard, heard


# -- start-up refusals: connections exhausted, no CREATE privilege --------------------------


async def _start_fails(url: str, tmp_path: Path) -> tuple[int, str]:
    """``python -m service`` on ``url`` that must not start: its exit code and its log."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    env.update({"SERVICE_DB": url, "SERVICE_BACKEND": "llamacpp",
                "SERVICE_LLAMACPP_URL": "http://127.0.0.1:9"})
    log = tmp_path / "service.log"
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "service", "--bind", "127.0.0.1:0", "--config",
             str(ROOT / "hypercorn.toml")], cwd=tmp_path, env=env, stderr=out, stdout=out)
    finally:
        os.close(out)
    with trio.move_on_after(60):
        await proc.wait()
    if proc.returncode is None:  # still up a minute later: a hang
        proc.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await proc.wait()
        pytest.fail("the service neither started nor exited within 60 s")
    return proc.returncode, (await trio.Path(log).read_text())


@contextmanager
def _plain_role(url: str, *attrs: str) -> Iterator[str]:
    """A URL for a new role that is not a superuser (superusers pass connection limits)."""
    name = _dbname(url)
    role = "r_" + name
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(f"CREATE ROLE {role} LOGIN {' '.join(attrs)}")
        c.execute(f'GRANT CONNECT ON DATABASE "{name}" TO {role}')
    parts = urlsplit(url)
    try:
        yield parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}").geturl()
    finally:
        _kick(url)
        with psycopg.connect(url, autocommit=True) as c:
            c.execute(f"DROP OWNED BY {role}")
        with _admin(url) as c:
            c.execute(f"DROP ROLE {role}")


async def test_start_with_no_connection_slot_left_exits_1_with_one_clear_line(
    pg_url: str, tmp_path: Path,
) -> None:
    """Fine: ``too many connections`` (SQLSTATE 53300, as a full ``max_connections``
    answers; here the role's ``CONNECTION LIMIT 0``) at start: exit 1 within the minute, its
    log naming SERVICE_DB and the server's reason, no traceback, no password."""
    with _plain_role(pg_url, "CONNECTION LIMIT 0") as url:
        code, text = await _start_fails(url, tmp_path)
    assert code == 1, text
    assert "SERVICE_DB" in text, text
    assert "too many connections" in text, text
    assert "Traceback" not in text, text


async def test_start_as_a_role_that_cannot_create_tables_says_so(
    pg_url: str, tmp_path: Path,
) -> None:
    """Fine: a role without CREATE on the schema (the migration cannot make its tables): exit
    1 with the server's ``permission denied for schema public`` under SERVICE_DB."""
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    with _plain_role(pg_url) as url:
        code, text = await _start_fails(url, tmp_path)
    assert code == 1, text
    assert "SERVICE_DB" in text, text
    assert "permission denied" in text, text
    assert "Traceback" not in text, text


async def test_connections_an_instance_holds_are_within_the_documented_six(
    pg_url: str,
) -> None:
    """docs/deploy.md: "a pool of 4 connections plus one listening connection ... and one more
    connection for its lease ... (instances x workers x 6)". Counted under load: concurrent
    reads and writes fill the pool, the lease is renewed, the listener listens."""
    settings = load_settings(db=pg_url)
    async with running_server(settings) as srv, srv.client() as c:
        async def traffic() -> None:
            for _ in range(10):
                r = await c.post("/api/conversations", json={})
                assert r.status_code == 201, r.text
                await c.get("/api/conversations")
                await c.get("/readyz")

        async with trio.open_nursery() as nursery:
            for _ in range(12):
                nursery.start_soon(traffic)
        with _admin(pg_url) as a:
            (n,) = a.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
                             (_dbname(pg_url),)).fetchone()  # type: ignore[misc]
    assert 3 <= n <= 6, n


async def test_idle_session_timeout_keeps_the_service_ready_and_writing(
    pg_url: str,
) -> None:
    """Fine: with ``idle_session_timeout`` 2 s cutting idle pooled connections and the lease's
    own between renewals, ``/readyz`` stays 200 (the lease is renewed on a new connection,
    the pool's check replaces the cut ones) and writes after a pause land."""
    with _idle_session_timeout(pg_url, "2s"):
        settings = load_settings(db=pg_url)
        async with running_server(settings) as srv, srv.client() as c:
            with trio.fail_after(GUARD):
                end = trio.current_time() + 8  # past a renewal (LEASE / 3) and idle cuts
                while trio.current_time() < end:
                    r = await c.get("/readyz")
                    assert r.status_code == 200, r.text
                    await trio.sleep(2.5)  # idle past the server's timeout
                    r = await c.post("/api/conversations", json={})
                    assert r.status_code == 201, r.text


async def test_a_stream_when_the_database_turns_read_only_is_told_what_the_store_holds(
    pg_url: str,
) -> None:
    """Fine: a run streaming when the database turns read-only (its sessions cut, the new ones
    refusing writes): every token its client was shown is in the store, and the end it is
    told is not one the store contradicts (not ``succeeded`` while the store says otherwise;
    here ``store_unavailable`` once the final state is refused past its budget)."""
    from service.sim import Reply

    from .e2e import EventStream, after_tokens, e2e, tokens

    settings = load_settings(db=pg_url)
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(tokens=30, interval=0.05))
        conv = await env.conversation()
        with trio.fail_after(60):
            async with env.post_stream(conv) as r:
                stream = EventStream(r)
                shown = await stream.read(after_tokens(3))
                with _read_only(pg_url):
                    shown += await stream.read()
                    run_id = next(e.data["run_id"] for e in shown if "run_id" in e.data)
                    with psycopg.connect(pg_url) as direct:  # (a session of the spell's)
                        status = direct.execute("SELECT status FROM runs WHERE id = %s",
                                                (run_id,)).fetchone()[0]  # type: ignore[index]
                        stored = [json.loads(d)["text"] for (d,) in direct.execute(
                            "SELECT data FROM run_events WHERE run_id = %s AND type = 'token' "
                            "ORDER BY seq", (run_id,))]
    told = tokens(shown)
    assert told == stored[:len(told)], (told, stored)
    last = shown[-1]
    if last.type == "run.finished":
        assert last.data.get("status") == status, (last.data, status)
    else:
        assert last.type == "error", shown[-3:]
        assert last.data.get("type") == "store_unavailable", last.data
        assert status == "running", status
