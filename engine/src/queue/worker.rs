//! Workers: claim jobs of one queue in batches, run each with its handler under a timeout and a
//! lease that is extended while it runs, and report outcomes in batches.
//!
//! A handler that fails (or panics, or times out) fails its job, which is then retried or dead
//! lettered by the queue; the worker lives on. On shutdown a worker stops claiming, lets running
//! jobs finish until a deadline, and releases the rest (they run again, the attempt not counted).

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use futures::FutureExt;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::{AbortHandle, JoinSet};
use tracing::Instrument;
use uuid::Uuid;

use super::{handoff, Job, JobQueue, Outcome, QueueError};

/// What a handler asks for when it does not fail.
#[derive(Clone, Debug, PartialEq)]
pub enum Done {
    Complete,
    /// Run again after this long; the attempt does not count.
    Snooze(Duration),
    /// Stop: the job will not run again.
    Cancel(String),
}

/// A handler's result: `Err` fails the attempt; the job records the error with its causes.
pub type HandlerResult = Result<Done, HandlerError>;

/// Why a handler failed: any error, kept with its source chain until the job records it as
/// "what failed: why: the cause …" (see [`HandlerError::report`]).
#[derive(Debug)]
pub struct HandlerError(Box<dyn std::error::Error + Send + Sync + 'static>);

impl HandlerError {
    /// A failure described in words only.
    pub fn msg(message: impl Into<String>) -> Self {
        HandlerError(message.into().into())
    }

    /// The error and every cause, outermost first, joined by `: `, as the job records it.
    pub fn report(&self) -> String {
        let mut text = self.0.to_string();
        let mut source = self.0.source();
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            // thiserror's `transparent` and `{0}` wrappers repeat their source's text.
            if !text.ends_with(&cause_text) {
                text.push_str(": ");
                text.push_str(&cause_text);
            }
            source = cause.source();
        }
        text
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.report())
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(error: E) -> Self {
        HandlerError(Box::new(error))
    }
}

type HandlerFuture = Pin<Box<dyn Future<Output = HandlerResult> + Send>>;
type Handler = Arc<dyn Fn(Job) -> HandlerFuture + Send + Sync>;

/// How a worker runs.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// Identifies this worker in leases (`locked_by`).
    pub id: String,
    pub queue: String,
    /// Jobs running at once.
    pub concurrency: usize,
    /// Most jobs claimed per query.
    pub claim_batch: usize,
    /// Jobs claimed ahead of free capacity and kept ready (leased) in this worker, so that a
    /// finishing job is followed at once by the next without a round trip.
    pub prefetch: usize,
    /// How long a lease lasts; it is extended every third of it while the job runs, so a job of a
    /// dead worker is rescued within this time.
    pub lease: Duration,
    /// Wait this long for a wake-up before looking for jobs anyway.
    pub poll_interval: Duration,
    /// How often this worker rescues jobs whose lease expired.
    pub rescue_interval: Duration,
    /// On shutdown, how long running jobs may take to finish.
    pub shutdown_grace: Duration,
    /// How long completed and cancelled jobs are kept before this worker prunes them (`None`:
    /// never; dead jobs are always kept until retried).
    pub retention: Option<Duration>,
}

impl WorkerOptions {
    pub fn new(queue: impl Into<String>) -> Self {
        Self {
            id: format!("worker-{}", Uuid::now_v7().simple()),
            queue: queue.into(),
            concurrency: 8,
            claim_batch: 64,
            prefetch: 0,
            // Short, so that the jobs of a process that died run again within seconds; extended
            // every third of it while a job runs.
            lease: Duration::from_secs(10),
            poll_interval: Duration::from_secs(1),
            rescue_interval: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(30),
            retention: Some(Duration::from_secs(24 * 3600)),
        }
    }
}

/// A worker of one queue with handlers by job kind.
pub struct Worker {
    queue: Arc<dyn JobQueue>,
    handlers: HashMap<String, Handler>,
    options: WorkerOptions,
}

impl Worker {
    pub fn new(queue: Arc<dyn JobQueue>, options: WorkerOptions) -> Self {
        Self {
            queue,
            handlers: HashMap::new(),
            options,
        }
    }

    /// Runs jobs of `kind` with `handler`.
    pub fn handle<F, Fut>(mut self, kind: impl Into<String>, handler: F) -> Self
    where
        F: Fn(Job) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        self.handlers
            .insert(kind.into(), Arc::new(move |job| Box::pin(handler(job))));
        self
    }

    pub fn options(&self) -> &WorkerOptions {
        &self.options
    }

    /// Claims one batch, runs it to the end and records the outcomes. Returns how many jobs ran
    /// (0: nothing was runnable). For tests and tools that drive a worker step by step.
    pub async fn step(&self) -> Result<usize, QueueError> {
        let jobs = self
            .queue
            .claim(
                &self.options.queue,
                &self.options.id,
                self.options.claim_batch,
                self.options.lease,
            )
            .await?;
        let count = jobs.len();
        let mut running = JoinSet::new();
        for job in jobs {
            let handler = self.handlers.get(&job.kind).cloned();
            running.spawn(async move { (job.id, run_one(handler, job).await) });
        }
        let mut outcomes = Vec::with_capacity(count);
        while let Some(done) = running.join_next().await {
            outcomes.push(done.expect("run_one catches panics"));
        }
        self.queue.finish(&self.options.id, outcomes).await?;
        Ok(count)
    }

    /// Runs until `shutdown` resolves, then stops claiming, lets running jobs finish until the
    /// grace period ends and releases the rest.
    ///
    /// Claiming runs in its own task and keeps up to `prefetch` (at least one) claimed jobs ready
    /// beside the running ones, so the next claim overlaps the jobs running now.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), QueueError> {
        let Worker {
            queue,
            handlers,
            options,
        } = self;
        let concurrency = options.concurrency.max(1);
        // Claimed jobs waiting for a free slot (at least one, so the next job is at hand).
        let capacity = options.prefetch.max(1);
        let permits = Arc::new(Semaphore::new(concurrency));
        let running: Arc<Mutex<HashMap<Uuid, Option<AbortHandle>>>> = Arc::default();
        let (outcomes, finished) = mpsc::unbounded_channel::<(Uuid, Outcome)>();
        let reporter = tokio::spawn(report(
            queue.clone(),
            options.id.clone(),
            finished,
            running.clone(),
        ));
        let keeper = tokio::spawn(keep_leases(queue.clone(), options.clone(), running.clone()));
        // Jobs handed off by the appends of running jobs' handlers, already claimed (see
        // [`super::handoff`]): they run next, each in the slot of the job that handed it off.
        let (handed_tx, mut handed) = mpsc::unbounded_channel::<Job>();
        let offer = Arc::new(handoff::Worker {
            id: options.id.clone(),
            queue: options.queue.clone(),
            lease: options.lease,
            kinds: handlers.keys().cloned().collect(),
            hold: Box::new({
                let running = running.clone();
                move |job: &Job| {
                    running.lock().expect("running lock").insert(job.id, None);
                }
            }),
            deliver: Box::new({
                let handed_tx = handed_tx.clone();
                move |job: Job| {
                    let _ = handed_tx.send(job);
                }
            }),
            forget: Box::new({
                let running = running.clone();
                move |id: Uuid| {
                    running.lock().expect("running lock").remove(&id);
                }
            }),
        });
        let (ready_tx, mut ready) = mpsc::channel::<Job>(capacity);
        let taken = Arc::new(tokio::sync::Notify::new());
        let (stop_claiming, claiming_stopped) = watch::channel(false);
        let mut claimer = tokio::spawn(claim_ahead(
            queue.clone(),
            options.clone(),
            ready_tx,
            taken.clone(),
            running.clone(),
            permits.clone(),
            claiming_stopped,
        ));
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);

        loop {
            let permit = tokio::select! {
                _ = &mut shutdown => break,
                permit = permits.clone().acquire_owned() => permit.expect("semaphore open"),
            };
            let job = tokio::select! {
                biased;
                _ = &mut shutdown => break,
                Some(job) = handed.recv() => job,
                job = ready.recv() => match job {
                    Some(job) => {
                        taken.notify_one();
                        job
                    }
                    None => break,
                },
            };
            if !running.lock().expect("running lock").contains_key(&job.id) {
                // Cancelled or rescued while it waited here.
                continue;
            }
            let handler = handlers.get(&job.kind).cloned();
            let outcomes = outcomes.clone();
            let id = job.id;
            let slot = handoff::Slot::new(offer.clone(), &job);
            let handle = tasks.spawn(async move {
                let guard = handoff::SlotGuard(slot.clone());
                let outcome = handoff::running(slot.clone(), run_one(handler, job)).await;
                // What it handed off runs next, before this job's outcome is written (on SQLite's
                // single writer, the next step's append then goes first).
                drop(guard);
                if slot.completed() {
                    // Its append recorded it completed (see `handoff::completing`) and the
                    // worker stopped counting it then.
                    if let Outcome::Failed { error } = &outcome {
                        tracing::warn!(job.id = %id, %error,
                            "the job failed after its append recorded it completed");
                    }
                } else {
                    let _ = outcomes.send((id, outcome));
                }
                drop(permit);
            });
            if let Some(slot) = running.lock().expect("running lock").get_mut(&id) {
                *slot = Some(handle);
            }
            // Reap finished tasks without waiting.
            while tasks.try_join_next().is_some() {}
        }

        // Shutdown: no more claims; claimed jobs that did not start go back at once. A claim in
        // flight ends first (aborted, what it claimed would be known to no one until its lease
        // ran out, and its attempt counted), unless the database keeps it waiting.
        let _ = stop_claiming.send(true);
        if tokio::time::timeout(Duration::from_secs(5), &mut claimer)
            .await
            .is_err()
        {
            claimer.abort();
            let _ = claimer.await;
        }
        ready.close();
        while ready.recv().await.is_some() {}
        release_unstarted(&running, &outcomes);
        // Running jobs get the grace period.
        let drained = tokio::time::timeout(options.shutdown_grace, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        // And what they handed off meanwhile goes back too.
        handed.close();
        while handed.recv().await.is_some() {}
        release_unstarted(&running, &outcomes);
        if drained.is_err() {
            let left: Vec<Uuid> = running
                .lock()
                .expect("running lock")
                .iter()
                .filter(|(_, handle)| handle.is_some())
                .map(|(id, _)| *id)
                .collect();
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
            tracing::warn!(
                jobs = left.len(),
                "shutdown grace period over; releasing jobs"
            );
            for id in left {
                let _ = outcomes.send((id, Outcome::Snoozed { until: Utc::now() }));
            }
        }
        drop(outcomes);
        keeper.abort();
        let _ = reporter.await;
        Ok(())
    }
}

/// Releases (snoozes until now) the claimed jobs that did not start.
fn release_unstarted(
    running: &Mutex<HashMap<Uuid, Option<AbortHandle>>>,
    outcomes: &mpsc::UnboundedSender<(Uuid, Outcome)>,
) {
    let mut running = running.lock().expect("running lock");
    let unstarted: Vec<Uuid> = running
        .iter()
        .filter(|(_, handle)| handle.is_none())
        .map(|(id, _)| *id)
        .collect();
    for id in unstarted {
        running.remove(&id);
        let _ = outcomes.send((id, Outcome::Snoozed { until: Utc::now() }));
    }
}

/// Keeps the worker's supply of claimed jobs filled: claims when at least half a batch of room is
/// free (or the supply ran dry), else waits for jobs to be taken, for a wake-up, or polls. A
/// claim asks for the room in the supply and for every idle slot besides (`permits`), at most a
/// batch: those jobs start as soon as they are handed over, and a burst fills the free slots in
/// one claim rather than one claim per slot.
async fn claim_ahead(
    queue: Arc<dyn JobQueue>,
    options: WorkerOptions,
    ready: mpsc::Sender<Job>,
    taken: Arc<tokio::sync::Notify>,
    running: Arc<Mutex<HashMap<Uuid, Option<AbortHandle>>>>,
    permits: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let mut wakeups = queue.wakeups_of(&options.queue);
    let batch = options.claim_batch.max(1);
    let threshold = (batch / 2).max(1);
    loop {
        if *stop.borrow() {
            return;
        }
        let room = ready.capacity();
        let dry = room == ready.max_capacity();
        if room < threshold.min(ready.max_capacity()) && !dry {
            tokio::select! {
                _ = taken.notified() => {}
                _ = stop.changed() => return,
            }
            continue;
        }
        wakeups.borrow_and_update();
        let asked = (room + permits.available_permits()).min(batch);
        let jobs = match queue
            .claim(&options.queue, &options.id, asked, options.lease)
            .await
        {
            Ok(jobs) => jobs,
            Err(e) => {
                tracing::warn!(error = %e, queue = %options.queue, "claim failed");
                Vec::new()
            }
        };
        if jobs.is_empty() {
            tokio::select! {
                _ = wakeups.changed() => {}
                _ = tokio::time::sleep(options.poll_interval) => {}
                _ = stop.changed() => return,
            }
            continue;
        }
        {
            let mut running = running.lock().expect("running lock");
            for job in &jobs {
                running.insert(job.id, None);
            }
        }
        // Fewer than asked: nothing else was runnable, as after an empty claim. Claiming again
        // at once would find nothing; wait for a wake-up (one that came during the claim counts).
        let exhausted = jobs.len() < asked;
        for job in jobs {
            // Stopping: the jobs not handed over are in `running`, and go back from there.
            tokio::select! {
                sent = ready.send(job) => if sent.is_err() { return },
                _ = stop.changed() => return,
            }
        }
        if exhausted {
            tokio::select! {
                _ = wakeups.changed() => {}
                _ = tokio::time::sleep(options.poll_interval) => {}
                _ = stop.changed() => return,
            }
        }
    }
}

/// Runs one job: its handler under the job's timeout, panics caught, in a span that follows the
/// trace the job's payload names (see [`crate::trace`]). Counts the outcome
/// (`stele_jobs_finished_total` by kind and outcome) and times it (`stele_job_duration_seconds`).
async fn run_one(handler: Option<Handler>, job: Job) -> Outcome {
    let kind = job.kind.clone();
    let span = tracing::info_span!(
        "job",
        otel.name = %kind,
        otel.kind = "consumer",
        job.id = %job.id,
        job.queue = %job.queue,
        job.attempt = job.attempt,
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
    );
    if let Some(parent) = job
        .payload
        .get(crate::trace::PAYLOAD_KEY)
        .and_then(|value| value.as_str())
    {
        crate::trace::follow(&span, parent);
    }
    let started = std::time::Instant::now();
    let outcome = attempt(handler, job).instrument(span.clone()).await;
    if let Outcome::Failed { error } = &outcome {
        span.record("otel.status_code", "error");
        span.record("otel.status_description", error.as_str());
    }
    let label = match &outcome {
        Outcome::Completed => "completed",
        Outcome::Failed { .. } => "failed",
        Outcome::Snoozed { .. } => "snoozed",
        Outcome::Cancelled { .. } => "cancelled",
    };
    metrics::counter!("stele_jobs_finished_total", "kind" => kind.clone(), "outcome" => label)
        .increment(1);
    metrics::histogram!("stele_job_duration_seconds", "kind" => kind)
        .record(started.elapsed().as_secs_f64());
    outcome
}

async fn attempt(handler: Option<Handler>, job: Job) -> Outcome {
    let Some(handler) = handler else {
        return Outcome::Failed {
            error: format!("no handler for job kind {:?}", job.kind),
        };
    };
    let timeout = job.timeout();
    let attempt = AssertUnwindSafe(handler(job)).catch_unwind();
    match tokio::time::timeout(timeout, attempt).await {
        Err(_) => Outcome::Failed {
            error: format!("timed out after {timeout:?}"),
        },
        Ok(Err(panic)) => Outcome::Failed {
            error: format!("handler panicked: {}", panic_message(panic.as_ref())),
        },
        Ok(Ok(Err(error))) => Outcome::Failed {
            error: error.report(),
        },
        Ok(Ok(Ok(Done::Complete))) => Outcome::Completed,
        Ok(Ok(Ok(Done::Snooze(after)))) => Outcome::Snoozed {
            until: Utc::now() + chrono::Duration::from_std(after).unwrap_or_default(),
        },
        Ok(Ok(Ok(Done::Cancel(reason)))) => Outcome::Cancelled { reason },
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Records outcomes in batches: everything that finished while the previous batch was written.
async fn report(
    queue: Arc<dyn JobQueue>,
    worker: String,
    mut finished: mpsc::UnboundedReceiver<(Uuid, Outcome)>,
    running: Arc<Mutex<HashMap<Uuid, Option<AbortHandle>>>>,
) {
    let mut batch = Vec::new();
    while let Some(first) = finished.recv().await {
        batch.push(first);
        while let Ok(more) = finished.try_recv() {
            batch.push(more);
        }
        {
            let mut running = running.lock().expect("running lock");
            for (id, _) in &batch {
                running.remove(id);
            }
        }
        let outcomes = std::mem::take(&mut batch);
        // Retried until it goes through: an outcome lost here would make the job run again
        // after its lease expires.
        let mut wait = Duration::from_millis(50);
        while let Err(e) = queue.finish(&worker, outcomes.clone()).await {
            tracing::warn!(error = %e, jobs = outcomes.len(), "recording job outcomes failed; retrying");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }
}

/// Extends the leases of running jobs, stops jobs that are no longer this worker's (cancelled or
/// rescued), and rescues jobs of dead workers.
async fn keep_leases(
    queue: Arc<dyn JobQueue>,
    options: WorkerOptions,
    running: Arc<Mutex<HashMap<Uuid, Option<AbortHandle>>>>,
) {
    let mut extend = tokio::time::interval(options.lease / 3);
    let mut rescue = tokio::time::interval(options.rescue_interval);
    let mut prune = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = extend.tick() => {
                let ids: Vec<Uuid> = running.lock().expect("running lock").keys().copied().collect();
                match queue.extend_leases(&options.id, &ids, options.lease).await {
                    Ok(lost) => {
                        let mut running = running.lock().expect("running lock");
                        for id in lost {
                            if let Some(Some(task)) = running.remove(&id) {
                                tracing::info!(job = %id, "job no longer ours (cancelled or rescued); stopping it");
                                task.abort();
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "extending leases failed"),
                }
            }
            _ = prune.tick() => {
                let Some(retention) = options.retention else { continue };
                let before = Utc::now() - chrono::Duration::from_std(retention).unwrap_or_default();
                match queue.prune(before).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(jobs = n, "pruned finished jobs"),
                    Err(e) => tracing::warn!(error = %e, "pruning finished jobs failed"),
                }
            }
            _ = rescue.tick() => {
                match queue.rescue_expired().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(jobs = n, "rescued jobs with expired leases"),
                    Err(e) => tracing::warn!(error = %e, "rescuing expired leases failed"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::HandlerError;

    #[derive(Debug, thiserror::Error)]
    #[error("recording on task/t-1 failed")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    enum Middle {
        #[error(transparent)]
        Io(#[from] std::io::Error),
    }

    #[test]
    fn a_handler_error_is_recorded_with_what_failed_and_why() {
        let error: HandlerError = Outer(Middle::Io(std::io::Error::other("disk full"))).into();
        assert_eq!(error.report(), "recording on task/t-1 failed: disk full");
        assert_eq!(HandlerError::msg("plain").report(), "plain");
    }
}
