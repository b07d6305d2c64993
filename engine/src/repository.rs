//! The event log behind cqrs-es's `PersistedEventRepository`, so cqrs-es's own
//! `PersistedEventStore` / `CqrsFramework` run on Stele's log (in plain event-store mode).
//!
//! Metadata passed to cqrs-es (`execute_with_metadata`) is read as [`CommandMeta`]: a `command_id`
//! entry makes the command idempotent like [`crate::CommandBus`] does.

use std::sync::Arc;

use cqrs_es::persist::{
    PersistedEventRepository, PersistenceError, ReplayStream, SerializedEvent, SerializedSnapshot,
};
use cqrs_es::Aggregate;
use serde_json::Value;
use uuid::Uuid;

use crate::command::to_serialized;
use crate::log::{AppendRequest, EventLog, LogError, NewEvent, StreamId};
use crate::metadata::CommandMeta;

/// cqrs-es repository over an [`EventLog`].
#[derive(Clone)]
pub struct LogRepository {
    log: Arc<dyn EventLog>,
}

impl LogRepository {
    pub fn new(log: Arc<dyn EventLog>) -> Self {
        Self { log }
    }
}

fn persistence(error: LogError) -> PersistenceError {
    match error {
        LogError::Conflict { .. } => PersistenceError::OptimisticLockError,
        LogError::Database(e) => PersistenceError::ConnectionError(Box::new(e)),
        LogError::Corrupt { .. } => PersistenceError::DeserializationError(Box::new(error)),
        other => PersistenceError::UnknownError(Box::new(other)),
    }
}

impl PersistedEventRepository for LogRepository {
    async fn get_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.get_last_events::<A>(aggregate_id, 0).await
    }

    async fn get_last_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
        last_sequence: usize,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        let events = self
            .log
            .read_stream(&StreamId::new(A::TYPE, aggregate_id), last_sequence as i64)
            .await
            .map_err(persistence)?;
        Ok(events.into_iter().map(to_serialized).collect())
    }

    async fn get_snapshot<A: Aggregate>(
        &self,
        _aggregate_id: &str,
    ) -> Result<Option<SerializedSnapshot>, PersistenceError> {
        // Plain event-store mode: there are no snapshots.
        Ok(None)
    }

    async fn persist<A: Aggregate>(
        &self,
        events: &[SerializedEvent],
        _snapshot_update: Option<(String, Value, usize)>,
    ) -> Result<(), PersistenceError> {
        let Some(first) = events.first() else {
            return Ok(());
        };
        let map = serde_json::from_value(first.metadata.clone())?;
        let meta = CommandMeta::from_map(&map);
        let request = AppendRequest {
            command_id: meta.command_id,
            stream: StreamId::new(first.aggregate_type.clone(), first.aggregate_id.clone()),
            expected_sequence: first.sequence as i64 - 1,
            events: events
                .iter()
                .map(|event| NewEvent {
                    event_type: event.event_type.clone(),
                    event_version: event.event_version.clone(),
                    payload: event.payload.clone(),
                    metadata: meta.for_event(Uuid::now_v7()),
                })
                .collect(),
        };
        self.log.append(request).await.map_err(persistence)?;
        Ok(())
    }

    async fn stream_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<ReplayStream, PersistenceError> {
        let events = self.get_events::<A>(aggregate_id).await?;
        Ok(feed(events.into_iter().map(Ok).collect()))
    }

    async fn stream_all_events<A: Aggregate>(&self) -> Result<ReplayStream, PersistenceError> {
        let mut events = Vec::new();
        let mut position = crate::log::Position::START;
        loop {
            let batch = self
                .log
                .read_all(position, 1000)
                .await
                .map_err(persistence)?;
            let Some(last) = batch.last() else { break };
            position = last.position;
            events.extend(
                batch
                    .into_iter()
                    .filter(|e| e.stream.aggregate_type == A::TYPE)
                    .map(|e| Ok(to_serialized(e))),
            );
        }
        Ok(feed(events))
    }
}

fn feed(events: Vec<Result<SerializedEvent, PersistenceError>>) -> ReplayStream {
    let (mut feed, stream) = ReplayStream::new(events.len().max(1));
    tokio::spawn(async move {
        for event in events {
            if feed.push(event).await.is_err() {
                return;
            }
        }
    });
    stream
}
