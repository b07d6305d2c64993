//! `stele bench workflow`: runs of the shipped `bench` workflow (five no-op agent steps on the
//! scripted model), end to end: task created → routed → run started → every step a job and its
//! events → run completed → task completed. Reports steps per second and task latency.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use stele_aggregates::task::{Requester, TaskInput};
use stele_engine::log::{subscribe, SubscriptionOptions};
use stele_engine::process::as_projection;
use stele_engine::projection::ProjectionRunner;
use stele_engine::queue::worker::WorkerOptions;
use stele_engine::{CommandMeta, Position};
use stele_workflows::runtime::QUEUE;
use tokio::sync::{watch, Mutex, Semaphore};

use super::{Latency, Machine, Scratch, Targets};
use crate::node::WorkflowArgs;

/// Steps in the `bench` workflow.
const STEPS: usize = 5;

#[derive(Args)]
pub struct WorkflowBenchArgs {
    #[command(flatten)]
    targets: Targets,
    /// Runs to complete.
    #[arg(long, default_value_t = 2000)]
    runs: usize,
    /// Runs in flight at once (tasks created but not completed).
    #[arg(long, default_value_t = 200)]
    in_flight: usize,
    /// Step jobs running at once in the worker.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
}

#[derive(Serialize)]
pub struct Report {
    scenario: &'static str,
    date: String,
    machine: Machine,
    results: Vec<Figure>,
}

#[derive(Serialize)]
pub struct Figure {
    backend: &'static str,
    runs: usize,
    steps_per_run: usize,
    in_flight: usize,
    concurrency: usize,
    seconds: f64,
    runs_per_sec: f64,
    steps_per_sec: f64,
    events: i64,
    /// Task created → task completed.
    task_latency: Latency,
    /// PostgreSQL only: the server's write-ahead-log flushes (`pg_stat_wal.wal_sync`, the
    /// fsyncs a commit waits for) and the scratch database's commits (`xact_commit`, reads
    /// included) during the runs, per run. The server's other databases count too: measure on
    /// a quiet server.
    #[serde(skip_serializing_if = "Option::is_none")]
    flushes_per_run: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    commits_per_run: Option<f64>,
}

/// The server's WAL flushes and the database's commits so far (PostgreSQL's statistics, which
/// backends report at most once a second, and when they end).
async fn flushes_and_commits(url: &str) -> anyhow::Result<(i64, i64)> {
    use sqlx::{ConnectOptions, Connection};
    let mut conn = sqlx::postgres::PgConnectOptions::from_str(url)?
        .connect()
        .await?;
    let flushes: i64 = sqlx::query_scalar("SELECT wal_sync FROM pg_stat_wal")
        .fetch_one(&mut conn)
        .await?;
    let commits: i64 = sqlx::query_scalar(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(&mut conn)
    .await?;
    conn.close().await?;
    Ok((flushes, commits))
}

pub async fn run(args: WorkflowBenchArgs) -> anyhow::Result<Report> {
    let mut results = Vec::new();
    for (backend, scratch) in args.targets.scratches().await? {
        let figure = measure(&scratch, backend, &args).await;
        scratch.remove().await;
        results.push(figure?);
    }
    Ok(Report {
        scenario: "workflow",
        date: chrono::Utc::now().to_rfc3339(),
        machine: Machine::this(),
        results,
    })
}

async fn measure(
    scratch: &Scratch,
    backend: &'static str,
    args: &WorkflowBenchArgs,
) -> anyhow::Result<Figure> {
    // As a node runs: people's data sealed, tasks kept as their requesters'.
    let (store, runtime) = scratch.node(&WorkflowArgs::default()).await?;
    let runner = Arc::new(ProjectionRunner::new(
        &store,
        vec![as_projection(runtime.manager(), store.queue.clone())],
    ));
    runner.setup().await?;
    let (stop, stopped) = watch::channel(false);
    let until_stopped = || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };
    let manager = tokio::spawn(runner.run(until_stopped()));
    let worker = runtime.worker(WorkerOptions {
        concurrency: args.concurrency,
        claim_batch: args.concurrency * 2,
        prefetch: args.concurrency,
        ..WorkerOptions::new(QUEUE)
    });
    let workers = tokio::spawn(worker.run(until_stopped()));
    let counted = match scratch.url() {
        Some(url) => {
            // Let the set-up's statistics reach the server first.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            Some(flushes_and_commits(url).await?)
        }
        None => None,
    };

    // Completions are read from the log: each TaskCompleted frees a slot for a new task.
    let slots = Arc::new(Semaphore::new(args.in_flight));
    let created: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let watcher = {
        let (slots, created, log) = (slots.clone(), created.clone(), store.log.clone());
        let runs = args.runs;
        tokio::spawn(async move {
            let mut subscription = subscribe(log, Position::START, SubscriptionOptions::default());
            let mut latencies = Vec::with_capacity(runs);
            while latencies.len() < runs {
                let event = subscription.next().await?;
                if event.event_type == "TaskCompleted" || event.event_type == "TaskFailed" {
                    anyhow::ensure!(
                        event.event_type == "TaskCompleted",
                        "a bench task failed: {}",
                        event.payload
                    );
                    if let Some(at) = created.lock().await.remove(&event.stream.aggregate_id) {
                        latencies.push(at.elapsed());
                        slots.add_permits(1);
                    }
                }
            }
            anyhow::Ok(latencies)
        })
    };
    // Tasks are created by several clients at once, as an API under load would.
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let (slots, created, runtime, next) = (
            slots.clone(),
            created.clone(),
            runtime.clone(),
            next.clone(),
        );
        let runs = args.runs;
        clients.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= runs {
                    return anyhow::Ok(());
                }
                slots.acquire().await?.forget();
                let meta = CommandMeta::new("bench", "bench");
                created
                    .lock()
                    .await
                    .insert(meta.command_id.to_string(), Instant::now());
                runtime
                    .create_task(
                        TaskInput::parse(format!("run {i}"))?,
                        Requester::parse("bench", "bench")?,
                        Some("bench".into()),
                        meta,
                    )
                    .await?;
            }
        });
    }
    while let Some(client) = clients.join_next().await {
        client??;
    }
    let latencies = tokio::time::timeout(Duration::from_secs(600), watcher).await???;
    let seconds = started.elapsed().as_secs_f64();
    let _ = stop.send(true);
    workers.await??;
    manager.await??;
    let events = store.log.head().await?.0;
    store.close().await;
    let (flushes_per_run, commits_per_run) = match (scratch.url(), counted) {
        (Some(url), Some((flushes, commits))) => {
            // Closed connections have reported their statistics.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (flushes_after, commits_after) = flushes_and_commits(url).await?;
            let per_run = |n: i64| Some((n as f64 / args.runs as f64 * 10.0).round() / 10.0);
            (
                per_run(flushes_after - flushes),
                per_run(commits_after - commits),
            )
        }
        _ => (None, None),
    };
    Ok(Figure {
        backend,
        runs: args.runs,
        steps_per_run: STEPS,
        in_flight: args.in_flight,
        concurrency: args.concurrency,
        seconds: (seconds * 1000.0).round() / 1000.0,
        runs_per_sec: (args.runs as f64 / seconds).round(),
        steps_per_sec: ((args.runs * STEPS) as f64 / seconds).round(),
        events,
        task_latency: Latency::of(latencies),
        flushes_per_run,
        commits_per_run,
    })
}
