//! `stele`: the command-line interface. Runs the embedded engine (`stele up`), migrates stores,
//! reads the event log and runs the benchmarks.

mod audit;
mod bench;
mod email;
mod events;
mod jobs;
mod memory;
mod models;
mod node;
mod privacy;
mod projections;
mod rooms;
mod schedules;
mod serve;
mod tasks;
mod telegram;
mod telemetry;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use stele_engine::store::{self, Migrate, Store, StoreLocation};

#[derive(Parser)]
#[command(name = "stele", version, about = "Durable, replayable workflow engine", long_about = None)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "STELE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Which store to use: PostgreSQL when a URL is given, else the embedded store.
#[derive(Args, Clone, Debug)]
pub struct StoreArgs {
    /// PostgreSQL URL (postgres://user:pass@host:port/db); without it, the embedded store is used.
    #[arg(long, env = "STELE_DATABASE_URL")]
    database_url: Option<String>,
    /// Directory of the embedded store.
    #[arg(long, env = "STELE_DATA_DIR", default_value = ".stele")]
    data_dir: PathBuf,
    /// A file holding the key-encryption key (64 hexadecimal digits), or STELE_KEK itself; the
    /// embedded store keeps its own in the data directory.
    #[arg(long, env = "STELE_KEK_FILE", value_name = "FILE")]
    kek_file: Option<PathBuf>,
    /// A file holding the audit signing key, or STELE_AUDIT_KEY itself; the embedded store keeps
    /// its own in the data directory.
    #[arg(long, env = "STELE_AUDIT_KEY_FILE", value_name = "FILE")]
    audit_key_file: Option<PathBuf>,
    /// Where people's files are kept: `database`, `file:///path` or `s3://bucket[/prefix]` (the
    /// node's setting; default: `blobs/` in the data directory, or the PostgreSQL database).
    #[arg(long, env = "STELE_BLOB_STORE", value_name = "URL")]
    blob_store: Option<String>,
}

impl StoreArgs {
    pub fn location(&self) -> anyhow::Result<StoreLocation> {
        Ok(StoreLocation::from_args(
            self.database_url.as_deref(),
            &self.data_dir,
        )?)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Apply the database migrations (PostgreSQL with --database-url, else the embedded store).
    Migrate(StoreArgs),
    /// Run Stele embedded: open (creating if needed) the store in the data directory and run until
    /// interrupted.
    Up {
        /// Directory of the embedded store.
        #[arg(long, env = "STELE_DATA_DIR", default_value = ".stele")]
        data_dir: PathBuf,
        #[command(flatten)]
        node: serve::NodeArgs,
    },
    /// Run the API, workers, projections and process managers against PostgreSQL (+ Redis).
    Serve {
        /// PostgreSQL URL (or `database_url` in the configuration file).
        #[arg(long, env = "STELE_DATABASE_URL")]
        database_url: Option<String>,
        /// Serve the API only; `stele worker` processes run the jobs.
        #[arg(long)]
        no_workers: bool,
        #[command(flatten)]
        node: serve::NodeArgs,
    },
    /// Run workers, projections and process managers only (no API), against PostgreSQL.
    Worker {
        /// PostgreSQL URL (or `database_url` in the configuration file).
        #[arg(long, env = "STELE_DATABASE_URL")]
        database_url: Option<String>,
        #[command(flatten)]
        node: serve::NodeArgs,
    },
    /// Manage API keys.
    #[command(subcommand)]
    Keys(serve::KeysCommand),
    /// The people Stele knows: consents, export, erasure.
    #[command(subcommand)]
    Subjects(privacy::SubjectsCommand),
    /// The audit log: its key, verification, checkpoints, proofs.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// The memory: remember facts, search (vectors and full text), rebuild, count.
    #[command(subcommand)]
    Memory(memory::MemoryCommand),
    /// The Telegram channel: who may use the bot.
    #[command(subcommand)]
    Telegram(telegram::TelegramCommand),
    /// The models the agents run on: providers, roles and their routes; a test call.
    #[command(subcommand)]
    Models(models::ModelsCommand),
    /// Schedules: workflows started on a timetable (cron patterns, intervals).
    #[command(subcommand)]
    Schedules(schedules::SchedulesCommand),
    /// Rooms: several agents and people in one conversation, agents taking turns.
    #[command(subcommand)]
    Rooms(rooms::RoomsCommand),
    /// Print the API's OpenAPI document.
    Openapi,
    /// Workflow definitions.
    #[command(subcommand)]
    Workflows(tasks::WorkflowsCommand),
    /// Tasks and their workflow runs.
    #[command(subcommand)]
    Tasks(tasks::TasksCommand),
    /// Read the event log.
    #[command(subcommand)]
    Events(EventsCommand),
    /// Inspect and operate projections (read models).
    #[command(subcommand)]
    Projections(projections::ProjectionsCommand),
    /// Rebuild projections from the start of the log into fresh tables, swapped in when caught up.
    Replay(projections::ReplayArgs),
    /// List streams (from the streams projection).
    Streams(projections::StreamsArgs),
    /// Inspect and operate the job queue.
    #[command(subcommand)]
    Jobs(jobs::JobsCommand),
    /// Measure throughput and latency; prints JSON.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

#[derive(Subcommand)]
enum EventsCommand {
    /// Print the global log as NDJSON, one event per line.
    Tail(events::TailArgs),
}

// The engine allocates many small, short-lived values (events decoded from rows, JSON trees);
// mimalloc serves those markedly faster than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // One readable line; `--help` has the rest.
            let text = e.to_string();
            let line = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("{} (see `stele --help`)", line.trim_end());
            return ExitCode::from(2);
        }
    };
    // One TLS provider for the whole process (ring, as the rest of the build uses): clients
    // built without one of their own (the trace exporter's) take it.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let telemetry = match telemetry::init(cli.log_format) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(cli.command));
    telemetry.shutdown();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let message = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// One `stele up` per data directory: a second one would run the same projections and jobs
/// beside the first on one SQLite file. The lock is the operating system's, so it ends with the
/// process however it ends; the file keeps the holder's pid for the message.
fn lock_data_dir(data_dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let path = data_dir.join("stele.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    if file.try_lock().is_err() {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        anyhow::bail!(
            "another `stele up` (pid {}) is running on {}; stop it first or choose another --data-dir",
            holder.trim(),
            data_dir.display()
        );
    }
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "{}", std::process::id())?;
    Ok(file)
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Migrate(args) => {
            let location = args.location()?;
            let applied = store::migrate(location.clone()).await?;
            tracing::info!(
                store = %location.describe(),
                applied = applied.len(),
                "migrations applied"
            );
            Ok(())
        }
        Command::Up { data_dir, node } => {
            let node = node.resolve(None)?;
            let data_dir = node.data_dir.clone().unwrap_or(data_dir);
            let _lock = lock_data_dir(&data_dir)?;
            let location = StoreLocation::Embedded(data_dir);
            let store = Store::open(location.clone(), Migrate::Apply).await?;
            let roles = serve::Roles {
                api: true,
                workers: true,
            };
            serve::run_node(store, &location, node, roles).await
        }
        Command::Serve {
            database_url,
            no_workers,
            node,
        } => {
            let roles = serve::Roles {
                api: true,
                workers: !no_workers,
            };
            node_on_postgres(database_url, node, roles).await
        }
        Command::Worker { database_url, node } => {
            let roles = serve::Roles {
                api: false,
                workers: true,
            };
            node_on_postgres(database_url, node, roles).await
        }
        Command::Keys(command) => serve::keys(command).await,
        Command::Subjects(command) => privacy::subjects(command).await,
        Command::Audit(command) => audit::run(command).await,
        Command::Memory(command) => memory::run(command).await,
        Command::Schedules(command) => schedules::run(command).await,
        Command::Rooms(command) => rooms::run(command).await,
        Command::Models(command) => models::run(command).await,
        Command::Telegram(command) => telegram::run(command).await,
        Command::Openapi => {
            println!("{}", stele_api::server::openapi().to_pretty_json()?);
            Ok(())
        }
        Command::Workflows(command) => tasks::workflows(command).await,
        Command::Tasks(command) => tasks::tasks(command).await,
        Command::Events(EventsCommand::Tail(args)) => events::tail(args).await,
        Command::Jobs(command) => jobs::run(command).await,
        Command::Projections(command) => projections::run(command).await,
        Command::Replay(args) => projections::replay(args).await,
        Command::Streams(args) => projections::streams(args).await,
        Command::Bench(command) => bench::run(command).await,
    }
}

/// `serve` (API, with or without workers) or `worker` (workers only) on PostgreSQL.
async fn node_on_postgres(
    database_url: Option<String>,
    node: serve::NodeArgs,
    roles: serve::Roles,
) -> anyhow::Result<()> {
    let node = node.resolve(database_url)?;
    let Some(url) = node.database_url.clone() else {
        anyhow::bail!(
            "a PostgreSQL URL is needed: --database-url, STELE_DATABASE_URL or database_url in the configuration (`stele up` runs embedded)"
        );
    };
    let location = StoreLocation::Postgres(url);
    let store = Store::open(location.clone(), Migrate::Apply).await?;
    serve::run_node(store, &location, node, roles).await
}

/// Resolves on Ctrl-C or SIGTERM.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    // The handlers are installed here, before the future is first polled: a SIGTERM that comes
    // right after start-up (say, just after "stele is up") is then a request to stop, not the
    // signal's default action that kills the process.
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, Signal, SignalKind};
        async fn received(signal: Option<Signal>) {
            match signal {
                Some(mut signal) => {
                    signal.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        let terminate = signal(SignalKind::terminate()).ok();
        let interrupt = signal(SignalKind::interrupt()).ok();
        async move {
            tokio::select! {
                _ = received(terminate) => {}
                _ = received(interrupt) => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
