-- Vectors by (model, sha256 of the text): the memory's rebuilds never embed a text twice.
-- A person's entries are deleted with their memories when they are erased.
CREATE TABLE embedding_cache (
    model       text NOT NULL,
    text_sha256 text NOT NULL,
    vector      text NOT NULL,
    PRIMARY KEY (model, text_sha256)
);
