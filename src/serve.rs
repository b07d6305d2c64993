//! `stele serve`, `stele worker`, `stele up`: a node runs projections and process managers, and
//! the HTTP API, the workers, or both. `stele keys` manages API keys; `stele openapi` prints the
//! API's document.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use clap::{Args, Subcommand};
use serde::Deserialize;
use stele_aggregates::api_key::Scope;
use stele_api::gate::KeyGate;
use stele_api::keys::KeyService;
use stele_api::ratelimit::{RateLimit, RateLimiter};
use stele_api::state::AppState;
use stele_engine::process::as_projection;
use stele_engine::projection::ProjectionRunner;
use stele_engine::queue::worker::{Worker, WorkerOptions};
use stele_engine::store::{Migrate, Store, StoreLocation};
use stele_workflows::runtime::QUEUE;

use crate::node::WorkflowArgs;
use crate::StoreArgs;

/// Options of a node, from the command line and `STELE_*` variables; they override the
/// configuration file's.
#[derive(Args, Clone, Debug, Default)]
pub struct NodeArgs {
    /// A TOML configuration file (keys: listen, database_url, redis_url, data_dir, workflows,
    /// models, sandbox, web_allow, [sanitizer], concurrency, kek_file, blob_store, trace_url,
    /// [rate_limit] per_second and burst, [privacy] require and retention).
    #[arg(long, env = "STELE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address the API listens on.
    #[arg(long, env = "STELE_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Redis, to share rate limits between server processes.
    #[arg(long, env = "STELE_REDIS_URL", value_name = "URL")]
    pub redis_url: Option<String>,
    /// Step jobs running at once in this process.
    #[arg(long, env = "STELE_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Requests per second allowed per API key (sustained).
    #[arg(long, env = "STELE_RATE_LIMIT")]
    pub rate_limit: Option<f64>,
    /// Requests an API key may make in a burst.
    #[arg(long, env = "STELE_RATE_BURST")]
    pub rate_burst: Option<u32>,
    /// A file holding the key-encryption key (64 hexadecimal digits), or STELE_KEK itself;
    /// `stele up` keeps its own in the data directory.
    #[arg(long, env = "STELE_KEK_FILE", value_name = "FILE")]
    pub kek_file: Option<PathBuf>,
    /// A file holding the audit signing key, or STELE_AUDIT_KEY itself; `stele up` keeps its own
    /// in the data directory.
    #[arg(long, env = "STELE_AUDIT_KEY_FILE", value_name = "FILE")]
    pub audit_key_file: Option<PathBuf>,
    /// Where people's files (attachments, raw mails) are kept, sealed: `database`, a folder
    /// (`file:///path`) or an S3-compatible bucket (`s3://bucket[/prefix]`, configured by the
    /// `AWS_*` variables). Default: `blobs/` in the data directory for the embedded store, the
    /// database for PostgreSQL.
    #[arg(long, env = "STELE_BLOB_STORE", value_name = "URL")]
    pub blob_store: Option<String>,
    /// The memory's embedding model (a model folder, `openai:<url>#<model>` or `hf:<repo>`);
    /// without one, nothing is remembered.
    #[arg(long, env = "STELE_EMBEDDING_MODEL", value_name = "SPEC")]
    pub embedding_model: Option<String>,
    /// Where the console links a run's trace: a URL with `{trace_id}` in it (e.g. Jaeger's
    /// `http://localhost:16686/trace/{trace_id}`). Traces are exported when
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    #[arg(long, env = "STELE_TRACE_URL", value_name = "URL")]
    pub trace_url: Option<String>,
    #[command(flatten)]
    pub workflows: WorkflowArgs,
    #[command(flatten)]
    pub telegram: crate::telegram::TelegramArgs,
    #[command(flatten)]
    pub email: crate::email::EmailArgs,
}

/// The configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConfig {
    listen: Option<SocketAddr>,
    database_url: Option<String>,
    redis_url: Option<String>,
    data_dir: Option<PathBuf>,
    workflows: Option<PathBuf>,
    models: Option<PathBuf>,
    /// `shell.run`'s sandbox (see `--sandbox`).
    sandbox: Option<stele_tools::SandboxMode>,
    /// Hosts `web.fetch` may fetch from.
    web_allow: Option<Vec<String>>,
    /// The input sanitiser's policy.
    sanitizer: Option<stele_workflows::sanitize::SanitizerPolicy>,
    concurrency: Option<usize>,
    rate_limit: Option<RateFile>,
    kek_file: Option<PathBuf>,
    /// Where people's files are kept (see `--blob-store`).
    pub(crate) blob_store: Option<String>,
    /// Which purposes each kind of processing needs, and retention per purpose.
    pub(crate) privacy: Option<stele_privacy::Policy>,
    audit_key_file: Option<PathBuf>,
    /// When audit checkpoints are signed.
    audit: Option<crate::audit::AuditConfig>,
    /// The memory's embedding model.
    embedding_model: Option<String>,
    /// Where the console links a trace (see `--trace-url`).
    trace_url: Option<String>,
    /// The Telegram channel.
    telegram: Option<stele_channels::telegram::TelegramConfig>,
    /// The email channel.
    email: Option<stele_channels::email::EmailConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateFile {
    per_second: Option<f64>,
    burst: Option<u32>,
}

/// A node's settings, resolved.
#[derive(Clone, Debug)]
pub struct Node {
    pub listen: SocketAddr,
    pub database_url: Option<String>,
    pub redis_url: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub workflows: WorkflowArgs,
    pub concurrency: usize,
    pub rate: RateLimit,
    pub kek_file: Option<PathBuf>,
    pub blob_store: Option<String>,
    pub policy: stele_privacy::Policy,
    pub audit_key_file: Option<PathBuf>,
    pub audit: stele_audit::SealerOptions,
    pub embedding_model: Option<String>,
    pub trace_url: Option<String>,
    pub telegram: Option<stele_channels::telegram::TelegramConfig>,
    pub email: Option<stele_channels::email::EmailConfig>,
}

impl NodeArgs {
    /// Command line and environment over the file over the defaults.
    pub fn resolve(&self, database_url: Option<String>) -> anyhow::Result<Node> {
        let file = match &self.config {
            None => FileConfig::default(),
            Some(path) => read_config(path)?,
        };
        let rate = file.rate_limit.unwrap_or_default();
        Ok(Node {
            listen: self
                .listen
                .or(file.listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
            database_url: database_url.or(file.database_url),
            redis_url: self.redis_url.clone().or(file.redis_url),
            data_dir: file.data_dir,
            workflows: WorkflowArgs {
                workflows: self.workflows.workflows.clone().or(file.workflows),
                models: self.workflows.models.clone().or(file.models),
                sandbox: self.workflows.sandbox.or(file.sandbox),
                web_allow: if self.workflows.web_allow.is_empty() {
                    file.web_allow.unwrap_or_default()
                } else {
                    self.workflows.web_allow.clone()
                },
                sanitizer: file.sanitizer,
            },
            concurrency: self.concurrency.or(file.concurrency).unwrap_or(16).max(1),
            kek_file: self.kek_file.clone().or(file.kek_file),
            blob_store: self.blob_store.clone().or(file.blob_store),
            policy: file.privacy.unwrap_or_default(),
            audit_key_file: self.audit_key_file.clone().or(file.audit_key_file),
            audit: file.audit.unwrap_or_default().options(),
            embedding_model: self.embedding_model.clone().or(file.embedding_model),
            trace_url: self.trace_url.clone().or(file.trace_url),
            telegram: self.telegram.resolve(file.telegram),
            email: self.email.resolve(file.email)?,
            rate: RateLimit {
                per_second: self.rate_limit.or(rate.per_second).unwrap_or(100.0),
                burst: self.rate_burst.or(rate.burst).unwrap_or(200),
            },
        })
    }
}

pub(crate) fn read_config(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the configuration {}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        let message = e.to_string().replace('\n', " ");
        anyhow::anyhow!("{}: {}", path.display(), message.trim())
    })
}

/// What a node runs besides projections and process managers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Roles {
    pub api: bool,
    pub workers: bool,
}

fn prometheus() -> anyhow::Result<metrics_exporter_prometheus::PrometheusHandle> {
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    // Durations are histograms with buckets (aggregatable across processes), not summaries.
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_duration_seconds".into()),
            &DURATION_BUCKETS,
        )
        .context("configuring the metrics buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    describe_metrics();
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// Bucket bounds, in seconds, of every `*_duration_seconds` histogram: from a millisecond (an
/// API read from memory) to two minutes (a slow model call).
const DURATION_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0,
];

/// The `# HELP` text of the metrics that the engine and the workflows record (the API describes
/// its own in [`stele_api::server::describe_metrics`]).
fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        "stele_queue_jobs",
        "Jobs in the queue, by queue and state (sampled every 5 s)"
    );
    describe_gauge!(
        "stele_projection_lag_events",
        "Events of the log a projection or process manager has not applied yet"
    );
    describe_gauge!(
        "stele_projection_lag_seconds",
        Unit::Seconds,
        "Age of the oldest event a projection or process manager has not applied yet"
    );
    describe_counter!(
        "stele_jobs_finished_total",
        "Job attempts finished, by job kind and outcome"
    );
    describe_histogram!(
        "stele_job_duration_seconds",
        Unit::Seconds,
        "Time a job attempt ran, by job kind"
    );
    describe_counter!(
        "stele_model_calls_total",
        "Calls to language models, by provider, model and outcome"
    );
    describe_histogram!(
        "stele_model_call_duration_seconds",
        Unit::Seconds,
        "Latency of a language-model call, by provider"
    );
    describe_counter!(
        "stele_model_tokens_total",
        "Tokens sent to and received from language models, by provider and direction"
    );
}

/// Runs a node on `store` until Ctrl-C or SIGTERM; then stops accepting requests, lets requests
/// and jobs in flight finish, and returns.
pub async fn run_node(
    store: Store,
    location: &StoreLocation,
    node: Node,
    roles: Roles,
) -> anyhow::Result<()> {
    // From here on the node reads and writes through the sealing layer: a person's data is
    // sealed with their key before it is stored, and opened when it is read.
    let private = match crate::privacy::private(
        &store,
        node.kek_file.as_deref(),
        node.blob_store.as_deref(),
        node.policy.clone(),
    )
    .await
    {
        Ok(private) => private,
        Err(e) => {
            store.close().await;
            return Err(e);
        }
    };
    tracing::info!(files = %private.subjects.blob_store(), "people's files are kept sealed");
    let store = private.store;
    let audit_key = match crate::audit::key_for(location, node.audit_key_file.as_deref()) {
        Ok(key) => Arc::new(key),
        Err(e) => {
            store.close().await;
            return Err(e);
        }
    };
    let memory = match &node.embedding_model {
        Some(spec) => match crate::memory::model(Some(spec)) {
            Ok(embedder) => Some(Arc::new(stele_memory::Memories::new(
                &store,
                embedder,
                private.subjects.sealer().clone(),
            ))),
            Err(e) => {
                store.close().await;
                return Err(e);
            }
        },
        None => None,
    };
    let runtime = node
        .workflows
        .runtime_with_memory(&store, Some(private.subjects.clone()), memory.clone())
        .await?;
    let mut projections = stele_projections::all();
    projections.push(as_projection(runtime.manager(), store.queue.clone()));
    projections.push(as_projection(
        runtime.schedule_manager(),
        store.queue.clone(),
    ));
    if let Some(retention) = runtime.retention_manager() {
        projections.push(as_projection(retention, store.queue.clone()));
    }
    projections.push(Arc::new(stele_audit::Sealer::new(
        audit_key.clone(),
        node.audit,
    )));
    if let Some(memory) = &memory {
        projections.push(memory.projection());
    }
    projections.push(Arc::new(stele_tools::WorkspaceEraser));
    let telegram = match node.telegram.clone() {
        Some(config) => {
            let (router, _, _) = node.workflows.load()?;
            let telegram = Arc::new(stele_channels::telegram::Telegram::new(
                config,
                &store,
                runtime.clone(),
                private.subjects.clone(),
                crate::telegram::roles(&router),
            )?);
            projections.push(as_projection(telegram.manager(), store.queue.clone()));
            Some(telegram)
        }
        None => None,
    };
    let email = match node.email.clone() {
        Some(config) => {
            let email = Arc::new(stele_channels::email::Email::new(
                config,
                &store,
                runtime.clone(),
                private.subjects.clone(),
            )?);
            projections.push(as_projection(email.manager(), store.queue.clone()));
            Some(email)
        }
        None => None,
    };
    let runner = Arc::new(ProjectionRunner::new(&store, projections));
    runner.setup().await?;
    let first_start = roles.api && no_key_yet(&runner, &store).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    let mut keys = None;
    {
        let runner = runner.clone();
        let stopped = until_stopped();
        tasks.spawn(async move { runner.run(stopped).await.map_err(anyhow::Error::from) });
    }
    if let Some(memory) = memory.clone() {
        let stopped = until_stopped();
        tasks.spawn(async move {
            memory.settle_until(stopped).await;
            Ok(())
        });
    }
    {
        let (pool, key, interval) = (store.pool.clone(), audit_key.clone(), node.audit.interval);
        let stopped = until_stopped();
        tasks.spawn(async move {
            crate::audit::sign_tail(pool, key, interval, stopped).await;
            Ok(())
        });
    }
    {
        // Queue depth as gauges: `stele_queue_jobs{queue, state}`.
        let queue = store.queue.clone();
        let stopped = until_stopped();
        tasks.spawn(async move {
            let report = async {
                let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
                loop {
                    every.tick().await;
                    match queue.depth().await {
                        Ok(depth) => {
                            for (name, state, jobs) in depth {
                                metrics::gauge!("stele_queue_jobs", "queue" => name, "state" => state.as_str())
                                    .set(jobs as f64);
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "reading the queue depth failed"),
                    }
                }
            };
            tokio::select! {
                _ = report => {}
                _ = stopped => {}
            }
            Ok(())
        });
    }
    if roles.workers {
        let worker = runtime.worker(WorkerOptions {
            concurrency: node.concurrency,
            // A supply of claimed jobs as large as the slots: with all slots busy, a finishing
            // job's slot takes the next from it, and a claim refills it when it runs dry, for
            // as many jobs as it lacks, instead of one claim for each job taken.
            prefetch: node.concurrency,
            ..WorkerOptions::new(QUEUE)
        });
        let stopped = until_stopped();
        tasks.spawn(async move { worker.run(stopped).await.map_err(anyhow::Error::from) });
        if telegram.is_some() || email.is_some() {
            // Channel jobs wait on the network (Telegram's throttle, SMTP servers), not on the
            // CPU. One worker takes every channel's jobs: they share the queue.
            let mut worker = Worker::new(
                store.queue.clone(),
                WorkerOptions {
                    concurrency: 64,
                    ..WorkerOptions::new(stele_channels::telegram::QUEUE)
                },
            );
            if let Some(telegram) = &telegram {
                worker = telegram.register(worker);
            }
            if let Some(email) = &email {
                worker = email.register(worker);
            }
            let stopped = until_stopped();
            tasks.spawn(async move { worker.run(stopped).await.map_err(anyhow::Error::from) });
        }
        if let Some(telegram) = &telegram {
            // Progress jobs mostly wait: many at once cost little.
            let worker = telegram.register_progress(Worker::new(
                store.queue.clone(),
                WorkerOptions {
                    concurrency: 256,
                    ..WorkerOptions::new(stele_channels::telegram::PROGRESS_QUEUE)
                },
            ));
            let stopped = until_stopped();
            tasks.spawn(async move { worker.run(stopped).await.map_err(anyhow::Error::from) });
            let telegram = telegram.clone();
            let stopped = until_stopped();
            tasks.spawn(async move { telegram.receive(stopped).await });
        }
        if let Some(email) = &email {
            tracing::info!(mailboxes = ?email.mailboxes(), "email channel on");
            let email = email.clone();
            let stopped = until_stopped();
            tasks.spawn(async move { email.receive(stopped).await });
        }
    }
    if roles.api {
        let service = Arc::new(KeyService::new(&store));
        keys = Some(service.clone());
        let limiter = Arc::new(RateLimiter::new(node.rate, node.redis_url.as_deref())?);
        let gate = Arc::new(KeyGate {
            keys: service.clone(),
            limiter: limiter.clone(),
        });
        let mut state = AppState::new(&store, runtime.clone(), runner.clone(), gate)
            .with_task_cache(100_000, Some(service))
            .await;
        state.metrics = Some(prometheus()?);
        state.audit_key = Some(audit_key.verifier_key().to_owned());
        state.trace_url = node.trace_url.clone();
        state.memory = memory.clone();
        state.workspaces = Arc::new(stele_tools::Workspaces::new(
            store.pool.clone(),
            Some(private.subjects.sealer().clone()),
        ));
        if let Some(url) = &node.redis_url {
            state.probe = Some(Arc::new(
                stele_api::state::RedisProbe::new(url).map_err(anyhow::Error::msg)?,
            ));
        }
        let listener = tokio::net::TcpListener::bind(node.listen)
            .await
            .with_context(|| format!("cannot listen on {}", node.listen))?;
        let address = listener.local_addr()?;
        tracing::info!(
            store = %location.describe(),
            "listening on http://{address}; API docs at http://{address}/docs"
        );
        if first_start {
            tracing::info!(
                "no API key exists yet: create one with `stele keys create --name admin --scope admin{}`",
                match location {
                    StoreLocation::Postgres(_) => " --database-url …",
                    StoreLocation::Embedded(_) => "",
                }
            );
        }
        let mut app = stele_api::server::app(state);
        // Telegram's webhook posts carry its secret header, not an API key.
        if let Some(webhook) = telegram
            .as_ref()
            .map(|t| t.webhook_router())
            .transpose()?
            .flatten()
        {
            app = app.merge(webhook);
        }
        let stopped = until_stopped();
        tasks.spawn(async move {
            stele_api::server::serve(listener, app, stopped)
                .await
                .map_err(anyhow::Error::from)
        });
    }
    let shutdown = crate::shutdown_signal();
    tracing::info!(
        store = %location.describe(),
        api = roles.api,
        workers = roles.workers,
        workflows = runtime.catalog().latest_all().count(),
        "stele is up; press Ctrl-C to stop"
    );
    tokio::select! {
        _ = shutdown => {}
        Some(done) = tasks.join_next() => {
            // A part stopped on its own: that is an error (or a bug); stop the rest.
            let _ = stop.send(true);
            while tasks.join_next().await.is_some() {}
            store.close().await;
            done??;
            anyhow::bail!("a part of the node stopped unexpectedly");
        }
    }
    tracing::info!("shutting down: finishing requests and jobs in flight");
    let _ = stop.send(true);
    let mut result = Ok(());
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done.map_err(anyhow::Error::from).and_then(|r| r) {
            result = Err(e);
        }
    }
    if let Some(keys) = keys {
        keys.flush_usage().await;
    }
    store.close().await;
    if result.is_ok() {
        tracing::info!("stopped");
    }
    result
}

/// Whether no API key exists (the keys view brought up to date first; `false` when that cannot be
/// told, e.g. another process holds the view).
async fn no_key_yet(runner: &ProjectionRunner, store: &Store) -> bool {
    loop {
        match runner.step("api_keys").await {
            Ok(stepped) if stepped.read > 0 => continue,
            Ok(_) => break,
            Err(_) => return false,
        }
    }
    stele_projections::list_keys(&store.pool)
        .await
        .is_ok_and(|keys| keys.is_empty())
}

pub async fn keys(command: KeysCommand) -> anyhow::Result<()> {
    let store_args = match &command {
        KeysCommand::Create { store, .. }
        | KeysCommand::List { store, .. }
        | KeysCommand::Revoke { store, .. } => store.clone(),
    };
    let store = Store::open(store_args.location()?, Migrate::Apply).await?;
    let result = keys_on(&store, command).await;
    store.close().await;
    result
}

async fn keys_on(store: &Store, command: KeysCommand) -> anyhow::Result<()> {
    let service = KeyService::new(store);
    let operator = std::env::var("USER").unwrap_or_else(|_| "operator".into());
    let meta = || stele_engine::CommandMeta::new(format!("user:{operator}"), "cli");
    match command {
        KeysCommand::Create {
            name, scopes, json, ..
        } => {
            let scopes = scopes
                .iter()
                .map(|s| s.trim().parse::<Scope>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(anyhow::Error::from)?;
            let created = service
                .create(&name, scopes, &format!("user:{operator}"), meta())
                .await?;
            let scopes: Vec<&str> = created.scopes.iter().map(|s| s.as_str()).collect();
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "id": created.id, "key": created.token, "scopes": scopes })
                );
            } else {
                println!("{}", created.token);
                eprintln!(
                    "key {} ({}) created; it is shown only now: store it safely",
                    created.id,
                    scopes.join(", ")
                );
            }
            Ok(())
        }
        KeysCommand::List { json, .. } => {
            // The keys view is a projection: bring it up to date first.
            let runner = ProjectionRunner::new(store, stele_projections::all());
            runner.setup().await?;
            while runner.step("api_keys").await?.read > 0 {}
            runner.release_all().await?;
            let rows = stele_projections::list_keys(&store.pool).await?;
            for row in rows {
                if json {
                    println!("{}", serde_json::to_string(&row)?);
                } else {
                    println!(
                        "{:<12}  {:<20}  {:<30}  {}",
                        row.key_id,
                        row.name,
                        row.scopes.join(","),
                        match &row.revoked_at {
                            Some(at) => format!("revoked {at}"),
                            None => format!("created {}", row.created_at),
                        }
                    );
                }
            }
            Ok(())
        }
        KeysCommand::Revoke { id, reason, .. } => {
            service.revoke(&id, &reason, meta()).await?;
            println!("key {id} revoked");
            Ok(())
        }
    }
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create an API key; prints it once (only its hash is stored).
    Create {
        #[command(flatten)]
        store: StoreArgs,
        /// A name for the key (who or what uses it).
        #[arg(long)]
        name: String,
        /// Scopes: tasks:read, tasks:write, subjects:read, subjects:write, subjects:erase,
        /// audit:read, memory:read, memory:write, admin (repeat, or separate with commas).
        #[arg(long = "scope", required = true, value_delimiter = ',')]
        scopes: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// List API keys (never their secrets).
    List {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        json: bool,
    },
    /// Revoke an API key.
    Revoke {
        #[command(flatten)]
        store: StoreArgs,
        /// The key's id (the part after `stele_`, before the next `_`).
        id: String,
        #[arg(long, default_value = "revoked by an operator")]
        reason: String,
    },
}
