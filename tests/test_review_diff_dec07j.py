"""Hostile review of 26c2e6d..HEAD (e0c8545, e85fefe, d9e40f1): each test fails on a defect
the diff leaves or brings. Real processes and signals where it matters."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from service.runs import RunSpec
from service.runs.handle import RunHandle

from .fakes import Reply, ScriptedBackend, supervisor_env
from .operations.test_workers_faults import _children, _reap, spawn_with_site

# -- service/workers.py: SIGINT ignored around proc.start() ----------------------------------

_SIGINT_DURING_THE_SECOND_START = """\
import os, signal, sys
if "--multiprocessing-fork" not in sys.argv and os.environ.get("SIGINT_MARK"):
    import multiprocessing.util as _util
    _spawn, _workers = _util.spawnv_passfds, []
    def spawnv_passfds(path, args, passfds):
        pid = _spawn(path, args, passfds)
        if "--multiprocessing-fork" in args:  # a worker (not the resource tracker)
            _workers.append(pid)
            if len(_workers) == 2:  # the second worker's fork: `kill -INT <parent>` now
                open(os.environ["SIGINT_MARK"], "w").close()
                os.kill(os.getpid(), signal.SIGINT)
        return pid
    _util.spawnv_passfds = spawnv_passfds
"""


async def test_sigint_to_the_parent_during_a_worker_start_is_not_lost(tmp_path: Path) -> None:
    """What: a SIGINT that reaches the ``--workers`` parent while ``_Pool._start`` runs
    ``proc.start()`` (SIGINT blocked in the main thread and its disposition SIG_IGN) is lost:
    the service never stops, it goes on serving with every worker up.

    Why: the kernel hands a process-directed signal that the main thread blocks to another
    thread that does not block it; the parent has one (trio's thread cache keeps the thread
    of the first worker's ``_wait_ready`` idle for 10 s, and the second worker starts right
    then), and there the disposition is SIG_IGN: discarded. The comment calls it "a Ctrl+C
    then needs pressing again", but a Ctrl+C goes to the whole group: an up worker gets it
    too, drains and exits 0, and the parent (not stopping) restarts it, so the first press
    looks like a crash; and a ``kill -INT`` from a supervisor is simply never obeyed.
    A sitecustomize sends the SIGINT from inside the second worker's fork (the window), so it
    lands there every time. Code: service/workers.py ``_Pool._start`` (block + SIG_IGN; the
    handler could stay and only the child be told to ignore SIGINT, e.g. an env flag or a
    pre-exec step; or block SIGINT in every thread)."""
    proc, log = await spawn_with_site(tmp_path, _SIGINT_DURING_THE_SECOND_START, "SIGINT_MARK")
    try:
        with trio.move_on_after(30, shield=True):
            await proc.wait()
        text = log.read_text()
        assert proc.returncode is not None, (
            "SIGINT lost: still running 30 s after it", text[-2000:])
        assert "received SIGINT" in text, text[-2000:]
    finally:
        if proc.returncode is None:
            for pid in _children(proc.pid):
                os.kill(pid, signal.SIGKILL)
        _reap(proc)


# -- runs/handle.py + agents: a /v1 stop cuts a non-chat agent's answer cut short ------------


def _react_v1_spec(stop: tuple[str, ...]) -> RunSpec:
    from service.backends.base import ChatMessage

    return RunSpec(conversation_id=None, content="q", agent="react",
                   new_conversation={"title": "q", "system": None, "model": None,
                                     "agent": "react"},
                   messages=(ChatMessage("user", "q"),), stop=stop)


_REACT_TURN = "Thought: done.\nFinal Answer: alpha STOP " + "beta " * 40


async def _react_run_cut_short(env: Any, close: Any, stop: tuple[str, ...] = ("STOP",)) -> str:
    """A /v1 react run with ``stop`` whose answer has streamed past the stop sequence (to a
    "beta"), then ended by ``close``; the reply as stored."""
    handle = await env.supervisor.start(_react_v1_spec(stop))
    seen: list[str] = []

    async def follow() -> None:
        async for e in handle.subscribe():
            if e.type == "token":
                seen.append(e.data["text"])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow)
        with trio.fail_after(60):
            while "beta" not in "".join(seen):  # noqa: ASYNC110
                await trio.sleep(0.5)
        await close(handle)
        with trio.fail_after(10):
            await handle.finished.wait()
        nursery.cancel_scope.cancel()
    (_, reply) = await env.store.get_messages(handle.conversation_id)
    return reply.content


async def test_a_dead_owners_v1_react_run_is_stored_cut_at_its_stop_too(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """What: a /v1 ``react`` (or ``plan_execute``, ``auto``) run with ``stop`` whose instance
    dies mid-answer is closed by a survivor with its answer so far *not* cut at the stop
    sequences, while the same run cancelled on a live instance is stored cut
    ("alpha " vs "alpha STOP beta beta ...").

    Why: docs/api.md now says "the answer so far of one cut short (cancelled, failed) is stored
    cut at them as well", and the survivor's close is such a failed run ("interrupted"), also
    when a cancel sent to another instance closes it. But the stop sequences live only in the
    owner's memory (``RunHandle.stop``, set in agents/__init__.py ``run``); nothing stores
    them, and store/ownership.py ``close_interrupted`` keeps the token text as it came
    (``answer_so_far`` only). Code: service/runs/handle.py ``partial_text`` vs
    service/store/ownership.py ``close_interrupted``."""
    from service.store import SQLiteStore

    backend = ScriptedBackend(lambda req: Reply(_REACT_TURN, gap=1.0))
    async with supervisor_env(tmp_path / "live", backend) as env:

        async def cancel(handle: RunHandle) -> None:
            handle.cancel("stop pressed")

        live = await _react_run_cut_short(env, cancel)
    assert live.rstrip() == "alpha", live  # the diff's own rule, on a live instance

    elsewhere = "999999999:1:another-boot-id:12345:4026531836"  # its lease decides
    (tmp_path / "dead").mkdir()
    backend = ScriptedBackend(lambda req: Reply(_REACT_TURN, gap=1.0))
    async with supervisor_env(tmp_path / "dead", backend, process_id=elsewhere) as env:

        async def owner_dies(handle: RunHandle) -> None:
            await env.store.renew_lease(-1)  # its lease lapses: a survivor closes its run
            other = SQLiteStore(tmp_path / "dead" / "runs.db", threaded=False)
            await other.open()
            try:
                assert await other.recover_interrupted() == [handle.id]
            finally:
                await other.aclose()

        closed = await _react_run_cut_short(env, owner_dies)
    assert closed == live, (live, closed)


# -- settings.py: env_ignore_empty ------------------------------------------------------------


def test_an_empty_setting_under_demo_is_the_demos_default(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What: ``--demo`` with ``SERVICE_EMBEDDED_CTX=``, ``SERVICE_EMBEDDED_MAX_TOKENS=`` or
    ``SERVICE_DEFAULT_MODEL=`` (an env file's or compose's "unset") runs with 4096 / 0 / ""
    instead of the demo's documented 32768 / 256 / "tiny".

    Why: d9e40f1 made an empty variable "its default" (``env_ignore_empty``; operations.md:
    "An empty value ... is the default"), but ``demo_overrides`` still asks
    ``"SERVICE_EMBEDDED_CTX" not in os.environ`` (set but empty counts as given, so the demo's
    32768 is not applied and the settings then ignore the empty value: the service's 4096,
    2 slots of 2048 instead of 4 of 8192) and ``os.environ.get("SERVICE_DEFAULT_MODEL",
    "tiny")`` (an override "", which env_ignore_empty does not touch). Before, the first two
    stopped the start with one line (exit 2); now the demo silently runs on a quarter of its
    context. Code: service/demo.py ``demo_overrides`` vs service/settings.py model_config."""
    import types

    from service import demo
    from service.backends import embedded
    from service.settings import load_settings

    for name in ("xllamacpp", "gguf"):  # the embedded extra, not needed to build settings
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setattr(embedded, "ensure_tiny_model", lambda path: None)
    for key in [k for k in os.environ if k.startswith("SERVICE_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("SERVICE_DB", str(tmp_path / "s.db"))
    unset = load_settings(**demo.demo_overrides())
    for key in ("SERVICE_EMBEDDED_CTX", "SERVICE_EMBEDDED_MAX_TOKENS", "SERVICE_DEFAULT_MODEL"):
        monkeypatch.setenv(key, "")
    empty = load_settings(**demo.demo_overrides())
    got = [(s.embedded_ctx, s.embedded_max_tokens, s.default_model) for s in (unset, empty)]
    assert got[0] == (32768, 256, "tiny"), got
    assert got[1] == got[0], got



async def test_a_cancelled_react_answer_is_cut_as_the_whole_one_would_be(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """What: a /v1 ``react`` run with ``stop: ["\\n\\n"]`` whose (label-less, turn-0) answer
    begins with a blank line is stored "alpha" when it completes but "" when cancelled after
    the stop sequence went by: the answer so far is cut at the *leading* "\\n\\n".

    Why: the whole answer is stripped before it is cut (react.py returns
    ``step.final_answer`` / ``reply.content.strip()``, then agents/__init__.py
    ``cut_at_stop``), but ``RunHandle.partial_text`` cuts ``answer_so_far(text)``, which keeps
    a label-less turn's text as it came, leading whitespace and all. docs/api.md: "the answer
    so far of one cut short (cancelled, failed) is stored cut at them as well"; it is cut
    differently, to nothing (a reasoning model's answer after ``</think>`` often starts with
    "\\n\\n", a frequent stop sequence). Code: service/runs/handle.py ``partial_text``."""
    text = "\n\nalpha\n\n" + "beta " * 40
    stop = ("\n\n",)

    backend = ScriptedBackend(lambda req: Reply(text))
    async with supervisor_env(tmp_path / "whole", backend) as env:
        handle = await env.supervisor.start(_react_v1_spec(stop))
        with trio.fail_after(60):
            await handle.finished.wait()
        (_, reply) = await env.store.get_messages(handle.conversation_id)
        whole = reply.content
    assert whole == "alpha", whole

    backend = ScriptedBackend(lambda req: Reply(text, gap=1.0))
    async with supervisor_env(tmp_path / "cancelled", backend) as env:

        async def cancel(handle: RunHandle) -> None:
            handle.cancel("stop pressed")

        cut_short = await _react_run_cut_short(env, cancel, stop)
    assert cut_short == whole, (whole, cut_short)
