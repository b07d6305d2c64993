//! `Task`: the user-facing unit of work, from the API, Telegram or email.
//!
//! ```text
//!  pending ──StartRouting──► routing ──Route──► executing ──Complete──► completed
//!     │  └───────────────Route──────────────────▲    │  └────Fail─────► failed
//!     │                     │ Fail ─────────────────────────────────────► failed
//!     └── Cancel (pending, routing, executing) ─────────────────────────► cancelled
//! ```

use std::collections::BTreeMap;
use std::fmt;

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::channel::Channel;
use crate::ids::RunId;
use crate::personal::Personal;
use crate::screening::{Finding, Screening};

/// What a task is asked to do, as a person or program wrote it: not blank, at most
/// [`TaskInput::MAX_CHARS`] characters, no NUL character. [`TaskInput::parse`] is the only way in,
/// so every edge (the API, the CLI, the channels) applies the same rule.
///
/// ```
/// use stele_aggregates::task::{InvalidInput, TaskInput};
///
/// assert_eq!(TaskInput::parse("fix the login bug").unwrap().as_str(), "fix the login bug");
/// assert_eq!(TaskInput::parse("   "), Err(InvalidInput::Empty));
/// assert_eq!(TaskInput::parse("a\0b"), Err(InvalidInput::Nul));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskInput(String);

/// Why a text is not a task's input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    #[error("a task needs some input")]
    Empty,
    #[error("the input has {0} characters; at most 32768 are allowed")]
    TooLong(usize),
    #[error("the input contains a NUL character (U+0000)")]
    Nul,
}

impl TaskInput {
    /// The longest input, in characters.
    pub const MAX_CHARS: usize = 32_768;

    pub fn parse(text: impl Into<String>) -> Result<TaskInput, InvalidInput> {
        let text = text.into();
        if text.trim().is_empty() {
            return Err(InvalidInput::Empty);
        }
        let chars = text.chars().count();
        if chars > Self::MAX_CHARS {
            return Err(InvalidInput::TooLong(chars));
        }
        if text.contains('\0') {
            return Err(InvalidInput::Nul);
        }
        Ok(TaskInput(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

impl fmt::Display for TaskInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who asked for the task, and through which channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requester {
    pub user_id: String,
    pub channel: Channel,
}

/// Why a requester was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequester {
    #[error("the requester's user id must be 1 to 256 characters without NUL")]
    UserId,
    #[error(transparent)]
    Channel(#[from] crate::channel::InvalidChannel),
}

impl Requester {
    /// The longest user id, in characters.
    pub const MAX_USER_ID_CHARS: usize = 256;

    /// A requester from a user id (trimmed, not empty) and a channel name (see [`Channel`]).
    ///
    /// ```
    /// use stele_aggregates::channel::Channel;
    /// use stele_aggregates::task::Requester;
    ///
    /// let requester = Requester::parse(" 42 ", "Telegram").unwrap();
    /// assert_eq!((requester.user_id.as_str(), requester.channel), ("42", Channel::TELEGRAM));
    /// assert!(Requester::parse("", "api").is_err());
    /// ```
    pub fn parse(user_id: &str, channel: &str) -> Result<Requester, InvalidRequester> {
        let too_long = user_id.chars().count() > Self::MAX_USER_ID_CHARS;
        let user_id = user_id.trim();
        if user_id.is_empty() || too_long || user_id.contains('\0') {
            return Err(InvalidRequester::UserId);
        }
        Ok(Requester {
            user_id: user_id.to_owned(),
            channel: Channel::parse(channel)?,
        })
    }
}

/// Where a task is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Not created yet (no events).
    #[default]
    New,
    Pending,
    Routing,
    Executing,
    Completed,
    Failed,
    Cancelled,
}

impl TaskStatus {
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Cancelled
        )
    }
}

/// Where in a conversation a task was asked for: its replies go back there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The conversation's id.
    pub conversation: String,
    /// Our id of the message that asked.
    pub message: String,
}

/// Where a task goes: the workflow that will run it, and the run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routed {
    pub workflow: String,
    pub run_id: RunId,
}

#[derive(Clone, Debug, PartialEq)]
pub enum TaskCommand {
    Create {
        input: TaskInput,
        requester: Requester,
        /// The person the requester is (their input, result and errors are sealed with their
        /// key); `None` for a task no person asked for.
        subject: Option<String>,
        /// A workflow chosen by the requester; otherwise routing chooses one.
        workflow: Option<String>,
        /// The conversation message the task answers, when it came from a channel: the run's
        /// replies go back to that conversation.
        origin: Option<Origin>,
        /// Models the requester chose, by agent role (`provider/model`), tried first for it.
        models: BTreeMap<String, String>,
        /// What the input sanitiser found (and did) in the input, recorded with the task.
        screening: Screening,
        /// The workflow and run it goes to, when they are known as it is created: recorded in
        /// the same append, so it starts executing without a routing step of its own.
        routed: Option<Routed>,
    },
    /// Records input the sanitiser blocked: no task is made of it, the stream keeps why.
    Block {
        channel: Channel,
        subject: Option<String>,
        screening: Screening,
    },
    StartRouting,
    /// The workflow that will run it, and the run.
    Route {
        workflow: String,
        run_id: RunId,
    },
    Complete {
        result: Value,
    },
    Fail {
        error: String,
    },
    Cancel {
        reason: String,
    },
}

// Events are made once, moved into the log and dropped: boxing the large variant would save
// nothing worth its indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum TaskEvent {
    TaskCreated {
        /// Whose task it is (absent in tasks recorded before subjects).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subject: Option<String>,
        input: Personal<String>,
        requester: Personal<Requester>,
        /// The requester's channel, readable without their key (absent before subjects: then
        /// it is the requester's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        channel: Option<Channel>,
        workflow: Option<String>,
        /// The conversation message it answers (absent for tasks not asked for in one).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        origin: Option<Origin>,
        /// Models the requester chose, by agent role (absent when none).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        models: BTreeMap<String, String>,
    },
    /// What the input sanitiser found in the task's input, and did (filtered, cut, flagged).
    InputScreened {
        findings: Vec<Finding>,
    },
    /// Input the sanitiser blocked: the stream's only event, no task was made of it.
    InputBlocked {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subject: Option<String>,
        channel: Channel,
        findings: Vec<Finding>,
    },
    TaskRoutingStarted,
    TaskRouted {
        workflow: String,
        run_id: RunId,
    },
    TaskCompleted {
        result: Personal<Value>,
    },
    TaskFailed {
        error: Personal<String>,
    },
    TaskCancelled {
        reason: String,
    },
}

impl DomainEvent for TaskEvent {
    fn event_type(&self) -> String {
        match self {
            TaskEvent::TaskCreated { .. } => "TaskCreated",
            TaskEvent::InputScreened { .. } => "InputScreened",
            TaskEvent::InputBlocked { .. } => "InputBlocked",
            TaskEvent::TaskRoutingStarted => "TaskRoutingStarted",
            TaskEvent::TaskRouted { .. } => "TaskRouted",
            TaskEvent::TaskCompleted { .. } => "TaskCompleted",
            TaskEvent::TaskFailed { .. } => "TaskFailed",
            TaskEvent::TaskCancelled { .. } => "TaskCancelled",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

/// Why a task command was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TaskError {
    #[error("the task exists already")]
    AlreadyCreated,
    #[error("no such task")]
    NotCreated,
    #[error("the task is {status:?}: it cannot {action}")]
    InvalidTransition {
        status: TaskStatus,
        action: &'static str,
    },
}

/// The task's state, folded from its events.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub status: TaskStatus,
    pub subject: Option<String>,
    pub input: Personal<String>,
    /// The requester, while they can be read.
    pub requester: Option<Requester>,
    pub channel: Option<Channel>,
    pub workflow: Option<String>,
    /// The conversation message the task answers, if it came from one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
    /// Models the requester chose, by agent role.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub models: BTreeMap<String, String>,
    pub run_id: Option<RunId>,
    pub result: Option<Personal<Value>>,
    pub error: Option<Personal<String>>,
    /// What the sanitiser found in the input.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub findings: Vec<Finding>,
    /// The input was blocked: there is no task.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub blocked: bool,
}

impl Task {
    fn refuse(&self, action: &'static str) -> TaskError {
        match self.status {
            TaskStatus::New => TaskError::NotCreated,
            status => TaskError::InvalidTransition { status, action },
        }
    }
}

impl Aggregate for Task {
    const TYPE: &'static str = "task";
    type Command = TaskCommand;
    type Event = TaskEvent;
    type Error = TaskError;
    type Services = ();

    async fn handle(
        &mut self,
        command: TaskCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), TaskError> {
        use TaskStatus::*;
        let event = match (command, self.status) {
            (TaskCommand::Create { .. } | TaskCommand::Block { .. }, status)
                if status != New || self.blocked =>
            {
                return Err(TaskError::AlreadyCreated)
            }
            (
                TaskCommand::Create {
                    input,
                    requester,
                    subject,
                    workflow,
                    origin,
                    models,
                    screening,
                    routed,
                },
                _,
            ) => {
                let mut last = TaskEvent::TaskCreated {
                    input: Personal::owned_by(subject.as_deref(), input.into_inner()),
                    channel: Some(requester.channel.clone()),
                    requester: Personal::owned_by(subject.as_deref(), requester),
                    subject,
                    workflow,
                    origin,
                    models,
                };
                if !screening.findings.is_empty() {
                    sink.write(last, self).await;
                    last = TaskEvent::InputScreened {
                        findings: screening.findings,
                    };
                }
                if let Some(Routed { workflow, run_id }) = routed {
                    sink.write(last, self).await;
                    last = TaskEvent::TaskRouted { workflow, run_id };
                }
                last
            }
            (
                TaskCommand::Block {
                    channel,
                    subject,
                    screening,
                },
                _,
            ) => TaskEvent::InputBlocked {
                subject,
                channel,
                findings: screening.findings,
            },
            (TaskCommand::StartRouting, Pending) => TaskEvent::TaskRoutingStarted,
            (TaskCommand::StartRouting, _) => return Err(self.refuse("start routing")),
            (TaskCommand::Route { workflow, run_id }, Pending | Routing) => {
                TaskEvent::TaskRouted { workflow, run_id }
            }
            (TaskCommand::Route { .. }, _) => return Err(self.refuse("be routed")),
            (TaskCommand::Complete { result }, Executing) => TaskEvent::TaskCompleted {
                result: Personal::owned_by(self.subject.as_deref(), result),
            },
            (TaskCommand::Complete { .. }, _) => return Err(self.refuse("complete")),
            (TaskCommand::Fail { error }, Pending | Routing | Executing) => TaskEvent::TaskFailed {
                error: Personal::owned_by(self.subject.as_deref(), error),
            },
            (TaskCommand::Fail { .. }, _) => return Err(self.refuse("fail")),
            (TaskCommand::Cancel { reason }, Pending | Routing | Executing) => {
                TaskEvent::TaskCancelled { reason }
            }
            (TaskCommand::Cancel { .. }, _) => return Err(self.refuse("be cancelled")),
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: TaskEvent) {
        match event {
            TaskEvent::TaskCreated {
                subject,
                input,
                requester,
                channel,
                workflow,
                origin,
                models,
            } => {
                self.status = TaskStatus::Pending;
                self.origin = origin;
                self.models = models;
                self.subject = subject;
                self.input = input;
                self.requester = requester.into_value();
                self.channel =
                    channel.or_else(|| self.requester.as_ref().map(|r| r.channel.clone()));
                self.workflow = workflow;
            }
            TaskEvent::InputScreened { findings } => self.findings = findings,
            TaskEvent::InputBlocked {
                subject,
                channel,
                findings,
            } => {
                self.blocked = true;
                self.subject = subject;
                self.channel = Some(channel);
                self.findings = findings;
            }
            TaskEvent::TaskRoutingStarted => self.status = TaskStatus::Routing,
            TaskEvent::TaskRouted { workflow, run_id } => {
                self.status = TaskStatus::Executing;
                self.workflow = Some(workflow);
                self.run_id = Some(run_id);
            }
            TaskEvent::TaskCompleted { result } => {
                self.status = TaskStatus::Completed;
                self.result = Some(result);
            }
            TaskEvent::TaskFailed { error } => {
                self.status = TaskStatus::Failed;
                self.error = Some(error);
            }
            TaskEvent::TaskCancelled { reason } => {
                self.status = TaskStatus::Cancelled;
                self.error = Some(Personal::plain(reason));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;
    use serde_json::json;

    use super::*;

    type Given = TestFramework<Task>;

    fn requester() -> Requester {
        Requester::parse("42", "telegram").unwrap()
    }

    fn created() -> TaskEvent {
        TaskEvent::TaskCreated {
            subject: Some("s-42".into()),
            input: Personal::of("s-42", "fix the login bug".into()),
            requester: Personal::of("s-42", requester()),
            channel: Some(Channel::TELEGRAM),
            workflow: None,
            origin: None,
            models: BTreeMap::new(),
        }
    }

    fn routed() -> TaskEvent {
        TaskEvent::TaskRouted {
            workflow: "dev_pipeline".into(),
            run_id: "run-1".into(),
        }
    }

    #[test]
    fn a_task_is_created_pending() {
        Given::with(())
            .given_no_previous_events()
            .when(TaskCommand::Create {
                input: TaskInput::parse("fix the login bug").unwrap(),
                requester: requester(),
                subject: Some("s-42".into()),
                workflow: None,
                origin: None,
                models: BTreeMap::new(),
                screening: Default::default(),
                routed: None,
            })
            .then_expect_events(vec![created()]);
    }

    #[test]
    fn inputs_and_requesters_are_parsed_at_the_edge() {
        assert_eq!(TaskInput::parse("  "), Err(InvalidInput::Empty));
        assert_eq!(
            TaskInput::parse("x".repeat(TaskInput::MAX_CHARS + 1)),
            Err(InvalidInput::TooLong(TaskInput::MAX_CHARS + 1))
        );
        assert_eq!(TaskInput::parse("a\0b"), Err(InvalidInput::Nul));
        assert_eq!(
            TaskInput::parse("é".repeat(TaskInput::MAX_CHARS))
                .unwrap()
                .as_str()
                .chars()
                .count(),
            TaskInput::MAX_CHARS
        );
        assert_eq!(
            Requester::parse(" 42 ", "Telegram").unwrap(),
            Requester {
                user_id: "42".into(),
                channel: Channel::TELEGRAM
            }
        );
        assert_eq!(Requester::parse(" ", "api"), Err(InvalidRequester::UserId));
        assert!(matches!(
            Requester::parse("42", "no way"),
            Err(InvalidRequester::Channel(_))
        ));
    }

    #[test]
    fn a_second_creation_is_refused() {
        Given::with(())
            .given(vec![created()])
            .when(TaskCommand::Create {
                input: TaskInput::parse("again").unwrap(),
                requester: requester(),
                subject: Some("s-42".into()),
                workflow: None,
                origin: None,
                models: BTreeMap::new(),
                screening: Default::default(),
                routed: None,
            })
            .then_expect_error(TaskError::AlreadyCreated);
    }

    #[test]
    fn the_happy_path_routes_executes_and_completes() {
        Given::with(())
            .given(vec![created()])
            .when(TaskCommand::StartRouting)
            .then_expect_events(vec![TaskEvent::TaskRoutingStarted]);
        Given::with(())
            .given(vec![created(), TaskEvent::TaskRoutingStarted])
            .when(TaskCommand::Route {
                workflow: "dev_pipeline".into(),
                run_id: "run-1".into(),
            })
            .then_expect_events(vec![routed()]);
        Given::with(())
            .given(vec![created(), TaskEvent::TaskRoutingStarted, routed()])
            .when(TaskCommand::Complete {
                result: json!({ "url": "https://example.test/pr/1" }),
            })
            .then_expect_events(vec![TaskEvent::TaskCompleted {
                result: Personal::of("s-42", json!({ "url": "https://example.test/pr/1" })),
            }]);
    }

    #[test]
    fn finished_tasks_refuse_further_changes() {
        let completed = TaskEvent::TaskCompleted {
            result: Personal::of("s-42", json!({})),
        };
        for command in [
            TaskCommand::Cancel {
                reason: "late".into(),
            },
            TaskCommand::Fail {
                error: "late".into(),
            },
            TaskCommand::Complete { result: json!({}) },
            TaskCommand::StartRouting,
        ] {
            let error = Given::with(())
                .given(vec![created(), routed(), completed.clone()])
                .when(command)
                .inspect_result()
                .unwrap_err();
            assert!(matches!(
                error,
                TaskError::InvalidTransition {
                    status: TaskStatus::Completed,
                    ..
                }
            ));
        }
    }

    #[test]
    fn commands_on_a_missing_task_are_refused() {
        Given::with(())
            .given_no_previous_events()
            .when(TaskCommand::Cancel { reason: "x".into() })
            .then_expect_error(TaskError::NotCreated);
    }

    #[test]
    fn cancelling_is_possible_until_finished() {
        for history in [
            vec![created()],
            vec![created(), TaskEvent::TaskRoutingStarted],
            vec![created(), routed()],
        ] {
            Given::with(())
                .given(history)
                .when(TaskCommand::Cancel {
                    reason: "user asked".into(),
                })
                .then_expect_events(vec![TaskEvent::TaskCancelled {
                    reason: "user asked".into(),
                }]);
        }
    }

    #[test]
    fn the_state_folds_from_events() {
        let mut task = Task::default();
        for event in [created(), TaskEvent::TaskRoutingStarted, routed()] {
            task.apply(event);
        }
        assert_eq!(task.status, TaskStatus::Executing);
        assert_eq!(task.workflow.as_deref(), Some("dev_pipeline"));
        assert_eq!(task.requester, Some(requester()));
        assert!(!task.status.is_finished());
    }
}
