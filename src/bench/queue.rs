//! `stele bench queue` (throughput of no-op jobs) and `stele bench latency` (pickup latency on
//! an idle worker, from the enqueue call to the handler starting).

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use serde_json::json;
use stele_engine::queue::worker::{Done, Worker, WorkerOptions};
use stele_engine::queue::NewJob;
use stele_engine::store::{Migrate, Store};
use tokio::sync::{mpsc, oneshot};

use super::{Latency, Machine, Scratch, Targets};

#[derive(Args)]
pub struct QueueArgs {
    #[command(flatten)]
    targets: Targets,
    /// No-op jobs to run.
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,
    /// Jobs running at once.
    #[arg(long, default_value_t = 24)]
    concurrency: usize,
    /// Jobs claimed ahead and kept ready in the worker.
    #[arg(long, default_value_t = 1000)]
    prefetch: usize,
}

#[derive(Args)]
pub struct LatencyArgs {
    #[command(flatten)]
    targets: Targets,
    /// Jobs enqueued one after another, each after the previous one started.
    #[arg(long, default_value_t = 300)]
    samples: usize,
}

#[derive(Serialize)]
pub struct Report<F> {
    scenario: &'static str,
    date: String,
    machine: Machine,
    results: Vec<F>,
}

#[derive(Serialize)]
pub struct Throughput {
    backend: &'static str,
    jobs: usize,
    concurrency: usize,
    prefetch: usize,
    seconds: f64,
    jobs_per_sec: f64,
}

#[derive(Serialize)]
pub struct Pickup {
    backend: &'static str,
    samples: usize,
    latency: Latency,
}

async fn scratches(targets: &Targets) -> anyhow::Result<Vec<(&'static str, Scratch)>> {
    let mut list = Vec::new();
    if let Some(url) = &targets.database_url {
        list.push(("postgres", Scratch::postgres(url).await?));
    }
    if !targets.no_sqlite {
        list.push(("sqlite", Scratch::sqlite(targets.scratch_dir.as_ref())?));
    }
    Ok(list)
}

pub async fn throughput(args: QueueArgs) -> anyhow::Result<Report<Throughput>> {
    let mut results = Vec::new();
    for (backend, scratch) in scratches(&args.targets).await? {
        let figure = run_throughput(&scratch, backend, &args).await;
        scratch.remove().await;
        results.push(figure?);
    }
    Ok(Report {
        scenario: "queue",
        date: chrono::Utc::now().to_rfc3339(),
        machine: Machine::this(),
        results,
    })
}

async fn run_throughput(
    scratch: &Scratch,
    backend: &'static str,
    args: &QueueArgs,
) -> anyhow::Result<Throughput> {
    let store = Store::open(scratch.location.clone(), Migrate::Apply).await?;
    for chunk in (0..args.jobs).collect::<Vec<_>>().chunks(1000) {
        store
            .queue
            .enqueue(
                chunk
                    .iter()
                    .map(|i| NewJob::new("bench", "noop", json!({ "i": i })))
                    .collect(),
            )
            .await?;
    }
    let (done, mut finished) = mpsc::unbounded_channel::<()>();
    let worker = Worker::new(
        store.queue.clone(),
        WorkerOptions {
            concurrency: args.concurrency,
            prefetch: args.prefetch,
            claim_batch: args.prefetch.max(args.concurrency),
            ..WorkerOptions::new("bench")
        },
    )
    .handle("noop", move |_| {
        let done = done.clone();
        async move {
            let _ = done.send(());
            Ok(Done::Complete)
        }
    });
    let started = Instant::now();
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    for _ in 0..args.jobs {
        finished.recv().await;
    }
    let _ = stop.send(());
    running.await??;
    // Counted when every outcome is recorded (the worker flushes them before it returns).
    let seconds = started.elapsed().as_secs_f64();
    store.close().await;
    Ok(Throughput {
        backend,
        jobs: args.jobs,
        concurrency: args.concurrency,
        prefetch: args.prefetch,
        seconds: (seconds * 1000.0).round() / 1000.0,
        jobs_per_sec: (args.jobs as f64 / seconds).round(),
    })
}

pub async fn latency(args: LatencyArgs) -> anyhow::Result<Report<Pickup>> {
    let mut results = Vec::new();
    for (backend, scratch) in scratches(&args.targets).await? {
        let figure = run_latency(&scratch, backend, args.samples).await;
        scratch.remove().await;
        results.push(figure?);
    }
    Ok(Report {
        scenario: "latency",
        date: chrono::Utc::now().to_rfc3339(),
        machine: Machine::this(),
        results,
    })
}

async fn run_latency(
    scratch: &Scratch,
    backend: &'static str,
    samples: usize,
) -> anyhow::Result<Pickup> {
    let store = Arc::new(Store::open(scratch.location.clone(), Migrate::Apply).await?);
    let (started, mut starts) = mpsc::unbounded_channel::<Instant>();
    let worker = Worker::new(
        store.queue.clone(),
        WorkerOptions {
            concurrency: 4,
            poll_interval: Duration::from_secs(5),
            ..WorkerOptions::new("latency")
        },
    )
    .handle("ping", move |_| {
        let started = started.clone();
        async move {
            let _ = started.send(Instant::now());
            Ok(Done::Complete)
        }
    });
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    let mut latencies = Vec::with_capacity(samples);
    for i in 0..samples + 20 {
        // Let the worker go idle (waiting for a wake-up) before each enqueue.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let begun = Instant::now();
        store
            .queue
            .enqueue(vec![NewJob::new("latency", "ping", json!({}))])
            .await?;
        let picked = starts.recv().await.expect("the worker runs");
        if i >= 20 {
            latencies.push(picked - begun);
        }
    }
    let _ = stop.send(());
    running.await??;
    store.close().await;
    Ok(Pickup {
        backend,
        samples,
        latency: Latency::of(latencies),
    })
}
