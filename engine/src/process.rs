//! Process managers: follow the log and react to events by enqueuing commands as jobs.
//!
//! A process manager runs like a projection (same runner, checkpoint and lease): for each batch
//! of events, the jobs it decides on are enqueued in the transaction that moves its checkpoint,
//! so each event leads to its jobs exactly once, across crashes and concurrent runner processes.
//! Each job also carries the idempotency key `manager:event id:index`, so even a checkpoint moved
//! back by hand does not enqueue a job that is still unfinished a second time.
//!
//! A command bus can also run a manager's reaction itself
//! ([`crate::command::CommandBus::with_reactor`]): the jobs are enqueued in the append's own
//! transaction and the events marked, and the manager, following the log, passes marked events
//! by. Either way, an event's jobs are enqueued once.

use std::sync::Arc;

use async_trait::async_trait;

use crate::log::{LogTransaction, RecordedEvent};
use crate::projection::{Projection, ProjectionError, Tables};
use crate::queue::{JobQueue, NewJob};

/// Decides which jobs an event leads to. Pure: no IO.
pub trait ProcessManager: Send + Sync + 'static {
    /// Unique and stable: the name of its checkpoint.
    fn name(&self) -> &'static str;

    /// The event types it reacts to; empty means all.
    fn event_types(&self) -> &'static [&'static str] {
        &[]
    }

    /// The jobs `event` leads to.
    fn react(&self, event: &RecordedEvent) -> Vec<NewJob>;
}

/// The jobs `manager` reacts to `event` with, each keyed `manager:event id:index` unless it has a
/// key of its own, and each in the event's trace (see [`crate::trace`]).
pub(crate) fn jobs_of(manager: &dyn ProcessManager, event: &RecordedEvent) -> Vec<NewJob> {
    let mut jobs = manager.react(event);
    for (index, job) in jobs.iter_mut().enumerate() {
        job.idempotency_key.get_or_insert_with(|| {
            format!("{}:{}:{index}", manager.name(), event.metadata.event_id)
        });
        if let (Some(trace), Some(payload)) = (
            &event.metadata.command.trace_id,
            job.payload.as_object_mut(),
        ) {
            payload
                .entry(crate::trace::PAYLOAD_KEY)
                .or_insert_with(|| trace.clone().into());
        }
    }
    jobs
}

/// A process manager as something the projection runner drives.
pub fn as_projection(
    manager: Arc<dyn ProcessManager>,
    queue: Arc<dyn JobQueue>,
) -> Arc<dyn Projection> {
    Arc::new(Managed { manager, queue })
}

struct Managed {
    manager: Arc<dyn ProcessManager>,
    queue: Arc<dyn JobQueue>,
}

#[async_trait]
impl Projection for Managed {
    fn name(&self) -> &'static str {
        self.manager.name()
    }

    fn event_types(&self) -> &'static [&'static str] {
        self.manager.event_types()
    }

    /// Not the events a command bus already reacted to for it (their jobs went in with them).
    fn wants(&self, event: &RecordedEvent) -> bool {
        crate::projection::of_types(self.manager.event_types(), event)
            && event.metadata.reacted.as_deref() != Some(self.manager.name())
    }

    fn tables(&self) -> &'static [&'static str] {
        &[]
    }

    fn rebuildable(&self) -> bool {
        false
    }

    /// A lost batch (with a crash of the database) is read again and enqueues its jobs again:
    /// its jobs were lost with it, and no job of it can have run to a durable end, since that
    /// end's commit would have flushed this one first.
    fn deferred_flush(&self) -> bool {
        true
    }

    async fn create(&self, _: &mut dyn LogTransaction, _: &Tables) -> Result<(), ProjectionError> {
        Ok(())
    }

    async fn apply(
        &self,
        tx: &mut dyn LogTransaction,
        _: &Tables,
        events: &[RecordedEvent],
    ) -> Result<(), ProjectionError> {
        // Only the events it `wants`: not those whose jobs went in with them.
        let jobs: Vec<NewJob> = events
            .iter()
            .flat_map(|event| jobs_of(self.manager.as_ref(), event))
            .collect();
        if !jobs.is_empty() {
            self.queue
                .enqueue_in(tx, jobs)
                .await
                .map_err(|e| ProjectionError::Apply(format!("enqueuing: {e}")))?;
        }
        Ok(())
    }
}
