//! Wire types: what the API accepts and answers, as the OpenAPI document describes them. They
//! map to and from domain types; they are not the domain types.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

/// A task to create.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTask {
    /// What the task is about (a message, a request); 1 to 32,768 characters.
    pub input: String,
    /// The workflow to run; the default workflow when absent.
    #[serde(default)]
    pub workflow: Option<String>,
    /// Who asks, and through which channel (the key's name and `api` when absent).
    #[serde(default)]
    pub requester: Option<RequesterBody>,
}

/// Who asks for a task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequesterBody {
    pub user_id: String,
    pub channel: String,
}

/// A task, with its run's progress.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskBody {
    pub id: String,
    /// pending, routing, executing, completed, failed or cancelled.
    pub status: String,
    pub input: String,
    pub workflow: Option<String>,
    pub requester: Option<RequesterBody>,
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    pub error: Option<String>,
    pub run: Option<RunBody>,
}

/// A workflow run's progress.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct RunBody {
    pub id: String,
    pub workflow: String,
    pub version: u32,
    /// running, completed, failed or cancelled.
    pub status: String,
    /// The step the run is at.
    pub current_step: Option<String>,
    /// Steps in the order they were entered.
    pub steps: Vec<StepBody>,
    /// Messages the run asked to send on the task's channel.
    pub replies: Vec<String>,
}

/// One step of a run.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct StepBody {
    pub id: String,
    /// scheduled, waiting, sleeping, joining, completed, failed or skipped.
    pub status: String,
    pub attempt: u32,
    #[schema(value_type = Option<Object>)]
    pub output: Option<Value>,
    pub error: Option<String>,
}

/// One row of a task list.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskSummary {
    pub id: String,
    pub status: String,
    pub workflow: Option<String>,
    pub run_id: Option<String>,
    pub requester: RequesterBody,
    pub input: String,
    pub current_step: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A page of tasks, newest first.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskPage {
    pub tasks: Vec<TaskSummary>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Filters of the task list.
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TaskListQuery {
    /// Only tasks in this status.
    pub status: Option<String>,
    /// Only tasks of this workflow.
    pub workflow: Option<String>,
    /// Only tasks of this requester (user id).
    pub requester: Option<String>,
    /// Only tasks from this channel.
    pub channel: Option<String>,
    /// From a previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// Tasks per page, 1 to 500 (50 by default).
    pub limit: Option<usize>,
}

/// An event as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct EventBody {
    pub position: i64,
    /// `type/id` of the stream.
    pub stream: String,
    pub sequence: i64,
    #[serde(rename = "type")]
    pub event_type: String,
    pub version: String,
    pub recorded_at: DateTime<Utc>,
    #[schema(value_type = Object)]
    pub metadata: Value,
    #[schema(value_type = Object)]
    pub payload: Value,
}

impl From<&stele_engine::RecordedEvent> for EventBody {
    fn from(event: &stele_engine::RecordedEvent) -> Self {
        Self {
            position: event.position.0,
            stream: event.stream.to_string(),
            sequence: event.sequence,
            event_type: event.event_type.clone(),
            version: event.event_version.clone(),
            recorded_at: event.recorded_at,
            metadata: serde_json::to_value(&event.metadata).unwrap_or_default(),
            payload: event.payload.clone(),
        }
    }
}

/// Events of a task (its own, its run's and its child runs').
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskEvents {
    pub events: Vec<EventBody>,
}

/// A page of the global log.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct LogPage {
    pub events: Vec<EventBody>,
    /// Pass as `after` for the next page.
    pub next_after: i64,
}

/// Where to read the global log from.
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// After this position (0: from the start).
    pub after: Option<i64>,
    /// Events per page, 1 to 1,000 (100 by default).
    pub limit: Option<usize>,
}

/// Why a task is cancelled.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelBody {
    #[serde(default)]
    pub reason: Option<String>,
}

/// A signal's payload.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalBody {
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub payload: Option<Value>,
}

/// An accepted request that takes effect asynchronously.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Accepted {
    pub status: String,
}

/// A workflow definition, newest version.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct WorkflowBody {
    pub name: String,
    pub version: u32,
    pub description: String,
    pub steps: Vec<WorkflowStepBody>,
}

/// A step of a definition.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct WorkflowStepBody {
    pub id: String,
    pub kind: String,
}

/// A job.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct JobBody {
    pub id: uuid::Uuid,
    pub queue: String,
    pub kind: String,
    pub state: String,
    pub attempt: i32,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    pub last_error: Option<String>,
    /// Every failed attempt's error, oldest first.
    pub errors: Vec<String>,
    #[schema(value_type = Object)]
    pub payload: Value,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl From<stele_engine::queue::Job> for JobBody {
    fn from(job: stele_engine::queue::Job) -> Self {
        Self {
            id: job.id,
            queue: job.queue,
            kind: job.kind,
            state: job.state.as_str().to_owned(),
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            run_at: job.run_at,
            last_error: job.last_error,
            errors: job.errors.into_iter().map(|e| e.error).collect(),
            payload: job.payload,
            created_at: job.created_at,
            finished_at: job.finished_at,
        }
    }
}

/// Jobs.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<JobBody>,
}

/// Which jobs to list.
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct JobQuery {
    /// available, running, completed, dead or cancelled.
    pub state: Option<String>,
    pub queue: Option<String>,
    pub kind: Option<String>,
    /// 1 to 500 (50 by default).
    pub limit: Option<usize>,
}

/// A projection's state.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ProjectionBody {
    pub name: String,
    /// running, failed, paused or rebuilding.
    pub status: String,
    pub position: i64,
    pub lag_events: i64,
    pub lag_seconds: f64,
    pub error: Option<String>,
    /// A rebuild is under way.
    pub rebuilding: bool,
    /// Why the last rebuild failed (cleared when the next one starts).
    pub rebuild_error: Option<String>,
}

/// Projections.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ProjectionList {
    pub projections: Vec<ProjectionBody>,
}

/// Health of one dependency.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Check {
    pub ok: bool,
    pub detail: String,
}

/// Readiness.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    pub ready: bool,
    pub database: Check,
    pub redis: Option<Check>,
    pub projections: Check,
}

/// Liveness.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Liveness {
    pub status: String,
}
