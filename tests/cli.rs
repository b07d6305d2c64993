//! End-to-end tests of the `stele` binary: real processes against real stores.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stele_engine::testing::TestDb;
use stele_engine::{AppendRequest, CommandMeta, NewEvent, Store, StoreLocation, StreamId};
use uuid::Uuid;

mod support;
use support::{run, stderr, stele, terminate, wait_until_up};

/// Asserts a failure with exactly one line on stderr containing `expected`.
fn assert_one_line_error(output: &Output, code: i32, expected: &str) {
    let text = stderr(output);
    assert_eq!(output.status.code(), Some(code), "stderr: {text}");
    assert_eq!(text.trim_end().lines().count(), 1, "one line: {text:?}");
    assert!(text.contains(expected), "{expected:?} in {text:?}");
}

fn store_args(location: &StoreLocation) -> Vec<String> {
    match location {
        StoreLocation::Postgres(url) => vec!["--database-url".into(), url.clone()],
        StoreLocation::Embedded(dir) => vec!["--data-dir".into(), dir.display().to_string()],
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn append(store: &Store, id: &str, count: usize) -> Vec<i64> {
    let meta = CommandMeta::new("user:1", "cli-test");
    let outcome = store
        .log
        .append(AppendRequest {
            command_id: meta.command_id,
            stream: StreamId::new("note", id),
            expected_sequence: 0,
            events: (0..count)
                .map(|n| NewEvent {
                    event_type: "Noted".into(),
                    event_version: "1.0".into(),
                    payload: json!({ "n": n }),
                    metadata: meta.for_event(Uuid::now_v7()),
                })
                .collect(),
        })
        .await
        .unwrap();
    outcome.outcome().positions.iter().map(|p| p.0).collect()
}

fn lines(output: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("NDJSON"))
        .collect()
}

fn migrate_and_tail(db: TestDb) {
    let args = store_args(&db.location);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let migrated = run(&[&["migrate"], &args[..]].concat());
    assert!(migrated.status.success(), "{}", stderr(&migrated));
    // Migrating twice is fine.
    assert!(run(&[&["migrate"], &args[..]].concat()).status.success());

    let runtime = runtime();
    let positions = runtime.block_on(async {
        let store = db.open().await;
        let mut positions = append(&store, "a", 2).await;
        positions.extend(append(&store, "b", 1).await);
        store.close().await;
        positions
    });

    let all = run(&[&["events", "tail"], &args[..]].concat());
    assert!(all.status.success(), "{}", stderr(&all));
    let events = lines(&all);
    assert_eq!(events.len(), 3);
    assert_eq!(events[0]["position"], positions[0]);
    assert_eq!(events[0]["stream"], "note/a");
    assert_eq!(events[0]["sequence"], 1);
    assert_eq!(events[0]["type"], "Noted");
    assert_eq!(events[0]["payload"], json!({ "n": 0 }));
    assert_eq!(events[0]["metadata"]["actor"], "user:1");
    assert_eq!(events[0]["metadata"]["channel"], "cli-test");

    let after = positions[0].to_string();
    let rest = run(&[&["events", "tail", "--after", &after], &args[..]].concat());
    assert_eq!(lines(&rest).len(), 2);
    let only_b = run(&[&["events", "tail", "--stream", "b"], &args[..]].concat());
    assert_eq!(lines(&only_b).len(), 1);
    let typed = run(&[&["events", "tail", "--stream", "note/a"], &args[..]].concat());
    assert_eq!(lines(&typed).len(), 2);

    let unknown = run(&[&["events", "tail", "--after", "999999"], &args[..]].concat());
    assert_one_line_error(&unknown, 1, "unknown position 999999");
}

#[test]
fn migrate_and_tail_on_postgres() {
    let db = runtime().block_on(TestDb::postgres());
    migrate_and_tail(db);
}

#[test]
fn migrate_and_tail_embedded() {
    migrate_and_tail(TestDb::sqlite());
}

#[test]
fn tail_follow_prints_new_events_as_they_commit() {
    let db = TestDb::sqlite();
    let runtime = runtime();
    let store = runtime.block_on(db.open());
    runtime.block_on(append(&store, "first", 1));
    let args = store_args(&db.location);
    let mut child = stele()
        .args(["events", "tail", "--follow"])
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.contains("\"note/first\""), "{line}");
    // Appended by another process (this test): picked up by the follower.
    runtime.block_on(append(&store, "second", 1));
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert!(line.contains("\"note/second\""), "{line}");
    child.kill().unwrap();
    let _ = child.wait();
    runtime.block_on(store.close());
}

#[test]
fn bad_input_gets_one_readable_line() {
    let unreachable = run(&[
        "events",
        "tail",
        "--database-url",
        "postgres://stele@127.0.0.1:1/stele",
    ]);
    assert_one_line_error(&unreachable, 1, "cannot reach PostgreSQL at 127.0.0.1:1");

    let wrong_scheme = run(&["migrate", "--database-url", "mysql://localhost/stele"]);
    assert_one_line_error(&wrong_scheme, 1, "invalid database URL");

    let bad_position = run(&["events", "tail", "--after", "minus-one"]);
    assert_one_line_error(&bad_position, 2, "invalid position");

    let dir = TestDb::sqlite();
    let StoreLocation::Embedded(path) = &dir.location else {
        unreachable!()
    };
    let missing = run(&[
        "events",
        "tail",
        "--data-dir",
        &path.join("nothing").display().to_string(),
    ]);
    assert_one_line_error(&missing, 1, "no embedded store");

    let unmigrated = runtime().block_on(TestDb::postgres());
    let not_migrated = run(&[
        "events",
        "tail",
        "--database-url",
        unmigrated.url().unwrap(),
    ]);
    assert_one_line_error(&not_migrated, 1, "not migrated");

    let unknown_command = run(&["frobnicate"]);
    assert_eq!(unknown_command.status.code(), Some(2));
    assert_eq!(stderr(&unknown_command).trim_end().lines().count(), 1);
}

#[test]
fn logs_are_json_on_request() {
    let db = TestDb::sqlite();
    let args = store_args(&db.location);
    let output = stele()
        .args(["--log-format", "json", "migrate"])
        .args(&args)
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = stderr(&output);
    let first = text.lines().next().expect("a log line");
    let line: Value = serde_json::from_str(first).expect("JSON log line");
    assert_eq!(line["level"], "INFO");
}

#[test]
fn up_runs_until_terminated() {
    let db = TestDb::sqlite();
    let StoreLocation::Embedded(dir) = &db.location else {
        unreachable!()
    };
    let data_dir = dir.join("data");
    let mut child = stele()
        .args(["up", "--data-dir", &data_dir.display().to_string()])
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut line = String::new();
    while !line.contains("stele is up") {
        assert!(Instant::now() < deadline, "no start-up line");
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "stele up exited early"
        );
    }
    assert!(data_dir.join("stele.db").exists());
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn benchmarks_print_json() {
    let url = stele_engine::testing::admin_url();
    let append = stele()
        .args([
            "bench",
            "append",
            "--writers",
            "2",
            "--seconds",
            "1",
            "--database-url",
            &url,
        ])
        .output()
        .unwrap();
    assert!(append.status.success(), "{}", stderr(&append));
    let report: Value = serde_json::from_slice(&append.stdout).unwrap();
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert!(results[0]["ratio_to_pgbench"].as_f64().unwrap() > 0.0);
    assert!(results[1]["commands_per_sec"].as_f64().unwrap() > 0.0);

    let replay = stele()
        .args([
            "bench",
            "replay",
            "--events",
            "2000",
            "--page",
            "500",
            "--database-url",
            &url,
        ])
        .output()
        .unwrap();
    assert!(replay.status.success(), "{}", stderr(&replay));
    let report: Value = serde_json::from_slice(&replay.stdout).unwrap();
    for figure in report["results"].as_array().unwrap() {
        assert_eq!(figure["events"], 2000);
    }
}

#[test]
fn jobs_commands_inspect_and_operate_the_queue() {
    use stele_engine::queue::{NewJob, Outcome};
    let db = TestDb::sqlite();
    let runtime = runtime();
    let id = runtime.block_on(async {
        let store = db.open().await;
        let job = NewJob::new("default", "send_reply", json!({ "chat": 42 })).max_attempts(1);
        let id = store.queue.enqueue(vec![job]).await.unwrap()[0].job().id;
        store
            .queue
            .claim("default", "w", 1, Duration::from_secs(30))
            .await
            .unwrap();
        store
            .queue
            .finish(
                "w",
                vec![(
                    id,
                    Outcome::Failed {
                        error: "SMTP said no".into(),
                    },
                )],
            )
            .await
            .unwrap();
        store.close().await;
        id
    });
    let args = store_args(&db.location);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let id_text = id.to_string();

    let dead = run(&[&["jobs", "dead", "--json"], &args[..]].concat());
    assert!(dead.status.success(), "{}", stderr(&dead));
    let listed: Value = serde_json::from_slice(&dead.stdout).unwrap();
    assert_eq!(listed[0]["id"], id_text);
    assert_eq!(listed[0]["errors"][0]["error"], "SMTP said no");

    let table = run(&[&["jobs", "list"], &args[..]].concat());
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("dead") && text.contains("send_reply") && text.contains("SMTP said no"),
        "{text}"
    );

    let shown = run(&[&["jobs", "show", &id_text], &args[..]].concat());
    assert!(String::from_utf8_lossy(&shown.stdout).contains("attempt 1 at"));

    let retried = run(&[&["jobs", "retry", &id_text, "--json"], &args[..]].concat());
    let job: Value = serde_json::from_slice(&retried.stdout).unwrap();
    assert_eq!(job["state"], "available");
    let cancelled = run(&[&["jobs", "cancel", &id_text, "--json"], &args[..]].concat());
    let job: Value = serde_json::from_slice(&cancelled.stdout).unwrap();
    assert_eq!(job["state"], "cancelled");

    let again = run(&[&["jobs", "cancel", &id_text], &args[..]].concat());
    assert_one_line_error(&again, 1, "is cancelled: cancel is not possible");
    let unknown = run(&[&["jobs", "show", &Uuid::now_v7().to_string()], &args[..]].concat());
    assert_one_line_error(&unknown, 1, "no job");
    let bad_state = run(&[&["jobs", "list", "--state", "sleeping"], &args[..]].concat());
    assert_one_line_error(&bad_state, 2, "unknown job state");
}

#[test]
fn projections_streams_and_replay() {
    let db = TestDb::sqlite();
    let runtime = runtime();
    runtime.block_on(async {
        let store = db.open().await;
        append(&store, "a", 2).await;
        append(&store, "b", 1).await;
        store.close().await;
    });
    let args = store_args(&db.location);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    let streams = run(&[&["streams", "--json"], &args[..]].concat());
    assert!(streams.status.success(), "{}", stderr(&streams));
    let rows: Value = serde_json::from_slice(&streams.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 2);

    let status = run(&[&["projections", "status", "--json"], &args[..]].concat());
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    let streams = status
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "streams")
        .unwrap();
    assert_eq!(streams["status"], "running");
    assert_eq!(streams["events_applied"], 3);

    let replay = run(&[&["replay", "--projection", "streams"], &args[..]].concat());
    assert!(replay.status.success(), "{}", stderr(&replay));
    let last = lines(&replay).pop().unwrap();
    assert_eq!(last["rebuilt"], true);
    assert_eq!(last["checkpoint"]["events_applied"], 3);
    let all = run(&[&["replay", "--all"], &args[..]].concat());
    assert!(all.status.success(), "{}", stderr(&all));

    let unknown = run(&[&["replay", "--projection", "nope"], &args[..]].concat());
    assert_one_line_error(&unknown, 1, "no projection named \"nope\"");
    let neither = run(&[&["replay"], &args[..]].concat());
    assert_eq!(neither.status.code(), Some(2));
    let not_failed = run(&[&["projections", "skip", "streams"], &args[..]].concat());
    assert_one_line_error(&not_failed, 1, "skip is not possible");
}

/// Starts `stele up` on `data_dir` (with `extra` arguments, the API on a free port) and waits
/// for its start-up line.
fn start_up(data_dir: &std::path::Path, extra: &[&str]) -> std::process::Child {
    let mut child = stele()
        .args(["up", "--data-dir", &data_dir.display().to_string()])
        .args(["--listen", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until_up(&mut child);
    child
}

fn task_json(data_dir: &str, id: &str) -> Value {
    let output = run(&["tasks", "show", id, "--json", "--data-dir", data_dir]);
    assert!(output.status.success(), "{}", stderr(&output));
    serde_json::from_slice(&output.stdout).unwrap()
}

fn wait_for_task(data_dir: &str, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let task = task_json(data_dir, id);
        if done(&task) {
            return task;
        }
        assert!(Instant::now() < deadline, "task never got there: {task:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn workflows_are_listed_and_validated_with_clear_errors() {
    let list = run(&["workflows", "list", "--json"]);
    assert!(list.status.success(), "{}", stderr(&list));
    let names: Vec<String> = lines(&list)
        .iter()
        .map(|l| l["name"].as_str().unwrap().to_owned())
        .collect();
    for name in [
        "assistant",
        "bench",
        "dev_pipeline",
        "neo_core",
        "neo_subtask",
    ] {
        assert!(names.contains(&name.to_owned()), "{names:?}");
    }

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("greet.yaml"),
        "name: greet\nversion: 1\nsteps:\n  - id: hello\n    kind: reply\n    text: 'hello {{ input }}'\n",
    )
    .unwrap();
    let ok = run(&["workflows", "validate", &dir.path().display().to_string()]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert_eq!(
        String::from_utf8_lossy(&ok.stdout).trim(),
        "ok: 1 definition(s) valid"
    );

    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "name: bad\nversion: 1\nsteps:\n  - id: ask\n    kind: agent\n    agent: oracle\n    prompt: hi\n",
    )
    .unwrap();
    let refused = run(&["workflows", "validate", &bad.display().to_string()]);
    assert_one_line_error(
        &refused,
        1,
        "bad.yaml: workflow bad: step ask: unknown agent `oracle`",
    );
}

const NAPPING: &str = r#"
name: napping
version: 1
steps:
  - id: think
    kind: agent
    agent: vox
    prompt: "{{ input }}"
  - id: nap
    kind: sleep
    duration: 2s
  - id: answer
    kind: reply
    text: "rested: {{ steps.think.output }}"
"#;

/// A task created from the CLI runs under `stele up`; `up` is killed (SIGKILL) in the middle of
/// the run and started again, and the run resumes and completes.
#[test]
fn a_task_runs_under_up_and_resumes_after_a_kill() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let data_dir = data.display().to_string();
    let flows = root.path().join("flows");
    std::fs::create_dir_all(&flows).unwrap();
    std::fs::write(flows.join("napping.yaml"), NAPPING).unwrap();
    let flows = flows.display().to_string();

    let mut up = start_up(&data, &["--workflows", &flows]);
    // One `stele up` per data directory.
    let second = stele()
        .args(["up", "--data-dir", &data_dir, "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_one_line_error(&second, 1, "another `stele up`");
    let created = run(&[
        "tasks",
        "create",
        "--workflow",
        "napping",
        "--input",
        "hello",
        "--data-dir",
        &data_dir,
        "--workflows",
        &flows,
        "--json",
    ]);
    assert!(created.status.success(), "{}", stderr(&created));
    let id = serde_json::from_slice::<Value>(&created.stdout).unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Kill it while the run sleeps on its durable timer.
    wait_for_task(&data_dir, &id, |t| {
        t["run"]["steps"]["nap"]["status"] == "sleeping"
    });
    up.kill().unwrap();
    up.wait().unwrap();
    assert_eq!(task_json(&data_dir, &id)["status"], "executing");

    let mut up = start_up(&data, &["--workflows", &flows]);
    let task = wait_for_task(&data_dir, &id, |t| t["status"] == "completed");
    assert_eq!(task["result"], "rested: [vox] hello");
    assert_eq!(task["run"]["path"], json!(["think", "nap", "answer"]));

    // The history holds every step; watch prints it and returns, as the task is finished.
    let watch = run(&[
        "tasks",
        "watch",
        &id,
        "--data-dir",
        &data_dir,
        "--workflows",
        &flows,
    ]);
    assert!(watch.status.success(), "{}", stderr(&watch));
    let text = String::from_utf8_lossy(&watch.stdout);
    assert!(text.contains("TimerFired nap"), "{text}");
    assert!(text.trim_end().ends_with("TaskCompleted"), "{text}");
    let history = run(&[
        "tasks",
        "history",
        &id,
        "--data-dir",
        &data_dir,
        "--workflows",
        &flows,
    ]);
    let types: Vec<String> = lines(&history)
        .iter()
        .map(|l| l["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(types.first().map(String::as_str), Some("TaskCreated"));
    assert!(types.contains(&"TimerArmed".to_owned()));

    // Signals and cancels on a finished task are refused in one line.
    let signal = run(&[
        "tasks",
        "signal",
        &id,
        "go",
        "--data-dir",
        &data_dir,
        "--workflows",
        &flows,
    ]);
    assert_one_line_error(&signal, 1, "the run is Completed");
    let cancel = run(&[
        "tasks",
        "cancel",
        &id,
        "--data-dir",
        &data_dir,
        "--workflows",
        &flows,
    ]);
    assert_one_line_error(&cancel, 1, "cannot be cancelled");
    let malformed = run(&["tasks", "show", "nope", "--data-dir", &data_dir]);
    assert_one_line_error(&malformed, 2, "\"nope\" is not a task id");
    let unknown_id = Uuid::now_v7().to_string();
    let missing = run(&["tasks", "show", &unknown_id, "--data-dir", &data_dir]);
    assert_one_line_error(&missing, 1, &format!("no task {unknown_id}"));
    let unknown = run(&[
        "tasks",
        "create",
        "--workflow",
        "nope",
        "--input",
        "x",
        "--data-dir",
        &data_dir,
    ]);
    assert_one_line_error(&unknown, 1, "unknown workflow nope");

    Command::new("kill")
        .args(["-TERM", &up.id().to_string()])
        .status()
        .unwrap();
    assert!(up.wait().unwrap().success());
}

#[test]
fn the_workflow_benchmark_prints_json() {
    let url = stele_engine::testing::admin_url();
    let output = stele()
        .args([
            "bench",
            "workflow",
            "--runs",
            "20",
            "--in-flight",
            "5",
            "--database-url",
            &url,
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for figure in results {
        assert_eq!(figure["runs"], 20);
        assert!(figure["steps_per_sec"].as_f64().unwrap() > 0.0);
        assert!(figure["task_latency"]["p95_ms"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn the_console_benchmark_prints_json() {
    // Small, but every part: the list, the long run, its page in Chromium (the ChromeDriver and
    // Chromium that scripts/services.sh installs).
    let url = stele_engine::testing::admin_url();
    let output = stele()
        .args([
            "bench",
            "console",
            "--tasks",
            "300",
            "--steps",
            "4",
            "--requests",
            "3",
            "--database-url",
            &url,
        ])
        // Its progress shows with the test's output.
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(output.status.success());
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for figure in results {
        assert_eq!(figure["tasks"], 300);
        assert!(figure["run_events"].as_u64().unwrap() > 4);
        assert!(figure["first_page"]["p50_ms"].as_f64().unwrap() > 0.0);
        assert!(figure["pages_by_cursor"]["p50_ms"].as_f64().unwrap() > 0.0);
        assert!(figure["run_page_render"]["p50_ms"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn serve_and_worker_run_on_postgres_and_stop_cleanly() {
    let runtime = runtime();
    let db = runtime.block_on(TestDb::postgres());
    let StoreLocation::Postgres(url) = db.location.clone() else {
        unreachable!()
    };
    let redis = std::env::var("REDIS_URL").unwrap();
    let created = run(&[
        "keys",
        "create",
        "--name",
        "ops",
        "--scope",
        "admin,tasks:write",
        "--database-url",
        &url,
        "--json",
    ]);
    assert!(created.status.success(), "{}", stderr(&created));
    let key = serde_json::from_slice::<Value>(&created.stdout).unwrap()["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let listed = run(&["keys", "list", "--json", "--database-url", &url]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains("\"name\":\"ops\""));

    // Settings from a configuration file; the command line adds the database.
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("stele.toml");
    std::fs::write(
        &config,
        format!("listen = \"127.0.0.1:0\"\nredis_url = \"{redis}\"\n[rate_limit]\nper_second = 500.0\nburst = 1000\n"),
    )
    .unwrap();
    // The API process runs no jobs: every step runs in the worker process, and its progress
    // must still reach the API's live stream.
    let mut serve = stele()
        .args(["serve", "--no-workers", "--database-url", &url])
        .args(["--config", &config.display().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let address = wait_until_up(&mut serve).expect("serve prints where it listens");
    let mut worker = stele()
        .args(["worker", "--database-url", &url])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert_eq!(wait_until_up(&mut worker), None, "a worker serves no API");

    runtime.block_on(async {
        let client = reqwest::Client::new();
        let ready: Value = client
            .get(format!("http://{address}/health/ready"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(ready["ready"], true, "{ready}");
        assert_eq!(ready["redis"]["ok"], true, "{ready}");
        let created = client
            .post(format!("http://{address}/v1/tasks"))
            .bearer_auth(&key)
            .json(&json!({ "input": "hello", "workflow": "assistant" }))
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), 201);
        let id = created.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let stream = client
            .get(format!("http://{address}/v1/tasks/{id}/stream"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for event in [
            "TaskCreated",
            "StepCompleted",
            "ReplyRequested",
            "TaskCompleted",
        ] {
            assert!(
                stream.contains(&format!("event: {event}")),
                "{event} in {stream}"
            );
        }
        assert!(
            stream.trim_end().ends_with("event: end\ndata: {}"),
            "{stream}"
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let task: Value = client
                .get(format!("http://{address}/v1/tasks/{id}"))
                .bearer_auth(&key)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if task["status"] == "completed" {
                break;
            }
            assert!(Instant::now() < deadline, "{task}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let docs = client
            .get(format!("http://{address}/docs/"))
            .send()
            .await
            .unwrap();
        assert_eq!(docs.status(), 200);
        let metrics = client
            .get(format!("http://{address}/metrics"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        // HTTP latency is a histogram with buckets (not a summary), and every metric says what
        // it is.
        assert!(
            metrics.contains("# TYPE stele_http_request_duration_seconds histogram"),
            "{metrics}"
        );
        assert!(
            metrics.contains("stele_http_request_duration_seconds_bucket{"),
            "{metrics}"
        );
        let typed: Vec<&str> = metrics
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .filter_map(|rest| rest.split_whitespace().next())
            .collect();
        assert!(!typed.is_empty(), "{metrics}");
        for name in typed {
            assert!(
                metrics.contains(&format!("# HELP {name} ")),
                "{name} has no help: {metrics}"
            );
        }
    });
    terminate(&mut serve);
    terminate(&mut worker);

    let document = run(&["openapi"]);
    let document: Value = serde_json::from_slice(&document.stdout).unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    let missing = run(&["serve"]);
    assert_one_line_error(&missing, 1, "a PostgreSQL URL is needed");
    std::fs::write(&config, "listen = 5\n").unwrap();
    let bad = run(&["serve", "--config", &config.display().to_string()]);
    assert_one_line_error(&bad, 1, "stele.toml");
    drop(db);
}

fn schedule_json(data_dir: &str, name: &str) -> Value {
    let output = run(&["schedules", "show", name, "--json", "--data-dir", data_dir]);
    assert!(output.status.success(), "{}", stderr(&output));
    serde_json::from_slice(&output.stdout).unwrap()
}

fn wait_for_schedule(data_dir: &str, name: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let schedule = schedule_json(data_dir, name);
        if done(&schedule) {
            return schedule;
        }
        assert!(Instant::now() < deadline, "never got there: {schedule:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn schedules_fire_under_up_catch_up_after_a_kill_and_are_managed_from_the_cli() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let data_dir = data.display().to_string();
    let schedules = |args: &[&str]| {
        let mut all = vec!["schedules"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--data-dir", &data_dir]);
        run(&all)
    };
    let migrated = run(&["migrate", "--data-dir", &data_dir]);
    assert!(migrated.status.success(), "{}", stderr(&migrated));
    // Refusals, each in one readable line.
    for (args, expected) in [
        (
            vec![
                "add",
                "beat",
                "--every",
                "0s",
                "--workflow",
                "assistant",
                "--input",
                "x",
            ],
            "not a whole number of seconds",
        ),
        (
            vec![
                "add",
                "beat",
                "--cron",
                "61 * * * *",
                "--workflow",
                "assistant",
                "--input",
                "x",
            ],
            "is not a cron pattern",
        ),
        (
            vec![
                "add",
                "beat",
                "--every",
                "1s",
                "--workflow",
                "nope",
                "--input",
                "x",
            ],
            "unknown workflow nope",
        ),
        (
            vec![
                "add",
                "Beat",
                "--every",
                "1s",
                "--workflow",
                "assistant",
                "--input",
                "x",
            ],
            "a schedule's name is",
        ),
        (vec!["pause", "nope"], "there is no schedule \"nope\""),
    ] {
        assert_one_line_error(&schedules(&args), 1, expected);
    }
    let added = schedules(&[
        "add",
        "beat",
        "--every",
        "1s",
        "--workflow",
        "assistant",
        "--input",
        "check in",
        "--json",
    ]);
    assert!(added.status.success(), "{}", stderr(&added));
    let added: Value = serde_json::from_slice(&added.stdout).unwrap();
    assert_eq!(
        (added["status"].as_str(), added["every_seconds"].as_u64()),
        (Some("active"), Some(1))
    );

    let mut up = start_up(&data, &[]);
    let fired = wait_for_schedule(&data_dir, "beat", |s| s["fired"].as_u64() >= Some(2));
    let task = fired["last_task_id"].as_str().unwrap().to_owned();
    let task = wait_for_task(&data_dir, &task, |t| t["status"] == "completed");
    assert_eq!(task["input"], "check in");
    // Killed for a while: the moments missed are caught up by the policy (latest: the last
    // fires, the others are recorded as skipped) once a node runs again.
    up.kill().unwrap();
    up.wait().unwrap();
    let before = schedule_json(&data_dir, "beat");
    std::thread::sleep(Duration::from_millis(3500));
    let mut up = start_up(&data, &[]);
    let after = wait_for_schedule(&data_dir, "beat", |s| {
        s["fired"].as_u64() > before["fired"].as_u64() && s["skipped"].as_u64() >= Some(1)
    });
    assert!(after["skipped"].as_u64().unwrap() >= 2, "{after:#}");

    let list = schedules(&["list"]);
    assert!(list.status.success(), "{}", stderr(&list));
    assert!(stderr(&list).is_empty(), "{}", stderr(&list));
    let text = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(
        text.starts_with("beat  active  every 1s → assistant"),
        "{text}"
    );
    let paused = schedules(&["pause", "beat"]);
    assert!(paused.status.success(), "{}", stderr(&paused));
    let count = schedule_json(&data_dir, "beat")["fired"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(2000));
    let still = schedule_json(&data_dir, "beat");
    assert_eq!(
        (still["status"].as_str(), still["fired"].as_u64()),
        (Some("paused"), Some(count))
    );
    assert!(schedules(&["resume", "beat"]).status.success());
    wait_for_schedule(&data_dir, "beat", |s| s["fired"].as_u64() > Some(count));
    assert!(schedules(&["remove", "beat"]).status.success());
    assert_one_line_error(
        &schedules(&["resume", "beat"]),
        1,
        "the schedule was removed",
    );
    terminate(&mut up);
}

#[test]
fn models_are_listed_and_tested_through_the_router() {
    let list = run(&["models", "list", "--json"]);
    assert!(list.status.success(), "{}", stderr(&list));
    let overview: Value = serde_json::from_slice(&list.stdout).unwrap();
    let providers = overview["providers"].as_array().unwrap();
    assert!(
        providers.iter().any(|p| p["name"] == "scripted"
            && p["kind"] == "scripted"
            && p["circuit"] == "closed"),
        "{overview}"
    );
    let vox = overview["roles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "vox")
        .unwrap();
    assert_eq!(vox["route"][0], "scripted/vox");
    let text = run(&["models", "list"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("vox"));

    let tested = run(&["models", "test", "vox", "--prompt", "hello there", "--json"]);
    assert!(tested.status.success(), "{}", stderr(&tested));
    let tested: Value = serde_json::from_slice(&tested.stdout).unwrap();
    assert_eq!(tested["model"], "scripted/vox");
    assert_eq!(tested["fallback_index"], 0);
    assert!(
        tested["answer"].as_str().unwrap().contains("hello there"),
        "{tested}"
    );
    let line = run(&["models", "test", "vox"]);
    assert!(line.status.success(), "{}", stderr(&line));
    assert!(String::from_utf8_lossy(&line.stdout).starts_with("vox: scripted/vox answered in "));

    assert_one_line_error(
        &run(&["models", "test", "nope"]),
        1,
        "there is no agent role \"nope\"",
    );
    assert_one_line_error(
        &run(&["models", "test", "vox", "--model", "nowhere"]),
        1,
        "--model \"nowhere\"",
    );
}

#[test]
fn a_roles_model_is_chosen_from_the_cli_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().display().to_string();
    let migrated = run(&["migrate", "--data-dir", &data_dir]);
    assert!(migrated.status.success(), "{}", stderr(&migrated));
    let chosen = run(&[
        "models",
        "use",
        "noop",
        "scripted/noop",
        "--data-dir",
        &data_dir,
    ]);
    assert!(chosen.status.success(), "{}", stderr(&chosen));
    assert_eq!(
        String::from_utf8_lossy(&chosen.stdout),
        "noop now tries scripted/noop first in every task\n"
    );
    let outside = run(&[
        "models",
        "use",
        "noop",
        "openai/gpt-4o",
        "--data-dir",
        &data_dir,
    ]);
    assert_one_line_error(&outside, 1, "agent role noop cannot use \"openai/gpt-4o\"");
    let nobody = run(&[
        "models",
        "use",
        "nobody",
        "default",
        "--data-dir",
        &data_dir,
    ]);
    assert_one_line_error(&nobody, 1, "there is no agent role \"nobody\"");
    let back = run(&["models", "use", "noop", "default", "--data-dir", &data_dir]);
    assert!(back.status.success(), "{}", stderr(&back));
    let events = run(&["events", "tail", "--data-dir", &data_dir]);
    let events = String::from_utf8_lossy(&events.stdout);
    let chosen = events
        .lines()
        .filter(|l| l.contains("\"RoleModelChosen\""))
        .count();
    assert_eq!(chosen, 2, "{events}");
}
