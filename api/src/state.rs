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
    pub queue: Arc<dyn JobQueue>,
    pub pool: StorePool,
    pub runner: Arc<ProjectionRunner>,
    pub gate: Arc<dyn Gate>,
    pub probe: Option<Arc<dyn Probe>>,
    /// Rendered by `/metrics` (Prometheus text format).
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// `/health/ready` fails when a projection lags more than this.
    pub max_lag_seconds: f64,
}

impl AppState {
    pub fn new(
        store: &Store,
        runtime: Arc<Runtime>,
        runner: Arc<ProjectionRunner>,
        gate: Arc<dyn Gate>,
    ) -> Self {
        Self {
            runtime,
            log: store.log.clone(),
            queue: store.queue.clone(),
            pool: store.pool.clone(),
            runner,
            gate,
            probe: None,
            metrics: None,
            max_lag_seconds: 60.0,
        }
    }
}
