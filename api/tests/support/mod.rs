//! A real server for tests: a fresh store, the workflow runtime with its workers and process
//! manager running, API keys, rate limits through the real Redis, on a random port.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use reqwest::{Method, StatusCode};
use serde_json::Value;
use stele_aggregates::api_key::Scope;
use stele_api::auth::Gate;
use stele_api::gate::KeyGate;
use stele_api::keys::{KeyService, KeyServiceOptions};
use stele_api::ratelimit::{RateLimit, RateLimiter};
use stele_api::state::{AppState, Probe};
use stele_engine::process::as_projection;
use stele_engine::projection::ProjectionRunner;
use stele_engine::queue::worker::WorkerOptions;
use stele_engine::testing::TestDb;
use stele_engine::{CommandMeta, Store};
use stele_models::{ModelRouter, ModelsConfig};
use stele_workflows::agents::ModelAgents;
use stele_workflows::catalog::{self, Source};
use stele_workflows::runtime::{Runtime, QUEUE};
use stele_workflows::tools::Tools;
use tokio::sync::watch;

/// A workflow that waits for a human's approval.
pub const APPROVAL: &str = r#"
name: approval
version: 1
steps:
  - id: draft
    kind: agent
    agent: vox
    prompt: "{{ input }}"
  - id: approve
    kind: wait
    signal: approval
  - id: send
    kind: reply
    text: "approved by {{ steps.approve.output.by }}: {{ steps.draft.output }}"
"#;

/// The (method, route, status) of every request a test made.
pub type Seen = Arc<Mutex<BTreeSet<(String, String, u16)>>>;

pub struct Server {
    pub base: String,
    pub store: Store,
    pub runtime: Arc<Runtime>,
    pub keys: Arc<KeyService>,
    pub admin: String,
    pub reader: String,
    pub writer: String,
    pub client: reqwest::Client,
    pub seen: Seen,
    stop: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
    _db: TestDb,
}

pub struct Options {
    pub rate: RateLimit,
    pub redis: bool,
    pub probe: Option<Arc<dyn Probe>>,
    /// Whether the catalog has [`APPROVAL`] (whose runs wait for a signal).
    pub approval: bool,
    /// Admits requests instead of the server's own key gate.
    pub gate: Option<Arc<dyn Gate>>,
    /// The deployment's privacy policy.
    pub policy: stele_privacy::Policy,
    /// A memory on the embedding model `STELE_EMBEDDING_MODEL` names.
    pub memory: bool,
    /// Workflows the catalog has besides the shipped ones.
    pub workflows: Vec<Source>,
    /// The models and agent roles (the shipped `agents.toml` by default).
    pub models: ModelsConfig,
    /// Where the console links a trace (`{trace_id}` in it).
    pub trace_url: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            rate: RateLimit {
                per_second: 10_000.0,
                burst: 10_000,
            },
            redis: true,
            probe: None,
            approval: true,
            gate: None,
            policy: stele_privacy::Policy::default(),
            memory: true,
            workflows: Vec::new(),
            models: ModelsConfig::default(),
            trace_url: None,
        }
    }
}

impl Server {
    pub async fn start(options: Options) -> Server {
        let db = TestDb::postgres().await;
        // As every node: people's data sealed, tasks kept as their requesters'.
        let private = stele_privacy::private_store(
            &db.open().await,
            &stele_privacy::Kek::generate(),
            options.policy.clone(),
        )
        .await
        .unwrap();
        let store = private.store;
        let memory = options.memory.then(|| {
            let spec = std::env::var("STELE_EMBEDDING_MODEL")
                .expect("STELE_EMBEDDING_MODEL (scripts/services.sh provisions the model)");
            let embedder = stele_models::embed::load_embedding_model(&spec).unwrap();
            Arc::new(stele_memory::Memories::new(
                &store,
                embedder,
                private.subjects.sealer().clone(),
            ))
        });
        let tools = Tools::builtin();
        let router = ModelRouter::new(options.models).unwrap();
        let mut sources = catalog::builtin();
        if options.approval {
            sources.push(Source {
                file: "approval.yaml".into(),
                yaml: APPROVAL.into(),
            });
        }
        sources.extend(options.workflows);
        let catalog = catalog::build(&sources, &|a| router.agent(a).is_some(), &|t| {
            tools.contains(t)
        })
        .unwrap();
        let agents = Arc::new(ModelAgents::new(router, tools.clone()));
        let runtime = Arc::new(
            Runtime::new(&store, catalog, agents, tools).with_subjects(private.subjects.clone()),
        );
        let mut projections = stele_projections::all();
        if let Some(memory) = &memory {
            projections.push(memory.projection());
        }
        projections.push(as_projection(runtime.manager(), store.queue.clone()));
        // The audit tree, with a checkpoint for every batch.
        let audit_key = Arc::new(stele_audit::SigningKey::generate("stele.test/audit").unwrap());
        projections.push(Arc::new(stele_audit::Sealer::new(
            audit_key.clone(),
            stele_audit::SealerOptions {
                every: 1,
                interval: std::time::Duration::from_secs(3600),
            },
        )));
        let runner = Arc::new(ProjectionRunner::new(&store, projections));
        runner.setup().await.unwrap();
        let (stop, stopped) = watch::channel(false);
        let until = move || {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            }
        };
        let mut tasks = tokio::task::JoinSet::new();
        {
            let runner = runner.clone();
            let until = until();
            tasks.spawn(async move {
                runner.run(until).await.unwrap();
            });
        }
        let worker = runtime.worker(WorkerOptions::new(QUEUE));
        {
            let until = until();
            tasks.spawn(async move {
                worker.run(until).await.unwrap();
            });
        }
        let keys = Arc::new(KeyService::with_options(
            store.log.clone(),
            KeyServiceOptions::default(),
        ));
        let token = |name: &'static str, scopes: Vec<Scope>| {
            let keys = keys.clone();
            async move {
                keys.create(name, scopes, "test", CommandMeta::new("test", "test"))
                    .await
                    .unwrap()
                    .token
            }
        };
        let admin = token("admin", vec![Scope::Admin]).await;
        let reader = token("reader", vec![Scope::TasksRead]).await;
        let writer = token("writer", vec![Scope::TasksWrite, Scope::TasksRead]).await;
        let redis_url =
            std::env::var("REDIS_URL").expect("REDIS_URL (scripts/test provisions Redis)");
        let limiter = if options.redis {
            RateLimiter::redis(options.rate, &redis_url).unwrap()
        } else {
            RateLimiter::in_process(options.rate).unwrap()
        };
        let gate: Arc<dyn Gate> = match options.gate {
            Some(gate) => gate,
            None => Arc::new(KeyGate {
                keys: keys.clone(),
                limiter: Arc::new(limiter),
            }),
        };
        let mut state = AppState::new(&store, runtime.clone(), runner, gate)
            .with_task_cache(1000, Some(keys.clone()))
            .await;
        state.probe = options.probe;
        state.audit_key = Some(audit_key.verifier_key().to_owned());
        state.memory = memory;
        state.trace_url = options.trace_url;
        let app = stele_api::server::app(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        {
            let until = until();
            tasks.spawn(async move {
                stele_api::server::serve(listener, app, until)
                    .await
                    .unwrap();
            });
        }
        Server {
            base,
            store,
            runtime,
            keys,
            admin,
            reader,
            writer,
            client: reqwest::Client::new(),
            seen: Arc::default(),
            stop,
            tasks,
            _db: db,
        }
    }

    /// Calls `route` (a template like `/v1/tasks/{id}`, with `params` filled in) and records the
    /// status under the template.
    pub async fn call(
        &self,
        method: Method,
        route: &str,
        params: &[(&str, &str)],
        key: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut path = route.to_owned();
        for (name, value) in params {
            path = path.replace(&format!("{{{name}}}"), value);
        }
        let mut request = self
            .client
            .request(method.clone(), format!("{}{path}", self.base));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        self.record(&method, route, response.status());
        let status = response.status();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Sends a prepared request (raw bodies, headers) and records its status under `route`.
    pub async fn send(&self, route: &str, request: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let request = request.build().unwrap();
        let method = request.method().clone();
        let response = self.client.execute(request).await.unwrap();
        self.record(&method, route, response.status());
        let status = response.status();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned());
        let text = response.text().await.unwrap();
        if status.is_client_error() || status.is_server_error() {
            assert_eq!(
                content_type.as_deref(),
                Some("application/problem+json"),
                "{route}: {status} {text}"
            );
        }
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// A new API key with `scopes`.
    pub async fn key(&self, name: &str, scopes: Vec<Scope>) -> String {
        self.keys
            .create(name, scopes, "test", CommandMeta::new("test", "test"))
            .await
            .unwrap()
            .token
    }

    pub fn record(&self, method: &Method, route: &str, status: StatusCode) {
        self.seen.lock().unwrap().insert((
            method.as_str().to_lowercase(),
            route.to_owned(),
            status.as_u16(),
        ));
    }

    /// Creates a task and returns its id.
    pub async fn create(&self, workflow: &str, input: &str) -> String {
        let (status, body) = self
            .call(
                Method::POST,
                "/v1/tasks",
                &[],
                Some(&self.writer),
                Some(serde_json::json!({ "input": input, "workflow": workflow })),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }

    /// Waits until the task satisfies `done`.
    pub async fn wait_for(&self, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let response = self
                .client
                .get(format!("{}/v1/tasks/{id}", self.base))
                .bearer_auth(&self.reader)
                .send()
                .await
                .unwrap();
            let body: Value = response.json().await.unwrap();
            if done(&body) {
                return body;
            }
            assert!(tokio::time::Instant::now() < deadline, "{body:#}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        self.store.close().await;
    }
}
