//! The workflow runtime end to end, on both backends: tasks run their workflows through the
//! process manager and step workers, driven step by step until nothing is left to do.

use std::sync::Arc;

use chrono::Utc;
use serde_json::{json, Value};
use stele_aggregates::schedule::{
    CatchUp, Overlap, Schedule, ScheduleError, ScheduleEvent, ScheduleSpec, ScheduleStatus, Timing,
};
use stele_aggregates::task::{Requester, TaskInput, TaskStatus};
use stele_aggregates::workflow_run::{RunStatus, StepStatus};
use stele_engine::for_each_backend;
use stele_engine::process::as_projection;
use stele_engine::projection::ProjectionRunner;
use stele_engine::queue::worker::{Worker, WorkerOptions};
use stele_engine::queue::{JobFilter, JobState};
use stele_engine::{CommandMeta, Store};
use stele_models::{ManualClock, ModelRouter, ModelsConfig};
use stele_workflows::agents::ModelAgents;
use stele_workflows::catalog::{self, Source};
use stele_workflows::runtime::{
    scheduled_task_id, Runtime, RuntimeError, SCHEDULE_START_JOB, SCHEDULE_TICK_JOB,
};
use stele_workflows::tools::Tools;

struct Harness {
    runtime: Arc<Runtime>,
    runner: ProjectionRunner,
    worker: Worker,
    store_queue: Arc<dyn stele_engine::queue::JobQueue>,
    log: Arc<dyn stele_engine::EventLog>,
}

impl Harness {
    /// A runtime with the shipped definitions plus `extra` YAML definitions, and the shipped
    /// agent roles (scripted) plus `extra_rules` (TOML rules for the scripted provider, prepended
    /// so they win).
    async fn new(store: &Store, extra: &[&str], extra_rules: &str) -> Harness {
        Harness::build(
            store,
            extra,
            extra_rules,
            stele_privacy::Policy::default(),
            false,
        )
        .await
    }

    /// [`Harness::new`] under `policy`, on the real clock if `real_clock`.
    async fn build(
        store: &Store,
        extra: &[&str],
        extra_rules: &str,
        policy: stele_privacy::Policy,
        real_clock: bool,
    ) -> Harness {
        // Tasks are a person's data: the store seals them, as every node's does (under one key
        // per test process: two runtimes on one store stand for two nodes of a deployment).
        static KEK: std::sync::LazyLock<stele_privacy::Kek> =
            std::sync::LazyLock::new(stele_privacy::Kek::generate);
        let private = stele_privacy::private_store(store, &KEK, policy)
            .await
            .unwrap();
        let store = &private.store;
        let mut config_text = catalog_config();
        if !extra_rules.is_empty() {
            config_text = config_text.replacen(
                "[providers.scripted]\nkind = \"scripted\"\n",
                &format!("[providers.scripted]\nkind = \"scripted\"\n\n{extra_rules}\n"),
                1,
            );
        }
        let config = ModelsConfig::from_toml_str(&config_text).unwrap();
        let router = ModelRouter::new(config).unwrap();
        let mut sources = catalog::builtin();
        sources.extend(extra.iter().enumerate().map(|(i, yaml)| Source {
            file: format!("test-{i}.yaml").into(),
            yaml: (*yaml).to_owned(),
        }));
        let tools = Tools::builtin();
        let catalog = catalog::build(&sources, &|a| router.agent(a).is_some(), &|t| {
            tools.contains(t)
        })
        .unwrap();
        let agents = Arc::new(ModelAgents::new(router, tools.clone()));
        // The runtime's clock stands an hour behind the database's: every timer, backoff and
        // timeout shorter than that is due as soon as it is recorded, so tests step the runtime
        // instead of waiting for time to pass (one that must not fire yet is longer).
        let clock = Arc::new(ManualClock::at(Utc::now() - chrono::Duration::hours(1)));
        let mut runtime =
            Runtime::new(store, catalog, agents, tools).with_subjects(private.subjects.clone());
        if !real_clock {
            runtime = runtime.with_clock(clock);
        }
        let runtime = Arc::new(runtime);
        let mut projections = vec![
            as_projection(runtime.manager(), store.queue.clone()),
            as_projection(runtime.schedule_manager(), store.queue.clone()),
        ];
        if let Some(retention) = runtime.retention_manager() {
            projections.push(as_projection(retention, store.queue.clone()));
            projections.push(Arc::new(stele_privacy::index::SubjectIndex));
        }
        let runner = ProjectionRunner::new(store, projections);
        let worker = runtime.worker(WorkerOptions::new("workflows"));
        Harness {
            runtime,
            runner,
            worker,
            store_queue: store.queue.clone(),
            log: store.log.clone(),
        }
    }

    /// Steps the managers and the worker until none has anything left to do now.
    async fn settle(&self) {
        self.runner.setup().await.unwrap();
        for _ in 0..500 {
            let mut read = 0;
            for name in self.runner.names() {
                read += self.runner.step(name).await.unwrap().read;
            }
            let ran = self.worker.step().await.unwrap();
            if read == 0 && ran == 0 {
                return;
            }
        }
        panic!("the runtime did not settle");
    }

    /// Settles, then checks that `done` holds (timers and backoffs are due at once: see the
    /// clock in [`Harness::new`]).
    async fn settle_until(
        &self,
        task_id: &str,
        done: impl Fn(&stele_workflows::runtime::TaskView) -> bool,
    ) {
        self.settle().await;
        let view = self.runtime.task(task_id).await.unwrap();
        assert!(done(&view), "not there after settling: {view:#?}");
    }

    async fn cancel(&self, task_id: &str, reason: &str) {
        self.runtime
            .cancel_task(task_id, reason.into(), CommandMeta::new("user:42", "test"))
            .await
            .unwrap();
    }

    async fn create(&self, workflow: &str, input: &str) -> String {
        self.runtime
            .create_task(
                TaskInput::parse(input).unwrap(),
                Requester::parse("42", "telegram").unwrap(),
                Some(workflow.into()),
                CommandMeta::new("user:42", "test"),
            )
            .await
            .unwrap()
            .task_id()
            .to_string()
    }
}

/// Events with their personal values shown as the values they hold (see
/// `stele_privacy::export::plainly`).
fn readable(events: Vec<stele_engine::RecordedEvent>) -> Vec<stele_engine::RecordedEvent> {
    events
        .into_iter()
        .map(|mut event| {
            event.payload = stele_privacy::export::plainly(&event.payload);
            event
        })
        .collect()
}

fn catalog_config() -> String {
    include_str!("../../models/agents.toml").to_owned()
}

fn finished(view: &stele_workflows::runtime::TaskView) -> bool {
    view.task.status.is_finished()
}

async fn the_dev_pipeline_runs_to_completion_with_replies_and_model_calls(store: &Store) {
    let h = Harness::new(store, &[], "").await;
    let task = h.create("dev_pipeline", "add a /health endpoint").await;
    h.settle().await;
    let view = h.runtime.task(&task).await.unwrap();
    assert_eq!(view.task.status, TaskStatus::Completed, "{view:#?}");
    let run = view.run.unwrap();
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(
        run.path,
        ["plan", "planned", "code", "execute", "test", "tested", "review", "done"]
    );
    assert_eq!(run.replies.len(), 2);
    assert!(run.replies[1].starts_with("Done. Tests: all tests pass. Review: approve"));
    let result = view.task.result.unwrap().json();
    assert_eq!(result["tests"]["passed"], json!(true));
    assert_eq!(result["review"]["verdict"], json!("approve"));

    // Every step's model call is in the history, with its prompt, output and tokens.
    let history = readable(h.runtime.history(&task).await.unwrap());
    let plan = history
        .iter()
        .find(|e| e.event_type == "StepCompleted" && e.payload["data"]["step"] == "plan")
        .unwrap();
    let call = &plan.payload["data"]["calls"][0];
    assert_eq!(call["agent"], "planner");
    assert_eq!(call["provider"], "scripted");
    assert!(call["output"].as_str().unwrap().contains("steps"));
    assert!(call["messages"][1]["content"]
        .as_str()
        .unwrap()
        .contains("add a /health endpoint"));
    let types: Vec<&str> = history.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types[0], "TaskCreated");
    assert_eq!(*types.last().unwrap(), "TaskCompleted");
    // Replies are recorded in the run; with no channel to deliver them, no job piles up.
    let pending = h
        .store_queue
        .list(JobFilter {
            limit: 100,
            ..JobFilter::default()
        })
        .await
        .unwrap();
    assert!(
        pending
            .iter()
            .all(|job| job.kind != "channel.reply" && job.state.as_str() != "available"),
        "{pending:?}"
    );
}

async fn neo_core_decomposes_into_child_runs_and_joins_them(store: &Store) {
    let h = Harness::new(store, &[], "").await;
    let task = h
        .create("neo_core", "plan the launch step by step please")
        .await;
    h.settle().await;
    let view = h.runtime.task(&task).await.unwrap();
    assert_eq!(view.task.status, TaskStatus::Completed, "{view:#?}");
    let run = view.run.unwrap();
    assert_eq!(run.path, ["restate", "decide", "epic", "respond", "send"]);
    let epic = run.step("epic").unwrap();
    assert_eq!(epic.children.len(), 2);
    let output = epic.output.as_ref().unwrap().as_array().unwrap();
    assert!(output.iter().all(|r| r["status"] == "completed"));
    assert_eq!(output[0]["run_id"], format!("{task}.epic.0"));
    // The children's events are part of the task's history.
    let history = readable(h.runtime.history(&task).await.unwrap());
    assert!(history.iter().any(
        |e| e.stream.aggregate_id == format!("{task}.epic.1") && e.event_type == "RunCompleted"
    ));

    let simple = h.create("neo_core", "hello there").await;
    let code = h.create("neo_core", "write code for a parser").await;
    h.settle().await;
    let simple = h.runtime.task(&simple).await.unwrap().run.unwrap();
    assert_eq!(
        simple.path,
        ["restate", "decide", "answer", "respond", "send"]
    );
    let code = h.runtime.task(&code).await.unwrap().run.unwrap();
    assert_eq!(
        code.path,
        ["restate", "decide", "delegate", "respond", "send"]
    );
}

const ESCALATING: &str = r#"
name: escalating
version: 1
steps:
  - id: work
    kind: agent
    agent: worker
    prompt: "{{ input }}"
    retry:
      attempts: 3
      backoff: 1ms
      escalate: [{ agent: coder }]
"#;

async fn a_failed_step_is_retried_with_its_escalation_and_every_call_recorded(store: &Store) {
    let rules = r#"
[[providers.scripted.rules]]
agent = "worker"
fail = "the worker is confused"
retryable = false
"#;
    let h = Harness::new(store, &[ESCALATING], rules).await;
    let task = h.create("escalating", "fix it").await;
    h.settle_until(&task, finished).await;
    let view = h.runtime.task(&task).await.unwrap();
    assert_eq!(view.task.status, TaskStatus::Completed, "{view:#?}");
    let work = view.run.unwrap().step("work").unwrap().clone();
    assert_eq!(work.attempt, 2);
    assert_eq!(work.errors.len(), 1);
    assert!(work.errors[0].contains("the worker is confused"));
    let history = readable(h.runtime.history(&task).await.unwrap());
    let failed = history
        .iter()
        .find(|e| e.event_type == "StepFailed")
        .unwrap();
    assert_eq!(failed.payload["data"]["calls"][0]["agent"], "worker");
    assert!(failed.payload["data"]["calls"][0]["error"]
        .as_str()
        .unwrap()
        .contains("confused"));
    let completed = history
        .iter()
        .find(|e| e.event_type == "StepCompleted")
        .unwrap();
    assert_eq!(completed.payload["data"]["calls"][0]["agent"], "coder");
}

const HUMAN: &str = r#"
name: human
version: 1
steps:
  - id: nap
    kind: sleep
    duration: 20ms
  - id: approve
    kind: wait
    signal: approval
    timeout: 2h
    on_timeout: expired
  - id: approved
    kind: reply
    text: "approved by {{ steps.approve.output.by }}"
    next: end
  - id: expired
    kind: reply
    text: "nobody answered"
"#;

const IMPATIENT: &str = r#"
name: impatient
version: 1
steps:
  - id: approve
    kind: wait
    signal: approval
    timeout: 20ms
    on_timeout: expired
  - id: approved
    kind: reply
    text: "approved"
    next: end
  - id: expired
    kind: reply
    text: "nobody answered"
"#;

async fn timers_signals_and_wait_timeouts(store: &Store) {
    let h = Harness::new(store, &[HUMAN, IMPATIENT], "").await;
    let task = h.create("human", "deploy?").await;
    h.settle_until(&task, |v| {
        v.run
            .as_ref()
            .and_then(|r| r.step("approve"))
            .is_some_and(|s| s.status == StepStatus::Waiting)
    })
    .await;
    h.runtime
        .signal_task(
            &task,
            "approval".into(),
            json!({ "by": "ana" }),
            CommandMeta::new("user:ana", "test"),
        )
        .await
        .unwrap();
    h.settle().await;
    let view = h.runtime.task(&task).await.unwrap();
    assert_eq!(
        view.task.result.map(|r| r.json()),
        Some(json!("approved by ana"))
    );

    let late = h.create("impatient", "deploy?").await;
    h.settle_until(&late, finished).await;
    let view = h.runtime.task(&late).await.unwrap();
    assert_eq!(
        view.task.result.map(|r| r.json()),
        Some(json!("nobody answered"))
    );
    assert_eq!(view.run.unwrap().path, ["approve", "expired"]);
}

const PARENT: &str = r#"
name: parent
version: 1
steps:
  - id: fan
    kind: fan_out
    items: "[1, 2]"
    workflow: waiter
"#;

const WAITER: &str = r#"
name: waiter
version: 1
steps:
  - id: hold
    kind: wait
    signal: never
"#;

const BACKING_OFF: &str = r#"
name: backing_off
version: 1
steps:
  - id: work
    kind: agent
    agent: worker
    prompt: "{{ input }}"
    retry: { attempts: 3, backoff: 3h, max_backoff: 3h }
"#;

async fn cancelling_a_task_cancels_its_run_children_and_queued_steps(store: &Store) {
    let rules = r#"
[[providers.scripted.rules]]
agent = "worker"
fail = "down"
retryable = false
"#;
    let h = Harness::new(store, &[PARENT, WAITER, BACKING_OFF], rules).await;
    let task = h.create("parent", "go").await;
    h.settle().await;
    let run = h.runtime.task(&task).await.unwrap().run.unwrap();
    let children: Vec<stele_aggregates::ids::RunId> =
        run.active_children().map(|c| c.run_id.clone()).collect();
    assert_eq!(children.len(), 2);
    h.cancel(&task, "changed my mind").await;
    h.settle().await;
    let view = h.runtime.task(&task).await.unwrap();
    assert_eq!(view.task.status, TaskStatus::Cancelled);
    assert_eq!(view.run.as_ref().unwrap().status, RunStatus::Cancelled);
    let history = readable(h.runtime.history(&task).await.unwrap());
    for child in &children {
        assert!(
            history
                .iter()
                .any(|e| child == &e.stream.aggregate_id && e.event_type == "RunCancelled"),
            "child {child} was not cancelled"
        );
    }

    // Cancelled as it was created, before its start job ran: no run starts, whichever of its
    // start and cancel jobs comes first.
    let early = h.create("parent", "go").await;
    h.cancel(&early, "too soon").await;
    h.settle().await;
    let view = h.runtime.task(&early).await.unwrap();
    assert_eq!(view.task.status, TaskStatus::Cancelled);
    assert!(view.run.is_none_or(|run| run.status != RunStatus::Running));
    let history = readable(h.runtime.history(&early).await.unwrap());
    assert!(
        !history
            .iter()
            .any(|e| e.event_type == "RunStarted" || e.event_type == "StepScheduled"),
        "{history:#?}"
    );

    // Routed as it was created to a workflow the node that starts it does not have (its
    // catalog changed since): the never-started run is recorded ended and the task failed.
    let gone = h.create("waiter", "hold on").await;
    let other = Harness::new(store, &[], "").await;
    other.settle().await;
    let view = other.runtime.task(&gone).await.unwrap();
    assert_eq!(view.task.status, TaskStatus::Failed, "{view:#?}");
    assert!(view
        .task
        .error
        .as_ref()
        .unwrap()
        .text()
        .contains("unknown workflow waiter"));
    let run = view.run.unwrap();
    assert!(!run.started());
    assert_eq!(run.status, RunStatus::Cancelled);

    // A step waiting out its backoff in the queue is cancelled with its run.
    let backing_off = h.create("backing_off", "try").await;
    h.settle().await;
    let run = h.runtime.task(&backing_off).await.unwrap().run.unwrap();
    assert_eq!(run.step("work").unwrap().attempt, 2);
    h.cancel(&backing_off, "stop").await;
    h.settle().await;
    let cancelled = h
        .store_queue
        .list(JobFilter {
            state: Some(JobState::Cancelled),
            kind: Some("workflow.step".into()),
            limit: 10,
            ..JobFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(cancelled.len(), 1);
    assert_eq!(cancelled[0].payload["run_id"], Value::String(backing_off));
}

async fn bad_requests_are_refused_clearly(store: &Store) {
    let h = Harness::new(store, &[], "").await;
    let error = h
        .runtime
        .create_task(
            TaskInput::parse("x").unwrap(),
            Requester::parse("1", "cli").unwrap(),
            Some("nope".into()),
            CommandMeta::new("user:1", "test"),
        )
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("unknown workflow nope (there are: assistant, bench, dev_pipeline"),
        "{error}"
    );
    assert_eq!(
        h.runtime.task("missing").await.unwrap_err().to_string(),
        "no task missing"
    );
    let task = h.create("assistant", "hi").await;
    h.settle().await;
    let error = h
        .runtime
        .signal_task(
            &task,
            "approval".into(),
            json!(1),
            CommandMeta::new("u", "test"),
        )
        .await
        .unwrap_err();
    assert_eq!(error.to_string(), "the run is Completed");
}

const TOOLING: &str = r#"
name: tooling
version: 1
steps:
  - id: look
    kind: agent
    agent: helper
    prompt: "look it up"
"#;

async fn agents_call_their_tools_and_every_call_is_recorded(store: &Store) {
    let extra = r#"
[[providers.scripted.rules]]
agent = "helper"
times = 1
tool_calls = [{ name = "echo", arguments = { city = "Lyon" } }, { name = "noop" }]

[agents.helper]
description = "Looks things up with its tools."
route = ["scripted/helper"]
tools = ["echo"]
"#;
    let h = Harness::new(store, &[TOOLING], extra).await;
    let task = h.create("tooling", "x").await;
    h.settle().await;
    let view = h.runtime.task(&task).await.unwrap();
    assert_eq!(view.task.status, TaskStatus::Completed, "{view:#?}");
    let history = readable(h.runtime.history(&task).await.unwrap());
    let step = history
        .iter()
        .find(|e| e.event_type == "StepCompleted")
        .unwrap();
    let calls = step.payload["data"]["calls"].as_array().unwrap();
    // The model asked for two tools; the offered one ran, the other was refused; then it answered.
    assert_eq!(calls.len(), 4, "{calls:#?}");
    assert_eq!(calls[1]["tool"], "echo");
    assert_eq!(calls[1]["output"], json!({ "city": "Lyon" }));
    assert_eq!(calls[2]["tool"], "noop");
    assert!(calls[2]["error"]
        .as_str()
        .unwrap()
        .contains("not available"));
    let last = calls[3]["messages"].as_array().unwrap();
    assert_eq!(last.last().unwrap()["role"], "tool");
}

const JUDGING: &str = r#"
name: judging
version: 1
steps:
  - id: judge
    kind: agent
    agent: judge
    prompt: "{{ input }}"
"#;

async fn answers_that_do_not_fit_the_output_schema_fail_the_step(store: &Store) {
    let extra = r#"
[[providers.scripted.rules]]
agent = "judge"
contains = "bad"
reply = '{"verdict": "maybe"}'

[[providers.scripted.rules]]
agent = "judge"
reply = '{"verdict": "approve"}'

[agents.judge]
description = "Approves or rejects."
route = ["scripted/judge"]
[agents.judge.output_schema]
type = "object"
required = ["verdict"]
properties.verdict = { enum = ["approve", "reject"] }
"#;
    let h = Harness::new(store, &[JUDGING], extra).await;
    let good = h.create("judging", "a good change").await;
    let bad = h.create("judging", "a bad change").await;
    h.settle().await;
    let good = h.runtime.task(&good).await.unwrap();
    assert_eq!(
        good.task.result.map(|r| r.json()),
        Some(json!({ "verdict": "approve" }))
    );
    let bad = h.runtime.task(&bad).await.unwrap();
    assert_eq!(bad.task.status, TaskStatus::Failed);
    let error = bad.task.error.unwrap().text().to_owned();
    assert!(error.contains("does not fit its output schema"), "{error}");
    assert!(error.contains("/verdict"), "{error}");
}

for_each_backend!(
    answers_that_do_not_fit_the_output_schema_fail_the_step,
    agents_call_their_tools_and_every_call_is_recorded,
    the_dev_pipeline_runs_to_completion_with_replies_and_model_calls,
    neo_core_decomposes_into_child_runs_and_joins_them,
    a_failed_step_is_retried_with_its_escalation_and_every_call_recorded,
    timers_signals_and_wait_timeouts,
    cancelling_a_task_cancels_its_run_children_and_queued_steps,
    bad_requests_are_refused_clearly,
    a_persons_data_is_erased_when_their_retention_ends,
    schedules_fire_each_moment_once_and_start_its_task,
    missed_moments_are_caught_up_by_policy,
);

async fn a_persons_data_is_erased_when_their_retention_ends(store: &Store) {
    let policy: stele_privacy::Policy =
        toml::from_str("[retention]\nprocessing = \"1s\"\nmemory = \"1h\"").unwrap();
    let h = Harness::build(store, &[], "", policy, true).await;
    let task = h
        .create("assistant", "remember my address: 12 Elm St")
        .await;
    let subjects = h.runtime.subjects().unwrap().clone();
    let view = h.runtime.task(&task).await.unwrap();
    let subject = view.task.subject.clone().unwrap();
    subjects
        .consent(
            &subject,
            stele_aggregates::subject::Purpose::parse("processing").unwrap(),
            true,
            None,
            stele_aggregates::channel::Channel::TELEGRAM,
            CommandMeta::new("user:42", "test"),
        )
        .await
        .unwrap();
    h.settle_until(&task, finished).await;
    // Not yet: kept for the longest purpose they consented to (processing: 1 s) after they were
    // last seen.
    assert!(subjects
        .get(&subject)
        .await
        .unwrap()
        .unwrap()
        .erased
        .is_none());
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    h.settle().await;
    let erased = subjects.get(&subject).await.unwrap().unwrap().erased;
    let erasure = erased.expect("erased when the retention ended");
    assert_eq!(erasure.by, "retention");
    let view = h.runtime.task(&task).await.unwrap();
    assert_eq!(view.task.input.text(), "[erased]");
}

fn every_second(catch_up: CatchUp, overlap: Overlap) -> ScheduleSpec {
    ScheduleSpec {
        timing: Timing::Every { seconds: 1 },
        workflow: "assistant".into(),
        input: "check in".into(),
        catch_up,
        overlap,
    }
}

/// Settles and waits (on the real clock) until `name` has fired `fired` times.
async fn until_fired(h: &Harness, name: &str, fired: u64) -> Schedule {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        h.settle().await;
        let schedule = h.runtime.schedule(name).await.unwrap().unwrap();
        if schedule.fired >= fired {
            return schedule;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} fired {} times, not {fired}",
            schedule.fired
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The moments a schedule fired, from its events.
async fn fired_moments(h: &Harness, name: &str) -> Vec<chrono::DateTime<Utc>> {
    let stream = stele_engine::StreamId::new("schedule", name);
    h.log
        .read_stream(&stream, 0)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|e| match serde_json::from_value(e.payload).unwrap() {
            ScheduleEvent::ScheduleFired { due, .. } => Some(due),
            _ => None,
        })
        .collect()
}

async fn schedules_fire_each_moment_once_and_start_its_task(store: &Store) {
    let h = Harness::build(store, &[], "", stele_privacy::Policy::default(), true).await;
    let meta = || CommandMeta::new("user:ops", "test");
    let created = h
        .runtime
        .create_schedule("beat", every_second(CatchUp::Latest, Overlap::Skip), meta())
        .await
        .unwrap();
    assert_eq!(created.status, ScheduleStatus::Active);
    // A workflow that does not exist, a name taken: refused, nothing recorded.
    let mut unknown = every_second(CatchUp::Latest, Overlap::Skip);
    unknown.workflow = "nope".into();
    assert!(matches!(
        h.runtime.create_schedule("other", unknown, meta()).await,
        Err(RuntimeError::UnknownWorkflow { .. })
    ));
    assert!(matches!(
        h.runtime
            .create_schedule("beat", every_second(CatchUp::Latest, Overlap::Skip), meta())
            .await,
        Err(RuntimeError::Schedule(ScheduleError::AlreadyExists))
    ));

    let schedule = until_fired(&h, "beat", 3).await;
    let moments = fired_moments(&h, "beat").await;
    assert_eq!(moments.len() as u64, schedule.fired);
    let mut distinct = moments.clone();
    distinct.dedup();
    assert_eq!(distinct, moments, "each moment fires once");
    // Each fired moment has its task, which ran its workflow (no person's: nothing sealed).
    h.settle().await;
    for due in &moments {
        let id = scheduled_task_id("beat", *due);
        let view = h.runtime.task(id.as_str()).await.unwrap();
        assert!(finished(&view), "{view:#?}");
        assert_eq!(view.task.input.text(), "check in");
        assert_eq!(view.task.workflow.as_deref(), Some("assistant"));
        assert!(view.task.subject.is_none());
    }

    // A repeated timer and a repeated start for a moment that fired: no change, no second task.
    let last = *moments.last().unwrap();
    for kind in [SCHEDULE_TICK_JOB, SCHEDULE_START_JOB] {
        h.store_queue
            .enqueue(vec![stele_engine::queue::NewJob::new(
                "workflows",
                kind,
                json!({ "schedule": "beat", "due": last }),
            )])
            .await
            .unwrap();
    }
    let paused = h.runtime.pause_schedule("beat", meta()).await.unwrap();
    assert_eq!(paused.status, ScheduleStatus::Paused);
    h.settle().await;
    let fired = h.runtime.schedule("beat").await.unwrap().unwrap().fired;
    assert_eq!(fired_moments(&h, "beat").await.len() as u64, fired);
    // Paused: no moment fires.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    h.settle().await;
    assert_eq!(
        h.runtime.schedule("beat").await.unwrap().unwrap().fired,
        fired
    );
    // Resumed: it fires again, from now on (nothing caught up for the pause).
    let resumed = h.runtime.resume_schedule("beat", meta()).await.unwrap();
    assert!(resumed.next_due.unwrap() > Utc::now() - chrono::Duration::seconds(1));
    let after = until_fired(&h, "beat", fired + 1).await;
    assert_eq!(after.skipped, 0);
    // Removed: for good.
    h.runtime.remove_schedule("beat", meta()).await.unwrap();
    let count = h.runtime.schedule("beat").await.unwrap().unwrap().fired;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    h.settle().await;
    let removed = h.runtime.schedule("beat").await.unwrap().unwrap();
    assert_eq!(
        (removed.status, removed.fired),
        (ScheduleStatus::Removed, count)
    );
    assert!(matches!(
        h.runtime.resume_schedule("beat", meta()).await,
        Err(RuntimeError::Schedule(ScheduleError::Removed))
    ));
}

async fn missed_moments_are_caught_up_by_policy(store: &Store) {
    let h = Harness::build(store, &[], "", stele_privacy::Policy::default(), true).await;
    let meta = || CommandMeta::new("user:ops", "test");
    for (name, catch_up) in [
        ("latest", CatchUp::Latest),
        ("all", CatchUp::All),
        ("skip", CatchUp::Skip),
    ] {
        h.runtime
            .create_schedule(name, every_second(catch_up, Overlap::Allow), meta())
            .await
            .unwrap();
    }
    // No node runs for 3.5 s: three moments are missed.
    tokio::time::sleep(std::time::Duration::from_millis(3500)).await;
    h.settle().await;
    let latest = h.runtime.schedule("latest").await.unwrap().unwrap();
    assert_eq!(latest.fired, 1, "{latest:?}");
    assert!(latest.skipped >= 2, "{latest:?}");
    let all = h.runtime.schedule("all").await.unwrap().unwrap();
    assert!(all.fired >= 3, "{all:?}");
    assert_eq!(all.skipped, 0, "{all:?}");
    let skip = h.runtime.schedule("skip").await.unwrap().unwrap();
    assert_eq!(skip.fired, 0, "{skip:?}");
    assert!(skip.skipped >= 3, "{skip:?}");
    // Every moment is accounted for: fired + skipped covers each second since creation.
    for schedule in [&latest, &all, &skip] {
        let next = schedule.next_due.unwrap();
        assert!(
            next > Utc::now() - chrono::Duration::seconds(2),
            "{schedule:?}"
        );
    }
}
