"""The PostgreSQL store keeps the contract where it differed (found by a review; each test
failed before its fix): cursors past 2**31, NUL in text, the URL's own libpq options, a
malformed URL's password, one NOTIFY per commit batch, and a batch that fails as a whole. The
store is reached through its interface and ``store.faults`` only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from service.errors import StoreError, StoreUnavailable
from service.store import MessageStatus, RunEvent, make_store, open_store
from service.store.faults import InjectedFault


async def _run(store: Any) -> Any:
    conv = await store.create_conversation()
    return await store.begin_run(conv.id, content="q", agent="chat", model=None)


# -- SQL that differs from SQLite's ------------------------------------------------------------

async def test_a_cursor_past_2_to_the_31_reads_as_on_sqlite(pg_url: str, tmp_path: Path) -> None:
    # The API accepts any event id below 2**63 (?after=, Last-Event-ID); a reader's store read
    # is ``list_events_of_runs`` (BatchedReads). SQLite answers "nothing after it"; PostgreSQL
    # cast the cursors to int[] and failed "integer out of range".
    after = 2**31
    answers = {}
    for name, db in (("sqlite", tmp_path / "s.db"), ("postgres", pg_url)):
        async with open_store(db) as store:
            begun = await _run(store)
            got = await store.list_events_of_runs({begun.run.id: after})
            answers[name] = {k == begun.run.id: v for k, v in got.items()}
    assert answers["postgres"] == answers["sqlite"] == {True: []}


async def test_a_nul_character_in_a_message_is_stored_as_on_sqlite(
    pg_url: str, tmp_path: Path,
) -> None:
    # Valid JSON ("\u0000") in a message's content: SQLite stores it; PostgreSQL's text cannot
    # hold it and the write failed StoreError (a 500) - for a model's reply, on every retry.
    content = "before\x00after"
    stored = {}
    for name, db in (("sqlite", tmp_path / "s.db"), ("postgres", pg_url)):
        async with open_store(db) as store:
            conv = await store.create_conversation()
            await store.append_message(conv.id, role="user", content=content)
            stored[name] = [m.content for m in await store.get_messages(conv.id)]
    assert stored["postgres"] == stored["sqlite"]


# -- the URL: "any libpq URL" ------------------------------------------------------------------

async def test_the_urls_own_options_are_kept(pg_url: str) -> None:
    # A libpq URL may carry ``options`` (here: the schema to use). The store's own
    # ``options=-c statement_timeout=...`` replaced them: its tables went to ``public``.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA svc")
    url = pg_url + "?options=-c%20search_path%3Dsvc"
    async with open_store(url) as store:
        await store.create_conversation(title="t")
    with psycopg.connect(pg_url) as conn:
        where = {r[0] for r in conn.execute(
            "SELECT schemaname FROM pg_tables WHERE tablename = 'conversations'")}
    assert where == {"svc"}


@pytest.mark.parametrize("password", ["S3cret Pw", "S3cret%ZZPw"])
async def test_a_malformed_url_never_shows_its_password(password: str) -> None:
    # A URL libpq cannot parse (an unencoded space, a bad %-escape in the password): the name
    # the store goes by (logs, repr, errors) and its error at open showed the password.
    url = f"postgresql://svc:{password}@127.0.0.1:1/svc"
    store = make_store(url)
    shown = [store.url, repr(store)]
    with trio.fail_after(20), pytest.raises(StoreError) as caught:
        await store.open()
    shown.append(str(caught.value))
    secret = password.split("%")[0].split(" ")[0]  # "S3cret": any part of it
    assert not [s for s in shown if secret in s], shown


# -- LISTEN/NOTIFY -----------------------------------------------------------------------------

class _Heard:
    """What a store's ``listen`` delivered, and a way to wait for a payload."""

    def __init__(self) -> None:
        self.payloads: list[str] = []
        self._got = trio.Event()

    def wake(self, payload: str) -> None:
        self.payloads.append(payload)
        self._got.set()

    async def until(self, payload: str, seconds: float = 20) -> None:
        """Until a notification carries ``payload`` (alone or among others of its commit)."""
        with trio.fail_after(seconds):
            while not any(payload in p.split(",") for p in self.payloads):
                await self._got.wait()
                self._got = trio.Event()


async def test_one_commit_batch_sends_at_most_one_notify(pg_url: str) -> None:
    # The contract: at most one NOTIFY per commit batch. Each write of a batch sent its own
    # (finish_run, append_run_events, recover_interrupted...): N writes, N notifications.
    heard = _Heard()
    async with open_store(pg_url) as a, open_store(pg_url) as b, trio.open_nursery() as n:
        n.start_soon(b.listen, heard.wake)
        await heard.until("*")
        runs = [await _run(a) for _ in range(3)]
        sentinel = await _run(a)
        heard.payloads.clear()

        async def finish(begun: Any) -> None:
            assert await a.finish_run(
                begun.run.id, status="succeeded", message_id=begun.reply.id, content="x",
                message_status=MessageStatus.complete, error=None, usage={})

        async with a.faults.writes_held():
            n.start_soon(finish, runs[0])
            n.start_soon(finish, runs[1])
            n.start_soon(a.append_run_events,
                         [RunEvent(runs[2].run.id, 2, "token", {"text": "t"}, 0.0)])
            with trio.fail_after(10):
                while a.faults.queued_writes < 3:  # noqa: ASYNC110 (a counter)
                    await trio.sleep(0.01)
        # A later write (it may join the same batch): notifications come in commit order, so
        # once it is heard, everything the batch sent has been heard too.
        # (A write of the group commit's: a cancel runs on its own, in no batch's order.)
        await a.append_run_events([RunEvent(sentinel.run.id, 2, "token", {"text": "s"}, 0.0)])
        mark = sentinel.run.id
        await heard.until(mark)
        upto = next(i for i, p in enumerate(heard.payloads) if mark in p.split(","))
        batch = [p for p in heard.payloads[:upto + 1]
                 if {r.run.id for r in runs} & set(p.split(","))]
        assert len(batch) == 1, batch
        assert {r.run.id for r in runs} <= set(batch[0].split(","))
        n.cancel_scope.cancel()


# -- group commit ------------------------------------------------------------------------------

async def test_a_batch_that_fails_as_a_whole_fails_every_write_in_it(pg_url: str) -> None:
    # Anything raised by a batch beyond its transaction (here the injected fault before its
    # thread starts; in production trio failing to start the thread) reached only the task
    # that took the batch, unwrapped; the other writes of the batch had no error set and
    # were answered as done: acknowledged, never stored.
    async with open_store(pg_url) as store:
        results: dict[int, Any] = {}

        async def create(i: int) -> None:
            try:
                results[i] = await store.create_conversation(title=str(i))
            except Exception as exc:
                results[i] = exc

        async def fail() -> None:
            raise InjectedFault("the batch could not start")

        async with trio.open_nursery() as n, store.faults.writes_held():
            n.start_soon(create, 1)
            n.start_soon(create, 2)
            with trio.fail_after(10):
                while store.faults.queued_writes < 2:  # noqa: ASYNC110 (a counter)
                    await trio.sleep(0.01)
            store.faults.before_batch = fail
        store.faults.clear()
        acknowledged = [r for r in results.values() if not isinstance(r, Exception)]
        for conv in acknowledged:  # what a write says it did, it did
            await store.get_conversation(conv.id)
        assert all(isinstance(r, StoreUnavailable) for r in results.values()), results


async def test_password_given_as_a_query_parameter_is_scrubbed_from_a_malformed_url() -> None:
    """libpq takes the password from the URL's query too (``?password=``). A malformed escape
    there is echoed by libpq ("invalid percent-encoded token: ...") and ``_secrets`` only
    knows the user-information form, so the password reaches the start-up error (stderr,
    logs) in clear."""
    secret = "S3cr3t-Pw"
    store = make_store(f"postgresql://app@127.0.0.1:1/db?password={secret}%zz")
    with pytest.raises(StoreError) as caught:
        await store.open()
    assert secret not in str(caught.value), str(caught.value)
