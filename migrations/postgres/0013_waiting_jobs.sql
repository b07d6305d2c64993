-- A job waiting behind an unfinished job of its ordering key, as a claim found it: claims pass
-- it by through their index instead of checking it again on every claim. A hint only: a claim
-- still runs a job only when no older job of its key is unfinished, and the job that finishes
-- ahead of it clears it (see the queue's SQL).
ALTER TABLE jobs ADD COLUMN waiting boolean NOT NULL DEFAULT false;

DROP INDEX jobs_claim;
-- What a worker claims next.
CREATE INDEX jobs_claim ON jobs (queue, priority DESC, run_at, seq)
    WHERE state = 'available' AND NOT waiting;
