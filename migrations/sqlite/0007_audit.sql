-- The audit tree (see the PostgreSQL migration of the same number). Times are microseconds since
-- the epoch.
CREATE TABLE audit_records
(
    idx      INTEGER PRIMARY KEY,
    position INTEGER NOT NULL UNIQUE
);

CREATE TABLE audit_hashes
(
    idx  INTEGER PRIMARY KEY,
    hash TEXT    NOT NULL
);

CREATE TABLE audit_checkpoints
(
    size      INTEGER PRIMARY KEY,
    root      TEXT    NOT NULL,
    note      TEXT    NOT NULL,
    signed_at INTEGER NOT NULL
);

CREATE TRIGGER audit_records_no_update BEFORE UPDATE ON audit_records
BEGIN
    SELECT RAISE(ABORT, 'stele: the audit tables are write-once: UPDATE is not allowed');
END;
CREATE TRIGGER audit_records_no_delete BEFORE DELETE ON audit_records
BEGIN
    SELECT RAISE(ABORT, 'stele: the audit tables are write-once: DELETE is not allowed');
END;
CREATE TRIGGER audit_hashes_no_update BEFORE UPDATE ON audit_hashes
BEGIN
    SELECT RAISE(ABORT, 'stele: the audit tables are write-once: UPDATE is not allowed');
END;
CREATE TRIGGER audit_hashes_no_delete BEFORE DELETE ON audit_hashes
BEGIN
    SELECT RAISE(ABORT, 'stele: the audit tables are write-once: DELETE is not allowed');
END;
CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'stele: the audit tables are write-once: UPDATE is not allowed');
END;
CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'stele: the audit tables are write-once: DELETE is not allowed');
END;
