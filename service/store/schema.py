"""The store's schema, as forward migrations: SQLite's keyed by ``PRAGMA user_version``,
PostgreSQL's by the row of its ``schema_version`` table.

Migration N (1-based) takes a database at version N-1 to version N. Never edit a released
migration: append a new one. PostgreSQL's list started later (at SQLite's version 5), so its
first migration is the whole of SQLite's five; the two lists number their versions apart.
"""

from __future__ import annotations

__all__ = ["MIGRATIONS", "PG_MIGRATIONS", "PG_SCHEMA_VERSION", "SCHEMA_VERSION"]

# The calls recorded without an owner by an older instance, since the owner column came.
_FILL_OWNERS = ("UPDATE llm_calls SET owner = (SELECT owner FROM runs WHERE runs.id = "
                "llm_calls.run_id) WHERE owner IS NULL AND run_id IS NOT NULL")

# A run's Idempotency-Key, one run per key and conversation (both stores' dialects). A run
# holds its key while it goes on and once it has answered; one that ended without its answer
# (failed, cancelled, timed out: a client's lost connection, a shutdown, its instance's death)
# lets it go, whatever ended it, so that the retry that end invites asks the question anew.
_IDEMPOTENCY = (
    "ALTER TABLE runs ADD COLUMN idempotency_key TEXT",
    "CREATE UNIQUE INDEX runs_idempotency ON runs(conversation_id, idempotency_key) "
    "WHERE idempotency_key IS NOT NULL",
)
_UNANSWERED = "('failed', 'cancelled', 'timed_out')"

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: conversations, messages, runs, run events, LLM calls.
    (
        """
        CREATE TABLE conversations (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            owner TEXT,
            title TEXT,
            system TEXT,
            model TEXT,
            agent TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )
        """,
        "CREATE INDEX conversations_owner ON conversations(owner, seq)",
        """
        CREATE TABLE messages (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
            content TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('pending', 'complete', 'cancelled', 'error')),
            run_id TEXT,
            error TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )
        """,
        "CREATE INDEX messages_conversation ON messages(conversation_id, seq)",
        """
        CREATE TABLE runs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            owner TEXT,
            agent TEXT NOT NULL,
            model TEXT,
            status TEXT NOT NULL CHECK (status IN
                ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'timed_out')),
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            error TEXT,
            usage TEXT NOT NULL DEFAULT '{}'
        )
        """,
        "CREATE INDEX runs_conversation ON runs(conversation_id, seq)",
        """
        CREATE TABLE run_events (
            run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            type TEXT NOT NULL,
            data TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (run_id, seq)
        ) WITHOUT ROWID
        """,
        """
        CREATE TABLE llm_calls (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            run_id TEXT,
            backend TEXT NOT NULL,
            model TEXT NOT NULL,
            outcome TEXT NOT NULL CHECK (outcome IN ('ok', 'error', 'cancelled', 'timed_out')),
            started_at REAL NOT NULL,
            queue_wait REAL,
            ttft REAL,
            duration REAL,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            tokens_estimated INTEGER NOT NULL DEFAULT 0,
            error TEXT
        )
        """,
        "CREATE INDEX llm_calls_run ON llm_calls(run_id, seq)",
    ),
    # 2: which process runs a run, so a restart can tell runs whose process died.
    (
        "ALTER TABLE runs ADD COLUMN process TEXT",
        "CREATE INDEX runs_live ON runs(status) WHERE status IN ('queued', 'running')",
    ),
    # 3: a cancel asked for by another worker process than the run's (its reason); the run's
    # own process polls for these.
    (
        "ALTER TABLE runs ADD COLUMN cancel_requested TEXT",
    ),
    # 4: the events of finished runs can be pruned (SERVICE_EVENTS_RETENTION_DAYS): which runs
    # are done, and the runs still to prune in the order they finished.
    (
        "ALTER TABLE runs ADD COLUMN events_pruned INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX runs_to_prune ON runs(finished_at) "
        "WHERE events_pruned = 0 AND finished_at IS NOT NULL",
    ),
    # 5: one row a probe rewrites to learn whether the store can write (``/readyz`` after a
    # write failed: a full volume, a database away).
    (
        "CREATE TABLE heartbeat (id INTEGER PRIMARY KEY CHECK (id = 1), at REAL NOT NULL)",
    ),
    # 6: every process's lease (``ownership``): an instance is alive until ``lease_until``.
    (
        "CREATE TABLE instances (id TEXT PRIMARY KEY, lease_until REAL NOT NULL, "
        "host TEXT, pid INTEGER)",
    ),
    # 7: a run's messages by its id (the recovery of a dead process's runs closes their
    # replies by run id: without it, a scan of every message per run, at every start after a
    # crash). PostgreSQL's schema has it from its first version.
    (
        "CREATE INDEX messages_run ON messages(run_id)",
    ),
    # 8: a conversation's latest change (a run's start and end, its place in the list): one
    # index lookup, where each was a scan of every message of the conversation.
    (
        "CREATE INDEX messages_changed ON messages(conversation_id, updated_at)",
    ),
    # 9: each LLM call's owner (its run's): one key's calls listed by an index, where the list
    # walked every other key's calls, newest first, to find its own.
    (
        "ALTER TABLE llm_calls ADD COLUMN owner TEXT",
        "UPDATE llm_calls SET owner = (SELECT owner FROM runs WHERE runs.id = llm_calls.run_id) "
        "WHERE run_id IS NOT NULL",
        "CREATE INDEX llm_calls_owner ON llm_calls(owner, seq)",
    ),
    # 10: a call recorded by an older instance still serving (a rolling upgrade: it writes no
    # owner) takes its run's, as 9 gave those before it: it was missing from its key's list.
    (
        _FILL_OWNERS,
        "CREATE TRIGGER llm_calls_owner_of_run AFTER INSERT ON llm_calls "
        "WHEN NEW.owner IS NULL AND NEW.run_id IS NOT NULL "
        "AND (SELECT owner FROM runs WHERE id = NEW.run_id) IS NOT NULL BEGIN "
        "UPDATE llm_calls SET owner = (SELECT owner FROM runs WHERE id = NEW.run_id) "
        "WHERE seq = NEW.seq; END",
    ),
    # 11: the Idempotency-Key a run was begun with (POST .../messages): a retried request
    # finds its run instead of beginning another.
    (
        *_IDEMPOTENCY,
        "CREATE TRIGGER runs_unanswered_key AFTER UPDATE OF status ON runs "
        f"WHEN NEW.idempotency_key IS NOT NULL AND NEW.status IN {_UNANSWERED} BEGIN "
        "UPDATE runs SET idempotency_key = NULL WHERE id = NEW.id; END",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)

# PostgreSQL: the same tables and indexes (times are float8 seconds, JSON is text as in SQLite:
# an event's JSON is stored and sent as it was encoded, once).
PG_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: SQLite's versions 1 to 5.
    (
        """
        CREATE TABLE conversations (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            owner TEXT,
            title TEXT,
            system TEXT,
            model TEXT,
            agent TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        )
        """,
        "CREATE INDEX conversations_owner ON conversations(owner, seq)",
        """
        CREATE TABLE messages (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
            content TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('pending', 'complete', 'cancelled', 'error')),
            run_id TEXT,
            error TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        )
        """,
        "CREATE INDEX messages_conversation ON messages(conversation_id, seq)",
        "CREATE INDEX messages_run ON messages(run_id)",
        """
        CREATE TABLE runs (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            owner TEXT,
            agent TEXT NOT NULL,
            model TEXT,
            status TEXT NOT NULL CHECK (status IN
                ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'timed_out')),
            created_at DOUBLE PRECISION NOT NULL,
            started_at DOUBLE PRECISION,
            finished_at DOUBLE PRECISION,
            error TEXT,
            usage TEXT NOT NULL DEFAULT '{}',
            process TEXT,
            cancel_requested TEXT,
            events_pruned INTEGER NOT NULL DEFAULT 0
        )
        """,
        "CREATE INDEX runs_conversation ON runs(conversation_id, seq)",
        "CREATE INDEX runs_live ON runs(status) WHERE status IN ('queued', 'running')",
        "CREATE INDEX runs_to_prune ON runs(finished_at) "
        "WHERE events_pruned = 0 AND finished_at IS NOT NULL",
        """
        CREATE TABLE run_events (
            run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            type TEXT NOT NULL,
            data TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (run_id, seq)
        )
        """,
        """
        CREATE TABLE llm_calls (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            run_id TEXT,
            backend TEXT NOT NULL,
            model TEXT NOT NULL,
            outcome TEXT NOT NULL CHECK (outcome IN ('ok', 'error', 'cancelled', 'timed_out')),
            started_at DOUBLE PRECISION NOT NULL,
            queue_wait DOUBLE PRECISION,
            ttft DOUBLE PRECISION,
            duration DOUBLE PRECISION,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            tokens_estimated INTEGER NOT NULL DEFAULT 0,
            error TEXT
        )
        """,
        "CREATE INDEX llm_calls_run ON llm_calls(run_id, seq)",
        """
        CREATE TABLE heartbeat (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            at DOUBLE PRECISION NOT NULL
        )
        """,
    ),
    # 2: every process's lease (``ownership``), in the database's time (hosts' clocks differ).
    (
        """
        CREATE TABLE instances (
            id TEXT PRIMARY KEY,
            lease_until DOUBLE PRECISION NOT NULL,
            host TEXT,
            pid INTEGER
        )
        """,
    ),
    # 3: each process's ``/readyz`` write probe, a row of its own: not its lease's row, which
    # a probe's batch held locked (a batch may wait on a slow statement) while the lease's
    # own connection waited to renew it; nor one row every instance's probe writes.
    (
        "CREATE TABLE probes (id TEXT PRIMARY KEY, at DOUBLE PRECISION NOT NULL)",
    ),
    # 4: a conversation's latest change, as SQLite's 8.
    (
        "CREATE INDEX messages_changed ON messages(conversation_id, updated_at)",
    ),
    # 5: each LLM call's owner, as SQLite's 9.
    (
        "ALTER TABLE llm_calls ADD COLUMN owner TEXT",
        "UPDATE llm_calls SET owner = (SELECT owner FROM runs WHERE runs.id = llm_calls.run_id) "
        "WHERE run_id IS NOT NULL",
        "CREATE INDEX llm_calls_owner ON llm_calls(owner, seq)",
    ),
    # 6: as SQLite's 10.
    (
        _FILL_OWNERS,
        "CREATE FUNCTION llm_calls_owner_of_run() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN IF NEW.owner IS NULL AND NEW.run_id IS NOT NULL THEN "
        "NEW.owner := (SELECT owner FROM runs WHERE id = NEW.run_id); END IF; "
        "RETURN NEW; END $$",
        "CREATE TRIGGER llm_calls_owner_of_run BEFORE INSERT ON llm_calls "
        "FOR EACH ROW EXECUTE FUNCTION llm_calls_owner_of_run()",
    ),
    # 7: the function finds ``runs`` in the schema it was made in, whatever the caller's
    # search_path: a data-only pg_restore empties it, and every call with a run failed there.
    ("ALTER FUNCTION llm_calls_owner_of_run() SET search_path FROM CURRENT",),
    # 8: as SQLite's 11.
    (
        *_IDEMPOTENCY,
        "CREATE FUNCTION runs_unanswered_key() RETURNS trigger LANGUAGE plpgsql "
        "SET search_path FROM CURRENT AS $$ BEGIN NEW.idempotency_key := NULL; RETURN NEW; "
        "END $$",
        "CREATE TRIGGER runs_unanswered_key BEFORE UPDATE OF status ON runs FOR EACH ROW WHEN "
        f"(NEW.idempotency_key IS NOT NULL AND NEW.status IN {_UNANSWERED}) "
        "EXECUTE FUNCTION runs_unanswered_key()",
    ),
    # 9: a conversation's delete picks its runs still to prune one at a time, in id order
    # (postgres_queries.py): without an index of its own each pick read past every run pruned
    # before it (4,000 runs: 12.7 s, each write of 100 picks in the group commit).
    ("CREATE INDEX runs_conversation_unpruned ON runs(conversation_id, id) "
     "WHERE events_pruned = 0 AND finished_at IS NOT NULL",),
)

PG_SCHEMA_VERSION = len(PG_MIGRATIONS)
