//! `stele bench …`: throughput and latency scenarios. Each prints one JSON document on stdout;
//! figures are recorded in `bench/RESULTS.md`.
//!
//! Every scenario runs in scratch stores it creates and removes: a fresh database on the
//! PostgreSQL server named by `--database-url` (the role needs CREATEDB) and a fresh embedded store
//! in a temporary directory.

mod api;
mod append;
mod audit;
mod console;
mod email;
mod memory;
mod privacy;
mod probe;
mod queue;
mod replay;
mod telegram;
mod workflow;

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde::Serialize;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};
use stele_engine::store::{Migrate, Store, StoreLocation};
use stele_workflows::runtime::Runtime;

use crate::node::WorkflowArgs;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Durable one-event commands at 1, 8 and 32 concurrent writers, against pgbench's one-row
    /// insert transactions on the same server.
    Append(append::AppendArgs),
    /// Read rate of the global log, and a projection rebuilt from it.
    Replay(replay::ReplayArgs),
    /// Throughput of no-op jobs through a worker.
    Queue(queue::QueueArgs),
    /// Pickup latency of a job on an idle worker, from the enqueue call.
    Latency(queue::LatencyArgs),
    /// Runs of a five-step workflow of no-op agent steps, end to end.
    Workflow(workflow::WorkflowBenchArgs),
    /// Task creations and reads per second through the HTTP API (PostgreSQL).
    Api(api::ApiBenchArgs),
    /// Sealed against plain appends; a person's export and erasure with 10,000 events.
    Privacy(privacy::PrivacyArgs),
    /// The audit tree: sealing and verification rates, proofs, the sealer's lag under load.
    Audit(audit::AuditArgs),
    /// The memory: embedding throughput against Python, nDCG@10 of each search mode, and at
    /// 100,000 memories ingest rate, search latency and recall against exact search.
    Memory(memory::MemoryArgs),
    /// The Telegram channel end to end against a Bot API on loopback: messages answered per
    /// second from 100 chats, and delivery-to-answer latency at 100 messages/s.
    Telegram(telegram::TelegramBenchArgs),
    /// The email channel end to end against an IMAP and SMTP server: a mailbox's backlog
    /// read into threads (mails/s), and the time from a question's submission to its answer in
    /// the person's mailbox.
    Email(email::EmailBenchArgs),
    /// What the console waits for: the task list over 100,000 tasks, and a run of over 1,000
    /// events read and rendered (in headless Chromium when a ChromeDriver is given).
    Console(console::ConsoleBenchArgs),
}

/// Where a scenario runs.
#[derive(Args, Clone, Debug)]
pub struct Targets {
    /// PostgreSQL server to benchmark on (a scratch database is created there).
    #[arg(long, env = "STELE_DATABASE_URL")]
    database_url: Option<String>,
    /// Skip the embedded (SQLite) store.
    #[arg(long)]
    no_sqlite: bool,
    /// Directory for the scratch embedded store (a temporary directory by default).
    #[arg(long)]
    scratch_dir: Option<PathBuf>,
}

impl Targets {
    /// The scratch stores to measure on: PostgreSQL when a server is named, then the embedded
    /// store unless skipped.
    pub async fn scratches(&self) -> anyhow::Result<Vec<(&'static str, Scratch)>> {
        let mut scratches = Vec::new();
        if let Some(url) = &self.database_url {
            scratches.push(("postgres", Scratch::postgres(url).await?));
        }
        if !self.no_sqlite {
            scratches.push(("sqlite", Scratch::sqlite(self.scratch_dir.as_ref())?));
        }
        Ok(scratches)
    }
}

pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    let report = match command {
        BenchCommand::Append(args) => serde_json::to_value(append::run(args).await?)?,
        BenchCommand::Replay(args) => serde_json::to_value(replay::run(args).await?)?,
        BenchCommand::Queue(args) => serde_json::to_value(queue::throughput(args).await?)?,
        BenchCommand::Latency(args) => serde_json::to_value(queue::latency(args).await?)?,
        BenchCommand::Workflow(args) => serde_json::to_value(workflow::run(args).await?)?,
        BenchCommand::Api(args) => serde_json::to_value(api::run(args).await?)?,
        BenchCommand::Privacy(args) => serde_json::to_value(privacy::run(args).await?)?,
        BenchCommand::Audit(args) => serde_json::to_value(audit::run(args).await?)?,
        BenchCommand::Memory(args) => serde_json::to_value(memory::run(args).await?)?,
        BenchCommand::Telegram(args) => serde_json::to_value(telegram::run(args).await?)?,
        BenchCommand::Email(args) => serde_json::to_value(email::run(args).await?)?,
        BenchCommand::Console(args) => serde_json::to_value(console::run(args).await?)?,
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// The machine a figure was measured on.
#[derive(Serialize)]
pub struct Machine {
    cores: usize,
    os: &'static str,
    arch: &'static str,
}

impl Machine {
    pub fn this() -> Self {
        Self {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            os: std::env::consts::OS,
            arch: std::env::consts::ARCH,
        }
    }
}

/// CPU time used so far, in seconds, read from Linux's `/proc` (`None` elsewhere): the whole
/// machine's busy time (all cores, steal and idle excluded) or one process's (user + system).
/// On a shared machine a run's wall-clock rate moves with its neighbours; the CPU time a unit of
/// work costs moves much less, so it is the figure to compare builds by.
pub struct CpuClock;

impl CpuClock {
    const TICKS_PER_SEC: f64 = 100.0;

    pub fn machine() -> Option<f64> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().next()?.strip_prefix("cpu ")?;
        let ticks: Vec<u64> = line
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        // user, nice, system, idle, iowait, irq, softirq, steal, …
        let busy = [0, 1, 2, 5, 6]
            .iter()
            .map(|&i| ticks.get(i).copied().unwrap_or(0))
            .sum::<u64>();
        Some(busy as f64 / Self::TICKS_PER_SEC)
    }

    pub fn process(pid: u32) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The fields after the command's name, which ends at the last ')'.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        // utime and stime are the 14th and 15th fields of the line, the 12th and 13th here.
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        Some((utime + stime) as f64 / Self::TICKS_PER_SEC)
    }
}

/// A store that exists for one scenario.
pub struct Scratch {
    pub location: StoreLocation,
    drop_db: Option<(String, String)>,
}

impl Scratch {
    pub async fn postgres(url: &str) -> anyhow::Result<Self> {
        let options = PgConnectOptions::from_str(url).context("invalid --database-url")?;
        let name = format!("stele_bench_{}", uuid::Uuid::new_v4().simple());
        let mut admin = options
            .connect()
            .await
            .with_context(|| format!("cannot reach PostgreSQL at {}", options.get_host()))?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .context("creating the scratch database (the role needs CREATEDB)")?;
        let _ = admin.close().await;
        let location = StoreLocation::Postgres(stele_engine::store::with_database(url, &name)?);
        Ok(Self {
            location,
            drop_db: Some((url.to_owned(), name)),
        })
    }

    pub fn sqlite(base: Option<&PathBuf>) -> anyhow::Result<Self> {
        let base = base.cloned().unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("stele-bench-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            location: StoreLocation::Embedded(dir),
            drop_db: None,
        })
    }

    /// The scratch database's URL (PostgreSQL only).
    pub fn url(&self) -> Option<&str> {
        match &self.location {
            StoreLocation::Postgres(url) => Some(url),
            StoreLocation::Embedded(_) => None,
        }
    }

    /// This scratch store as a node opens it: personal data sealed (under a key of its own,
    /// thrown away with the scratch), and the workflow runtime of `workflows` over it.
    pub async fn node(&self, workflows: &WorkflowArgs) -> anyhow::Result<(Store, Arc<Runtime>)> {
        let opened = Store::open(self.location.clone(), Migrate::Apply).await?;
        let private = stele_privacy::private_store(
            &opened,
            &stele_privacy::Kek::generate(),
            stele_privacy::Policy::default(),
        )
        .await?;
        let runtime = workflows
            .runtime_with(&private.store, Some(private.subjects.clone()))
            .await?;
        Ok((private.store, runtime))
    }

    /// Drops the scratch database or folder, unless `STELE_BENCH_KEEP` is set: then it stays, for
    /// inspection, and where it is goes to stderr.
    pub async fn remove(self) {
        if std::env::var_os("STELE_BENCH_KEEP").is_some() {
            match &self.location {
                StoreLocation::Postgres(url) => eprintln!("kept the scratch database {url}"),
                StoreLocation::Embedded(dir) => {
                    eprintln!("kept the scratch store {}", dir.display())
                }
            }
            return;
        }
        match (&self.location, self.drop_db) {
            (_, Some((admin, name))) => {
                if let Ok(mut admin) = PgConnectOptions::from_str(&admin)
                    .expect("checked at creation")
                    .connect()
                    .await
                {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut admin)
                        .await;
                }
            }
            (StoreLocation::Embedded(dir), None) => {
                let _ = std::fs::remove_dir_all(dir);
            }
            _ => {}
        }
    }
}

/// Latency percentiles in milliseconds.
#[derive(Serialize, Default)]
pub struct Latency {
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl Latency {
    pub fn of(mut samples: Vec<Duration>) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let index = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
            (samples[index].as_secs_f64() * 1e6).round() / 1e3
        };
        Self {
            p50_ms: at(0.50),
            p95_ms: at(0.95),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }
}

/// An API server on loopback for the benchmarks, with one key of the given scopes and the task
/// cache on. Its rate limits are too high to interfere: the figures are the server's, not the
/// limiter's.
pub struct ApiServer {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// The key's token.
    pub key: String,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl ApiServer {
    pub async fn start(
        store: &Store,
        runtime: Arc<Runtime>,
        runner: Arc<stele_engine::projection::ProjectionRunner>,
        scopes: Vec<stele_aggregates::api_key::Scope>,
    ) -> anyhow::Result<Self> {
        use stele_api::ratelimit::{RateLimit, RateLimiter};

        let keys = Arc::new(stele_api::keys::KeyService::new(store));
        let key = keys
            .create(
                "bench",
                scopes,
                "bench",
                stele_engine::CommandMeta::new("bench", "bench"),
            )
            .await?
            .token;
        let limiter = RateLimiter::in_process(RateLimit {
            per_second: 1e9,
            burst: u32::MAX,
        })?;
        let gate = Arc::new(stele_api::gate::KeyGate {
            keys: keys.clone(),
            limiter: Arc::new(limiter),
        });
        let state = stele_api::state::AppState::new(store, runtime, runner, gate)
            .with_task_cache(100_000, Some(keys))
            .await;
        let app = stele_api::server::app(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(stele_api::server::serve(listener, app, async {
            let _ = stopped.await;
        }));
        Ok(Self {
            base,
            key,
            stop,
            server,
        })
    }

    /// Stops the server, once its requests in flight are answered.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.server.await??;
        Ok(())
    }
}
