//! Appends by one process wake subscribers in another through LISTEN/NOTIFY, not by polling.

use std::time::Duration;

use serde_json::json;
use stele_engine::log::{subscribe, SubscriptionOptions};
use stele_engine::testing::TestDb;
use stele_engine::{AppendRequest, CommandMeta, NewEvent, Position, StreamId};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_is_woken_by_another_process_append() {
    let db = TestDb::postgres().await;
    // Two stores with their own pools stand for two processes.
    let reader = db.open().await;
    let writer = db.open().await;
    let options = SubscriptionOptions {
        batch_size: 100,
        poll_interval: Duration::from_secs(60),
        linger: Duration::ZERO,
    };
    let mut subscription = subscribe(reader.log.clone(), Position::START, options);
    let follower = tokio::spawn(async move { subscription.next().await.map(|e| e.stream) });
    // Let the follower reach its wait before the append.
    tokio::task::yield_now().await;

    let meta = CommandMeta::new("user:1", "test");
    writer
        .log
        .append(AppendRequest {
            command_id: meta.command_id,
            stream: StreamId::new("note", "elsewhere"),
            expected_sequence: 0,
            events: vec![NewEvent {
                event_type: "Noted".into(),
                event_version: "1.0".into(),
                payload: json!({}),
                metadata: meta.for_event(Uuid::now_v7()),
            }],
        })
        .await
        .unwrap();
    let stream = tokio::time::timeout(Duration::from_secs(20), follower)
        .await
        .expect("woken by NOTIFY well before the 60 s poll")
        .unwrap()
        .unwrap();
    assert_eq!(stream, StreamId::new("note", "elsewhere"));
    writer.close().await;
    reader.close().await;
}
