-- The durable job queue of the embedded store (see the PostgreSQL migration for the design).
CREATE TABLE jobs
(
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT    NOT NULL UNIQUE,
    queue            TEXT    NOT NULL,
    kind             TEXT    NOT NULL,
    payload          TEXT    NOT NULL CHECK (json_valid(payload)),
    state            TEXT    NOT NULL DEFAULT 'available'
        CHECK (state IN ('available', 'running', 'completed', 'dead', 'cancelled')),
    priority         INTEGER NOT NULL DEFAULT 0,
    run_at           INTEGER NOT NULL, -- microseconds since the epoch, like every time below
    attempt          INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL CHECK (max_attempts >= 1),
    timeout_ms       INTEGER NOT NULL CHECK (timeout_ms > 0),
    lease_expires_at INTEGER,
    locked_by        TEXT,
    ordering_key     TEXT,
    idempotency_key  TEXT,
    last_error       TEXT,
    errors           TEXT    NOT NULL DEFAULT '[]',
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    finished_at      INTEGER
);

CREATE INDEX jobs_claim ON jobs (queue, priority DESC, run_at, seq) WHERE state = 'available';
CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX jobs_ordering ON jobs (ordering_key, seq)
    WHERE ordering_key IS NOT NULL AND state IN ('available', 'running');
CREATE UNIQUE INDEX jobs_idempotency ON jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL AND state IN ('available', 'running');
CREATE INDEX jobs_dead ON jobs (finished_at) WHERE state = 'dead';
