"""Readers' store reads coalesced into one query (service/runs/reads.py), on a real store."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from service.errors import StoreError
from service.runs.reads import BatchedReads
from service.store import RunEvent, Store, open_store


async def _runs_with_events(store: Store, runs: int, events: int) -> list[str]:
    conv = await store.create_conversation()
    ids = [(await store.begin_run(conv.id, content="q", agent="chat", model="m")).run.id
           for _ in range(runs)]
    await store.append_run_events([RunEvent(r, i, "token", {"text": f"{r}:{i}"}, 0.0)
                                   for r in ids for i in range(2, events + 1)])
    return ids


async def test_readers_waiting_together_are_answered_by_one_read_each_from_its_cursor(
    tmp_path: Path,
) -> None:
    async with open_store(tmp_path / "s.db") as store:
        ids = await _runs_with_events(store, 20, 10)
        reads = BatchedReads(store)
        got: dict[tuple[str, int], list[int]] = {}

        async def ask(run_id: str, after: int) -> None:
            got[run_id, after] = [e.seq for e in await reads.read(run_id, after)]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reads.run)
            await trio.testing.wait_all_tasks_blocked()
            async with trio.open_nursery() as readers:
                for n, run_id in enumerate(ids):
                    readers.start_soon(ask, run_id, n % 10)
                    readers.start_soon(ask, run_id, 3)  # two readers of one run, two cursors
            nursery.cancel_scope.cancel()
        assert got == {**{(r, n % 10): list(range(n % 10 + 1, 11)) for n, r in enumerate(ids)},
                       **{(r, 3): list(range(4, 11)) for r in ids}}
        assert reads.reads <= 2, f"{reads.reads} queries for 40 readers asking at once"


async def test_a_failed_read_reaches_every_reader_in_it_and_the_next_read_works(
    tmp_path: Path,
) -> None:
    async with open_store(tmp_path / "s.db") as store:
        ids = await _runs_with_events(store, 3, 4)
        reads = BatchedReads(store)
        failing = True

        def fault(op: str) -> None:
            if failing:
                raise StoreError("store read failed: disk I/O error")

        store.faults.before_read = fault
        errors: list[str] = []

        async def ask(run_id: str) -> None:
            try:
                await reads.read(run_id, 0)
            except StoreError as exc:
                errors.append(str(exc))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reads.run)
            await trio.testing.wait_all_tasks_blocked()
            async with trio.open_nursery() as readers:
                for run_id in ids:
                    readers.start_soon(ask, run_id)
            assert errors == ["store read failed: disk I/O error"] * 3
            failing = False
            assert [e.seq for e in await reads.read(ids[0], 1)] == [2, 3, 4]
            nursery.cancel_scope.cancel()


async def test_an_unexpected_failure_of_a_read_is_the_readers_not_the_loops(
    tmp_path: Path,
) -> None:
    # A bug in a read (not a StoreError) fails the readers that asked, as their own read
    # would have; the loop, and the supervisor whose nursery it runs in, go on.
    async with open_store(tmp_path / "s.db") as store:
        (run_id,) = await _runs_with_events(store, 1, 2)
        reads = BatchedReads(store)
        bug = True

        def fault(op: str) -> None:
            if bug:
                raise KeyError("a bug")

        store.faults.before_read = fault
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reads.run)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(KeyError):
                await reads.read(run_id, 0)
            bug = False
            assert [e.seq for e in await reads.read(run_id, 0)] == [1, 2]
            nursery.cancel_scope.cancel()


async def test_without_the_loop_or_when_it_stops_a_reader_reads_the_store_itself(
    tmp_path: Path,
) -> None:
    async with open_store(tmp_path / "s.db") as store:
        (run_id,) = await _runs_with_events(store, 1, 3)
        reads = BatchedReads(store)
        assert [e.seq for e in await reads.read(run_id, 0)] == [1, 2, 3]  # never started

        answers: list[list[int]] = []
        ops: list[str] = []
        loop = trio.CancelScope()

        def stop_the_loop_as_it_reads(op: str) -> None:
            ops.append(op)
            if op == "list_events_of_runs":
                loop.cancel()  # the supervisor stops with this batch in flight

        store.faults.before_read = stop_the_loop_as_it_reads

        async def serve() -> None:
            with loop:
                await reads.run()

        async def ask() -> None:
            answers.append([e.seq for e in await reads.read(run_id, 1)])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(ask)
            nursery.start_soon(ask)
        # Not left waiting: each read the store itself, after the batch was given up.
        assert answers == [[2, 3], [2, 3]]
        assert ops == ["list_events_of_runs", "list_run_events", "list_run_events"]
        assert [e.seq for e in await reads.read(run_id, 2)] == [3]  # stopped: direct


async def test_one_read_on_postgresql_too(pg_url: str) -> None:
    async with open_store(pg_url) as store:
        ids = await _runs_with_events(store, 5, 3)
        reads = BatchedReads(store)
        got: dict[str, list[int]] = {}

        async def ask(run_id: str) -> None:
            got[run_id] = [e.seq for e in await reads.read(run_id, 1)]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reads.run)
            await trio.testing.wait_all_tasks_blocked()
            async with trio.open_nursery() as readers:
                for run_id in ids:
                    readers.start_soon(ask, run_id)
            nursery.cancel_scope.cancel()
        assert got == {r: [2, 3] for r in ids}
        assert reads.reads == 1
