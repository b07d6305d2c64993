//! `stele bench replay`: how fast the global log is read from the start, in pages, as projections
//! and `stele replay` read it.

use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use serde::Serialize;
use serde_json::json;
use stele_engine::projection::ProjectionRunner;
use stele_engine::store::{Migrate, Store};
use stele_engine::{AppendRequest, CommandMeta, NewEvent, Position, StreamId};
use stele_projections::StreamsView;

use super::{Machine, Scratch, Targets};

#[derive(Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    targets: Targets,
    /// Events in the log to read.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Events per read.
    #[arg(long, default_value_t = 5_000)]
    page: usize,
}

#[derive(Serialize)]
pub struct Report {
    scenario: &'static str,
    date: String,
    machine: Machine,
    results: Vec<Figure>,
}

#[derive(Serialize)]
struct Figure {
    backend: &'static str,
    events: usize,
    page: usize,
    seconds: f64,
    events_per_sec: f64,
    /// Rebuilding the `streams` projection from the start of the log (read, apply, swap).
    rebuild_seconds: f64,
    rebuild_events_per_sec: f64,
}

pub async fn run(args: ReplayArgs) -> anyhow::Result<Report> {
    let mut results = Vec::new();
    if let Some(url) = &args.targets.database_url {
        let scratch = Scratch::postgres(url).await?;
        let figure = measure(&scratch, "postgres", &args).await;
        scratch.remove().await;
        results.push(figure?);
    }
    if !args.targets.no_sqlite {
        let scratch = Scratch::sqlite(args.targets.scratch_dir.as_ref())?;
        let figure = measure(&scratch, "sqlite", &args).await;
        scratch.remove().await;
        results.push(figure?);
    }
    Ok(Report {
        scenario: "replay",
        date: chrono::Utc::now().to_rfc3339(),
        machine: Machine::this(),
        results,
    })
}

async fn measure(
    scratch: &Scratch,
    backend: &'static str,
    args: &ReplayArgs,
) -> anyhow::Result<Figure> {
    let store = Store::open(scratch.location.clone(), Migrate::Apply).await?;
    fill(&store, args.events).await?;
    let started = Instant::now();
    let mut position = Position::START;
    let mut read = 0;
    loop {
        let batch = store.log.read_all(position, args.page).await?;
        let Some(last) = batch.last() else {
            break;
        };
        position = last.position;
        read += batch.len();
    }
    let seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        read == args.events,
        "read {read} events, expected {}",
        args.events
    );

    let runner =
        ProjectionRunner::new(&store, vec![Arc::new(StreamsView)]).with_batch_size(args.page);
    runner.setup().await?;
    let started = Instant::now();
    let rebuilt = runner.rebuild("streams", |_| {}).await?;
    let rebuild_seconds = started.elapsed().as_secs_f64();
    store.close().await;
    anyhow::ensure!(
        rebuilt.events_applied == args.events as i64,
        "rebuild applied {} events, expected {}",
        rebuilt.events_applied,
        args.events
    );
    Ok(Figure {
        backend,
        events: read,
        page: args.page,
        seconds: (seconds * 1000.0).round() / 1000.0,
        events_per_sec: (read as f64 / seconds).round(),
        rebuild_seconds: (rebuild_seconds * 1000.0).round() / 1000.0,
        rebuild_events_per_sec: (read as f64 / rebuild_seconds).round(),
    })
}

/// Appends `count` events shaped like real ones (a small payload, full metadata), 100 per
/// command, from 8 concurrent writers.
pub(super) async fn fill(store: &Store, count: usize) -> anyhow::Result<()> {
    let per_command = 100;
    let commands = count.div_ceil(per_command);
    let writers = 8;
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let log = store.log.clone();
            tokio::spawn(async move {
                let mut c = w;
                while c < commands {
                    let n = per_command.min(count - c * per_command);
                    let meta = CommandMeta::new("bench", "bench");
                    let events = (0..n)
                        .map(|i| NewEvent {
                            event_type: "MessageReceived".into(),
                            event_version: "1.0".into(),
                            payload: json!({ "chat_id": 42, "text": format!("message {i} of command {c}") }),
                            metadata: meta.for_event(uuid::Uuid::now_v7()),
                        })
                        .collect();
                    log.append(AppendRequest {
                        command_id: meta.command_id,
                        stream: StreamId::new("conversation", format!("c{c}")),
                        expected_sequence: 0,
                        events,
                    })
                    .await?;
                    c += writers;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(())
}
