//! Wire types: what the API accepts and answers, as the OpenAPI document describes them. They
//! map to and from domain types; they are not the domain types.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use crate::json::Body;
use crate::problem::{ApiError, Code};

/// The pattern of a text without a NUL character, which the log cannot store.
pub const NO_NUL: &str = r"^[^\u0000]*$";

/// The pattern of a channel name as [`stele_aggregates::channel::Channel::parse`] takes it: a
/// letter, then up to 31 letters, digits, `-` and `_` (stored lowercased), with white space
/// around it ignored (the same white space as [`NOT_BLANK`]'s).
pub const CHANNEL: &str = r"^[\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*[A-Za-z][A-Za-z0-9_-]{0,31}[\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*$";

/// Longest task input accepted, in characters.
pub const MAX_INPUT_CHARS: usize = stele_aggregates::task::TaskInput::MAX_CHARS;

/// The pattern of a text that is not blank and has no NUL character (which the log cannot
/// store): white space, then a character that is neither white space nor NUL, then anything but
/// NUL. The white space listed is Unicode's `White_Space` (what `char::is_whitespace` and
/// `str::trim` take away), character by character, so that every regular-expression engine that
/// reads the document (JSON Schema validators, test generators) draws the same line as the
/// server; the classes do not overlap, so no engine backtracks more than once per character.
/// (`#[schema(pattern)]` takes only a literal: the fields repeat it, and a test checks it.)
pub const NOT_BLANK: &str = r"^[\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*[^\u0000\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000][^\u0000]*$";

/// A task to create.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTask {
    /// What the task is about (a message, a request): 1 to 32,768 characters, not all white
    /// space.
    #[schema(
        min_length = 1,
        max_length = 32_768,
        pattern = r"^[\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*[^\u0000\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000][^\u0000]*$"
    )]
    pub input: String,
    /// The workflow to run (`GET /v1/workflows` lists them); the default workflow when absent.
    #[serde(default)]
    #[schema(pattern = r"^[^\u0000]*$")]
    pub workflow: Option<String>,
    /// Who asks, and through which channel (the key's name and `api` when absent).
    #[serde(default)]
    pub requester: Option<RequesterBody>,
    /// Models chosen by agent role (`{"vox": "local/small"}`): each role's chosen model is
    /// tried first, the rest of its route after it as fallbacks. A model must be one of its
    /// role's route (`unknown_model` otherwise); the task's runs, child runs included, keep the
    /// choice.
    #[serde(default)]
    #[schema(schema_with = model_choices)]
    pub models: Option<BTreeMap<String, String>>,
}

/// `{role: model}`, or null: role and model names without NUL (which the log cannot store).
fn model_choices() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{SchemaType, Type};
    let name = || {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(NO_NUL))
    };
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Object, Type::Null]))
        .description(Some(
            "Models chosen by agent role (`{\"vox\": \"local/small\"}`): each role's chosen model \
             is tried first, the rest of its route after it as fallbacks. A model must be one of \
             its role's route (`unknown_model` otherwise); the task's runs, child runs included, \
             keep the choice.",
        ))
        .property_names(Some(name()))
        .additional_properties(Some(name()))
        .build()
}

impl Body for CreateTask {
    fn check(&self) -> Result<(), ApiError> {
        let chars = self.input.chars().count();
        if self.input.trim().is_empty() {
            return Err(ApiError::new(Code::InvalidInput, "`input` is empty"));
        }
        if chars > MAX_INPUT_CHARS {
            return Err(ApiError::new(
                Code::InputTooLong,
                format!("`input` has {chars} characters; at most {MAX_INPUT_CHARS} are allowed"),
            ));
        }
        match &self.requester {
            Some(r) if r.user_id.trim().is_empty() || r.channel.trim().is_empty() => {
                Err(ApiError::new(
                    Code::InvalidRequester,
                    "`requester.user_id` and `requester.channel` must not be empty",
                ))
            }
            _ => Ok(()),
        }
    }
}

/// Who asks for a task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequesterBody {
    /// The user's id on the channel; not blank, at most 256 characters.
    #[schema(
        min_length = 1,
        max_length = 256,
        pattern = r"^[\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*[^\u0000\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000][^\u0000]*$"
    )]
    pub user_id: String,
    /// The channel (`api`, `telegram`, `email`, …): a letter, then up to 31 letters, digits, `-`
    /// and `_`; stored in lowercase, white space around it ignored.
    #[schema(
        min_length = 1,
        pattern = r"^[\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*[A-Za-z][A-Za-z0-9_-]{0,31}[\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*$"
    )]
    pub channel: String,
}

/// A task, with its run's progress.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskBody {
    /// The task's id (its URL is `/v1/tasks/{id}`).
    #[schema(format = Uuid)]
    pub id: String,
    /// pending, routing, executing, completed, failed or cancelled.
    pub status: String,
    pub input: String,
    /// The workflow asked for, then the one the task was routed to.
    pub workflow: Option<String>,
    pub requester: Option<RequesterBody>,
    /// What the task produced once completed: any JSON value (often a string).
    pub result: Option<Value>,
    /// Why the task failed, or the reason it was cancelled.
    pub error: Option<String>,
    /// The task's workflow run, once it has started.
    pub run: Option<RunBody>,
}

/// A workflow run's progress.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct RunBody {
    pub id: String,
    pub workflow: String,
    /// The definition's version the run keeps to.
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
    /// The attempt the step is at, from 1.
    pub attempt: u32,
    /// What the step produced: any JSON value (often a string).
    pub output: Option<Value>,
    /// Why the step's last attempt failed.
    pub error: Option<String>,
}

/// One row of a task list.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskSummary {
    #[schema(format = Uuid)]
    pub id: String,
    /// pending, routing, executing, completed, failed or cancelled.
    pub status: String,
    pub workflow: Option<String>,
    pub run_id: Option<String>,
    pub requester: RequesterBody,
    pub input: String,
    pub current_step: Option<String>,
    /// What the task produced once completed: any JSON value (often a string).
    pub result: Option<Value>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A page of tasks, newest first.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskPage {
    pub tasks: Vec<TaskSummary>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
    /// With `q`: how many tasks this page's search looked at (`null` without `q`). A page of
    /// a search may hold fewer tasks than `limit`, even none, and still have a `next_cursor`:
    /// the tasks after it are not searched yet.
    pub searched: Option<usize>,
}

/// Filters of the task list.
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TaskListQuery {
    /// Only tasks in this status.
    #[param(inline)]
    pub status: Option<TaskStatus>,
    /// Only tasks of this workflow.
    pub workflow: Option<String>,
    /// Only tasks of this requester (user id; with `channel`, or `api`): the person they are.
    pub requester: Option<String>,
    /// Only tasks of this subject (a person's id).
    pub subject: Option<String>,
    /// Only tasks from this channel.
    pub channel: Option<String>,
    /// Only tasks created at or after this time (RFC 3339).
    pub created_after: Option<DateTime<Utc>>,
    /// Only tasks created before this time (RFC 3339).
    pub created_before: Option<DateTime<Utc>>,
    /// Only tasks whose id, workflow, requester, input, result or error hold every word of this
    /// text (any case): 1 to 200 characters, not all white space. Inputs are sealed with their
    /// person's key, so no index holds their words: a page is searched among the next 2,000
    /// tasks at most (see `searched`), and `next_cursor` continues the search from there.
    #[param(
        max_length = 200,
        pattern = r"^[\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*[^\u0000\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000][^\u0000]*$"
    )]
    pub q: Option<String>,
    /// From a previous page's `next_cursor`.
    #[param(pattern = r"^[0-9]{1,18}\.([2-7][0-9a-f])+$")]
    pub cursor: Option<String>,
    /// Tasks per page, 1 to 500 (50 by default).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<usize>,
}

/// A task's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    Pending,
    Routing,
    Executing,
    Completed,
    Failed,
    Cancelled,
}

impl TaskStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::Routing => "routing",
            TaskStatus::Executing => "executing",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
        }
    }
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
    /// Who and what caused the event (command, correlation and causation ids, actor, channel).
    #[schema(value_type = Object)]
    pub metadata: Value,
    /// The event's data as recorded: any JSON value (an object for Stele's own events).
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
            // A person's values as the values they hold (or `[erased]`).
            payload: stele_privacy::export::plainly(&event.payload),
        }
    }
}

/// A task's `text/event-stream`, seen two ways, since OpenAPI 3.1 has no `itemSchema` to describe
/// a stream's items apart from the whole: as text (what a plain HTTP client, a generated one for
/// instance, reads) or as one event at a time (what SSE tools read from `schema`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum SseStream {
    /// The whole stream as text: `id:`, `event:` and `data:` lines, events apart by a blank line.
    Text(String),
    /// One event.
    Event(SseEvent),
}

/// One Server-Sent Event of a task's stream.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct SseEvent {
    /// The event's type (`TaskCreated`, `StepCompleted`, …); `end` last, when the task and its
    /// run are finished; `error` if reading the log failed.
    pub event: String,
    /// The event as JSON (as in `/v1/tasks/{id}/events`); `{}` for `end`; a message for `error`.
    #[schema(content_media_type = "application/json")]
    pub data: String,
    /// A cursor to resume after this event with `Last-Event-ID` or `?after=`.
    #[schema(pattern = r"^([0-9]{1,18}(-[0-9]{1,18})*)?$")]
    pub id: Option<String>,
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
    /// After this position (0: from the start); a position above 0 must hold an event.
    #[param(minimum = 0)]
    pub after: Option<i64>,
    /// Events per page, 1 to 1,000 (100 by default).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

/// Why a task is cancelled.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelBody {
    /// Recorded with the cancellation (`cancelled by key <name>` when absent).
    #[serde(default)]
    #[schema(pattern = r"^[^\u0000]*$")]
    pub reason: Option<String>,
}

impl Body for CancelBody {}

/// A signal's payload.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalBody {
    /// What the waiting step receives as its output (e.g. `{"by": "ana"}`); `null` when absent.
    /// Any JSON object, nested at most 16 levels, with no NUL character in its keys or strings.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub payload: Option<serde_json::Map<String, Value>>,
}

impl Body for SignalBody {}

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
    /// available, running, completed, dead or cancelled.
    pub state: String,
    pub attempt: i32,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    pub last_error: Option<String>,
    /// Every failed attempt's error, oldest first.
    pub errors: Vec<String>,
    /// What the job's handler is given: any JSON value.
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
    /// Only jobs in this state (`dead`: the dead letters).
    #[param(inline)]
    pub state: Option<JobStateParam>,
    /// Only jobs of this queue.
    pub queue: Option<String>,
    /// Only jobs of this kind.
    pub kind: Option<String>,
    /// Jobs per page, 1 to 500 (50 by default).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<usize>,
}

/// A job's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStateParam {
    Available,
    Running,
    Completed,
    Dead,
    Cancelled,
}

impl From<JobStateParam> for stele_engine::queue::JobState {
    fn from(state: JobStateParam) -> Self {
        use stele_engine::queue::JobState as S;
        match state {
            JobStateParam::Available => S::Available,
            JobStateParam::Running => S::Running,
            JobStateParam::Completed => S::Completed,
            JobStateParam::Dead => S::Dead,
            JobStateParam::Cancelled => S::Cancelled,
        }
    }
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

/// Longest part of a memory's scope, tag or key, in characters.
pub const MAX_MEMORY_LABEL_CHARS: usize = 200;

/// Where a memory belongs; every part is optional (a memory with none is everyone's).
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemoryScopeBody {
    /// The agent role it belongs to.
    #[serde(default)]
    #[schema(max_length = 200, pattern = r"^[^\u0000]*$")]
    pub agent: Option<String>,
    /// The conversation it belongs to.
    #[serde(default)]
    #[schema(max_length = 200, pattern = r"^[^\u0000]*$")]
    pub conversation: Option<String>,
    /// A subject's id: the memory is theirs (sealed with their key, erased with them).
    #[serde(default)]
    #[schema(format = Uuid)]
    pub subject: Option<String>,
    #[serde(default)]
    #[schema(max_length = 200, pattern = r"^[^\u0000]*$")]
    pub workflow: Option<String>,
    #[serde(default)]
    #[schema(max_length = 200, pattern = r"^[^\u0000]*$")]
    pub tenant: Option<String>,
}

/// A fact to remember.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StoreMemory {
    /// The fact: 1 to 8,000 characters, not all white space.
    #[schema(
        min_length = 1,
        max_length = 8000,
        pattern = r"^[\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*[^\u0000\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000][^\u0000]*$"
    )]
    pub content: String,
    /// 0 (trivia) to 1 (never forget); 0.5 when absent.
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub importance: Option<f32>,
    /// Up to 16 labels, each 1 to 200 characters.
    #[serde(default)]
    #[schema(max_items = 16)]
    pub tags: Vec<TagText>,
    /// A name for the fact: a later fact with the same key in the same scope supersedes it
    /// (the earlier stays answerable with `at`).
    #[serde(default)]
    #[schema(min_length = 1, max_length = 200, pattern = r"^[^\u0000]*$")]
    pub key: Option<String>,
    #[serde(default)]
    pub scope: Option<MemoryScopeBody>,
}

impl Body for StoreMemory {
    fn check(&self) -> Result<(), ApiError> {
        let invalid = |why: String| Err(ApiError::new(Code::InvalidMemory, why));
        if self.content.trim().is_empty() {
            return invalid("`content` is empty".into());
        }
        let chars = self.content.chars().count();
        if chars > stele_aggregates::memory::MAX_CONTENT_CHARS {
            return invalid(format!(
                "`content` has {chars} characters; at most {} are accepted",
                stele_aggregates::memory::MAX_CONTENT_CHARS
            ));
        }
        if self.importance.is_some_and(|i| !(0.0..=1.0).contains(&i)) {
            return invalid("`importance` is from 0 to 1".into());
        }
        if self.tags.len() > stele_aggregates::memory::MAX_TAGS {
            return invalid(format!(
                "at most {} tags",
                stele_aggregates::memory::MAX_TAGS
            ));
        }
        let long = |text: &str| text.chars().count() > MAX_MEMORY_LABEL_CHARS;
        if self.tags.iter().any(|t| t.0.is_empty() || long(&t.0)) {
            return invalid(format!(
                "a tag has 1 to {MAX_MEMORY_LABEL_CHARS} characters"
            ));
        }
        if self.key.as_deref().is_some_and(|k| k.is_empty() || long(k)) {
            return invalid(format!(
                "`key` has 1 to {MAX_MEMORY_LABEL_CHARS} characters"
            ));
        }
        if let Some(scope) = &self.scope {
            for (name, part) in [
                ("agent", &scope.agent),
                ("conversation", &scope.conversation),
                ("workflow", &scope.workflow),
                ("tenant", &scope.tenant),
            ] {
                if part.as_deref().is_some_and(long) {
                    return invalid(format!(
                        "`scope.{name}` has at most {MAX_MEMORY_LABEL_CHARS} characters"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A memory's tag: 1 to 200 characters, no NUL.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TagText(pub String);

// Written out: utoipa's derive takes no pattern for a newtype's field.
impl utoipa::PartialSchema for TagText {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .min_length(Some(1))
            .max_length(Some(MAX_MEMORY_LABEL_CHARS))
            .pattern(Some(NO_NUL))
            .into()
    }
}

impl ToSchema for TagText {}

/// A remembered fact's id.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct MemoryStored {
    #[schema(format = Uuid)]
    pub memory_id: String,
}

/// How to search the memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MemoryMode {
    /// Vectors and full text, fused by Reciprocal Rank Fusion.
    #[default]
    Hybrid,
    /// Vectors only.
    Dense,
    /// Full text only.
    Text,
}

/// A search of the memory.
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct MemorySearchQuery {
    /// What to look for: 1 to 2,000 characters, not all white space.
    #[param(min_length = 1, max_length = 2000)]
    pub q: String,
    /// Only memories of this agent role.
    pub agent: Option<String>,
    /// Only memories of this conversation.
    pub conversation: Option<String>,
    /// Only memories of this subject (a person's id).
    #[param(format = Uuid)]
    pub subject: Option<String>,
    /// Only memories of this workflow.
    pub workflow: Option<String>,
    /// Only memories of this tenant.
    pub tenant: Option<String>,
    /// Memories valid at this time (RFC 3339; now when absent).
    pub at: Option<DateTime<Utc>>,
    /// How to search (`hybrid` by default).
    #[param(inline)]
    pub mode: Option<MemoryMode>,
    /// How many, 1 to 100 (10 by default).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<usize>,
}

/// A memory found.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct MemoryHit {
    pub memory_id: String,
    /// `fact`, `message`, `reply` or `step`.
    pub kind: String,
    /// Its content (`[erased]` if its person was erased since).
    pub content: String,
    /// The fused score (higher is better).
    pub score: f64,
    pub importance: f64,
    pub tags: Vec<String>,
    pub key: Option<String>,
    pub scope: MemoryScopeBody,
    /// The log position of the event it came from.
    pub position: i64,
    /// The ids of the events it cites.
    pub sources: Vec<String>,
    pub valid_from: DateTime<Utc>,
    /// When a later fact superseded it, or it was forgotten.
    pub valid_until: Option<DateTime<Utc>>,
}

/// The memories found, best first.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct MemoryHits {
    pub hits: Vec<MemoryHit>,
}

/// Why a fact is forgotten.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForgetMemory {
    /// For the audit trail (at most 2,000 characters).
    #[serde(default)]
    #[schema(max_length = 2000, pattern = r"^[^\u0000]*$")]
    pub reason: Option<String>,
}

impl Body for ForgetMemory {
    fn check(&self) -> Result<(), ApiError> {
        if self
            .reason
            .as_deref()
            .is_some_and(|r| r.chars().count() > 2000)
        {
            return Err(ApiError::new(
                Code::InvalidBody,
                "`reason` has at most 2,000 characters",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pattern(pattern: &str) -> jsonschema::Validator {
        jsonschema::draft202012::new(&json!({ "type": "string", "pattern": pattern })).unwrap()
    }

    /// The document's "not blank" is the server's: a text is blank exactly when `trim` leaves
    /// nothing, whatever character it is made of; NUL is refused anywhere.
    #[test]
    fn not_blank_is_what_trim_takes_away() {
        let not_blank = pattern(NOT_BLANK);
        // Every white-space character is below U+3100; a few characters above stand for the rest.
        let chars =
            (1..=0x3100)
                .filter_map(char::from_u32)
                .chain(['\u{FEFF}', '\u{1F600}', '\u{10FFFF}']);
        for c in chars {
            let alone = c.to_string();
            assert_eq!(
                not_blank.is_valid(&json!(alone)),
                !alone.trim().is_empty(),
                "{c:?}"
            );
            let padded = format!(" \u{3000}{c}\t");
            assert_eq!(
                not_blank.is_valid(&json!(padded)),
                !padded.trim().is_empty(),
                "{c:?}"
            );
        }
        for refused in ["", "\0", "a\0", "\0a", " \0 b"] {
            assert!(!not_blank.is_valid(&json!(refused)), "{refused:?}");
        }
        // A channel is valid in the document exactly when the server parses it.
        let channel = pattern(CHANNEL);
        for name in [
            "telegram",
            " Telegram ",
            "a",
            "x-1_y",
            "\u{3000}api\t",
            "",
            "1a",
            "a b",
            "é",
            "a\0",
            "abcdefghijklmnopqrstuvwxyzabcdef",
            "abcdefghijklmnopqrstuvwxyzabcdefg",
        ] {
            assert_eq!(
                channel.is_valid(&json!(name)),
                stele_aggregates::channel::Channel::parse(name).is_ok(),
                "{name:?}"
            );
        }
        let no_nul = pattern(NO_NUL);
        assert!(no_nul.is_valid(&json!("")) && no_nul.is_valid(&json!(" x ")));
        assert!(!no_nul.is_valid(&json!("a\0b")));
    }

    /// `#[schema(pattern)]` takes only literals: the fields repeat the patterns.
    #[test]
    fn the_document_repeats_the_patterns() {
        let document = serde_json::to_value(crate::server::openapi()).unwrap();
        let schemas = &document["components"]["schemas"];
        for (schema, field, expected) in [
            ("CreateTask", "input", NOT_BLANK),
            ("RequesterBody", "user_id", NOT_BLANK),
            ("RequesterBody", "channel", CHANNEL),
            ("CreateTask", "workflow", NO_NUL),
            ("CancelBody", "reason", NO_NUL),
        ] {
            assert_eq!(
                schemas[schema]["properties"][field]["pattern"], expected,
                "{schema}.{field}"
            );
        }
        assert_eq!(
            schemas["CreateTask"]["properties"]["input"]["maxLength"],
            MAX_INPUT_CHARS
        );
    }
}

/// A person known to Stele.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct SubjectBody {
    /// The subject's id.
    pub id: String,
    /// The identifiers that lead to them (`telegram:…`, `email:…`, `api:…`); none once erased.
    pub identifiers: Vec<String>,
    /// Only a guardian's consent counts for a minor.
    pub minor: bool,
    /// The latest consent recorded for each purpose.
    pub consents: Vec<ConsentBody>,
    /// Subjects merged into this one.
    pub merged_from: Vec<String>,
    /// The subject this one was merged into, if it was.
    pub merged_into: Option<String>,
    /// The erasure, if they were erased.
    pub erased: Option<ErasureBody>,
}

/// A consent as recorded.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ConsentBody {
    pub purpose: String,
    /// Given (`true`) or withdrawn.
    pub given: bool,
    /// The guardian who gave it, if not the person themself.
    pub guardian: Option<String>,
    /// The channel it came through.
    pub channel: String,
    pub at: DateTime<Utc>,
}

/// An erasure: whose keys were destroyed, when, by whom and why.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ErasureBody {
    /// The subjects whose data keys were destroyed (this one and those merged into it).
    pub keys: Vec<String>,
    pub by: String,
    pub reason: String,
    pub at: DateTime<Utc>,
}

/// A person to register, by their identifiers.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterSubject {
    /// `telegram:<digits>`, `email:<address>` or `api:<id>`; the first leads (a person it
    /// already leads to is that person), the others are linked.
    #[schema(min_items = 1, max_items = 20)]
    pub identifiers: Vec<IdentifierText>,
    /// A minor: only a guardian's consent counts.
    #[serde(default)]
    pub minor: Option<bool>,
}

impl Body for RegisterSubject {}

/// An identifier as the API takes it: `telegram:<digits>`, `email:<local>@<domain>` (visible
/// ASCII; stored lowercased) or `api:<id>` (visible ASCII).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IdentifierText(pub String);

/// [`IdentifierText`]'s pattern: what [`stele_aggregates::subject::Identifier::parse`] takes,
/// narrowed to visible ASCII so that a pattern says it exactly.
pub const IDENTIFIER: &str =
    r"^(telegram:[0-9]{1,32}|email:[!-?A-~]{1,64}@[!-?A-~]{1,190}|api:[!-~]{1,200})$";

// Written out: utoipa's derive takes no pattern for a newtype's field.
impl utoipa::PartialSchema for IdentifierText {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some(IDENTIFIER))
            .description(Some(
                "`telegram:<digits>`, `email:<local>@<domain>` (visible ASCII; stored lowercased) or `api:<id>` (visible ASCII)",
            ))
            .into()
    }
}

impl ToSchema for IdentifierText {}

/// A consent to record.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecordConsent {
    /// The purpose (`processing`, `memory`, …): a letter, then up to 63 of `a-z`, `0-9`, `-`,
    /// `_`.
    #[schema(pattern = r"^[a-z][a-z0-9_-]{0,63}$")]
    pub purpose: String,
    /// `true` to give it, `false` to withdraw it.
    pub given: bool,
    /// Given by this guardian (a minor's consent is their guardian's): not blank.
    #[serde(default)]
    #[schema(
        max_length = 200,
        pattern = r"^[\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*[^\u0000\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000][^\u0000]*$"
    )]
    pub guardian: Option<String>,
    /// The channel it came through (`api` when absent).
    #[serde(default)]
    #[schema(
        pattern = r"^[\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*[A-Za-z][A-Za-z0-9_-]{0,31}[\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*$"
    )]
    pub channel: Option<String>,
}

impl Body for RecordConsent {}

/// Where to merge a subject.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MergeSubject {
    /// The subject that takes this one over.
    #[schema(format = Uuid)]
    pub into: String,
}

impl Body for MergeSubject {}

/// Why a subject is erased.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EraseSubject {
    /// Recorded with the erasure.
    #[serde(default)]
    #[schema(max_length = 500, pattern = r"^[^\u0000]*$")]
    pub reason: Option<String>,
}

impl Body for EraseSubject {}

/// A subject, as listed.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct SubjectSummary {
    pub id: String,
    pub registered_at: Option<DateTime<Utc>>,
    pub minor: bool,
    pub merged_into: Option<String>,
    pub erased_at: Option<DateTime<Utc>>,
    /// When an event last held their data.
    pub last_seen_at: DateTime<Utc>,
    /// How many events hold their data.
    pub events: i64,
}

/// One page of subjects, by id.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct SubjectPage {
    pub subjects: Vec<SubjectSummary>,
    /// Pass as `after` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// Which subjects to list.
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SubjectListQuery {
    /// Continue after this subject id (a previous page's `next_cursor`).
    #[param(format = Uuid)]
    pub after: Option<String>,
    /// Subjects per page, 1 to 500 (100 by default).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<usize>,
}

/// A signed tree head of the audit log.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct CheckpointBody {
    /// How many events the tree holds.
    pub size: u64,
    /// The tree's root hash (base64).
    pub root: String,
    pub signed_at: DateTime<Utc>,
    /// The C2SP signed note (`tlog-checkpoint`), as signed.
    pub note: String,
}

/// The audit log's checkpoints, oldest first, and the key that signs them.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct CheckpointPage {
    /// The signed-note verifier key (`<name>+<id>+<key>`) to check them with.
    pub verifier_key: String,
    pub checkpoints: Vec<CheckpointBody>,
}

/// Which checkpoints to list.
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CheckpointQuery {
    /// The newest this many (100 by default, at most 1000).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

/// Which event to prove, in which checkpoint.
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct InclusionQuery {
    /// The event's log position.
    #[param(minimum = 1)]
    pub position: i64,
    /// The checkpoint's size (the newest by default).
    #[param(minimum = 1)]
    pub size: Option<u64>,
}

/// Which two checkpoints.
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ConsistencyQuery {
    /// The older checkpoint's size.
    #[param(minimum = 1)]
    pub from: u64,
    /// The newer checkpoint's size.
    #[param(minimum = 1)]
    pub to: u64,
}

/// Which audit rows.
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditEventQuery {
    /// Only what this actor did (`key:<id>`, `user:<name>`, `workflow-runtime`, …).
    #[param(pattern = r"^[^\u0000]*$")]
    pub actor: Option<String>,
    /// Only events holding this subject's data.
    #[param(pattern = r"^[^\u0000]*$")]
    pub subject: Option<String>,
    /// Only events of this task (and its runs).
    #[param(pattern = r"^[^\u0000]*$")]
    pub task: Option<String>,
    /// Only this stream (`type/id`) or streams of this type.
    #[param(pattern = r"^[^\u0000]*$")]
    pub stream: Option<String>,
    /// From this time on.
    pub since: Option<DateTime<Utc>>,
    /// Before this time.
    pub until: Option<DateTime<Utc>>,
    /// After this position (a previous page's `next_cursor`).
    #[param(minimum = 0)]
    pub after: Option<i64>,
    /// Rows per page, 1 to 1000 (100 by default).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

/// One event of the audit view.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditEventBody {
    pub position: i64,
    pub recorded_at: DateTime<Utc>,
    pub actor: String,
    pub channel: String,
    /// `type/id`.
    pub stream: String,
    pub event_type: String,
    pub task_id: Option<String>,
    pub conversation_id: Option<String>,
    /// The subject whose data it holds.
    pub subject: Option<String>,
    pub correlation_id: String,
    pub causation_id: String,
}

/// A page of the audit view, in log order.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditEventPage {
    pub events: Vec<AuditEventBody>,
    /// Pass as `after` for the next page; `null` on the last page.
    pub next_cursor: Option<i64>,
}

/// A channel's recorded access list.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct AccessListBody {
    /// Ids allowed at run time (once any id is allowed, others are refused).
    pub allowed: Vec<String>,
    /// Ids refused, whatever else allows them.
    pub denied: Vec<String>,
}

/// Whether an id may use the channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AccessRule {
    Allow,
    Deny,
}

/// A change to a channel's access list.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AccessChange {
    pub access: AccessRule,
}

impl Body for AccessChange {}

/// When missed moments are fired (see `docs/schedules.md`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CatchUpBody {
    /// Each missed moment, oldest first (at most 100).
    All,
    /// The latest missed moment; the others are recorded as skipped.
    #[default]
    Latest,
    /// None: a moment over a minute late is recorded as skipped.
    Skip,
}

/// What a moment does while the last one's task still runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OverlapBody {
    /// It is recorded as skipped.
    #[default]
    Skip,
    /// It starts its task anyway.
    Allow,
}

/// When a schedule fires: a cron pattern in a time zone, or an interval.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum TimingBody {
    Cron(CronTiming),
    Every(EveryTiming),
}

/// A cron pattern in a time zone.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CronTiming {
    /// 5 fields (minute hour day-of-month month day-of-week), 6 with seconds first, or
    /// `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`.
    #[schema(min_length = 1, max_length = 200, pattern = r"^[^\u0000]*$")]
    pub cron: String,
    /// An IANA time zone such as `Europe/Paris`; UTC when absent.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 64, pattern = r"^[^\u0000]*$")]
    pub timezone: Option<String>,
}

/// An interval.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EveryTiming {
    /// As `90s`, `15m`, `1h 30m`, `1d`: a whole number of seconds, at least one.
    #[schema(min_length = 1, max_length = 64, pattern = r"^[^\u0000]*$")]
    pub every: String,
}

/// A schedule to create.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSchedule {
    /// Its name, also its id: 1 to 64 lowercase letters, digits, `-` and `_`, starting with a
    /// letter or digit.
    #[schema(pattern = r"^[a-z0-9][a-z0-9_-]{0,63}$")]
    pub name: String,
    pub timing: TimingBody,
    /// The workflow each moment starts (`GET /v1/workflows` lists them).
    #[schema(min_length = 1, max_length = 200, pattern = r"^[^\u0000]*$")]
    pub workflow: String,
    /// The input of each moment's task: 1 to 32,768 characters, not all white space.
    #[schema(
        min_length = 1,
        max_length = 32_768,
        pattern = r"^[\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*[^\u0000\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000][^\u0000]*$"
    )]
    pub input: String,
    #[serde(default)]
    pub catch_up: Option<CatchUpBody>,
    #[serde(default)]
    pub overlap: Option<OverlapBody>,
}

impl Body for CreateSchedule {}

/// A schedule.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ScheduleBody {
    pub name: String,
    pub status: ScheduleStatusBody,
    /// The cron pattern, for a pattern's schedule.
    pub cron: Option<String>,
    /// The pattern's time zone.
    pub timezone: Option<String>,
    /// The interval in seconds, for an interval's schedule.
    pub every_seconds: Option<u64>,
    pub workflow: String,
    pub input: String,
    pub catch_up: CatchUpBody,
    pub overlap: OverlapBody,
    /// The moment it fires next (while active).
    pub next_due: Option<DateTime<Utc>>,
    /// The last moment it fired.
    pub last_fired: Option<DateTime<Utc>>,
    /// The id of the task of `last_fired`.
    pub last_task_id: Option<String>,
    /// Moments fired.
    pub fired: u64,
    /// Moments skipped (missed while down, or overlapping).
    pub skipped: u64,
}

/// Whether a schedule fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleStatusBody {
    Active,
    Paused,
    Removed,
}

/// Schedules, by name.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ScheduleList {
    pub schedules: Vec<ScheduleBody>,
}

/// A schedule's name in a path.
#[derive(Clone, Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ScheduleName {
    /// The schedule's name.
    pub name: String,
}

/// The models the agents run on.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ModelsBody {
    pub providers: Vec<ProviderBody>,
    pub roles: Vec<RoleBody>,
}

/// A model provider.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ProviderBody {
    pub name: String,
    /// `openai` (an OpenAI-compatible server), `scripted` (the offline model), or `plugged-in`.
    pub kind: String,
    /// Where an OpenAI-compatible provider is reached.
    pub base_url: Option<String>,
    /// The models the roles' routes name at this provider.
    pub models: Vec<String>,
    pub circuit: CircuitBody,
}

/// A provider's circuit breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CircuitBody {
    /// Calls go through (healthy).
    Closed,
    /// Calls are refused until the cool-down has passed.
    Open,
    /// The next call is a trial that closes or reopens it.
    HalfOpen,
}

/// An agent role.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct RoleBody {
    pub name: String,
    pub description: String,
    /// `provider/model`, the primary first, then the fallbacks.
    pub route: Vec<String>,
    pub tools: Vec<String>,
    /// The model an operator chose for it at run time (tried first in every task, before the
    /// route; a chat's own choice goes over it), if any.
    pub chosen: Option<String>,
}

/// A role's name in a path.
#[derive(Clone, Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct RoleName {
    /// The agent role's name.
    pub role: String,
}

/// The model to try first for an agent role in every task.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChooseRoleModel {
    /// `provider/model`, one of the role's route; `null`: the role's own route again.
    #[schema(max_length = 200, pattern = r"^[^\u0000]*$")]
    pub model: Option<String>,
}

impl Body for ChooseRoleModel {}

/// A chat call, as OpenAI's `POST /v1/chat/completions` takes it (the fields Stele serves).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatCompletionRequest {
    /// An agent role (`GET /v1/models` lists them: its route with fallbacks, its system prompt
    /// and output schema apply), or one model as `provider/model`.
    #[schema(min_length = 1, max_length = 200, pattern = r"^[^\u0000]*$")]
    pub model: String,
    /// The conversation so far, oldest first.
    #[schema(min_items = 1, max_items = 256)]
    pub messages: Vec<ChatMessageBody>,
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f32>,
    /// Upper bound on generated tokens.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub max_tokens: Option<u32>,
}

impl Body for ChatCompletionRequest {}

/// Who wrote a chat message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChatRoleBody {
    System,
    User,
    Assistant,
}

/// One message of a chat.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatMessageBody {
    pub role: ChatRoleBody,
    /// Up to 32,768 characters.
    #[schema(max_length = 32_768, pattern = r"^[^\u0000]*$")]
    pub content: String,
}

/// The answer, as OpenAI's chat completions answer.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletion {
    /// The call's id: its record is the stream `model_call/<id>`.
    pub id: String,
    /// Always `chat.completion`.
    pub object: String,
    /// Unix seconds.
    pub created: i64,
    /// The model that answered, `provider/model` (a fallback's when the primary failed).
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: ChatUsage,
}

/// The one choice of an answer.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ChatChoice {
    pub index: u32,
    pub message: ChatMessageBody,
    /// Why generation stopped (`stop`, `length`, …), as the model said.
    pub finish_reason: Option<String>,
}

/// Tokens, as the model reported them (0 when it did not).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ChatUsage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

/// One file of a run's workspace.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct WorkspaceFile {
    /// Its path in the workspace (`/`-separated, relative).
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
    /// `sha256:<hex>` of its content.
    pub digest: String,
}

/// The workspace of one of a task's runs.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct RunWorkspace {
    pub run_id: String,
    /// The run's person was erased: its files are gone with them.
    pub erased: bool,
    pub files: Vec<WorkspaceFile>,
}

/// The workspaces of a task's runs (those whose agents wrote files or ran commands).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskWorkspace {
    pub runs: Vec<RunWorkspace>,
}

/// Which file of a task's workspaces.
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WorkspaceFileQuery {
    /// The file's path in the workspace.
    #[param(min_length = 1, max_length = 1024)]
    pub path: String,
    /// The run whose workspace holds it; the first run holding that path when left out.
    pub run: Option<String>,
}

/// An agent's seat in a room.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SeatBody {
    /// How the agent is named and addressed (`@name`): 1 to 64 letters, digits, `-`, `_`, `.`.
    #[schema(pattern = r"^[A-Za-z0-9._-]{1,64}$")]
    pub name: String,
    /// The agent role that answers for it (`GET /v1/models` lists them).
    #[schema(pattern = r"^[A-Za-z0-9._-]{1,64}$")]
    pub role: String,
    /// Said to its model before the room's conversation (its system prompt).
    #[serde(default)]
    #[schema(max_length = 8000, pattern = r"^[^\u0000]*$")]
    pub personality: Option<String>,
    #[serde(default)]
    #[schema(max_items = 16)]
    pub traits: Option<Vec<TraitText>>,
    /// The model (`provider/model`) that speaks for it instead of its role's route.
    #[serde(default)]
    #[schema(max_length = 200, pattern = r"^[^/\u0000]+/[^\u0000]*\S[^\u0000]*$")]
    pub model: Option<String>,
}

/// One of an agent's traits.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[schema(value_type = String, max_length = 200, pattern = r"^[^\u0000]*$")]
pub struct TraitText(pub String);

/// Who speaks next in a room.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RoomPolicyBody {
    /// Each agent that may speak, in seat order.
    #[default]
    RoundRobin,
    /// The agent the last message names (`@name`), otherwise round robin.
    Addressed,
    /// The `moderator_agent` gives the floor to one of the others.
    Moderator,
}

/// A room to open.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRoom {
    /// Its name, also its id: 1 to 64 letters, digits, `-`, `_`, `.`.
    #[schema(pattern = r"^[A-Za-z0-9._-]{1,64}$")]
    pub name: String,
    #[serde(default)]
    #[schema(max_length = 2000, pattern = r"^[^\u0000]*$")]
    pub topic: Option<String>,
    /// Its agents, in turn order (1 to 16, names unique).
    #[schema(min_items = 1, max_items = 16)]
    pub agents: Vec<SeatBody>,
    /// The people who may mute, unmute, remove and pin.
    #[serde(default)]
    #[schema(max_items = 100)]
    pub moderators: Option<Vec<MemberName>>,
    #[serde(default)]
    pub policy: Option<RoomPolicyBody>,
    /// Under the `moderator` policy: the agent (one of `agents`) that gives the floor.
    #[serde(default)]
    #[schema(pattern = r"^[A-Za-z0-9._-]{1,64}$")]
    pub moderator_agent: Option<String>,
    /// Agent turns allowed in any hour (60 when left out).
    #[serde(default, deserialize_with = "crate::json::optional_whole")]
    #[schema(minimum = 1, maximum = 3600)]
    pub turns_per_hour: Option<u32>,
}

impl Body for CreateRoom {}

/// A member's name in a room (a person's handle or an agent's name).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[schema(value_type = String, min_length = 1, max_length = 64, pattern = r"^[^\u0000]*$")]
pub struct MemberName(pub String);

/// A room.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct RoomBody {
    pub name: String,
    pub topic: String,
    pub agents: Vec<SeatView>,
    pub moderators: Vec<String>,
    pub policy: RoomPolicyBody,
    /// The agent that gives the floor, under the `moderator` policy.
    pub moderator_agent: Option<String>,
    pub turns_per_hour: u32,
    /// Agent turns still allowed in the hour before now.
    pub turns_left: u32,
    /// Agent turns taken so far.
    pub turns: u64,
    /// Who speaks next under round robin or addressing (`null` under a moderator agent, or when
    /// no agent may speak).
    pub next_speaker: Option<String>,
    pub muted: Vec<String>,
    pub removed: Vec<String>,
    /// Messages in the room.
    pub message_count: u64,
    /// The messages asked for (`after`, `limit`), oldest first.
    pub messages: Vec<RoomMessageBody>,
}

/// An agent's seat, as a room shows it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct SeatView {
    pub name: String,
    pub role: String,
    pub personality: String,
    pub traits: Vec<String>,
    /// Its own model, if it has one.
    pub model: Option<String>,
    pub muted: bool,
    pub removed: bool,
}

/// A message of a room.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct RoomMessageBody {
    /// Its number in the room (1, 2, …).
    pub seq: u64,
    pub from: String,
    /// Whether an agent said it.
    pub agent: bool,
    /// What was said; `null` once the person who said it was erased.
    pub text: Option<String>,
    pub at: DateTime<Utc>,
    pub pinned: bool,
}

/// Rooms, by name.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct RoomList {
    pub rooms: Vec<RoomSummary>,
}

/// A room in a list.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct RoomSummary {
    pub name: String,
    pub topic: String,
    /// Its agents' names, in turn order.
    pub agents: Vec<String>,
    pub message_count: u64,
    pub turns: u64,
    /// When the last message was said.
    pub last_message_at: Option<DateTime<Utc>>,
}

/// A room's name in a path.
#[derive(Clone, Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct RoomName {
    /// The room's name.
    #[param(pattern = r"^[A-Za-z0-9._-]{1,64}$")]
    pub name: String,
}

/// Which of a room's messages to show.
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RoomQuery {
    /// Messages after this number (0 when left out).
    #[param(minimum = 0)]
    pub after: Option<u64>,
    /// At most this many (100 when left out; the latest ones when `after` is left out).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// A person's message to a room.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PostRoomMessage {
    /// Who says it (their handle in the room; not one of its agents).
    #[schema(min_length = 1, max_length = 64, pattern = r"^[^\u0000]*$")]
    pub from: String,
    /// What they say: 1 to 8,000 characters, not all white space.
    #[schema(
        min_length = 1,
        max_length = 8000,
        pattern = r"^[\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*[^\u0000\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000][^\u0000]*$"
    )]
    pub text: String,
    /// The subject (`GET /v1/subjects`) whose words these are: sealed with their key, in their
    /// export, gone with their erasure.
    #[serde(default)]
    #[schema(max_length = 200, pattern = r"^[^\u0000]*$")]
    pub subject: Option<String>,
}

impl Body for PostRoomMessage {}

/// A moderator's action in a room.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoomActionBody {
    pub action: RoomActionKind,
    /// The moderator acting (one of the room's moderators).
    #[schema(min_length = 1, max_length = 64, pattern = r"^[^\u0000]*$")]
    pub by: String,
    /// Whom `mute`, `unmute` and `remove` act on (an agent, or a person who has spoken).
    #[serde(default)]
    #[schema(min_length = 1, max_length = 64, pattern = r"^[^\u0000]*$")]
    pub member: Option<String>,
    /// The message `pin` pins.
    #[serde(default, deserialize_with = "crate::json::optional_whole")]
    #[schema(minimum = 1, maximum = 9_007_199_254_740_991_u64)]
    pub seq: Option<u64>,
}

impl Body for RoomActionBody {
    fn check(&self) -> Result<(), ApiError> {
        let fits = match self.action {
            RoomActionKind::Pin => self.seq.is_some() && self.member.is_none(),
            _ => self.member.is_some() && self.seq.is_none(),
        };
        if fits {
            Ok(())
        } else {
            Err(ApiError::new(
                Code::InvalidRoom,
                "`pin` takes `seq`; `mute`, `unmute` and `remove` take `member`",
            ))
        }
    }
}

/// What a moderator does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RoomActionKind {
    /// An agent skips its turns; a person cannot post.
    Mute,
    Unmute,
    /// For good.
    Remove,
    /// Agents always see a pinned message.
    Pin,
}

/// One agent's turn.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TurnBody {
    pub agent: String,
    pub text: String,
    /// The message's number in the room.
    pub seq: u64,
    /// `provider/model` that answered.
    pub model: String,
    pub input_tokens: u32,
    pub output_tokens: u32,
}

/// How many conversations to list.
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ConversationQuery {
    /// At most this many, most recently active first (50 when left out).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
}

/// Conversations, most recently active first.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ConversationList {
    pub conversations: Vec<ConversationSummary>,
}

/// A conversation in a list.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ConversationSummary {
    pub id: String,
    /// `telegram`, `email`, …
    pub channel: Option<String>,
    /// `new`, `open` or `closed`.
    pub status: String,
    pub message_count: u64,
    /// Messages that could not be read, kept aside as they came.
    pub quarantined: u64,
    pub last_event_at: DateTime<Utc>,
}

/// A conversation's id in a path.
#[derive(Clone, Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ConversationId {
    /// The conversation's id.
    pub id: String,
}

/// A conversation with its messages.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ConversationBody {
    pub id: String,
    pub channel: Option<String>,
    /// `new`, `open` or `closed`.
    pub status: String,
    /// An email thread's subject (`[erased]` once its person is).
    pub subject: Option<String>,
    /// The person it is with (their subject id).
    pub owner: Option<String>,
    /// Everyone who took part (participant ids).
    pub participants: Vec<String>,
    pub quarantined: u64,
    /// Why it is closed, while it is.
    pub close_reason: Option<String>,
    pub messages: Vec<ConversationMessageBody>,
}

/// A message of a conversation, in or out.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ConversationMessageBody {
    pub seq: u64,
    /// `inbound` or `outbound`.
    pub direction: String,
    /// The sender's participant id.
    pub from: String,
    pub text: String,
    /// Files attached.
    pub attachments: u64,
    /// When the channel says it was sent (inbound messages).
    pub sent_at: Option<DateTime<Utc>>,
    /// The task it started or belongs to.
    pub task_id: Option<String>,
    /// `received`, `queued`, `delivered`, `failed` or `bounced`.
    pub delivery: String,
    /// Why the last delivery failed or bounced.
    pub delivery_error: Option<String>,
    pub failed_attempts: u32,
    /// What the input sanitiser did to it (`flag`, `filter`, `truncate`, `block`), if anything.
    pub screened: Option<String>,
    /// Why no automatic answer may go to it, if none may.
    pub no_reply: Option<String>,
}
