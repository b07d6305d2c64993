//! The workflow run's vocabulary: its commands, events, statuses, the actions a [`Decider`]
//! returns, and its errors. The aggregate (state, `handle`, `apply`) is in the parent module.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::WorkflowRun;
use crate::ids::{RunId, StepId, TaskId};
use crate::personal::Personal;

/// The parent run and fan-out step that started a child run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentLink {
    pub run_id: RunId,
    pub step: StepId,
    /// The child's place among the step's children (the item index).
    pub index: usize,
}

/// A child run a fan-out step starts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChildSpec {
    pub run_id: RunId,
    pub workflow: String,
    pub version: u32,
    pub input: Personal<Value>,
}

/// Where a run is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Not started (no events).
    #[default]
    New,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            RunStatus::Completed | RunStatus::Failed | RunStatus::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::New => "new",
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }
}

/// Where a step is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// A job will run it (at `not_before` at the earliest).
    Scheduled,
    /// Waiting for a signal.
    Waiting,
    /// Waiting for a durable timer.
    Sleeping,
    /// Waiting for its child runs.
    Joining,
    Completed,
    Failed,
    Skipped,
}

/// How a step attempt ended, as reported by the step worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum StepOutcome {
    Completed { output: Value },
    Failed { error: String },
}

/// A step's output to remember: where the memory belongs and how much it weighs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Remember {
    pub scope: crate::memory::MemoryScope,
    pub importance: f32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// How a child run ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChildResult {
    pub run_id: RunId,
    pub status: RunStatus,
    pub output: Option<Value>,
    pub error: Option<String>,
}

/// What the decider asks for after an event.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Run `step` (attempt `attempt`) as a job, not before `not_before`.
    ScheduleStep {
        step: StepId,
        attempt: u32,
        not_before: Option<DateTime<Utc>>,
        /// Which escalation of the step's retry policy this attempt uses (0: none).
        escalation: u32,
        timeout_ms: u64,
    },
    /// A step that needs no job (a route on a value, a reply, a resumed wait) is done.
    CompleteStep {
        step: StepId,
        output: Value,
        /// The buffered signal this completion consumes.
        consumed_signal: Option<String>,
    },
    SkipStep {
        step: StepId,
        reason: String,
    },
    ArmTimer {
        step: StepId,
        fire_at: DateTime<Utc>,
    },
    AwaitSignal {
        step: StepId,
        signal: String,
        timeout_at: Option<DateTime<Utc>>,
    },
    StartChildren {
        step: StepId,
        children: Vec<ChildSpec>,
    },
    /// A message must be sent on the task's channel.
    RequestReply {
        step: StepId,
        text: String,
    },
    CompleteRun {
        output: Value,
    },
    FailRun {
        error: String,
        step: Option<StepId>,
    },
}

/// Decides what follows an event: the workflow definitions, as the aggregate's service. Must be
/// pure: the same run and event give the same actions.
pub trait Decider: Send + Sync {
    /// The actions that follow `event`, which has just been applied to `run`. An error fails the
    /// run with that message (recorded, like any other outcome).
    fn decide(
        &self,
        run: &WorkflowRun,
        event: &RunEvent,
        now: DateTime<Utc>,
    ) -> Result<Vec<Action>, String>;
}

#[derive(Clone, Debug, PartialEq)]
pub enum RunCommand {
    Start {
        run_id: RunId,
        task_id: Option<TaskId>,
        /// The person whose task this run performs: its inputs, outputs, prompts and errors are
        /// sealed with their key.
        subject: Option<String>,
        workflow: String,
        version: u32,
        input: Value,
        parent: Option<ParentLink>,
        /// Models chosen for the run, by agent role (`provider/model`), tried first for it.
        models: BTreeMap<String, String>,
        now: DateTime<Utc>,
    },
    /// A step worker reports an attempt.
    RecordStep {
        step: StepId,
        attempt: u32,
        started_at: DateTime<Utc>,
        /// What the step was given (a rendered prompt, a tool's input).
        input: Option<Value>,
        outcome: StepOutcome,
        /// Model calls made by the attempt, in order (`workflows::model::ModelCall` as JSON).
        calls: Vec<Value>,
        /// The output, if the step completes, becomes a memory (the definition says so).
        remember: Option<Remember>,
        now: DateTime<Utc>,
    },
    FireTimer {
        step: StepId,
        now: DateTime<Utc>,
    },
    Signal {
        name: String,
        payload: Value,
        now: DateTime<Utc>,
    },
    TimeoutWait {
        step: StepId,
        now: DateTime<Utc>,
    },
    ChildFinished {
        step: StepId,
        index: usize,
        result: ChildResult,
        now: DateTime<Utc>,
    },
    Cancel {
        reason: String,
        now: DateTime<Utc>,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum RunEvent {
    RunStarted {
        run_id: RunId,
        task_id: Option<TaskId>,
        /// Whose data the run holds (absent for runs no person started, and before subjects).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subject: Option<String>,
        workflow: String,
        version: u32,
        input: Personal<Value>,
        parent: Option<ParentLink>,
        /// Models chosen for the run, by agent role (absent when none).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        models: BTreeMap<String, String>,
    },
    StepScheduled {
        step: StepId,
        attempt: u32,
        not_before: Option<DateTime<Utc>>,
        escalation: u32,
        timeout_ms: u64,
    },
    /// Recorded with the attempt's outcome (like Temporal's activity start): a start whose
    /// worker died before finishing is not history, the rescued job starts it again.
    StepStarted {
        step: StepId,
        attempt: u32,
        at: DateTime<Utc>,
    },
    StepCompleted {
        step: StepId,
        attempt: u32,
        input: Option<Personal<Value>>,
        output: Personal<Value>,
        calls: Personal<Vec<Value>>,
        consumed_signal: Option<String>,
        /// The output is to be remembered (the memory projection indexes it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        remember: Option<Remember>,
    },
    StepFailed {
        step: StepId,
        attempt: u32,
        input: Option<Personal<Value>>,
        error: Personal<String>,
        calls: Personal<Vec<Value>>,
    },
    StepSkipped {
        step: StepId,
        reason: String,
    },
    TimerArmed {
        step: StepId,
        fire_at: DateTime<Utc>,
    },
    TimerFired {
        step: StepId,
    },
    WaitStarted {
        step: StepId,
        signal: String,
        timeout_at: Option<DateTime<Utc>>,
    },
    SignalReceived {
        name: String,
        payload: Personal<Value>,
    },
    WaitTimedOut {
        step: StepId,
    },
    ChildrenStarted {
        step: StepId,
        children: Vec<ChildSpec>,
    },
    ChildRunFinished {
        step: StepId,
        index: usize,
        result: Personal<ChildResult>,
    },
    ReplyRequested {
        step: StepId,
        text: Personal<String>,
    },
    RunCompleted {
        output: Personal<Value>,
    },
    RunFailed {
        error: Personal<String>,
        step: Option<StepId>,
    },
    RunCancelled {
        reason: String,
    },
}

impl RunEvent {
    /// Every event type, for subscribers that filter by type.
    pub const TYPES: [&'static str; 17] = [
        "RunStarted",
        "StepScheduled",
        "StepStarted",
        "StepCompleted",
        "StepFailed",
        "StepSkipped",
        "TimerArmed",
        "TimerFired",
        "WaitStarted",
        "SignalReceived",
        "WaitTimedOut",
        "ChildrenStarted",
        "ChildRunFinished",
        "ReplyRequested",
        "RunCompleted",
        "RunFailed",
        "RunCancelled",
    ];
}

impl DomainEvent for RunEvent {
    fn event_type(&self) -> String {
        match self {
            RunEvent::RunStarted { .. } => "RunStarted",
            RunEvent::StepScheduled { .. } => "StepScheduled",
            RunEvent::StepStarted { .. } => "StepStarted",
            RunEvent::StepCompleted { .. } => "StepCompleted",
            RunEvent::StepFailed { .. } => "StepFailed",
            RunEvent::StepSkipped { .. } => "StepSkipped",
            RunEvent::TimerArmed { .. } => "TimerArmed",
            RunEvent::TimerFired { .. } => "TimerFired",
            RunEvent::WaitStarted { .. } => "WaitStarted",
            RunEvent::SignalReceived { .. } => "SignalReceived",
            RunEvent::WaitTimedOut { .. } => "WaitTimedOut",
            RunEvent::ChildrenStarted { .. } => "ChildrenStarted",
            RunEvent::ChildRunFinished { .. } => "ChildRunFinished",
            RunEvent::ReplyRequested { .. } => "ReplyRequested",
            RunEvent::RunCompleted { .. } => "RunCompleted",
            RunEvent::RunFailed { .. } => "RunFailed",
            RunEvent::RunCancelled { .. } => "RunCancelled",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

/// Why a run command was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RunError {
    #[error("the run exists already")]
    AlreadyStarted,
    #[error("no such run")]
    NotStarted,
    #[error("the run is {0:?}")]
    Finished(RunStatus),
    /// A step report for an attempt that is not the one scheduled (a late or repeated worker).
    #[error("step {step} attempt {attempt} is not scheduled")]
    StaleStep { step: StepId, attempt: u32 },
    #[error("a signal needs a name")]
    EmptySignal,
}
