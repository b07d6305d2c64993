//! The memory for agents, end to end on both stores: a workflow whose agent stores a fact with
//! the `memory.store` tool and finds it with `memory.search`, a step whose prompt receives
//! remembered context within its token budget, a step whose output is remembered; another
//! person's run recalls none of it, and an erasure forgets all of it.

mod support;

use std::sync::Arc;

use chrono::Utc;
use serde_json::Value;
use stele_aggregates::subject::Identifier;
use stele_aggregates::task::{Requester, TaskInput, TaskStatus};
use stele_engine::process::as_projection;
use stele_engine::projection::ProjectionRunner;
use stele_engine::queue::worker::{Worker, WorkerOptions};
use stele_engine::{CommandMeta, Store};
use stele_memory::{Filter, Memories, Mode, Scope, Search};
use stele_models::{ManualClock, ModelRouter, ModelsConfig};
use stele_workflows::agents::ModelAgents;
use stele_workflows::catalog::{self, Source};
use stele_workflows::runtime::Runtime;
use stele_workflows::tools::Tools;
use support::model;

/// The memory agent stores what it is told to remember, and searches when asked to recall;
/// Vox answers with the context it is given (the scripted model echoes its prompt).
const RULES: &str = r#"
[[providers.scripted.rules]]
agent = "memory"
contains = "Remember:"
times = 1
tool_calls = [{ name = "memory.store", arguments = { content = "Ana's favourite tea is sencha, brewed at 70 degrees", importance = 0.9, tags = ["preference"], key = "tea" } }]

[[providers.scripted.rules]]
agent = "memory"
contains = "Remember:"
reply = "noted"

[[providers.scripted.rules]]
agent = "memory"
contains = "Recall:"
times = 1
tool_calls = [{ name = "memory.search", arguments = { query = "which tea does she like", limit = 3 } }]

[[providers.scripted.rules]]
agent = "memory"
contains = "Recall:"
reply = "recalled"
"#;

const REMEMBER: &str = r#"
name: remember
version: 1
steps:
  - id: note
    kind: agent
    agent: memory
    prompt: "{{ input }}"
  - id: answer
    kind: agent
    agent: vox
    prompt: "Answer: {{ input }}"
    memory:
      context: 120
      query: "tea preferences"
      remember: true
      importance: 0.7
      tags: [answer]
"#;

struct Harness {
    runtime: Arc<Runtime>,
    runner: ProjectionRunner,
    worker: Worker,
    memories: Arc<Memories>,
    subjects: Arc<stele_privacy::Subjects>,
}

impl Harness {
    async fn new(store: &Store) -> Harness {
        let private = stele_privacy::private_store(
            store,
            &stele_privacy::Kek::generate(),
            stele_privacy::Policy::default(),
        )
        .await
        .unwrap();
        let store = &private.store;
        let memories = Arc::new(Memories::new(
            store,
            model(),
            private.subjects.sealer().clone(),
        ));
        let config = include_str!("../../models/agents.toml").replacen(
            "[providers.scripted]\nkind = \"scripted\"\n",
            &format!("[providers.scripted]\nkind = \"scripted\"\n{RULES}\n"),
            1,
        );
        let router = ModelRouter::new(ModelsConfig::from_toml_str(&config).unwrap()).unwrap();
        let tools = stele_memory::agents::register(Tools::builtin(), memories.clone());
        let mut sources = catalog::builtin();
        sources.push(Source {
            file: "remember.yaml".into(),
            yaml: REMEMBER.into(),
        });
        let catalog = catalog::build(&sources, &|a| router.agent(a).is_some(), &|t| {
            tools.contains(t)
        })
        .unwrap();
        let agents = Arc::new(ModelAgents::new(router, tools.clone()));
        let runtime = Arc::new(
            Runtime::new(store, catalog, agents, tools)
                .with_subjects(private.subjects.clone())
                .with_recall(memories.clone())
                .with_clock(Arc::new(ManualClock::at(
                    Utc::now() - chrono::Duration::hours(1),
                ))),
        );
        let runner = ProjectionRunner::new(
            store,
            vec![
                as_projection(runtime.manager(), store.queue.clone()),
                memories.projection(),
            ],
        );
        runner.setup().await.unwrap();
        let worker = runtime.worker(WorkerOptions::new("workflows"));
        Harness {
            runtime,
            runner,
            worker,
            memories,
            subjects: private.subjects.clone(),
        }
    }

    /// Steps the projections and the worker until neither has anything left to do.
    async fn settle(&self) {
        for _ in 0..500 {
            let mut read = 0;
            for name in self.runner.names() {
                read += self.runner.step(name).await.unwrap().read;
            }
            if read == 0 && self.worker.step().await.unwrap() == 0 {
                return;
            }
        }
        panic!("the runtime did not settle");
    }

    /// Runs `input` for telegram user `user` to its end; the completed task's steps.
    async fn run(&self, user: &str, input: &str) -> (String, stele_workflows::runtime::TaskView) {
        let created = self
            .runtime
            .create_task(
                TaskInput::parse(input).unwrap(),
                Requester::parse(user, "telegram").unwrap(),
                Some("remember".into()),
                CommandMeta::new(format!("user:{user}"), "test"),
            )
            .await
            .unwrap();
        let task_id = created.task_id().to_string();
        self.settle().await;
        let view = self.runtime.task(&task_id).await.unwrap();
        assert_eq!(view.task.status, TaskStatus::Completed, "{view:#?}");
        (task_id, view)
    }

    async fn subject(&self, user: &str) -> String {
        self.subjects
            .find(&Identifier::parse(&format!("telegram:{user}")).unwrap())
            .await
            .unwrap()
            .expect("the requester became a subject")
    }
}

fn step_text(view: &stele_workflows::runtime::TaskView, step: &str, field: &str) -> String {
    let state = view.run.as_ref().unwrap().step(step).unwrap();
    let value = match field {
        "input" => state.input.clone(),
        _ => state.output.clone(),
    };
    match value {
        Some(Value::String(text)) => text,
        other => panic!("{step}.{field}: {other:?}"),
    }
}

async fn agents_store_search_and_receive_context(store: &Store) {
    let h = Harness::new(store).await;
    let (_, first) = h.run("42", "Remember: Ana likes sencha").await;
    // The agent's `memory.store` became Ana's fact, which the next step's prompt received.
    let answer = step_text(&first, "answer", "input");
    assert!(
        answer.starts_with("What you remember that may bear on this")
            && answer.contains("Ana's favourite tea is sencha")
            && answer.ends_with("Answer: Remember: Ana likes sencha"),
        "{answer}"
    );
    assert!(
        stele_memory::tokens(answer.split("\n\nAnswer:").next().unwrap()) <= 120,
        "{answer}"
    );
    let ana = h.subject("42").await;
    let hers = Filter {
        scope: Scope {
            subject: Some(ana.clone()),
            ..Scope::default()
        },
        ..Filter::default()
    };
    let found = h
        .memories
        .search(&Search {
            query: "tea".into(),
            filter: hers.clone(),
            limit: 10,
            mode: Mode::Hybrid,
        })
        .await
        .unwrap();
    let fact = found.iter().find(|h| h.kind == "fact").expect("the fact");
    assert_eq!(
        (
            fact.agent.as_deref(),
            fact.workflow.as_deref(),
            fact.key.as_deref()
        ),
        (Some("memory"), Some("remember"), Some("tea"))
    );
    // The answer step's output was remembered too, as hers, citing its event.
    let step = found
        .iter()
        .find(|h| h.kind == "step")
        .expect("the step output");
    assert_eq!(step.agent.as_deref(), Some("vox"));
    assert_eq!(step.tags, vec!["answer".to_owned()]);
    assert!((step.importance - 0.7).abs() < 1e-6);
    assert_eq!(step.sources.len(), 1);
    assert!(step.content.contains("Answer: Remember"), "{step:?}");

    // `memory.search` finds her fact for her next run.
    let (task, _) = h.run("42", "Recall: what tea?").await;
    let history = stele_privacy::export::plainly(
        &serde_json::to_value(h.runtime.history(&task).await.unwrap()).unwrap(),
    );
    let text = history.to_string();
    assert!(
        text.contains("memory.search") && text.contains("brewed at 70 degrees"),
        "{text}"
    );

    // Someone else's run recalls nothing of hers, by context or by tool.
    let (task, other) = h.run("43", "Recall: what tea?").await;
    let prompt = step_text(&other, "answer", "input");
    assert!(!prompt.contains("sencha"), "{prompt}");
    let history = stele_privacy::export::plainly(
        &serde_json::to_value(h.runtime.history(&task).await.unwrap()).unwrap(),
    );
    assert!(!history.to_string().contains("brewed"), "{history}");

    // Erased: none of what her runs remembered is found again.
    h.subjects
        .erase(
            &ana,
            "operator",
            "art. 17",
            CommandMeta::new("user:op", "test"),
        )
        .await
        .unwrap();
    h.settle().await;
    let found = h
        .memories
        .search(&Search {
            query: "sencha tea Ana".into(),
            filter: Filter::default(),
            limit: 20,
            mode: Mode::Hybrid,
        })
        .await
        .unwrap();
    assert!(
        found
            .iter()
            .all(|hit| hit.subject.as_deref() != Some(ana.as_str())
                && !hit.content.contains("sencha")),
        "{found:?}"
    );
}

/// Agents in a room remember in their own scopes: what one said comes back to it on its next
/// turn, and not to the others.
async fn room_agents_remember_in_their_own_scopes(store: &Store) {
    use stele_aggregates::room::{RoomCommand, Seat, TurnPolicy};
    let h = Harness::new(store).await;
    let meta = || CommandMeta::new("user:op", "test");
    let seat = |name: &str| Seat {
        name: name.into(),
        role: "vox".into(),
        personality: String::new(),
        traits: vec![],
        memory: None,
        model: None,
    };
    let create = RoomCommand::Create {
        name: "lab".into(),
        topic: "a name for the cat".into(),
        agents: vec![seat("ada"), seat("bob")],
        moderators: vec!["mia".into()],
        policy: TurnPolicy::RoundRobin,
        turns_per_hour: 60,
    };
    h.runtime.room_command("lab", create, meta()).await.unwrap();
    let post = RoomCommand::Post {
        from: "mia".into(),
        subject: None,
        text: "Shall we call the cat Biscuit?".into(),
        at: h.runtime.now(),
    };
    h.runtime.room_command("lab", post, meta()).await.unwrap();
    let first = h.runtime.room_turn("lab", meta()).await.unwrap().unwrap();
    assert_eq!(first.agent, "ada");
    assert!(!first.text.contains("What you remember"), "{}", first.text);
    h.settle().await;
    let remembered = h
        .memories
        .search(&Search {
            query: "Biscuit".into(),
            filter: Filter {
                scope: Scope {
                    agent: Some("room:lab:ada".into()),
                    ..Scope::default()
                },
                ..Filter::default()
            },
            limit: 5,
            mode: Mode::Hybrid,
        })
        .await
        .unwrap();
    assert!(
        remembered.iter().any(|hit| hit.kind == "room"),
        "{remembered:?}"
    );
    // Bob has no memory of Ada's words; Ada, on her next turn, has.
    let second = h.runtime.room_turn("lab", meta()).await.unwrap().unwrap();
    assert_eq!(second.agent, "bob");
    assert!(
        !second.text.contains("What you remember"),
        "{}",
        second.text
    );
    h.settle().await;
    let third = h.runtime.room_turn("lab", meta()).await.unwrap().unwrap();
    assert_eq!(third.agent, "ada");
    let memory = third
        .text
        .split("What you remember:")
        .nth(1)
        .unwrap_or_else(|| panic!("{}", third.text));
    assert!(memory.contains("Biscuit"), "{}", third.text);
}

stele_engine::for_each_backend!(
    agents_store_search_and_receive_context,
    room_agents_remember_in_their_own_scopes
);
