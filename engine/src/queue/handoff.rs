//! Hand-off: a job that a running job's handler enqueues with an append, for the worker's own
//! queue and a kind it handles, is inserted already claimed by that worker (running, attempt 1,
//! leased) in the append's commit, and runs on that worker next, without a claim or a wake-up.
//! A workflow's next step follows the step that scheduled it at once.
//!
//! At most one job per running job is handed off, so a worker's load stays what it was: the
//! running job's slot passes to the job it handed off. Jobs with an ordering key or a later run
//! time are not handed off (a claim decides when they may run); nor are jobs enqueued outside an
//! append ([`crate::JobQueue::enqueue`]) or in a caller's transaction.
//!
//! Why no guarantee is lost: the job and its claim commit with the events that decided it, so it
//! exists exactly when they do, as any job enqueued with an append. A handed-off job is this
//! worker's from the commit on, like a claimed one: its lease is extended while the worker lives
//! and it is rescued when the worker dies before finishing it (its lease expires).
//!
//! Completing with the append: a handler whose last act is an append (a workflow step records its
//! outcome) runs that part under [`completing`]; the append that commits then also records the
//! running job completed, in the same commit, and the worker writes no outcome of its own. The job
//! is completed exactly when the events it was run for exist, so a crash can no longer run it a
//! second time for nothing, and a step costs one commit instead of two.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use uuid::Uuid;

use super::{Job, JobState, NewJob};

tokio::task_local! {
    /// The worker running the current job, for the appends its handler makes.
    static RUNNING: Arc<Slot>;
}

/// What a worker offers the jobs it runs: its identity, and where handed-off jobs go.
pub(crate) struct Worker {
    pub(crate) id: String,
    pub(crate) queue: String,
    pub(crate) lease: Duration,
    pub(crate) kinds: HashSet<String>,
    /// Counts a handed-off job among the worker's (its lease is kept from now on).
    pub(crate) hold: Box<dyn Fn(&Job) + Send + Sync>,
    /// Gives a handed-off job to the worker to run.
    pub(crate) deliver: Box<dyn Fn(Job) + Send + Sync>,
    /// Stops counting a job among the worker's: its append completed it (no lease to keep, and
    /// the job's absence from the queue's running jobs is no reason to stop its handler).
    pub(crate) forget: Box<dyn Fn(Uuid) + Send + Sync>,
}

/// One running job's chance to hand off, and to be completed by its own append.
pub(crate) struct Slot {
    worker: Arc<Worker>,
    state: Mutex<SlotState>,
    /// The running job.
    job: Uuid,
    /// Its queue, to wake when an append completes it and it has an ordering key (`ordered`):
    /// the key's next job may run.
    queue: String,
    ordered: bool,
    /// The handler runs its last part ([`completing`]): an append completes the job.
    completing: AtomicBool,
    /// An append recorded the job completed.
    completed: AtomicBool,
}

enum SlotState {
    /// The job runs; it may have handed off one job, which runs when it is done (so the job
    /// runs after everything its handler did after the append, in the slot it frees).
    Running(Option<Box<Job>>),
    /// The handler returned: a hand-off committed after (a handler that gave up waiting on its
    /// append) goes to the worker directly.
    Done,
}

impl Slot {
    pub(crate) fn new(worker: Arc<Worker>, job: &Job) -> Arc<Self> {
        Arc::new(Slot {
            worker,
            state: Mutex::new(SlotState::Running(None)),
            job: job.id,
            queue: job.queue.clone(),
            ordered: job.ordering_key.is_some(),
            completing: AtomicBool::new(false),
            completed: AtomicBool::new(false),
        })
    }

    /// Whether an append of the job's handler recorded the job completed (its outcome is then
    /// written).
    pub(crate) fn completed(&self) -> bool {
        self.completed.load(Ordering::Acquire)
    }

    /// After the job's handler returned (or was stopped): the job it handed off goes to the
    /// worker to run next.
    fn finish(&self) {
        let state = std::mem::replace(&mut *self.lock(), SlotState::Done);
        if let SlotState::Running(Some(job)) = state {
            (self.worker.deliver)(*job);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().expect("hand-off slot lock")
    }
}

/// Ends a running job's slot when dropped: after its handler returned, or when it was stopped
/// (aborted), so that a job it handed off always runs.
pub(crate) struct SlotGuard(pub(crate) Arc<Slot>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.finish();
    }
}

/// Runs `future` (a job's handler) so that an append it makes may hand off a job to `slot`'s
/// worker.
pub(crate) async fn running<F: std::future::Future>(slot: Arc<Slot>, future: F) -> F::Output {
    RUNNING.scope(slot, future).await
}

/// Runs `future`, the last part of a job's handler, so that an append it makes also records the
/// job completed in the append's commit: the worker then writes no outcome for the job, whatever
/// the handler returns after. Use it for the append that is a handler's last effect (a step
/// recording its outcome). Outside a worker's job (a test calling a handler, a tool), it just runs
/// `future`.
pub async fn completing<F: std::future::Future>(future: F) -> F::Output {
    /// Disarms the slot when the part ends, also when it is dropped unfinished.
    struct Armed(Option<Arc<Slot>>);
    impl Drop for Armed {
        fn drop(&mut self) {
            if let Some(slot) = &self.0 {
                slot.completing.store(false, Ordering::Release);
            }
        }
    }
    let slot = RUNNING.try_with(Arc::clone).ok();
    if let Some(slot) = &slot {
        slot.completing.store(true, Ordering::Release);
    }
    let _armed = Armed(slot);
    future.await
}

/// The running job an append records completed (see [`completing`]).
#[derive(Clone)]
pub(crate) struct Completes {
    slot: Arc<Slot>,
}

impl fmt::Debug for Completes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Completes")
            .field("job", &self.slot.job)
            .field("worker", &self.slot.worker.id)
            .finish()
    }
}

impl Completes {
    /// The running job of the current task, if its handler is in its [`completing`] part.
    pub(crate) fn pick() -> Option<Completes> {
        RUNNING
            .try_with(|slot| {
                (slot.completing.load(Ordering::Acquire) && !slot.completed())
                    .then(|| Completes { slot: slot.clone() })
            })
            .ok()
            .flatten()
    }

    pub(crate) fn job(&self) -> Uuid {
        self.slot.job
    }

    /// The worker that holds the job (the completion applies only while it does).
    pub(crate) fn worker(&self) -> &str {
        &self.slot.worker.id
    }

    /// The queue to wake when the job's completion lets the next job of its ordering key run.
    pub(crate) fn wakes(&self) -> Option<&str> {
        self.slot.ordered.then_some(self.slot.queue.as_str())
    }

    /// After the commit that recorded the job completed.
    pub(crate) fn done(&self) {
        self.slot.completed.store(true, Ordering::Release);
        (self.slot.worker.forget)(self.slot.job);
    }
}

/// The job of an append to insert already claimed, and the worker it goes to.
#[derive(Clone)]
pub(crate) struct Handoff {
    /// Which of the append's jobs.
    pub(crate) index: usize,
    slot: Arc<Slot>,
}

impl fmt::Debug for Handoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handoff")
            .field("index", &self.index)
            .field("worker", &self.slot.worker.id)
            .finish()
    }
}

impl Handoff {
    /// Picks the job of `jobs` (an append's, made by the current task) to hand off: the first
    /// that the running job's worker would claim now, if the current task runs a job whose slot
    /// is not used yet.
    pub(crate) fn pick(jobs: &[NewJob]) -> Option<Handoff> {
        RUNNING
            .try_with(|slot| {
                if !matches!(*slot.lock(), SlotState::Running(None)) {
                    return None;
                }
                let worker = &slot.worker;
                let now = Utc::now();
                let index = jobs.iter().position(|job| {
                    job.queue == worker.queue
                        && worker.kinds.contains(&job.kind)
                        && job.ordering_key.is_none()
                        && job.run_at.is_none_or(|at| at <= now)
                })?;
                Some(Handoff {
                    index,
                    slot: slot.clone(),
                })
            })
            .ok()
            .flatten()
    }

    /// The worker the job is claimed for.
    pub(crate) fn worker(&self) -> &str {
        &self.slot.worker.id
    }

    pub(crate) fn lease(&self) -> Duration {
        self.slot.worker.lease
    }

    /// After the commit that inserted `job` (`id`) claimed: gives it to the worker.
    pub(crate) fn deliver(&self, id: Uuid, job: &NewJob) {
        self.deliver_stored(self.claimed(id, job));
    }

    /// After the commit that claimed the stored `job`: gives it to the worker, to run when the
    /// job that handed it off is done.
    pub(crate) fn deliver_stored(&self, job: Job) {
        let worker = &self.slot.worker;
        (worker.hold)(&job);
        let mut state = self.slot.lock();
        match &mut *state {
            SlotState::Running(handed @ None) => *handed = Some(Box::new(job)),
            // A second hand-off of one job (two appends at once), or one after it finished.
            _ => {
                drop(state);
                (worker.deliver)(job);
            }
        }
    }

    /// The job as the insert stored it (times as seen here; the worker reads only what the
    /// enqueue said, the id and the attempt).
    fn claimed(&self, id: Uuid, job: &NewJob) -> Job {
        let now = Utc::now();
        Job {
            id,
            queue: job.queue.clone(),
            kind: job.kind.clone(),
            payload: job.payload.clone(),
            state: JobState::Running,
            priority: job.priority,
            run_at: job.run_at.unwrap_or(now),
            attempt: 1,
            max_attempts: job.max_attempts,
            timeout_ms: job.timeout.as_millis().min(i64::MAX as u128) as i64,
            lease_expires_at: Some(
                now + chrono::Duration::from_std(self.lease()).unwrap_or_default(),
            ),
            locked_by: Some(self.worker().to_owned()),
            ordering_key: None,
            idempotency_key: job.idempotency_key.clone(),
            last_error: None,
            errors: Vec::new(),
            created_at: now,
            updated_at: now,
            finished_at: None,
        }
    }
}
