"""What the service asks of a store: the :class:`Store` protocol every caller types against.

Two stores implement it: :class:`~service.store.sqlite.SQLiteStore` (one file, WAL) and
:class:`~service.store.postgres.PostgresStore` (PostgreSQL through psycopg 3). They keep the
same promises, which callers rely on:

* **Acknowledged means durable**: a write returns once its transaction has committed.
* **Writes land in call order**: a write joins the store's queue before its first checkpoint,
  so a write called after another lands after it (``RunSupervisor._start_new`` relies on it).
  Not PostgreSQL's ``request_cancel``: it runs on its own, outside the queue (it may wait on
  another instance's lock, which in a shared batch held every write behind it).
* **Group commit**: writes queued behind a busy writer go together in one transaction, each in
  its own SAVEPOINT (one failing write does not undo the others).
* **Cancellation**: a write cancelled while still queued never lands; once taken into a
  transaction it lands whole (or not at all) and its caller gets its answer.
* **Errors**: :class:`~service.errors.StoreUnavailable` (503, worth a retry: a full volume, a
  database away, a timeout) or :class:`~service.errors.StoreError`; ``NotFound`` for a missing
  id. ``write_error`` says why the latest write transaction failed, None once one committed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol

from .records import (
    BegunRun,
    Conversation,
    LLMCallRecord,
    Message,
    MessageStatus,
    RunEvent,
    RunRecord,
)

__all__ = ["Store"]


class Store(Protocol):
    """Conversations, messages, runs, run events and LLM calls, durably."""

    # How this process tags the runs it runs (``ownership.process_tag``).
    process_id: str
    # Why the latest write transaction failed; None once one has committed since (``/readyz``).
    write_error: str | None
    # Whether other instances judge this one's runs by its lease alone (PostgreSQL: other
    # hosts), its renewals then landing or failing within a third of a lease; False where a
    # process on the same host is judged by its PID (SQLite: a renewal is a write of the queue,
    # and a disk slow for a while must not stop the runs of a live process).
    leases_decide: bool

    # -- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, create or migrate the schema (refusing a newer one); StoreError if not."""
        ...

    async def aclose(self) -> None:
        """Wait for writes in flight, then close. Safe to call twice."""
        ...

    async def __aenter__(self) -> Store: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def maintain(self) -> None:
        """Periodic upkeep (the supervisor calls it every few seconds): SQLite copies its WAL
        into the database file; PostgreSQL has none to do (its server does its own)."""
        ...

    async def ping(self) -> None:
        """Raise StoreError unless the store answers a trivial query."""
        ...

    async def probe_write(self) -> None:
        """Raise StoreError unless the store can commit a write now."""
        ...

    # -- conversations and messages -------------------------------------------------------------

    async def create_conversation(
        self, *, title: str | None = None, system: str | None = None, model: str | None = None,
        agent: str | None = None, owner: str | None = None,
    ) -> Conversation: ...

    async def get_conversation(
        self, conversation_id: str, *, owner: str | None = None
    ) -> Conversation: ...

    async def list_conversations(
        self, *, owner: str | None = None, limit: int = 20, before: str | None = None
    ) -> tuple[list[Conversation], str | None]:
        """Newest first; the page and the cursor of the next page (or None)."""
        ...

    async def delete_conversation(
        self, conversation_id: str, *, owner: str | None = None
    ) -> None: ...

    async def append_message(
        self, conversation_id: str, *, role: str, content: str,
        status: MessageStatus = MessageStatus.complete, run_id: str | None = None,
    ) -> Message: ...

    async def append_messages(
        self, conversation_id: str,
        items: Iterable[tuple[str, str, MessageStatus, str | None]],
    ) -> list[Message]: ...

    async def get_messages(self, conversation_id: str) -> list[Message]: ...

    async def message_page(
        self, conversation_id: str, *, limit: int, before: str | None = None
    ) -> tuple[list[Message], str | None]:
        """The newest ``limit`` messages before the cursor ``before`` (none: the newest of
        all), oldest first, and the cursor of the older ones (None: there are none).
        ``ValueError`` for a cursor that is not one."""
        ...

    # -- runs and their events ------------------------------------------------------------------

    async def begin_run(
        self, conversation_id: str, *, content: str, agent: str | None, model: str | None,
        owner: str | None = None, default_model: str | None = None, run_id: str | None = None,
        history_chars: int | None = None, idempotency_key: str | None = None,
    ) -> BegunRun:
        """Everything a run on an existing conversation needs to start, in one transaction;
        of its earlier messages, only the newest its history can keep when ``history_chars``
        (SERVICE_HISTORY_CHARS) is given (``records.newest_history``). A run begun on the
        conversation with ``idempotency_key`` already: ``AlreadyBegun``, nothing written."""
        ...

    async def run_of_key(self, conversation_id: str, key: str, *, owner: str | None = None
                         ) -> tuple[str, str | None] | None:
        """The run begun on the (owner's) conversation with ``idempotency_key`` ``key`` and
        holding it, with the content it was asked with; None if there is none."""
        ...

    def plan_run(
        self, *, content: str, agent: str | None, model: str | None, owner: str | None = None,
        new_conversation: dict[str, str | None] | None = None,
        default_model: str | None = None,
    ) -> BegunRun:
        """The records of a run on a new conversation, without writing them (sync, no I/O)."""
        ...

    async def write_run(self, begun: BegunRun) -> None:
        """Store a run from :meth:`plan_run` in one transaction. The write joins the store's
        queue before the caller's first checkpoint (``RunSupervisor._start_new`` relies on it:
        the run's task is spawned just before, and its writes must land after this one)."""
        ...

    async def finish_run(
        self, run_id: str, *, status: str, message_id: str, content: str,
        message_status: MessageStatus, error: str | None, usage: dict[str, Any],
        events: Sequence[RunEvent] = (), finished_at: float | None = None,
        model: str | None = None,
    ) -> bool:
        """The run's final status, its reply's text and its last events, in one transaction,
        the run ending at ``finished_at`` (default: now; its clients are told that time), if
        this process still holds the run; False (nothing written) if another instance
        closed it meanwhile (this one's lease had lapsed) or it is gone. ``model``: the model
        that answered, stored only where the run named none."""
        ...

    async def recover_interrupted(self, run_id: str | None = None, *,
                                  abandoned: bool = False) -> list[str]:
        """Close runs left in progress by a process that is gone; the ids closed.
        ``abandoned``: ``run_id`` is this process's own, whose start it answered as failed
        (its first write's COMMIT was lost, so it may have landed): closed if it did."""
        ...

    async def get_run(self, run_id: str, *, owner: str | None = None) -> RunRecord: ...

    async def run_in_progress(self, run_id: str) -> Literal["here", "elsewhere"] | None:
        """Where a run in progress runs: this process, another live one, or None."""
        ...

    async def runs_in_progress(self, conversation_id: str) -> list[str]: ...

    async def listen(self, wake: Callable[[str], None]) -> None:
        """Until cancelled: ``wake(payload)`` for what other instances committed (run ids
        comma-separated, ``cancel:<run id>``, ``*``: anything, read again, since notifications
        now come; ``!``: they stopped coming, poll). A store without notifications never calls
        it."""

    async def renew_lease(self, seconds: float) -> None:
        """This process is alive for ``seconds`` more (``ownership``: a run's owner lives while
        its lease does)."""

    async def end_lease(self) -> None:
        """This process stops: its lease ends now."""

    async def request_cancel(self, run_id: str, reason: str) -> bool: ...

    async def cancel_requests(self) -> list[tuple[str, str]]: ...

    async def runs_missing(self, run_ids: Sequence[str]) -> list[str]:
        """Of ``run_ids``, those the store has no row of: deleted with their conversation
        (on another worker or instance) while this process runs them."""

    async def prune_events(self, finished_before: float, rows: int = 5000) -> int: ...

    async def append_run_events(
        self, events: Sequence[RunEvent], *, retry: bool = False
    ) -> set[str]:
        """A batch of events in one transaction; ``retry``: skip those stored already. Only
        events of runs this process holds are written: returns the ids of the other runs
        (closed by another instance, or gone), whose events were dropped."""
        ...

    async def list_run_events(
        self, run_id: str, *, after: int = 0, limit: int = 10_000, max_chars: int | None = None
    ) -> list[RunEvent]:
        """The run's events after ``after``, in order: at most ``limit``, and none after the
        one whose JSON (``raw``) takes their total past ``max_chars`` characters."""
        ...

    async def list_events_of_runs(
        self, cursors: Mapping[str, int], *, limit: int = 10_000, max_chars: int | None = None
    ) -> dict[str, list[RunEvent]]:
        """``list_run_events`` for several runs in one read: run id -> its events after its
        cursor (every run asked for is a key; the bounds are each run's)."""
        ...

    # -- LLM calls ------------------------------------------------------------------------------

    async def record_llm_call(self, rec: LLMCallRecord) -> None: ...

    async def list_llm_calls(
        self, *, run_id: str | None = None, limit: int = 50, owner: str | None = None
    ) -> list[LLMCallRecord]: ...
