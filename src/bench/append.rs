//! `stele bench append`: durable one-event commands through the command runner (load the
//! aggregate, handle, append, wait for the commit), at several concurrencies; on PostgreSQL each
//! figure is set against pgbench's one-row INSERT transactions on the same server and concurrency.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use stele_engine::store::{Migrate, Store};
use stele_engine::{CommandBus, CommandMeta};

use super::probe::{Probe, Record};
use super::{Latency, Machine, Scratch, Targets};

#[derive(Args)]
pub struct AppendArgs {
    #[command(flatten)]
    targets: Targets,
    /// Concurrent writers, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    writers: Vec<usize>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Alternating pgbench/Stele rounds per PostgreSQL figure (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The pgbench binary (default: $STELE_PG_BIN/pgbench, else pgbench on PATH).
    #[arg(long, env = "STELE_PGBENCH")]
    pgbench: Option<PathBuf>,
}

#[derive(Serialize)]
pub struct Report {
    scenario: &'static str,
    date: String,
    machine: Machine,
    seconds: u64,
    results: Vec<Figure>,
}

#[derive(Serialize)]
struct Figure {
    backend: &'static str,
    writers: usize,
    commands: u64,
    commands_per_sec: f64,
    latency: Latency,
    #[serde(skip_serializing_if = "Option::is_none")]
    pgbench_tps: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio_to_pgbench: Option<f64>,
    /// Each round's ratio, in the order run.
    #[serde(skip_serializing_if = "Option::is_none")]
    round_ratios: Option<Vec<f64>>,
}

pub async fn run(args: AppendArgs) -> anyhow::Result<Report> {
    let duration = Duration::from_secs(args.seconds.max(1));
    let mut results = Vec::new();
    if let Some(url) = &args.targets.database_url {
        for &writers in &args.writers {
            // pgbench and Stele alternate for several rounds, so that a passing disturbance of
            // this shared machine weighs on both; the round with the median ratio is reported.
            let mut rounds = Vec::new();
            for _ in 0..args.rounds.max(1) {
                let scratch = Scratch::postgres(url).await?;
                let ceiling = pgbench(
                    args.pgbench.clone(),
                    scratch.url().expect("postgres"),
                    writers,
                    duration,
                )
                .await;
                let figure = measure(&scratch, "postgres", writers, duration).await;
                scratch.remove().await;
                let mut figure = figure?;
                let ceiling = ceiling.context("running pgbench")?;
                figure.ratio_to_pgbench = Some(round(figure.commands_per_sec / ceiling, 3));
                figure.pgbench_tps = Some(round(ceiling, 0));
                rounds.push(figure);
            }
            let ratios: Vec<f64> = rounds.iter().filter_map(|f| f.ratio_to_pgbench).collect();
            rounds.sort_by(|a, b| {
                a.ratio_to_pgbench
                    .partial_cmp(&b.ratio_to_pgbench)
                    .expect("finite")
            });
            let mut median = rounds.swap_remove(rounds.len() / 2);
            median.round_ratios = Some(ratios);
            results.push(median);
        }
    }
    if !args.targets.no_sqlite {
        for &writers in &args.writers {
            let scratch = Scratch::sqlite(args.targets.scratch_dir.as_ref())?;
            let figure = measure(&scratch, "sqlite", writers, duration).await;
            scratch.remove().await;
            results.push(figure?);
        }
    }
    Ok(Report {
        scenario: "append",
        date: chrono::Utc::now().to_rfc3339(),
        machine: Machine::this(),
        seconds: duration.as_secs(),
        results,
    })
}

fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

async fn measure(
    scratch: &Scratch,
    backend: &'static str,
    writers: usize,
    duration: Duration,
) -> anyhow::Result<Figure> {
    let store = Store::open(scratch.location.clone(), Migrate::Apply).await?;
    let bus = Arc::new(CommandBus::<Probe>::new(store.log.clone(), ()));
    // Warm up connections and statement caches.
    for _ in 0..writers.max(8) {
        bus.execute(
            &uuid::Uuid::now_v7().to_string(),
            Record { value: 0 },
            CommandMeta::new("bench", "bench"),
        )
        .await?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let (bus, stop) = (bus.clone(), stop.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let begun = Instant::now();
                    // A new stream per command, as creations are: decided on the empty aggregate
                    // and appended durably, expecting a new stream (`CommandBus::create`).
                    bus.create(
                        &uuid::Uuid::now_v7().to_string(),
                        Record { value: 1 },
                        CommandMeta::new("bench", "bench"),
                    )
                    .await?;
                    latencies.push(begun.elapsed());
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
    let elapsed = started.elapsed().as_secs_f64();
    store.close().await;
    let commands = latencies.len() as u64;
    Ok(Figure {
        backend,
        writers,
        commands,
        commands_per_sec: round(commands as f64 / elapsed, 0),
        latency: Latency::of(latencies),
        pgbench_tps: None,
        ratio_to_pgbench: None,
        round_ratios: None,
    })
}

/// pgbench's rate of one-row INSERT transactions at `clients` on the scratch database.
async fn pgbench(
    binary: Option<PathBuf>,
    url: &str,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let binary = binary
        .or_else(|| std::env::var_os("STELE_PG_BIN").map(|dir| PathBuf::from(dir).join("pgbench")))
        .unwrap_or_else(|| PathBuf::from("pgbench"));
    let pool = stele_engine::store::connect_postgres(url, 1).await?;
    sqlx::query("CREATE TABLE pgbench_one_row (id bigserial PRIMARY KEY, v int NOT NULL)")
        .execute(&pool)
        .await?;
    pool.close().await;
    let script = std::env::temp_dir().join(format!(
        "stele-pgbench-{}.sql",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&script, "INSERT INTO pgbench_one_row (v) VALUES (1);\n")?;
    let output = tokio::process::Command::new(&binary)
        .args(["-n", "-M", "prepared", "-c", &clients.to_string(), "-j"])
        .arg(
            clients
                .min(std::thread::available_parallelism().map_or(2, |n| n.get()))
                .to_string(),
        )
        .args(["-T", &duration.as_secs().to_string(), "-f"])
        .arg(&script)
        .arg(url)
        .output()
        .await
        .with_context(|| format!("cannot run {}", binary.display()))?;
    let _ = std::fs::remove_file(&script);
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        anyhow::bail!(
            "pgbench failed: {}",
            String::from_utf8_lossy(&output.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    // "tps = 12345.678901 (without initial connection time)"
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("pgbench printed no tps")
}
