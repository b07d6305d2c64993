//! Task reads from memory: a bounded cache of task views, filled on a miss from the log and
//! kept current by following the log, so hot `GET /v1/tasks/{id}` requests need no database
//! round trip.
//!
//! Each process keeps its own cache (processes stay stateless: it is rebuilt from the log). A
//! view is at most a few tens of milliseconds behind the log while the follower keeps up (it
//! reads the log at most every [`DEFAULT_LINGER`](stele_engine::projection::DEFAULT_LINGER)), and
//! a task changed through this process is read again at once; an entry the
//! follower cannot vouch for (it missed an event) is dropped, and every entry expires after
//! [`TTL`], which bounds staleness even in the worst race. `?consistent=true` reads the log.

use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache;
use stele_aggregates::task::TaskEvent;
use stele_aggregates::workflow_run::{RunEvent, WorkflowRun};
use stele_engine::log::{subscribe, SubscriptionOptions};
use stele_engine::{EventLog, RecordedEvent};
use stele_workflows::follow::{RUN_STREAM, TASK_STREAM};
use stele_workflows::runtime::TaskView;

/// How long an entry may be served without being reloaded.
pub const TTL: Duration = Duration::from_secs(2);

/// Task views by task id (and the run ids they follow).
#[derive(Clone)]
pub struct TaskCache {
    views: Cache<String, Arc<TaskView>>,
    /// Run id → task id, for the runs of cached tasks.
    runs: Cache<String, String>,
}

impl TaskCache {
    /// A cache of up to `capacity` tasks, kept current by a task that follows `log` from its head
    /// (it stops when the log closes). The same reader tells `keys` of key changes, so a server
    /// process reads the log once for both caches. A lost connection is survived: the reader
    /// starts again where it was, and both caches forget what they hold (they may have missed
    /// something meanwhile).
    pub async fn start(
        log: Arc<dyn EventLog>,
        capacity: u64,
        keys: Option<Arc<crate::keys::KeyService>>,
    ) -> Self {
        let cache = TaskCache {
            views: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(TTL)
                .build(),
            runs: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(TTL)
                .build(),
        };
        let head = log.head().await.unwrap_or_default();
        let follower = cache.clone();
        tokio::spawn(async move {
            let mut after = head;
            loop {
                // Read at most once per linger: this reader is the process's own, beside the
                // projections' (which share their pages), and a read per append was a tenth of
                // the database's time in a burst of messages.
                let options = SubscriptionOptions {
                    linger: stele_engine::projection::DEFAULT_LINGER,
                    ..SubscriptionOptions::default()
                };
                let mut subscription = subscribe(log.clone(), after, options);
                loop {
                    match subscription.next().await {
                        Ok(event) => {
                            after = event.position;
                            follower.apply(&event).await;
                            if let Some(keys) = &keys {
                                keys.observe(&event).await;
                            }
                        }
                        Err(stele_engine::LogError::Closed) => return,
                        Err(e) => {
                            tracing::warn!(error = %e, "following the log for the caches failed; resuming");
                            follower.views.invalidate_all();
                            follower.runs.invalidate_all();
                            if let Some(keys) = &keys {
                                keys.forget_all();
                            }
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            // The caches start over empty: follow from the log's head now (the
                            // position followed from may hold no event, e.g. an append that was
                            // in flight at start and rolled back; asking from it again would
                            // fail forever).
                            if let Ok(head) = log.head().await {
                                after = head;
                            }
                            break;
                        }
                    }
                }
            }
        });
        cache
    }

    /// Forgets a task this process just changed, so that its caller's next read sees the change
    /// without waiting for the follower.
    pub async fn invalidate(&self, task_id: &str) {
        self.views.invalidate(task_id).await;
    }

    pub async fn get(&self, task_id: &str) -> Option<Arc<TaskView>> {
        self.views.get(task_id).await
    }

    /// Caches a view read from the log.
    pub async fn insert(&self, view: TaskView) {
        if let Some(run_id) = &view.task.run_id {
            self.runs
                .insert(run_id.to_string(), view.task_id.to_string())
                .await;
        }
        self.views
            .insert(view.task_id.to_string(), Arc::new(view))
            .await;
    }

    async fn apply(&self, event: &RecordedEvent) {
        if event.event_type == stele_privacy::SUBJECT_ERASED {
            // A person was erased: no view keeps what was theirs (erasures are rare; the next
            // reads reload, and find it erased).
            self.views.invalidate_all();
            self.runs.invalidate_all();
            return;
        }
        let id = &event.stream.aggregate_id;
        let task_id = match event.stream.aggregate_type.as_str() {
            TASK_STREAM => id.clone(),
            RUN_STREAM => match self.runs.get(id).await {
                Some(task_id) => task_id,
                None => return,
            },
            _ => return,
        };
        let Some(current) = self.views.get(&task_id).await else {
            return;
        };
        let mut view = (*current).clone();
        let applied = if event.stream.aggregate_type == TASK_STREAM {
            next(&mut view.versions.0, event.sequence).and_then(|()| {
                let decoded: TaskEvent = serde_json::from_value(event.payload.clone()).ok()?;
                cqrs_es::Aggregate::apply(&mut view.task, decoded);
                Some(())
            })
        } else {
            next(&mut view.versions.1, event.sequence).and_then(|()| {
                let decoded: RunEvent = serde_json::from_value(event.payload.clone()).ok()?;
                let run = view.run.get_or_insert_with(WorkflowRun::default);
                cqrs_es::Aggregate::apply(run, decoded);
                Some(())
            })
        };
        match applied {
            Some(()) => {
                if let Some(run_id) = &view.task.run_id {
                    if !self.runs.contains_key(run_id.as_str()) {
                        self.runs.insert(run_id.to_string(), task_id.clone()).await;
                    }
                }
                self.views.insert(task_id, Arc::new(view)).await;
            }
            // Already included, or an event was missed: only a reload can tell.
            None if event.sequence > view_version(&current, event) => {
                self.views.invalidate(&task_id).await
            }
            None => {}
        }
    }
}

fn view_version(view: &TaskView, event: &RecordedEvent) -> i64 {
    if event.stream.aggregate_type == TASK_STREAM {
        view.versions.0
    } else {
        view.versions.1
    }
}

/// Moves `version` to `sequence` when it is the next one.
fn next(version: &mut i64, sequence: i64) -> Option<()> {
    (sequence == *version + 1).then(|| *version = sequence)
}
