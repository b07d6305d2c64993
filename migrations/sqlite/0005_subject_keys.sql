-- Each person's data key, wrapped (AES-256-GCM) by the deployment's key-encryption key. Erasing a
-- person destroys the wrapped key (crypto-shredding). Times are microseconds since the epoch.
CREATE TABLE subject_keys
(
    subject_id  TEXT    PRIMARY KEY,
    wrapped     TEXT,
    created_at  INTEGER NOT NULL,
    shredded_at INTEGER
) WITHOUT ROWID;

-- A value sealed with the key-encryption key when the store was first opened.
CREATE TABLE kek_check
(
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    sealed TEXT    NOT NULL
);
