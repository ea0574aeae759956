"""Wake-ups across instances (issue 14, item 3): LISTEN/NOTIFY on PostgreSQL, ids only."""

from __future__ import annotations

import trio
import trio.testing

from service.runs.wakeups import Wakeups
from service.store import RunEvent, open_store

from ..pg import PostgresServer, pg_url, postgres  # noqa: F401 (fixtures)


async def test_a_waiter_is_woken_by_its_run_and_otherwise_waits_its_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    w = Wakeups()
    woken: list[bool] = []

    async def wait(run_id: str) -> None:
        woken.append(await w.wait_run(run_id, 1.0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, "run_a")
        nursery.start_soon(wait, "run_b")
        await trio.sleep(0.25)
        w.notified("run_a,run_c")
    assert sorted(woken) == [False, True]
    assert trio.current_time() == 1.0  # run_b waited its whole interval
    assert repr(w) == "<Wakeups [0 runs waited on]>"  # nothing kept once nobody waits
    async with trio.open_nursery() as nursery:
        nursery.start_soon(w.wait_cancels, 60.0)
        nursery.start_soon(wait, "run_d")
        await trio.sleep(0.1)
        w.notified("*")  # the listener came back: every waiter reads again
    assert trio.current_time() < 1.2


async def test_marks_tell_whether_a_run_was_announced_since_a_read_began(
    autojump_clock: trio.testing.MockClock,
) -> None:
    w = Wakeups()
    assert w.since("run_a", w.mark())  # nothing is announced yet: "maybe"
    assert w.since("run_a", None)
    w.notified("*")  # the listener is up
    mark = w.mark()
    assert not w.since("run_a", mark)
    w.notified("run_a,run_b")
    assert w.since("run_a", mark)
    assert w.since("run_b", mark)
    assert not w.since("run_c", mark)
    later = w.mark()
    assert not w.since("run_a", later)
    assert await w.wait_run("run_a", 5.0, since=mark)  # announced during the read: at once
    assert trio.current_time() == 0.0
    assert not await w.wait_run("run_a", 5.0, since=later)
    assert trio.current_time() == 5.0
    w.notified("!")  # the listener is lost: marks say "maybe" until it is back
    lost = w.mark()
    assert w.since("run_c", later)
    assert w.since("run_c", lost)
    assert not await w.wait_run("run_c", 5.0, since=lost)  # a poll, not a spin
    assert trio.current_time() == 10.0
    w.notified("*")  # back: a mark taken while it was lost says "read again"
    assert w.since("run_c", lost)
    assert await w.wait_run("run_c", 5.0, since=lost)
    assert trio.current_time() == 10.0
    mark = w.mark()
    for i in range(10_001):  # the runs remembered are bounded; the forgotten read again
        w.notified(f"run_{i}")
    assert w.since("run_never_announced", mark)
    assert not w.since("run_never_announced", w.mark())


async def test_a_cancel_announced_while_the_last_look_ran_is_not_waited_for(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Found measuring: a cancel announced while the loop read the cancel requests set an
    # event nobody waited on, and the loop then slept its whole poll (0.25 s) before it
    # looked again.
    w = Wakeups()
    looked = w.cancels_announced
    w.notified("cancel:run_x")  # during the look
    await w.wait_cancels(5.0, since=looked)
    assert trio.current_time() == 0.0
    await w.wait_cancels(5.0, since=w.cancels_announced)
    assert trio.current_time() == 5.0


async def test_one_notification_carries_a_batchs_runs_and_cancels(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A commit batch sends one notification for all its writes: run ids and cancels mixed.
    w = Wakeups()
    w.notified("*")
    mark, looked = w.mark(), w.cancels_announced
    w.notified("cancel:run_x,run_a,run_b")
    assert w.cancels_announced == looked + 1
    assert w.since("run_a", mark)
    assert w.since("run_b", mark)
    assert not w.since("run_x", mark)  # asked to cancel, nothing of it committed
    mark = w.mark()
    w.notified("cancel:run_y,cancel:run_z")  # cancels only: no run announced
    assert w.cancels_announced == looked + 2
    assert w.mark() == mark


async def test_one_instances_commits_and_cancels_wake_another(
    pg_url: str, postgres: PostgresServer,  # noqa: F811 (fixtures)
) -> None:
    heard: list[str] = []
    got = trio.Event()

    def wake(payload: str) -> None:
        heard.append(payload)
        got.set()

    async with open_store(pg_url) as a, open_store(pg_url) as b, trio.open_nursery() as nursery:
        nursery.start_soon(b.listen, wake)
        with trio.fail_after(20):
            while "*" not in heard:  # listening (a first "*": read everything)
                await got.wait()
                got = trio.Event()
        conv = await a.create_conversation()
        run, *_ = await a.begin_run(conv.id, content="q", agent="chat", model=None)
        await a.append_run_events([RunEvent(run.id, 2, "token", {"text": "x"}, 0.0)])
        with trio.fail_after(20):
            while run.id not in heard:
                await got.wait()
                got = trio.Event()
        assert await a.request_cancel(run.id, "cancelled by request")
        with trio.fail_after(20):
            while f"cancel:{run.id}" not in heard:
                await got.wait()
                got = trio.Event()
        # The database restarted: the listener comes back and says "read everything".
        heard.clear()
        await trio.to_thread.run_sync(postgres.stop, "fast")
        await trio.to_thread.run_sync(postgres.start)
        with trio.fail_after(30):
            while "*" not in heard:
                await got.wait()
                got = trio.Event()
        assert heard.index("!") < heard.index("*")  # lost (readers poll), then back
        nursery.cancel_scope.cancel()
