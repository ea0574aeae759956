"""LLM-call records the store refused or stalled on are written later (service.runs.call_records),
on a real (inline) SQLite store with its public faults, in virtual time."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from service.runs.call_records import CallRecords
from service.store import SQLiteStore
from service.store.faults import InjectedFault
from service.store.records import LLMCallOutcome, LLMCallRecord


def _refuse() -> None:
    raise InjectedFault("disk I/O error")


async def test_a_record_the_store_refuses_or_stalls_on_is_written_later(
    tmp_path: Path, autojump_clock: trio.testing.MockClock,
) -> None:
    store = SQLiteStore(tmp_path / "s.db", threaded=False)
    await store.open()
    try:
        records = CallRecords(store)
        async with trio.open_nursery() as nursery:
            await nursery.start(records.run)
            conv = await store.create_conversation()
            run = (await store.begin_run(conv.id, content="q", agent="chat", model=None)).run

            def rec(n: int) -> LLMCallRecord:
                return LLMCallRecord(id=f"call_{n}", backend="b", model="m",
                                     outcome=LLMCallOutcome.ok, started_at=float(n),
                                     run_id=run.id)

            async def stored() -> list[str]:
                return sorted(c.id for c in await store.list_llm_calls(run_id=run.id))

            await records.record_llm_call(rec(1))  # the store takes it: written at once
            assert (await stored(), records.kept) == (["call_1"], 0)
            # Refused (an I/O error): the caller is not failed; it is kept, written later.
            store.faults.before_commit = _refuse
            await records.record_llm_call(rec(2))
            assert records.kept == 1
            await trio.sleep(5)
            assert await stored() == ["call_1"]  # still refused: still kept
            store.faults.clear()
            await trio.sleep(3)  # the next try (the back-off is at most 2 s)
            assert (await stored(), records.kept) == (["call_1", "call_2"], 0)
            # Stalled past the caller's budget (the interceptor waits 5 s): the caller goes on
            # within it, and the write (CallRecords.run's task) lands once the store is back.
            async def within_the_budget(n: int) -> None:
                with trio.move_on_after(5):
                    await records.record_llm_call(rec(n))
                returned.append(trio.current_time() - began)

            returned: list[float] = []
            await store.faults.hold_writes()
            began = trio.current_time()
            async with trio.open_nursery() as call:  # noqa: ASYNC112 (another task: this one holds the lock)
                call.start_soon(within_the_budget, 3)
            assert returned == [5.0]
            assert await stored() == ["call_1", "call_2"]  # not yet: the store holds it
            store.faults.release_writes()
            await trio.sleep(3)
            assert (await stored(), records.kept) == (["call_1", "call_2", "call_3"], 0)
            # Written twice (a write whose answer was lost, then again): one row.
            await records.record_llm_call(rec(3))
            assert await stored() == ["call_1", "call_2", "call_3"]
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()
