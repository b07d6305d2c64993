use chrono::TimeZone;
use cqrs_es::test::TestFramework;
use serde_json::json;

use super::*;

/// A two-step workflow `a → b`, each step retried once, for testing the aggregate alone (the real
/// decider, built from definitions, lives in `stele-workflows`).
struct TwoSteps;

impl Decider for TwoSteps {
    fn decide(
        &self,
        run: &WorkflowRun,
        event: &RunEvent,
        _: DateTime<Utc>,
    ) -> Result<Vec<Action>, String> {
        let schedule = |step: &str, attempt| Action::ScheduleStep {
            step: step.into(),
            attempt,
            not_before: None,
            escalation: attempt - 1,
            timeout_ms: 1000,
        };
        Ok(match event {
            RunEvent::RunStarted { .. } => vec![schedule("a", 1)],
            RunEvent::StepCompleted { step, .. } if step == "a" => vec![schedule("b", 1)],
            RunEvent::StepCompleted { output, .. } => vec![Action::CompleteRun {
                output: output.json(),
            }],
            RunEvent::StepFailed { step, attempt, .. } if *attempt < 2 => {
                vec![schedule(step, attempt + 1)]
            }
            RunEvent::StepFailed { step, error, .. } => vec![Action::FailRun {
                error: error.text().to_owned(),
                step: Some(step.clone()),
            }],
            RunEvent::SignalReceived { name, payload } if run.current.is_none() => {
                return Err(format!("unexpected signal {name}: {}", payload.json()))
            }
            _ => vec![],
        })
    }
}

/// Loops forever without a job: must be cut off.
struct Endless;

impl Decider for Endless {
    fn decide(
        &self,
        _: &WorkflowRun,
        _: &RunEvent,
        _: DateTime<Utc>,
    ) -> Result<Vec<Action>, String> {
        Ok(vec![Action::CompleteStep {
            step: "spin".into(),
            output: json!(1),
            consumed_signal: None,
        }])
    }
}

fn given() -> TestFramework<WorkflowRun> {
    TestFramework::with(Arc::new(TwoSteps) as Arc<dyn Decider>)
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 22, 8, 0, 0).unwrap()
}

fn started() -> RunEvent {
    RunEvent::RunStarted {
        run_id: "run-1".into(),
        task_id: Some("task-1".into()),
        subject: None,
        workflow: "two".into(),
        version: 1,
        input: Personal::plain(json!("hello")),
        parent: None,
        models: Default::default(),
    }
}

fn scheduled(step: &str, attempt: u32) -> RunEvent {
    RunEvent::StepScheduled {
        step: step.into(),
        attempt,
        not_before: None,
        escalation: attempt - 1,
        timeout_ms: 1000,
    }
}

fn record(step: &str, attempt: u32, outcome: StepOutcome) -> RunCommand {
    RunCommand::RecordStep {
        step: step.into(),
        attempt,
        started_at: now(),
        input: None,
        outcome,
        calls: vec![],
        remember: None,
        now: now(),
    }
}

fn completed(step: &str, attempt: u32, output: Value) -> RunEvent {
    RunEvent::StepCompleted {
        step: step.into(),
        attempt,
        input: None,
        output: Personal::plain(output),
        calls: Personal::plain(vec![]),
        consumed_signal: None,
        remember: None,
    }
}

fn step_started(step: &str, attempt: u32) -> RunEvent {
    RunEvent::StepStarted {
        step: step.into(),
        attempt,
        at: now(),
    }
}

#[test]
fn starting_records_the_start_and_the_first_step() {
    given()
        .given_no_previous_events()
        .when(RunCommand::Start {
            run_id: "run-1".into(),
            task_id: Some("task-1".into()),
            subject: None,
            workflow: "two".into(),
            version: 1,
            input: json!("hello"),
            parent: None,
            models: Default::default(),
            now: now(),
        })
        .then_expect_events(vec![started(), scheduled("a", 1)]);
}

#[test]
fn a_step_outcome_and_what_follows_are_one_command() {
    given()
        .given(vec![started(), scheduled("a", 1)])
        .when(record(
            "a",
            1,
            StepOutcome::Completed { output: json!("A") },
        ))
        .then_expect_events(vec![
            step_started("a", 1),
            completed("a", 1, json!("A")),
            scheduled("b", 1),
        ]);
    given()
        .given(vec![
            started(),
            scheduled("a", 1),
            completed("a", 1, json!("A")),
            scheduled("b", 1),
        ])
        .when(record(
            "b",
            1,
            StepOutcome::Completed { output: json!("B") },
        ))
        .then_expect_events(vec![
            step_started("b", 1),
            completed("b", 1, json!("B")),
            RunEvent::RunCompleted {
                output: Personal::plain(json!("B")),
            },
        ]);
}

#[test]
fn a_failed_step_is_retried_then_fails_the_run() {
    let failed = |attempt| RunEvent::StepFailed {
        step: "a".into(),
        attempt,
        input: None,
        error: Personal::plain("boom".into()),
        calls: Personal::plain(vec![]),
    };
    let fail = || StepOutcome::Failed {
        error: "boom".into(),
    };
    given()
        .given(vec![started(), scheduled("a", 1)])
        .when(record("a", 1, fail()))
        .then_expect_events(vec![step_started("a", 1), failed(1), scheduled("a", 2)]);
    given()
        .given(vec![
            started(),
            scheduled("a", 1),
            failed(1),
            scheduled("a", 2),
        ])
        .when(record("a", 2, fail()))
        .then_expect_events(vec![
            step_started("a", 2),
            failed(2),
            RunEvent::RunFailed {
                error: Personal::plain("boom".into()),
                step: Some("a".into()),
            },
        ]);
}

#[test]
fn stale_and_repeated_step_reports_are_refused() {
    given()
        .given(vec![started(), scheduled("a", 1)])
        .when(record("a", 2, StepOutcome::Completed { output: json!(1) }))
        .then_expect_error(RunError::StaleStep {
            step: "a".into(),
            attempt: 2,
        });
    given()
        .given(vec![
            started(),
            scheduled("a", 1),
            completed("a", 1, json!("A")),
            scheduled("b", 1),
        ])
        .when(record("a", 1, StepOutcome::Completed { output: json!(1) }))
        .then_expect_error(RunError::StaleStep {
            step: "a".into(),
            attempt: 1,
        });
}

#[test]
fn late_timers_timeouts_and_child_reports_change_nothing() {
    for command in [
        RunCommand::FireTimer {
            step: "a".into(),
            now: now(),
        },
        RunCommand::TimeoutWait {
            step: "a".into(),
            now: now(),
        },
        RunCommand::ChildFinished {
            step: "a".into(),
            index: 0,
            result: ChildResult {
                run_id: "c".into(),
                status: RunStatus::Completed,
                output: None,
                error: None,
            },
            now: now(),
        },
    ] {
        given()
            .given(vec![started(), scheduled("a", 1)])
            .when(command)
            .then_expect_events(vec![]);
    }
}

#[test]
fn finished_runs_refuse_commands_and_cancel_once() {
    let cancelled = RunEvent::RunCancelled {
        reason: "user".into(),
    };
    given()
        .given(vec![started(), scheduled("a", 1)])
        .when(RunCommand::Cancel {
            reason: "user".into(),
            now: now(),
        })
        .then_expect_events(vec![cancelled.clone()]);
    given()
        .given(vec![started(), scheduled("a", 1), cancelled])
        .when(RunCommand::Signal {
            name: "approve".into(),
            payload: json!(true),
            now: now(),
        })
        .then_expect_error(RunError::Finished(RunStatus::Cancelled));
    // Cancelled before it started: recorded, and the late start is refused.
    given()
        .given_no_previous_events()
        .when(RunCommand::Cancel {
            reason: "user".into(),
            now: now(),
        })
        .then_expect_events(vec![RunEvent::RunCancelled {
            reason: "user".into(),
        }]);
    let cancelled_before = RunEvent::RunCancelled {
        reason: "user".into(),
    };
    for history in [vec![started()], vec![cancelled_before]] {
        given()
            .given(history)
            .when(RunCommand::Start {
                run_id: "run-1".into(),
                task_id: None,
                subject: None,
                workflow: "two".into(),
                version: 1,
                input: json!(null),
                parent: None,
                models: Default::default(),
                now: now(),
            })
            .then_expect_error(RunError::AlreadyStarted);
    }
}

#[test]
fn a_decision_error_fails_the_run_and_is_recorded() {
    given()
        .given(vec![started()])
        .when(RunCommand::Signal {
            name: "x".into(),
            payload: json!(1),
            now: now(),
        })
        .then_expect_events(vec![
            RunEvent::SignalReceived {
                name: "x".into(),
                payload: Personal::plain(json!(1)),
            },
            RunEvent::RunFailed {
                error: Personal::plain("unexpected signal x: 1".into()),
                step: None,
            },
        ]);
}

#[test]
fn decisions_that_never_settle_fail_the_run() {
    let events = TestFramework::<WorkflowRun>::with(Arc::new(Endless) as Arc<dyn Decider>)
        .given(vec![started()])
        .when(RunCommand::Signal {
            name: "go".into(),
            payload: json!(1),
            now: now(),
        })
        .inspect_result()
        .unwrap();
    assert!(events.len() <= MAX_EVENTS_PER_COMMAND + 1);
    assert!(matches!(events.last(), Some(RunEvent::RunFailed { .. })));
}

#[test]
fn the_state_folds_from_events() {
    let mut run = WorkflowRun::default();
    for event in [
        started(),
        scheduled("a", 1),
        step_started("a", 1),
        completed("a", 1, json!("A")),
        scheduled("b", 1),
        RunEvent::SignalReceived {
            name: "approve".into(),
            payload: Personal::plain(json!(true)),
        },
    ] {
        run.apply(event);
    }
    assert_eq!(run.status, RunStatus::Running);
    assert_eq!(run.path, vec!["a", "b"]);
    assert_eq!(run.current.as_deref(), Some("b"));
    assert_eq!(run.outputs().get("a"), Some(&&json!("A")));
    assert_eq!(run.scheduled_steps().collect::<Vec<_>>(), vec![("b", 1)]);
    assert_eq!(run.signals, vec![("approve".to_owned(), json!(true))]);
}

#[test]
fn a_persons_run_records_their_data_as_theirs() {
    let mut run = WorkflowRun::default();
    run.apply(RunEvent::RunStarted {
        run_id: "run-1".into(),
        task_id: Some("task-1".into()),
        subject: Some("s-1".into()),
        workflow: "two".into(),
        version: 1,
        input: Personal::of("s-1", json!("hello")),
        parent: None,
        models: Default::default(),
    });
    let recorded = run.facts(record(
        "a",
        1,
        StepOutcome::Completed { output: json!("A") },
    ));
    // (Step a was never scheduled in this history: the record is refused, which says nothing.)
    assert!(recorded.is_err());
    assert_eq!(run.personal(json!(1)), Personal::of("s-1", json!(1)));
    // An erased input reads as erased, with its place kept.
    let mut erased = WorkflowRun::default();
    erased.apply(RunEvent::RunStarted {
        run_id: "run-1".into(),
        task_id: None,
        subject: Some("s-1".into()),
        workflow: "two".into(),
        version: 1,
        input: Personal::Erased {
            subject: "s-1".into(),
        },
        parent: None,
        models: Default::default(),
    });
    assert_eq!(erased.input, json!("[erased]"));
}
