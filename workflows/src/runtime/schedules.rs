//! Schedules: workflows started on a timetable, as durable timers.
//!
//! ```text
//!  ScheduleCreated / ScheduleResumed / ScheduleSkipped ──► job schedule.tick (run_at = next moment)
//!  schedule.tick ──► Schedule.Fire { due, now, running } ──► ScheduleFired (or Skipped)
//!  ScheduleFired ──► job schedule.start ──► the moment's task ─► its workflow
//!                └──► job schedule.tick for the next moment
//! ```
//!
//! The schedules' bus runs [`ScheduleManager`] as its reactor, so a decision and its jobs are
//! one commit: a fired moment always gets its task and the next timer. Jobs survive restarts
//! and run on any worker. Exactly once: the aggregate fires each moment once (a second `Fire`
//! for it is no change), and the moment's task id is derived from the schedule and the moment,
//! so a repeated `schedule.start` answers the task it created. What was missed while no node
//! ran is decided by the schedule's catch-up policy when its timer finally runs
//! (`stele_aggregates::schedule`).

use chrono::{DateTime, Utc};
use stele_aggregates::channel::Channel;
use stele_aggregates::schedule::{
    Schedule, ScheduleCommand, ScheduleError, ScheduleEvent, ScheduleSpec, ScheduleStatus,
};

use stele_engine::queue::worker::HandlerError;

use super::*;

/// The schedules' process manager's checkpoint name.
pub const SCHEDULE_MANAGER: &str = "schedules";
/// The timer of a schedule's next moment.
pub const SCHEDULE_TICK_JOB: &str = "schedule.tick";
/// Starts a fired moment's task.
pub const SCHEDULE_START_JOB: &str = "schedule.start";
/// The channel of tasks started by a schedule.
pub const SCHEDULE_CHANNEL: &str = "schedule";

/// The namespace of the ids of tasks started by schedules.
const TASK_NAMESPACE: Uuid = Uuid::from_u128(0x2c5e_91b4_7a03_4f6d_8e1a_5b9c_0d7f_3a62);

#[derive(Debug, Serialize, Deserialize)]
struct MomentJob {
    schedule: String,
    due: DateTime<Utc>,
}

fn moment_job(kind: &str, schedule: &str, due: DateTime<Utc>) -> NewJob {
    let job = NewJob::new(
        QUEUE,
        kind,
        json!(MomentJob {
            schedule: schedule.to_owned(),
            due,
        }),
    )
    .max_attempts(25)
    .idempotency_key(format!("{kind}:{schedule}:{}", due.timestamp_micros()));
    if kind == SCHEDULE_TICK_JOB {
        job.run_at(due)
    } else {
        job
    }
}

/// The id of the task a schedule's moment starts.
pub fn scheduled_task_id(schedule: &str, due: DateTime<Utc>) -> TaskId {
    let name = format!("{schedule}@{}", due.timestamp_micros());
    TaskId::new(Uuid::new_v5(&TASK_NAMESPACE, name.as_bytes()).to_string())
}

/// Arms schedules' timers and starts their fired moments (pure: one event in, jobs out).
pub struct ScheduleManager;

impl ProcessManager for ScheduleManager {
    fn name(&self) -> &'static str {
        SCHEDULE_MANAGER
    }

    fn event_types(&self) -> &'static [&'static str] {
        &[
            "ScheduleCreated",
            "ScheduleResumed",
            "ScheduleFired",
            "ScheduleSkipped",
        ]
    }

    fn react(&self, event: &RecordedEvent) -> Vec<NewJob> {
        if event.stream.aggregate_type != <Schedule as cqrs_es::Aggregate>::TYPE {
            return Vec::new();
        }
        let name = event.stream.aggregate_id.as_str();
        let Ok(parsed) = serde_json::from_value::<ScheduleEvent>(event.payload.clone()) else {
            tracing::warn!(position = %event.position, "unreadable schedule event");
            return Vec::new();
        };
        match parsed {
            ScheduleEvent::ScheduleCreated { next_due, .. }
            | ScheduleEvent::ScheduleResumed { next_due, .. }
            | ScheduleEvent::ScheduleSkipped {
                next_due: Some(next_due),
                ..
            } => vec![moment_job(SCHEDULE_TICK_JOB, name, next_due)],
            ScheduleEvent::ScheduleFired { due, next_due, .. } => vec![
                moment_job(SCHEDULE_START_JOB, name, due),
                moment_job(SCHEDULE_TICK_JOB, name, next_due),
            ],
            _ => Vec::new(),
        }
    }
}

impl Runtime {
    /// The process manager to run for schedule events recorded by other buses.
    pub fn schedule_manager(&self) -> Arc<dyn ProcessManager> {
        Arc::new(ScheduleManager)
    }

    async fn run_schedule(
        &self,
        name: &str,
        command: ScheduleCommand,
        meta: CommandMeta,
    ) -> Result<Schedule, RuntimeError> {
        match self.schedules.execute(name, command, meta).await {
            Ok(_) => Ok(self.schedule(name).await?.unwrap_or_default()),
            Err(CommandError::Rejected(e)) => Err(RuntimeError::Schedule(e)),
            Err(e) => Err(e.into()),
        }
    }

    /// Creates the schedule `name`, checked against the catalog (its workflow must exist).
    pub async fn create_schedule(
        &self,
        name: &str,
        spec: ScheduleSpec,
        meta: CommandMeta,
    ) -> Result<Schedule, RuntimeError> {
        self.check_workflow(&spec.workflow)?;
        let command = ScheduleCommand::Create {
            name: name.to_owned(),
            spec,
            by: meta.actor.clone(),
            now: self.clock.utc(),
        };
        self.run_schedule(name, command, meta).await
    }

    pub async fn pause_schedule(
        &self,
        name: &str,
        meta: CommandMeta,
    ) -> Result<Schedule, RuntimeError> {
        let by = meta.actor.clone();
        self.run_schedule(name, ScheduleCommand::Pause { by }, meta)
            .await
    }

    pub async fn resume_schedule(
        &self,
        name: &str,
        meta: CommandMeta,
    ) -> Result<Schedule, RuntimeError> {
        let command = ScheduleCommand::Resume {
            by: meta.actor.clone(),
            now: self.clock.utc(),
        };
        self.run_schedule(name, command, meta).await
    }

    pub async fn remove_schedule(
        &self,
        name: &str,
        meta: CommandMeta,
    ) -> Result<Schedule, RuntimeError> {
        let by = meta.actor.clone();
        self.run_schedule(name, ScheduleCommand::Remove { by }, meta)
            .await
    }

    /// The schedule `name`, if it was ever created.
    pub async fn schedule(&self, name: &str) -> Result<Option<Schedule>, RuntimeError> {
        if !stele_aggregates::schedule::valid_name(name) {
            return Ok(None);
        }
        let (schedule, _) = self.schedules.load(name).await?;
        Ok((schedule.status != ScheduleStatus::New).then_some(schedule))
    }

    /// The task of the last moment `schedule` fired, if it is still running.
    async fn still_running(&self, name: &str, schedule: &Schedule) -> Result<bool, RuntimeError> {
        let Some(last) = schedule.last_fired else {
            return Ok(false);
        };
        let task_id = scheduled_task_id(name, last);
        match self.task(task_id.as_str()).await {
            Ok(view) => Ok(!view.task.status.is_finished()),
            // Not created (yet, or its start failed for good): nothing runs, and a start that
            // never succeeds must not hold every later moment back.
            Err(RuntimeError::UnknownTask(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub(super) async fn on_schedule_tick(self: Arc<Self>, job: Job) -> HandlerResult {
        let p: MomentJob = serde_json::from_value(job.payload.clone())?;
        let Some(schedule) = self.schedule(&p.schedule).await? else {
            return Ok(Done::Complete);
        };
        if schedule.status != ScheduleStatus::Active || schedule.next_due != Some(p.due) {
            // Paused, removed, or a stale timer: resuming or the newer timer carries on.
            return Ok(Done::Complete);
        }
        let now = self.clock.utc();
        if now < p.due {
            // The database's clock (which made the job due) runs ahead of this node's: a moment
            // never fires before its time by the node's clock.
            let early = (p.due - now).to_std().unwrap_or_default();
            return Ok(Done::Snooze(early.max(Duration::from_millis(10))));
        }
        let running = self.still_running(&p.schedule, &schedule).await?;
        let command = ScheduleCommand::Fire {
            due: p.due,
            now,
            running,
        };
        let meta = CommandMeta::new("schedule", "system").with_command_id(Uuid::new_v5(
            &TASK_NAMESPACE,
            format!("tick:{}@{}", p.schedule, p.due.timestamp_micros()).as_bytes(),
        ));
        match self.schedules.execute(&p.schedule, command, meta).await {
            Ok(_) | Err(CommandError::Rejected(ScheduleError::Paused | ScheduleError::Removed)) => {
                Ok(Done::Complete)
            }
            Err(CommandError::Rejected(e)) => Err(HandlerError::msg(e.to_string())),
            Err(e) => Err(RuntimeError::from(e).into()),
        }
    }

    pub(super) async fn on_schedule_start(self: Arc<Self>, job: Job) -> HandlerResult {
        let p: MomentJob = serde_json::from_value(job.payload.clone())?;
        let Some(schedule) = self.schedule(&p.schedule).await? else {
            return Ok(Done::Complete);
        };
        let Some(spec) = schedule.spec else {
            return Ok(Done::Complete);
        };
        let task_id = scheduled_task_id(&p.schedule, p.due);
        let input = TaskInput::parse(&spec.input)
            .map_err(|e| HandlerError::msg(format!("schedule {}: {e}", p.schedule)))?;
        let requester = Requester {
            user_id: format!("schedule:{}", p.schedule),
            channel: Channel::parse(SCHEDULE_CHANNEL).expect("a well-formed channel name"),
        };
        let meta = CommandMeta::new("schedule", format!("schedule:{}", p.schedule))
            .with_command_id(Uuid::parse_str(task_id.as_str()).expect("a task id is a UUID"));
        // Stele's own task: no person asked for it, so it is nobody's personal data.
        let workflow = Some(spec.workflow.clone());
        match self
            .create(
                input,
                requester,
                workflow,
                None,
                BTreeMap::new(),
                meta,
                false,
            )
            .await
        {
            Ok(_) => Ok(Done::Complete),
            // The workflow was removed from the catalog since: recorded on the job, not retried
            // for ever.
            Err(e @ RuntimeError::UnknownWorkflow { .. }) => Err(HandlerError::msg(e.to_string())),
            Err(e) => Err(e.into()),
        }
    }
}
