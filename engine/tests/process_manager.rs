//! Process managers on both backends: each event leads to its jobs exactly once, with several
//! runners at once, after a restart, and even when the checkpoint is moved back.

mod support;

use std::sync::Arc;

use serde_json::json;
use stele_engine::process::{as_projection, ProcessManager};
use stele_engine::projection::{ProjectionRunner, Stepped};
use stele_engine::queue::{JobFilter, NewJob};
use stele_engine::store::StorePool;
use stele_engine::{AppendRequest, CommandMeta, NewEvent, RecordedEvent, Store, StreamId};
use support::for_each_backend;
use uuid::Uuid;

/// Greets every new task: one job per `TaskCreated`.
struct Greeter;

impl ProcessManager for Greeter {
    fn name(&self) -> &'static str {
        "greeter"
    }

    fn event_types(&self) -> &'static [&'static str] {
        &["TaskCreated"]
    }

    fn react(&self, event: &RecordedEvent) -> Vec<NewJob> {
        vec![NewJob::new(
            "replies",
            "greet",
            json!({ "task": event.stream.aggregate_id }),
        )]
    }
}

async fn create_tasks(store: &Store, count: usize) {
    for i in 0..count {
        let meta = CommandMeta::new("user:1", "test");
        let event = |kind: &str| NewEvent {
            event_type: kind.into(),
            event_version: "1.0".into(),
            payload: json!({}),
            metadata: meta.for_event(Uuid::now_v7()),
        };
        store
            .log
            .append(AppendRequest {
                command_id: meta.command_id,
                stream: StreamId::new("task", format!("t{i}")),
                expected_sequence: 0,
                events: vec![event("TaskCreated"), event("TaskRouted")],
            })
            .await
            .unwrap();
    }
}

fn runner(store: &Store) -> ProjectionRunner {
    ProjectionRunner::new(
        store,
        vec![as_projection(Arc::new(Greeter), store.queue.clone())],
    )
    .with_batch_size(4)
}

async fn drain(runner: &ProjectionRunner) {
    for _ in 0..10_000 {
        if runner.step("greeter").await.unwrap() == (Stepped { read: 0 }) {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("did not settle");
}

async fn greetings(store: &Store) -> Vec<String> {
    let mut tasks: Vec<String> = store
        .queue
        .list(JobFilter {
            queue: Some("replies".into()),
            limit: 1000,
            ..JobFilter::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|job| job.payload["task"].as_str().unwrap().to_owned())
        .collect();
    tasks.sort();
    tasks
}

fn expected(count: usize) -> Vec<String> {
    let mut tasks: Vec<String> = (0..count).map(|i| format!("t{i}")).collect();
    tasks.sort();
    tasks
}

async fn each_event_leads_to_its_jobs_once(store: &Store) {
    create_tasks(store, 10).await;
    let first = runner(store);
    first.setup().await.unwrap();
    drain(&first).await;
    assert_eq!(greetings(store).await, expected(10));
    let job = &store
        .queue
        .list(JobFilter {
            limit: 1,
            ..JobFilter::default()
        })
        .await
        .unwrap()[0];
    assert!(job
        .idempotency_key
        .as_deref()
        .unwrap()
        .starts_with("greeter:"));

    // A restarted runner (another process) continues from the checkpoint.
    drop(first);
    create_tasks_from(store, 10, 5).await;
    let restarted = runner(store);
    // The embedded store's hold is a lease that must run out; PostgreSQL's ended with the first
    // runner's connection.
    expire_leases(store).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while greetings(store).await.len() < 15 {
        assert!(std::time::Instant::now() < deadline, "not taken over");
        drain(&restarted).await;
        tokio::task::yield_now().await;
    }
    assert_eq!(greetings(store).await, expected(15));
}

async fn create_tasks_from(store: &Store, from: usize, count: usize) {
    for i in from..from + count {
        let meta = CommandMeta::new("user:1", "test");
        store
            .log
            .append(AppendRequest {
                command_id: meta.command_id,
                stream: StreamId::new("task", format!("t{i}")),
                expected_sequence: 0,
                events: vec![NewEvent {
                    event_type: "TaskCreated".into(),
                    event_version: "1.0".into(),
                    payload: json!({}),
                    metadata: meta.for_event(Uuid::now_v7()),
                }],
            })
            .await
            .unwrap();
    }
}

async fn expire_leases(store: &Store) {
    match &store.pool {
        StorePool::Postgres(pool) => {
            sqlx::query("UPDATE checkpoints SET lease_expires_at = now() - interval '1 second'")
                .execute(pool)
                .await
                .unwrap();
        }
        StorePool::Sqlite(pool) => {
            sqlx::query("UPDATE checkpoints SET lease_expires_at = 0")
                .execute(pool)
                .await
                .unwrap();
        }
    }
}

async fn concurrent_runners_enqueue_once(store: &Store) {
    create_tasks(store, 24).await;
    let runners: Vec<_> = (0..3).map(|_| Arc::new(runner(store))).collect();
    runners[0].setup().await.unwrap();
    let tasks: Vec<_> = runners
        .iter()
        .cloned()
        .map(|runner| tokio::spawn(async move { drain(&runner).await }))
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    // Whoever held the lease did the work; the others waited.
    expire_leases(store).await;
    for runner in &runners {
        drain(runner).await;
    }
    assert_eq!(greetings(store).await, expected(24));
}

async fn a_checkpoint_moved_back_does_not_repeat_unfinished_jobs(store: &Store) {
    create_tasks(store, 6).await;
    let runner = runner(store);
    runner.setup().await.unwrap();
    drain(&runner).await;
    match &store.pool {
        StorePool::Postgres(pool) => {
            sqlx::query("UPDATE checkpoints SET position = 0")
                .execute(pool)
                .await
                .unwrap();
        }
        StorePool::Sqlite(pool) => {
            sqlx::query("UPDATE checkpoints SET position = 0")
                .execute(pool)
                .await
                .unwrap();
        }
    }
    drain(&runner).await;
    assert_eq!(greetings(store).await, expected(6));
    assert!(matches!(
        runner.rebuild("greeter", |_| {}).await,
        Err(stele_engine::projection::ProjectionError::NotRebuildable(_))
    ));
}

for_each_backend!(
    each_event_leads_to_its_jobs_once,
    concurrent_runners_enqueue_once,
    a_checkpoint_moved_back_does_not_repeat_unfinished_jobs,
);
