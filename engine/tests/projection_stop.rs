//! Stopping in the middle of a transaction leaves nothing behind: a projection runner stopped
//! while a step's transaction is open (and has appended) lets the step finish, and a `begin`
//! given up at any moment leaves no transaction open on a pooled connection; either would leave
//! the log's append lock held and every later append of the process waiting.

mod support;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use stele_engine::log::LogTransaction;
use stele_engine::projection::{Projection, ProjectionError, ProjectionRunner, Tables};
use stele_engine::{AppendRequest, CommandMeta, NewEvent, RecordedEvent, Store, StreamId};
use support::for_each_backend;
use tokio::sync::Notify;
use uuid::Uuid;

fn request(stream: &str, expected: i64) -> AppendRequest {
    let meta = CommandMeta::new("user:1", "test");
    AppendRequest {
        command_id: meta.command_id,
        stream: StreamId::new("note", stream),
        expected_sequence: expected,
        events: vec![NewEvent {
            event_type: "Noted".into(),
            event_version: "1.0".into(),
            payload: json!({}),
            metadata: meta.for_event(Uuid::now_v7()),
        }],
    }
}

/// Sixteen appends at once, each within 10 s.
async fn sixteen_appends_go_through(store: &Store) {
    let appends = (0..16).map(|i| {
        let log = store.log.clone();
        async move { log.append(request(&format!("after-{i}"), 0)).await }
    });
    let done = tokio::time::timeout(Duration::from_secs(10), futures::future::join_all(appends))
        .await
        .expect("no append waits for a transaction left open");
    assert!(done.iter().all(Result::is_ok), "{done:?}");
}

/// Appends in its transaction (as a reaction recorded with its checkpoint does), then takes its
/// time before the transaction commits.
struct Slow {
    inside: Arc<Notify>,
}

#[async_trait]
impl Projection for Slow {
    fn name(&self) -> &'static str {
        "slow"
    }

    fn event_types(&self) -> &'static [&'static str] {
        &["Noted"]
    }

    fn tables(&self) -> &'static [&'static str] {
        &[]
    }

    async fn create(
        &self,
        _tx: &mut dyn LogTransaction,
        _tables: &Tables,
    ) -> Result<(), ProjectionError> {
        Ok(())
    }

    async fn apply(
        &self,
        tx: &mut dyn LogTransaction,
        _tables: &Tables,
        events: &[RecordedEvent],
    ) -> Result<(), ProjectionError> {
        for event in events {
            let stream = format!("echo-{}", event.stream.aggregate_id);
            tx.append(request(&stream, 0)).await?;
        }
        self.inside.notify_one();
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(())
    }
}

async fn a_runner_stopped_mid_step_leaves_no_lock_behind(store: &Store) {
    let inside = Arc::new(Notify::new());
    let runner = Arc::new(ProjectionRunner::new(
        store,
        vec![Arc::new(Slow {
            inside: inside.clone(),
        })],
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(runner.clone().run(async {
        let _ = stopped.await;
    }));
    store.log.append(request("first", 0)).await.unwrap();
    inside.notified().await;
    // Stopped while the step's transaction is open and has appended.
    let _ = stop.send(());
    running.await.unwrap().unwrap();
    // The process's own appends, many at once, go through.
    sixteen_appends_go_through(store).await;
}

/// `begin` given up at any moment (a caller's future dropped) leaves no transaction open on a
/// pooled connection: a later append on that connection would otherwise run inside it, hold the
/// append lock and never commit.
async fn a_begin_given_up_leaves_no_transaction_behind(store: &Store) {
    for i in 0..300u64 {
        let begin = store.log.begin();
        let _ = tokio::time::timeout(Duration::from_micros(i % 40 * 25), begin).await;
    }
    sixteen_appends_go_through(store).await;
    // And they are committed: a fresh read sees every one.
    let head = store.log.head().await.unwrap();
    let events = store
        .log
        .read_all(stele_engine::Position::START, 1000)
        .await
        .unwrap();
    assert_eq!(events.last().map(|e| e.position), Some(head));
    assert_eq!(events.len(), 16);
}

for_each_backend!(
    a_runner_stopped_mid_step_leaves_no_lock_behind,
    a_begin_given_up_leaves_no_transaction_behind,
);
