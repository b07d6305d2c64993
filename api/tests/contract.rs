//! The API against its OpenAPI document, judged by tools from outside: schemathesis explores
//! every operation (all its checks, the stateful phase included) against a running server, and a
//! client generated from the committed document drives the main flows. Both tools live in the
//! Python environment `scripts/services.sh` provisions (`STELE_SCHEMATHESIS`,
//! `STELE_OPENAPI_CLIENT`, and its Python, `STELE_OPENAPI_VALIDATOR`).

mod support;

use std::path::{Path, PathBuf};

use serde_json::Value;
use stele_aggregates::api_key::Scope;
use support::{Options, Server};

fn runtime() -> tokio::runtime::Runtime {
    stele_engine::testing::runtime()
}

fn tool(variable: &str) -> String {
    std::env::var(variable).unwrap_or_else(|_| {
        panic!("{variable} is not set: run the suite with scripts/test (scripts/services.sh provisions it)")
    })
}

/// A directory of the test's own, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("stele-contract-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn here(file: &str) -> String {
    format!("{}/tests/{file}", env!("CARGO_MANIFEST_DIR"))
}

/// A server, with the approval workflow (whose runs wait for a signal) or not, and a key with
/// every scope.
async fn server(approval: bool) -> (Server, String) {
    let s = Server::start(Options {
        approval,
        ..Options::default()
    })
    .await;
    let key = s
        .key(
            "contract",
            vec![Scope::Admin, Scope::TasksRead, Scope::TasksWrite],
        )
        .await;
    (s, key)
}

fn report(output: &std::process::Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Schemathesis, every check, every phase (examples, coverage, fuzzing, stateful), against the
/// document the server serves. The run is bounded by examples per operation and seeded, so it
/// repeats. What the document cannot say is let through by `schemathesis_hooks.py`, which
/// names each case; the WebSocket routes are left out (schemathesis speaks HTTP, not WebSocket;
/// `api.rs` follows it).
#[test]
fn schemathesis_finds_no_difference_between_the_server_and_its_document() {
    runtime().block_on(async {
        // No run waits: a generated request would not send the signal, and a followed stream
        // would stay open.
        let (s, key) = server(false).await;
        let scratch = Scratch::new();
        let output = tokio::process::Command::new(tool("STELE_SCHEMATHESIS"))
            .current_dir(scratch.path())
            .env("SCHEMATHESIS_HOOKS", here("schemathesis_hooks.py"))
            .args(["run", &format!("{}/openapi.json", s.base)])
            .args(["--url", &s.base])
            .args(["--header", &format!("Authorization: Bearer {key}")])
            .args(["--checks", "all"])
            .args(["--phases", "examples,coverage,fuzzing,stateful"])
            .args(["--max-examples", "25", "--seed", "20261130"])
            .args(["--workers", "1", "--request-timeout", "20"])
            .args(["--generation-database", "none", "--no-color"])
            .args(["--exclude-path", "/v1/tasks/{id}/ws"])
            .args(["--exclude-path", "/v1/rooms/{name}/ws"])
            .output()
            .await
            .unwrap();
        let text = report(&output);
        assert!(output.status.success(), "{text}");
        assert!(text.contains("Stateful"), "{text}");
        s.stop().await;
    });
}

/// A Python client generated from the committed document (openapi-python-client, failing on any
/// warning) creates, follows, reads, lists, cancels and signals tasks and reads the operators'
/// views, parsing every answer into the document's models.
#[test]
fn a_client_generated_from_the_committed_document_parses_every_answer() {
    let scratch = Scratch::new();
    let config = scratch.path().join("config.json");
    // The generated code is not formatted: nothing reads it but the test.
    std::fs::write(&config, r#"{"post_hooks": []}"#).unwrap();
    let package = scratch.path().join("stele_client");
    let generated = std::process::Command::new(tool("STELE_OPENAPI_CLIENT"))
        .args(["generate", "--meta", "none", "--fail-on-warning"])
        .arg("--path")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../openapi/openapi.json"
        ))
        .arg("--output-path")
        .arg(&package)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(generated.status.success(), "{}", report(&generated));
    runtime().block_on(async {
        let (s, key) = server(true).await;
        let output = tokio::process::Command::new(tool("STELE_OPENAPI_VALIDATOR"))
            .arg(here("generated_client.py"))
            .arg(scratch.path())
            .args([&s.base, &key])
            .output()
            .await
            .unwrap();
        let text = report(&output);
        assert!(output.status.success(), "{text}");
        assert!(text.contains("every call answered as documented"), "{text}");
        s.stop().await;
    });
}

/// What every operation shares is in the document once per operation: a key by either scheme,
/// 401 with its challenge, 429 with `Retry-After`, and a 500 problem.
#[test]
fn every_operation_documents_what_it_shares() {
    let document = serde_json::to_value(stele_api::server::openapi()).unwrap();
    let schemes = &document["components"]["securitySchemes"];
    assert_eq!(schemes["api_key"]["scheme"], "bearer");
    assert_eq!(schemes["api_key_header"]["name"], "X-Api-Key");
    let mut operations = 0;
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            operations += 1;
            let at = format!("{method} {path}");
            let responses = &operation["responses"];
            for status in ["400", "500"] {
                assert_eq!(
                    responses[status]["content"]["application/problem+json"]["schema"]["$ref"],
                    "#/components/schemas/Problem",
                    "{at} {status}"
                );
            }
            if path.starts_with("/health/") {
                assert!(operation.get("security").is_none(), "{at}");
                continue;
            }
            let security = operation["security"].as_array().expect(&at);
            let scopes = &security[0]["api_key"];
            assert!(scopes.as_array().is_some_and(|s| s.len() == 1), "{at}");
            assert_eq!(security[1]["api_key_header"], *scopes, "{at}");
            assert!(
                responses["401"]["headers"]["WWW-Authenticate"].is_object(),
                "{at}"
            );
            assert!(responses["403"].is_object(), "{at}");
            assert!(
                responses["429"]["headers"]["Retry-After"].is_object(),
                "{at}"
            );
            if operation.get("requestBody").is_some() {
                for status in ["413", "415", "422"] {
                    assert!(responses[status].is_object(), "{at} {status}");
                }
            }
        }
    }
    assert_eq!(operations, 53);
    // The fields of JSON answers are all present, `null` when empty; values of any JSON type are
    // declared as such.
    let schemas = &document["components"]["schemas"];
    for (name, field) in [
        ("TaskBody", "result"),
        ("TaskSummary", "result"),
        ("StepBody", "output"),
    ] {
        let schema = &schemas[name];
        assert!(
            schema["required"]
                .as_array()
                .unwrap()
                .contains(&Value::from(field)),
            "{name}.{field}"
        );
        assert!(
            schema["properties"][field].get("type").is_none(),
            "{name}.{field} takes any JSON value: {}",
            schema["properties"][field]
        );
    }
}
