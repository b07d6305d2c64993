//! `stele bench console`: what the console waits for, on a store as big as the issue says.
//!
//! - The task list over 100,000 tasks (the `task_list` projection behind `GET /v1/tasks`): the
//!   first page, pages deep into the list by cursor, and filtered pages.
//! - A run with over 1,000 events (a workflow of many no-op agent steps on the scripted model):
//!   its events read through the API, and, when a ChromeDriver is given, the console's task page
//!   rendered in headless Chromium from navigation to its last event on screen.
//!
//! The server is the real one on loopback; the numbers are medians and percentiles over repeated
//! requests, each request alone (a person at the console, not a load test).

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use serde_json::{json, Value};
use stele_aggregates::api_key::Scope;
use stele_aggregates::task::{Requester, TaskInput};
use stele_engine::log::{subscribe, SubscriptionOptions};
use stele_engine::process::as_projection;
use stele_engine::projection::ProjectionRunner;
use stele_engine::queue::worker::WorkerOptions;
use stele_engine::store::Store;
use stele_engine::{CommandMeta, Position};
use stele_workflows::runtime::QUEUE;

use super::{ApiServer, Latency, Machine, Scratch, Targets};
use crate::node::WorkflowArgs;

#[derive(Args)]
pub struct ConsoleBenchArgs {
    #[command(flatten)]
    targets: Targets,
    /// Tasks in the list.
    #[arg(long, default_value_t = 100_000)]
    tasks: usize,
    /// Steps of the long run (each a no-op agent step: about five events).
    #[arg(long, default_value_t = 340)]
    steps: usize,
    /// Requests of each kind measured.
    #[arg(long, default_value_t = 100)]
    requests: usize,
    /// A ChromeDriver, to time the console's task page in headless Chromium.
    #[arg(long, env = "STELE_CHROMEDRIVER", value_name = "PATH")]
    chromedriver: Option<String>,
    /// The Chromium the ChromeDriver drives.
    #[arg(long, env = "STELE_CHROMIUM", value_name = "PATH")]
    chromium: Option<String>,
}

#[derive(Serialize)]
pub struct Report {
    scenario: &'static str,
    date: String,
    machine: Machine,
    results: Vec<Figure>,
}

#[derive(Serialize)]
pub struct Figure {
    backend: &'static str,
    tasks: usize,
    seconds_to_seed: f64,
    /// `GET /v1/tasks?limit=50`.
    first_page: Latency,
    /// Pages followed by cursor, from the first to 10,000 tasks in.
    pages_by_cursor: Latency,
    /// `GET /v1/tasks?status=pending&workflow=…&limit=50`, and the requester's tasks.
    filtered_pages: Latency,
    run_events: usize,
    /// `GET /v1/tasks/{id}/events` of the long run.
    run_events_read: Latency,
    /// The console's task page of the long run, from navigation to its last event shown
    /// (`null` without a ChromeDriver).
    run_page_render: Option<Latency>,
}

pub async fn run(args: ConsoleBenchArgs) -> anyhow::Result<Report> {
    let mut results = Vec::new();
    for (backend, scratch) in args.targets.scratches().await? {
        let figure = measure(&scratch, backend, &args).await;
        scratch.remove().await;
        results.push(figure?);
    }
    Ok(Report {
        scenario: "console",
        date: chrono::Utc::now().to_rfc3339(),
        machine: Machine::this(),
        results,
    })
}

/// A workflow of `steps` no-op agent steps.
fn long_workflow(steps: usize) -> String {
    let mut yaml = String::from("name: long\nversion: 1\nsteps:\n");
    for i in 0..steps {
        yaml.push_str(&format!(
            "  - id: s{i}\n    kind: agent\n    agent: vox\n    prompt: \"step {i}\"\n"
        ));
    }
    yaml
}

async fn measure(
    scratch: &Scratch,
    backend: &'static str,
    args: &ConsoleBenchArgs,
) -> anyhow::Result<Figure> {
    let flows = tempfile::tempdir()?;
    std::fs::write(flows.path().join("long.yaml"), long_workflow(args.steps))?;
    let workflows = WorkflowArgs {
        workflows: Some(flows.path().to_owned()),
        ..WorkflowArgs::default()
    };
    let (store, runtime) = scratch.node(&workflows).await?;

    // The long run first, with a worker; then the tasks, which no worker runs.
    let long = long_run(&store, &runtime).await?;
    tracing::info!(backend, task = %long, "the long run is done; seeding the tasks");
    let seeding = Instant::now();
    seed(&runtime, args.tasks).await?;
    tracing::info!(backend, "created the tasks; catching the projections up");
    let runner = Arc::new(ProjectionRunner::new(&store, stele_projections::all()));
    runner.setup().await?;
    loop {
        let mut read = 0;
        for name in runner.names() {
            read += runner.step(name).await?.read;
        }
        if read == 0 {
            break;
        }
    }
    let seconds_to_seed = seeding.elapsed().as_secs_f64();
    tracing::info!(backend, seconds_to_seed, "seeded; measuring");

    let api = ApiServer::start(&store, runtime.clone(), runner, vec![Scope::Admin]).await?;
    let (base, key) = (api.base.clone(), api.key.clone());
    let client = reqwest::Client::new();
    let get = |path: String| {
        let (client, base, key) = (client.clone(), base.clone(), key.clone());
        async move {
            let started = Instant::now();
            let response = client
                .get(format!("{base}{path}"))
                .bearer_auth(&key)
                .send()
                .await?;
            anyhow::ensure!(
                response.status().is_success(),
                "{path}: {}",
                response.status()
            );
            let body: Value = response.json().await?;
            anyhow::Ok((started.elapsed(), body))
        }
    };

    let mut first = Vec::new();
    let mut filtered = Vec::new();
    for i in 0..args.requests {
        first.push(get("/v1/tasks?limit=50".into()).await?.0);
        let path = if i % 2 == 0 {
            "/v1/tasks?status=pending&workflow=assistant&limit=50".to_owned()
        } else {
            format!("/v1/tasks?requester=user-{}&channel=bench&limit=50", i % 50)
        };
        filtered.push(get(path).await?.0);
    }
    let mut by_cursor = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..200.min(args.tasks / 50) {
        let path = match &cursor {
            None => "/v1/tasks?limit=50".to_owned(),
            Some(c) => format!("/v1/tasks?limit=50&cursor={c}"),
        };
        let (took, page) = get(path).await?;
        by_cursor.push(took);
        cursor = page["next_cursor"].as_str().map(str::to_owned);
        if cursor.is_none() {
            break;
        }
    }
    let mut reads = Vec::new();
    let mut run_events = 0;
    for _ in 0..args.requests {
        let (took, body) = get(format!("/v1/tasks/{long}/events")).await?;
        run_events = body["events"].as_array().map_or(0, Vec::len);
        reads.push(took);
    }
    let run_page_render = match (&args.chromedriver, &args.chromium) {
        (Some(driver), Some(chromium)) => {
            tracing::info!(backend, "rendering the long run's page in Chromium");
            let rendered = render(driver, chromium, &base, &key, &long, run_events);
            Some(
                tokio::time::timeout(Duration::from_secs(180), rendered)
                    .await
                    .map_err(|_| anyhow::anyhow!("the browser took over 3 minutes"))??,
            )
        }
        _ => None,
    };
    api.stop().await?;
    store.close().await;
    Ok(Figure {
        backend,
        tasks: args.tasks,
        seconds_to_seed: (seconds_to_seed * 10.0).round() / 10.0,
        first_page: Latency::of(first),
        pages_by_cursor: Latency::of(by_cursor),
        filtered_pages: Latency::of(filtered),
        run_events,
        run_events_read: Latency::of(reads),
        run_page_render,
    })
}

/// Runs one task of the long workflow to its end; its id.
async fn long_run(
    store: &Store,
    runtime: &Arc<stele_workflows::runtime::Runtime>,
) -> anyhow::Result<String> {
    let runner = Arc::new(ProjectionRunner::new(
        store,
        vec![as_projection(runtime.manager(), store.queue.clone())],
    ));
    runner.setup().await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };
    let manager = tokio::spawn(runner.clone().run(until_stopped()));
    let worker = tokio::spawn(
        runtime
            .worker(WorkerOptions::new(QUEUE))
            .run(until_stopped()),
    );
    let created = runtime
        .create_task(
            TaskInput::parse("a long run")?,
            Requester::parse("bench", "bench")?,
            Some("long".into()),
            CommandMeta::new("bench", "bench"),
        )
        .await?;
    let id = created.task_id().to_string();
    let mut subscription = subscribe(
        store.log.clone(),
        Position::START,
        SubscriptionOptions::default(),
    );
    let finished = tokio::time::timeout(Duration::from_secs(600), async {
        loop {
            let event = subscription.next().await?;
            if event.stream.aggregate_id == id
                && matches!(event.event_type.as_str(), "TaskCompleted" | "TaskFailed")
            {
                anyhow::ensure!(event.event_type == "TaskCompleted", "{}", event.payload);
                return anyhow::Ok(());
            }
        }
    })
    .await;
    let _ = stop.send(true);
    worker.await??;
    manager.await??;
    finished??;
    Ok(id)
}

/// Creates `count` tasks from 50 requesters, 32 at a time.
async fn seed(
    runtime: &Arc<stele_workflows::runtime::Runtime>,
    count: usize,
) -> anyhow::Result<()> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let (runtime, next) = (runtime.clone(), next.clone());
        clients.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    return anyhow::Ok(());
                }
                runtime
                    .create_task(
                        TaskInput::parse(format!("task {i}"))?,
                        Requester::parse("bench", &format!("user-{}", i % 50))?,
                        Some("assistant".into()),
                        CommandMeta::new("bench", "bench"),
                    )
                    .await?;
            }
        });
    }
    while let Some(client) = clients.join_next().await {
        client??;
    }
    Ok(())
}

/// The console's page of task `id` in headless Chromium, ten times: from navigation until all
/// `events` are listed and the page says the run is finished.
async fn render(
    chromedriver: &str,
    chromium: &str,
    base: &str,
    key: &str,
    id: &str,
    events: usize,
) -> anyhow::Result<Latency> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    tracing::info!(chromedriver, chromium, "starting the browser");
    let mut driver = tokio::process::Command::new(chromedriver)
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let url = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    while reqwest::get(format!("{url}/status")).await.is_err() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(20),
            "ChromeDriver did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let capabilities = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,900"]
        }
    });
    let Value::Object(capabilities) = capabilities else {
        unreachable!("an object")
    };
    // WebDriver over plain HTTP on loopback: no TLS connector needed.
    let browser =
        fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&url)
            .await?;
    tracing::info!("the browser is up");
    let timed = async {
        // Signed in once: the session cookie is the browser's.
        browser.goto(&format!("{base}/console/")).await?;
        let signed_in = browser
            .execute_async(
                "const [key, done] = arguments;
                 fetch('/console/session', { method: 'POST', headers: { 'Content-Type': 'application/json' },
                   body: JSON.stringify({ key }) }).then((r) => done(r.status));",
                vec![json!(key)],
            )
            .await?;
        anyhow::ensure!(
            signed_in.as_u64().is_some_and(|s| (200..300).contains(&s)),
            "sign-in answered {signed_in}"
        );
        browser.refresh().await?;
        let mut samples = Vec::new();
        for _ in 0..10 {
            browser.goto(&format!("{base}/console/#/tasks")).await?;
            let started = Instant::now();
            browser.goto(&format!("{base}/console/#/tasks/{id}")).await?;
            loop {
                let shown = browser
                    .execute(
                        "return document.querySelector('#live[data-finished]') ? \
                         document.querySelectorAll('#events details').length : -1;",
                        vec![],
                    )
                    .await?;
                if shown.as_u64() == Some(events as u64) {
                    break;
                }
                anyhow::ensure!(
                    started.elapsed() < Duration::from_secs(60),
                    "the page showed {shown} of {events} events"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            samples.push(started.elapsed());
        }
        anyhow::Ok(samples)
    }
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(10), browser.close()).await;
    let _ = driver.kill().await;
    Ok(Latency::of(timed?))
}
