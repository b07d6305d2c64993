-- Files that are a person's data (a mail's raw form, attachments), content-addressed and sealed
-- with that person's data key: unreadable once the key is shredded, and deleted with it.
CREATE TABLE blobs (
    subject_id   TEXT NOT NULL,
    digest       TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size         INTEGER NOT NULL,
    sealed       TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (subject_id, digest)
);
