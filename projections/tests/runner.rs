//! The projection runner on both backends, with the streams view and test projections.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use stele_engine::for_each_backend;
use stele_engine::log::{LogTransaction, TxConnection};
use stele_engine::projection::{
    Projection, ProjectionError, ProjectionRunner, Status, Stepped, Tables,
};
use stele_engine::{
    AppendRequest, CommandMeta, NewEvent, Position, RecordedEvent, Store, StreamId,
};
use stele_projections::{list_streams, StreamsView};
use tokio::sync::mpsc;
use uuid::Uuid;

async fn append(store: &Store, stream: &str, expected: i64, types: &[&str]) -> Vec<Position> {
    let meta = CommandMeta::new("user:1", "test");
    let outcome = store
        .log
        .append(AppendRequest {
            command_id: meta.command_id,
            stream: StreamId::new("note", stream),
            expected_sequence: expected,
            events: types
                .iter()
                .map(|t| NewEvent {
                    event_type: (*t).into(),
                    event_version: "1.0".into(),
                    payload: json!({}),
                    metadata: meta.for_event(Uuid::now_v7()),
                })
                .collect(),
        })
        .await
        .unwrap();
    outcome.outcome().positions.clone()
}

/// Steps until the projection has read everything committed (or stopped).
async fn drain(runner: &ProjectionRunner, name: &str) {
    for _ in 0..10_000 {
        match runner.step(name).await.unwrap() {
            Stepped { read: 0 } => return,
            _ => tokio::task::yield_now().await,
        }
    }
    panic!("projection {name} did not settle");
}

async fn the_streams_view_follows_the_log(store: &Store) {
    let runner = ProjectionRunner::new(store, vec![Arc::new(StreamsView)]).with_batch_size(3);
    runner.setup().await.unwrap();
    append(store, "a", 0, &["Noted", "Noted"]).await;
    append(store, "b", 0, &["Noted"]).await;
    drain(&runner, "streams").await;
    append(store, "a", 2, &["Noted"]).await;
    drain(&runner, "streams").await;

    let mut rows = list_streams(&store.pool, Some("note"), 10).await.unwrap();
    rows.sort_by(|x, y| x.aggregate_id.cmp(&y.aggregate_id));
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (
            rows[0].aggregate_id.as_str(),
            rows[0].version,
            rows[0].events
        ),
        ("a", 3, 3)
    );
    assert_eq!((rows[1].aggregate_id.as_str(), rows[1].version), ("b", 1));

    let status = runner.status().await.unwrap();
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].checkpoint.status, Status::Running);
    assert_eq!(status[0].checkpoint.events_applied, 4);
    assert_eq!(status[0].lag_events, 0);

    // Behind: the lag shows.
    append(store, "c", 0, &["Noted"]).await;
    let status = runner.status().await.unwrap();
    assert!(status[0].lag_events >= 1);
}

/// Fails on "Poison" events; counts the others.
struct Poisonable;

#[async_trait]
impl Projection for Poisonable {
    fn name(&self) -> &'static str {
        "poisonable"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["poison_counts"]
    }

    async fn create(
        &self,
        tx: &mut dyn LogTransaction,
        tables: &Tables,
    ) -> Result<(), ProjectionError> {
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {} (event_type TEXT)",
            tables.name("poison_counts")
        );
        match tx.connection() {
            TxConnection::Postgres(c) => sqlx::query(&sql).execute(c).await.map(|_| ())?,
            TxConnection::Sqlite(c) => sqlx::query(&sql).execute(c).await.map(|_| ())?,
        };
        Ok(())
    }

    async fn apply(
        &self,
        tx: &mut dyn LogTransaction,
        tables: &Tables,
        events: &[RecordedEvent],
    ) -> Result<(), ProjectionError> {
        let sql = format!(
            "INSERT INTO {} (event_type) VALUES ($1)",
            tables.name("poison_counts")
        );
        for event in events {
            if event.event_type == "Poison" {
                return Err(ProjectionError::Apply(format!(
                    "cannot digest {}",
                    event.position
                )));
            }
            match tx.connection() {
                TxConnection::Postgres(c) => {
                    sqlx::query(&sql).bind(&event.event_type).execute(c).await?;
                }
                TxConnection::Sqlite(c) => {
                    sqlx::query(&sql).bind(&event.event_type).execute(c).await?;
                }
            }
        }
        Ok(())
    }
}

async fn a_failing_projection_stops_at_the_event_until_skipped(store: &Store) {
    let runner = ProjectionRunner::new(store, vec![Arc::new(Poisonable)]);
    runner.setup().await.unwrap();
    let positions = append(store, "p", 0, &["Noted", "Poison", "Noted"]).await;
    drain(&runner, "poisonable").await;
    let status = &runner.status().await.unwrap()[0];
    assert_eq!(status.checkpoint.status, Status::Failed);
    assert_eq!(status.checkpoint.failed_position, Some(positions[1]));
    assert_eq!(
        status.checkpoint.position, positions[0],
        "applied up to the failing event"
    );
    assert!(status
        .checkpoint
        .error
        .as_deref()
        .unwrap()
        .contains("cannot digest"));

    // Retrying fails again on the same event.
    runner.retry("poisonable").await.unwrap();
    drain(&runner, "poisonable").await;
    assert_eq!(
        runner.status().await.unwrap()[0].checkpoint.status,
        Status::Failed
    );

    let skipped = runner.skip("poisonable", "operator:ana").await.unwrap();
    assert_eq!(skipped, positions[1]);
    drain(&runner, "poisonable").await;
    let status = &runner.status().await.unwrap()[0];
    assert_eq!(status.checkpoint.status, Status::Running);
    assert_eq!(status.checkpoint.error, None);
    // The skip is itself an event, applied like any other.
    let skips = store
        .log
        .read_stream(&StreamId::new("projection", "poisonable"), 0)
        .await
        .unwrap();
    assert_eq!(skips.len(), 1);
    assert_eq!(skips[0].event_type, "ProjectionEventSkipped");
    assert_eq!(skips[0].payload["position"], positions[1].0);
    assert_eq!(skips[0].metadata.command.actor, "operator:ana");
    assert_eq!(
        status.checkpoint.events_applied, 3,
        "Noted, Noted, ProjectionEventSkipped"
    );
    assert!(matches!(
        runner.skip("poisonable", "x").await,
        Err(ProjectionError::WrongStatus { .. })
    ));
}

async fn a_rebuild_equals_the_live_view(store: &Store) {
    let runner = ProjectionRunner::new(store, vec![Arc::new(StreamsView)]).with_batch_size(7);
    runner.setup().await.unwrap();
    for i in 0..20 {
        append(store, &format!("s{}", i % 6), (i / 6) as i64, &["Noted"]).await;
    }
    drain(&runner, "streams").await;
    let live = list_streams(&store.pool, None, 100).await.unwrap();
    let live_checkpoint = runner.status().await.unwrap()[0].checkpoint.clone();

    let mut reports = 0;
    let rebuilt = runner.rebuild("streams", |_| reports += 1).await.unwrap();
    assert!(reports >= 3, "progress reported per batch");
    assert_eq!(list_streams(&store.pool, None, 100).await.unwrap(), live);
    assert_eq!(rebuilt.position, live_checkpoint.position);
    assert_eq!(rebuilt.events_applied, live_checkpoint.events_applied);
    assert_eq!(rebuilt.status, Status::Running);
    // It keeps following afterwards.
    append(store, "after", 0, &["Noted"]).await;
    drain(&runner, "streams").await;
    assert_eq!(
        list_streams(&store.pool, None, 100).await.unwrap().len(),
        live.len() + 1
    );
}

/// One step: how many events it read.
async fn step_settled(runner: &ProjectionRunner) -> usize {
    runner.step("streams").await.unwrap().read
}

async fn one_runner_at_a_time_with_takeover(store: &Store) {
    append(store, "x", 0, &["Noted"]).await;
    let holder = ProjectionRunner::new(store, vec![Arc::new(StreamsView)]);
    holder.setup().await.unwrap();
    assert_eq!(step_settled(&holder).await, 1);
    append(store, "y", 0, &["Noted"]).await;
    let other = ProjectionRunner::new(store, vec![Arc::new(StreamsView)]);
    assert_eq!(step_settled(&other).await, 0, "held by the first runner");

    // A holder that dies is taken over: on PostgreSQL as soon as the server sees its connection
    // end (its session's locks end with it), on the embedded store when its lease runs out.
    drop(holder);
    if let stele_engine::store::StorePool::Sqlite(pool) = &store.pool {
        sqlx::query("UPDATE checkpoints SET lease_expires_at = 0")
            .execute(pool)
            .await
            .unwrap();
    }
    let died = std::time::Instant::now();
    while step_settled(&other).await == 0 {
        assert!(
            died.elapsed() < Duration::from_secs(5),
            "not taken over within 5 s"
        );
        tokio::task::yield_now().await;
    }
    append(store, "z", 0, &["Noted"]).await;
    assert_eq!(step_settled(&other).await, 1, "keeps its hold");
    let third = ProjectionRunner::new(store, vec![Arc::new(StreamsView)]);
    append(store, "w", 0, &["Noted"]).await;
    assert_eq!(step_settled(&third).await, 0, "held by the live taker");
    other.release_all().await.unwrap();
    assert_eq!(step_settled(&third).await, 1, "released at once");
}

async fn one_rebuild_at_a_time(store: &Store) {
    let runner = Arc::new(ProjectionRunner::new(store, vec![Arc::new(StreamsView)]));
    runner.setup().await.unwrap();
    for i in 0..50 {
        append(store, &format!("r{i}"), 0, &["Noted"]).await;
    }
    let first = runner.claim_rebuild("streams").await.unwrap();
    for _ in 0..2 {
        assert!(matches!(
            runner.rebuild("streams", |_| {}).await,
            Err(ProjectionError::Busy(_))
        ));
    }
    let status = &runner.status().await.unwrap()[0].checkpoint;
    assert!(status.rebuild_owner.is_some());
    runner.run_rebuild(first, |_| {}).await.unwrap();
    let status = &runner.status().await.unwrap()[0].checkpoint;
    assert_eq!(
        (&status.rebuild_owner, &status.rebuild_error),
        (&None, &None)
    );
    // Concurrent rebuilds: exactly one runs, the others are told so at once.
    let racers: Vec<_> = (0..3)
        .map(|_| {
            let runner = runner.clone();
            tokio::spawn(async move { runner.rebuild("streams", |_| {}).await })
        })
        .collect();
    let mut done = 0;
    for racer in racers {
        match racer.await.unwrap() {
            Ok(_) => done += 1,
            Err(ProjectionError::Busy(_)) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(done >= 1);
    assert_eq!(
        list_streams(&store.pool, None, 100).await.unwrap().len(),
        50
    );
}

/// Signals every event it applies.
struct Signal(mpsc::UnboundedSender<String>);

#[async_trait]
impl Projection for Signal {
    fn name(&self) -> &'static str {
        "signal"
    }

    fn tables(&self) -> &'static [&'static str] {
        &[]
    }

    async fn create(&self, _: &mut dyn LogTransaction, _: &Tables) -> Result<(), ProjectionError> {
        Ok(())
    }

    async fn apply(
        &self,
        _: &mut dyn LogTransaction,
        _: &Tables,
        events: &[RecordedEvent],
    ) -> Result<(), ProjectionError> {
        for event in events {
            let _ = self.0.send(event.stream.aggregate_id.clone());
        }
        Ok(())
    }
}

async fn the_runner_catches_up_then_follows_live(store: &Store) {
    append(store, "before", 0, &["Noted"]).await;
    let (tx, mut applied) = mpsc::unbounded_channel();
    let runner = Arc::new(ProjectionRunner::new(
        store,
        vec![Arc::new(Signal(tx)), Arc::new(StreamsView)],
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(runner.clone().run(async {
        let _ = stopped.await;
    }));
    assert_eq!(applied.recv().await.unwrap(), "before");
    append(store, "live", 0, &["Noted"]).await;
    let next = tokio::time::timeout(Duration::from_secs(10), applied.recv())
        .await
        .expect("applied promptly")
        .unwrap();
    assert_eq!(next, "live");
    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
}

for_each_backend!(
    the_streams_view_follows_the_log,
    a_failing_projection_stops_at_the_event_until_skipped,
    a_rebuild_equals_the_live_view,
    one_runner_at_a_time_with_takeover,
    one_rebuild_at_a_time,
    the_runner_catches_up_then_follows_live,
);
