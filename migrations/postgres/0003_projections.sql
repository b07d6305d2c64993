-- Where each projection (and process manager) is in the log, who runs it, and why it stopped.
CREATE TABLE checkpoints
(
    name             text        PRIMARY KEY,
    position         bigint      NOT NULL DEFAULT 0,
    events_applied   bigint      NOT NULL DEFAULT 0,
    last_event_at    timestamptz,
    status           text        NOT NULL DEFAULT 'running'
        CHECK (status IN ('running', 'failed', 'rebuilding')),
    error            text,
    failed_position  bigint,
    owner            text,
    lease_expires_at timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
