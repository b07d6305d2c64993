//! Traces over OTLP, received by an OTLP/HTTP collector on loopback: a task created over HTTP by
//! an API-only `stele serve` and run by a separate `stele worker` is one trace (the caller's span,
//! the request, the start job, each step, each model call, the reply); a Telegram message is the
//! root of the trace that ends with its answer's sending.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::routing::post;
use serde_json::{json, Value};
use stele_engine::testing::TestDb;

mod support;
use support::telegram::{FakeBot, TOKEN};
use support::{run, stderr, stele, terminate, wait_until_up};

const TRACED: &str = r#"
name: traced
version: 1
steps:
  - id: think
    kind: agent
    agent: vox
    prompt: "{{ input }}"
  - id: check
    kind: agent
    agent: vox
    prompt: "check {{ steps.think.output }}"
  - id: answer
    kind: reply
    text: "done: {{ steps.check.output }}"
"#;

/// One received span.
#[derive(Clone, Debug)]
struct Span {
    trace: String,
    id: String,
    parent: String,
    name: String,
    attributes: HashMap<String, String>,
    /// The `service.instance.id` of the process that sent it.
    process: String,
}

type Received = Arc<Mutex<Vec<Span>>>;

/// The request bodies as they came (to look for what must not be in them).
type Bodies = Arc<Mutex<Vec<String>>>;

/// What an OTLP attribute value holds, as text.
fn text(value: &Value) -> String {
    ["stringValue", "intValue", "boolValue", "doubleValue"]
        .iter()
        .find_map(|kind| value.get(*kind))
        .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
        .unwrap_or_default()
}

fn attributes(list: &Value) -> HashMap<String, String> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            (
                a["key"].as_str().unwrap_or("").to_owned(),
                text(&a["value"]),
            )
        })
        .collect()
}

/// An OTLP/HTTP collector (`http/json`) on loopback: its address and what it received.
async fn collector() -> (String, Received, Bodies) {
    let received = Received::default();
    let bodies = Bodies::default();
    let store = received.clone();
    let raw = bodies.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: axum::body::Bytes| {
            let store = store.clone();
            let raw = raw.clone();
            async move {
                raw.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&body).into_owned());
                let request: Value = serde_json::from_slice(&body).expect("OTLP JSON");
                let mut spans = store.lock().unwrap();
                for resource in request["resourceSpans"].as_array().into_iter().flatten() {
                    let process = attributes(&resource["resource"]["attributes"])
                        .remove("service.instance.id")
                        .unwrap_or_default();
                    for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                        for span in scope["spans"].as_array().into_iter().flatten() {
                            let field = |name: &str| span[name].as_str().unwrap_or("").to_owned();
                            spans.push(Span {
                                trace: field("traceId"),
                                id: field("spanId"),
                                parent: field("parentSpanId"),
                                name: field("name"),
                                attributes: attributes(&span["attributes"]),
                                process: process.clone(),
                            });
                        }
                    }
                }
                axum::Json(json!({}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{address}"), received, bodies)
}

/// The spans of `trace` received so far.
fn of_trace(received: &Received, trace: &str) -> Vec<Span> {
    received
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.trace == trace)
        .cloned()
        .collect()
}

/// Whether `span`'s every ancestor up to the one whose parent is `root` was received.
fn descends(span: &Span, spans: &[Span], root: &str) -> bool {
    let mut at = span;
    for _ in 0..100 {
        if at.parent == root {
            return true;
        }
        let Some(parent) = spans.iter().find(|s| s.id == at.parent) else {
            return false;
        };
        at = parent;
    }
    false
}

/// Waits (20 s at most) until `complete` holds of the spans of `trace` and each of them descends
/// from `root`: spans come in batches, each when it ends.
fn wait_for_trace(
    received: &Received,
    trace: &str,
    root: &str,
    complete: impl Fn(&[Span]) -> bool,
) -> Vec<Span> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let spans = of_trace(received, trace);
        if complete(&spans) && spans.iter().all(|s| descends(s, &spans, root)) {
            return spans;
        }
        assert!(
            Instant::now() < deadline,
            "the trace is incomplete: {:#?}",
            spans
                .iter()
                .map(|s| (&s.name, descends(s, &spans, root)))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn node(command: &str, url: &str, flows: &std::path::Path, endpoint: &str) -> Child {
    stele()
        .args([command, "--database-url", url])
        .args(["--workflows", &flows.display().to_string()])
        .args(if command == "serve" {
            &["--listen", "127.0.0.1:0", "--no-workers"][..]
        } else {
            &[][..]
        })
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env_remove("OTEL_SERVICE_NAME")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_task_is_one_trace_across_the_api_and_worker_processes() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = runtime.block_on(TestDb::postgres());
    let url = db.url().unwrap().to_owned();
    let migrated = run(&["migrate", "--database-url", &url]);
    assert!(migrated.status.success(), "{}", stderr(&migrated));
    let created = run(&[
        "keys",
        "create",
        "--name",
        "traces",
        "--scope",
        "admin",
        "--database-url",
        &url,
        "--json",
    ]);
    assert!(created.status.success(), "{}", stderr(&created));
    let key = serde_json::from_slice::<Value>(&created.stdout).unwrap()["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let flows = tempfile::tempdir().unwrap();
    std::fs::write(flows.path().join("traced.yaml"), TRACED).unwrap();

    let (endpoint, received, _) = runtime.block_on(collector());
    let mut serve = node("serve", &url, flows.path(), &endpoint);
    let address = wait_until_up(&mut serve).expect("serves the API");
    let mut worker = node("worker", &url, flows.path(), &endpoint);
    wait_until_up(&mut worker);

    // The caller's own trace: the task's spans are to continue it.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    let base = format!("http://{address}");
    let task = runtime.block_on(async {
        let client = reqwest::Client::new();
        let created = client
            .post(format!("{base}/v1/tasks"))
            .bearer_auth(&key)
            .header("traceparent", format!("00-{trace}-{caller}-01"))
            .json(&json!({ "input": "what is traced?", "workflow": "traced" }))
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), 201);
        let id = created.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let task: Value = client
                .get(format!("{base}/v1/tasks/{id}"))
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
            assert!(Instant::now() < deadline, "not completed: {task}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The log records the trace with the task's first event.
        let events: Value = client
            .get(format!("{base}/v1/tasks/{id}/events"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let first = &events["events"][0];
        assert_eq!(first["type"], "TaskCreated");
        let recorded = first["metadata"]["trace_id"].as_str().unwrap();
        assert!(recorded.starts_with(&format!("00-{trace}-")), "{recorded}");
        id
    });

    let spans = wait_for_trace(&received, trace, caller, |spans| {
        spans.iter().any(|s| s.name == "workflow.reply")
            && spans.iter().filter(|s| s.name.starts_with("chat ")).count() >= 2
    });
    terminate(&mut serve);
    terminate(&mut worker);

    let named = |name: &str| -> Vec<&Span> { spans.iter().filter(|s| s.name == name).collect() };
    // The request continues the caller's span, and every other span descends from it.
    let request = named("POST /v1/tasks");
    assert_eq!(request.len(), 1, "{spans:#?}");
    assert_eq!(request[0].parent, caller);
    assert_eq!(request[0].attributes["http.response.status_code"], "201");
    // The start job, each step, each model call under its step, and the reply.
    assert_eq!(named("workflow.start").len(), 1, "{spans:#?}");
    for step in ["step think", "step check"] {
        let step = named(step);
        assert_eq!(step.len(), 1, "{spans:#?}");
        assert_eq!(step[0].attributes["workflow.name"], "traced");
        let calls: Vec<_> = spans
            .iter()
            .filter(|s| s.name.starts_with("chat ") && s.parent == step[0].id)
            .collect();
        assert_eq!(calls.len(), 1, "one model call in {:?}", step[0].name);
        assert_eq!(calls[0].attributes["gen_ai.operation.name"], "chat");
        assert!(calls[0]
            .attributes
            .contains_key("gen_ai.usage.output_tokens"));
        assert_eq!(calls[0].attributes["gen_ai.agent.name"], "vox");
    }
    assert_eq!(named("workflow.reply").len(), 1, "{spans:#?}");
    // Two processes: the request's spans from the API's, the steps' from the worker's.
    let processes: HashSet<&str> = spans.iter().map(|s| s.process.as_str()).collect();
    assert_eq!(processes.len(), 2, "{processes:?}");
    assert_ne!(request[0].process, named("step think")[0].process);
    eprintln!("task {task}: {} spans in one trace", spans.len());
}

/// A Telegram message is the root of its own trace: the update, the inbound job, the run's jobs
/// and steps with their model calls, and the reply's sending; no span holds what was said.
#[test]
fn a_telegram_message_is_one_trace_to_its_reply_and_spans_hold_no_words() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (endpoint, received, bodies) = runtime.block_on(collector());
    let bot = FakeBot::start();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data").display().to_string();
    let mut child = stele()
        .args(["up", "--data-dir", &data_dir, "--listen", "127.0.0.1:0"])
        .env("STELE_TELEGRAM_TOKEN", TOKEN)
        .env("STELE_TELEGRAM_API_URL", &bot.url)
        .env_remove("STELE_TELEGRAM_ALLOW")
        .env_remove("STELE_TELEGRAM_WORKFLOW")
        .env_remove("STELE_EMBEDDING_MODEL")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until_up(&mut child);

    bot.say(
        8_406_112_393,
        8_406_112_393,
        "the lighthouse keeper's secret",
    );
    bot.wait_for(8_406_112_393, "lighthouse keeper");
    let deadline = Instant::now() + Duration::from_secs(20);
    let trace = loop {
        let root = received
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.name == "telegram update" && s.parent.is_empty())
            .map(|s| s.trace.clone());
        if let Some(trace) = root {
            break trace;
        }
        assert!(Instant::now() < deadline, "no span of the update");
        std::thread::sleep(Duration::from_millis(100));
    };
    let spans = wait_for_trace(&received, &trace, "", |spans| {
        spans.iter().any(|s| s.name == "telegram.send")
            && spans.iter().any(|s| s.name.starts_with("chat "))
    });
    terminate(&mut child);

    let names: HashSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    for name in [
        "telegram update",
        "telegram.inbound",
        "workflow.start",
        "telegram.send",
    ] {
        assert!(names.contains(name), "{name} in {names:?}");
    }
    assert!(names.iter().any(|n| n.starts_with("step ")), "{names:?}");
    let roots: Vec<_> = spans.iter().filter(|s| s.parent.is_empty()).collect();
    assert_eq!(roots.len(), 1, "one root: {roots:#?}");
    // Traces leave the node: nothing a person said goes with them.
    for body in bodies.lock().unwrap().iter() {
        assert!(!body.contains("lighthouse"), "{body}");
        assert!(!body.contains("8406112393"), "{body}");
    }
}
