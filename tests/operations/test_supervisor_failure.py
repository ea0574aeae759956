"""A process whose run supervisor fails (a bug in one of its loops) stops, exit 1, so that what
runs it (``--workers``' parent, systemd, an orchestrator) starts another.

Before, it went on answering HTTP with nothing to run anything (``/healthz`` 503, every run
refused): hypercorn logged "ASGI Framework Lifespan error, continuing without Lifespan
support", so a ``--workers`` worker was never replaced, and at its shutdown the app's own
close (the store's) was skipped. The fault is a real bug in a real process: a deployer's tool
module (``SERVICE_TOOLS``, imported at start) that breaks one of the supervisor's loops.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from ..servers import ROOT
from .test_main import _env

GUARD = 60  # seconds any wait may take before the test fails

# A tool module that breaks the supervisor's look for runs left open: it raises 1 s after
# start, as a bug would.
_BROKEN = '''
import trio

from service.runs import upkeep


async def recover_loop(*args, **kwargs):
    await trio.sleep(1.0)
    raise RuntimeError("injected: a bug in an upkeep loop")


upkeep.recover_loop = recover_loop
TOOLS = []
'''


def _with_broken_upkeep(tmp_path: Path, **extra: str) -> dict[str, str]:
    (tmp_path / "broken_upkeep.py").write_text(_BROKEN)
    return _env(tmp_path, SERVICE_TOOLS="broken_upkeep", PYTHONPATH=str(tmp_path), **extra)


async def _started(proc: trio.Process, log: bytearray) -> str:
    assert proc.stderr is not None
    while (m := re.search(rb"Running on (http://127\.0\.0\.1:\d+)", log)) is None:
        chunk = await proc.stderr.receive_some(65536)
        assert chunk, f"exited early: {log.decode()}"
        log += chunk
    return m.group(1).decode()


@pytest.mark.slow
async def test_a_process_whose_supervisor_failed_exits_1(tmp_path: Path) -> None:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "service", "--bind", "127.0.0.1:0"],
        cwd=ROOT, env=_with_broken_upkeep(tmp_path), stderr=subprocess.PIPE)
    assert proc.stderr is not None
    log = bytearray()
    try:
        with trio.fail_after(GUARD):
            url = await _started(proc, log)
            async with httpx.AsyncClient(base_url=url) as client:
                assert (await client.get("/healthz")).status_code == 200
            async for chunk in proc.stderr:
                log += chunk
            rc = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.CancelScope(shield=True), trio.move_on_after(GUARD):
                await proc.wait()
    text = log.decode()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    said = [line for line in text.splitlines() if line.startswith("service: ")]
    assert rc == 1, text
    assert said == ["service: the run supervisor stopped: RuntimeError: injected: a bug in an "
                    "upkeep loop"], text
    assert any(line["msg"] == "store closed" for line in lines), text
    assert "continuing without Lifespan support" not in text


@pytest.mark.slow
async def test_a_worker_whose_supervisor_failed_is_replaced(tmp_path: Path) -> None:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "service", "--bind", "127.0.0.1:0", "--workers", "2"],
        cwd=ROOT, env=_with_broken_upkeep(tmp_path), stderr=subprocess.PIPE)
    assert proc.stderr is not None
    log = bytearray()
    try:
        with trio.fail_after(GUARD):
            await _started(proc, log)
            while b"died (exit 1); starting another" not in log:
                chunk = await proc.stderr.receive_some(65536)
                assert chunk, f"exited: {log.decode()}"
                log += chunk
    finally:
        proc.terminate()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(GUARD) as waited:
                await proc.wait()
            if waited.cancelled_caught:
                proc.kill()
                with trio.move_on_after(GUARD):
                    await proc.wait()
