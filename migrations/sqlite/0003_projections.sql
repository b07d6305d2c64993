-- Where each projection (and process manager) is in the log, who runs it, and why it stopped.
-- Times are microseconds since the epoch.
CREATE TABLE checkpoints
(
    name             TEXT    PRIMARY KEY,
    position         INTEGER NOT NULL DEFAULT 0,
    events_applied   INTEGER NOT NULL DEFAULT 0,
    last_event_at    INTEGER,
    status           TEXT    NOT NULL DEFAULT 'running'
        CHECK (status IN ('running', 'failed', 'rebuilding')),
    error            TEXT,
    failed_position  INTEGER,
    owner            TEXT,
    lease_expires_at INTEGER,
    updated_at       INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
