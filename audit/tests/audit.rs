//! The audit tree on both stores: sealed in log order with signed checkpoints, verified from the
//! log; and every kind of tampering found, at the right place: a payload changed behind the
//! triggers' back, an event deleted, two events' contents swapped, the tail truncated, a
//! checkpoint checked against another key.

use std::sync::Arc;

use serde_json::json;
use stele_audit::proof::{self, Proof};
use stele_audit::view::{self, AuditFilter, AuditView, AUDIT_VIEW};
use stele_audit::{verify, Sealer, SealerOptions, SigningKey, AUDIT};
use stele_engine::projection::ProjectionRunner;
use stele_engine::store::StorePool;
use stele_engine::{
    for_each_backend, AppendRequest, CommandMeta, NewEvent, Position, Store, StreamId,
};

const EVENTS: usize = 23;

async fn append(store: &Store, count: usize) -> Vec<Position> {
    let mut positions = Vec::new();
    for i in 0..count {
        let meta = CommandMeta::new("user:ana", "test");
        let outcome = store
            .stored
            .append(AppendRequest {
                command_id: meta.command_id,
                stream: StreamId::new("note", format!("n{}", i % 5)),
                expected_sequence: (i / 5) as i64,
                events: vec![NewEvent {
                    event_type: "Noted".into(),
                    event_version: "1.0".into(),
                    payload: json!({ "text": format!("note {i}"), "n": i, "nested": { "b": 1, "a": [1.5, null] } }),
                    metadata: meta.for_event(uuid::Uuid::now_v7()),
                }],
            })
            .await
            .unwrap();
        positions.extend(outcome.outcome().positions.clone());
    }
    positions
}

/// A log of [`EVENTS`] events, sealed with checkpoints every 5 events; the key.
async fn sealed(store: &Store) -> (Arc<SigningKey>, Vec<Position>) {
    let key = Arc::new(SigningKey::generate("stele.test/audit").unwrap());
    let positions = append(store, EVENTS).await;
    let options = SealerOptions {
        every: 5,
        interval: std::time::Duration::from_secs(3600),
    };
    let runner = ProjectionRunner::new(store, vec![Arc::new(Sealer::new(key.clone(), options))])
        .with_batch_size(7);
    runner.setup().await.unwrap();
    while runner.step(AUDIT).await.unwrap().read > 0 {}
    runner.release_all().await.unwrap();
    (key, positions)
}

/// Runs `sql` as the database's owner, around the log's own guards (as a superuser could).
async fn tamper(store: &Store, statements: &[&str]) {
    match &store.pool {
        StorePool::Postgres(pool) => {
            sqlx::query("ALTER TABLE events DISABLE TRIGGER USER")
                .execute(pool)
                .await
                .unwrap();
            for sql in statements {
                sqlx::query(sql).execute(pool).await.unwrap();
            }
        }
        StorePool::Sqlite(pool) => {
            for sql in [
                "DROP TRIGGER events_no_update",
                "DROP TRIGGER events_no_delete",
            ]
            .iter()
            .chain(statements)
            {
                sqlx::query(sql).execute(pool).await.unwrap();
            }
        }
    }
}

async fn a_sealed_log_verifies_with_its_checkpoints(store: &Store) {
    let (key, _) = sealed(store).await;
    let report = verify(store.stored.clone(), &store.pool, key.verifier_key())
        .await
        .unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(
        (report.events, report.sealed),
        (EVENTS as u64, EVENTS as u64)
    );
    // At the end of each batch (7 events) once 5 or more were sealed since the last: 7, 14, 21
    // (the last two wait for the interval or the next batch).
    assert_eq!(report.checkpoints, 3, "{report:?}");
    // The tables are write-once.
    let refused = match &store.pool {
        StorePool::Postgres(pool) => sqlx::query("DELETE FROM audit_hashes")
            .execute(pool)
            .await
            .err(),
        StorePool::Sqlite(pool) => sqlx::query("DELETE FROM audit_hashes")
            .execute(pool)
            .await
            .err(),
    };
    assert!(refused.unwrap().to_string().contains("write-once"));
}

async fn a_changed_payload_is_found_at_its_position(store: &Store) {
    let (key, positions) = sealed(store).await;
    let target = positions[9];
    tamper(
        store,
        &[&format!(
            "UPDATE events SET payload = '{{\"text\":\"forged\"}}' WHERE global_position = {}",
            target.0
        )],
    )
    .await;
    let report = verify(store.stored.clone(), &store.pool, key.verifier_key())
        .await
        .unwrap();
    let mismatch = report.mismatch.expect("found");
    assert_eq!(mismatch.position, Some(target), "{mismatch:?}");
    assert!(
        mismatch.what.contains("stored bytes changed"),
        "{mismatch:?}"
    );
}

async fn a_deleted_event_is_found_at_its_position(store: &Store) {
    let (key, positions) = sealed(store).await;
    let target = positions[4];
    tamper(
        store,
        &[&format!(
            "DELETE FROM events WHERE global_position = {}",
            target.0
        )],
    )
    .await;
    let report = verify(store.stored.clone(), &store.pool, key.verifier_key())
        .await
        .unwrap();
    let mismatch = report.mismatch.expect("found");
    assert_eq!(mismatch.position, Some(target), "{mismatch:?}");
    assert_eq!(mismatch.leaf, Some(4));
}

async fn swapped_events_are_found_at_the_first(store: &Store) {
    let (key, positions) = sealed(store).await;
    let (a, b) = (positions[6], positions[12]);
    let payload = |text: &str| format!("'{{\"text\":\"{text}\"}}'");
    tamper(
        store,
        &[
            &format!(
                "UPDATE events SET payload = {} WHERE global_position = {}",
                payload("note 12"),
                a.0
            ),
            &format!(
                "UPDATE events SET payload = {} WHERE global_position = {}",
                payload("note 6"),
                b.0
            ),
        ],
    )
    .await;
    let report = verify(store.stored.clone(), &store.pool, key.verifier_key())
        .await
        .unwrap();
    assert_eq!(report.mismatch.expect("found").position, Some(a));
}

async fn a_truncated_tail_is_found(store: &Store) {
    let (key, positions) = sealed(store).await;
    let from = positions[EVENTS - 3];
    tamper(
        store,
        &[&format!(
            "DELETE FROM events WHERE global_position >= {}",
            from.0
        )],
    )
    .await;
    let report = verify(store.stored.clone(), &store.pool, key.verifier_key())
        .await
        .unwrap();
    let mismatch = report.mismatch.expect("found");
    assert!(mismatch.what.contains("lost its tail"), "{mismatch:?}");
    assert_eq!(mismatch.position, Some(from));
}

async fn a_checkpoint_of_another_key_is_refused(store: &Store) {
    let (_, _) = sealed(store).await;
    let other = SigningKey::generate("stele.test/audit").unwrap();
    let report = verify(store.stored.clone(), &store.pool, other.verifier_key())
        .await
        .unwrap();
    let mismatch = report.mismatch.expect("found");
    assert!(mismatch.checkpoint.is_some(), "{mismatch:?}");
    assert!(mismatch.what.contains("signature"), "{mismatch:?}");
}

async fn proofs_hold_offline_and_forgeries_do_not(store: &Store) {
    let (key, positions) = sealed(store).await;
    let vkey = key.verifier_key();
    // The tail (leaves 21 and 22) is signed by the node's timer.
    assert_eq!(
        proof::checkpoint_now(&store.pool, &key).await.unwrap(),
        Some(EVENTS as u64)
    );
    assert_eq!(
        proof::checkpoint_now(&store.pool, &key).await.unwrap(),
        None
    );
    for (i, position) in positions.iter().enumerate() {
        let inclusion = proof::prove_inclusion(store.stored.as_ref(), &store.pool, *position, None)
            .await
            .unwrap();
        let checked = proof::check(&inclusion, vkey).unwrap();
        assert_eq!(checked.sizes, vec![EVENTS as u64]);
        assert_eq!(checked.leaf_index, Some(i as u64));
        // Against an older checkpoint, where the event is in it.
        if i < 14 {
            let older =
                proof::prove_inclusion(store.stored.as_ref(), &store.pool, *position, Some(14))
                    .await
                    .unwrap();
            assert_eq!(proof::check(&older, vkey).unwrap().sizes, vec![14]);
        }
    }
    // Sealed after the checkpoint asked for: no proof.
    assert!(
        proof::prove_inclusion(store.stored.as_ref(), &store.pool, positions[20], Some(7))
            .await
            .is_err()
    );

    let genuine = proof::prove_inclusion(store.stored.as_ref(), &store.pool, positions[3], None)
        .await
        .unwrap();
    let other = proof::prove_inclusion(store.stored.as_ref(), &store.pool, positions[4], None)
        .await
        .unwrap();
    let Proof::Inclusion {
        checkpoint,
        position,
        leaf_index,
        event,
        path,
        format,
    } = genuine.clone()
    else {
        unreachable!()
    };
    let Proof::Inclusion {
        event: other_event,
        position: other_position,
        ..
    } = other
    else {
        unreachable!()
    };
    // Another event's bytes on this path, or this event's bytes claimed for another position.
    let inclusion = |event: &str, position: i64, leaf_index: u64| Proof::Inclusion {
        format: format.clone(),
        checkpoint: checkpoint.clone(),
        position,
        leaf_index,
        event: event.to_owned(),
        path: path.clone(),
    };
    assert!(proof::check(&inclusion(&event, position, leaf_index), vkey).is_ok());
    for forged in [
        inclusion(&other_event, other_position, leaf_index),
        inclusion(&event, other_position, leaf_index),
        inclusion(&event, position, leaf_index + 1),
    ] {
        assert!(proof::check(&forged, vkey).is_err(), "{forged:?}");
    }
    // A correct path under a forged tree size: the note's signature no longer holds.
    let forged_size = checkpoint.replacen(
        &format!("\n{}\n", EVENTS),
        &format!("\n{}\n", EVENTS + 1),
        1,
    );
    assert_ne!(forged_size, checkpoint);
    let forged = Proof::Inclusion {
        format,
        checkpoint: forged_size,
        position,
        leaf_index,
        event,
        path,
    };
    assert!(proof::check(&forged, vkey).is_err());
    // Another key's view of the same proof.
    let stranger = SigningKey::generate("stele.test/audit").unwrap();
    assert!(proof::check(&genuine, stranger.verifier_key()).is_err());

    // Consistency between checkpoints, and a tampered path.
    let consistency = proof::prove_consistency(&store.pool, 7, EVENTS as u64)
        .await
        .unwrap();
    assert_eq!(
        proof::check(&consistency, vkey).unwrap().sizes,
        vec![7, EVENTS as u64]
    );
    let json = serde_json::to_string(&consistency).unwrap();
    let back: Proof = serde_json::from_str(&json).unwrap();
    assert_eq!(back, consistency);
    let Proof::Consistency {
        older,
        newer,
        mut path,
        format,
    } = consistency
    else {
        unreachable!()
    };
    path.swap(0, 1);
    assert!(proof::check(
        &Proof::Consistency {
            older,
            newer,
            path,
            format
        },
        vkey
    )
    .is_err());
}

async fn the_audit_view_answers_who_did_what(store: &Store) {
    let positions = append(store, EVENTS).await;
    let runner = ProjectionRunner::new(store, vec![Arc::new(AuditView)]).with_batch_size(6);
    runner.setup().await.unwrap();
    while runner.step(AUDIT_VIEW).await.unwrap().read > 0 {}
    let all = |filter: AuditFilter| {
        let pool = store.pool.clone();
        async move {
            view::list(
                &pool,
                &AuditFilter {
                    limit: 100,
                    ..filter
                },
            )
            .await
            .unwrap()
        }
    };
    let rows = all(AuditFilter::default()).await;
    assert_eq!(rows.len(), EVENTS);
    assert_eq!(rows[0].position, positions[0].0);
    assert_eq!(
        (rows[0].actor.as_str(), rows[0].channel.as_str()),
        ("user:ana", "test")
    );
    assert_eq!(rows[0].stream, "note/n0");
    let stream = all(AuditFilter {
        stream: Some("note/n1".into()),
        ..AuditFilter::default()
    })
    .await;
    assert_eq!(stream.len(), 5);
    assert!(all(AuditFilter {
        actor: Some("user:bob".into()),
        ..AuditFilter::default()
    })
    .await
    .is_empty());
    let page = all(AuditFilter {
        after: Some(positions[19].0),
        ..AuditFilter::default()
    })
    .await;
    assert_eq!(page.len(), 3);
    let future = all(AuditFilter {
        since: Some(chrono::Utc::now() + chrono::Duration::hours(1)),
        ..AuditFilter::default()
    })
    .await;
    assert!(future.is_empty());
    // Write-once.
    let refused = match &store.pool {
        StorePool::Postgres(pool) => sqlx::query("DELETE FROM audit_events")
            .execute(pool)
            .await
            .err(),
        StorePool::Sqlite(pool) => sqlx::query("DELETE FROM audit_events")
            .execute(pool)
            .await
            .err(),
    };
    assert!(refused.unwrap().to_string().contains("write-once"));
    // Rebuilt by replay, the same rows.
    runner.rebuild(AUDIT_VIEW, |_| {}).await.unwrap();
    assert_eq!(all(AuditFilter::default()).await, rows);
}

for_each_backend!(
    the_audit_view_answers_who_did_what,
    proofs_hold_offline_and_forgeries_do_not,
    a_sealed_log_verifies_with_its_checkpoints,
    a_changed_payload_is_found_at_its_position,
    a_deleted_event_is_found_at_its_position,
    swapped_events_are_found_at_the_first,
    a_truncated_tail_is_found,
    a_checkpoint_of_another_key_is_refused,
);
