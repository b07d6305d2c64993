//! The command runner on both backends: optimistic concurrency with retries, idempotent command
//! ids, upcasting of old event versions, and cqrs-es's own framework on our repository.

mod support;

use support::for_each_backend;

use std::collections::HashMap;
use std::sync::Arc;

use cqrs_es::event_sink::EventSink;
use cqrs_es::persist::{PersistedEventStore, SemanticVersionEventUpcaster};
use cqrs_es::{Aggregate, CqrsFramework, DomainEvent};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use stele_engine::command::Executed;
use stele_engine::process::{as_projection, ProcessManager};
use stele_engine::projection::{ProjectionRunner, Stepped};
use stele_engine::queue::{JobFilter, NewJob};
use stele_engine::repository::LogRepository;
use stele_engine::{
    AppendRequest, CommandBus, CommandError, CommandMeta, NewEvent, RecordedEvent, Store, StreamId,
};
use uuid::Uuid;

/// A small aggregate whose first event has two versions: v1 had no priority.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Note {
    title: Option<String>,
    priority: Option<String>,
    lines: Vec<String>,
}

#[derive(Clone, Debug)]
enum NoteCommand {
    Create { title: String },
    AddLine { line: String },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum NoteEvent {
    Created { title: String, priority: String },
    LineAdded { line: String },
}

impl DomainEvent for NoteEvent {
    fn event_type(&self) -> String {
        match self {
            NoteEvent::Created { .. } => "Created".into(),
            NoteEvent::LineAdded { .. } => "LineAdded".into(),
        }
    }

    fn event_version(&self) -> String {
        match self {
            NoteEvent::Created { .. } => "2.0".into(),
            NoteEvent::LineAdded { .. } => "1.0".into(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
enum NoteError {
    #[error("the note exists already")]
    Exists,
    #[error("no such note")]
    Missing,
}

impl Aggregate for Note {
    const TYPE: &'static str = "note";
    type Command = NoteCommand;
    type Event = NoteEvent;
    type Error = NoteError;
    type Services = ();

    async fn handle(
        &mut self,
        command: NoteCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), NoteError> {
        match command {
            NoteCommand::Create { title } => {
                if self.title.is_some() {
                    return Err(NoteError::Exists);
                }
                sink.write(
                    NoteEvent::Created {
                        title,
                        priority: "high".into(),
                    },
                    self,
                )
                .await;
            }
            NoteCommand::AddLine { line } => {
                if self.title.is_none() {
                    return Err(NoteError::Missing);
                }
                sink.write(NoteEvent::LineAdded { line }, self).await;
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: NoteEvent) {
        match event {
            NoteEvent::Created { title, priority } => {
                self.title = Some(title);
                self.priority = Some(priority);
            }
            NoteEvent::LineAdded { line } => self.lines.push(line),
        }
    }
}

/// v1 `Created` had only a title; v2 adds a priority, "normal" for old notes.
fn created_v1_to_v2() -> SemanticVersionEventUpcaster {
    SemanticVersionEventUpcaster::new(
        "Created",
        "2.0",
        Box::new(|mut payload: Value| {
            if let Some(created) = payload.get_mut("Created").and_then(Value::as_object_mut) {
                created.insert("priority".into(), json!("normal"));
            }
            payload
        }),
    )
}

fn bus(store: &Store) -> CommandBus<Note> {
    CommandBus::new(store.log.clone(), ()).with_upcasters(vec![Box::new(created_v1_to_v2())])
}

fn new_meta() -> CommandMeta {
    CommandMeta::new("user:1", "test")
}

async fn commands_append_events_with_their_metadata(store: &Store) {
    let bus = bus(store);
    let meta = new_meta().with_trace_id("t-9");
    let executed = bus
        .execute(
            "n1",
            NoteCommand::Create {
                title: "hello".into(),
            },
            meta.clone(),
        )
        .await
        .unwrap();
    let Executed::Appended(outcome) = executed else {
        panic!("expected appended, got {executed:?}")
    };
    assert_eq!(outcome.command_id, meta.command_id);
    let events = store
        .log
        .read_stream(&StreamId::new("note", "n1"), 0)
        .await
        .unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].metadata.command, meta);
    assert_eq!(events[0].event_type, "Created");

    let refused = bus
        .execute(
            "n1",
            NoteCommand::Create {
                title: "again".into(),
            },
            CommandMeta::new("u", "t"),
        )
        .await;
    assert!(matches!(
        refused,
        Err(CommandError::Rejected(NoteError::Exists))
    ));
    let missing = bus
        .execute(
            "nope",
            NoteCommand::AddLine { line: "x".into() },
            new_meta(),
        )
        .await;
    assert!(matches!(
        missing,
        Err(CommandError::Rejected(NoteError::Missing))
    ));
}

async fn racing_commands_are_retried_until_all_apply(store: &Store) {
    let bus = Arc::new(bus(store));
    bus.execute(
        "race",
        NoteCommand::Create { title: "r".into() },
        new_meta(),
    )
    .await
    .unwrap();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let bus = bus.clone();
            tokio::spawn(async move {
                bus.execute(
                    "race",
                    NoteCommand::AddLine {
                        line: format!("l{i}"),
                    },
                    new_meta(),
                )
                .await
            })
        })
        .collect();
    for task in tasks {
        assert!(matches!(task.await.unwrap(), Ok(Executed::Appended(_))));
    }
    let (note, version) = bus.load("race").await.unwrap();
    assert_eq!(version, 17);
    assert_eq!(note.lines.len(), 16);
}

async fn a_repeated_command_returns_its_first_outcome(store: &Store) {
    let bus = bus(store);
    let create = new_meta();
    let first = bus
        .execute(
            "idem",
            NoteCommand::Create {
                title: "once".into(),
            },
            create.clone(),
        )
        .await
        .unwrap();
    // The aggregate would now refuse it: the first outcome is returned instead of the refusal.
    let again = bus
        .execute(
            "idem",
            NoteCommand::Create {
                title: "once".into(),
            },
            create.clone(),
        )
        .await
        .unwrap();
    assert_eq!(again, Executed::Duplicate(first.outcome().unwrap().clone()));

    // A command the aggregate would accept again appends nothing the second time.
    let add = new_meta();
    let first = bus
        .execute(
            "idem",
            NoteCommand::AddLine { line: "a".into() },
            add.clone(),
        )
        .await
        .unwrap();
    let again = bus
        .execute("idem", NoteCommand::AddLine { line: "a".into() }, add)
        .await
        .unwrap();
    assert_eq!(again, Executed::Duplicate(first.outcome().unwrap().clone()));
    assert_eq!(bus.load("idem").await.unwrap().0.lines, vec!["a"]);
}

async fn creations_skip_the_read_and_fall_back_when_the_stream_exists(store: &Store) {
    let bus = bus(store);
    let meta = new_meta();
    let created = bus
        .create(
            "fresh",
            NoteCommand::Create {
                title: "new".into(),
            },
            meta.clone(),
        )
        .await
        .unwrap();
    let Executed::Appended(outcome) = &created else {
        panic!("{created:?}")
    };
    assert_eq!((outcome.first_sequence, outcome.last_sequence), (1, 1));
    // The same command again: its first outcome.
    let again = bus
        .create(
            "fresh",
            NoteCommand::Create {
                title: "new".into(),
            },
            meta,
        )
        .await
        .unwrap();
    assert_eq!(again, Executed::Duplicate(outcome.clone()));
    // Another creation of an existing stream falls back to the full path, which refuses it.
    let refused = bus
        .create(
            "fresh",
            NoteCommand::Create {
                title: "other".into(),
            },
            new_meta(),
        )
        .await;
    assert!(
        matches!(refused, Err(CommandError::Rejected(NoteError::Exists))),
        "{refused:?}"
    );
    // A command the empty aggregate refuses is decided on the loaded stream instead.
    let added = bus
        .create(
            "fresh",
            NoteCommand::AddLine { line: "l".into() },
            new_meta(),
        )
        .await
        .unwrap();
    assert!(matches!(added, Executed::Appended(_)));
    let (note, version) = bus.load("fresh").await.unwrap();
    assert_eq!((note.lines, version), (vec!["l".to_owned()], 2));
}

async fn an_old_event_version_is_upcast_on_read(store: &Store) {
    // A v1 event as an older release stored it.
    let meta = new_meta();
    store
        .log
        .append(AppendRequest {
            command_id: meta.command_id,
            stream: StreamId::new("note", "old"),
            expected_sequence: 0,
            events: vec![NewEvent {
                event_type: "Created".into(),
                event_version: "1.0".into(),
                payload: json!({ "Created": { "title": "from v1" } }),
                metadata: meta.for_event(Uuid::now_v7()),
            }],
        })
        .await
        .unwrap();
    let (note, _) = bus(store).load("old").await.unwrap();
    assert_eq!(note.title.as_deref(), Some("from v1"));
    assert_eq!(note.priority.as_deref(), Some("normal"));

    // Without the upcaster, the v1 payload is unreadable as a v2 event.
    let plain = CommandBus::<Note>::new(store.log.clone(), ());
    assert!(matches!(
        plain.load("old").await,
        Err(CommandError::Deserialize { sequence: 1, .. })
    ));
}

async fn cqrs_es_framework_runs_on_the_log(store: &Store) {
    let event_store = PersistedEventStore::<LogRepository, Note>::new_event_store(
        LogRepository::new(store.log.clone()),
    )
    .with_upcasters(vec![Box::new(created_v1_to_v2())]);
    let cqrs = CqrsFramework::new(event_store, vec![], ());
    let command_id = Uuid::now_v7().to_string();
    let metadata = HashMap::from([
        ("command_id".to_owned(), command_id.clone()),
        ("actor".to_owned(), "user:5".to_owned()),
        ("channel".to_owned(), "api".to_owned()),
    ]);
    cqrs.execute_with_metadata(
        "fw",
        NoteCommand::Create { title: "fw".into() },
        metadata.clone(),
    )
    .await
    .unwrap();
    let add = HashMap::from([("command_id".to_owned(), Uuid::now_v7().to_string())]);
    cqrs.execute_with_metadata("fw", NoteCommand::AddLine { line: "x".into() }, add.clone())
        .await
        .unwrap();
    // The same command id again: accepted, nothing appended.
    cqrs.execute_with_metadata("fw", NoteCommand::AddLine { line: "x".into() }, add)
        .await
        .unwrap();
    let events = store
        .log
        .read_stream(&StreamId::new("note", "fw"), 0)
        .await
        .unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].metadata.command.actor, "user:5");
    assert_eq!(
        events[0].metadata.command.command_id.to_string(),
        command_id
    );
    let (note, _) = bus(store).load("fw").await.unwrap();
    assert_eq!(note.lines, vec!["x"]);
}

/// One job per line added: what a reactor enqueues with the events.
struct LineWatcher;

impl ProcessManager for LineWatcher {
    fn name(&self) -> &'static str {
        "line-watcher"
    }

    fn event_types(&self) -> &'static [&'static str] {
        &["LineAdded"]
    }

    fn react(&self, event: &RecordedEvent) -> Vec<NewJob> {
        vec![NewJob::new(
            "lines",
            "line",
            json!({ "line": event.payload["LineAdded"]["line"] }),
        )]
    }
}

async fn lines(store: &Store) -> Vec<String> {
    let mut lines: Vec<String> = store
        .queue
        .list(JobFilter {
            queue: Some("lines".into()),
            limit: 1000,
            ..JobFilter::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|job| job.payload["line"].as_str().unwrap().to_owned())
        .collect();
    lines.sort();
    lines
}

async fn a_reactor_enqueues_jobs_with_the_events_and_its_manager_passes_them_by(store: &Store) {
    let reacting = Arc::new(bus(store).with_reactor(Arc::new(LineWatcher)));
    reacting
        .execute("r", NoteCommand::Create { title: "r".into() }, new_meta())
        .await
        .unwrap();
    // Racing commands: the losers' jobs go with their rolled-back appends, the retries' with
    // theirs; a repeated command enqueues nothing.
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let bus = reacting.clone();
            tokio::spawn(async move {
                let line = NoteCommand::AddLine {
                    line: format!("l{i}"),
                };
                let meta = new_meta();
                bus.execute("r", line.clone(), meta.clone()).await.unwrap();
                bus.execute("r", line, meta).await.unwrap()
            })
        })
        .collect();
    for task in tasks {
        assert!(matches!(task.await.unwrap(), Executed::Duplicate(_)));
    }
    let expected: Vec<String> = (0..8).map(|i| format!("l{i}")).collect();
    assert_eq!(lines(store).await, expected);
    let events = store
        .log
        .read_stream(&StreamId::new("note", "r"), 0)
        .await
        .unwrap();
    assert!(events
        .iter()
        .all(|e| e.metadata.reacted.as_deref() == Some("line-watcher")));
    let job = &store
        .queue
        .list(JobFilter {
            queue: Some("lines".into()),
            limit: 1,
            ..JobFilter::default()
        })
        .await
        .unwrap()[0];
    assert!(job
        .idempotency_key
        .as_deref()
        .unwrap()
        .starts_with("line-watcher:"));

    // A line added by a bus without the reactor: the manager, following the log, enqueues its
    // job, and only that one.
    bus(store)
        .execute("r", NoteCommand::AddLine { line: "m".into() }, new_meta())
        .await
        .unwrap();
    let runner = ProjectionRunner::new(
        store,
        vec![as_projection(Arc::new(LineWatcher), store.queue.clone())],
    );
    runner.setup().await.unwrap();
    while runner.step("line-watcher").await.unwrap() != (Stepped { read: 0 }) {}
    let mut expected = expected;
    expected.push("m".into());
    assert_eq!(lines(store).await, expected);
}

async fn a_cached_state_that_fell_behind_is_caught_up(store: &Store) {
    let cached = bus(store).with_state_cache(100, std::time::Duration::from_secs(60));
    let plain = bus(store);
    let add = |line: &str| NoteCommand::AddLine { line: line.into() };
    cached
        .execute("c", NoteCommand::Create { title: "c".into() }, new_meta())
        .await
        .unwrap();
    // Another writer moves the note on behind the cache's back.
    plain.execute("c", add("other"), new_meta()).await.unwrap();
    // Decided on the cached state, the append conflicts, and is decided again on the stored one.
    let mine = cached.execute("c", add("mine"), new_meta()).await.unwrap();
    assert_eq!(mine.outcome().unwrap().last_sequence, 3);
    let (note, version) = plain.load("c").await.unwrap();
    assert_eq!(
        (note.lines, version),
        (vec!["other".into(), "mine".into()], 3)
    );
    // A load reads the stored stream.
    plain.execute("c", add("third"), new_meta()).await.unwrap();
    let (note, version) = cached.load("c").await.unwrap();
    assert_eq!((note.lines.len(), version), (3, 4));

    // The latest state: the cached one with what others appended since, read from the log.
    plain.execute("c", add("fourth"), new_meta()).await.unwrap();
    let (note, version) = cached.load_latest("c").await.unwrap();
    assert_eq!((note.lines.len(), version), (4, 5));
    assert_eq!(cached.load_latest("c").await.unwrap().1, 5, "nothing newer");
    let (note, version) = plain.load_latest("c").await.unwrap();
    assert_eq!((note.lines.len(), version), (4, 5), "no cache: a load");

    // A refusal decided on a cached state is checked against the stored stream first.
    let (_, version) = cached.load("d").await.unwrap();
    assert_eq!(version, 0);
    plain
        .execute("d", NoteCommand::Create { title: "d".into() }, new_meta())
        .await
        .unwrap();
    let added = cached.execute("d", add("x"), new_meta()).await.unwrap();
    assert!(matches!(added, Executed::Appended(_)));
    // And a real refusal is still one.
    assert!(matches!(
        cached.execute("e", add("x"), new_meta()).await,
        Err(CommandError::Rejected(NoteError::Missing))
    ));
}

for_each_backend!(
    a_cached_state_that_fell_behind_is_caught_up,
    a_reactor_enqueues_jobs_with_the_events_and_its_manager_passes_them_by,
    creations_skip_the_read_and_fall_back_when_the_stream_exists,
    commands_append_events_with_their_metadata,
    racing_commands_are_retried_until_all_apply,
    a_repeated_command_returns_its_first_outcome,
    an_old_event_version_is_upcast_on_read,
    cqrs_es_framework_runs_on_the_log,
);
