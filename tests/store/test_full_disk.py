"""A really full volume: the store on a small tmpfs, filled while runs stream.

A fault suite found that once space was freed the WAL grew into it before a checkpoint could
finish, writes never recovered, a SIGTERM then exited 0 while final states were missing, and
text shown to clients was lost. Here: writes come back once space returns, ``/readyz`` and new
runs say the store cannot write while it cannot, nothing shown is lost, and a shutdown that
could not store its runs says so and exits non-zero.

Mounting a tmpfs needs root (CI and these machines run as root).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from service.sim import Reply, Simulator, open_simulator

from ..servers import start_service
from .test_crash_consistency import Transcript, check_against_the_store, native_client

STREAMS = 30
GUARD = 60  # seconds: a hang fails fast; nothing here asserts speed


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    """A 3 MB tmpfs of the test's own."""
    mnt = tmp_path / "vol"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(path: Path) -> int:
    """Write ``path`` until the volume is full (unbuffered: every byte that fits is on the
    volume); the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    written += f.write(b"\0" * size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return written


async def _until_ready(http: httpx.AsyncClient, want: int) -> httpx.Response:
    with trio.fail_after(GUARD):
        while (r := await http.get("/readyz")).status_code != want:  # noqa: ASYNC110 (polls another process)
            await trio.sleep(0.05)
    return r


async def _streams_then_fill(http: httpx.AsyncClient, volume: Path,
                             nursery: trio.Nursery) -> list[Transcript]:
    """Start the streams; once each has shown a token, fill the volume and wait until the
    store says it cannot write."""
    convs = [(await http.post("/api/conversations", json={})).json()["id"]
             for _ in range(STREAMS)]
    transcripts = [Transcript("native") for _ in range(STREAMS)]
    ended, first = trio.Semaphore(0), trio.Semaphore(0)
    for conv, t in zip(convs, transcripts, strict=True):
        nursery.start_soon(native_client, http, conv, t, ended, first)
    with trio.fail_after(GUARD):
        for _ in range(STREAMS):
            await first.acquire()
    await trio.to_thread.run_sync(_fill, volume / "filler")
    r = await _until_ready(http, 503)
    assert r.json()["checks"]["store"].startswith("down"), r.text
    # A new conversation (or run) cannot be stored: 503 with Retry-After (clients retry it;
    # they do not retry a 500).
    r = await http.post("/api/conversations", json={})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "store_unavailable"
    assert int(r.headers["Retry-After"]) > 0
    return transcripts


@pytest.mark.slow
async def test_a_full_volume_recovers_once_space_returns_and_loses_nothing_shown(
    tmp_path: Path, volume: Path
) -> None:
    sim = Simulator(("sim-model",), default=Reply(tokens=120, interval=0.05),
                    strict_models=False)
    db = volume / "s.db"
    async with open_simulator(sim) as running:
        proc, url = await start_service(db, running.url, tmp_path)
        try:
            limits = httpx.Limits(max_connections=STREAMS + 5)
            async with httpx.AsyncClient(base_url=url, timeout=GUARD, limits=limits) as http:
                async with trio.open_nursery() as nursery:
                    transcripts = await _streams_then_fill(http, volume, nursery)
                    await trio.sleep(2)  # full for a while: the runs go on meanwhile
                    os.unlink(volume / "filler")
                    freed = trio.current_time()
                    await _until_ready(http, 200)
                    recovered = trio.current_time() - freed
                    print(f"full volume: writes back {recovered:.2f} s after space returned")
                # Every stream ended with its end: the store took every final state.
                assert all(t.told == "succeeded" for t in transcripts), [
                    t.told for t in transcripts]
        finally:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(GUARD, shield=True):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
        assert proc.returncode == 0
        proc, url = await start_service(db, running.url, tmp_path)
        try:
            async with httpx.AsyncClient(base_url=url, timeout=GUARD) as http:
                for t in transcripts:
                    await check_against_the_store(http, t)
        finally:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(GUARD, shield=True):
                await proc.wait()


@pytest.mark.slow
async def test_a_shutdown_on_a_full_volume_says_so_and_exits_non_zero(
    tmp_path: Path, volume: Path
) -> None:
    sim = Simulator(("sim-model",), default=Reply(tokens=2000, interval=0.05),
                    strict_models=False)
    db = volume / "s.db"
    async with open_simulator(sim) as running:
        proc, url = await start_service(db, running.url, tmp_path)
        try:
            limits = httpx.Limits(max_connections=STREAMS + 5)
            async with (httpx.AsyncClient(base_url=url, timeout=GUARD * 2, limits=limits) as http,
                        trio.open_nursery() as nursery):
                transcripts = await _streams_then_fill(http, volume, nursery)
                proc.send_signal(signal.SIGTERM)  # the volume stays full
        finally:
            with trio.move_on_after(GUARD * 2, shield=True):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
        assert proc.returncode == 1
        logs = "".join([await trio.Path(p).read_text()
                        for p in tmp_path.glob("s-*.log")])  # noqa: ASYNC240 (a small dir)
        assert "whose final state the store refused" in logs
        # No client was told an end the store does not have.
        assert not any(t.told for t in transcripts), [t.told for t in transcripts]
        os.unlink(volume / "filler")
        proc, url = await start_service(db, running.url, tmp_path)
        try:
            async with httpx.AsyncClient(base_url=url, timeout=GUARD) as http:
                for t in transcripts:
                    await check_against_the_store(http, t)
        finally:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(GUARD, shield=True):
                await proc.wait()
