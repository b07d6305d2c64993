//! The job handlers: each performs one decision, after checking in the aggregate that it is still
//! to be done (a late or repeated job does nothing).

use stele_engine::queue::worker::HandlerError;
use stele_engine::queue::{completing, QueueError};
use tracing::Instrument;

use super::manager::{ChildJob, RunJob, StartJob, StepJob};
use super::*;

/// What a job failed at, with the error that made it fail as its source: the job records both
/// ("recording on workflow_run/r-1 failed: conflict on stream …").
#[derive(Debug, thiserror::Error)]
enum JobError {
    #[error("job {job} has an unreadable payload")]
    Payload {
        job: Uuid,
        #[source]
        source: serde_json::Error,
    },
    #[error("loading {stream} failed")]
    Load {
        stream: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("recording on {stream} failed")]
    Record {
        stream: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cancelling the run's queued step jobs failed")]
    CancelJobs(#[source] QueueError),
}

impl JobError {
    fn load<E: std::error::Error + Send + Sync + 'static>(kind: &str, id: &str, e: E) -> Self {
        JobError::Load {
            stream: format!("{kind}/{id}"),
            source: Box::new(e),
        }
    }

    fn record<E: std::error::Error + Send + Sync + 'static>(kind: &str, id: &str, e: E) -> Self {
        JobError::Record {
            stream: format!("{kind}/{id}"),
            source: Box::new(e),
        }
    }
}

impl Runtime {
    /// Runs a run command from a job: refusals that mean "already done" are success.
    async fn run_command(
        &self,
        run_id: &str,
        command: RunCommand,
        meta: CommandMeta,
    ) -> Result<(), JobError> {
        let executed = if matches!(command, RunCommand::Start { .. }) {
            // A run starts under an id of its own: decided on the empty run without reading
            // its stream (a repeated start finds the stream and is decided again on it).
            self.runs.create(run_id, command, meta).await
        } else {
            self.runs.execute(run_id, command, meta).await
        };
        match executed {
            Ok(_) => Ok(()),
            Err(CommandError::Rejected(
                RunError::StaleStep { .. } | RunError::Finished(_) | RunError::AlreadyStarted,
            )) => Ok(()),
            Err(e) => Err(JobError::record(WorkflowRun::TYPE_NAME, run_id, e)),
        }
    }

    async fn task_command(
        &self,
        task_id: &str,
        command: TaskCommand,
        meta: CommandMeta,
    ) -> Result<(), JobError> {
        match self.tasks.execute(task_id, command, meta).await {
            Ok(_) | Err(CommandError::Rejected(TaskError::InvalidTransition { .. })) => Ok(()),
            Err(e) => Err(JobError::record(Task::TYPE_NAME, task_id, e)),
        }
    }

    pub(super) async fn on_start(self: Arc<Self>, job: Job) -> HandlerResult {
        let p: StartJob = payload(&job)?;
        // Usually the task was created routed, in this process (see `create_task_from`): the
        // task as that append left it, when this process still holds it.
        let executing = |task: &Task| task.status == TaskStatus::Executing;
        let (mut task, _) = self
            .tasks
            .load_recent(&p.task_id, executing)
            .await
            .map_err(|e| JobError::load(Task::TYPE_NAME, &p.task_id, e))?;
        if !matches!(
            task.status,
            TaskStatus::Pending | TaskStatus::Routing | TaskStatus::Executing
        ) {
            return Ok(Done::Complete);
        }
        let name = task.workflow.clone().or(self.default_workflow.clone());
        let Some(definition) = name.as_deref().and_then(|n| self.catalog.latest(n)) else {
            let error = match name {
                Some(name) => format!("unknown workflow {name}"),
                None => "the task names no workflow and there is no default".into(),
            };
            return self.fail_unstartable(&p, task.run_id.as_ref(), error).await;
        };
        if !executing(&task) {
            // One run per task, named after it: a repeated job finds it started.
            let route = TaskCommand::Route {
                workflow: definition.name.clone(),
                run_id: RunId::new(p.task_id.as_str()),
            };
            match self.tasks.execute(&p.task_id, route, p.cause.meta()).await {
                Ok(_) => {}
                // Moved on meanwhile: cancelled or failed (no run), or routed by a repeated job
                // (its run starts here too, once).
                Err(CommandError::Rejected(TaskError::InvalidTransition { .. })) => {}
                Err(e) => return Err(JobError::record(Task::TYPE_NAME, &p.task_id, e).into()),
            }
            task = self
                .tasks
                .load_recent(&p.task_id, executing)
                .await
                .map_err(|e| JobError::load(Task::TYPE_NAME, &p.task_id, e))?
                .0;
            if !executing(&task) {
                return Ok(Done::Complete);
            }
        }
        let run_id = task
            .run_id
            .clone()
            .unwrap_or_else(|| RunId::new(p.task_id.as_str()));
        let Some(input) = task.input.get() else {
            // The requester was erased before the run started: there is nothing to run on.
            return Ok(Done::Complete);
        };
        let start = RunCommand::Start {
            run_id: run_id.clone(),
            task_id: Some(p.task_id.clone()),
            subject: task.subject.clone(),
            workflow: definition.name.clone(),
            version: definition.version,
            input: Value::String(input.clone()),
            parent: None,
            models: task.models.clone(),
            now: self.clock.utc(),
        };
        // The start is the job's last effect: its append completes the job.
        completing(self.run_command(&run_id, start, p.cause.meta())).await?;
        Ok(Done::Complete)
    }

    /// A task whose workflow this node does not have (none named and no default, or its catalog
    /// changed since the task was routed): its run, if routed to one that has not started, is
    /// recorded ended, then the task failed, so nothing waits on either. A run another node
    /// started (it has the workflow) is that node's to run.
    async fn fail_unstartable(
        &self,
        p: &StartJob,
        run_id: Option<&RunId>,
        error: String,
    ) -> HandlerResult {
        if let Some(run_id) = run_id {
            let (run, _) = self
                .runs
                .load(run_id)
                .await
                .map_err(|e| JobError::load(WorkflowRun::TYPE_NAME, run_id, e))?;
            if run.started() {
                return Ok(Done::Complete);
            }
            let cancel = RunCommand::Cancel {
                reason: error.clone(),
                now: self.clock.utc(),
            };
            self.run_command(run_id, cancel, p.cause.meta()).await?;
        }
        self.task_command(&p.task_id, TaskCommand::Fail { error }, p.cause.meta())
            .await?;
        Ok(Done::Complete)
    }

    pub(super) async fn on_step(self: Arc<Self>, job: Job) -> HandlerResult {
        let p: StepJob = payload(&job)?;
        let due = |run: &WorkflowRun| {
            run.status == RunStatus::Running
                && run
                    .step(&p.step)
                    .is_some_and(|s| s.status == StepStatus::Scheduled && s.attempt == p.attempt)
        };
        // Usually this worker's own append scheduled the step (the job was handed to it): the
        // run as that append left it, when this process still holds it with the step due.
        // Anything appended since makes the step's record conflict and be decided on the stored
        // run (a cancelled run, a replaced attempt: no record).
        let (run, _) = self
            .runs
            .load_recent(&p.run_id, due)
            .await
            .map_err(|e| JobError::load(WorkflowRun::TYPE_NAME, &p.run_id, e))?;
        if !due(&run) {
            return Ok(Done::Complete);
        }
        let definition = self
            .catalog
            .get(&run.workflow, run.version)
            .ok_or_else(|| {
                HandlerError::msg(format!(
                    "workflow {} v{} is not known",
                    run.workflow, run.version
                ))
            })?;
        let state = run.step(&p.step).expect("checked above");
        let timeout = Duration::from_millis(state.timeout_ms.max(1));
        let started_at = self.clock.utc();
        // The step's own span: its model and tool calls, and the commands it records (so the
        // jobs they lead to), are its children.
        let span = tracing::info_span!(
            "step",
            otel.name = %format_args!("step {}", p.step),
            workflow.name = %run.workflow,
            workflow.run_id = %p.run_id,
            workflow.step = %p.step,
            workflow.attempt = p.attempt,
        );
        let attempt = tokio::time::timeout(
            timeout,
            self.execute(definition, &run, &p.step, p.attempt, state.escalation),
        )
        .instrument(span.clone())
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
        let remember = definition
            .step(&p.step)
            .and_then(|step| Some((step, step.memory.as_ref().filter(|m| m.remember)?)))
            .map(|(step, memory)| Remember {
                scope: MemoryScope {
                    agent: step.kind.agent().map(str::to_owned),
                    subject: run.subject.clone(),
                    workflow: Some(run.workflow.clone()),
                    ..MemoryScope::default()
                },
                importance: memory.importance,
                tags: memory.tags.clone(),
            });
        let record = RunCommand::RecordStep {
            step: p.step,
            attempt: p.attempt,
            started_at,
            input,
            outcome,
            calls,
            remember,
            now: self.clock.utc(),
        };
        let meta = span.in_scope(|| p.cause.meta());
        // The step's record is the job's last effect: the append that records it (and enqueues
        // what follows) also completes the job, in one commit.
        completing(self.run_command(&p.run_id, record, meta))
            .instrument(span)
            .await?;
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
        let caller = Caller {
            run_id: run.run_id.clone(),
            task_id: run.task_id.clone(),
            workflow: run.workflow.clone(),
            step: StepId::new(step_id),
            agent: None,
            subject: run.subject.clone(),
        };
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
                        let outcome = match self.tools.call(tool, input.clone(), &caller).await {
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
        let caller = Caller {
            agent: Some(
                escalation
                    .as_ref()
                    .and_then(|e| e.agent.clone())
                    .unwrap_or_else(|| agent.clone()),
            ),
            ..caller
        };
        let prompt = match self.recalled(step, &prompt, &context, &caller).await {
            Ok(prompt) => prompt,
            Err(error) => return (None, failed(error), Vec::new()),
        };
        let result = self
            .agents
            .run(AgentRequest {
                agent: agent.clone(),
                prompt: prompt.clone(),
                escalation,
                caller,
                models: run.models.clone(),
            })
            .await;
        let outcome = match result.output {
            Ok(output) => StepOutcome::Completed { output },
            Err(error) => failed(error),
        };
        (Some(Value::String(prompt)), outcome, result.calls)
    }

    /// `prompt` with the remembered context the step asks for before it: as is when it asks
    /// for none, when no memory is configured (said once in the log), or when nothing bears on
    /// it. A failing memory fails the attempt (it is retried like a failing model).
    async fn recalled(
        &self,
        step: &crate::definition::Step,
        prompt: &str,
        context: &Value,
        caller: &Caller,
    ) -> Result<String, String> {
        let Some(memory) = step.memory.as_ref().filter(|m| m.context > 0) else {
            return Ok(prompt.to_owned());
        };
        let Some(recall) = &self.recall else {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::info!(
                    step = %step.id,
                    "a step asks for memory context but this node has no memory (no embedding model): such steps run on their prompts alone"
                )
            });
            return Ok(prompt.to_owned());
        };
        let query = match &memory.query {
            Some(template) => expr::render(template, context)
                .map_err(|e| format!("memory.query could not be rendered: {e}"))?,
            None => prompt.to_owned(),
        };
        let recalled = recall
            .recall(RecallRequest {
                query,
                tokens: memory.context,
                caller: caller.clone(),
                agent_scope: None,
            })
            .await
            .map_err(|e| format!("recalling memory context failed: {e}"))?;
        Ok(if recalled.trim().is_empty() {
            prompt.to_owned()
        } else {
            format!("{recalled}\n\n{prompt}")
        })
    }

    pub(super) async fn on_timer(self: Arc<Self>, job: Job) -> HandlerResult {
        let p: RunJob = payload(&job)?;
        let step = p
            .step
            .ok_or_else(|| HandlerError::msg("a timer job names its step"))?;
        let command = RunCommand::FireTimer {
            step,
            now: self.clock.utc(),
        };
        self.run_command(&p.run_id, command, p.cause.meta()).await?;
        Ok(Done::Complete)
    }

    pub(super) async fn on_wait_timeout(self: Arc<Self>, job: Job) -> HandlerResult {
        let p: RunJob = payload(&job)?;
        let step = p
            .step
            .ok_or_else(|| HandlerError::msg("a timeout job names its step"))?;
        let command = RunCommand::TimeoutWait {
            step,
            now: self.clock.utc(),
        };
        self.run_command(&p.run_id, command, p.cause.meta()).await?;
        Ok(Done::Complete)
    }

    pub(super) async fn on_start_child(self: Arc<Self>, job: Job) -> HandlerResult {
        let p: ChildJob = payload(&job)?;
        let (parent, _) = self
            .runs
            .load(&p.parent.run_id)
            .await
            .map_err(|e| JobError::load(WorkflowRun::TYPE_NAME, &p.parent.run_id, e))?;
        if parent.status != RunStatus::Running {
            return Ok(Done::Complete);
        }
        // The child's input as the parent recorded it (the job's copy stays sealed).
        let input = parent
            .step(&p.parent.step)
            .and_then(|step| step.children.get(p.parent.index))
            .map_or(Value::Null, |spec| spec.input.json());
        let start = RunCommand::Start {
            run_id: p.child.run_id.clone(),
            task_id: parent.task_id.clone(),
            subject: parent.subject.clone(),
            workflow: p.child.workflow,
            version: p.child.version,
            input,
            parent: Some(p.parent),
            models: parent.models.clone(),
            now: self.clock.utc(),
        };
        self.run_command(&p.child.run_id, start, p.cause.meta())
            .await?;
        Ok(Done::Complete)
    }

    pub(super) async fn on_run_finished(self: Arc<Self>, job: Job) -> HandlerResult {
        let p: RunJob = payload(&job)?;
        // Usually this worker's append finished the run (the job was handed to it): the run as
        // that append left it, when this process holds it finished; else as stored.
        let (run, _) = self
            .runs
            .load_recent(&p.run_id, |run| run.status.is_finished())
            .await
            .map_err(|e| JobError::load(WorkflowRun::TYPE_NAME, &p.run_id, e))?;
        let meta = || p.cause.meta();
        // Children and queued steps of a finished run have nothing left to do.
        for child in run.active_children() {
            let cancel = RunCommand::Cancel {
                reason: format!("parent run {} is {}", p.run_id, run.status.as_str()),
                now: self.clock.utc(),
            };
            match self.runs.execute(&child.run_id, cancel, meta()).await {
                Ok(_) | Err(CommandError::Rejected(_)) => {}
                Err(e) => {
                    return Err(JobError::record(WorkflowRun::TYPE_NAME, &child.run_id, e).into())
                }
            }
        }
        let keys: Vec<String> = run
            .scheduled_steps()
            .map(|(step, attempt)| step_job_key(&p.run_id, step, attempt))
            .collect();
        self.queue
            .cancel_keyed(&keys)
            .await
            .map_err(JobError::CancelJobs)?;
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
                    now: self.clock.utc(),
                };
                completing(self.run_command(&parent.run_id, finished, meta())).await?;
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
                completing(self.task_command(task_id, command, meta())).await?;
            }
            (None, None) => {}
        }
        Ok(Done::Complete)
    }

    pub(super) async fn on_cancel(self: Arc<Self>, job: Job) -> HandlerResult {
        let p: StartJob = payload(&job)?;
        let (task, _) = self
            .tasks
            .load(&p.task_id)
            .await
            .map_err(|e| JobError::load(Task::TYPE_NAME, &p.task_id, e))?;
        if let Some(run_id) = task.run_id {
            let cancel = RunCommand::Cancel {
                reason: task.error.map_or_else(
                    || "the task was cancelled".to_owned(),
                    |error| error.text().to_owned(),
                ),
                now: self.clock.utc(),
            };
            match self.runs.execute(&run_id, cancel, p.cause.meta()).await {
                Ok(_) | Err(CommandError::Rejected(_)) => {}
                Err(e) => return Err(JobError::record(WorkflowRun::TYPE_NAME, &run_id, e).into()),
            }
        }
        Ok(Done::Complete)
    }
}

impl Runtime {
    /// A reply step's text goes to the conversation its task came from, as a queued reply (the
    /// channel's outbox delivers it). Its message id is the `ReplyRequested` event's, so a
    /// repeated job queues nothing twice. A task from no conversation has nowhere to reply:
    /// its replies stay in the run (the API and the CLI show them).
    pub(super) async fn on_reply(self: Arc<Self>, job: Job) -> HandlerResult {
        let p: RunJob = payload(&job)?;
        // What is read of the run, the task and the conversation does not change once recorded
        // (the run's task, the task's origin, the message answered): the states this process
        // holds serve when they have it.
        let (run, _) = self
            .runs
            .load_recent(&p.run_id, |run| run.task_id.is_some())
            .await
            .map_err(|e| JobError::load(WorkflowRun::TYPE_NAME, &p.run_id, e))?;
        let Some(task_id) = &run.task_id else {
            return Ok(Done::Complete);
        };
        let (task, _) = self
            .tasks
            .load_recent(task_id, |task| task.origin.is_some())
            .await
            .map_err(|e| JobError::load(Task::TYPE_NAME, task_id, e))?;
        let Some(origin) = task.origin else {
            return Ok(Done::Complete);
        };
        // The reply's text as stored (sealed with its person's key: gone if they were erased),
        // read from its own event on.
        let stream = StreamId::new(WorkflowRun::TYPE_NAME, p.run_id.as_str());
        let after = p.sequence.map_or(0, |sequence| sequence - 1);
        let events = self.log.read_stream(&stream, after).await?;
        let Some(text) = events
            .iter()
            .find(|event| event.metadata.event_id == p.cause.cause)
            .and_then(|event| serde_json::from_value::<RunEvent>(event.payload.clone()).ok())
            .and_then(|event| match event {
                RunEvent::ReplyRequested { text, .. } => text.into_value(),
                _ => None,
            })
        else {
            // Unreadable: its person was erased since; there is no one to answer.
            return Ok(Done::Complete);
        };
        let agent_of = |conversation: &Conversation| {
            conversation
                .participants
                .values()
                .find(|m| m.present && m.participant.kind == ParticipantKind::Agent)
                .map(|m| m.participant.id.clone())
        };
        let conversations = self.conversation_bus(&origin.conversation);
        let (conversation, _) = conversations
            .load_recent(&origin.conversation, |c| {
                c.message(&origin.message).is_some() && agent_of(c).is_some()
            })
            .await
            .map_err(|e| JobError::load("conversation", &origin.conversation, e))?;
        let Some(agent) = agent_of(&conversation) else {
            return Err(HandlerError::msg(format!(
                "conversation {} has no agent to reply as",
                origin.conversation
            )));
        };
        let command = ConversationCommand::QueueReply {
            message_id: format!("reply-{}", p.cause.cause),
            from: agent,
            text,
            attachments: Vec::new(),
            in_reply_to: conversation
                .message(&origin.message)
                .map(|m| m.message_id.clone()),
            task_id: Some(task_id.to_string()),
        };
        // Queuing the reply is the job's last effect: its append completes the job.
        match completing(conversations.execute(&origin.conversation, command, p.cause.meta())).await
        {
            Ok(_) | Err(CommandError::Rejected(ConversationError::DuplicateMessageId { .. })) => {}
            Err(CommandError::Rejected(refused)) => {
                // Closed since (the person started over): the answer belongs to a session
                // they ended.
                tracing::info!(
                    conversation = %origin.conversation,
                    task = %task_id,
                    reason = %refused,
                    "a reply was not queued"
                );
            }
            Err(e) => return Err(JobError::record("conversation", &origin.conversation, e).into()),
        }
        Ok(Done::Complete)
    }
}

fn payload<T: serde::de::DeserializeOwned>(job: &Job) -> Result<T, JobError> {
    serde_json::from_value(job.payload.clone()).map_err(|source| JobError::Payload {
        job: job.id,
        source,
    })
}
