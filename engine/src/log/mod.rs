//! The event-log port: append events to streams, read one stream, read the global log in a
//! gap-safe order, and follow it live.
//!
//! Two adapters implement [`EventLog`]: [`postgres::PgEventLog`] and [`sqlite::SqliteEventLog`].
//! Both pass the same conformance suite (`engine/tests/event_log_conformance.rs`).

mod batch;
pub mod postgres;
pub mod sqlite;
mod subscribe;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;
use uuid::Uuid;

use crate::metadata::EventMetadata;
use crate::queue::NewJob;

pub use subscribe::{subscribe, Subscription, SubscriptionOptions};

/// A place in the global log: the `global_position` of an event. `Position::START` (0) is before
/// the first event. Log order is position order, which is also commit order (see
/// [`EventLog::read_all`]).
///
/// ```
/// use stele_engine::Position;
///
/// assert_eq!("42".parse::<Position>(), Ok(Position(42)));
/// assert!("-1".parse::<Position>().is_err());
/// ```
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Position(pub i64);

impl Position {
    /// Before the first event.
    pub const START: Position = Position(0);
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for Position {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<i64>() {
            Ok(n) if n >= 0 => Ok(Position(n)),
            _ => Err(format!(
                "invalid position {s:?}: expected a whole number >= 0"
            )),
        }
    }
}

/// One stream: the events of one aggregate instance.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StreamId {
    pub aggregate_type: String,
    pub aggregate_id: String,
}

impl StreamId {
    pub fn new(aggregate_type: impl Into<String>, aggregate_id: impl Into<String>) -> Self {
        Self {
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.aggregate_type, self.aggregate_id)
    }
}

/// An event to append.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    pub event_type: String,
    pub event_version: String,
    pub payload: Value,
    pub metadata: EventMetadata,
}

/// The events one command appends to one stream, atomically.
#[derive(Clone, Debug, PartialEq)]
pub struct AppendRequest {
    pub command_id: Uuid,
    pub stream: StreamId,
    /// The stream's last sequence the command saw (0 for a new stream). The events get sequences
    /// `expected_sequence + 1 ..`; if another writer got there first, the append fails with
    /// [`LogError::Conflict`] (optimistic concurrency).
    pub expected_sequence: i64,
    pub events: Vec<NewEvent>,
}

impl AppendRequest {
    pub(crate) fn first_sequence(&self) -> i64 {
        self.expected_sequence + 1
    }

    pub(crate) fn last_sequence(&self) -> i64 {
        self.expected_sequence + self.events.len() as i64
    }
}

/// What a command did to the log: the stream and the events it appended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandOutcome {
    pub command_id: Uuid,
    pub stream: StreamId,
    pub first_sequence: i64,
    pub last_sequence: i64,
    /// The global positions of the appended events, in sequence order.
    pub positions: Vec<Position>,
}

/// The result of an append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppendOutcome {
    /// The events were appended.
    Appended(CommandOutcome),
    /// This command id was accepted before; nothing was appended and this is the first outcome.
    Duplicate(CommandOutcome),
}

impl AppendOutcome {
    pub fn outcome(&self) -> &CommandOutcome {
        match self {
            AppendOutcome::Appended(o) | AppendOutcome::Duplicate(o) => o,
        }
    }

    pub fn into_outcome(self) -> CommandOutcome {
        match self {
            AppendOutcome::Appended(o) | AppendOutcome::Duplicate(o) => o,
        }
    }

    pub fn is_duplicate(&self) -> bool {
        matches!(self, AppendOutcome::Duplicate(_))
    }
}

/// An event as stored in the log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordedEvent {
    pub position: Position,
    pub stream: StreamId,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub recorded_at: DateTime<Utc>,
    pub metadata: EventMetadata,
    pub payload: Value,
}

/// Errors of the event log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Another writer appended to the stream first (optimistic concurrency).
    #[error("conflict on stream {stream}: sequence {sequence} was already written")]
    Conflict { stream: StreamId, sequence: i64 },
    /// `read_all` was asked to read after a position that holds no event.
    #[error("unknown position {0}: no event is stored there")]
    UnknownPosition(Position),
    #[error("invalid append: {0}")]
    InvalidAppend(String),
    #[error("stored event at position {position} is unreadable: {reason}")]
    Corrupt { position: Position, reason: String },
    #[error("the event log is shut down")]
    Closed,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// A database error shared by every command of a failed group commit.
    #[error("database error: {0}")]
    Storage(String),
}

impl LogError {
    /// Whether the database refused the data of the statement (a value it cannot store, a
    /// constraint, a limit) rather than failed as a whole: then one command of a group may be to
    /// blame, and the others can be written without it. PostgreSQL: SQLSTATE classes 22 (data
    /// exception), 23 (integrity) and 54 (program limit exceeded); SQLite: SQLITE_TOOBIG,
    /// SQLITE_CONSTRAINT and SQLITE_MISMATCH. Unique violations are conflicts, not data errors.
    pub(crate) fn is_data_error(&self) -> bool {
        let LogError::Database(sqlx::Error::Database(e)) = self else {
            return matches!(self, LogError::InvalidAppend(_));
        };
        if e.is_unique_violation() {
            return false;
        }
        let Some(code) = e.code() else {
            return false;
        };
        if code.len() == 5 {
            // A PostgreSQL SQLSTATE (SQLite's extended result codes have at most four digits).
            return ["22", "23", "54"]
                .iter()
                .any(|class| code.starts_with(class));
        }
        code.parse::<i32>()
            .is_ok_and(|n| matches!(n & 0xff, 18..=20))
    }
}

/// Which adapter a log runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Postgres => "postgres",
            Backend::Sqlite => "sqlite",
        })
    }
}

/// The event-log port.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// The adapter behind this log.
    fn backend(&self) -> Backend;

    /// Appends one command's events atomically and durably (the call returns after the commit).
    ///
    /// Concurrent appends are committed in groups (one transaction for many commands), so the
    /// throughput is not bounded by one disk flush per command. A command id that was accepted
    /// before appends nothing and returns [`AppendOutcome::Duplicate`] with the first outcome.
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, LogError>;

    /// [`EventLog::append`], and enqueues `jobs` in the same transaction: they exist if and only
    /// if the events were appended (not for a duplicate or a conflict). The store's workers are
    /// woken as by any enqueue. Group commit applies as for appends.
    async fn append_with_jobs(
        &self,
        request: AppendRequest,
        jobs: Vec<NewJob>,
    ) -> Result<AppendOutcome, LogError>;

    /// Starts a transaction in which the caller appends, and later commits, atomically.
    async fn begin(&self) -> Result<Box<dyn LogTransaction>, LogError>;

    /// The events of one stream with a sequence above `after_sequence`, in sequence order.
    async fn read_stream(
        &self,
        stream: &StreamId,
        after_sequence: i64,
    ) -> Result<Vec<RecordedEvent>, LogError>;

    /// The outcome of an accepted command, if that command id was accepted.
    async fn command_outcome(&self, command_id: Uuid) -> Result<Option<CommandOutcome>, LogError>;

    /// Up to `limit` events of all streams with a position above `after`, in position order.
    ///
    /// Positions become visible in increasing order on both adapters (appends are serialised
    /// from drawing their positions to their commit), so a reader that advances to the last event
    /// it got never skips an event that commits later, and nothing but Stele's own appends in
    /// flight can delay one. Fails with [`LogError::UnknownPosition`] when `after` is not
    /// [`Position::START`] and no event is stored there.
    async fn read_all(&self, after: Position, limit: usize)
        -> Result<Vec<RecordedEvent>, LogError>;

    /// The highest position stored; [`Position::START`] for an empty log.
    async fn head(&self) -> Result<Position, LogError>;

    /// Changes whenever events may have been appended (in this process, or, where the adapter can
    /// tell, in another). Subscribers wait on it, with a polling fallback.
    fn appends(&self) -> watch::Receiver<u64>;

    /// Stops background tasks and closes connections.
    async fn close(&self);
}

/// A transaction on the log (see [`EventLog::begin`]). Dropping it without commit rolls back.
#[async_trait]
pub trait LogTransaction: Send {
    /// Appends within the transaction. A conflict or duplicate leaves the transaction usable.
    async fn append(&mut self, request: AppendRequest) -> Result<AppendOutcome, LogError>;

    /// Commits everything appended in it.
    async fn commit(self: Box<Self>) -> Result<(), LogError>;

    /// The transaction's connection, for other tables of the same store (the job queue,
    /// checkpoints) to write in the same transaction.
    fn connection(&mut self) -> TxConnection<'_>;

    /// Runs `hook` after a successful commit (e.g. wake workers for jobs enqueued in it).
    fn after_commit(&mut self, hook: Box<dyn FnOnce() + Send>);

    /// Lets the commit return before the database has flushed it to disk, for writes that can be
    /// derived again from the log (a projection's rows, a process manager's checkpoint and jobs).
    /// A crash of the database itself may lose such a commit, but never without every commit
    /// after it: the write-ahead log is flushed in order, so any durable commit (an append) makes
    /// all earlier ones durable too. Appends in this transaction keep it durable.
    async fn defer_flush(&mut self) -> Result<(), LogError>;
}

/// The connection of a [`LogTransaction`].
pub enum TxConnection<'a> {
    Postgres(&'a mut sqlx::PgConnection),
    Sqlite(&'a mut sqlx::SqliteConnection),
}

/// An append and the jobs to enqueue with it, as the group writer takes them.
#[derive(Clone, Debug)]
pub(crate) struct Append {
    pub(crate) request: AppendRequest,
    pub(crate) jobs: Vec<NewJob>,
    /// The job to insert already claimed by the worker whose job made this append.
    pub(crate) handoff: Option<crate::queue::handoff::Handoff>,
    /// The running job this append records completed when it is written (see
    /// [`crate::queue::completing`]).
    pub(crate) completes: Option<crate::queue::handoff::Completes>,
}

impl Append {
    /// An append made by the current task (a running job's hand-off is picked here).
    pub(crate) fn new(request: AppendRequest, jobs: Vec<NewJob>) -> Self {
        let handoff = crate::queue::handoff::Handoff::pick(&jobs);
        Append {
            request,
            jobs,
            handoff,
            completes: crate::queue::handoff::Completes::pick(),
        }
    }
}

/// The running jobs that the written appends (not those refused as duplicates or conflicts)
/// record completed.
pub(crate) fn written_completions<'a>(
    appends: impl IntoIterator<Item = &'a Append>,
    written: &[Written],
) -> Vec<&'a crate::queue::handoff::Completes> {
    appends
        .into_iter()
        .zip(written)
        .filter(|(_, w)| matches!(w, Written::Appended(_)))
        .filter_map(|(append, _)| append.completes.as_ref())
        .collect()
}

/// The jobs of the appends that were written (not refused as duplicates or conflicts), and the
/// hand-offs among them with their job's index in the list.
pub(crate) fn written_jobs<'a>(
    appends: impl IntoIterator<Item = &'a Append>,
    written: &[Written],
) -> (Vec<NewJob>, Vec<(usize, crate::queue::handoff::Handoff)>) {
    let mut jobs = Vec::new();
    let mut handoffs = Vec::new();
    for (append, _) in appends
        .into_iter()
        .zip(written)
        .filter(|(_, w)| matches!(w, Written::Appended(_)))
    {
        if let Some(handoff) = &append.handoff {
            handoffs.push((jobs.len() + handoff.index, handoff.clone()));
        }
        jobs.extend(append.jobs.iter().cloned());
    }
    (jobs, handoffs)
}

/// After the commit that recorded `completes`' jobs completed: tells their workers, and returns
/// the queues to wake where a completion lets the next job of an ordering key run.
pub(crate) fn completions_committed(
    completes: &[&crate::queue::handoff::Completes],
) -> Vec<String> {
    for completes in completes {
        completes.done();
    }
    crate::queue::queues_of(completes.iter().filter_map(|c| c.wakes()))
}

/// The hand-offs whose job the enqueue inserted (not found enqueued already), with its id.
pub(crate) fn inserted_handoffs(
    enqueued: &[crate::queue::Enqueued],
    handoffs: Vec<(usize, crate::queue::handoff::Handoff)>,
) -> Vec<(crate::queue::handoff::Handoff, Uuid)> {
    handoffs
        .into_iter()
        .filter_map(|(index, handoff)| match enqueued.get(index) {
            Some(crate::queue::Enqueued::Inserted(job)) => Some((handoff, job.id)),
            _ => None,
        })
        .collect()
}

/// The queues whose workers an enqueue wakes: those of the jobs not handed off.
pub(crate) fn queues_to_wake(
    enqueued: &[crate::queue::Enqueued],
    handed: &[(crate::queue::handoff::Handoff, crate::queue::Job)],
) -> Vec<String> {
    crate::queue::queues_of(
        enqueued
            .iter()
            .map(crate::queue::Enqueued::job)
            .filter(|job| !handed.iter().any(|(_, h)| h.id == job.id))
            .map(|job| job.queue.as_str()),
    )
}

impl LogError {
    /// A queue's refusal of an append's jobs, as the append's error.
    pub(crate) fn from_queue(error: crate::queue::QueueError) -> Self {
        match error {
            crate::queue::QueueError::Database(e) => LogError::Database(e),
            other => LogError::InvalidAppend(other.to_string()),
        }
    }
}

/// Checks the jobs of an append before it reaches a database.
pub(crate) fn validate_jobs(jobs: &[NewJob]) -> Result<(), LogError> {
    crate::queue::validate(jobs).map_err(|e| LogError::InvalidAppend(e.to_string()))
}

/// Called after a commit that enqueued jobs (wakes the store's workers).
/// Wakes the workers of the queues named (after a commit that enqueued jobs on them).
pub(crate) type WakeQueues = Arc<dyn Fn(&[String]) + Send + Sync>;

pub(crate) type JobsHook = std::sync::OnceLock<WakeQueues>;

/// Checks the shape of a request before it reaches a database.
pub(crate) fn validate(request: &AppendRequest) -> Result<(), LogError> {
    if request.events.is_empty() {
        return Err(LogError::InvalidAppend(
            "an append needs at least one event".into(),
        ));
    }
    if request.expected_sequence < 0 {
        return Err(LogError::InvalidAppend(format!(
            "expected sequence {} is negative",
            request.expected_sequence
        )));
    }
    if request
        .expected_sequence
        .checked_add(request.events.len() as i64)
        .is_none()
    {
        return Err(LogError::InvalidAppend(format!(
            "expected sequence {} leaves no room for {} events",
            request.expected_sequence,
            request.events.len()
        )));
    }
    if request.stream.aggregate_type.is_empty() || request.stream.aggregate_id.is_empty() {
        return Err(LogError::InvalidAppend(
            "aggregate type and id must not be empty".into(),
        ));
    }
    let names = [
        ("aggregate type", request.stream.aggregate_type.as_str()),
        ("aggregate id", request.stream.aggregate_id.as_str()),
    ];
    let event_types = request.events.iter().flat_map(|e| {
        [
            ("event type", e.event_type.as_str()),
            ("event version", e.event_version.as_str()),
        ]
    });
    for (what, value) in names.into_iter().chain(event_types) {
        if value.len() > MAX_NAME_BYTES {
            return Err(LogError::InvalidAppend(format!(
                "the {what} is {} bytes long; at most {MAX_NAME_BYTES} are allowed",
                value.len()
            )));
        }
        if value.contains('\0') {
            return Err(LogError::InvalidAppend(format!(
                "the {what} contains a NUL character (U+0000), which the log does not store"
            )));
        }
    }
    for event in &request.events {
        if has_nul(&event.payload) {
            return Err(LogError::InvalidAppend(format!(
                "the payload of a {} event contains a NUL character (U+0000), which the log does \
                 not store",
                event.event_type
            )));
        }
        if depth(&event.payload) > MAX_PAYLOAD_DEPTH {
            return Err(LogError::InvalidAppend(format!(
                "the payload of a {} event nests more than {MAX_PAYLOAD_DEPTH} levels deep",
                event.event_type
            )));
        }
    }
    Ok(())
}

/// Deepest nesting of arrays and objects in a payload: deeper ones could be stored but not read
/// back (serde_json's parser stops at 128 levels).
pub const MAX_PAYLOAD_DEPTH: usize = 100;

fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Longest stream type, stream id, event type or version, in bytes (PostgreSQL cannot index much
/// longer keys; the same rule holds on SQLite so that both stores accept the same commands).
pub const MAX_NAME_BYTES: usize = 512;

/// Whether a JSON value holds U+0000 in a string or a key: PostgreSQL's `jsonb` and `text` cannot
/// store it, so neither store accepts it (the same rule on both backends).
pub fn has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// Per request of a group, what the database did with it.
#[derive(Debug)]
pub(crate) enum Written {
    Appended(CommandOutcome),
    /// The command id was accepted before (or earlier in the same group).
    Duplicate,
    Conflict(i64),
}

impl Written {
    fn conflict_error(&self, request: &AppendRequest) -> Option<LogError> {
        match self {
            Written::Conflict(sequence) => Some(LogError::Conflict {
                stream: request.stream.clone(),
                sequence: *sequence,
            }),
            _ => None,
        }
    }
}

/// The JSON text of a payload or metadata, as stored.
pub(crate) fn json_text<T: Serialize>(value: &T) -> Result<String, LogError> {
    serde_json::to_string(value).map_err(|e| LogError::InvalidAppend(e.to_string()))
}
