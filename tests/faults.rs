//! The core under faults, with real processes on a real PostgreSQL: other programs' open
//! transactions, a node killed mid-run, the database restarted under load, hostile input mixed
//! into valid traffic. Tests wait on the log (a subscription woken by its notifications) or on a
//! process's output, never on a guessed sleep.

use std::collections::HashMap;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use stele_engine::log::{subscribe, SubscriptionOptions};
use stele_engine::store::{Migrate, Store, StoreLocation};
use stele_engine::testing::TestDb;
use stele_engine::{EventLog, Position, RecordedEvent};

mod support;
use support::{run, stderr, stele, terminate, wait_until_up_keeping, Drained, PrivatePostgres};

/// Three steps with a durable timer between them, so that work is in flight at any moment.
const STEADY: &str = r#"
name: steady
version: 1
steps:
  - id: think
    kind: agent
    agent: vox
    prompt: "{{ input }}"
  - id: nap
    kind: sleep
    duration: 1s
  - id: check
    kind: agent
    agent: vox
    prompt: "check {{ steps.think.output }}"
  - id: answer
    kind: reply
    text: "done: {{ steps.check.output }}"
"#;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A running `stele serve` or `stele worker`.
struct Node {
    child: Child,
    address: Option<String>,
    output: Drained,
}

impl Node {
    fn start(command: &str, url: &str, flows: &std::path::Path, extra: &[&str]) -> Node {
        let mut child = stele()
            .args([command, "--database-url", url])
            .args(["--workflows", &flows.display().to_string()])
            .args(if command == "serve" {
                &["--listen", "127.0.0.1:0"][..]
            } else {
                &[][..]
            })
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (address, output) = wait_until_up_keeping(&mut child);
        Node {
            child,
            address,
            output,
        }
    }

    fn base(&self) -> String {
        format!(
            "http://{}",
            self.address.as_deref().expect("serves the API")
        )
    }

    fn stop(mut self) -> Vec<String> {
        let stopped =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| terminate(&mut self.child)));
        let output = self.output.lock().unwrap().clone();
        if let Err(why) = stopped {
            let why = why
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| why.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{why}; the node said:\n{}", output.concat());
        }
        output
    }
}

/// A workflow folder with [`STEADY`].
fn flows() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("steady.yaml"), STEADY).unwrap();
    dir
}

/// Migrates `url` and creates an API key for every route.
fn prepare(url: &str) -> String {
    let migrated = run(&["migrate", "--database-url", url]);
    assert!(migrated.status.success(), "{}", stderr(&migrated));
    let created = run(&[
        "keys",
        "create",
        "--name",
        "faults",
        "--scope",
        "admin",
        "--database-url",
        url,
        "--json",
    ]);
    assert!(created.status.success(), "{}", stderr(&created));
    assert!(
        created.stderr.is_empty(),
        "a clean command prints no warnings: {}",
        stderr(&created)
    );
    serde_json::from_slice::<Value>(&created.stdout).unwrap()["key"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn create_tasks(base: &str, key: &str, workflow: &str, count: usize) -> Vec<String> {
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..count {
        let response = client
            .post(format!("{base}/v1/tasks"))
            .bearer_auth(key)
            .json(&json!({ "input": format!("task {i}"), "workflow": workflow }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        ids.push(
            response.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    ids
}

/// Follows the log of a store from the start; survives the database going away.
struct Watch {
    log: Arc<dyn EventLog>,
    position: Position,
    seen: Vec<RecordedEvent>,
}

impl Watch {
    async fn open(url: &str) -> (Store, Watch) {
        let store = Store::open(StoreLocation::Postgres(url.to_owned()), Migrate::Require)
            .await
            .unwrap();
        let watch = Watch {
            log: store.log.clone(),
            position: Position::START,
            seen: Vec::new(),
        };
        (store, watch)
    }

    /// Reads until an event satisfies `found`, within `within`; returns that event.
    async fn until(
        &mut self,
        within: Duration,
        mut found: impl FnMut(&RecordedEvent) -> bool,
    ) -> RecordedEvent {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let mut subscription = subscribe(
                self.log.clone(),
                self.position,
                SubscriptionOptions::default(),
            );
            loop {
                let next = tokio::time::timeout_at(deadline, subscription.next())
                    .await
                    .unwrap_or_else(|_| panic!("not seen within {within:?}"));
                match next {
                    Ok(event) => {
                        self.position = event.position;
                        self.seen.push(event.clone());
                        if found(&event) {
                            return event;
                        }
                    }
                    // The database is away: read again once it answers.
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        break;
                    }
                }
            }
        }
    }

    /// Reads until `count` events of `event_type` have been seen in all.
    async fn until_count(&mut self, within: Duration, event_type: &str, count: usize) {
        let mut seen = self
            .seen
            .iter()
            .filter(|e| e.event_type == event_type)
            .count();
        if seen >= count {
            return;
        }
        self.until(within, |e| {
            seen += usize::from(e.event_type == event_type);
            seen >= count
        })
        .await;
    }
}

/// Every task finished once, every step attempt recorded once, nothing run twice.
fn assert_each_once(events: &[RecordedEvent], tasks: &[String]) {
    let mut finished: HashMap<&str, usize> = HashMap::new();
    let mut steps: HashMap<(String, String, u64), usize> = HashMap::new();
    for event in events {
        match event.event_type.as_str() {
            "TaskCompleted" => *finished.entry(&event.stream.aggregate_id).or_default() += 1,
            "StepCompleted" => {
                let data = &event.payload["data"];
                *steps
                    .entry((
                        event.stream.aggregate_id.clone(),
                        data["step"].as_str().unwrap().to_owned(),
                        data["attempt"].as_u64().unwrap(),
                    ))
                    .or_default() += 1;
            }
            "TaskFailed" | "RunFailed" => panic!("{event:?}"),
            _ => {}
        }
    }
    for task in tasks {
        assert_eq!(
            finished.get(task.as_str()),
            Some(&1),
            "task {task} completed once"
        );
        for step in ["think", "check"] {
            let attempts: Vec<_> = steps
                .iter()
                .filter(|((run, s, _), _)| run == task && s == step)
                .collect();
            assert_eq!(attempts.len(), 1, "{task} {step}: {attempts:?}");
            assert_eq!(*attempts[0].1, 1, "{task} {step} recorded once");
        }
    }
}

fn completed_after(at: DateTime<Utc>) -> impl FnMut(&RecordedEvent) -> bool {
    move |e| e.event_type == "StepCompleted" && e.recorded_at > at
}

/// A task completes in its usual time while another program holds a write transaction open in
/// another database of the same server, and another in the log's own database.
#[test]
fn tasks_complete_while_other_programs_hold_transactions_open() {
    let runtime = runtime();
    let db = runtime.block_on(TestDb::postgres());
    let url = db.url().unwrap().to_owned();
    let key = prepare(&url);
    let flows = flows();
    let serve = Node::start("serve", &url, flows.path(), &[]);
    let base = serve.base();
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let timed = |input: &'static str| {
            let (client, base, key) = (client.clone(), base.clone(), key.clone());
            async move {
                let started = Instant::now();
                let created: Value = client
                    .post(format!("{base}/v1/tasks"))
                    .bearer_auth(&key)
                    .json(&json!({ "input": input, "workflow": "assistant" }))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let id = created["id"].as_str().unwrap();
                // The live stream ends when the task does.
                let stream = client
                    .get(format!("{base}/v1/tasks/{id}/stream"))
                    .bearer_auth(&key)
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap();
                assert!(stream.contains("event: TaskCompleted"), "{stream}");
                started.elapsed()
            }
        };
        let quiet = timed("hello").await;

        let admin = format!("{}/postgres", url.rsplit_once('/').unwrap().0);
        let foreign_db = format!("foreign_{}", uuid::Uuid::new_v4().simple());
        let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&admin)
            .await
            .unwrap();
        sqlx::raw_sql(&format!("CREATE DATABASE {foreign_db}"))
            .execute(&mut admin)
            .await
            .unwrap();
        let foreign_url = format!("{}/{foreign_db}", url.rsplit_once('/').unwrap().0);
        let mut open = Vec::new();
        for target in [&foreign_url, &url] {
            let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(target)
                .await
                .unwrap();
            sqlx::raw_sql(
                "CREATE TABLE IF NOT EXISTS other_app (n int); BEGIN; \
                 INSERT INTO other_app VALUES (1);",
            )
            .execute(&mut conn)
            .await
            .unwrap();
            open.push(conn);
        }
        let busy = tokio::time::timeout(Duration::from_secs(20), timed("hello again"))
            .await
            .expect("the task completes while the other transactions stay open");
        eprintln!("task alone: {quiet:?}; beside open transactions: {busy:?}");
        assert!(
            busy < quiet + Duration::from_secs(1),
            "{busy:?} beside open transactions, {quiet:?} without"
        );
        drop(open);
        sqlx::raw_sql(&format!("DROP DATABASE {foreign_db} WITH (FORCE)"))
            .execute(&mut admin)
            .await
            .unwrap();
    });
    serve.stop();
}

/// `kill -9` of a `serve` process in the middle of a batch of runs, with a `worker` process alive:
/// the worker takes the process managers over at once and the dead process's jobs when their
/// leases end; every task completes, each step attempt once.
#[test]
fn a_killed_node_is_taken_over_and_every_task_completes_once() {
    let runtime = runtime();
    let db = runtime.block_on(TestDb::postgres());
    let url = db.url().unwrap().to_owned();
    let key = prepare(&url);
    let flows = flows();
    let mut serve = Node::start("serve", &url, flows.path(), &[]);
    let worker = Node::start("worker", &url, flows.path(), &[]);
    runtime.block_on(async {
        let (store, mut watch) = Watch::open(&url).await;
        let tasks = create_tasks(&serve.base(), &key, "steady", 30).await;
        watch
            .until_count(Duration::from_secs(30), "StepCompleted", 8)
            .await;
        serve.child.kill().unwrap();
        serve.child.wait().unwrap();
        let killed = Utc::now();
        let started = Instant::now();
        watch
            .until(Duration::from_secs(5), completed_after(killed))
            .await;
        let resumed = started.elapsed();
        eprintln!("from kill -9 to the next completed step: {resumed:?}");
        watch
            .until_count(Duration::from_secs(90), "TaskCompleted", tasks.len())
            .await;
        let all = store
            .log
            .read_all(Position::START, 1_000_000)
            .await
            .unwrap();
        assert_each_once(&all, &tasks);
        store.close().await;
    });
    let output = worker.stop();
    assert!(!output.iter().any(|l| l.contains("panicked")), "{output:?}");
}

/// The database restarts (`pg_ctl stop -m fast`, then start) in the middle of a batch of runs:
/// readiness says so while it is away, the node reconnects by itself (pools, notifications,
/// workers), work resumes within 5 s of the server being back, every task completes once.
#[test]
fn a_database_restart_under_load_loses_and_repeats_nothing() {
    let server = PrivatePostgres::start();
    let url = server.url("postgres");
    let key = prepare(&url);
    let flows = flows();
    let serve = Node::start("serve", &url, flows.path(), &[]);
    let base = serve.base();
    let runtime = runtime();
    runtime.block_on(async {
        let (store, mut watch) = Watch::open(&url).await;
        let tasks = create_tasks(&base, &key, "steady", 30).await;
        watch
            .until_count(Duration::from_secs(30), "StepCompleted", 8)
            .await;
        server.stop();
        let client = reqwest::Client::new();
        let ready = client
            .get(format!("{base}/health/ready"))
            .send()
            .await
            .unwrap();
        assert_eq!(ready.status(), 503);
        let body: Value = ready.json().await.unwrap();
        assert_eq!(body["ready"], false, "{body}");
        assert_eq!(body["database"]["ok"], false, "{body}");

        server.start_again();
        let back = Utc::now();
        let started = Instant::now();
        watch
            .until(Duration::from_secs(5), completed_after(back))
            .await;
        eprintln!(
            "from the database being back to the next completed step: {:?}",
            started.elapsed()
        );
        watch
            .until_count(Duration::from_secs(90), "TaskCompleted", tasks.len())
            .await;
        let all = store
            .log
            .read_all(Position::START, 1_000_000)
            .await
            .unwrap();
        assert_each_once(&all, &tasks);
        let ready = client
            .get(format!("{base}/health/ready"))
            .send()
            .await
            .unwrap();
        assert_eq!(ready.status(), 200);
        store.close().await;
    });
    let output = serve.stop();
    assert!(!output.iter().any(|l| l.contains("panicked")), "{output:?}");
}

/// Hostile requests mixed into a burst of valid ones: NUL characters in bodies, queries and paths,
/// over-long input, wrong types, invented methods. Each is refused with its own problem; every
/// valid request succeeds; invented methods add no metrics series; concurrent rebuilds of one
/// projection answer 202 or 409 and none fails in the background.
#[test]
fn hostile_requests_fail_alone() {
    let runtime = runtime();
    let db = runtime.block_on(TestDb::postgres());
    let url = db.url().unwrap().to_owned();
    let key = prepare(&url);
    let flows = flows();
    let serve = Node::start("serve", &url, flows.path(), &[]);
    let base = serve.base();
    let output = serve.output.clone();
    // Every request has a deadline, and so has the whole exchange: a hang fails with the node's
    // log instead of holding the suite.
    let exchange = async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let hostile = [
            json!({ "input": "a\u{0}b", "workflow": "assistant" }),
            json!({ "input": "x".repeat(40_000), "workflow": "assistant" }),
            json!({ "input": 5, "workflow": "assistant" }),
            json!({ "input": "hi", "workflow": "assistant\u{0}" }),
        ];
        let requests: Vec<_> = (0..120)
            .map(|i| {
                let (client, base, key) = (client.clone(), base.clone(), key.clone());
                let body = if i % 6 == 0 {
                    hostile[(i / 6) % hostile.len()].clone()
                } else {
                    json!({ "input": format!("valid {i}"), "workflow": "assistant" })
                };
                tokio::spawn(async move {
                    let response = client
                        .post(format!("{base}/v1/tasks"))
                        .bearer_auth(&key)
                        .json(&body)
                        .send()
                        .await
                        .unwrap();
                    let status = response.status().as_u16();
                    let kind = response.headers()["content-type"]
                        .to_str()
                        .unwrap()
                        .to_owned();
                    (i % 6 == 0, status, kind)
                })
            })
            .collect();
        let mut created = 0;
        for request in requests {
            let (hostile, status, kind) = request.await.unwrap();
            if hostile {
                assert!((400..500).contains(&status), "{status}");
                assert_eq!(kind, "application/problem+json");
            } else {
                assert_eq!(status, 201);
                created += 1;
            }
        }
        assert_eq!(created, 100);

        for path in [
            "/v1/tasks?workflow=a%00b",
            "/v1/tasks/a%00b",
            "/v1/tasks/a%00b/events",
        ] {
            let response = client
                .get(format!("{base}{path}"))
                .bearer_auth(&key)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 400, "{path}");
            let problem: Value = response.json().await.unwrap();
            assert_eq!(problem["code"], "invalid_character", "{path}");
        }

        // Invented methods, before authentication: no new series.
        for i in 0..50 {
            let method = reqwest::Method::from_bytes(format!("INVENT{i}").as_bytes()).unwrap();
            let _ = client
                .request(method, format!("{base}/v1/tasks"))
                .send()
                .await;
        }
        let metrics = client
            .get(format!("{base}/metrics"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(!metrics.contains("INVENT"), "{metrics}");
        assert!(metrics.contains("method=\"other\""), "{metrics}");

        // Concurrent rebuilds of one projection: each answers 202 or 409 at once.
        let rebuilds: Vec<_> = (0..3)
            .map(|_| {
                let (client, base, key) = (client.clone(), base.clone(), key.clone());
                tokio::spawn(async move {
                    client
                        .post(format!("{base}/v1/projections/task_list/rebuild"))
                        .bearer_auth(&key)
                        .send()
                        .await
                        .unwrap()
                        .status()
                        .as_u16()
                })
            })
            .collect();
        let mut accepted = 0;
        for rebuild in rebuilds {
            match rebuild.await.unwrap() {
                202 => accepted += 1,
                409 => {}
                other => panic!("rebuild answered {other}"),
            }
        }
        assert!(accepted >= 1);
        // Whatever ran ends without a failure in the status.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let list: Value = client
                .get(format!("{base}/v1/projections"))
                .bearer_auth(&key)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let tasks = list["projections"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == "task_list")
                .unwrap()
                .clone();
            assert_eq!(tasks["rebuild_error"], Value::Null, "{tasks}");
            if tasks["rebuilding"] == false {
                break;
            }
            assert!(Instant::now() < deadline, "{tasks}");
            tokio::task::yield_now().await;
        }
    };
    runtime.block_on(async {
        if tokio::time::timeout(Duration::from_secs(120), exchange)
            .await
            .is_err()
        {
            panic!(
                "no end within 120 s; the node said:\n{}",
                output.lock().unwrap().concat()
            );
        }
    });
    let output = serve.stop();
    assert!(!output.iter().any(|l| l.contains("ERROR")), "{output:?}");
}
