-- Which subject an identifier leads to, by a keyed hash of the identifier (see the PostgreSQL
-- migration of the same number).
CREATE TABLE subject_identifiers
(
    lookup     TEXT PRIMARY KEY,
    subject_id TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX subject_identifiers_by_subject ON subject_identifiers (subject_id);
