"""Review of the store layer and its upkeep (Dec 06): each test fails on the code it was
written against, for the defect its docstring names."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio
import trio.testing

from service.errors import StoreError
from service.store import RunEvent, SQLiteStore


async def _finished_run_with_a_rotted_event(db: Path) -> str:
    """A finished run whose token event no longer decodes (a rotted byte: SQLite keeps no
    checksum), as operations.md's failure table describes; its row's ``usage`` too."""
    store = SQLiteStore(db, threaded=False)
    await store.open()
    try:
        conv = (await store.create_conversation()).id
        run, *_ = await store.begin_run(conv, content="q", agent="chat", model=None)
        await store.append_run_events([RunEvent(run.id, 2, "token", {"text": "MARK"}, 0.0)])
    finally:
        await store.aclose()
    with sqlite3.connect(db) as raw:
        raw.execute("UPDATE run_events SET data = ? WHERE run_id = ? AND seq = 2",
                    ('{"text":"MARK"]', run.id))
        raw.execute("UPDATE runs SET usage = ? WHERE id = ?", ('{"prompt_tokens":1]', run.id))
    raw.close()
    return run.id


async def test_reading_a_rotted_event_is_a_store_error_not_a_json_decode_error(
    tmp_path: Path,
) -> None:
    """operations.md, failure modes: "a stored event that does not decode is skipped by the
    recovery ..., and is a ``StoreError`` elsewhere, never a traceback". ``SQLiteStore._read``
    maps only ``sqlite3.Error``: ``list_run_events`` raises the raw ``JSONDecodeError``,
    which the API's ``except ServiceError`` (``_event_type``, ``_where_in_the_end``) does not
    catch, and which fails every other run's reader sharing the batched read."""
    db = tmp_path / "s.db"
    run_id = await _finished_run_with_a_rotted_event(db)
    store = SQLiteStore(db, threaded=False)
    await store.open()
    try:
        for read in (lambda: store.list_run_events(run_id),
                     lambda: store.list_events_of_runs({run_id: 0}),
                     lambda: store.get_run(run_id)):
            try:
                await read()
            except StoreError:
                pass
            except Exception as exc:
                pytest.fail(f"a rotted event read raised {type(exc).__name__}: {exc}, "
                            "not a StoreError")
    finally:
        await store.aclose()


async def test_events_piling_up_behind_a_stuck_write_are_bounded_too(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """operations.md: while the store does not take a batch, "nothing after it is shown
    meanwhile ... Past 100,000 held events (or 64 MiB of them) the runs making them stop,
    ``failed`` (``store_unavailable``)", so memory stays bounded. The bound is looked at only
    when a batch is *refused* (``_fail_runs_past_the_bound`` in ``_write_batch``). A batch
    the store has taken and that does not come back (a stalled volume, a PostgreSQL that
    stops answering: up to ``statement_timeout`` + 5 s, a hung disk on SQLite: unbounded)
    is never refused, so the events made meanwhile pile up without limit and the run goes
    on to succeed. Here the bound is 100 kB and the run makes 2 MB behind a writer stuck
    for 30 s."""
    from service.runs import RunSpec
    from service.runs import committer as committer_mod

    from ..fakes import Reply, ScriptedBackend, supervisor_env

    monkeypatch.setattr(committer_mod, "_PENDING_BYTES_MAX", 100_000)
    word = "w" * 10_000
    backend = ScriptedBackend(lambda req: Reply(" ".join([word] * 200), first_delay=1.0,
                                                gap=0.01))
    async with supervisor_env(tmp_path, backend) as env:
        handle = await env.supervisor.start(RunSpec(await env.conversation(), "x"))
        await trio.sleep(0.5)  # stored and started; its tokens come from t=1
        stuck = {"once": True}
        most_pending = 0

        async def stuck_writer() -> None:
            if stuck["once"]:
                stuck["once"] = False
                await trio.sleep(30)  # the batch is taken; its write does not come back

        async def watch() -> None:
            nonlocal most_pending
            while True:
                most_pending = max(most_pending, sum(
                    len(e.raw) for e in env.supervisor.committer._pending))
                await trio.sleep(0.05)

        env.store.faults.before_batch = stuck_writer
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            with trio.fail_after(300):
                await handle.finished.wait()
                await handle.wait_published()
            nursery.cancel_scope.cancel()
        env.store.faults.clear()
        run = await env.store.get_run(handle.id)
        assert run.status == "failed", (
            f"the run went on past the held-events bound behind a stuck write: stored "
            f"{run.status!r}; up to {most_pending} bytes of events were held (bound 100000)")
        assert "store" in (run.error or ""), run


async def test_one_rotted_event_does_not_fail_the_readers_of_other_runs(
    tmp_path: Path,
) -> None:
    """operations.md: an undecodable stored event "is a ``StoreError`` elsewhere", i.e. the
    reads of *that* run fail. The readers' store reads are coalesced (``BatchedReads``: one
    ``list_events_of_runs`` for every reader waiting), and one row that does not decode fails
    the whole query, so every other run's reader in the same batch is failed with it: a
    client re-joining a healthy run gets an error because someone else re-joined a damaged
    one (and does again at each of its retries)."""
    from service.runs.reads import BatchedReads

    db = tmp_path / "s.db"
    bad = await _finished_run_with_a_rotted_event(db)
    store = SQLiteStore(db, threaded=False)
    await store.open()
    try:
        conv = (await store.create_conversation()).id
        good, *_ = await store.begin_run(conv, content="q", agent="chat", model=None)
        await store.append_run_events([RunEvent(good.id, 2, "token", {"text": "ok"}, 0.0)])
        reads = BatchedReads(store)
        got: dict[str, object] = {}

        async def read(run_id: str) -> None:
            try:
                got[run_id] = [e.seq for e in await reads.read(run_id, 0)]
            except Exception as exc:
                got[run_id] = exc

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reads.run)
                await trio.testing.wait_all_tasks_blocked()
                async with trio.open_nursery() as readers:
                    readers.start_soon(read, good.id)
                    readers.start_soon(read, bad)
                nursery.cancel_scope.cancel()
        assert got[good.id] == [1, 2], (
            f"the healthy run's reader got {got[good.id]!r} because another run in the same "
            "batched read has a rotted event")
    finally:
        await store.aclose()


class _NamingBackend:
    """A ScriptedBackend whose chunks name the model that answers as an upstream does
    (OpenAI's ``model`` field, Ollama's ``model``), here a name the upstream sent with a
    lone surrogate (``"\\ud800"`` in its JSON: valid JSON, not valid UTF-8)."""

    def __init__(self, inner: object, model: str) -> None:
        self._inner = inner
        self._model = model

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def stream(self, request: object) -> object:
        from contextlib import asynccontextmanager
        from dataclasses import replace

        inner, model = self._inner, self._model

        @asynccontextmanager
        async def cm():  # type: ignore[no-untyped-def]
            async with inner.stream(request) as chunks:  # type: ignore[attr-defined]
                async def named():  # type: ignore[no-untyped-def]
                    async for chunk in chunks:
                        yield replace(chunk, model=model)
                yield named()

        return cm()


async def test_a_model_name_with_a_lone_surrogate_does_not_leave_the_run_unstorable(
    tmp_path: Path, autojump_clock: trio.testing.MockClock,
) -> None:
    """A run that names no model is stored with the model the backend says answered
    (operations.md: "a run that names none is stored with the model the backend chose").
    ``finish_run`` cleans the reply's text and the error (``clean_text``: "a lone surrogate
    here would fail the write every time it is retried") but not ``model``, which comes
    from the upstream's JSON as is. A name with a lone surrogate makes every final write
    raise ``UnicodeEncodeError`` (not a ``StoreError``): the committer takes it for a bug,
    the run's clients are told ``store_unavailable`` and the run stays ``running`` in the
    store for as long as the process lives, its final state retried (and logged) every 2 s.
    operations.md's table: a model naming a tool with a lone surrogate is "200, the name
    cleaned"; the model's own name deserves the same."""
    from service.errors import StoreUnavailable
    from service.runs import RunSpec

    from ..fakes import Reply, ScriptedBackend, supervisor_env

    backend = ScriptedBackend([Reply("all of it")])
    async with supervisor_env(tmp_path, lambda store: _NamingBackend(backend, "m\ud800x")
                              ) as env:  # type: ignore[arg-type,return-value]
        handle = await env.supervisor.start(RunSpec(await env.conversation(), "x"))
        told: object = None
        with trio.fail_after(120):
            try:
                async for event in handle.subscribe():
                    told = event.type
            except StoreUnavailable as exc:
                told = exc
            await trio.sleep(10)  # a few retries of the final state
        run = await env.store.get_run(handle.id)
        assert run.status == "succeeded", (
            f"stored {run.status!r} (the client was told {told!r}): the final write fails "
            "on the model's name")


async def test_a_dead_siblings_run_named_by_a_surrogate_model_does_not_stop_the_supervisor(
    tmp_path: Path, autojump_clock: trio.testing.MockClock,
) -> None:
    """A run that named no model writes the model that answered into its first token event
    (so that "a run closed by another instance names the model its clients saw"). When its
    process dies, a surviving worker's recovery (``close_interrupted`` ->
    ``_model_that_answered``) copies that name into ``runs.model``; a name with a lone
    surrogate (valid JSON from the upstream, stored escaped in the event) raises
    ``UnicodeEncodeError`` there, which is no ``StoreError``: ``upkeep.recover_loop`` lets it
    out and the run supervisor stops for good (every later run refused, ``/healthz`` 503),
    as the rotted-event case in tests/store/test_durability_faults.py did before its fix.
    Expected: the dead run is closed (``failed``) and the supervisor goes on."""
    from service.runs import upkeep

    from ..fakes import Reply, ScriptedBackend, supervisor_env

    dead = "999999999:1"  # a process that is gone (no such PID, no lease)
    async with supervisor_env(tmp_path, ScriptedBackend([Reply("hi")])) as env:
        conv = await env.conversation()
        other = SQLiteStore(env.store.path, threaded=False, process_id=dead)
        await other.open()
        try:
            begun = await other.begin_run(conv, content="q", agent="chat", model=None)
            await other.append_run_events([RunEvent(
                begun.run.id, 2, "token", {"text": "hel", "model": "m\ud800x"}, 0.0)])
        finally:
            await other.aclose()
        await trio.sleep(upkeep.RECOVER_EVERY * 3)
        assert env.supervisor.failure is None, env.supervisor.failure
        run = await env.store.get_run(begun.run.id)
        assert run.status == "failed", run


async def test_finish_run_stores_an_upstreams_model_name_that_is_not_clean_text(
    db: Path | str,
) -> None:
    """``finish_run`` cleans the reply and the error (``clean_text``: a NUL cannot be stored
    in PostgreSQL's text, a lone surrogate cannot be encoded for SQLite, and "would fail the
    write every time it is retried") but stores ``model`` (the name an upstream's chunk
    gave, read from its JSON as is) raw: the run's final write fails on either store, every
    time (see the supervisor-level test above for what a client is then told). Expected:
    the end stored, the name cleaned as the LLM-call record's already is
    (``Interceptor.record``: ``clean_text(self.model)``)."""
    from service.store import MessageStatus, open_store

    async with open_store(db) as store:
        conv = (await store.create_conversation()).id
        failures = []
        for bad in ("m\x00x", "m\ud800x"):
            begun = await store.begin_run(conv, content="q", agent="chat", model=None)
            try:
                stored = await store.finish_run(
                    begun.run.id, status="succeeded", message_id=begun.reply.id,
                    content="hi", message_status=MessageStatus.complete, error=None,
                    usage={}, model=bad)
            except Exception as exc:
                failures.append(f"model {bad!r}: {type(exc).__name__}: {exc}")
                continue
            got = await store.get_run(begun.run.id)
            if not (stored and got.status == "succeeded" and got.model):
                failures.append(f"model {bad!r}: stored {got}")
        assert not failures, "the final write failed: " + "; ".join(failures)


async def test_the_start_after_a_crash_closes_a_run_named_by_a_surrogate_model(
    tmp_path: Path,
) -> None:
    """The same at start-up: a process killed while its run (which named no model) was
    streaming leaves the model's name in its first token event; the next start's recovery
    (``lifespan``: ``store.recover_interrupted()``, which catches ``StoreError`` only) raises
    ``UnicodeEncodeError`` on a name with a lone surrogate, and ``python -m service`` dies
    with a traceback, at every restart, until someone edits the database by hand.
    operations.md: after ``kill -9`` "at restart ... its runs become ``failed``"; a start-up
    failure is "one line"."""
    import os
    import re
    import signal
    import sys

    from ..servers import ROOT

    guard = 60
    db = tmp_path / "s.db"
    store = SQLiteStore(db, process_id="999999999:1")  # a process that is gone
    await store.open()
    try:
        conv = (await store.create_conversation()).id
        begun = await store.begin_run(conv, content="q", agent="chat", model=None)
        await store.append_run_events([RunEvent(
            begun.run.id, 2, "token", {"text": "hel", "model": "m\ud800x"}, 0.0)])
    finally:
        await store.aclose()

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
        with trio.fail_after(guard):
            while proc.returncode is None and not re.search(  # noqa: ASYNC110
                    rb"Running on http://", await trio.Path(log).read_bytes()):
                await trio.sleep(0.05)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(guard, shield=True):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
    text = (await trio.Path(log).read_bytes()).decode(errors="replace")
    why = next((line for line in reversed(text.splitlines()) if "Error" in line), text[-300:])
    assert "Traceback" not in text, f"the start after the crash failed: {why}"
    assert "Running on http://" in text, f"the start after the crash failed: {why}"
    check = SQLiteStore(db, threaded=False)
    await check.open()
    try:
        assert (await check.get_run(begun.run.id)).status == "failed"
    finally:
        await check.aclose()
