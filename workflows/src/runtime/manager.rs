//! The process manager: turns recorded decisions into jobs (pure), and the jobs' payloads.

use super::*;

/// Job payloads.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct StartJob {
    pub(super) task_id: TaskId,
    #[serde(flatten)]
    pub(super) cause: Cause,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct StepJob {
    pub(super) run_id: RunId,
    pub(super) step: StepId,
    pub(super) attempt: u32,
    #[serde(flatten)]
    pub(super) cause: Cause,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct RunJob {
    pub(super) run_id: RunId,
    #[serde(default)]
    pub(super) step: Option<StepId>,
    /// The sequence of the event it answers in the run's stream, where the handler reads it
    /// back (a reply's text); absent in jobs enqueued before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) sequence: Option<i64>,
    #[serde(flatten)]
    pub(super) cause: Cause,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ChildJob {
    pub(super) parent: ParentLink,
    pub(super) task_id: Option<TaskId>,
    pub(super) child: ChildSpec,
    #[serde(flatten)]
    pub(super) cause: Cause,
}

/// The event a job follows from, so that the commands it runs carry its correlation.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub(super) struct Cause {
    pub(super) cause: Uuid,
    pub(super) correlation: Uuid,
}

impl Cause {
    pub(super) fn of(event: &RecordedEvent) -> Self {
        Cause {
            cause: event.metadata.event_id,
            correlation: event.metadata.command.correlation_id,
        }
    }

    pub(super) fn meta(&self) -> CommandMeta {
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
                    json!(StartJob {
                        task_id: TaskId::new(id),
                        cause
                    }),
                )],
                "TaskCancelled" => vec![job(
                    "workflow.cancel",
                    json!(StartJob {
                        task_id: TaskId::new(id),
                        cause
                    }),
                )],
                _ => Vec::new(),
            };
        }
        let Ok(run_event) = serde_json::from_value::<RunEvent>(event.payload.clone()) else {
            tracing::warn!(position = %event.position, "unreadable workflow run event");
            return Vec::new();
        };
        let run_id = RunId::new(id.as_str());
        let run_job = |step: Option<StepId>| RunJob {
            run_id: run_id.clone(),
            step,
            sequence: None,
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
                        run_id: run_id.clone(),
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
                                run_id: run_id.clone(),
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
            RunEvent::ReplyRequested { step, .. } => {
                let reply = RunJob {
                    sequence: Some(event.sequence),
                    ..run_job(Some(step))
                };
                vec![job("workflow.reply", json!(reply))]
            }
            RunEvent::RunCompleted { .. }
            | RunEvent::RunFailed { .. }
            | RunEvent::RunCancelled { .. } => {
                vec![job("workflow.run_finished", json!(run_job(None)))]
            }
            _ => Vec::new(),
        }
    }
}
