use chrono::TimeZone;
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use futures::executor::block_on;
use proptest::prelude::*;
use serde_json::json;
use stele_aggregates::workflow_run::{ChildResult, RunCommand, StepOutcome};

use super::*;
use crate::definition::{Definition, RetryPolicy};

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 22, 8, 0, 0).unwrap()
}

/// A run driven in memory: the live aggregate, and every event it recorded.
struct Sim {
    decider: Arc<dyn Decider>,
    run: WorkflowRun,
    events: Vec<RunEvent>,
}

impl Sim {
    fn start(catalog: Catalog, workflow: &str, input: Value) -> Sim {
        let definition = catalog.latest(workflow).unwrap().clone();
        let mut sim = Sim {
            decider: Arc::new(CatalogDecider(Arc::new(catalog))),
            run: WorkflowRun::default(),
            events: Vec::new(),
        };
        sim.exec(RunCommand::Start {
            run_id: "r1".into(),
            task_id: Some("t1".into()),
            subject: Some("s1".into()),
            workflow: definition.name.clone(),
            version: definition.version,
            input,
            parent: None,
            models: Default::default(),
            now: t0(),
        })
        .unwrap();
        sim
    }

    fn exec(&mut self, command: RunCommand) -> Result<Vec<RunEvent>, String> {
        let sink = EventSink::default();
        block_on(self.run.handle(command, &self.decider, &sink)).map_err(|e| e.to_string())?;
        let new = block_on(sink.collect());
        self.events.extend(new.iter().cloned());
        Ok(new)
    }

    fn types(events: &[RunEvent]) -> Vec<String> {
        events
            .iter()
            .map(cqrs_es::DomainEvent::event_type)
            .collect()
    }

    /// The scheduled job step, as a worker would find it.
    fn scheduled(&self) -> Option<(String, u32)> {
        self.run
            .scheduled_steps()
            .next()
            .map(|(s, a)| (s.to_owned(), a))
    }

    fn finish_step(&mut self, outcome: StepOutcome) -> Vec<RunEvent> {
        let (step, attempt) = self.scheduled().expect("a scheduled step");
        self.exec(RunCommand::RecordStep {
            step: step.into(),
            attempt,
            started_at: t0(),
            input: None,
            outcome,
            calls: vec![],
            remember: None,
            now: t0(),
        })
        .unwrap()
    }

    fn rebuilt(&self) -> WorkflowRun {
        let mut run = WorkflowRun::default();
        for event in &self.events {
            run.apply(event.clone());
        }
        run
    }
}

fn catalog(yamls: &[&str]) -> Catalog {
    let mut catalog = Catalog::default();
    for yaml in yamls {
        catalog
            .insert(Definition::from_yaml(yaml, None).unwrap())
            .unwrap();
    }
    catalog
}

fn ok(output: Value) -> StepOutcome {
    StepOutcome::Completed { output }
}

fn err(error: &str) -> StepOutcome {
    StepOutcome::Failed {
        error: error.into(),
    }
}

const PIPELINE: &str = r#"
name: pipeline
version: 1
output: "{ 'plan': steps.plan.output, 'review': steps.review.output }"
steps:
  - id: plan
    kind: agent
    agent: planner
    prompt: "{{ input }}"
  - id: code
    kind: tool
    tool: echo
    input: "{{ steps.plan.output }}"
  - id: review
    kind: agent
    agent: reviewer
    prompt: "{{ steps.code.output }}"
"#;

#[test]
fn a_linear_run_schedules_each_step_after_the_last_and_completes() {
    let mut sim = Sim::start(catalog(&[PIPELINE]), "pipeline", json!("build a site"));
    assert_eq!(Sim::types(&sim.events), ["RunStarted", "StepScheduled"]);
    assert_eq!(sim.scheduled(), Some(("plan".into(), 1)));
    let events = sim.finish_step(ok(json!("1. files")));
    assert_eq!(
        Sim::types(&events),
        ["StepStarted", "StepCompleted", "StepScheduled"]
    );
    sim.finish_step(ok(json!("files")));
    let events = sim.finish_step(ok(json!("LGTM")));
    assert_eq!(
        Sim::types(&events),
        ["StepStarted", "StepCompleted", "RunCompleted"]
    );
    assert_eq!(sim.run.status, RunStatus::Completed);
    assert_eq!(
        sim.run.output,
        Some(json!({ "plan": "1. files", "review": "LGTM" }))
    );
    assert_eq!(sim.run.path, ["plan", "code", "review"]);
    assert_eq!(sim.rebuilt(), sim.run);
}

const TRIAGE: &str = r#"
name: triage
version: 1
steps:
  - id: classify
    kind: route
    agent: brain
    prompt: "{{ input }}"
    cases: { simple: answer, decompose: split }
    default: answer
  - id: answer
    kind: reply
    text: "answer to {{ input }}"
    next: end
  - id: split
    kind: fan_out
    items: input | split(' ') | list
    workflow: subtask
"#;

const SUBTASK: &str = r#"
name: subtask
version: 3
steps:
  - id: work
    kind: tool
    tool: echo
    input: "{{ input }}"
"#;

#[test]
fn a_route_by_agent_goes_by_the_classification() {
    let mut sim = Sim::start(catalog(&[TRIAGE, SUBTASK]), "triage", json!("hi"));
    let events = sim.finish_step(ok(json!({ "route": "simple" })));
    assert_eq!(
        Sim::types(&events),
        [
            "StepStarted",
            "StepCompleted",
            "ReplyRequested",
            "StepCompleted",
            "RunCompleted"
        ]
    );
    assert_eq!(sim.run.replies, ["answer to hi"]);
    assert_eq!(sim.run.output, Some(json!("answer to hi")));
}

#[test]
fn a_fan_out_starts_children_and_joins_their_results() {
    let mut sim = Sim::start(catalog(&[TRIAGE, SUBTASK]), "triage", json!("a b"));
    sim.finish_step(ok(json!("decompose")));
    assert_eq!(sim.run.error, None);
    let state = sim.run.step("split").unwrap();
    assert_eq!(state.status, StepStatus::Joining);
    assert_eq!(
        state
            .children
            .iter()
            .map(|c| (c.run_id.as_str(), c.version, c.input.json()))
            .collect::<Vec<_>>(),
        [("r1.split.0", 3, json!("a")), ("r1.split.1", 3, json!("b"))]
    );
    let finished = |index: usize, status| RunCommand::ChildFinished {
        step: "split".into(),
        index,
        result: ChildResult {
            run_id: format!("r1.split.{index}").into(),
            status,
            output: Some(json!(index)),
            error: None,
        },
        now: t0(),
    };
    assert_eq!(
        Sim::types(&sim.exec(finished(1, RunStatus::Completed)).unwrap()),
        ["ChildRunFinished"]
    );
    // A repeated report changes nothing.
    assert!(sim
        .exec(finished(1, RunStatus::Completed))
        .unwrap()
        .is_empty());
    sim.exec(finished(0, RunStatus::Completed)).unwrap();
    assert_eq!(sim.run.status, RunStatus::Completed);
    assert_eq!(sim.run.output.as_ref().unwrap()[1]["output"], json!(1));
    assert_eq!(sim.rebuilt(), sim.run);

    let mut failing = Sim::start(catalog(&[TRIAGE, SUBTASK]), "triage", json!("a"));
    failing.finish_step(ok(json!("decompose")));
    failing.exec(finished(0, RunStatus::Failed)).unwrap();
    assert_eq!(failing.run.status, RunStatus::Failed);
    assert!(failing
        .run
        .error
        .as_ref()
        .unwrap()
        .contains("1 of 1 child runs did not complete"));
}

const RETRYING: &str = r#"
name: retrying
version: 1
steps:
  - id: flaky
    kind: agent
    agent: coder
    prompt: "{{ input }}"
    retry:
      attempts: 3
      backoff: 10s
      escalate: [{ agent: generic }, { prompt: "simpler: {{ input }}" }]
    on_error: apologise
  - id: done
    kind: reply
    text: ok
    next: end
  - id: apologise
    kind: reply
    text: "sorry: {{ steps.flaky.error }}"
"#;

#[test]
fn failed_steps_retry_with_backoff_and_escalation_then_take_on_error() {
    let mut sim = Sim::start(catalog(&[RETRYING]), "retrying", json!("x"));
    sim.finish_step(err("boom 1"));
    let state = sim.run.step("flaky").unwrap();
    assert_eq!((state.attempt, state.escalation), (2, 1));
    let wait = state.not_before.unwrap() - t0();
    assert!((9..=11).contains(&wait.num_seconds()), "{wait}");
    sim.finish_step(err("boom 2"));
    let state = sim.run.step("flaky").unwrap();
    assert_eq!((state.attempt, state.escalation), (3, 2));
    let wait = state.not_before.unwrap() - t0();
    assert!((18..=22).contains(&wait.num_seconds()), "{wait}");
    sim.finish_step(err("boom 3"));
    assert_eq!(sim.run.status, RunStatus::Completed);
    assert_eq!(sim.run.replies, ["sorry: boom 3"]);
    assert_eq!(
        sim.run.step("flaky").unwrap().errors,
        ["boom 1", "boom 2", "boom 3"]
    );
}

const APPROVAL: &str = r#"
name: approval
version: 1
steps:
  - id: nap
    kind: sleep
    duration: 1m
  - id: approve
    kind: wait
    signal: approval
    timeout: 1h
    on_timeout: rejected
  - id: go
    kind: reply
    text: "approved by {{ steps.approve.output.by }}"
    next: end
  - id: rejected
    kind: reply
    text: "no answer"
"#;

#[test]
fn timers_signals_and_wait_timeouts() {
    let mut sim = Sim::start(catalog(&[APPROVAL]), "approval", json!(null));
    let nap = sim.run.step("nap").unwrap();
    assert_eq!(nap.status, StepStatus::Sleeping);
    assert_eq!(nap.deadline, Some(t0() + chrono::Duration::minutes(1)));
    // A signal that arrives early is kept until the wait consumes it.
    sim.exec(RunCommand::Signal {
        name: "approval".into(),
        payload: json!({ "by": "ana" }),
        now: t0(),
    })
    .unwrap();
    assert_eq!(sim.run.signals.len(), 1);
    let events = sim
        .exec(RunCommand::FireTimer {
            step: "nap".into(),
            now: t0(),
        })
        .unwrap();
    assert_eq!(
        Sim::types(&events),
        [
            "TimerFired",
            "WaitStarted",
            "StepCompleted",
            "ReplyRequested",
            "StepCompleted",
            "RunCompleted"
        ]
    );
    assert!(sim.run.signals.is_empty());
    assert_eq!(sim.run.output, Some(json!("approved by ana")));
    assert_eq!(sim.rebuilt(), sim.run);

    let mut late = Sim::start(catalog(&[APPROVAL]), "approval", json!(null));
    late.exec(RunCommand::FireTimer {
        step: "nap".into(),
        now: t0(),
    })
    .unwrap();
    assert_eq!(
        late.run.step("approve").unwrap().deadline,
        Some(t0() + chrono::Duration::hours(1))
    );
    let events = late
        .exec(RunCommand::TimeoutWait {
            step: "approve".into(),
            now: t0(),
        })
        .unwrap();
    assert_eq!(Sim::types(&events)[0], "WaitTimedOut");
    assert_eq!(late.run.output, Some(json!("no answer")));
    // The signal comes too late: the run is over.
    assert!(late
        .exec(RunCommand::Signal {
            name: "approval".into(),
            payload: json!(1),
            now: t0()
        })
        .is_err());
}

#[test]
fn a_route_without_a_matching_case_fails_the_run_with_the_cases() {
    let yaml = r#"
name: strict
version: 1
steps:
  - id: pick
    kind: route
    on: input
    cases: { a: end }
"#;
    let sim = Sim::start(catalog(&[yaml]), "strict", json!("zzz"));
    assert_eq!(sim.run.status, RunStatus::Failed);
    assert!(sim
        .run
        .error
        .as_ref()
        .unwrap()
        .contains("no case for \"zzz\""));
}

#[test]
fn a_changed_definition_needs_a_new_version() {
    let mut catalog = catalog(&[SUBTASK]);
    let mut changed = Definition::from_yaml(SUBTASK, None).unwrap();
    changed.description = "other".into();
    assert!(catalog.insert(changed.clone()).is_err());
    changed.version = 4;
    catalog.insert(changed).unwrap();
    assert_eq!(catalog.latest("subtask").unwrap().version, 4);
    assert_eq!(catalog.get("subtask", 3).unwrap().description, "");
}

/// A generated workflow: a chain of job steps with random retry policies, some with an
/// `on_error` that skips ahead, and a route on the last output in the middle.
fn workflow_strategy() -> impl Strategy<Value = Definition> {
    prop::collection::vec((1u32..4, any::<bool>()), 1..6).prop_map(|specs| {
        let n = specs.len();
        let mut steps = Vec::new();
        for (i, (attempts, skip_on_error)) in specs.into_iter().enumerate() {
            let next = if i + 1 < n {
                format!("s{}", i + 1)
            } else {
                "end".into()
            };
            steps.push(crate::definition::Step {
                id: format!("s{i}"),
                kind: StepKind::Tool {
                    tool: "echo".into(),
                    input: json!("{{ input }}"),
                },
                next: Some(next.clone()),
                retry: RetryPolicy {
                    attempts,
                    ..RetryPolicy::default()
                },
                timeout: None,
                on_error: skip_on_error.then(|| next.clone()),
                memory: None,
            });
            if i == n / 2 {
                steps.push(crate::definition::Step {
                    id: format!("r{i}"),
                    kind: StepKind::Route {
                        on: Some(format!("steps.s{i}.output")),
                        agent: None,
                        prompt: None,
                        cases: [("stop".to_owned(), "end".to_owned())].into(),
                        default: Some(next.clone()),
                    },
                    next: None,
                    retry: RetryPolicy::default(),
                    timeout: None,
                    on_error: None,
                    memory: None,
                });
                let before_route = steps.len() - 2;
                steps[before_route].next = Some(format!("r{i}"));
            }
        }
        Definition {
            name: "generated".into(),
            version: 1,
            description: String::new(),
            start: None,
            output: None,
            steps,
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Whatever the workflow and the failures injected, the run ends, never runs a step more
    /// often than its policy allows, and its state rebuilt from its events equals the live one.
    #[test]
    fn replaying_a_run_rebuilds_the_live_state(
        definition in workflow_strategy(),
        failures in prop::collection::vec(any::<bool>(), 64),
        stop in any::<bool>(),
    ) {
        let known = crate::definition::Known {
            agents: &|_| false,
            tools: &|t| t == "echo",
            workflows: &|_| false,
        };
        prop_assert!(crate::definition::validate(&definition, &known, None).is_empty());
        let mut catalog = Catalog::default();
        catalog.insert(definition.clone()).unwrap();
        let mut sim = Sim::start(catalog, "generated", json!("x"));
        let mut failures = failures.into_iter().cycle();
        let mut steps_run = 0;
        while let Some((step, attempt)) = sim.scheduled() {
            steps_run += 1;
            prop_assert!(steps_run < 100, "the run does not end");
            let policy = &definition.step(&step).unwrap().retry;
            prop_assert!(attempt <= policy.attempts);
            let outcome = if failures.next().unwrap() {
                err("injected")
            } else {
                ok(json!(if stop { "stop" } else { "go" }))
            };
            sim.finish_step(outcome);
            prop_assert_eq!(&sim.rebuilt(), &sim.run);
        }
        prop_assert!(sim.run.status.is_finished(), "{:?}", sim.run.status);
    }
}
