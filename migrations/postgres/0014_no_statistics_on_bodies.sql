-- Event bodies and job payloads are written and read whole, never searched or compared by SQL,
-- so the planner has no use for statistics on them. Collecting them was most of what ANALYZE
-- (autovacuum's, while the log grows) cost: it sorts a sample of every column's values, and
-- comparing jsonb values walks them whole.
ALTER TABLE events
    ALTER COLUMN payload SET STATISTICS 0,
    ALTER COLUMN metadata SET STATISTICS 0;
ALTER TABLE jobs
    ALTER COLUMN payload SET STATISTICS 0,
    ALTER COLUMN errors SET STATISTICS 0,
    ALTER COLUMN last_error SET STATISTICS 0;
