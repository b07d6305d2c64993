//! `stele bench privacy`: what sealing personal data costs, and how long a person's export and
//! erasure take.
//!
//! - **Sealed appends**: one-event creations whose event holds a person's text (one of 100
//!   people, as traffic is), sealed with their key, against the same events stored plain, at
//!   the same concurrency; rounds alternate and the median ratio is reported.
//! - **Export and erasure** of one person with about 10,000 events: their tasks (each created,
//!   routed, started and completed: four events) in the log and the task list; the export
//!   reads and opens them all; the erasure destroys their key, records it, and the task list's
//!   rows of theirs are rewritten (timed until the view has applied it).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use stele_aggregates::personal::Personal;
use stele_aggregates::subject::Identifier;
use stele_aggregates::task::{Requester, Task, TaskCommand, TaskInput};
use stele_engine::projection::ProjectionRunner;
use stele_engine::store::{Migrate, Store};
use stele_engine::{CommandBus, CommandMeta};
use stele_privacy::{Kek, Policy};

use super::{Latency, Machine, Scratch, Targets};

#[derive(Args)]
pub struct PrivacyArgs {
    #[command(flatten)]
    targets: Targets,
    /// Concurrent writers of the sealed-append comparison.
    #[arg(long, default_value_t = 32)]
    writers: usize,
    /// Seconds per append measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Alternating plain/sealed rounds (the median ratio is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Events of the person exported and erased (four per task).
    #[arg(long, default_value_t = 10_000)]
    events: usize,
}

#[derive(Serialize)]
pub struct Report {
    scenario: &'static str,
    date: String,
    machine: Machine,
    appends: Vec<AppendFigure>,
    subject: Vec<SubjectFigure>,
}

#[derive(Serialize)]
struct AppendFigure {
    backend: &'static str,
    writers: usize,
    plain_per_sec: f64,
    sealed_per_sec: f64,
    /// Sealed over plain, of the median round.
    ratio: f64,
    round_ratios: Vec<f64>,
    sealed_latency: Latency,
}

#[derive(Serialize)]
struct SubjectFigure {
    backend: &'static str,
    events: u64,
    tasks: usize,
    export_ms: f64,
    /// From the request to the task list's rows rewritten.
    erase_ms: f64,
}

pub async fn run(args: PrivacyArgs) -> anyhow::Result<Report> {
    let duration = Duration::from_secs(args.seconds.max(1));
    let mut backends: Vec<(&'static str, Option<String>)> = Vec::new();
    if let Some(url) = &args.targets.database_url {
        backends.push(("postgres", Some(url.clone())));
    }
    if !args.targets.no_sqlite {
        backends.push(("sqlite", None));
    }
    let scratch = |url: Option<String>| {
        let dir = args.targets.scratch_dir.clone();
        async move {
            match url {
                Some(url) => Scratch::postgres(&url).await,
                None => Scratch::sqlite(dir.as_ref()),
            }
        }
    };
    let mut appends = Vec::new();
    let mut subject = Vec::new();
    for (backend, url) in backends {
        let mut rounds = Vec::new();
        for _ in 0..args.rounds.max(1) {
            let plain = scratch(url.clone()).await?;
            let plain_figure = appending(&plain, false, args.writers, duration).await;
            plain.remove().await;
            let sealed = scratch(url.clone()).await?;
            let sealed_figure = appending(&sealed, true, args.writers, duration).await;
            sealed.remove().await;
            let (plain_rate, _) = plain_figure?;
            let (sealed_rate, latency) = sealed_figure?;
            rounds.push((sealed_rate / plain_rate, plain_rate, sealed_rate, latency));
        }
        let ratios: Vec<f64> = rounds.iter().map(|r| round(r.0, 3)).collect();
        rounds.sort_by(|a, b| a.0.partial_cmp(&b.0).expect("finite"));
        let (ratio, plain, sealed, latency) = rounds.swap_remove(rounds.len() / 2);
        appends.push(AppendFigure {
            backend,
            writers: args.writers,
            plain_per_sec: round(plain, 0),
            sealed_per_sec: round(sealed, 0),
            ratio: round(ratio, 3),
            round_ratios: ratios,
            sealed_latency: latency,
        });
        let place = scratch(url.clone()).await?;
        let figure = export_and_erase(&place, backend, args.events).await;
        place.remove().await;
        subject.push(figure?);
    }
    Ok(Report {
        scenario: "privacy",
        date: chrono::Utc::now().to_rfc3339(),
        machine: Machine::this(),
        appends,
        subject,
    })
}

fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

/// A note holding a person's text: the sealed append's event.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Notebook;

#[derive(Clone, Debug)]
struct Write {
    subject: Option<String>,
    text: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Noted {
    text: Personal<String>,
}

impl DomainEvent for Noted {
    fn event_type(&self) -> String {
        "Noted".into()
    }

    fn event_version(&self) -> String {
        "1.0".into()
    }
}

impl Aggregate for Notebook {
    const TYPE: &'static str = "bench_notebook";
    type Command = Write;
    type Event = Noted;
    type Error = super::probe::Never;
    type Services = ();

    async fn handle(
        &mut self,
        command: Write,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        let text = Personal::owned_by(command.subject.as_deref(), command.text);
        sink.write(Noted { text }, self).await;
        Ok(())
    }

    fn apply(&mut self, _: Noted) {}
}

/// Creations per second at `writers`, and their latency; sealed or plain.
async fn appending(
    scratch: &Scratch,
    sealed: bool,
    writers: usize,
    duration: Duration,
) -> anyhow::Result<(f64, Latency)> {
    let opened = Store::open(scratch.location.clone(), Migrate::Apply).await?;
    let store = if sealed {
        stele_privacy::seal_store(&opened, &Kek::generate())
            .await?
            .0
    } else {
        Store {
            location: opened.location.clone(),
            log: opened.log.clone(),
            stored: opened.stored.clone(),
            queue: opened.queue.clone(),
            pool: opened.pool.clone(),
            reads: opened.reads.clone(),
        }
    };
    let people: Arc<Vec<String>> =
        Arc::new((0..100).map(|_| uuid::Uuid::now_v7().to_string()).collect());
    let bus = Arc::new(CommandBus::<Notebook>::new(store.log.clone(), ()));
    let text = "Please book me a table for two on Friday at eight; my number is 0612345678.";
    let command = |i: usize| Write {
        subject: sealed.then(|| people[i % people.len()].clone()),
        text: text.to_owned(),
    };
    // Warm up: connections, statement caches, and each person's key.
    for i in 0..people.len().max(writers) {
        bus.create(
            &uuid::Uuid::now_v7().to_string(),
            command(i),
            CommandMeta::new("bench", "bench"),
        )
        .await?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let (bus, stop) = (bus.clone(), stop.clone());
            let people = people.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    let begun = Instant::now();
                    let command = Write {
                        subject: sealed.then(|| people[i % people.len()].clone()),
                        text: text.to_owned(),
                    };
                    bus.create(
                        &uuid::Uuid::now_v7().to_string(),
                        command,
                        CommandMeta::new("bench", "bench"),
                    )
                    .await?;
                    latencies.push(begun.elapsed());
                    i += writers;
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let rate = latencies.len() as f64 / started.elapsed().as_secs_f64();
    opened.close().await;
    Ok((rate, Latency::of(latencies)))
}

/// One person with about `events` events: their export, then their erasure.
async fn export_and_erase(
    scratch: &Scratch,
    backend: &'static str,
    events: usize,
) -> anyhow::Result<SubjectFigure> {
    let opened = Store::open(scratch.location.clone(), Migrate::Apply).await?;
    let private =
        stele_privacy::private_store(&opened, &Kek::generate(), Policy::default()).await?;
    let store = &private.store;
    let subjects = private.subjects.clone();
    let meta = || CommandMeta::new("bench", "bench");
    let person = subjects
        .resolve(&Identifier::parse("email:someone@example.org")?, &meta())
        .await?;
    let requester = Requester::parse("someone@example.org", "email")?;
    let tasks = (events.saturating_sub(1) / 4).max(1);
    let bus = Arc::new(CommandBus::<Task>::new(store.log.clone(), ()));
    let ids: Vec<String> = (0..tasks)
        .map(|_| uuid::Uuid::now_v7().to_string())
        .collect();
    let writers = 32;
    let mut handles = Vec::new();
    for chunk in ids.chunks(tasks.div_ceil(writers)) {
        let (bus, chunk, requester, person) = (
            bus.clone(),
            chunk.to_vec(),
            requester.clone(),
            person.clone(),
        );
        handles.push(tokio::spawn(async move {
            for id in chunk {
                let input = TaskInput::parse(format!("task {id}: call me back on 0612345678"))?;
                let steps = [
                    TaskCommand::Create {
                        input,
                        requester: requester.clone(),
                        subject: Some(person.clone()),
                        workflow: None,
                        origin: None,
                        models: Default::default(),
                        screening: Default::default(),
                        routed: None,
                    },
                    TaskCommand::StartRouting,
                    TaskCommand::Route {
                        workflow: "assistant".into(),
                        run_id: id.as_str().into(),
                    },
                    TaskCommand::Complete {
                        result: serde_json::json!({ "answer": "done, I will call 0612345678" }),
                    },
                ];
                for command in steps {
                    bus.execute(&id, command, CommandMeta::new("bench", "bench"))
                        .await?;
                }
            }
            anyhow::Ok(())
        }));
    }
    for handle in handles {
        handle.await??;
    }
    let runner = ProjectionRunner::new(store, stele_projections::all()).with_batch_size(2000);
    runner.setup().await?;
    for name in ["subjects", "task_list"] {
        while runner.step(name).await?.read > 0 {}
    }

    let head = store.log.head().await?;
    let started = Instant::now();
    let bundle = subjects
        .export(store.log.as_ref(), &person, head, "bench", meta())
        .await?;
    let export_ms = started.elapsed().as_secs_f64() * 1e3;

    let runtime = crate::node::WorkflowArgs::default()
        .runtime_with(store, Some(subjects.clone()))
        .await?;
    let started = Instant::now();
    runtime
        .erase_subject(&person, "bench", "benchmark", meta())
        .await?;
    while runner.step("task_list").await?.read > 0 {}
    let erase_ms = started.elapsed().as_secs_f64() * 1e3;
    runner.release_all().await?;
    opened.close().await;
    Ok(SubjectFigure {
        backend,
        events: bundle.events.len() as u64,
        tasks,
        export_ms: round(export_ms, 1),
        erase_ms: round(erase_ms, 1),
    })
}
