-- A rebuild in progress (one at a time per projection) and how the last one ended.
-- Times are microseconds since the epoch.
ALTER TABLE checkpoints ADD COLUMN rebuild_owner TEXT;
ALTER TABLE checkpoints ADD COLUMN rebuild_heartbeat INTEGER;
ALTER TABLE checkpoints ADD COLUMN rebuild_error TEXT;
