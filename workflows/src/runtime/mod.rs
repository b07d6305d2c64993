//! The workflow runtime: performs what runs decide.
//!
//! ```text
//!  TaskCreated ──► [manager] ──► job workflow.start ──► Task routed, RunStarted + StepScheduled
//!  StepScheduled ─► [manager] ──► job workflow.step ──► model / tool ──► StepCompleted + next StepScheduled
//!  TimerArmed / WaitStarted ──► delayed jobs workflow.timer / workflow.wait_timeout
//!  ChildrenStarted ──► jobs workflow.start_child (one per child run)
//!  ReplyRequested ──► job workflow.reply ──► when the task came from a conversation: the reply
//!                  queued on it (ReplyQueued), which its channel's outbox delivers
//!  RunCompleted / RunFailed / RunCancelled ──► job workflow.run_finished ──► task finished,
//!                                  parent told, children and queued steps cancelled
//!  TaskCancelled ──► job workflow.cancel ──► RunCancelled
//!  ScheduleCreated / ScheduleFired ──► jobs schedule.tick / schedule.start (`schedules.rs`)
//! ```
//!
//! The manager is a process manager ([`stele_engine::process`]). The runtime's own commands run
//! it as their reactor: a decision's jobs are enqueued in the transaction that records it. For
//! events recorded otherwise (by an older node, or another bus), it follows the log with a
//! checkpoint and enqueues jobs in the checkpoint's transaction. Either way every recorded
//! decision becomes its job exactly once, whatever crashes. Jobs are idempotent: each handler first loads
//! the aggregate and does nothing when the work is already done (a late or repeated job). So a
//! crash of any process at any point resumes every run.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use stele_aggregates::conversation::{
    Conversation, ConversationCommand, ConversationError, ParticipantKind,
};
use stele_aggregates::ids::{RunId, StepId, TaskId};
use stele_aggregates::memory::MemoryScope;
use stele_aggregates::task::{
    Origin, Requester, Routed, Task, TaskCommand, TaskError, TaskInput, TaskStatus,
};
use stele_aggregates::workflow_run::{
    ChildResult, ChildSpec, Decider, ParentLink, Remember, RunCommand, RunError, RunEvent,
    RunStatus, StepOutcome, StepStatus, WorkflowRun,
};
use stele_engine::command::Executed;
use stele_engine::process::ProcessManager;
use stele_engine::queue::worker::{Done, HandlerResult, Worker, WorkerOptions};
use stele_engine::queue::{Job, JobQueue, NewJob};
use stele_engine::{
    CommandBus, CommandError, CommandMeta, EventLog, LogError, Position, RecordedEvent, Store,
    StreamId,
};
use uuid::Uuid;

use crate::decide::{Catalog, CatalogDecider};
use crate::definition::{Definition, Escalation, StepKind};
use crate::expr;
use crate::follow::{Cursor, TaskFollower};
use crate::recall::{Recall, RecallRequest};
use crate::tools::{Caller, Tools};
use stele_models::{Clock, SystemClock};

mod gateway;
mod handlers;
mod manager;
mod retention;
mod rooms;
mod schedules;
mod tasks;

pub use gateway::{ChatOutcome, MODEL_CALL_STREAM};
pub use manager::{step_job_key, Manager};
pub use retention::{RetentionManager, RETENTION_JOB, RETENTION_MANAGER};
pub use rooms::{Turn, ROOM_HISTORY};
pub use schedules::{
    scheduled_task_id, ScheduleManager, SCHEDULE_CHANNEL, SCHEDULE_MANAGER, SCHEDULE_START_JOB,
    SCHEDULE_TICK_JOB,
};

/// The queue step jobs and the runtime's own jobs run on.
pub const QUEUE: &str = "workflows";
/// The process manager's name (its checkpoint).
pub const MANAGER: &str = "workflow-runtime";

/// Task and run states kept in memory between one step and the next (see
/// [`CommandBus::with_state_cache`]): enough for the runs in flight, briefly.
const STATES: u64 = 10_000;
const STATES_TTL: Duration = Duration::from_secs(5);

/// Time a step job may run beyond its step's own timeout before the queue gives up on it (the
/// handler records the step's timeout itself; this covers a handler stuck recording).
const JOB_TIMEOUT_MARGIN: Duration = Duration::from_secs(30);

/// A request to an agent role.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentRequest {
    pub agent: String,
    pub prompt: String,
    /// What this attempt changes (another agent or model, a simpler prompt), on a retry.
    pub escalation: Option<Escalation>,
    /// The step asking (its tools are called for it).
    pub caller: Caller,
    /// Models the run's requester chose, by agent role (`provider/model`): tried first.
    pub models: BTreeMap<String, String>,
}

/// What an agent call gave: its output (JSON when the role has an output schema, text
/// otherwise) and every model call made, as recorded in the step's events.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentResult {
    pub output: Result<Value, String>,
    pub calls: Vec<Value>,
}

/// The agents `agent` steps and routes by agent call (the model router).
#[async_trait]
pub trait Agents: Send + Sync {
    fn knows(&self, agent: &str) -> bool;
    async fn run(&self, request: AgentRequest) -> AgentResult;

    /// The models (`provider/model`) a requester may choose for `agent` (its route), `None`
    /// when the agents offer no choice of model.
    fn models_of(&self, _agent: &str) -> Option<Vec<String>> {
        None
    }

    /// The model router the agents call, for calls that are no agent step (the gateway).
    fn router(&self) -> Option<&stele_models::ModelRouter> {
        None
    }
}

/// Errors of runtime operations asked for by people and programs.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("no task {0}")]
    UnknownTask(String),
    #[error("unknown workflow {name} (there are: {})", known.join(", "))]
    UnknownWorkflow { name: String, known: Vec<String> },
    /// A requester's choice of model names an agent role that is not there, or a model outside
    /// the role's route.
    #[error("{0}")]
    UnknownModel(String),
    #[error("{0}")]
    Task(TaskError),
    #[error("{0}")]
    Run(RunError),
    #[error("task {0} has no workflow run yet")]
    NotStarted(String),
    #[error("{0}")]
    Definitions(String),
    #[error("{0}")]
    Command(String),
    /// About the person: the requester has not consented to what the task needs (the refusal
    /// is recorded), their id is no identifier, a subject's state refuses, a store failed.
    #[error("{0}")]
    Schedule(stele_aggregates::schedule::ScheduleError),
    /// No model of the route answered (each attempt is recorded).
    #[error("{0}")]
    ModelsFailed(String),
    /// The input sanitiser blocked the input (recorded as `InputBlocked` on `task/<task_id>`).
    #[error("the input was blocked: it contains {}", screening.summary())]
    InputBlocked {
        task_id: TaskId,
        screening: stele_aggregates::screening::Screening,
    },
    #[error("{0}")]
    Room(stele_aggregates::room::RoomError),
    #[error(transparent)]
    Subject(#[from] stele_privacy::SubjectsError),
    #[error(transparent)]
    Log(#[from] LogError),
}

impl<E: std::error::Error> From<CommandError<E>> for RuntimeError {
    fn from(e: CommandError<E>) -> Self {
        match e {
            CommandError::Log(e) => RuntimeError::Log(e),
            other => RuntimeError::Command(other.to_string()),
        }
    }
}

/// What [`Runtime::create_task`] did.
#[derive(Debug)]
pub enum Created {
    /// A new task: its id, and the workflow it was routed to as it was created (it is then
    /// executing; `None`: pending, routed by its start job).
    New {
        task_id: TaskId,
        workflow: Option<String>,
    },
    /// The same request again under the same command id: the task it created.
    Repeated(Box<TaskView>),
    /// The command id (an idempotency key) was used before for another request: that task's id.
    KeyReused(TaskId),
}

impl Created {
    /// The task's id, whatever happened.
    pub fn task_id(&self) -> &TaskId {
        match self {
            Created::New { task_id: id, .. } | Created::KeyReused(id) => id,
            Created::Repeated(view) => &view.task_id,
        }
    }
}

/// A task as the CLI and the API show it.
#[derive(Clone, Debug, Serialize)]
pub struct TaskView {
    pub task_id: TaskId,
    #[serde(flatten)]
    pub task: Task,
    pub run: Option<WorkflowRun>,
    /// The last sequence of the task's stream and of its run's (0 without a run) this view
    /// includes.
    #[serde(skip)]
    pub versions: (i64, i64),
}

/// Aggregate type names, as streams are named.
trait TypeName {
    const TYPE_NAME: &'static str;
}

impl TypeName for Task {
    const TYPE_NAME: &'static str = <Task as cqrs_es::Aggregate>::TYPE;
}

impl TypeName for WorkflowRun {
    const TYPE_NAME: &'static str = <WorkflowRun as cqrs_es::Aggregate>::TYPE;
}

/// Runs workflows: creates tasks, executes step jobs, and answers questions about tasks.
pub struct Runtime {
    log: Arc<dyn EventLog>,
    queue: Arc<dyn JobQueue>,
    catalog: Arc<Catalog>,
    tasks: CommandBus<Task>,
    runs: CommandBus<WorkflowRun>,
    conversations: Arc<CommandBus<Conversation>>,
    /// Channels' own buses for their conversations, by conversation id prefix (see
    /// [`Runtime::route_conversations`]).
    channel_buses: std::sync::RwLock<Vec<(String, Arc<CommandBus<Conversation>>)>>,
    schedules: CommandBus<stele_aggregates::schedule::Schedule>,
    role_models: CommandBus<stele_aggregates::role_models::RoleModels>,
    rooms: CommandBus<stele_aggregates::room::Room>,
    agents: Arc<dyn Agents>,
    tools: Tools,
    default_workflow: Option<String>,
    clock: Arc<dyn Clock>,
    subjects: Option<Arc<stele_privacy::Subjects>>,
    recall: Option<Arc<dyn Recall>>,
    sanitizer: Arc<crate::sanitize::Sanitizer>,
}

impl Runtime {
    pub fn new(store: &Store, catalog: Catalog, agents: Arc<dyn Agents>, tools: Tools) -> Self {
        let catalog = Arc::new(catalog);
        let decider: Arc<dyn Decider> = Arc::new(CatalogDecider(catalog.clone()));
        Self {
            log: store.log.clone(),
            queue: store.queue.clone(),
            // Decisions become their jobs in their own commits (the manager passes them by).
            tasks: CommandBus::new(store.log.clone(), ())
                .with_reactor(Arc::new(Manager))
                .with_state_cache(STATES, STATES_TTL),
            runs: CommandBus::new(store.log.clone(), decider)
                .with_reactor(Arc::new(Manager))
                .with_state_cache(STATES, STATES_TTL),
            conversations: Arc::new(
                CommandBus::new(store.log.clone(), ()).with_state_cache(STATES, STATES_TTL),
            ),
            channel_buses: Default::default(),
            schedules: CommandBus::new(store.log.clone(), ())
                .with_reactor(Arc::new(ScheduleManager)),
            role_models: CommandBus::new(store.log.clone(), ()).with_state_cache(1, STATES_TTL),
            rooms: CommandBus::new(store.log.clone(), ()),
            catalog,
            agents,
            tools,
            default_workflow: None,
            clock: Arc::new(SystemClock),
            subjects: None,
            recall: None,
            sanitizer: Arc::new(crate::sanitize::Sanitizer::default()),
        }
    }

    /// Where steps' remembered context comes from (`memory.context`); without it such steps
    /// run on their prompt alone.
    pub fn with_recall(mut self, recall: Arc<dyn Recall>) -> Self {
        self.recall = Some(recall);
        self
    }

    /// Tasks are then their requester's personal data: the requester is resolved to a subject
    /// (on first contact, a new one), the deployment's policy is checked (`tasks` processing),
    /// and the task's input, result and errors are sealed with the subject's key.
    pub fn with_subjects(mut self, subjects: Arc<stele_privacy::Subjects>) -> Self {
        self.subjects = Some(subjects);
        self
    }

    /// The subjects service, where personal data is handled.
    pub fn subjects(&self) -> Option<&Arc<stele_privacy::Subjects>> {
        self.subjects.as_ref()
    }

    /// Now, by the runtime's clock.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.utc()
    }

    /// The clock the runtime records times from (timers, backoffs, signals): a
    /// [`stele_models::ManualClock`] in tests.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Records replies to the conversations whose ids start with `prefix` through `bus`, a
    /// channel's own: its reactor then enqueues the reply's delivery in the reply's commit,
    /// rather than its process manager on reading the log later.
    pub fn route_conversations(&self, prefix: &str, bus: Arc<CommandBus<Conversation>>) {
        self.channel_buses
            .write()
            .expect("channel buses lock")
            .push((prefix.to_owned(), bus));
    }

    /// The bus that records on `conversation`: its channel's, else the runtime's own.
    pub(super) fn conversation_bus(&self, conversation: &str) -> Arc<CommandBus<Conversation>> {
        self.channel_buses
            .read()
            .expect("channel buses lock")
            .iter()
            .find(|(prefix, _)| conversation.starts_with(prefix.as_str()))
            .map_or_else(|| self.conversations.clone(), |(_, bus)| bus.clone())
    }

    /// Screens input with `sanitizer` (the default policy otherwise).
    pub fn with_sanitizer(mut self, sanitizer: crate::sanitize::Sanitizer) -> Self {
        self.sanitizer = Arc::new(sanitizer);
        self
    }

    /// The input sanitiser (channels screen their messages with it).
    pub fn sanitizer(&self) -> &crate::sanitize::Sanitizer {
        &self.sanitizer
    }

    /// The workflow a task without one runs.
    pub fn with_default_workflow(mut self, name: impl Into<String>) -> Self {
        self.default_workflow = Some(name.into());
        self
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The providers and roles the agents run on, with the providers' circuits; `None` when
    /// they are not models.
    pub fn models(&self) -> Option<stele_models::Overview> {
        self.agents
            .router()
            .map(stele_models::ModelRouter::overview)
    }

    /// The models operators chose for agent roles at run time (tried first for every task; a
    /// chat's own choice goes over them), by role.
    pub async fn role_models(&self) -> Result<BTreeMap<String, String>, RuntimeError> {
        let (state, _) = self
            .role_models
            .load_latest(stele_aggregates::role_models::STREAM_ID)
            .await?;
        Ok(state.chosen.clone())
    }

    /// Chooses `model` (`provider/model`, one of the role's route) first for `role` in every
    /// task from now on, or (`None`) the role's own route again; recorded as `RoleModelChosen`.
    pub async fn choose_role_model(
        &self,
        role: &str,
        model: Option<String>,
        meta: CommandMeta,
    ) -> Result<(), RuntimeError> {
        match &model {
            Some(model) => {
                self.check_models(&BTreeMap::from([(role.to_owned(), model.clone())]))?
            }
            None if self.agents.models_of(role).is_none() => {
                return Err(RuntimeError::UnknownModel(format!(
                    "there is no agent role {role:?} whose model can be chosen"
                )))
            }
            None => {}
        }
        let command = stele_aggregates::role_models::RoleModelsCommand::Choose {
            role: role.to_owned(),
            model,
        };
        match self
            .role_models
            .execute(stele_aggregates::role_models::STREAM_ID, command, meta)
            .await
        {
            Ok(_) => Ok(()),
            Err(CommandError::Rejected(e)) => Err(RuntimeError::UnknownModel(e.to_string())),
            Err(e) => Err(e.into()),
        }
    }

    /// The process manager to run (with the projection runner) next to the workers.
    pub fn manager(&self) -> Arc<dyn ProcessManager> {
        Arc::new(Manager)
    }

    /// A worker of the workflow queue with every runtime job handler.
    pub fn worker(self: &Arc<Self>, options: WorkerOptions) -> Worker {
        macro_rules! handlers {
            ($worker:expr, $($kind:literal => $method:ident),* $(,)?) => {
                $worker$(.handle($kind, {
                    let runtime = self.clone();
                    move |job| {
                        let runtime = runtime.clone();
                        async move { runtime.$method(job).await }
                    }
                }))*
            };
        }
        let options = WorkerOptions {
            queue: QUEUE.into(),
            ..options
        };
        handlers!(
            Worker::new(self.queue.clone(), options),
            "workflow.start" => on_start,
            "workflow.step" => on_step,
            "workflow.timer" => on_timer,
            "workflow.wait_timeout" => on_wait_timeout,
            "workflow.start_child" => on_start_child,
            "workflow.run_finished" => on_run_finished,
            "workflow.cancel" => on_cancel,
            "workflow.reply" => on_reply,
            "privacy.retention" => on_retention,
            "schedule.tick" => on_schedule_tick,
            "schedule.start" => on_schedule_start,
        )
    }
}
