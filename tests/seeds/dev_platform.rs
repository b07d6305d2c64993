//! The development platform driven from Telegram: `/new_task create a hello world web page`
//! becomes a task on the shipped `dev_pipeline`; the planner plans, the coder writes the page and
//! its test into the run's workspace, the executor and the tester run them in the sandbox, the
//! reviewer reads the page; the chat's status message is edited as the steps finish, the API's
//! WebSocket streams the run live, and the result (with the files) is there at the end.

use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::Value;

use crate::support::telegram::{FakeBot, TOKEN};
use crate::support::{dev_models, stderr, stele, wait_until_up_keeping};

const CHAT: i64 = 1001;

#[test]
fn a_chat_request_becomes_a_tested_and_reviewed_page() {
    let bot = FakeBot::start();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data").display().to_string();
    let models = dev_models(dir.path());
    let mut node = stele()
        .args(["up", "--data-dir", &data_dir, "--listen", "127.0.0.1:0"])
        .args(["--models", &models, "--sandbox", "bubblewrap"])
        .env("STELE_TELEGRAM_TOKEN", TOKEN)
        .env("STELE_TELEGRAM_API_URL", &bot.url)
        .env_remove("STELE_TELEGRAM_ALLOW")
        .env_remove("STELE_TELEGRAM_WORKFLOW")
        .env_remove("STELE_EMBEDDING_MODEL")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (address, _log) = wait_until_up_keeping(&mut node);
    let mut node = scopeguard::guard(node, |mut node| {
        let _ = node.kill();
        let _ = node.wait();
    });
    let base = format!("http://{}", address.expect("the API's address"));
    let created = stele()
        .args([
            "keys",
            "create",
            "--name",
            "dev",
            "--scope",
            "tasks:read",
            "--json",
        ])
        .args(["--data-dir", &data_dir])
        .output()
        .unwrap();
    assert!(created.status.success(), "{}", stderr(&created));
    let key = serde_json::from_slice::<Value>(&created.stdout).unwrap()["key"]
        .as_str()
        .unwrap()
        .to_owned();

    bot.say(CHAT, CHAT, "/new_task create a hello world web page");
    let status = bot.wait_for(CHAT, "(dev_pipeline)");
    assert!(status.starts_with("⏳"), "{status}");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let http = reqwest::Client::new();
    let get = |path: String| {
        let request = http.get(format!("{base}{path}")).bearer_auth(&key);
        rt.block_on(async {
            let response = request.send().await.unwrap();
            assert!(
                response.status().is_success(),
                "{path}: {}",
                response.status()
            );
            response.json::<Value>().await.unwrap()
        })
    };
    // The task the chat asked for, found over the API.
    let deadline = Instant::now() + Duration::from_secs(30);
    let task = loop {
        let page = get("/v1/tasks?workflow=dev_pipeline".into());
        if let Some(task) = page["tasks"].as_array().and_then(|t| t.first()) {
            break task["id"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "no task: {page}");
        std::thread::sleep(Duration::from_millis(100));
    };

    // The run, live over the WebSocket, from its first event to the task's completion.
    let streamed: Vec<String> = rt.block_on(async {
        let url = format!("{}/v1/tasks/{task}/ws", base.replace("http", "ws"));
        let mut request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
                .unwrap();
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
        let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        let mut types = Vec::new();
        while let Some(message) = tokio::time::timeout(Duration::from_secs(60), socket.next())
            .await
            .expect("the run goes on")
        {
            if let tokio_tungstenite::tungstenite::Message::Text(text) = message.unwrap() {
                let value: Value = serde_json::from_str(&text).unwrap();
                let kind = value["event"]["type"].as_str().unwrap_or("").to_owned();
                let done = kind == "TaskCompleted" || kind == "TaskFailed";
                types.push(kind);
                if done {
                    break;
                }
            }
        }
        types
    });
    assert_eq!(
        streamed.last().map(String::as_str),
        Some("TaskCompleted"),
        "{streamed:?}"
    );
    assert_eq!(
        streamed.iter().filter(|t| *t == "StepCompleted").count(),
        8,
        "plan, planned, code, execute, test, tested, review, done: {streamed:?}"
    );

    // In the chat: one status message, edited as the steps finished, and the pipeline's replies.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let edits: Vec<Value> = bot
            .calls("editMessageText")
            .into_iter()
            .filter(|c| c["params"]["chat_id"].as_i64() == Some(CHAT))
            .collect();
        let last = edits
            .last()
            .map(|e| e["params"]["text"].as_str().unwrap().to_owned());
        if let Some(last) = last.filter(|text| text.starts_with("✅")) {
            for step in ["plan", "code", "execute", "test", "review"] {
                assert!(last.contains(&format!("✓ {step}")), "{last}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "never done: {edits:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    bot.wait_for(CHAT, "Plan ready: 1 step(s)");
    bot.wait_for(CHAT, "Done. Tests: 1 test passed. Review: approve.");

    // The result, and the files the agents made, over the API.
    let done = get(format!("/v1/tasks/{task}"));
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["result"]["review"]["verdict"], "approve", "{done}");
    let workspace = get(format!("/v1/tasks/{task}/workspace"));
    let files: Vec<&str> = workspace["runs"][0]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        files,
        ["site/index.html", "test-report.txt", "test_page.py"],
        "{workspace}"
    );
    let page = rt.block_on(async {
        http.get(format!(
            "{base}/v1/tasks/{task}/workspace/file?path=site/index.html"
        ))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
    });
    assert!(page.contains("<h1>Hello, world</h1>"), "{page}");
    // The tests ran in the sandbox, passing; each command is in the steps' events.
    let events = get(format!("/v1/tasks/{task}/events"));
    let commands: Vec<Value> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "StepCompleted")
        .flat_map(|e| {
            e["payload"]["data"]["calls"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter(|call| call["tool"] == "shell.run")
        .collect();
    assert_eq!(commands.len(), 2, "{commands:?}");
    assert!(commands
        .iter()
        .all(|c| c["output"]["exit_code"] == 0 && c["output"]["sandbox"] == "bubblewrap"));
    assert_eq!(commands[1]["output"]["stdout"], "1 test passed\n");
    crate::support::terminate(&mut node);
}
