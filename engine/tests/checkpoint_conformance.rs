//! The checkpoint store's conformance suite, run unchanged against PostgreSQL and SQLite.

mod support;

use std::time::Duration;

use chrono::Utc;
use stele_engine::log::LogTransaction;
use stele_engine::projection::checkpoint::{self, Status};
use stele_engine::{Position, Store};
use support::for_each_backend;

const LEASE: Duration = Duration::from_secs(30);

async fn a_new_checkpoint_starts_at_the_beginning(store: &Store) {
    checkpoint::ensure(&store.pool, "view").await.unwrap();
    checkpoint::ensure(&store.pool, "view").await.unwrap();
    let cp = checkpoint::load(&store.pool, "view")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (cp.position, cp.events_applied, cp.status),
        (Position::START, 0, Status::Running)
    );
    assert_eq!(cp.owner, None);
    assert!(checkpoint::load(&store.pool, "other")
        .await
        .unwrap()
        .is_none());
    checkpoint::ensure(&store.pool, "another").await.unwrap();
    let names: Vec<String> = checkpoint::list(&store.pool)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, vec!["another", "view"]);
}

async fn one_owner_at_a_time_until_its_lease_expires(store: &Store) {
    checkpoint::ensure(&store.pool, "view").await.unwrap();
    assert!(checkpoint::acquire(&store.pool, "view", "a", LEASE)
        .await
        .unwrap());
    assert!(
        checkpoint::acquire(&store.pool, "view", "a", LEASE)
            .await
            .unwrap(),
        "renewal"
    );
    assert!(!checkpoint::acquire(&store.pool, "view", "b", LEASE)
        .await
        .unwrap());
    checkpoint::release(&store.pool, "view", "a").await.unwrap();
    assert!(
        checkpoint::acquire(&store.pool, "view", "b", Duration::ZERO)
            .await
            .unwrap()
    );
    // b's lease ran out at once: a may take over.
    assert!(checkpoint::acquire(&store.pool, "view", "a", LEASE)
        .await
        .unwrap());
    let cp = checkpoint::load(&store.pool, "view")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cp.owner.as_deref(), Some("a"));
    assert!(cp.lease_expires_at.unwrap() > Utc::now());
}

const START: Position = Position::START;

/// Moves checkpoint "view" as `owner` from the first position to the second, in `tx`; whether it
/// moved.
async fn advance(
    tx: &mut dyn LogTransaction,
    owner: &str,
    moved: (Position, Position),
    applied: i64,
    at: Option<chrono::DateTime<Utc>>,
) -> bool {
    checkpoint::advance(tx.connection(), "view", owner, moved, applied, at)
        .await
        .unwrap()
}

async fn only_the_owner_moves_the_checkpoint_and_only_on_commit(store: &Store) {
    checkpoint::ensure(&store.pool, "view").await.unwrap();
    assert!(checkpoint::acquire(&store.pool, "view", "a", LEASE)
        .await
        .unwrap());
    let at = Utc::now();

    let mut tx = store.log.begin().await.unwrap();
    assert!(!advance(tx.as_mut(), "b", (START, Position(9)), 3, Some(at)).await);
    assert!(advance(tx.as_mut(), "a", (START, Position(7)), 3, Some(at)).await);
    drop(tx); // rolled back
    let cp = checkpoint::load(&store.pool, "view")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cp.position, Position::START);

    let mut tx = store.log.begin().await.unwrap();
    assert!(advance(tx.as_mut(), "a", (START, Position(7)), 3, Some(at)).await);
    tx.commit().await.unwrap();
    let mut tx = store.log.begin().await.unwrap();
    assert!(
        !advance(tx.as_mut(), "a", (START, Position(8)), 0, None).await,
        "moved from where the caller did not know it to be"
    );
    assert!(advance(tx.as_mut(), "a", (Position(7), Position(8)), 0, None).await);
    tx.commit().await.unwrap();
    let cp = checkpoint::load(&store.pool, "view")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((cp.position, cp.events_applied), (Position(8), 3));
    assert_eq!(
        cp.last_event_at.unwrap().timestamp_micros(),
        at.timestamp_micros(),
        "kept when a batch had no event for it"
    );
}

async fn a_failed_checkpoint_does_not_move_until_reset(store: &Store) {
    checkpoint::ensure(&store.pool, "view").await.unwrap();
    assert!(checkpoint::acquire(&store.pool, "view", "a", LEASE)
        .await
        .unwrap());
    checkpoint::set_status(
        &store.pool,
        "view",
        Status::Failed,
        Some((Position(4), "bad event")),
    )
    .await
    .unwrap();
    let cp = checkpoint::load(&store.pool, "view")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cp.status, Status::Failed);
    assert_eq!(cp.failed_position, Some(Position(4)));
    assert_eq!(cp.error.as_deref(), Some("bad event"));

    let mut tx = store.log.begin().await.unwrap();
    assert!(!advance(tx.as_mut(), "a", (START, Position(5)), 1, None).await);
    checkpoint::reset(tx.connection(), "view", Position(4), 2, None)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let cp = checkpoint::load(&store.pool, "view")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (cp.status, cp.position, cp.events_applied),
        (Status::Running, Position(4), 2)
    );
    assert_eq!((cp.error, cp.failed_position), (None, None));
}

for_each_backend!(
    a_new_checkpoint_starts_at_the_beginning,
    one_owner_at_a_time_until_its_lease_expires,
    only_the_owner_moves_the_checkpoint_and_only_on_commit,
    a_failed_checkpoint_does_not_move_until_reset,
);
