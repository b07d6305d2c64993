//! `stele bench api`: durable task creations (`POST /v1/tasks`) and task reads
//! (`GET /v1/tasks/{id}`) per second, with p99 latency, against the real server on loopback
//! (PostgreSQL; in-process HTTP clients with keep-alive connections, as a load generator would).
//! Only the API runs: workers are separate processes in production, and would otherwise run the
//! created tasks on the same two cores.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use stele_aggregates::api_key::Scope;
use stele_api::gate::KeyGate;
use stele_api::keys::KeyService;
use stele_api::ratelimit::{RateLimit, RateLimiter};
use stele_api::state::AppState;
use stele_engine::projection::ProjectionRunner;
use stele_engine::store::{Migrate, Store};
use stele_engine::CommandMeta;
use tokio::sync::Mutex;

use super::{Latency, Machine, Scratch};
use crate::tasks::WorkflowArgs;

#[derive(Args)]
pub struct ApiBenchArgs {
    /// PostgreSQL server to benchmark on (a scratch database is created there).
    #[arg(long, env = "STELE_DATABASE_URL")]
    database_url: String,
    /// Seconds of each phase (creations, then reads).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent client connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
}

#[derive(Serialize)]
pub struct Report {
    scenario: &'static str,
    date: String,
    machine: Machine,
    connections: usize,
    results: Vec<Figure>,
}

#[derive(Serialize)]
pub struct Figure {
    request: &'static str,
    requests: usize,
    errors: usize,
    seconds: f64,
    requests_per_sec: f64,
    latency: Latency,
}

pub async fn run(args: ApiBenchArgs) -> anyhow::Result<Report> {
    let scratch = Scratch::postgres(&args.database_url).await?;
    let result = measure(&scratch, &args).await;
    scratch.remove().await;
    let results = result?;
    Ok(Report {
        scenario: "api",
        date: chrono::Utc::now().to_rfc3339(),
        machine: Machine::this(),
        connections: args.connections,
        results,
    })
}

async fn measure(scratch: &Scratch, args: &ApiBenchArgs) -> anyhow::Result<Vec<Figure>> {
    let store = Store::open(scratch.location.clone(), Migrate::Apply).await?;
    let runtime = WorkflowArgs::default().runtime(&store).await?;
    let runner = Arc::new(ProjectionRunner::new(&store, stele_projections::all()));
    let keys = Arc::new(KeyService::new(&store));
    let key = keys
        .create(
            "bench",
            vec![Scope::TasksRead, Scope::TasksWrite],
            "bench",
            CommandMeta::new("bench", "bench"),
        )
        .await?
        .token;
    // Limits high enough not to interfere: the figure is the server's, not the limiter's.
    let limiter = RateLimiter::in_process(RateLimit {
        per_second: 1e9,
        burst: u32::MAX,
    })?;
    let gate = Arc::new(KeyGate {
        keys,
        limiter: Arc::new(limiter),
    });
    let state = AppState::new(&store, runtime, runner, gate)
        .with_task_cache(100_000)
        .await;
    let app = stele_api::server::app(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(stele_api::server::serve(listener, app, async {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .build()?;
    let ids: Arc<Mutex<Vec<String>>> = Arc::default();
    let create = {
        let (client, base, key, ids) = (client.clone(), base.clone(), key.clone(), ids.clone());
        phase("POST /v1/tasks", args, move |i| {
            let (client, base, key, ids) = (client.clone(), base.clone(), key.clone(), ids.clone());
            async move {
                let response = client
                    .post(format!("{base}/v1/tasks"))
                    .bearer_auth(&key)
                    .json(&serde_json::json!({ "input": format!("task {i}"), "workflow": "assistant" }))
                    .send()
                    .await
                    .ok()?;
                if response.status() != reqwest::StatusCode::CREATED {
                    return None;
                }
                let body: serde_json::Value = response.json().await.ok()?;
                ids.lock().await.push(body["id"].as_str()?.to_owned());
                Some(())
            }
        })
        .await
    };
    let ids = Arc::new(ids.lock().await.clone());
    anyhow::ensure!(!ids.is_empty(), "no task was created");
    let read = {
        let (client, base, key) = (client.clone(), base.clone(), key.clone());
        phase("GET /v1/tasks/{id}", args, move |i| {
            let (client, base, key, ids) = (client.clone(), base.clone(), key.clone(), ids.clone());
            async move {
                let id = &ids[i % ids.len()];
                let response = client
                    .get(format!("{base}/v1/tasks/{id}"))
                    .bearer_auth(&key)
                    .send()
                    .await
                    .ok()?;
                let ok = response.status() == reqwest::StatusCode::OK;
                response.bytes().await.ok()?;
                ok.then_some(())
            }
        })
        .await
    };
    let _ = stop.send(());
    server.await??;
    store.close().await;
    Ok(vec![create, read])
}

/// Runs `request(i)` from `connections` clients for the phase's duration.
async fn phase<F, Fut>(name: &'static str, args: &ApiBenchArgs, request: F) -> Figure
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Option<()>> + Send,
{
    let done = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..args.connections {
        let (request, done, counter) = (request.clone(), done.clone(), counter.clone());
        clients.spawn(async move {
            let mut samples = Vec::new();
            let mut errors = 0;
            while !done.load(Ordering::Relaxed) {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                let at = Instant::now();
                match request(i).await {
                    Some(()) => samples.push(at.elapsed()),
                    None => errors += 1,
                }
            }
            (samples, errors)
        });
    }
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    done.store(true, Ordering::Relaxed);
    let mut samples = Vec::new();
    let mut errors = 0;
    while let Some(Ok((s, e))) = clients.join_next().await {
        samples.extend(s);
        errors += e;
    }
    let seconds = started.elapsed().as_secs_f64();
    Figure {
        request: name,
        requests: samples.len(),
        errors,
        seconds: (seconds * 1000.0).round() / 1000.0,
        requests_per_sec: (samples.len() as f64 / seconds).round(),
        latency: Latency::of(samples),
    }
}
