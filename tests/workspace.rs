//! The shipped `dev_pipeline` doing real work through its tools, end to end through the binary:
//! the scripted model's tool calls make the coder write a page and its test into the run's
//! workspace, the executor and tester run them in the sandbox, the reviewer reads the page; the
//! files are there after the run (`stele tasks workspace`), and each command with its exit code
//! and output is in the steps' events.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

mod support;
use support::{stderr, stele, terminate, wait_until_up};

fn cli(data_dir: &str, args: &[&str]) -> std::process::Output {
    stele()
        .args(args)
        .args(["--data-dir", data_dir])
        .output()
        .unwrap()
}

#[test]
fn the_dev_pipeline_writes_runs_and_tests_code_in_its_workspace() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().display().to_string();
    let models_file = support::dev_models(dir.path());

    let mut up = stele()
        .args(["up", "--data-dir", &data_dir, "--listen", "127.0.0.1:0"])
        .args(["--models", &models_file, "--sandbox", "bubblewrap"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until_up(&mut up);
    // Stopped even when an assertion fails on the way.
    let mut up = scopeguard::guard(up, |mut up| {
        let _ = up.kill();
        let _ = up.wait();
    });

    let created = cli(
        &data_dir,
        &[
            "tasks",
            "create",
            "--workflow",
            "dev_pipeline",
            "--input",
            "create a hello world web page",
        ],
    );
    assert!(created.status.success(), "{}", stderr(&created));
    let id = String::from_utf8(created.stdout).unwrap().trim().to_owned();

    let deadline = Instant::now() + Duration::from_secs(90);
    let task = loop {
        let shown = cli(&data_dir, &["tasks", "show", &id, "--json"]);
        assert!(shown.status.success(), "{}", stderr(&shown));
        let task: Value = serde_json::from_slice(&shown.stdout).unwrap();
        if task["status"] == "completed" || task["status"] == "failed" {
            break task;
        }
        assert!(Instant::now() < deadline, "not done in time: {task}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(task["status"], "completed", "{task}");
    let result = task.to_string();
    assert!(result.contains("1 test passed"), "{result}");
    assert!(result.contains("approve"), "{result}");

    // The files are there after the run, through the CLI.
    let listed = cli(&data_dir, &["tasks", "workspace", &id, "--json"]);
    assert!(listed.status.success(), "{}", stderr(&listed));
    let listing: Value = serde_json::from_slice(&listed.stdout).unwrap();
    let paths: Vec<&str> = listing["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        ["site/index.html", "test-report.txt", "test_page.py"]
    );
    let page = cli(&data_dir, &["tasks", "workspace", &id, "site/index.html"]);
    assert!(page.status.success(), "{}", stderr(&page));
    assert!(String::from_utf8_lossy(&page.stdout).contains("<h1>Hello, world</h1>"));
    let outside = cli(&data_dir, &["tasks", "workspace", &id, "../../etc/passwd"]);
    assert_eq!(outside.status.code(), Some(1));
    assert!(
        stderr(&outside).contains("`..` is refused"),
        "{}",
        stderr(&outside)
    );

    // Each command, its exit code and its output are in the steps' events.
    let history = cli(&data_dir, &["tasks", "history", &id]);
    assert!(history.status.success(), "{}", stderr(&history));
    let events: Vec<Value> = String::from_utf8_lossy(&history.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let runs: Vec<Value> = events
        .iter()
        .filter(|e| e["type"] == "StepCompleted")
        .flat_map(|e| {
            e["payload"]["data"]["calls"]["$personal"]["value"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter(|call| call["tool"] == "shell.run")
        .collect();
    assert_eq!(
        runs.len(),
        2,
        "{}",
        String::from_utf8_lossy(&history.stdout)
    );
    for run in &runs {
        assert_eq!(run["output"]["exit_code"], 0, "{run}");
        assert_eq!(run["output"]["sandbox"], "bubblewrap", "{run}");
    }
    assert_eq!(runs[1]["output"]["stdout"], "1 test passed\n", "{runs:?}");
    let report = cli(&data_dir, &["tasks", "workspace", &id, "test-report.txt"]);
    assert_eq!(String::from_utf8_lossy(&report.stdout), "1 test passed\n");
    terminate(&mut up);
}
