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
use stele_engine::projection::ProjectionRunner;
use tokio::sync::Mutex;

use super::{ApiServer, Latency, Machine, Scratch};
use crate::node::WorkflowArgs;

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
    /// Load generator: `wrk` (when installed; a separate process, as in production) or
    /// `client` (in-process HTTP clients, which share the server's cores).
    #[arg(long, default_value = "auto")]
    load: String,
}

#[derive(Serialize)]
pub struct Report {
    scenario: &'static str,
    date: String,
    machine: Machine,
    connections: usize,
    load_generator: &'static str,
    results: Vec<Figure>,
}

#[derive(Serialize)]
pub struct Figure {
    request: &'static str,
    requests: usize,
    errors: usize,
    seconds: f64,
    requests_per_sec: f64,
    /// Percentiles in milliseconds (wrk reports p50, p90, p99).
    latency: serde_json::Value,
}

pub async fn run(args: ApiBenchArgs) -> anyhow::Result<Report> {
    let wrk = match args.load.as_str() {
        "wrk" => true,
        "client" => false,
        "auto" => which_wrk(),
        other => anyhow::bail!("unknown load generator {other:?} (wrk, client or auto)"),
    };
    let scratch = Scratch::postgres(&args.database_url).await?;
    let result = measure(&scratch, &args, wrk).await;
    scratch.remove().await;
    let results = result?;
    Ok(Report {
        scenario: "api",
        date: chrono::Utc::now().to_rfc3339(),
        machine: Machine::this(),
        connections: args.connections,
        load_generator: if wrk { "wrk" } else { "client" },
        results,
    })
}

fn which_wrk() -> bool {
    std::process::Command::new("wrk")
        .arg("--version")
        .output()
        .is_ok()
}

/// Runs wrk with `script` (Lua) against `url` and reads its figures.
async fn wrk(
    name: &'static str,
    args: &ApiBenchArgs,
    url: &str,
    script: &str,
) -> anyhow::Result<Figure> {
    let dir = std::env::temp_dir().join(format!("stele-wrk-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("script.lua");
    std::fs::write(&path, script)?;
    let output = tokio::process::Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{}", args.connections),
            &format!("-d{}s", args.seconds),
            "--latency",
            "-s",
        ])
        .arg(&path)
        .arg(url)
        .output()
        .await;
    let _ = std::fs::remove_dir_all(&dir);
    let output = output?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    anyhow::ensure!(
        output.status.success(),
        "wrk failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let number = |prefix: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    let millis = |label: &str| -> f64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .map(|v| v.trim())
            .map_or(0.0, |v| {
                let (n, unit) = v.split_at(v.find(|c: char| c.is_alphabetic()).unwrap_or(v.len()));
                let n: f64 = n.parse().unwrap_or(0.0);
                match unit {
                    "us" => n / 1000.0,
                    "s" => n * 1000.0,
                    _ => n,
                }
            })
    };
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0usize);
    let errors = number("Non-2xx or 3xx responses:").unwrap_or(0.0) as usize;
    Ok(Figure {
        request: name,
        requests,
        errors,
        seconds: args.seconds as f64,
        requests_per_sec: number("Requests/sec:").unwrap_or(0.0).round(),
        latency: serde_json::json!({
            "p50_ms": millis("50%"),
            "p90_ms": millis("90%"),
            "p99_ms": millis("99%"),
        }),
    })
}

async fn measure(
    scratch: &Scratch,
    args: &ApiBenchArgs,
    use_wrk: bool,
) -> anyhow::Result<Vec<Figure>> {
    // As a node runs: people's data sealed, tasks kept as their requesters'.
    let (store, runtime) = scratch.node(&WorkflowArgs::default()).await?;
    let runner = Arc::new(ProjectionRunner::new(&store, stele_projections::all()));
    let api = ApiServer::start(
        &store,
        runtime,
        runner,
        vec![Scope::TasksRead, Scope::TasksWrite],
    )
    .await?;
    let (base, key) = (api.base.clone(), api.key.clone());
    if use_wrk {
        let post = format!(
            "wrk.method = \"POST\"\nwrk.headers[\"Authorization\"] = \"Bearer {key}\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.body = '{{\"input\": \"hello\", \"workflow\": \"assistant\"}}'\n"
        );
        let create = wrk("POST /v1/tasks", args, &format!("{base}/v1/tasks"), &post).await?;
        // Read back ids of created tasks straight from the log (the tasks view is not run here).
        let mut ids = Vec::new();
        let mut after = stele_engine::Position::START;
        while ids.len() < 10_000 {
            let batch = store.log.read_all(after, 5000).await?;
            let Some(last) = batch.last() else {
                break;
            };
            after = last.position;
            ids.extend(
                batch
                    .iter()
                    .filter(|e| e.event_type == "TaskCreated")
                    .map(|e| e.stream.aggregate_id.clone()),
            );
        }
        anyhow::ensure!(!ids.is_empty(), "no task was created");
        let list: Vec<String> = ids.iter().map(|id| format!("\"{id}\"")).collect();
        let get = format!(
            "ids = {{{}}}\nwrk.headers[\"Authorization\"] = \"Bearer {key}\"\ncounter = 0\nrequest = function()\n  counter = counter + 1\n  return wrk.format(\"GET\", \"/v1/tasks/\" .. ids[(counter % #ids) + 1])\nend\n",
            list.join(",")
        );
        let read = wrk(
            "GET /v1/tasks/{id}",
            args,
            &format!("{base}/v1/tasks"),
            &get,
        )
        .await?;
        api.stop().await?;
        store.close().await;
        return Ok(vec![create, read]);
    }
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
    api.stop().await?;
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
        latency: serde_json::to_value(Latency::of(samples)).unwrap_or_default(),
    }
}
