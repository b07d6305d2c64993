//! The per-sender cap on automatic answers (`replies_per_sender_per_hour`), kept in the store's
//! `email_answers` table so that every node of a deployment counts the same answers.
//!
//! A mail is admitted when its sender got fewer than the cap in the last hour; admitting it is
//! recorded (once: a job run again for the same mail finds it admitted). Two nodes admitting
//! mails of one sender at the same instant may both see the count below the cap, so it can be
//! passed by the number of nodes answering that sender at once, never more.

use chrono::{Duration, Utc};
use stele_engine::store::sql::{Db, Dialects};
use stele_engine::store::StorePool;

struct Statements {
    admitted: &'static str,
    prune: &'static str,
    count: &'static str,
    insert: &'static str,
}

/// The same SQL on both stores.
const STATEMENTS: Statements = Statements {
    admitted: "SELECT 1 AS one FROM email_answers \
               WHERE mailbox = $1 AND subject_id = $2 AND message_id = $3",
    prune: "DELETE FROM email_answers WHERE answered_at < $1",
    count: "SELECT count(*) AS n FROM email_answers \
            WHERE mailbox = $1 AND subject_id = $2 AND answered_at >= $3",
    insert: "INSERT INTO email_answers (mailbox, subject_id, message_id, answered_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
};

const SQL: Dialects<Statements> = Dialects {
    postgres: STATEMENTS,
    sqlite: STATEMENTS,
};

/// Whether `message` of `subject` to `mailbox` may be answered automatically, at most
/// `per_hour` such answers a sender an hour; recorded when it may.
pub async fn admit(
    pool: &StorePool,
    mailbox: &str,
    subject: &str,
    message: &str,
    per_hour: u32,
) -> anyhow::Result<bool> {
    let mut db = Db::from(pool);
    let sql = db.pick(&SQL);
    let key = [mailbox.into(), subject.into(), message.into()];
    if db.fetch_optional(sql.admitted, &key).await?.is_some() {
        return Ok(true);
    }
    let now = Utc::now();
    let hour_ago = now - Duration::hours(1);
    db.execute(sql.prune, &[hour_ago.into()]).await?;
    let count = db
        .fetch_one(
            sql.count,
            &[mailbox.into(), subject.into(), hour_ago.into()],
        )
        .await?
        .get::<i64>("n")?;
    if count >= i64::from(per_hour) {
        return Ok(false);
    }
    let [mailbox, subject, message] = key;
    db.execute(sql.insert, &[mailbox, subject, message, now.into()])
        .await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use stele_engine::testing::TestDb;

    use super::*;

    async fn caps_per_sender_and_mailbox(db: TestDb) {
        let store = db.open().await;
        let pool = &store.pool;
        for n in 0..3 {
            assert!(admit(pool, "help", "ana", &format!("m{n}"), 3)
                .await
                .unwrap());
        }
        assert!(
            !admit(pool, "help", "ana", "m3", 3).await.unwrap(),
            "over the cap"
        );
        // A job run again for an admitted mail finds it admitted.
        assert!(admit(pool, "help", "ana", "m1", 3).await.unwrap());
        // Others, and the same sender at another mailbox, count apart.
        assert!(admit(pool, "help", "bo", "m9", 3).await.unwrap());
        assert!(admit(pool, "sales", "ana", "m4", 3).await.unwrap());
    }

    #[tokio::test]
    async fn postgres_caps_per_sender_and_mailbox() {
        caps_per_sender_and_mailbox(TestDb::postgres().await).await;
    }

    #[tokio::test]
    async fn sqlite_caps_per_sender_and_mailbox() {
        caps_per_sender_and_mailbox(TestDb::sqlite()).await;
    }
}
