-- The audit tree: an RFC 6962 Merkle tree over the event log, in log order (docs/audit-log.md).
-- `audit_records` maps each leaf (0, 1, …) to its event's position; `audit_hashes` holds the
-- tree's stored hashes (Go's tlog layout: every complete subtree's hash, by stored-hash index,
-- base64);
-- `audit_checkpoints` the signed tree heads (C2SP tlog-checkpoint notes). All three are
-- write-once: rows are added by the sealer, never changed or removed.
CREATE TABLE audit_records
(
    idx      bigint PRIMARY KEY,
    position bigint NOT NULL UNIQUE
);

CREATE TABLE audit_hashes
(
    idx  bigint PRIMARY KEY,
    hash text   NOT NULL
);

CREATE TABLE audit_checkpoints
(
    size      bigint      PRIMARY KEY,
    root      text        NOT NULL,
    note      text        NOT NULL,
    signed_at timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION stele_audit_write_once() RETURNS trigger
    LANGUAGE plpgsql
AS
$$
BEGIN
    RAISE EXCEPTION 'stele: the audit tables are write-once: % is not allowed', TG_OP
        USING ERRCODE = 'restrict_violation';
END
$$;

CREATE TRIGGER audit_records_write_once BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_records
    FOR EACH STATEMENT EXECUTE FUNCTION stele_audit_write_once();
CREATE TRIGGER audit_hashes_write_once BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_hashes
    FOR EACH STATEMENT EXECUTE FUNCTION stele_audit_write_once();
CREATE TRIGGER audit_checkpoints_write_once BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION stele_audit_write_once();
