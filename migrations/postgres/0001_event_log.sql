-- The event log: one append-only table for every stream of every aggregate.
--
-- The first seven columns are the ones cqrs-es/postgres-es use, so any of their tools can read it.
-- Besides them:
--   global_position  a cluster-wide position, assigned at INSERT (not at commit: see read order below)
--   tx_id            the writing transaction's id; readers order by (tx_id, global_position) and never
--                    read past the oldest transaction still open, so no reader skips an event that
--                    commits later (see engine/src/log/postgres.rs)
--   recorded_at      when the writing transaction started
--   metadata         json, not jsonb: it is written with every event and read whole, never queried
--                    inside, and json input is cheaper than jsonb's
--   event_id         UUIDv7 of the event (also in metadata); unique by construction, not indexed
CREATE TABLE events
(
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    sequence        bigint      NOT NULL CHECK (sequence >= 1),
    event_type      text        NOT NULL,
    event_version   text        NOT NULL,
    payload         jsonb       NOT NULL,
    metadata        json        NOT NULL,
    global_position bigserial   NOT NULL UNIQUE,
    tx_id           xid8        NOT NULL DEFAULT pg_current_xact_id(),
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    event_id        uuid        NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);

-- The global read order.
CREATE INDEX events_log_order ON events (tx_id, global_position);

-- One row per command that appended events: makes commands idempotent (a command id is accepted once)
-- and lets a repeated submission return the first outcome.
CREATE TABLE commands
(
    command_id     uuid        PRIMARY KEY,
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    first_sequence bigint      NOT NULL,
    last_sequence  bigint      NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now()
);

-- Append-only, enforced by the database itself: whoever connects, with whatever tool.
CREATE FUNCTION stele_events_append_only() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    RAISE EXCEPTION 'stele: the events table is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'object_not_in_prerequisite_state',
              HINT = 'events are immutable; record a new event instead';
END
$$;

CREATE TRIGGER events_no_update_delete
    BEFORE UPDATE OR DELETE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION stele_events_append_only();

CREATE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION stele_events_append_only();
