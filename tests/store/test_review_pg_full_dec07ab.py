"""PostgreSQL on a really full volume (review dec07ab): the analogue of ``test_full_disk.py``.

Two ways PostgreSQL meets a full volume, each on a small tmpfs of the test's own:

* **a full data volume**: the service's tables are in a tablespace on the tmpfs (the
  database's ``default_tablespace``, so its migration creates them there; the WAL stays on
  the ordinary disk). Extending a table or index then fails ``ERROR 53100 disk_full`` and the
  server stays up.
* **a full ``pg_wal``**: the WAL (1 MB segments) is on the tmpfs; a new segment that cannot be
  written is a ``PANIC``: the postmaster restarts every backend (every pooled connection is
  broken) and may stay down. The test starts it again once space is back.

Each streams 30 runs from a real service process (``tests/servers.py``'s ``start_service``,
the simulator as its model), fills the volume while they stream and checks the central promise:
``/readyz`` 503 while the store cannot write, new conversations 503 ``store_unavailable`` with
``Retry-After``, no client told an end the store does not hold, ``/readyz`` 200 once space is
back, and every token a client was shown in the store (``check_against_the_store``).

Mounting a tmpfs needs root (CI and these machines run as root); the tests skip otherwise.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
import trio

from service.sim import Reply, Simulator, open_simulator

from ..pg import PostgresServer, find_pg_bin, start_postgres
from ..servers import start_service
from .test_crash_consistency import Transcript, check_against_the_store, native_client
from .test_full_disk import _fill

STREAMS = 24
GUARD = 90  # seconds: a hang fails fast; nothing here asserts speed


# -- the volume and the servers ------------------------------------------------------------------


def _mount(size: str) -> Path:
    """A tmpfs of ``size`` on a new directory the ``postgres`` user can reach (pytest's
    ``tmp_path`` is under a directory of mode 700), owned by it when we are root."""
    mnt = Path(tempfile.mkdtemp(prefix="service-pgvol-"))
    os.chmod(mnt, 0o755)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                           str(mnt)], capture_output=True, check=False)
    if done.returncode != 0:
        mnt.rmdir()
        pytest.skip(f"cannot mount a tmpfs (needs root): {done.stderr.decode().strip()}")
    if os.geteuid() == 0:
        shutil.chown(mnt, "postgres", "postgres")
    return mnt


def _umount(mnt: Path) -> None:
    subprocess.run(["umount", "-l", str(mnt)], check=False)
    shutil.rmtree(mnt, ignore_errors=True)


@pytest.fixture
def pg_bin() -> Path:
    found = find_pg_bin()
    if found is None:
        pytest.skip("PostgreSQL is not installed (/usr/lib/postgresql/*/bin)")
    return found


@pytest.fixture
def data_volume(tmp_path: Path, pg_bin: Path) -> Iterator[tuple[PostgresServer, str, Path]]:
    """A server whose WAL is on the ordinary disk, and a database whose tables go to a
    tablespace on a 4 MB tmpfs: (server, the database's URL, the mount)."""
    mnt = _mount("4m")
    server: PostgresServer | None = None
    try:
        (mnt / "ts").mkdir()
        shutil.chown(mnt / "ts", "postgres", "postgres")
        server = start_postgres()
        url = server.create_database("fulldb")
        with psycopg.connect(server.url(), autocommit=True) as conn:
            conn.execute(f"CREATE TABLESPACE small LOCATION '{mnt / 'ts'}'")  # type: ignore[arg-type]
            conn.execute("ALTER DATABASE fulldb SET default_tablespace = small")
        yield server, url, mnt
    finally:
        if server is not None:
            server.remove()
        _umount(mnt)


def _start_with_wal_on(mnt: Path, pg_bin: Path) -> PostgresServer:
    """``service.bench.pg.start_postgres``, but initdb with 1 MB WAL segments in ``mnt``."""
    as_user = "postgres" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="service-pg-wal-"))
    if as_user:
        shutil.chown(root, as_user, as_user)
    sock = socket_port()
    server = PostgresServer(pg_bin, root, sock, as_user, False, "32MB",
                            {"min_wal_size": "2MB", "max_wal_size": "4MB",
                             "wal_keep_size": "0", "restart_after_crash": "on"})
    try:
        server._run("initdb", "-D", str(server.data), "-A", "trust", "-U", "postgres",
                    "-E", "UTF8", "--locale=C", "--no-sync", "--wal-segsize=1",
                    f"--waldir={mnt / 'wal'}")
        server.start()
    except BaseException:
        server.remove()
        raise
    return server


def socket_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def wal_volume(tmp_path: Path, pg_bin: Path) -> Iterator[tuple[PostgresServer, str, Path]]:
    """A server whose ``pg_wal`` is on a 24 MB tmpfs: (server, a database's URL, the mount)."""
    mnt = _mount("24m")
    server: PostgresServer | None = None
    try:
        server = _start_with_wal_on(mnt, pg_bin)
        url = server.create_database("walfull")
        yield server, url, mnt
    finally:
        if server is not None:
            server.remove()
        _umount(mnt)


# -- the clients ---------------------------------------------------------------------------------


async def _until_ready(http: httpx.AsyncClient, want: int, guard: float = GUARD
                       ) -> httpx.Response:
    with trio.fail_after(guard):
        while True:
            try:
                r = await http.get("/readyz")
                if r.status_code == want:
                    return r
            except httpx.TransportError:
                pass
            await trio.sleep(0.1)


async def _start_streams(http: httpx.AsyncClient, nursery: trio.Nursery) -> list[Transcript]:
    """Start the streams; return once each has shown a token."""
    convs = [(await http.post("/api/conversations", json={})).json()["id"]
             for _ in range(STREAMS)]
    transcripts = [Transcript("native") for _ in range(STREAMS)]
    ended, first = trio.Semaphore(0), trio.Semaphore(0)
    for conv, t in zip(convs, transcripts, strict=True):
        nursery.start_soon(native_client, http, conv, t, ended, first)
    with trio.fail_after(GUARD):
        for _ in range(STREAMS):
            await first.acquire()
    return transcripts


async def _store_refuses(http: httpx.AsyncClient) -> str:
    """Wait until ``/readyz`` says the store is down; what it says."""
    r = await _until_ready(http, 503)
    store: str = r.json()["checks"]["store"]
    assert store.startswith("down"), r.text
    return store


async def _new_work(http: httpx.AsyncClient, conv: str) -> list[tuple[int, str, str]]:
    """A new conversation, and a new run on ``conv``: (status, error type, Retry-After) of
    each (the run's stream is left at its headers)."""
    out = []
    r = await http.post("/api/conversations", json={})
    assert "Traceback" not in r.text
    out.append((r.status_code, r.json().get("error", {}).get("type", ""),
                r.headers.get("Retry-After", "")))
    body = {"content": "go", "stream": True, "on_disconnect": "cancel"}
    with trio.fail_after(GUARD):
        async with http.stream("POST", f"/api/conversations/{conv}/messages", json=body) as r:
            if r.status_code == 200:
                out.append((200, "", ""))
            else:
                text = (await r.aread()).decode()
                assert "Traceback" not in text
                out.append((r.status_code, r.json()["error"]["type"],
                            r.headers.get("Retry-After", "")))
    return out


def _cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and its children (the service's workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


async def _stop(proc: trio.Process, guard: float = GUARD) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    with trio.move_on_after(guard, shield=True):
        await proc.wait()
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def _check_all(db: str, sim_url: str, tmp_path: Path,
                     transcripts: list[Transcript]) -> None:
    proc, url = await start_service(db, sim_url, tmp_path, name="check")
    try:
        async with httpx.AsyncClient(base_url=url, timeout=GUARD) as http:
            for t in transcripts:
                assert t.run_id is not None
                await check_against_the_store(http, t)
    finally:
        with trio.move_on_after(GUARD * 3, shield=True):
            await _stop(proc)


def _log_size(tmp_path: Path) -> int:
    return sum(p.stat().st_size for p in tmp_path.glob("svc-*.log"))


def _logs(tmp_path: Path, stem: str) -> str:
    return "".join(p.read_text() for p in sorted(tmp_path.glob(f"{stem}-*.log")))


# -- the tests -----------------------------------------------------------------------------------


@pytest.mark.slow
async def test_pg_full_data_volume_recovers_once_space_returns_and_loses_nothing_shown(
    tmp_path: Path, data_volume: tuple[PostgresServer, str, Path]
) -> None:
    """Sound: the service's tablespace full (ERROR 53100 disk_full, the server up) while 24
    runs stream: ``/readyz`` 503 naming the store, a new conversation 503 JSON
    ``store_unavailable`` with Retry-After; once the space is freed, ``/readyz`` 200, every
    run ends ``succeeded`` and is stored so, with every shown event. While full the service
    neither spins (its CPU stays below one core) nor logs without bound."""
    _server, db, mnt = data_volume
    sim = Simulator(("sim-model",), default=Reply(tokens=160, interval=0.05),
                    strict_models=False)
    async with open_simulator(sim) as running:
        proc, url = await start_service(db, running.url, tmp_path, name="svc")
        try:
            limits = httpx.Limits(max_connections=STREAMS + 5)
            async with httpx.AsyncClient(base_url=url, timeout=GUARD, limits=limits) as http:
                async with trio.open_nursery() as nursery:
                    spare = (await http.post("/api/conversations", json={})).json()["id"]
                    transcripts = await _start_streams(http, nursery)
                    await trio.to_thread.run_sync(_fill, mnt / "filler")
                    down = await _store_refuses(http)
                    new = await _new_work(http, spare)
                    print(f"readyz: {down}; new conversation, new run: {new}")
                    log_before = _log_size(tmp_path)
                    cpu_before, t0 = _cpu_seconds(proc.pid), trio.current_time()
                    await trio.sleep(4)  # full for a while: the runs go on meanwhile
                    cpu = (_cpu_seconds(proc.pid) - cpu_before) / (trio.current_time() - t0)
                    logged = _log_size(tmp_path) - log_before
                    print(f"while full: service CPU {cpu:.2f} core, {logged} bytes logged")
                    assert not any(t.told == "succeeded" for t in transcripts)
                    os.unlink(mnt / "filler")
                    freed = trio.current_time()
                    await _until_ready(http, 200)
                    print(f"writes back {trio.current_time() - freed:.2f} s after space")
                assert all(t.told == "succeeded" for t in transcripts), [
                    t.told for t in transcripts]
        finally:
            with trio.move_on_after(GUARD * 3, shield=True):
                await _stop(proc)
        assert proc.returncode == 0, _logs(tmp_path, "svc")[-3000:]
        assert "Traceback" not in _logs(tmp_path, "svc")
        assert cpu < 0.9, f"the service spun while the store was full: {cpu:.2f} core"
        assert logged < 256 * 1024, f"{logged} bytes logged in 4 s while full"
        await _check_all(db, running.url, tmp_path, transcripts)


@pytest.mark.slow
async def test_pg_full_data_volume_new_runs_refused_while_writes_are_held(
    tmp_path: Path, data_volume: tuple[PostgresServer, str, Path]
) -> None:
    """Fixed (was: DEFECT: input: PostgreSQL with the service's tablespace full (ERROR 53100
    disk_full) while 24 runs stream; once ``/readyz`` is 503 ("down: store write failed: could
    not extend file ...": the runs' batches refused and held), a client creates a conversation
    and starts a run on an existing one. What happens: the conversation is 201 and the run 200
    (a stream that then shows nothing but keep-alives): their few rows fit in free space of
    pages the tables already have, so ``begin_run`` commits, while every batch of events (which
    needs new pages) is refused. What should: as docs/operations.md promises ("new runs and
    conversations get 503 store_unavailable with Retry-After: 5" while "the runs' own writes are
    refused and held"), and as the SQLite store does on a full volume: 503 JSON
    ``store_unavailable`` with Retry-After, the same thing ``/readyz`` says. Cause: admission
    never asks the committer: ``Supervisor.start`` (service/runs/supervisor.py:295-304) refuses
    only while draining, at max runs, or while the lease lapses; ``create_conversation``
    (service/api/conversations.py:34) just writes; only ``/readyz`` looks at
    ``committer.refusing`` (service/api/ops.py:183). Fix: in ``Supervisor.start`` (and
    ``create_conversation``) raise ``StoreUnavailable("the store refuses this instance's writes
    (held for a retry); no new runs until they land")`` while ``self.committer.refusing`` (or
    the store's ``write_error`` is set).) Both now check
    ``EventCommitter.refuse_while_refusing``. Here on a real full tablespace the refusal comes
    within a race (``/readyz`` may be 503 from its own probe before the committer holds a
    refused batch, and a conversation polled for meanwhile fills a page of its own), so this
    test checks the end state; the fault-injected
    ``test_review_diff_dec07ab.py::test_new_runs_and_conversations_are_refused_with_json_and_retry_after``
    is the one that failed before the fix."""
    _server, db, mnt = data_volume
    sim = Simulator(("sim-model",), default=Reply(tokens=160, interval=0.05),
                    strict_models=False)
    async with open_simulator(sim) as running:
        proc, url = await start_service(db, running.url, tmp_path, name="svc")
        try:
            limits = httpx.Limits(max_connections=STREAMS + 5)
            async with (httpx.AsyncClient(base_url=url, timeout=GUARD, limits=limits) as http,
                        trio.open_nursery() as nursery):
                spare = (await http.post("/api/conversations", json={})).json()["id"]
                await _start_streams(http, nursery)
                await trio.to_thread.run_sync(_fill, mnt / "filler")
                await _store_refuses(http)
                # ``/readyz`` may say so first from its own probe's failed write, before the
                # runs' next batch is refused and held: from then on (the volume stays full)
                # nothing new is taken. (Before the fix a conversation was 201 all along.)
                with trio.fail_after(GUARD):
                    while (await http.post("/api/conversations", json={})  # noqa: ASYNC110
                           ).status_code != 503:
                        await trio.sleep(0.05)
                new = await _new_work(http, spare)
                os.unlink(mnt / "filler")
                await _until_ready(http, 200)
        finally:
            with trio.move_on_after(GUARD * 3, shield=True):
                await _stop(proc)
    assert [n[:2] for n in new] == [(503, "store_unavailable")] * 2, new
    assert all(int(n[2]) > 0 for n in new), new


@pytest.mark.slow
async def test_pg_shutdown_on_a_full_data_volume_says_so_and_exits_non_zero(
    tmp_path: Path, data_volume: tuple[PostgresServer, str, Path]
) -> None:
    """Sound if it passes: SIGTERM while the service's tablespace is full (as
    ``test_full_disk.py`` expects for SQLite): exit 1, the log saying "whose final state the
    store refused", no client told an end; after space returns a new process closes every run
    with every shown event."""
    _server, db, mnt = data_volume
    sim = Simulator(("sim-model",), default=Reply(tokens=2000, interval=0.05),
                    strict_models=False)
    async with open_simulator(sim) as running:
        proc, url = await start_service(db, running.url, tmp_path, name="svc")
        try:
            limits = httpx.Limits(max_connections=STREAMS + 5)
            async with (httpx.AsyncClient(base_url=url, timeout=GUARD * 2,
                                          limits=limits) as http,
                        trio.open_nursery() as nursery):
                transcripts = await _start_streams(http, nursery)
                await trio.to_thread.run_sync(_fill, mnt / "filler")
                await _store_refuses(http)
                proc.send_signal(signal.SIGTERM)  # the volume stays full
        finally:
            with trio.move_on_after(GUARD * 3, shield=True):
                await _stop(proc, GUARD * 2)
        logs = _logs(tmp_path, "svc")
        assert proc.returncode == 1, logs[-3000:]
        assert "whose final state the store refused" in logs, logs[-3000:]
        assert "Traceback" not in logs
        assert not any(t.told for t in transcripts), [t.told for t in transcripts]
        os.unlink(mnt / "filler")
        await _check_all(db, running.url, tmp_path, transcripts)


def _make_wal(url: str, mb: int) -> None:
    """Write about ``mb`` MB of WAL from another database, switching segments: the volume
    being full, a new segment cannot be written (a PANIC)."""
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS ballast (b text)")
            for _ in range(mb * 4):
                conn.execute("INSERT INTO ballast SELECT repeat('x', 2000) "
                             "FROM generate_series(1, 128)")
                conn.execute("SELECT pg_switch_wal()")
    except psycopg.Error:
        pass  # the PANIC: every connection is cut


@pytest.mark.slow
@pytest.mark.parametrize("outage", [2, 15])
async def test_pg_full_wal_panic_then_restart_recovers_and_loses_nothing_shown(
    tmp_path: Path, wal_volume: tuple[PostgresServer, str, Path], outage: float
) -> None:
    """Sound if it passes: ``pg_wal`` full while 24 runs stream: PostgreSQL PANICs (every
    connection broken; it may stay down). ``/readyz`` 503, a new conversation and a new run
    503 JSON ``store_unavailable`` with Retry-After; once space is back (and the server
    started again if it stayed down) the service's pool reconnects by itself: ``/readyz``
    200, no client told an end the store contradicts, every shown event stored. Down for
    ``outage`` seconds: 2 (under the 10 s lease) and 15 (past it; found: every run still
    ended ``succeeded`` and was stored so). Meanwhile the service neither spins (about 0.02
    core measured) nor logs without bound (about 35 KB in 15 s)."""
    server, db, mnt = wal_volume
    sim = Simulator(("sim-model",), default=Reply(tokens=160, interval=0.05),
                    strict_models=False)
    async with open_simulator(sim) as running:
        proc, url = await start_service(db, running.url, tmp_path, name="svc")
        try:
            limits = httpx.Limits(max_connections=STREAMS + 5)
            async with (httpx.AsyncClient(base_url=url, timeout=GUARD, limits=limits) as http,
                        trio.open_nursery() as nursery):
                    spare = (await http.post("/api/conversations", json={})).json()["id"]
                    transcripts = await _start_streams(http, nursery)
                    await trio.to_thread.run_sync(_fill, mnt / "filler")
                    await trio.to_thread.run_sync(_make_wal, server.url(), 8)
                    await _store_refuses(http)
                    new = await _new_work(http, spare)
                    assert [n[:2] for n in new] == [(503, "store_unavailable")] * 2, new
                    assert all(int(n[2]) > 0 for n in new), new
                    pg_log = (server.root / "log").read_text()
                    assert "PANIC" in pg_log, pg_log[-2000:]
                    log_before = _log_size(tmp_path)
                    cpu_before, t0 = _cpu_seconds(proc.pid), trio.current_time()
                    await trio.sleep(outage)
                    cpu = (_cpu_seconds(proc.pid) - cpu_before) / (trio.current_time() - t0)
                    logged = _log_size(tmp_path) - log_before
                    print(f"while down: service CPU {cpu:.2f} core, {logged} bytes logged")
                    os.unlink(mnt / "filler")
                    stayed_down = server.pid() is None or not await trio.to_thread.run_sync(
                        _answers, server)
                    if stayed_down:
                        await trio.to_thread.run_sync(_restart, server)
                    print("after the PANIC the server",
                          "stayed down" if stayed_down else "came back")
                    await _until_ready(http, 200)
                # Whatever a client was told, the store must hold (checked below).
        finally:
            with trio.move_on_after(GUARD * 3, shield=True):
                await _stop(proc)
        logs = _logs(tmp_path, "svc")
        assert "Traceback" not in logs
        print("told:", [t.told for t in transcripts])
        assert cpu < 0.9, f"the service spun while the store was down: {cpu:.2f} core"
        assert logged < 64 * 1024 * outage, f"{logged} bytes logged in {outage} s while down"
        await _check_all(db, running.url, tmp_path, transcripts)


def _answers(server: PostgresServer) -> bool:
    import time
    deadline = time.monotonic() + 20  # a crash restart under way
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(server.url(), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            time.sleep(0.3)
    return False


def _restart(server: PostgresServer) -> None:
    pid = server.pid()
    if pid is not None:
        with contextlib.suppress(RuntimeError):
            server.stop("immediate")
        (server.data / "postmaster.pid").unlink(missing_ok=True)
    server.start()
