-- Appends notify with the appending connection's `application_name` as the payload. Stele names
-- each connection pool uniquely (`stele#<id>`), so a process can tell its own notifications
-- (whose readers it has already woken, at commit) from those of other processes, and skip them.
CREATE OR REPLACE FUNCTION stele_events_in_commit_order() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    -- 6013542918676836199 = 'SteleLog' as a big-endian bigint: the log's append lock.
    PERFORM pg_advisory_xact_lock(6013542918676836199);
    -- Wake the log's readers in every other process when this transaction commits (once per
    -- transaction, however many statements append). A notifying commit holds the notification
    -- queue's lock until it is flushed, but appends are serialised by the lock above anyway.
    PERFORM pg_notify('stele_events', coalesce(current_setting('application_name', true), ''));
    RETURN NULL;
END
$$;
