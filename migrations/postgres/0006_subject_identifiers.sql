-- Which subject an identifier leads to: the identifier is stored only as a keyed hash
-- (HMAC-SHA-256 under a key derived from the key-encryption key), so this table names no one.
-- Erasing a subject deletes its rows.
CREATE TABLE subject_identifiers
(
    lookup     text PRIMARY KEY,
    subject_id text NOT NULL
);
CREATE INDEX subject_identifiers_by_subject ON subject_identifiers (subject_id);
