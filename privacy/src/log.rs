//! The event log with personal data sealed: a layer in front of the stored log
//! ([`stele_engine::Store::with_log`]) that seals every personal value of an append and opens
//! every sealed value it reads. Aggregates, the API and the CLI see readable values; the log,
//! the read models and the job payloads hold sealed ones.

use std::sync::Arc;

use async_trait::async_trait;
use stele_engine::log::{
    AppendOutcome, AppendRequest, Backend, CommandOutcome, EventLog, LogError, LogTransaction,
    Position, RecordedEvent, StreamId, TxConnection,
};
use stele_engine::queue::NewJob;
use tokio::sync::watch;
use uuid::Uuid;

use crate::{PrivacyError, Sealer};

/// The event type that destroys subjects' keys (`Subject`'s `SubjectErased`).
pub const SUBJECT_ERASED: &str = "SubjectErased";

/// An [`EventLog`] that seals on the way in and opens on the way out.
pub struct SealedLog {
    inner: Arc<dyn EventLog>,
    sealer: Arc<Sealer>,
}

impl SealedLog {
    pub fn new(inner: Arc<dyn EventLog>, sealer: Arc<Sealer>) -> SealedLog {
        SealedLog { inner, sealer }
    }
}

fn log_error(e: PrivacyError) -> LogError {
    match e {
        PrivacyError::Malformed(reason) => LogError::InvalidAppend(reason),
        PrivacyError::Database(e) => LogError::Database(e),
        other => LogError::Storage(other.to_string()),
    }
}

async fn seal(sealer: &Sealer, request: &mut AppendRequest) -> Result<(), LogError> {
    for event in &mut request.events {
        sealer.seal(&mut event.payload).await.map_err(log_error)?;
    }
    Ok(())
}

/// Opens a batch of events read from the log; an erasure among them drops the destroyed keys
/// from memory first.
async fn open_events(sealer: &Sealer, events: &mut [RecordedEvent]) -> Result<(), LogError> {
    for event in events.iter() {
        if event.event_type == SUBJECT_ERASED {
            for subject in erased_keys(&event.payload) {
                sealer.forget(&subject);
            }
        }
    }
    for event in events.iter_mut() {
        sealer.open(&mut event.payload).await.map_err(log_error)?;
    }
    Ok(())
}

/// The subjects whose keys a `SubjectErased` payload destroyed.
fn erased_keys(payload: &serde_json::Value) -> Vec<String> {
    payload
        .pointer("/data/keys")
        .and_then(serde_json::Value::as_array)
        .map(|keys| {
            keys.iter()
                .filter_map(|k| k.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[async_trait]
impl EventLog for SealedLog {
    fn backend(&self) -> Backend {
        self.inner.backend()
    }

    async fn append(&self, mut request: AppendRequest) -> Result<AppendOutcome, LogError> {
        seal(&self.sealer, &mut request).await?;
        self.inner.append(request).await
    }

    async fn append_with_jobs(
        &self,
        mut request: AppendRequest,
        jobs: Vec<NewJob>,
    ) -> Result<AppendOutcome, LogError> {
        seal(&self.sealer, &mut request).await?;
        self.inner.append_with_jobs(request, jobs).await
    }

    async fn begin(&self) -> Result<Box<dyn LogTransaction>, LogError> {
        Ok(Box::new(SealedTransaction {
            inner: self.inner.begin().await?,
            sealer: self.sealer.clone(),
        }))
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        after_sequence: i64,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        let mut events = self.inner.read_stream(stream, after_sequence).await?;
        open_events(&self.sealer, &mut events).await?;
        Ok(events)
    }

    async fn command_outcome(&self, command_id: Uuid) -> Result<Option<CommandOutcome>, LogError> {
        self.inner.command_outcome(command_id).await
    }

    async fn read_all(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        let mut events = self.inner.read_all(after, limit).await?;
        open_events(&self.sealer, &mut events).await?;
        Ok(events)
    }

    async fn head(&self) -> Result<Position, LogError> {
        self.inner.head().await
    }

    fn appends(&self) -> watch::Receiver<u64> {
        self.inner.appends()
    }

    async fn close(&self) {
        self.inner.close().await
    }
}

struct SealedTransaction {
    inner: Box<dyn LogTransaction>,
    sealer: Arc<Sealer>,
}

#[async_trait]
impl LogTransaction for SealedTransaction {
    async fn append(&mut self, mut request: AppendRequest) -> Result<AppendOutcome, LogError> {
        // Keys are made outside the transaction (their own statements): a key made for an
        // append that then rolls back only seals nothing.
        seal(&self.sealer, &mut request).await?;
        self.inner.append(request).await
    }

    async fn commit(self: Box<Self>) -> Result<(), LogError> {
        self.inner.commit().await
    }

    fn connection(&mut self) -> TxConnection<'_> {
        self.inner.connection()
    }

    fn after_commit(&mut self, hook: Box<dyn FnOnce() + Send>) {
        self.inner.after_commit(hook)
    }

    async fn defer_flush(&mut self) -> Result<(), LogError> {
        self.inner.defer_flush().await
    }
}
