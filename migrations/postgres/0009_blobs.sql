-- Files that are a person's data (a mail's raw form, attachments), content-addressed and sealed
-- with that person's data key: unreadable once the key is shredded, and deleted with it.
CREATE TABLE blobs (
    subject_id   text NOT NULL,
    digest       text NOT NULL,
    content_type text NOT NULL,
    size         bigint NOT NULL,
    sealed       text NOT NULL,
    created_at   timestamptz NOT NULL,
    PRIMARY KEY (subject_id, digest)
);
