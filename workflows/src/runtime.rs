//! The workflow runtime: performs what runs decide.
//!
//! ```text
//!  TaskCreated ──► [manager] ──► job workflow.start ──► Task routed, RunStarted + StepScheduled
//!  StepScheduled ─► [manager] ──► job workflow.step ──► model / tool ──► StepCompleted + next StepScheduled
//!  TimerArmed / WaitStarted ──► delayed jobs workflow.timer / workflow.wait_timeout
//!  ChildrenStarted ──► jobs workflow.start_child (one per child run)
//!  ReplyRequested ──► job channel.reply (queue `replies`, delivered by the channel adapters)
//!  RunCompleted / RunFailed / RunCancelled ──► job workflow.run_finished ──► task finished,
//!                                  parent told, children and queued steps cancelled
//!  TaskCancelled ──► job workflow.cancel ──► RunCancelled
//! ```
//!
//! The manager is a process manager ([`stele_engine::process`]): it follows the log with a
//! checkpoint and enqueues jobs in the checkpoint's transaction, so every recorded decision
//! becomes its job exactly once, whatever crashes. Jobs are idempotent: each handler first loads
//! the aggregate and does nothing when the work is already done (a late or repeated job). So a
//! crash of any process at any point resumes every run.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use stele_aggregates::task::{Requester, Task, TaskCommand, TaskError, TaskStatus};
use stele_aggregates::workflow_run::{
    ChildResult, ChildSpec, Decider, ParentLink, RunCommand, RunError, RunEvent, RunStatus,
    StepOutcome, StepStatus, WorkflowRun,
};
use stele_engine::command::Executed;
use stele_engine::process::ProcessManager;
use stele_engine::queue::worker::{Done, HandlerResult, Worker, WorkerOptions};
use stele_engine::queue::{Job, JobQueue, NewJob};
use stele_engine::{
    AppendRequest, CommandBus, CommandError, CommandMeta, EventLog, LogError, NewEvent,
    RecordedEvent, Store, StreamId,
};
use uuid::Uuid;

use crate::decide::{Catalog, CatalogDecider};
use crate::definition::{Definition, Escalation, StepKind};
use crate::expr;
use crate::tools::Tools;

/// The queue step jobs and the runtime's own jobs run on.
pub const QUEUE: &str = "workflows";
/// The queue of messages to send on a task's channel.
pub const REPLY_QUEUE: &str = "replies";
/// The process manager's name (its checkpoint).
pub const MANAGER: &str = "workflow-runtime";

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
}

/// Errors of runtime operations asked for by people and programs.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("no task {0}")]
    UnknownTask(String),
    #[error("unknown workflow {0}")]
    UnknownWorkflow(String),
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

/// A task as the CLI and the API show it.
#[derive(Clone, Debug, Serialize)]
pub struct TaskView {
    pub task_id: String,
    #[serde(flatten)]
    pub task: Task,
    pub run: Option<WorkflowRun>,
    /// The last sequence of the task's stream and of its run's (0 without a run) this view
    /// includes.
    #[serde(skip)]
    pub versions: (i64, i64),
}

/// Job payloads.
#[derive(Debug, Serialize, Deserialize)]
struct StartJob {
    task_id: String,
    #[serde(flatten)]
    cause: Cause,
}

#[derive(Debug, Serialize, Deserialize)]
struct StepJob {
    run_id: String,
    step: String,
    attempt: u32,
    #[serde(flatten)]
    cause: Cause,
}

#[derive(Debug, Serialize, Deserialize)]
struct RunJob {
    run_id: String,
    #[serde(default)]
    step: Option<String>,
    #[serde(flatten)]
    cause: Cause,
}

#[derive(Debug, Serialize, Deserialize)]
struct ChildJob {
    parent: ParentLink,
    task_id: Option<String>,
    child: ChildSpec,
    #[serde(flatten)]
    cause: Cause,
}

/// The event a job follows from, so that the commands it runs carry its correlation.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct Cause {
    cause: Uuid,
    correlation: Uuid,
}

impl Cause {
    fn of(event: &RecordedEvent) -> Self {
        Cause {
            cause: event.metadata.event_id,
            correlation: event.metadata.command.correlation_id,
        }
    }

    fn meta(&self) -> CommandMeta {
        CommandMeta::new("workflow-runtime", "system").caused_by(self.cause, self.correlation)
    }
}

/// The idempotency key of a step attempt's job (also how a cancelled run finds it).
pub fn step_job_key(run_id: &str, step: &str, attempt: u32) -> String {
    format!("step:{run_id}:{step}:{attempt}")
}

/// Turns recorded decisions into jobs. Pure.
pub struct Manager;

impl ProcessManager for Manager {
    fn name(&self) -> &'static str {
        MANAGER
    }

    fn event_types(&self) -> &'static [&'static str] {
        &[
            "TaskCreated",
            "TaskCancelled",
            "StepScheduled",
            "TimerArmed",
            "WaitStarted",
            "ChildrenStarted",
            "ReplyRequested",
            "RunCompleted",
            "RunFailed",
            "RunCancelled",
        ]
    }

    fn react(&self, event: &RecordedEvent) -> Vec<NewJob> {
        let cause = Cause::of(event);
        let id = event.stream.aggregate_id.clone();
        let job = |kind: &str, payload: Value| NewJob::new(QUEUE, kind, payload).max_attempts(10);
        if event.stream.aggregate_type == Task::TYPE_NAME {
            return match event.event_type.as_str() {
                "TaskCreated" => vec![job(
                    "workflow.start",
                    json!(StartJob { task_id: id, cause }),
                )],
                "TaskCancelled" => vec![job(
                    "workflow.cancel",
                    json!(StartJob { task_id: id, cause }),
                )],
                _ => Vec::new(),
            };
        }
        let Ok(run_event) = serde_json::from_value::<RunEvent>(event.payload.clone()) else {
            tracing::warn!(position = %event.position, "unreadable workflow run event");
            return Vec::new();
        };
        let run_job = |step: Option<String>| RunJob {
            run_id: id.clone(),
            step,
            cause,
        };
        match run_event {
            RunEvent::StepScheduled {
                step,
                attempt,
                not_before,
                timeout_ms,
                ..
            } => {
                let key = step_job_key(&id, &step, attempt);
                let mut job = job(
                    "workflow.step",
                    json!(StepJob {
                        run_id: id.clone(),
                        step,
                        attempt,
                        cause
                    }),
                )
                .timeout(Duration::from_millis(timeout_ms) + JOB_TIMEOUT_MARGIN)
                .idempotency_key(key);
                if let Some(at) = not_before {
                    job = job.run_at(at);
                }
                vec![job]
            }
            RunEvent::TimerArmed { step, fire_at } => {
                vec![job("workflow.timer", json!(run_job(Some(step)))).run_at(fire_at)]
            }
            RunEvent::WaitStarted {
                step,
                timeout_at: Some(at),
                ..
            } => vec![job("workflow.wait_timeout", json!(run_job(Some(step)))).run_at(at)],
            RunEvent::ChildrenStarted { step, children } => children
                .into_iter()
                .enumerate()
                .map(|(index, child)| {
                    job(
                        "workflow.start_child",
                        json!(ChildJob {
                            parent: ParentLink {
                                run_id: id.clone(),
                                step: step.clone(),
                                index,
                            },
                            task_id: None,
                            child,
                            cause,
                        }),
                    )
                })
                .collect(),
            RunEvent::ReplyRequested { step, text } => vec![NewJob::new(
                REPLY_QUEUE,
                "channel.reply",
                json!({ "run_id": id, "step": step, "text": text, "cause": cause.cause }),
            )],
            RunEvent::RunCompleted { .. }
            | RunEvent::RunFailed { .. }
            | RunEvent::RunCancelled { .. } => {
                vec![job("workflow.run_finished", json!(run_job(None)))]
            }
            _ => Vec::new(),
        }
    }
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
    agents: Arc<dyn Agents>,
    tools: Tools,
    default_workflow: Option<String>,
}

impl Runtime {
    pub fn new(store: &Store, catalog: Catalog, agents: Arc<dyn Agents>, tools: Tools) -> Self {
        let catalog = Arc::new(catalog);
        let decider: Arc<dyn Decider> = Arc::new(CatalogDecider(catalog.clone()));
        Self {
            log: store.log.clone(),
            queue: store.queue.clone(),
            tasks: CommandBus::new(store.log.clone(), ()),
            runs: CommandBus::new(store.log.clone(), decider),
            catalog,
            agents,
            tools,
            default_workflow: None,
        }
    }

    /// The workflow a task without one runs.
    pub fn with_default_workflow(mut self, name: impl Into<String>) -> Self {
        self.default_workflow = Some(name.into());
        self
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
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
        )
    }

    /// Records a new task; the manager starts its workflow. Returns its id, and whether it is
    /// new (`false`: the command id was accepted before, and this is that task).
    pub async fn create_task(
        &self,
        input: String,
        requester: Requester,
        workflow: Option<String>,
        meta: CommandMeta,
    ) -> Result<(String, bool), RuntimeError> {
        if let Some(name) = workflow.as_ref().or(self.default_workflow.as_ref()) {
            if !self.catalog.contains(name) {
                return Err(RuntimeError::UnknownWorkflow(name.clone()));
            }
        }
        let task_id = meta.command_id.to_string();
        let command = TaskCommand::Create {
            input,
            requester,
            workflow,
        };
        // The task id is the command id: a new stream, unless the command is a repeat.
        match self.tasks.create(&task_id, command, meta).await {
            Ok(Executed::Duplicate(first)) => Ok((first.stream.aggregate_id, false)),
            Ok(_) => Ok((task_id, true)),
            Err(CommandError::Rejected(e)) => Err(RuntimeError::Task(e)),
            Err(e) => Err(e.into()),
        }
    }

    /// A task with its run.
    pub async fn task(&self, task_id: &str) -> Result<TaskView, RuntimeError> {
        let (task, version) = self.tasks.load(task_id).await?;
        if version == 0 {
            return Err(RuntimeError::UnknownTask(task_id.to_owned()));
        }
        let (run, run_version) = match &task.run_id {
            Some(run_id) => {
                let (run, version) = self.runs.load(run_id).await?;
                (Some(run), version)
            }
            None => (None, 0),
        };
        Ok(TaskView {
            task_id: task_id.to_owned(),
            task,
            run,
            versions: (version, run_version),
        })
    }

    /// The task's events, its run's and its child runs', in log order.
    pub async fn history(&self, task_id: &str) -> Result<Vec<RecordedEvent>, RuntimeError> {
        let mut events = self
            .log
            .read_stream(&StreamId::new(Task::TYPE_NAME, task_id), 0)
            .await?;
        if events.is_empty() {
            return Err(RuntimeError::UnknownTask(task_id.to_owned()));
        }
        // Each stream is read once: the run's id comes from the task's own `TaskRouted`.
        let mut runs: Vec<String> = events
            .iter()
            .filter(|e| e.event_type == "TaskRouted")
            .filter_map(|e| e.payload["data"]["run_id"].as_str().map(str::to_owned))
            .collect();
        while let Some(run_id) = runs.pop() {
            let run_events = self
                .log
                .read_stream(&StreamId::new(WorkflowRun::TYPE_NAME, &run_id), 0)
                .await?;
            for event in &run_events {
                if let Ok(RunEvent::ChildrenStarted { children, .. }) =
                    serde_json::from_value(event.payload.clone())
                {
                    runs.extend(children.into_iter().map(|c| c.run_id));
                }
            }
            events.extend(run_events);
        }
        events.sort_by_key(|e| (e.recorded_at, e.position));
        Ok(events)
    }

    /// The streams a task's progress is recorded in (for following it live).
    pub fn is_task_stream(event: &RecordedEvent, task_id: &str, run_id: Option<&str>) -> bool {
        let id = event.stream.aggregate_id.as_str();
        match event.stream.aggregate_type.as_str() {
            t if t == Task::TYPE_NAME => id == task_id,
            t if t == WorkflowRun::TYPE_NAME => run_id.is_some_and(|run| {
                id == run
                    || id
                        .strip_prefix(run)
                        .is_some_and(|rest| rest.starts_with('.'))
            }),
            _ => false,
        }
    }

    /// Cancels a task (and so its run, its children and queued steps).
    pub async fn cancel_task(
        &self,
        task_id: &str,
        reason: String,
        meta: CommandMeta,
    ) -> Result<(), RuntimeError> {
        self.task(task_id).await?;
        match self
            .tasks
            .execute(task_id, TaskCommand::Cancel { reason }, meta)
            .await
        {
            Ok(_) => Ok(()),
            Err(CommandError::Rejected(e)) => Err(RuntimeError::Task(e)),
            Err(e) => Err(e.into()),
        }
    }

    /// Sends a signal to a task's run.
    pub async fn signal_task(
        &self,
        task_id: &str,
        name: String,
        payload: Value,
        meta: CommandMeta,
    ) -> Result<(), RuntimeError> {
        let view = self.task(task_id).await?;
        let run_id = view
            .task
            .run_id
            .ok_or_else(|| RuntimeError::NotStarted(task_id.to_owned()))?;
        let command = RunCommand::Signal {
            name,
            payload,
            now: Utc::now(),
        };
        match self.runs.execute(&run_id, command, meta).await {
            Ok(_) => Ok(()),
            Err(CommandError::Rejected(e)) => Err(RuntimeError::Run(e)),
            Err(e) => Err(e.into()),
        }
    }

    /// Runs a run command from a job: refusals that mean "already done" are success.
    async fn run_command(
        &self,
        run_id: &str,
        command: RunCommand,
        meta: CommandMeta,
    ) -> Result<(), String> {
        match self.runs.execute(run_id, command, meta).await {
            Ok(_) => Ok(()),
            Err(CommandError::Rejected(
                RunError::StaleStep { .. } | RunError::Finished(_) | RunError::AlreadyStarted,
            )) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn task_command(
        &self,
        task_id: &str,
        command: TaskCommand,
        meta: CommandMeta,
    ) -> Result<(), String> {
        match self.tasks.execute(task_id, command, meta).await {
            Ok(_) | Err(CommandError::Rejected(TaskError::InvalidTransition { .. })) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn on_start(self: Arc<Self>, job: Job) -> HandlerResult {
        let p: StartJob = payload(&job)?;
        let (task, _) = self
            .tasks
            .load(&p.task_id)
            .await
            .map_err(|e| e.to_string())?;
        let run_id = match task.status {
            TaskStatus::Pending | TaskStatus::Routing => {
                let name = task.workflow.clone().or(self.default_workflow.clone());
                let Some(definition) = name.as_deref().and_then(|n| self.catalog.latest(n)) else {
                    let error = match name {
                        Some(name) => format!("unknown workflow {name}"),
                        None => "the task names no workflow and there is no default".into(),
                    };
                    self.task_command(&p.task_id, TaskCommand::Fail { error }, p.cause.meta())
                        .await?;
                    return Ok(Done::Complete);
                };
                // One run per task, named after it: a repeated job finds it started.
                let run_id = p.task_id.clone();
                let route = TaskCommand::Route {
                    workflow: definition.name.clone(),
                    run_id: run_id.clone(),
                };
                self.task_command(&p.task_id, route, p.cause.meta()).await?;
                run_id
            }
            TaskStatus::Executing => task.run_id.clone().unwrap_or(p.task_id.clone()),
            _ => return Ok(Done::Complete),
        };
        let name = task.workflow.clone().or(self.default_workflow.clone());
        let definition = self
            .catalog
            .latest(name.as_deref().unwrap_or_default())
            .ok_or("the task's workflow is gone")?;
        let start = RunCommand::Start {
            run_id: run_id.clone(),
            task_id: Some(p.task_id.clone()),
            workflow: definition.name.clone(),
            version: definition.version,
            input: Value::String(task.input.clone()),
            parent: None,
            now: Utc::now(),
        };
        self.run_command(&run_id, start, p.cause.meta()).await?;
        Ok(Done::Complete)
    }

    async fn on_step(self: Arc<Self>, job: Job) -> HandlerResult {
        let p: StepJob = payload(&job)?;
        let (run, _) = self.runs.load(&p.run_id).await.map_err(|e| e.to_string())?;
        let current = run
            .step(&p.step)
            .is_some_and(|s| s.status == StepStatus::Scheduled && s.attempt == p.attempt);
        if run.status != RunStatus::Running || !current {
            return Ok(Done::Complete);
        }
        let definition = self
            .catalog
            .get(&run.workflow, run.version)
            .ok_or_else(|| format!("workflow {} v{} is not known", run.workflow, run.version))?;
        let state = run.step(&p.step).expect("checked above");
        let timeout = Duration::from_millis(state.timeout_ms.max(1));
        let started_at = Utc::now();
        let attempt = tokio::time::timeout(
            timeout,
            self.execute(definition, &run, &p.step, p.attempt, state.escalation),
        )
        .await;
        let (input, outcome, calls) = match attempt {
            Ok(done) => done,
            Err(_) => (
                None,
                StepOutcome::Failed {
                    error: format!("timed out after {}", humantime::format_duration(timeout)),
                },
                Vec::new(),
            ),
        };
        let record = RunCommand::RecordStep {
            step: p.step,
            attempt: p.attempt,
            started_at,
            input,
            outcome,
            calls,
            now: Utc::now(),
        };
        self.run_command(&p.run_id, record, p.cause.meta()).await?;
        Ok(Done::Complete)
    }

    /// Runs one attempt of a job step: (what it was given, how it ended, the model calls).
    async fn execute(
        &self,
        definition: &Definition,
        run: &WorkflowRun,
        step_id: &str,
        attempt: u32,
        escalation: u32,
    ) -> (Option<Value>, StepOutcome, Vec<Value>) {
        let failed = |error: String| StepOutcome::Failed { error };
        let Some(step) = definition.step(step_id) else {
            return (
                None,
                failed(format!("step {step_id} is not defined")),
                Vec::new(),
            );
        };
        let escalation = (escalation > 0)
            .then(|| step.retry.escalation(attempt).cloned())
            .flatten();
        let context = expr::context(run);
        let (agent, prompt) = match &step.kind {
            StepKind::Agent { agent, prompt } => (agent, prompt),
            StepKind::Route {
                agent: Some(agent),
                prompt: Some(prompt),
                ..
            } => (agent, prompt),
            StepKind::Tool { tool, input } => {
                return match expr::render_value(input, &context) {
                    Ok(input) => {
                        let outcome = match self.tools.call(tool, input.clone()).await {
                            Ok(output) => StepOutcome::Completed { output },
                            Err(error) => failed(error),
                        };
                        (Some(input), outcome, Vec::new())
                    }
                    Err(e) => (
                        None,
                        failed(format!("input could not be rendered: {e}")),
                        Vec::new(),
                    ),
                };
            }
            other => {
                return (
                    None,
                    failed(format!("a {} step does not run as a job", other.name())),
                    Vec::new(),
                )
            }
        };
        let template = escalation
            .as_ref()
            .and_then(|e| e.prompt.as_deref())
            .unwrap_or(prompt);
        let prompt = match expr::render(template, &context) {
            Ok(prompt) => prompt,
            Err(e) => {
                return (
                    None,
                    failed(format!("prompt could not be rendered: {e}")),
                    Vec::new(),
                )
            }
        };
        let result = self
            .agents
            .run(AgentRequest {
                agent: agent.clone(),
                prompt: prompt.clone(),
                escalation,
            })
            .await;
        let outcome = match result.output {
            Ok(output) => StepOutcome::Completed { output },
            Err(error) => failed(error),
        };
        (Some(Value::String(prompt)), outcome, result.calls)
    }

    async fn on_timer(self: Arc<Self>, job: Job) -> HandlerResult {
        let p: RunJob = payload(&job)?;
        let step = p.step.ok_or("a timer job names its step")?;
        let command = RunCommand::FireTimer {
            step,
            now: Utc::now(),
        };
        self.run_command(&p.run_id, command, p.cause.meta()).await?;
        Ok(Done::Complete)
    }

    async fn on_wait_timeout(self: Arc<Self>, job: Job) -> HandlerResult {
        let p: RunJob = payload(&job)?;
        let step = p.step.ok_or("a timeout job names its step")?;
        let command = RunCommand::TimeoutWait {
            step,
            now: Utc::now(),
        };
        self.run_command(&p.run_id, command, p.cause.meta()).await?;
        Ok(Done::Complete)
    }

    async fn on_start_child(self: Arc<Self>, job: Job) -> HandlerResult {
        let p: ChildJob = payload(&job)?;
        let (parent, _) = self
            .runs
            .load(&p.parent.run_id)
            .await
            .map_err(|e| e.to_string())?;
        if parent.status != RunStatus::Running {
            return Ok(Done::Complete);
        }
        let start = RunCommand::Start {
            run_id: p.child.run_id.clone(),
            task_id: parent.task_id.clone(),
            workflow: p.child.workflow,
            version: p.child.version,
            input: p.child.input,
            parent: Some(p.parent),
            now: Utc::now(),
        };
        self.run_command(&p.child.run_id, start, p.cause.meta())
            .await?;
        Ok(Done::Complete)
    }

    async fn on_run_finished(self: Arc<Self>, job: Job) -> HandlerResult {
        let p: RunJob = payload(&job)?;
        let (run, _) = self.runs.load(&p.run_id).await.map_err(|e| e.to_string())?;
        let meta = || p.cause.meta();
        // Children and queued steps of a finished run have nothing left to do.
        for child in run.active_children() {
            let cancel = RunCommand::Cancel {
                reason: format!("parent run {} is {}", p.run_id, run.status.as_str()),
                now: Utc::now(),
            };
            match self.runs.execute(&child.run_id, cancel, meta()).await {
                Ok(_) | Err(CommandError::Rejected(_)) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        let keys: Vec<String> = run
            .scheduled_steps()
            .map(|(step, attempt)| step_job_key(&p.run_id, step, attempt))
            .collect();
        self.queue
            .cancel_keyed(&keys)
            .await
            .map_err(|e| e.to_string())?;
        match (&run.parent, &run.task_id) {
            (Some(parent), _) => {
                let finished = RunCommand::ChildFinished {
                    step: parent.step.clone(),
                    index: parent.index,
                    result: ChildResult {
                        run_id: p.run_id.clone(),
                        status: run.status,
                        output: run.output.clone(),
                        error: run.error.clone(),
                    },
                    now: Utc::now(),
                };
                self.run_command(&parent.run_id, finished, meta()).await?;
            }
            (None, Some(task_id)) => {
                let command = match run.status {
                    RunStatus::Completed => TaskCommand::Complete {
                        result: run.output.clone().unwrap_or(Value::Null),
                    },
                    RunStatus::Failed => TaskCommand::Fail {
                        error: run.error.clone().unwrap_or_default(),
                    },
                    _ => TaskCommand::Cancel {
                        reason: run.error.clone().unwrap_or_default(),
                    },
                };
                self.task_command(task_id, command, meta()).await?;
            }
            (None, None) => {}
        }
        Ok(Done::Complete)
    }

    async fn on_cancel(self: Arc<Self>, job: Job) -> HandlerResult {
        let p: StartJob = payload(&job)?;
        let (task, _) = self
            .tasks
            .load(&p.task_id)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(run_id) = task.run_id {
            let cancel = RunCommand::Cancel {
                reason: task
                    .error
                    .unwrap_or_else(|| "the task was cancelled".into()),
                now: Utc::now(),
            };
            match self.runs.execute(&run_id, cancel, p.cause.meta()).await {
                Ok(_) | Err(CommandError::Rejected(_)) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(Done::Complete)
    }

    /// Records the catalog's definitions in the log (stream `workflow_definition/<name>`), and
    /// adds every version recorded before, so that runs started on a version that is no longer
    /// in the files keep it. A version recorded with other content is refused.
    pub async fn publish(log: &dyn EventLog, catalog: &mut Catalog) -> Result<(), RuntimeError> {
        let names: Vec<Arc<Definition>> = catalog.all().cloned().collect();
        let mut seen = std::collections::BTreeSet::new();
        for definition in &names {
            if !seen.insert(definition.name.clone()) {
                continue;
            }
            let stream = StreamId::new(DEFINITION_TYPE, &definition.name);
            for attempt in 0..5 {
                let stored = log.read_stream(&stream, 0).await?;
                let mut recorded = std::collections::BTreeSet::new();
                for event in &stored {
                    let old: Definition = serde_json::from_value(
                        event.payload["definition"].clone(),
                    )
                    .map_err(|e| {
                        RuntimeError::Definitions(format!(
                            "stored definition {} is unreadable: {e}",
                            definition.name
                        ))
                    })?;
                    recorded.insert(old.version);
                    catalog
                        .insert(old)
                        .map_err(|e| RuntimeError::Definitions(e.to_string()))?;
                }
                let new: Vec<NewEvent> = catalog
                    .all()
                    .filter(|d| d.name == definition.name && !recorded.contains(&d.version))
                    .map(|d| NewEvent {
                        event_type: "DefinitionPublished".into(),
                        event_version: "1.0".into(),
                        payload: json!({ "version": d.version, "definition": **d }),
                        metadata: CommandMeta::new("workflow-runtime", "system")
                            .for_event(Uuid::now_v7()),
                    })
                    .collect();
                if new.is_empty() {
                    break;
                }
                let request = AppendRequest {
                    command_id: Uuid::now_v7(),
                    stream: stream.clone(),
                    expected_sequence: stored.last().map_or(0, |e| e.sequence),
                    events: new,
                };
                match log.append(request).await {
                    Ok(_) => break,
                    Err(LogError::Conflict { .. }) if attempt < 4 => continue,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }
}

/// The stream type definitions are recorded under.
pub const DEFINITION_TYPE: &str = "workflow_definition";

fn payload<T: serde::de::DeserializeOwned>(job: &Job) -> Result<T, String> {
    serde_json::from_value(job.payload.clone())
        .map_err(|e| format!("job {} has an unreadable payload: {e}", job.id))
}

/// When a run event happened, for progress displays.
pub fn describe(event: &RecordedEvent) -> String {
    let data = &event.payload["data"];
    let field = |name: &str| data[name].as_str().unwrap_or_default().to_owned();
    match event.event_type.as_str() {
        "StepScheduled" | "StepStarted" => format!(
            "{} {} (attempt {})",
            event.event_type,
            field("step"),
            data["attempt"]
        ),
        "StepCompleted" | "StepFailed" | "StepSkipped" | "TimerArmed" | "TimerFired"
        | "WaitStarted" | "WaitTimedOut" | "ChildrenStarted" | "ReplyRequested" => {
            format!("{} {}", event.event_type, field("step"))
        }
        other => other.to_owned(),
    }
}
