-- Each person's data key, wrapped (AES-256-GCM) by the deployment's key-encryption key. Erasing a
-- person destroys the wrapped key (crypto-shredding): what was sealed with it can no longer be
-- read, while the append-only log keeps its (encrypted) bytes and its hashes.
CREATE TABLE subject_keys
(
    subject_id  text        PRIMARY KEY,
    wrapped     text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    shredded_at timestamptz
);

-- A value sealed with the key-encryption key when the store was first opened: a later start with
-- another key-encryption key is refused before anything is decrypted or written.
CREATE TABLE kek_check
(
    id     integer PRIMARY KEY CHECK (id = 1),
    sealed text    NOT NULL
);
