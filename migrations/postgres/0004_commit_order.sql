-- The global log in commit order, so that readers need no server-wide horizon.
--
-- Every statement that inserts into `events` first takes one transaction-scoped advisory lock
-- (a statement-level BEFORE trigger, so no writer, however it connects, can skip it). The lock is
-- held until the inserting transaction ends, and a row's `global_position` is drawn from the
-- sequence after the lock is taken. So appending transactions draw positions one at a time, and
-- each commits (and becomes visible) before the next one draws: positions become visible in
-- increasing order. A reader that has seen position P has seen every event below P that will
-- ever commit; it reads `global_position > P`, and transactions of other programs, in this
-- database or any other on the server, hold it back not at all. ARCHITECTURE.md ("The global log
-- and its order") gives the whole argument.
CREATE FUNCTION stele_events_in_commit_order() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    -- 6013542918676836199 = 'SteleLog' as a big-endian bigint: the log's append lock.
    PERFORM pg_advisory_xact_lock(6013542918676836199);
    -- Wake the log's readers in every process when this transaction commits (once per
    -- transaction, however many statements append). A notifying commit holds the notification
    -- queue's lock until it is flushed, but appends are serialised by the lock above anyway.
    PERFORM pg_notify('stele_events', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER events_in_commit_order
    BEFORE INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION stele_events_in_commit_order();

-- Checkpoints written under the previous order, (tx_id, global_position), move back to the last
-- event before the first one they had not read, so that no event is skipped (some may be read
-- again, which projections and process managers tolerate).
UPDATE checkpoints c
SET position = COALESCE((SELECT max(e.global_position) FROM events e
                         WHERE e.global_position < u.first_unread), 0)
FROM (SELECT k.name,
             (SELECT min(e.global_position)
              FROM events e, events seen
              WHERE seen.global_position = k.position
                AND (e.tx_id, e.global_position) > (seen.tx_id, seen.global_position)) AS first_unread
      FROM checkpoints k
      WHERE k.position > 0) u
WHERE c.name = u.name
  AND u.first_unread IS NOT NULL
  AND u.first_unread < c.position;

-- The old read order's index: nothing reads in that order any more, and every append paid for it.
DROP INDEX events_log_order;

-- A rebuild in progress (one at a time per projection) and how the last one ended.
ALTER TABLE checkpoints
    ADD COLUMN rebuild_owner     text,
    ADD COLUMN rebuild_heartbeat timestamptz,
    ADD COLUMN rebuild_error     text;
