"""Review of the latest changes (2026-12-06, f): PostgreSQL's cancel and delete outside the group
commit (e38d342), and the chat page (9c0e483, bd4e9d4, ac4deaf, 272be7e, 228363c).

Each test fails on the code it was written against, for the reason its docstring gives.
PostgreSQL: the session's real server (tests/pg.py, ``pg_url``: a fresh database per test).
Browser: Debian's chromium through Playwright (tests/clients/test_chat_page.py's helpers), the
real app on port 0 with the simulator behind it (tests/e2e.py).
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import psycopg
import pytest
import trio

from service.errors import NotFound, StoreError, StoreUnavailable
from service.metrics import Metrics
from service.settings import Settings
from service.sim.scenario import Reply as SimReply
from service.store import RunEvent, open_store
from service.store.faults import InjectedFault

from .clients.test_chat_page import CHROMIUM, ROOT, _in_browser, _send
from .e2e import e2e
from .pg import slow_token_trigger

GUARD = 60  # seconds: hang guards only


def _pg(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql, args or None)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


# -- PostgreSQL: a cancel and a delete outside the group commit ---------------------------------


@pytest.mark.parametrize("write", ["request_cancel", "delete_conversation"])
async def test_pg_a_cancel_or_delete_whose_commit_fails_is_the_stores_write_error(
    pg_url: str, write: str,
) -> None:
    """``Store.write_error`` says why the latest write transaction failed (base.py; /readyz
    probes a write again at once when it is set, and otherwise trusts a probe up to 1 s old).
    A cancel or a delete whose COMMIT fails (the fault hook's failed COMMIT, as a database
    refusing writes) left it None: ``_write_alone`` maps the error but never records it, and
    never clears it once such a write commits either. A group-committed write that fails the
    same way sets it (checked first)."""
    async with open_store(pg_url) as store:
        conv = await store.create_conversation(title="t")
        begun = await store.begin_run(conv.id, content="hi", agent=None, model="m")

        def fail() -> None:
            raise InjectedFault("the volume is full")

        store.faults.before_commit = fail
        with pytest.raises(StoreUnavailable):  # a batch's failure is recorded
            await store.create_conversation(title="u")
        assert store.write_error is not None
        store.faults.before_commit = None
        await store.create_conversation(title="v")
        assert store.write_error is None  # cleared by a commit

        store.faults.before_commit = fail
        if write == "request_cancel":
            call = partial(store.request_cancel, begun.run.id, "cancelled by request")
        else:
            call = partial(store.delete_conversation, conv.id)
        with pytest.raises(StoreUnavailable):
            await call()
        assert store.write_error is not None, (
            f"{write}'s failed COMMIT is not the store's write_error")


_SLOW_TOKEN = slow_token_trigger(2)


async def test_pg_a_delete_does_not_deadlock_with_its_own_instances_batch(
    pg_url: str,
) -> None:
    """One instance. Its group commit takes a batch: a run's token events (their insert holds
    the run's row, FOR SHARE: the fence), then a message on the same conversation (another
    tab's). Meanwhile the conversation is deleted on the same instance. Outside the group
    commit (``_write_alone``), the delete locks the conversation's row (FOR UPDATE) and then
    waits for the run's row, held by the batch, while the batch's message waits for the
    conversation's row: a deadlock PostgreSQL ends by failing one of them (the delete: a
    503). In the group commit (before e38d342) the delete went after the batch, and both
    landed. Correct: the delete succeeds; the message either landed before it (then deleted
    with the conversation) or finds the conversation gone (NotFound)."""
    async with open_store(pg_url) as store:
        conv = await store.create_conversation(title="t")
        begun = await store.begin_run(conv.id, content="hi", agent=None, model="m")
        run_id = begun.run.id
        _pg(pg_url, _SLOW_TOKEN)
        out: dict[str, object] = {}

        async def events() -> None:
            try:
                out["events"] = await store.append_run_events(
                    [RunEvent(run_id, 2, "token", {"text": "slow"}, time.time())])
            except StoreError as exc:
                out["events"] = exc

        async def message() -> None:
            try:
                out["message"] = await store.append_message(conv.id, role="user",
                                                             content="from another tab")
            except StoreError as exc:
                out["message"] = exc

        async def delete() -> None:
            try:
                out["delete"] = await store.delete_conversation(conv.id)
            except StoreError as exc:
                out["delete"] = exc

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                async with store.faults.writes_held():  # the two go in one batch, in order
                    nursery.start_soon(events)
                    while store.faults.queued_writes < 1:  # noqa: ASYNC110
                        await trio.sleep(0.005)
                    nursery.start_soon(message)
                    while store.faults.queued_writes < 2:  # noqa: ASYNC110
                        await trio.sleep(0.005)
                # The batch is in its token insert (the run's row held): the delete now.
                while not _pg(pg_url, "SELECT 1 FROM pg_stat_activity WHERE query LIKE "  # noqa: ASYNC110
                              "'%%INSERT INTO run_events%%' AND wait_event = 'PgSleep'"):
                    await trio.sleep(0.01)
                nursery.start_soon(delete)
        deleted = out["delete"]
        assert not isinstance(deleted, StoreError), f"the delete failed: {deleted!r}"
        assert not isinstance(out["events"], StoreError), out
        assert not isinstance(out["message"], StoreError) or isinstance(
            out["message"], NotFound), out


# -- the chat page --------------------------------------------------------------------------------

playwright = pytest.importorskip("playwright.sync_api")
expect = playwright.expect
_browser_only = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")


def _holder(nursery: trio.Nursery, store: Any, releases: list[Any]) -> Any:
    """From the browser's thread: hold the store's writes (as a batch in progress does) until
    the returned function is called (each hold its own; all let go at the test's end)."""
    def hold() -> Any:
        held, let_go = trio.Event(), trio.Event()

        async def holding() -> None:
            async with store.faults.writes_held():
                held.set()
                await let_go.wait()

        trio.from_thread.run_sync(nursery.start_soon, holding)
        trio.from_thread.run(held.wait)
        releases.append(let_go.set)
        return lambda: trio.from_thread.run_sync(let_go.set)

    return hold


def _early_stop_then_reload_session(url: str, hold: Any, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    _send(page, "hello")  # the conversation exists (its creation is a write too)
    expect(page.get_by_test_id("stop")).to_be_hidden()
    release_begin = hold()  # the run's first write cannot land: its id is not known yet
    page.get_by_test_id("message-input").fill("slow please")
    page.get_by_test_id("send").click()
    page.get_by_test_id("stop").click()  # "starting": sent once run.started comes
    ends: list[Any] = []

    def on_cancel(route: Any) -> None:
        ends.append(hold())  # the run's end cannot land before the reload
        route.continue_()

    page.route("**/cancel", on_cancel)
    with page.expect_response("**/cancel"):
        release_begin()
    page.reload()  # before run.finished came
    expect(page.get_by_test_id("stop")).to_be_visible()  # re-joined, its end not landed yet
    ends[0]()
    expect(page.get_by_test_id("stop")).to_be_hidden()
    answers = page.get_by_test_id("assistant-message")
    return {"notes": answers.last.locator(".note").all_inner_texts()}


@_browser_only
async def test_a_stop_clicked_before_the_run_is_known_is_kept_across_a_reload(
    settings: Settings,
) -> None:
    """272be7e keeps the page's own Stop for a reload (``kept.live.stopped``), but only when
    ``kept.live`` is already the run's. A Stop clicked while the message is still being sent
    (the run not known: ``stopPending``) is sent from ``follow``'s run.started, before that
    frame's ``keep(live)``: ``kept.live`` is still null, the flag is never set, and the live
    entry written next (and at pagehide) has none. A reload before the run's end then said
    "stopped elsewhere (another client cancelled it)" of the user's own Stop."""
    releases: list[Any] = []
    with trio.fail_after(GUARD * 2):
        async with e2e(settings, "llamacpp") as env, trio.open_nursery() as nursery:
            env.sim.script("hello back", SimReply(text="tick " * 400, interval=0.05))
            hold = _holder(nursery, env.server.services.require_store(), releases)
            try:
                seen = await _in_browser(partial(_early_stop_then_reload_session,
                                                 env.server.url, hold))
            finally:
                for let_go in releases:
                    let_go()
    assert seen["notes"] == ["stopped"], seen


_CELLS = {
    # a <br> typed inside a code span in a cell is code, shown as typed (as GitHub does)
    "| a |\n|---|\n| `x<br>y` |": ('<div class="table"><table><thead><tr><th dir="auto">a</th>'
                                   '</tr></thead><tbody><tr><td dir="auto"><code>x&lt;br&gt;y'
                                   '</code></td></tr></tbody></table></div>'),
}


def _rendered(page: Any) -> dict[str, str]:
    page.set_content("<div id=out></div>")
    source = (ROOT / "service" / "web" / "markdown.js").read_text()
    return dict(zip(_CELLS, page.evaluate(
        "([src, texts]) => import('data:text/javascript,' + encodeURIComponent(src))"
        ".then((m) => texts.map((t) => m.renderMarkdown(t)))", [source, list(_CELLS)]),
        strict=True))


@_browser_only
async def test_a_br_in_a_code_span_of_a_table_cell_stays_code() -> None:
    """ac4deaf turns ``<br>`` in a table cell into a line break by replacing its escaped form
    in the cell's whole inline HTML, code spans included: `` `x<br>y` `` in a cell showed a
    line break inside the code instead of the ``<br>`` typed (code is shown as typed
    everywhere else, and in GitHub's tables)."""
    seen = await _in_browser(_rendered)
    assert seen == _CELLS


async def test_pg_cancels_waiting_on_another_instances_batch_leave_reads_a_thread(
    pg_url: str,
) -> None:
    """Instance B's batch holds its runs' rows (the fence) for a while (a slow statement: a
    token insert slowed to 3 s here). Instance A is asked to cancel as many of B's runs as its
    pool has connections (several users pressing Stop). Each cancel now runs alone
    (``_write_alone``), holding one of A's threads and pooled connections while it waits on
    B's rows: every one is taken, and A's next read (any page, any re-join) waits
    ``acquire_timeout`` and fails 503 "every one busy". In the group commit (before e38d342)
    the cancels waited in one batch, on one thread, and reads went on. Correct: a read that
    touches none of the held rows answers."""
    async with open_store(pg_url, pool_size=2, acquire_timeout=1.0,
                          process_id="instance-a") as a, \
            open_store(pg_url, process_id="instance-b") as b:
        conv = await a.create_conversation(title="t")
        runs = [(await b.begin_run(conv.id, content=f"q{i}", agent=None, model="m")).run.id
                for i in range(2)]
        _pg(pg_url, slow_token_trigger(3))
        out: dict[str, object] = {}

        async def b_events() -> None:  # B's batch: both runs' rows held for 3 s
            out["events"] = await b.append_run_events(
                [RunEvent(r, 2, "token", {"text": "slow"}, time.time()) for r in runs])

        async def cancel(run_id: str) -> None:
            try:
                out[run_id] = await a.request_cancel(run_id, "cancelled by request")
            except StoreError as exc:
                out[run_id] = exc

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(b_events)
                while not _pg(pg_url, "SELECT 1 FROM pg_stat_activity WHERE "  # noqa: ASYNC110
                              "wait_event = 'PgSleep'"):
                    await trio.sleep(0.01)
                for r in runs:
                    nursery.start_soon(cancel, r)
                # The cancels waiting on B's rows (alone: in their own transactions, or in
                # line for one; in the group commit: both in one batch).
                while not _pg(pg_url, "SELECT 1 FROM pg_stat_activity WHERE query "  # noqa: ASYNC110
                              "LIKE 'UPDATE runs SET cancel_requested%%' AND "
                              "wait_event_type = 'Lock'"):
                    await trio.sleep(0.01)
                try:
                    out["read"] = (await a.get_conversation(conv.id)).id
                except StoreError as exc:
                    out["read"] = exc
        assert out["read"] == conv.id, f"A's read while its cancels wait: {out['read']!r}"
        assert out[runs[0]] is True, out
        assert out[runs[1]] is True, out


async def test_pg_a_failed_cancel_is_counted_in_the_store_latency_metric(
    pg_url: str,
) -> None:
    """``service_store_seconds{op=...}`` counts every write, a failed one too (``_write`` on
    both stores, ``_lease_write``: "those matter most"); SQLite's cancel still does. A cancel
    run alone on PostgreSQL (``_write_alone``) is counted only when it succeeds: a cancel
    failing for 30 s (a statement timeout on a held row) is invisible in the metric."""
    metrics = Metrics()
    count = partial(metrics.registry.get_sample_value, "service_store_seconds_count",
                    {"op": "request_cancel"})
    async with open_store(pg_url, metrics=metrics) as store:
        conv = await store.create_conversation(title="t")
        begun = await store.begin_run(conv.id, content="hi", agent=None, model="m")
        await store.request_cancel(begun.run.id, "cancelled by request")
        assert count() == 1
        begun = await store.begin_run(conv.id, content="again", agent=None, model="m")

        def fail() -> None:
            raise InjectedFault("the volume is full")

        store.faults.before_commit = fail
        with pytest.raises(StoreUnavailable):
            await store.request_cancel(begun.run.id, "cancelled by request")
        assert count() == 2, "the failed cancel was not counted"
