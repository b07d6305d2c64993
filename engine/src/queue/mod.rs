//! The durable job queue: agent steps, outgoing emails and chat replies run as jobs.
//!
//! A job is enqueued (optionally inside the caller's transaction, so it exists if and only if that
//! transaction commits), claimed in batches by workers that hold a lease on it while it runs, and
//! finished: completed, failed (retried with exponential backoff and jitter, then kept as dead
//! with every attempt's error), cancelled or snoozed. A job whose lease expires (its worker died)
//! is rescued and retried. Jobs that share an ordering key run one at a time, in enqueue order.
//!
//! The port is [`JobQueue`]; [`postgres::PgJobQueue`] and [`sqlite::SqliteJobQueue`] implement
//! it, and both pass the same conformance suite (`engine/tests/queue_conformance.rs`). The state
//! machine is drawn in `docs/job-states.md`.

pub(crate) mod handoff;
pub mod postgres;
pub mod sqlite;
pub mod worker;

pub use handoff::completing;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;
use uuid::Uuid;

use crate::log::LogTransaction;

/// Where a job is in its life (see `docs/job-states.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting to run, now or at `run_at` (a delayed job, or a retry after backoff).
    Available,
    /// Claimed by a worker that holds a lease on it.
    Running,
    /// Finished successfully.
    Completed,
    /// Failed on its last allowed attempt; kept with every attempt's error until retried.
    Dead,
    /// Cancelled by an operator or a program.
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 5] = [
        JobState::Available,
        JobState::Running,
        JobState::Completed,
        JobState::Dead,
        JobState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Available => "available",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Dead => "dead",
            JobState::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| {
                format!("unknown job state {s:?} (expected available, running, completed, dead or cancelled)")
            })
    }
}

/// A job to enqueue.
#[derive(Clone, Debug, PartialEq)]
pub struct NewJob {
    pub queue: String,
    pub kind: String,
    pub payload: Value,
    /// Higher runs first.
    pub priority: i16,
    /// Not before this time (a delayed job); now when `None`.
    pub run_at: Option<DateTime<Utc>>,
    pub max_attempts: i32,
    /// How long one attempt may run before it is failed.
    pub timeout: Duration,
    /// Jobs with the same key run one at a time, in enqueue order.
    pub ordering_key: Option<String>,
    /// While a job with this key is available or running, enqueuing another returns it instead.
    pub idempotency_key: Option<String>,
}

impl NewJob {
    /// A job with the defaults: priority 0, now, 25 attempts, 5 minute timeout.
    pub fn new(queue: impl Into<String>, kind: impl Into<String>, payload: Value) -> Self {
        Self {
            queue: queue.into(),
            kind: kind.into(),
            payload,
            priority: 0,
            run_at: None,
            max_attempts: 25,
            timeout: Duration::from_secs(300),
            ordering_key: None,
            idempotency_key: None,
        }
    }

    pub fn priority(mut self, priority: i16) -> Self {
        self.priority = priority;
        self
    }

    pub fn run_at(mut self, at: DateTime<Utc>) -> Self {
        self.run_at = Some(at);
        self
    }

    pub fn max_attempts(mut self, attempts: i32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn ordering_key(mut self, key: impl Into<String>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }

    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }
}

/// One failed attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptError {
    pub attempt: i32,
    pub at: DateTime<Utc>,
    pub error: String,
}

/// A job as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: Uuid,
    pub queue: String,
    pub kind: String,
    pub payload: Value,
    pub state: JobState,
    pub priority: i16,
    pub run_at: DateTime<Utc>,
    /// Attempts started so far.
    pub attempt: i32,
    pub max_attempts: i32,
    pub timeout_ms: i64,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub locked_by: Option<String>,
    pub ordering_key: Option<String>,
    pub idempotency_key: Option<String>,
    pub last_error: Option<String>,
    pub errors: Vec<AttemptError>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl Job {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.max(0) as u64)
    }
}

/// The result of enqueuing one job.
#[derive(Clone, Debug, PartialEq)]
pub enum Enqueued {
    Inserted(Job),
    /// A job with the same idempotency key is available or running: that job.
    Existing(Job),
}

impl Enqueued {
    pub fn job(&self) -> &Job {
        match self {
            Enqueued::Inserted(job) | Enqueued::Existing(job) => job,
        }
    }
}

/// How an attempt ended, as told by the worker.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Completed,
    /// Retry after backoff, or dead when attempts are used up.
    Failed {
        error: String,
    },
    /// Run again at `until`; the attempt does not count.
    Snoozed {
        until: DateTime<Utc>,
    },
    /// Do not run again.
    Cancelled {
        reason: String,
    },
}

/// Filters for listing jobs.
#[derive(Clone, Debug, Default)]
pub struct JobFilter {
    pub state: Option<JobState>,
    pub queue: Option<String>,
    pub kind: Option<String>,
    pub limit: usize,
}

/// Queue errors.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("no job {0}")]
    NotFound(Uuid),
    #[error("job {id} is {state}: {action} is not possible")]
    WrongState {
        id: Uuid,
        state: JobState,
        action: &'static str,
    },
    #[error("invalid job: {0}")]
    Invalid(String),
    #[error("stored job {id} is unreadable: {reason}")]
    Corrupt { id: String, reason: String },
    #[error("this transaction belongs to another kind of store")]
    ForeignTransaction,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Backoff before retry `attempt` (1-based): exponential, capped at an hour, with ±10% jitter
/// so that jobs failing together do not retry together.
pub fn backoff(attempt: i32) -> Duration {
    let base = 2f64.powi(attempt.clamp(1, 20)).min(3600.0);
    let jitter = 1.0 + (rand::random::<f64>() - 0.5) * 0.2;
    Duration::from_secs_f64(base * jitter)
}

/// The job-queue port.
#[async_trait]
pub trait JobQueue: Send + Sync + 'static {
    /// Enqueues jobs (one transaction). An idempotency key already available or running returns
    /// that job.
    async fn enqueue(&self, jobs: Vec<NewJob>) -> Result<Vec<Enqueued>, QueueError>;

    /// Enqueues jobs inside the caller's transaction: they exist if and only if it commits.
    async fn enqueue_in(
        &self,
        tx: &mut dyn LogTransaction,
        jobs: Vec<NewJob>,
    ) -> Result<Vec<Enqueued>, QueueError>;

    /// Claims up to `limit` runnable jobs of `queue` for `worker`, each leased for `lease` (the
    /// worker extends the lease while the job runs). Jobs are taken by priority, then run time,
    /// then enqueue order; of the jobs that share an ordering key, only the oldest unfinished one
    /// is runnable.
    async fn claim(
        &self,
        queue: &str,
        worker: &str,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<Job>, QueueError>;

    /// Extends the leases of `worker`'s running jobs; returns the ids that are no longer running
    /// under this worker (cancelled, or rescued after an expired lease): their work should stop.
    async fn extend_leases(
        &self,
        worker: &str,
        ids: &[Uuid],
        lease: Duration,
    ) -> Result<Vec<Uuid>, QueueError>;

    /// Records how attempts ended, for jobs `worker` still runs (others are left alone).
    async fn finish(&self, worker: &str, outcomes: Vec<(Uuid, Outcome)>) -> Result<(), QueueError>;

    /// Makes running jobs whose lease expired runnable again (or dead, if that was their last
    /// attempt). Returns how many were rescued.
    async fn rescue_expired(&self) -> Result<usize, QueueError>;

    /// Cancels an available or running job.
    async fn cancel(&self, id: Uuid) -> Result<Job, QueueError>;

    /// How many jobs each queue holds in each state (for the queue-depth gauges).
    async fn depth(&self) -> Result<Vec<(String, JobState, i64)>, QueueError>;

    /// Cancels the available or running jobs that carry one of these idempotency keys (a
    /// cancelled workflow run cancels its queued steps); returns them. Keys with no such job are
    /// skipped.
    async fn cancel_keyed(&self, keys: &[String]) -> Result<Vec<Job>, QueueError>;

    /// Makes a dead or cancelled job runnable again with a fresh set of attempts.
    async fn retry(&self, id: Uuid) -> Result<Job, QueueError>;

    async fn get(&self, id: Uuid) -> Result<Option<Job>, QueueError>;

    async fn list(&self, filter: JobFilter) -> Result<Vec<Job>, QueueError>;

    /// Deletes completed and cancelled jobs finished before `before`; returns how many.
    async fn prune(&self, before: DateTime<Utc>) -> Result<u64, QueueError>;

    /// Changes when jobs may have been enqueued or become runnable; workers wait on it, with a
    /// polling fallback.
    fn wakeups(&self) -> watch::Receiver<u64>;

    /// Like [`JobQueue::wakeups`], for the jobs of `queue` only (where the adapter can tell
    /// queues apart; else every wake-up).
    fn wakeups_of(&self, queue: &str) -> watch::Receiver<u64> {
        let _ = queue;
        self.wakeups()
    }

    async fn close(&self);
}

/// Checks jobs before they reach a database.
pub(crate) fn validate(jobs: &[NewJob]) -> Result<(), QueueError> {
    for job in jobs {
        if job.queue.is_empty() || job.kind.is_empty() {
            return Err(QueueError::Invalid(
                "queue and kind must not be empty".into(),
            ));
        }
        if job.max_attempts < 1 {
            return Err(QueueError::Invalid(
                "max_attempts must be at least 1".into(),
            ));
        }
        if job.timeout.is_zero() {
            return Err(QueueError::Invalid("timeout must be positive".into()));
        }
    }
    Ok(())
}

/// How many jobs each queue holds in each state; the same statement on both stores.
pub(crate) const DEPTH: &str =
    "SELECT queue, state, count(*) AS jobs FROM jobs GROUP BY queue, state";

/// The rows of [`DEPTH`] (queue, state, jobs), their states parsed.
pub(crate) fn depth_of(
    rows: Vec<(String, String, i64)>,
) -> Result<Vec<(String, JobState, i64)>, QueueError> {
    rows.into_iter()
        .map(|(queue, state, jobs)| {
            let state = state
                .parse::<JobState>()
                .map_err(|reason| QueueError::Corrupt {
                    id: "depth".into(),
                    reason,
                })?;
            Ok((queue, state, jobs))
        })
        .collect()
}

/// Why an operation found no job in the state it needs: missing, or in which state.
pub(crate) async fn refusal(queue: &dyn JobQueue, id: Uuid, action: &'static str) -> QueueError {
    match queue.get(id).await {
        Ok(Some(job)) => QueueError::WrongState {
            id,
            state: job.state,
            action,
        },
        Ok(None) => QueueError::NotFound(id),
        Err(e) => e,
    }
}

/// Orders claimed jobs as the claim picked them: priority first, then run time, then age (ids are
/// time-ordered UUIDv7).
pub(crate) fn in_claim_order(jobs: &mut [Job]) {
    jobs.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then(a.run_at.cmp(&b.run_at))
            .then(a.id.cmp(&b.id))
    });
}

/// The queues named, each once (of jobs enqueued, to wake their workers).
pub(crate) fn queues_of<'a>(queues: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut queues: Vec<String> = queues.into_iter().map(str::to_owned).collect();
    queues.sort_unstable();
    queues.dedup();
    queues
}
