-- Automatic email answers of the last hour, per mailbox and sender (a random subject id, no
-- personal data): the per-sender cap, counted the same by every node. Rows older than an hour
-- are deleted as new ones come.
CREATE TABLE email_answers (
    mailbox     text NOT NULL,
    subject_id  text NOT NULL,
    message_id  text NOT NULL,
    answered_at timestamptz NOT NULL,
    PRIMARY KEY (mailbox, subject_id, message_id)
);
CREATE INDEX email_answers_by_time ON email_answers (answered_at);
