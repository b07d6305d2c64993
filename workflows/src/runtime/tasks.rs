//! The task service the API, the CLI and the channels use: create, read, follow, cancel and
//! signal tasks.

use super::*;
use stele_aggregates::screening::Screening;
use stele_engine::queue::completing;

impl Runtime {
    /// Records a new task; the manager starts its workflow.
    ///
    /// The command id (`meta.command_id`) is the task's id and its idempotency key: the same id
    /// with the same request answers the task it created ([`Created::Repeated`]), the same id
    /// with another request is refused ([`Created::KeyReused`]).
    pub async fn create_task(
        &self,
        input: TaskInput,
        requester: Requester,
        workflow: Option<String>,
        meta: CommandMeta,
    ) -> Result<Created, RuntimeError> {
        self.create_task_from(input, requester, workflow, None, BTreeMap::new(), meta)
            .await
    }

    /// Refuses a workflow the catalog does not have, naming those it has.
    pub(super) fn check_workflow(&self, name: &str) -> Result<(), RuntimeError> {
        if self.catalog.contains(name) {
            return Ok(());
        }
        let mut known: Vec<String> = self.catalog.all().map(|d| d.name.clone()).collect();
        known.sort();
        known.dedup();
        Err(RuntimeError::UnknownWorkflow {
            name: name.to_owned(),
            known,
        })
    }

    /// Refuses a choice of model for a role that is not there, or of a model outside the role's
    /// route (the models a role may use are its route's).
    pub(super) fn check_models(
        &self,
        models: &BTreeMap<String, String>,
    ) -> Result<(), RuntimeError> {
        for (role, model) in models {
            let Some(known) = self.agents.models_of(role) else {
                return Err(RuntimeError::UnknownModel(format!(
                    "there is no agent role {role:?} whose model can be chosen"
                )));
            };
            if !known.iter().any(|m| m == model) {
                return Err(RuntimeError::UnknownModel(format!(
                    "agent role {role} cannot use {model:?}; its models: {}",
                    known.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// Records a new task asked for in a conversation (`origin`): the run's replies are queued
    /// on that conversation, for its channel to deliver; `models` are the requester's choices
    /// of model by agent role (`provider/model`), tried first for that role (a model outside
    /// the role's route is not used). Otherwise as [`Runtime::create_task`].
    pub async fn create_task_from(
        &self,
        input: TaskInput,
        requester: Requester,
        workflow: Option<String>,
        origin: Option<Origin>,
        models: BTreeMap<String, String>,
        meta: CommandMeta,
    ) -> Result<Created, RuntimeError> {
        self.create(input, requester, workflow, origin, models, meta, true)
            .await
    }

    /// Records a new task; `personal`: asked for by a person (resolved to a subject, checked
    /// against the policy, their data sealed), else by Stele itself (a schedule).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn create(
        &self,
        input: TaskInput,
        requester: Requester,
        workflow: Option<String>,
        origin: Option<Origin>,
        models: BTreeMap<String, String>,
        meta: CommandMeta,
        personal: bool,
    ) -> Result<Created, RuntimeError> {
        if let Some(name) = workflow.as_ref().or(self.default_workflow.as_ref()) {
            self.check_workflow(name)?;
        }
        self.check_models(&models)?;
        // Operators' choices for every task, under the requester's own.
        let models = {
            let mut chosen = self.role_models().await?;
            chosen.retain(|role, model| {
                self.agents
                    .models_of(role)
                    .is_some_and(|m| m.contains(model))
            });
            chosen.extend(models);
            chosen
        };
        let task_id = meta.command_id.to_string();
        let subject = match &self.subjects {
            Some(subjects) if personal => Some(subjects.admit(&requester, "tasks", &meta).await?),
            _ => None,
        };
        // Input asked for in a conversation was screened by its channel, on the message alone
        // (the task's input also carries the conversation's history); Stele's own tasks (a
        // schedule's) are not a person's input.
        let (input, screening) = if origin.is_some() || !personal {
            (input, Screening::default())
        } else {
            let flow = workflow.as_deref().or(self.default_workflow.as_deref());
            let (text, screening) =
                self.sanitizer
                    .screen(input.as_str(), requester.channel.as_str(), flow);
            if screening.blocked() {
                let block = TaskCommand::Block {
                    channel: requester.channel.clone(),
                    subject,
                    screening: screening.clone(),
                };
                return match self.tasks.create(&task_id, block, meta).await {
                    Ok(_) | Err(CommandError::Rejected(_)) => Err(RuntimeError::InputBlocked {
                        task_id: TaskId::new(task_id),
                        screening,
                    }),
                    Err(e) => Err(e.into()),
                };
            }
            match TaskInput::parse(text) {
                Ok(screened) => (screened, screening),
                Err(_) => (input, screening),
            }
        };
        // Routed as it is created when its workflow is known (it was checked above): its start
        // job then starts the run with no routing append before it.
        let routed = workflow
            .as_ref()
            .or(self.default_workflow.as_ref())
            .map(|name| Routed {
                workflow: name.clone(),
                run_id: RunId::new(task_id.as_str()),
            });
        let routed_to = routed.as_ref().map(|r| r.workflow.clone());
        let command = TaskCommand::Create {
            input: input.clone(),
            requester: requester.clone(),
            subject,
            workflow: workflow.clone(),
            origin,
            models,
            screening,
            routed,
        };
        // The task id is the command id: a new stream, unless the command is a repeat. Recording
        // the task is the last effect of every job that creates one (a channel's message, a
        // schedule's moment): its append completes the job.
        match completing(self.tasks.create(&task_id, command, meta)).await {
            Ok(Executed::Duplicate(first)) => {
                let view = self.task(&first.stream.aggregate_id).await?;
                let same = view.task.input.get().map(String::as_str) == Some(input.as_str())
                    && view.task.requester.as_ref() == Some(&requester)
                    && (workflow.is_none() || view.task.workflow == workflow);
                Ok(if same {
                    Created::Repeated(Box::new(view))
                } else {
                    Created::KeyReused(view.task_id)
                })
            }
            Ok(_) => Ok(Created::New {
                task_id: TaskId::new(task_id),
                workflow: routed_to,
            }),
            Err(CommandError::Rejected(e)) => Err(RuntimeError::Task(e)),
            Err(e) => Err(e.into()),
        }
    }

    /// A task with its run.
    pub async fn task(&self, task_id: &str) -> Result<TaskView, RuntimeError> {
        let (task, version) = self.tasks.load(task_id).await?;
        // (Blocked input made no task: its stream only records the refusal.)
        if version == 0 || task.blocked {
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
            task_id: TaskId::new(task_id),
            task,
            run,
            versions: (version, run_version),
        })
    }

    /// The task and its run as they were at `at`: their events up to that position, folded.
    pub async fn task_at(&self, task_id: &str, at: Position) -> Result<TaskView, RuntimeError> {
        let upto = |events: Vec<RecordedEvent>| -> Vec<RecordedEvent> {
            events.into_iter().filter(|e| e.position <= at).collect()
        };
        let task_events = upto(
            self.log
                .read_stream(&StreamId::new(Task::TYPE_NAME, task_id), 0)
                .await?,
        );
        if task_events.is_empty() {
            return Err(RuntimeError::UnknownTask(task_id.to_owned()));
        }
        let mut task = Task::default();
        for event in &task_events {
            cqrs_es::Aggregate::apply(&mut task, self.tasks.decode(event.clone())?);
        }
        let mut run = None;
        let mut run_version = 0;
        if let Some(run_id) = &task.run_id {
            let run_events = upto(
                self.log
                    .read_stream(&StreamId::new(WorkflowRun::TYPE_NAME, run_id.as_str()), 0)
                    .await?,
            );
            if !run_events.is_empty() {
                let mut state = WorkflowRun::default();
                for event in &run_events {
                    run_version = event.sequence;
                    cqrs_es::Aggregate::apply(&mut state, self.runs.decode(event.clone())?);
                }
                run = Some(state);
            }
        }
        Ok(TaskView {
            task_id: TaskId::new(task_id),
            versions: (task_events.last().map_or(0, |e| e.sequence), run_version),
            task,
            run,
        })
    }

    /// The task's events, its run's and its child runs', in the order they were recorded.
    pub async fn history(&self, task_id: &str) -> Result<Vec<RecordedEvent>, RuntimeError> {
        let mut follower = self.follower(task_id, None);
        let events: Vec<RecordedEvent> = follower
            .next_batch()
            .await?
            .into_iter()
            .map(|(_, event)| event)
            .collect();
        if events.is_empty() {
            return Err(RuntimeError::UnknownTask(task_id.to_owned()));
        }
        Ok(events)
    }

    /// A follower of the task's streams after `after` (see [`TaskFollower`]).
    pub fn follower(&self, task_id: &str, after: Option<Cursor>) -> TaskFollower {
        TaskFollower::new(self.log.clone(), task_id, after)
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
        // Routed as it was created, its run may not have started yet.
        let run_id = view
            .task
            .run_id
            .filter(|_| view.run.as_ref().is_some_and(WorkflowRun::started))
            .ok_or_else(|| RuntimeError::NotStarted(task_id.to_owned()))?;
        let command = RunCommand::Signal {
            name,
            payload,
            now: self.clock.utc(),
        };
        match self.runs.execute(&run_id, command, meta).await {
            Ok(_) => Ok(()),
            Err(CommandError::Rejected(e)) => Err(RuntimeError::Run(e)),
            Err(e) => Err(e.into()),
        }
    }
}

impl Runtime {
    /// Erases a person (see [`stele_privacy::Subjects::erase`]) and cancels their tasks still
    /// running: nothing more is done with their data, and their queued steps are cancelled.
    pub async fn erase_subject(
        &self,
        subject: &str,
        by: &str,
        reason: &str,
        meta: CommandMeta,
    ) -> Result<stele_aggregates::subject::Erasure, RuntimeError> {
        let subjects = self.subjects.as_ref().ok_or_else(|| {
            RuntimeError::Command("this runtime keeps no personal data to erase".into())
        })?;
        let erasure = subjects.erase(subject, by, reason, meta.clone()).await?;
        let tasks = subjects.tasks_of(&erasure.keys).await?;
        // Those the task list holds as finished need no look (it may lag: the others are read).
        let finished = stele_projections::finished_tasks(subjects.pool(), &tasks)
            .await
            .unwrap_or_default();
        for task_id in tasks.into_iter().filter(|id| !finished.contains(id)) {
            let Ok(view) = self.task(&task_id).await else {
                continue;
            };
            if view.task.status.is_finished() {
                continue;
            }
            let cancel = meta.clone().with_command_id(uuid::Uuid::now_v7());
            match self
                .cancel_task(&task_id, "the requester was erased".into(), cancel)
                .await
            {
                Ok(()) | Err(RuntimeError::Task(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(erasure)
    }
}
