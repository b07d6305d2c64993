//! A worker process is killed (SIGKILL) while it runs jobs: every job still completes, through
//! lease expiry and rescue, and each job's side effect is recorded once.
//!
//! The worker process is this test binary run again with `STELE_CRASH_WORKER` set (see
//! `crash_worker_process`), so the test needs no extra binary.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use stele_engine::queue::worker::{Done, Worker, WorkerOptions};
use stele_engine::queue::{JobFilter, JobState, NewJob};
use stele_engine::store::{Migrate, StorePool};
use stele_engine::{Store, StoreLocation};
use tokio::sync::mpsc;

const JOBS: usize = 12;
const CHILD_ENV: &str = "STELE_CRASH_WORKER";

fn location_arg(location: &StoreLocation) -> String {
    match location {
        StoreLocation::Postgres(url) => format!("postgres={url}"),
        StoreLocation::Embedded(dir) => format!("embedded={}", dir.display()),
    }
}

fn parse_location(arg: &str) -> StoreLocation {
    match arg.split_once('=') {
        Some(("postgres", url)) => StoreLocation::Postgres(url.to_owned()),
        Some(("embedded", dir)) => StoreLocation::Embedded(dir.into()),
        _ => panic!("bad {CHILD_ENV}: {arg}"),
    }
}

/// Records the job's side effect at most once per job (the handler's own idempotency).
async fn record_effect(store: &Store, job_id: uuid::Uuid) {
    match &store.pool {
        StorePool::Postgres(pool) => {
            sqlx::query("INSERT INTO crash_effects (job_id) VALUES ($1) ON CONFLICT DO NOTHING")
                .bind(job_id.to_string())
                .execute(pool)
                .await
                .unwrap();
        }
        StorePool::Sqlite(pool) => {
            sqlx::query("INSERT INTO crash_effects (job_id) VALUES (?) ON CONFLICT DO NOTHING")
                .bind(job_id.to_string())
                .execute(pool)
                .await
                .unwrap();
        }
    }
}

/// The worker process: records the side effect, says so on stdout, then works "forever" (until
/// it is killed).
#[test]
fn crash_worker_process() {
    let Ok(location) = std::env::var(CHILD_ENV) else {
        return; // Only meaningful as the child of the crash tests.
    };
    support::runtime().block_on(async {
        let store = std::sync::Arc::new(
            Store::open(parse_location(&location), Migrate::Require)
                .await
                .unwrap(),
        );
        let handler_store = store.clone();
        let worker = Worker::new(
            store.queue.clone(),
            WorkerOptions {
                concurrency: 4,
                lease: Duration::from_millis(900),
                ..WorkerOptions::new("default")
            },
        )
        .handle("effect", move |job| {
            let store = handler_store.clone();
            async move {
                record_effect(&store, job.id).await;
                println!("started {}", job.id);
                std::future::pending::<()>().await;
                Ok(Done::Complete)
            }
        });
        worker.run(std::future::pending()).await.unwrap();
    });
}

fn crash_and_recover(kind: support::Kind) {
    let runtime = support::runtime();
    let db = runtime.block_on(support::test_db(kind));
    let store = std::sync::Arc::new(runtime.block_on(db.open()));
    runtime.block_on(async {
        let ddl = "CREATE TABLE crash_effects (job_id TEXT PRIMARY KEY)";
        match &store.pool {
            StorePool::Postgres(pool) => sqlx::query(ddl).execute(pool).await.map(|_| ()),
            StorePool::Sqlite(pool) => sqlx::query(ddl).execute(pool).await.map(|_| ()),
        }
        .unwrap();
        store
            .queue
            .enqueue(
                (0..JOBS)
                    .map(|i| NewJob::new("default", "effect", json!({ "n": i })))
                    .collect(),
            )
            .await
            .unwrap();
    });

    // The worker process takes jobs and is killed while they run.
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_worker_process",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_ENV, location_arg(&db.location))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut started = 0;
    while started < 4 {
        let line = lines.next().expect("the worker process runs jobs").unwrap();
        // The test harness prints its own text before ours on the first line.
        started += line.matches("started ").count();
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // Another worker finishes everything, the killed worker's jobs once their leases expire.
    runtime.block_on(async {
        let (done, mut finished) = mpsc::unbounded_channel();
        let handler_store = store.clone();
        let worker = Worker::new(
            store.queue.clone(),
            WorkerOptions {
                rescue_interval: Duration::from_millis(200),
                poll_interval: Duration::from_millis(200),
                ..WorkerOptions::new("default")
            },
        )
        .handle("effect", move |job| {
            let (store, done) = (handler_store.clone(), done.clone());
            async move {
                record_effect(&store, job.id).await;
                done.send(job.id).unwrap();
                Ok(Done::Complete)
            }
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(worker.run(async {
            let _ = stopped.await;
        }));
        let mut runs: HashMap<uuid::Uuid, usize> = HashMap::new();
        while runs.len() < JOBS {
            let id = tokio::time::timeout(Duration::from_secs(60), finished.recv())
                .await
                .expect("every job completes")
                .unwrap();
            *runs.entry(id).or_default() += 1;
        }
        stop.send(()).unwrap();
        running.await.unwrap().unwrap();

        let jobs = store
            .queue
            .list(JobFilter {
                limit: 100,
                ..JobFilter::default()
            })
            .await
            .unwrap();
        assert_eq!(jobs.len(), JOBS);
        assert!(
            jobs.iter().all(|j| j.state == JobState::Completed),
            "{jobs:?}"
        );
        let rescued = jobs.iter().filter(|j| j.attempt == 2).count();
        // The 4 it was running, and any it had claimed ahead.
        assert!(
            rescued >= 4,
            "the killed worker's jobs ran again: {rescued}"
        );
        assert!(jobs
            .iter()
            .filter(|j| j.attempt == 2)
            .all(|j| j.errors[0].error.contains("lease expired")));
        let effects: i64 = match &store.pool {
            StorePool::Postgres(pool) => sqlx::query_scalar("SELECT count(*) FROM crash_effects")
                .fetch_one(pool)
                .await
                .unwrap(),
            StorePool::Sqlite(pool) => sqlx::query_scalar("SELECT count(*) FROM crash_effects")
                .fetch_one(pool)
                .await
                .unwrap(),
        };
        assert_eq!(effects, JOBS as i64, "one side effect per job");
        store.close().await;
    });
    drop(db);
}

#[test]
fn a_killed_worker_loses_no_job_postgres() {
    crash_and_recover(support::Kind::Postgres);
}

#[test]
fn a_killed_worker_loses_no_job_sqlite() {
    crash_and_recover(support::Kind::Sqlite);
}
