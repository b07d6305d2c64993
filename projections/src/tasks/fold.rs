//! The tasks view's fold: how a batch of events changes the view's rows, without SQL. The view
//! (`super`) reads the rows a batch changes but does not create, hands them to [`fold`] with the
//! batch, and writes back what it returns.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde_json::Value;
use stele_engine::projection::ProjectionError;
use stele_engine::RecordedEvent;

use super::TaskRow;

/// The aggregate type of tasks' streams.
const TASK_STREAM: &str = <stele_aggregates::task::Task as cqrs_es::Aggregate>::TYPE;
/// The aggregate type of workflow runs' streams; a task's top-level run has the task's id.
const RUN_STREAM: &str = <stele_aggregates::workflow_run::WorkflowRun as cqrs_es::Aggregate>::TYPE;

/// The run events that put the task at a step (their payload's `data.step`).
pub(super) const STEP_EVENTS: [&str; 4] = [
    "StepScheduled",
    "WaitStarted",
    "TimerArmed",
    "ChildrenStarted",
];
/// The run events after which the task is at no step.
pub(super) const RUN_END_EVENTS: [&str; 3] = ["RunCompleted", "RunFailed", "RunCancelled"];

impl TaskRow {
    fn is_finished(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "failed" | "cancelled")
    }
}

/// A task event as stored (`{"type": …, "data": …}`, see `stele_aggregates::task::TaskEvent`).
/// The view reads the wire form rather than the aggregate's type: it depends on the log only.
#[derive(Deserialize)]
#[serde(tag = "type", content = "data")]
enum TaskEvent {
    #[serde(rename = "TaskCreated")]
    Created {
        #[serde(default)]
        subject: Option<String>,
        /// As stored: sealed (or, before subjects, plain).
        input: Value,
        requester: Value,
        #[serde(default)]
        channel: Option<String>,
        workflow: Option<String>,
    },
    #[serde(rename = "TaskRoutingStarted")]
    RoutingStarted,
    #[serde(rename = "TaskRouted")]
    Routed { workflow: String, run_id: String },
    #[serde(rename = "TaskCompleted")]
    Completed { result: Value },
    #[serde(rename = "TaskFailed")]
    Failed { error: Value },
    #[serde(rename = "TaskCancelled")]
    Cancelled { reason: String },
}

/// The part of a run event that names its step.
#[derive(Deserialize)]
struct AtStep {
    data: Step,
}

#[derive(Deserialize)]
struct Step {
    step: String,
}

fn unreadable(event: &RecordedEvent, error: serde_json::Error) -> ProjectionError {
    ProjectionError::Apply(format!(
        "{} at {} of {} is unreadable: {error}",
        event.event_type, event.position, event.stream
    ))
}

/// The tasks an event is about, if any: task events, and events of a run named like a task.
fn task_of(event: &RecordedEvent) -> Option<&str> {
    match event.stream.aggregate_type.as_str() {
        TASK_STREAM | RUN_STREAM => Some(event.stream.aggregate_id.as_str()),
        _ => None,
    }
}

/// The subjects a batch erases (`SubjectErased`: the keys it destroyed).
pub(super) fn erased_subjects(events: &[RecordedEvent]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.event_type == "SubjectErased")
        .flat_map(|e| {
            e.payload
                .pointer("/data/keys")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|k| k.as_str().map(str::to_owned))
        })
        .collect()
}

/// The tasks whose rows a batch changes but does not create: their rows are read first.
pub(super) fn tasks_to_load(events: &[RecordedEvent]) -> Vec<String> {
    let created: BTreeSet<&str> = events
        .iter()
        .filter(|e| e.stream.aggregate_type == TASK_STREAM && e.event_type == "TaskCreated")
        .map(|e| e.stream.aggregate_id.as_str())
        .collect();
    events
        .iter()
        .filter_map(task_of)
        .filter(|id| !created.contains(id))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(str::to_owned)
        .collect()
}

/// Folds a batch into the rows it changes, starting from the rows it does not create (`known`),
/// so each row is written once per batch.
pub(super) fn fold(
    mut known: BTreeMap<String, TaskRow>,
    events: &[RecordedEvent],
) -> Result<Vec<TaskRow>, ProjectionError> {
    let mut changed = BTreeSet::new();
    for event in events {
        let Some(id) = task_of(event) else { continue };
        let at = event.recorded_at;
        if event.stream.aggregate_type == TASK_STREAM {
            let change =
                TaskEvent::deserialize(&event.payload).map_err(|e| unreadable(event, e))?;
            let mut created = None;
            match (change, known.get_mut(id)) {
                (
                    TaskEvent::Created {
                        subject,
                        input,
                        requester,
                        channel,
                        workflow,
                    },
                    _,
                ) => {
                    // Before subjects, the requester was stored plain, with its channel.
                    let channel = channel.or_else(|| {
                        requester
                            .get("channel")
                            .and_then(Value::as_str)
                            .map(str::to_owned)
                    });
                    created = Some(TaskRow {
                        task_id: id.to_owned(),
                        status: "pending".into(),
                        workflow,
                        run_id: None,
                        subject,
                        requester,
                        requester_channel: channel.unwrap_or_default(),
                        input,
                        current_step: None,
                        result: None,
                        error: None,
                        created_at: at,
                        updated_at: at,
                        created_position: event.position.0,
                    });
                }
                // A task event without its TaskCreated (skipped by an operator) has no row.
                (_, None) => continue,
                (TaskEvent::RoutingStarted, Some(row)) => row.status = "routing".into(),
                (TaskEvent::Routed { workflow, run_id }, Some(row)) => {
                    row.status = "executing".into();
                    row.workflow = Some(workflow);
                    row.run_id = Some(run_id);
                }
                (TaskEvent::Completed { result }, Some(row)) => {
                    row.status = "completed".into();
                    row.result = Some(result);
                    row.current_step = None;
                }
                (TaskEvent::Failed { error }, Some(row)) => {
                    row.status = "failed".into();
                    row.error = Some(error);
                    row.current_step = None;
                }
                (TaskEvent::Cancelled { reason }, Some(row)) => {
                    row.status = "cancelled".into();
                    row.error = Some(Value::String(reason));
                    row.current_step = None;
                }
            }
            match created {
                Some(row) => {
                    known.insert(id.to_owned(), row);
                }
                None => {
                    if let Some(row) = known.get_mut(id) {
                        row.updated_at = row.updated_at.max(at);
                    }
                }
            }
        } else {
            // A run of no known task (a child run, a run started on its own) is not a task's; a
            // finished task's run has nothing more to show.
            let Some(row) = known.get_mut(id).filter(|row| !row.is_finished()) else {
                continue;
            };
            let event_type = event.event_type.as_str();
            if STEP_EVENTS.contains(&event_type) {
                let at_step =
                    AtStep::deserialize(&event.payload).map_err(|e| unreadable(event, e))?;
                row.current_step = Some(at_step.data.step);
            } else if RUN_END_EVENTS.contains(&event_type) {
                row.current_step = None;
            } else {
                continue;
            }
            row.updated_at = row.updated_at.max(at);
        }
        changed.insert(id.to_owned());
    }
    Ok(changed
        .into_iter()
        .filter_map(|id| known.remove(&id))
        .collect())
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};
    use serde_json::json;
    use stele_engine::{CommandMeta, Position, StreamId};
    use uuid::Uuid;

    use super::*;

    /// The event at `position` (recorded at second `position`) of `stream`, its payload in the
    /// stored wire form (a variant without fields has no `data`).
    fn event(position: i64, stream: (&str, &str), event_type: &str, data: Value) -> RecordedEvent {
        RecordedEvent {
            position: Position(position),
            stream: StreamId::new(stream.0, stream.1),
            sequence: position,
            event_type: event_type.into(),
            event_version: "1".into(),
            recorded_at: at(position),
            metadata: CommandMeta::new("test", "test").for_event(Uuid::nil()),
            payload: match data {
                Value::Null => json!({ "type": event_type }),
                data => json!({ "type": event_type, "data": data }),
            },
        }
    }

    fn at(second: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(second, 0).unwrap()
    }

    fn task(position: i64, id: &str, event_type: &str, data: Value) -> RecordedEvent {
        event(position, (TASK_STREAM, id), event_type, data)
    }

    fn run(position: i64, id: &str, event_type: &str, data: Value) -> RecordedEvent {
        event(position, (RUN_STREAM, id), event_type, data)
    }

    fn created(position: i64, id: &str) -> RecordedEvent {
        task(
            position,
            id,
            "TaskCreated",
            json!({
                "task_id": id,
                "input": "summarise this",
                "requester": { "user_id": "u1", "channel": "api" },
                "workflow": null,
            }),
        )
    }

    fn pending(id: &str, position: i64) -> TaskRow {
        TaskRow {
            task_id: id.into(),
            status: "pending".into(),
            workflow: None,
            run_id: None,
            subject: None,
            requester: json!({ "user_id": "u1", "channel": "api" }),
            requester_channel: "api".into(),
            input: json!("summarise this"),
            current_step: None,
            result: None,
            error: None,
            created_at: at(position),
            updated_at: at(position),
            created_position: position,
        }
    }

    fn known(rows: &[TaskRow]) -> BTreeMap<String, TaskRow> {
        rows.iter()
            .map(|row| (row.task_id.clone(), row.clone()))
            .collect()
    }

    #[test]
    fn a_created_task_is_pending() {
        let rows = fold(BTreeMap::new(), &[created(3, "t1")]).unwrap();
        assert_eq!(rows, [pending("t1", 3)]);
    }

    #[test]
    fn a_task_is_followed_to_its_end_in_one_batch() {
        let events = [
            created(1, "t1"),
            task(2, "t1", "TaskRoutingStarted", Value::Null),
            task(
                3,
                "t1",
                "TaskRouted",
                json!({ "workflow": "summarise", "run_id": "t1" }),
            ),
            run(4, "t1", "RunStarted", json!({ "workflow": "summarise" })),
            run(
                5,
                "t1",
                "StepScheduled",
                json!({ "step": "plan", "attempt": 1 }),
            ),
            run(6, "t1", "WaitStarted", json!({ "step": "approve" })),
            run(7, "t1", "RunCompleted", json!({ "output": "done" })),
            task(
                8,
                "t1",
                "TaskCompleted",
                json!({ "result": { "summary": "done" } }),
            ),
        ];
        let mut steps = Vec::new();
        for end in 1..=events.len() {
            let row = fold(BTreeMap::new(), &events[..end])
                .unwrap()
                .pop()
                .unwrap();
            steps.push((row.status, row.current_step));
        }
        let step = |s: &str| Some(s.to_owned());
        assert_eq!(
            steps,
            [
                ("pending".into(), None),
                ("routing".into(), None),
                ("executing".into(), None),
                ("executing".into(), None),
                ("executing".into(), step("plan")),
                ("executing".into(), step("approve")),
                ("executing".into(), None),
                ("completed".into(), None),
            ]
        );
        let row = fold(BTreeMap::new(), &events).unwrap().pop().unwrap();
        assert_eq!(row.workflow.as_deref(), Some("summarise"));
        assert_eq!(row.run_id.as_deref(), Some("t1"));
        assert_eq!(row.result, Some(json!({ "summary": "done" })));
        assert_eq!((row.created_at, row.updated_at), (at(1), at(8)));
        assert_eq!(row.created_position, 1);
    }

    #[test]
    fn a_batch_continues_the_rows_it_does_not_create() {
        let events = [
            run(10, "t1", "StepScheduled", json!({ "step": "draft" })),
            task(
                11,
                "t2",
                "TaskFailed",
                json!({ "error": "no model answered" }),
            ),
            task(
                12,
                "t3",
                "TaskCancelled",
                json!({ "reason": "asked to stop" }),
            ),
            created(13, "t4"),
        ];
        assert_eq!(tasks_to_load(&events), ["t1", "t2", "t3"]);
        let rows = fold(
            known(&[pending("t1", 1), pending("t2", 2), pending("t3", 3)]),
            &events,
        )
        .unwrap();
        let summary: Vec<_> = rows
            .iter()
            .map(|r| {
                (
                    r.task_id.as_str(),
                    r.status.as_str(),
                    r.current_step.as_deref(),
                    r.error.as_ref().and_then(Value::as_str),
                    r.updated_at,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("t1", "pending", Some("draft"), None, at(10)),
                ("t2", "failed", None, Some("no model answered"), at(11)),
                ("t3", "cancelled", None, Some("asked to stop"), at(12)),
                ("t4", "pending", None, None, at(13)),
            ]
        );
    }

    #[test]
    fn only_changed_rows_come_back() {
        let events = [
            run(5, "t1", "StepCompleted", json!({ "step": "plan" })),
            event(6, ("note", "n1"), "NoteWritten", json!({})),
        ];
        assert_eq!(tasks_to_load(&events), ["t1"]);
        assert!(fold(known(&[pending("t1", 1)]), &events)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn runs_of_no_task_and_task_events_without_a_row_are_ignored() {
        let events = [
            run(5, "t1.fanout.0", "StepScheduled", json!({ "step": "each" })),
            task(6, "ghost", "TaskRoutingStarted", Value::Null),
            run(7, "ghost", "RunCompleted", json!({})),
        ];
        assert!(fold(BTreeMap::new(), &events).unwrap().is_empty());
    }

    #[test]
    fn a_finished_task_keeps_its_last_step_and_time() {
        let mut done = pending("t1", 1);
        done.status = "completed".into();
        let events = [run(9, "t1", "StepScheduled", json!({ "step": "late" }))];
        assert!(fold(known(&[done]), &events).unwrap().is_empty());
    }

    #[test]
    fn an_older_event_does_not_move_the_time_back() {
        let mut row = pending("t1", 1);
        row.updated_at = at(20);
        let events = [task(15, "t1", "TaskRoutingStarted", Value::Null)];
        let rows = fold(known(&[row]), &events).unwrap();
        assert_eq!(
            (rows[0].status.as_str(), rows[0].updated_at),
            ("routing", at(20))
        );
    }

    #[test]
    fn an_unreadable_event_names_itself() {
        let events = [
            task(4, "t1", "TaskCreated", json!({ "input": 7 })),
            run(5, "t2", "StepScheduled", json!({ "no_step": true })),
        ];
        for (event, known) in events
            .iter()
            .zip([BTreeMap::new(), known(&[pending("t2", 1)])])
        {
            let Err(ProjectionError::Apply(message)) = fold(known, std::slice::from_ref(event))
            else {
                panic!("{} was read", event.event_type);
            };
            assert!(
                message.starts_with(&format!("{} at {} of ", event.event_type, event.position)),
                "{message}"
            );
        }
    }
}
