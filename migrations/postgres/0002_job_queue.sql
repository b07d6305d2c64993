-- The durable job queue. Unfinished jobs (available, running) and dead ones live here; completed
-- and cancelled jobs stay until pruned (retention), so the hot part of the table stays small:
-- the claim index covers available jobs only.
CREATE TABLE jobs
(
    id               uuid        PRIMARY KEY,
    seq              bigserial   NOT NULL,
    queue            text        NOT NULL,
    kind             text        NOT NULL,
    payload          jsonb       NOT NULL,
    state            text        NOT NULL DEFAULT 'available'
        CHECK (state IN ('available', 'running', 'completed', 'dead', 'cancelled')),
    priority         smallint    NOT NULL DEFAULT 0,
    run_at           timestamptz NOT NULL DEFAULT now(),
    attempt          integer     NOT NULL DEFAULT 0,
    max_attempts     integer     NOT NULL CHECK (max_attempts >= 1),
    timeout_ms       bigint      NOT NULL CHECK (timeout_ms > 0),
    lease_expires_at timestamptz,
    locked_by        text,
    ordering_key     text,
    idempotency_key  text,
    last_error       text,
    errors           jsonb       NOT NULL DEFAULT '[]',
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);

-- What a worker claims next.
CREATE INDEX jobs_claim ON jobs (queue, priority DESC, run_at, seq) WHERE state = 'available';
-- Leases to rescue.
CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE state = 'running';
-- The oldest unfinished job of an ordering key.
CREATE INDEX jobs_ordering ON jobs (ordering_key, seq)
    WHERE ordering_key IS NOT NULL AND state IN ('available', 'running');
-- One unfinished job per idempotency key.
CREATE UNIQUE INDEX jobs_idempotency ON jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL AND state IN ('available', 'running');
-- Dead jobs for operators. (No index on every state: each state change would write to it.)
CREATE INDEX jobs_dead ON jobs (finished_at) WHERE state = 'dead';
