//! `WorkflowRun`: one execution of one version of a workflow definition.
//!
//! The run records facts (a step's outcome, a signal, a timer firing, a child run finishing) and,
//! in the same command, what follows from them. What follows is decided by a [`Decider`] (the
//! workflow definitions, injected as the aggregate's service): each recorded event is shown to
//! `decide(run, event)`, and every [`Action`] it returns is recorded as a further event, which is
//! shown to `decide` in turn. So a fact and its consequences are one atomic append; the process
//! manager that follows the log turns the recorded actions into jobs (a step to run, a timer, a
//! child run to start).
//!
//! ```text
//!  new ──Start──► running ──(last step done)──► completed
//!   │               │   └──(step failed, no retry left)──► failed
//!   └────Cancel─────┴──Cancel──► cancelled
//!
//!  a step:  scheduled ──RecordStep──► started + completed | failed ──(retry)──► scheduled (attempt+1)
//!           waiting (signal) ──Signal / TimeoutWait──► completed | timed out
//!           sleeping (timer) ──FireTimer──► completed
//!           joining (children) ──ChildFinished × n──► completed | failed
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};

use crate::ids::{RunId, StepId, TaskId};
use crate::personal::Personal;
use serde_json::Value;

/// How many events one command may record: a definition whose decisions never settle (an inline
/// loop) fails its run instead of growing without bound.
pub const MAX_EVENTS_PER_COMMAND: usize = 256;

mod types;

pub use types::*;

/// One step's state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepState {
    pub status: StepStatus,
    pub attempt: u32,
    pub escalation: u32,
    pub not_before: Option<DateTime<Utc>>,
    pub timeout_ms: u64,
    pub started_at: Option<DateTime<Utc>>,
    pub input: Option<Value>,
    pub output: Option<Value>,
    pub error: Option<String>,
    /// Every attempt's error, oldest first.
    pub errors: Vec<String>,
    /// The signal a waiting step waits for, and until when.
    pub signal: Option<String>,
    pub deadline: Option<DateTime<Utc>>,
    /// The children of a fan-out step, by index; `None` until each finishes.
    pub children: Vec<ChildSpec>,
    pub results: Vec<Option<ChildResult>>,
}

impl StepState {
    fn new(status: StepStatus) -> Self {
        Self {
            status,
            attempt: 0,
            escalation: 0,
            not_before: None,
            timeout_ms: 0,
            started_at: None,
            input: None,
            output: None,
            error: None,
            errors: Vec::new(),
            signal: None,
            deadline: None,
            children: Vec::new(),
            results: Vec::new(),
        }
    }
}

/// The run's state, folded from its events.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowRun {
    pub status: RunStatus,
    pub run_id: RunId,
    pub task_id: Option<TaskId>,
    /// Whose data the run holds.
    pub subject: Option<String>,
    pub workflow: String,
    pub version: u32,
    pub input: Value,
    pub parent: Option<ParentLink>,
    /// Models chosen for the run, by agent role.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub models: BTreeMap<String, String>,
    pub steps: BTreeMap<StepId, StepState>,
    /// Steps in the order they were entered (a step entered again, by a loop, appears again).
    pub path: Vec<StepId>,
    /// The step the run is at.
    pub current: Option<StepId>,
    /// Signals received and not yet consumed by a wait, oldest first.
    pub signals: Vec<(String, Value)>,
    /// Messages to send on the task's channel.
    pub replies: Vec<String>,
    pub output: Option<Value>,
    pub error: Option<String>,
}

impl WorkflowRun {
    pub fn step(&self, id: &str) -> Option<&StepState> {
        self.steps.get(id)
    }

    /// The outputs of completed steps, by step id.
    pub fn outputs(&self) -> BTreeMap<&str, &Value> {
        self.steps
            .iter()
            .filter_map(|(id, step)| Some((id.as_str(), step.output.as_ref()?)))
            .collect()
    }

    /// The steps waiting in the job queue (a cancelled run cancels their jobs).
    pub fn scheduled_steps(&self) -> impl Iterator<Item = (&str, u32)> {
        self.steps
            .iter()
            .filter(|(_, step)| step.status == StepStatus::Scheduled)
            .map(|(id, step)| (id.as_str(), step.attempt))
    }

    /// Child runs started and not finished.
    pub fn active_children(&self) -> impl Iterator<Item = &ChildSpec> {
        self.steps
            .values()
            .filter(|step| step.status == StepStatus::Joining)
            .flat_map(|step| {
                step.children
                    .iter()
                    .zip(&step.results)
                    .filter(|(_, result)| result.is_none())
                    .map(|(child, _)| child)
            })
    }

    /// Whether the run was started (one cancelled before it started never was: its stream holds
    /// only its cancellation).
    pub fn started(&self) -> bool {
        !self.workflow.is_empty()
    }

    fn ensure_running(&self) -> Result<(), RunError> {
        match self.status {
            RunStatus::New => Err(RunError::NotStarted),
            RunStatus::Running => Ok(()),
            status => Err(RunError::Finished(status)),
        }
    }

    fn step_mut(&mut self, id: &str, status: StepStatus) -> &mut StepState {
        let step = self
            .steps
            .entry(StepId::from(id))
            .or_insert_with(|| StepState::new(status));
        step.status = status;
        step
    }

    /// The facts a command records, before decisions; empty when the command changes nothing
    /// (a timer or timeout that lost its race, a repeated child report).
    fn facts(&self, command: RunCommand) -> Result<Vec<RunEvent>, RunError> {
        let step_is =
            |id: &str, status: StepStatus| self.steps.get(id).is_some_and(|s| s.status == status);
        Ok(match command {
            RunCommand::Start {
                run_id,
                task_id,
                subject,
                workflow,
                version,
                input,
                parent,
                models,
                ..
            } => {
                if self.status != RunStatus::New {
                    return Err(RunError::AlreadyStarted);
                }
                vec![RunEvent::RunStarted {
                    run_id,
                    task_id,
                    input: Personal::owned_by(subject.as_deref(), input),
                    subject,
                    workflow,
                    version,
                    parent,
                    models,
                }]
            }
            RunCommand::RecordStep {
                step,
                attempt,
                started_at,
                input,
                outcome,
                calls,
                remember,
                ..
            } => {
                self.ensure_running()?;
                let scheduled = self
                    .steps
                    .get(&step)
                    .is_some_and(|s| s.status == StepStatus::Scheduled && s.attempt == attempt);
                if !scheduled {
                    return Err(RunError::StaleStep { step, attempt });
                }
                let started = RunEvent::StepStarted {
                    step: step.clone(),
                    attempt,
                    at: started_at,
                };
                let input = input.map(|input| self.personal(input));
                let calls = self.personal(calls);
                let outcome = match outcome {
                    StepOutcome::Completed { output } => RunEvent::StepCompleted {
                        step,
                        attempt,
                        input,
                        output: self.personal(output),
                        calls,
                        consumed_signal: None,
                        remember,
                    },
                    StepOutcome::Failed { error } => RunEvent::StepFailed {
                        step,
                        attempt,
                        input,
                        error: self.personal(error),
                        calls,
                    },
                };
                vec![started, outcome]
            }
            RunCommand::FireTimer { step, .. } => {
                self.ensure_running()?;
                if !step_is(&step, StepStatus::Sleeping) {
                    return Ok(Vec::new());
                }
                vec![RunEvent::TimerFired { step }]
            }
            RunCommand::Signal { name, payload, .. } => {
                if name.trim().is_empty() {
                    return Err(RunError::EmptySignal);
                }
                self.ensure_running()?;
                vec![RunEvent::SignalReceived {
                    name,
                    payload: self.personal(payload),
                }]
            }
            RunCommand::TimeoutWait { step, .. } => {
                self.ensure_running()?;
                if !step_is(&step, StepStatus::Waiting) {
                    return Ok(Vec::new());
                }
                vec![RunEvent::WaitTimedOut { step }]
            }
            RunCommand::ChildFinished {
                step,
                index,
                result,
                ..
            } => {
                self.ensure_running()?;
                let open = self.steps.get(&step).is_some_and(|s| {
                    s.status == StepStatus::Joining
                        && s.results.get(index).is_some_and(Option::is_none)
                        && s.children[index].run_id == result.run_id
                });
                if !open {
                    return Ok(Vec::new());
                }
                vec![RunEvent::ChildRunFinished {
                    step,
                    index,
                    result: self.personal(result),
                }]
            }
            // A run cancelled before it starts (its task cancelled while the start was on its
            // way) is recorded cancelled: the late start then finds it finished.
            RunCommand::Cancel { reason, .. } => match self.status {
                RunStatus::New | RunStatus::Running => vec![RunEvent::RunCancelled { reason }],
                status => return Err(RunError::Finished(status)),
            },
        })
    }
}

impl Action {
    /// The event that records this action.
    pub fn into_event(self, run: &WorkflowRun) -> RunEvent {
        match self {
            Action::ScheduleStep {
                step,
                attempt,
                not_before,
                escalation,
                timeout_ms,
            } => RunEvent::StepScheduled {
                step,
                attempt,
                not_before,
                escalation,
                timeout_ms,
            },
            Action::CompleteStep {
                step,
                output,
                consumed_signal,
            } => RunEvent::StepCompleted {
                attempt: run.steps.get(&step).map_or(1, |s| s.attempt.max(1)),
                step,
                input: None,
                output: run.personal(output),
                calls: run.personal(Vec::new()),
                consumed_signal,
                remember: None,
            },
            Action::SkipStep { step, reason } => RunEvent::StepSkipped { step, reason },
            Action::ArmTimer { step, fire_at } => RunEvent::TimerArmed { step, fire_at },
            Action::AwaitSignal {
                step,
                signal,
                timeout_at,
            } => RunEvent::WaitStarted {
                step,
                signal,
                timeout_at,
            },
            Action::StartChildren { step, children } => {
                RunEvent::ChildrenStarted { step, children }
            }
            Action::RequestReply { step, text } => RunEvent::ReplyRequested {
                step,
                text: run.personal(text),
            },
            Action::CompleteRun { output } => RunEvent::RunCompleted {
                output: run.personal(output),
            },
            Action::FailRun { error, step } => RunEvent::RunFailed {
                error: run.personal(error),
                step,
            },
        }
    }
}

fn command_time(command: &RunCommand) -> DateTime<Utc> {
    match command {
        RunCommand::Start { now, .. }
        | RunCommand::RecordStep { now, .. }
        | RunCommand::FireTimer { now, .. }
        | RunCommand::Signal { now, .. }
        | RunCommand::TimeoutWait { now, .. }
        | RunCommand::ChildFinished { now, .. }
        | RunCommand::Cancel { now, .. } => *now,
    }
}

impl Aggregate for WorkflowRun {
    const TYPE: &'static str = "workflow_run";
    type Command = RunCommand;
    type Event = RunEvent;
    type Error = RunError;
    type Services = Arc<dyn Decider>;

    async fn handle(
        &mut self,
        command: RunCommand,
        decider: &Arc<dyn Decider>,
        sink: &EventSink<Self>,
    ) -> Result<(), RunError> {
        let now = command_time(&command);
        let mut pending: VecDeque<RunEvent> = self.facts(command)?.into();
        let mut recorded = 0;
        while let Some(event) = pending.pop_front() {
            recorded += 1;
            sink.write(event.clone(), self).await;
            if self.status.is_finished() {
                // Nothing follows the end of a run but the process manager's clean-up.
                break;
            }
            let actions = match decider.decide(self, &event, now) {
                Ok(actions) => actions,
                Err(error) => vec![Action::FailRun {
                    error,
                    step: self.current.clone(),
                }],
            };
            if recorded + pending.len() + actions.len() > MAX_EVENTS_PER_COMMAND {
                pending.clear();
                pending.push_back(RunEvent::RunFailed {
                    error: Personal::plain(format!(
                        "the workflow's decisions did not settle within {MAX_EVENTS_PER_COMMAND} events (an endless loop of steps that need no job?)"
                    )),
                    step: self.current.clone(),
                });
                continue;
            }
            pending.extend(actions.into_iter().map(|action| action.into_event(self)));
        }
        Ok(())
    }

    fn apply(&mut self, event: RunEvent) {
        match event {
            RunEvent::RunStarted {
                run_id,
                task_id,
                subject,
                workflow,
                version,
                input,
                parent,
                models,
            } => {
                self.status = RunStatus::Running;
                self.models = models;
                self.run_id = run_id;
                self.task_id = task_id;
                self.subject = subject;
                self.workflow = workflow;
                self.version = version;
                self.input = input.json();
                self.parent = parent;
            }
            RunEvent::StepScheduled {
                step,
                attempt,
                not_before,
                escalation,
                timeout_ms,
            } => {
                self.enter(&step);
                let state = self.step_mut(&step, StepStatus::Scheduled);
                state.attempt = attempt;
                state.not_before = not_before;
                state.escalation = escalation;
                state.timeout_ms = timeout_ms;
                state.error = None;
            }
            RunEvent::StepStarted { step, at, .. } => {
                if let Some(state) = self.steps.get_mut(&step) {
                    state.started_at = Some(at);
                }
            }
            RunEvent::StepCompleted {
                step,
                attempt,
                input,
                output,
                consumed_signal,
                ..
            } => {
                self.enter(&step);
                if let Some(name) = consumed_signal {
                    if let Some(i) = self.signals.iter().position(|(n, _)| *n == name) {
                        self.signals.remove(i);
                    }
                }
                let state = self.step_mut(&step, StepStatus::Completed);
                state.attempt = attempt;
                state.input = input.map(|input| input.json());
                state.output = Some(output.json());
                state.error = None;
                state.signal = None;
                state.deadline = None;
            }
            RunEvent::StepFailed {
                step,
                attempt,
                input,
                error,
                ..
            } => {
                let error = error.text().to_owned();
                let state = self.step_mut(&step, StepStatus::Failed);
                state.attempt = attempt;
                state.input = input.map(|input| input.json());
                state.errors.push(error.clone());
                state.error = Some(error);
            }
            RunEvent::StepSkipped { step, reason } => {
                let state = self.step_mut(&step, StepStatus::Skipped);
                state.error = Some(reason);
            }
            RunEvent::TimerArmed { step, fire_at } => {
                self.enter(&step);
                let state = self.step_mut(&step, StepStatus::Sleeping);
                state.deadline = Some(fire_at);
            }
            RunEvent::TimerFired { step } => {
                let state = self.step_mut(&step, StepStatus::Completed);
                state.output = Some(Value::Null);
                state.deadline = None;
            }
            RunEvent::WaitStarted {
                step,
                signal,
                timeout_at,
            } => {
                self.enter(&step);
                let state = self.step_mut(&step, StepStatus::Waiting);
                state.signal = Some(signal);
                state.deadline = timeout_at;
            }
            RunEvent::SignalReceived { name, payload } => self.signals.push((name, payload.json())),
            RunEvent::WaitTimedOut { step } => {
                let state = self.step_mut(&step, StepStatus::Failed);
                state.error = Some("timed out waiting for a signal".into());
                state.deadline = None;
            }
            RunEvent::ChildrenStarted { step, children } => {
                self.enter(&step);
                let state = self.step_mut(&step, StepStatus::Joining);
                state.results = vec![None; children.len()];
                state.children = children;
            }
            RunEvent::ChildRunFinished {
                step,
                index,
                result,
            } => {
                if let Some(slot) = self
                    .steps
                    .get_mut(&step)
                    .and_then(|s| s.results.get_mut(index))
                {
                    *slot = Some(result.into_value().unwrap_or_else(|| ChildResult {
                        run_id: RunId::from(""),
                        status: RunStatus::Failed,
                        output: None,
                        error: Some(crate::personal::ERASED.to_owned()),
                    }));
                }
            }
            RunEvent::ReplyRequested { text, .. } => self.replies.push(text.text().to_owned()),
            RunEvent::RunCompleted { output } => {
                self.status = RunStatus::Completed;
                self.output = Some(output.json());
            }
            RunEvent::RunFailed { error, .. } => {
                self.status = RunStatus::Failed;
                self.error = Some(error.text().to_owned());
            }
            RunEvent::RunCancelled { reason } => {
                self.status = RunStatus::Cancelled;
                self.error = Some(reason);
            }
        }
    }
}

impl WorkflowRun {
    /// `value`, as the run's subject's personal data.
    pub fn personal<T>(&self, value: T) -> Personal<T> {
        Personal::owned_by(self.subject.as_deref(), value)
    }

    /// Marks `step` as the current one; a step entered anew (not a retry of the current one)
    /// goes on the path.
    fn enter(&mut self, step: &str) {
        if self.current.as_deref() != Some(step) {
            self.current = Some(StepId::from(step));
            self.path.push(StepId::from(step));
        }
    }
}

#[cfg(test)]
mod tests;
