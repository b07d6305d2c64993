-- Agents' workspaces, one per run: its files as one document, sealed with the key of the person
-- the run is for (plain when it is for no one), so that erasing the person leaves it unreadable.
-- `version` orders concurrent changes (a change is written only over the version it read).
CREATE TABLE workspaces (
    run_id     text PRIMARY KEY,
    task_id    text,
    subject_id text,
    version    bigint NOT NULL,
    files      bigint NOT NULL,
    size       bigint NOT NULL,
    content    text NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE INDEX workspaces_by_task ON workspaces (task_id);
CREATE INDEX workspaces_by_subject ON workspaces (subject_id);
