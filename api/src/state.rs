//! What handlers share.

use std::sync::Arc;

use async_trait::async_trait;
use stele_engine::projection::ProjectionRunner;
use stele_engine::queue::JobQueue;
use stele_engine::store::StorePool;
use stele_engine::{EventLog, Store};
use stele_workflows::runtime::Runtime;

use crate::auth::Gate;

/// A dependency `/health/ready` checks besides the database (Redis, when configured).
#[async_trait]
pub trait Probe: Send + Sync {
    fn name(&self) -> &'static str;
    async fn check(&self) -> Result<(), String>;
}

/// The server's shared state.
#[derive(Clone)]
pub struct AppState {
    pub runtime: Arc<Runtime>,
    pub log: Arc<dyn EventLog>,
    /// The log as stored (what the audit tree hashes).
    pub stored: Arc<dyn EventLog>,
    pub queue: Arc<dyn JobQueue>,
    pub pool: StorePool,
    pub runner: Arc<ProjectionRunner>,
    pub gate: Arc<dyn Gate>,
    pub probe: Option<Arc<dyn Probe>>,
    /// Rendered by `/metrics` (Prometheus text format).
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// `/health/ready` fails when a projection lags more than this.
    pub max_lag_seconds: f64,
    /// Task views in memory, for reads (see [`crate::cache`]).
    pub tasks: Option<crate::cache::TaskCache>,
    /// The audit log's verifier key, shown with its checkpoints.
    pub audit_key: Option<String>,
    /// Where the console links a trace: a URL with `{trace_id}` in it.
    pub trace_url: Option<String>,
    /// The memory, when the server has an embedding model.
    pub memory: Option<Arc<stele_memory::Memories>>,
    /// Agents' workspaces (set to the sealed ones by a node; plain on the store otherwise).
    pub workspaces: Arc<stele_tools::Workspaces>,
}

impl AppState {
    /// Serves task reads from memory, kept current by following the log.
    /// Serves task reads from memory (see [`crate::cache`]); the same reader of the log keeps
    /// `keys`' cache current.
    pub async fn with_task_cache(
        mut self,
        capacity: u64,
        keys: Option<Arc<crate::keys::KeyService>>,
    ) -> Self {
        self.tasks = Some(crate::cache::TaskCache::start(self.log.clone(), capacity, keys).await);
        self
    }

    pub fn new(
        store: &Store,
        runtime: Arc<Runtime>,
        runner: Arc<ProjectionRunner>,
        gate: Arc<dyn Gate>,
    ) -> Self {
        Self {
            runtime,
            log: store.log.clone(),
            stored: store.stored.clone(),
            queue: store.queue.clone(),
            pool: store.pool.clone(),
            runner,
            gate,
            probe: None,
            metrics: None,
            max_lag_seconds: 60.0,
            tasks: None,
            audit_key: None,
            trace_url: None,
            memory: None,
            workspaces: Arc::new(stele_tools::Workspaces::new(store.pool.clone(), None)),
        }
    }
}

/// Redis answers `PING` (checked by `/health/ready` when rate limits are shared through it).
pub struct RedisProbe {
    client: redis::Client,
}

impl RedisProbe {
    pub fn new(url: &str) -> Result<Self, String> {
        redis::Client::open(url)
            .map(|client| Self { client })
            .map_err(|e| format!("invalid Redis URL: {e}"))
    }
}

#[async_trait]
impl Probe for RedisProbe {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn check(&self) -> Result<(), String> {
        let ping = async {
            let mut connection = self
                .client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| e.to_string())?;
            redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(std::time::Duration::from_secs(2), ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("no answer within 2 s".into()),
        }
    }
}
