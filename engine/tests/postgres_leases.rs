//! Lease extensions on PostgreSQL pass by a job whose row another transaction holds (an append
//! completing the job holds it until its commit) instead of waiting for it: waiting there while
//! holding other rows in another order deadlocked the append's group commit.

use std::time::Duration;

use serde_json::json;
use stele_engine::queue::{Enqueued, JobState, NewJob};
use stele_engine::store::StorePool;
use stele_engine::testing::TestDb;

const LEASE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_extension_passes_by_a_job_another_transaction_holds() {
    let db = TestDb::postgres().await;
    let store = db.open().await;
    let queue = store.queue.clone();
    let mut ids = Vec::new();
    for kind in ["held", "free"] {
        match queue
            .enqueue(vec![NewJob::new("default", kind, json!({}))])
            .await
            .unwrap()
            .pop()
            .unwrap()
        {
            Enqueued::Inserted(job) => ids.push(job.id),
            Enqueued::Existing(job) => panic!("unexpected existing job {}", job.id),
        }
    }
    let claimed = queue.claim("default", "w", 10, LEASE).await.unwrap();
    assert_eq!(claimed.len(), 2);
    let (held, free) = (ids[0], ids[1]);
    let StorePool::Postgres(pool) = &store.pool else {
        panic!("a PostgreSQL store");
    };
    let lease_of = |id| {
        sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>(
            "SELECT lease_expires_at FROM jobs WHERE id = $1",
        )
        .bind(id)
        .fetch_one(pool)
    };
    let free_before = lease_of(free).await.unwrap();

    // Another transaction holds the first job's row, as an append completing it does.
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE")
        .bind(held)
        .execute(&mut *holder)
        .await
        .unwrap();
    let lost = tokio::time::timeout(
        Duration::from_secs(5),
        queue.extend_leases("w", &[held, free], LEASE * 2),
    )
    .await
    .expect("the extension did not wait for the held row")
    .unwrap();
    assert!(lost.is_empty(), "{lost:?}");
    assert!(lease_of(free).await.unwrap() > free_before);

    // The holder completes the job: the next extension finds it no longer this worker's.
    sqlx::query(
        "UPDATE jobs SET state = 'completed', locked_by = NULL, lease_expires_at = NULL \
         WHERE id = $1",
    )
    .bind(held)
    .execute(&mut *holder)
    .await
    .unwrap();
    holder.commit().await.unwrap();
    assert_eq!(
        queue
            .extend_leases("w", &[held, free], LEASE)
            .await
            .unwrap(),
        vec![held]
    );
    let job = queue.get(held).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Completed);
}
