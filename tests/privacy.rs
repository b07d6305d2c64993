//! A person's data end to end, through the binary's real interfaces (HTTP API and CLI), on both
//! stores: they talk, consent and withdraw, are exported and erased; afterwards a raw dump of the
//! database holds none of their words, the task reads `[erased]`, the export says so, and the log
//! still replays. Also: a key-encryption key other than the store's is refused before anything
//! is read or written, and the consent policy refuses what a person has not agreed to.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stele_engine::testing::TestDb;
use stele_engine::StoreLocation;

mod support;
use support::{stderr, stele, terminate, wait_until_up_keeping, Drained};

/// What the person said and who they are: none of it may be stored readable once they are erased.
const SECRET: &str = "SECRET-PLAN-4711";
const ADDRESS: &str = "ana.secret@example.org";
const GUARDIAN: &str = "Guardian Gwendolyn";

fn runtime() -> tokio::runtime::Runtime {
    stele_engine::testing::runtime()
}

/// A store the binary runs on, and how to point a command at it.
enum Backend {
    /// The data directory (its key-encryption key made there on first start).
    Embedded(tempfile::TempDir),
    /// The database (dropped with the test) and its URL.
    Postgres(#[allow(dead_code)] TestDb, String),
}

impl Backend {
    fn args(&self) -> Vec<String> {
        match self {
            Backend::Embedded(dir) => vec!["--data-dir".into(), dir.path().display().to_string()],
            Backend::Postgres(_, url) => vec!["--database-url".into(), url.clone()],
        }
    }

    /// `stele` with this store's key: the embedded store's own file, or the shared test key.
    fn command(&self) -> Command {
        let mut command = stele();
        if let Backend::Embedded(_) = self {
            command.env_remove("STELE_KEK");
        }
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .args(self.args())
            .output()
            .unwrap()
    }

    fn start(&self, extra: &[&str]) -> (Child, String, Drained) {
        let mut command = self.command();
        match self {
            Backend::Embedded(dir) => {
                command.args(["up", "--data-dir", &dir.path().display().to_string()]);
            }
            Backend::Postgres(_, url) => {
                command.args(["serve", "--database-url", url]);
            }
        }
        let mut child = command
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (address, drained) = wait_until_up_keeping(&mut child);
        (child, address.expect("the node listens"), drained)
    }

    /// Every byte the store holds: a plain-SQL `pg_dump`, or the embedded store's files.
    fn dump(&self) -> Vec<u8> {
        match self {
            Backend::Embedded(dir) => {
                let mut bytes = Vec::new();
                for entry in std::fs::read_dir(dir.path()).unwrap() {
                    let path = entry.unwrap().path();
                    if path.is_file() {
                        bytes.extend(std::fs::read(&path).unwrap());
                    }
                }
                bytes
            }
            Backend::Postgres(_, url) => {
                let bin = PathBuf::from(std::env::var("STELE_PG_BIN").expect("STELE_PG_BIN"));
                let output = Command::new(bin.join("pg_dump"))
                    .args(["--no-owner", "--dbname", url])
                    .output()
                    .unwrap();
                assert!(output.status.success(), "{}", stderr(&output));
                output.stdout
            }
        }
    }
}

fn embedded() -> Backend {
    Backend::Embedded(tempfile::tempdir().unwrap())
}

fn postgres(runtime: &tokio::runtime::Runtime) -> Backend {
    let db = runtime.block_on(TestDb::postgres());
    let StoreLocation::Postgres(url) = db.location.clone() else {
        unreachable!()
    };
    Backend::Postgres(db, url)
}

fn admin_key(backend: &Backend) -> String {
    let created = backend.run(&[
        "keys", "create", "--name", "dpo", "--scope", "admin", "--json",
    ]);
    assert!(created.status.success(), "{}", stderr(&created));
    serde_json::from_slice::<Value>(&created.stdout).unwrap()["key"]
        .as_str()
        .unwrap()
        .to_owned()
}

struct Api {
    base: String,
    key: String,
    client: reqwest::Client,
}

impl Api {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> Value {
        let (status, body) = self.call(reqwest::Method::GET, path, None).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn wait_for_task(&self, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let task = self.get(&format!("/v1/tasks/{id}?consistent=true")).await;
            if done(&task) {
                return task;
            }
            assert!(Instant::now() < deadline, "{task:#}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

fn lifecycle(backend: Backend) {
    let runtime = runtime();
    let key = admin_key(&backend);
    let (mut node, address, logs) = backend.start(&[]);
    if let Backend::Embedded(dir) = &backend {
        // The embedded store made its key-encryption key, readable by its owner only.
        let kek = dir.path().join("kek");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&kek).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }
    let api = Api {
        base: format!("http://{address}"),
        key,
        client: reqwest::Client::new(),
    };
    let (subject, task) = runtime.block_on(async {
        // The person is registered, consents (a guardian for the record), withdraws one purpose.
        let (status, ana) = api
            .post(
                "/v1/subjects",
                json!({ "identifiers": [format!("email:{ADDRESS}")] }),
            )
            .await;
        assert_eq!(status, 201, "{ana}");
        let subject = ana["id"].as_str().unwrap().to_owned();
        for consent in [
            json!({ "purpose": "processing", "given": true, "channel": "email" }),
            json!({ "purpose": "memory", "given": true, "guardian": GUARDIAN }),
            json!({ "purpose": "memory", "given": false }),
        ] {
            let (status, body) = api
                .post(&format!("/v1/subjects/{subject}/consents"), consent)
                .await;
            assert_eq!(status, 200, "{body}");
        }
        // They talk: a task through the API, as themselves.
        let (status, created) = api
            .post(
                "/v1/tasks",
                json!({
                    "input": format!("{SECRET}: please keep it safe"),
                    "workflow": "assistant",
                    "requester": { "user_id": ADDRESS, "channel": "email" },
                }),
            )
            .await;
        assert_eq!(status, 201, "{created}");
        let task = created["id"].as_str().unwrap().to_owned();
        let done = api
            .wait_for_task(&task, |t| t["status"] == "completed")
            .await;
        assert!(done["input"].as_str().unwrap().contains(SECRET));

        // The export holds everything: their task, its events, their consents, readable.
        let bundle = api.get(&format!("/v1/subjects/{subject}/export")).await;
        assert_eq!(bundle["format"], "stele.subject-export/1");
        assert_eq!(bundle["identifiers"], json!([format!("email:{ADDRESS}")]));
        assert!(bundle["erased"].is_null());
        assert_eq!(bundle["consents"].as_array().unwrap().len(), 3);
        assert_eq!(bundle["consents"][1]["guardian"], GUARDIAN);
        assert_eq!(bundle["tasks"][0]["task_id"], task.as_str());
        assert!(bundle["tasks"][0]["input"]
            .as_str()
            .unwrap()
            .contains(SECRET));
        let types: Vec<&str> = bundle["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event_type"].as_str().unwrap())
            .collect();
        for wanted in [
            "SubjectRegistered",
            "ConsentGiven",
            "ConsentWithdrawn",
            "TaskCreated",
            "RunStarted",
            "StepCompleted",
            "TaskCompleted",
        ] {
            assert!(types.contains(&wanted), "{wanted} in {types:?}");
        }
        assert!(bundle["timeline_html"].as_str().unwrap().contains(SECRET));

        // Erased: the keys are destroyed, and everything reads as erased.
        let (status, erasure) = api
            .post(
                &format!("/v1/subjects/{subject}/erasure"),
                json!({ "reason": "art. 17 request" }),
            )
            .await;
        assert_eq!(status, 200, "{erasure}");
        assert_eq!(erasure["keys"], json!([subject]));
        let erased = api.get(&format!("/v1/tasks/{task}")).await;
        assert_eq!(
            (erased["input"].as_str(), erased["result"].as_str()),
            (Some("[erased]"), Some("[erased]"))
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let page = api.get("/v1/tasks?limit=10").await;
            let row = page["tasks"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["id"] == task.as_str())
                .cloned();
            if let Some(row) = row.filter(|row| row["input"] == "[erased]") {
                assert_eq!(row["requester"]["user_id"], "[erased]");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the list still shows the task's input"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let after = api.get(&format!("/v1/subjects/{subject}/export")).await;
        assert_eq!(after["erased"]["reason"], "art. 17 request");
        assert_eq!(after["identifiers"], json!([]));
        assert_eq!(after["tasks"][0]["input"], "[erased]");
        let text = after.to_string();
        assert!(!text.contains(SECRET) && !text.contains(ADDRESS), "{text}");
        assert!(after["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["event_type"] == "SubjectErased"));
        (subject, task)
    });
    terminate(&mut node);
    let logs = logs.lock().unwrap().join("");
    assert!(
        !logs.contains(SECRET) && !logs.contains(ADDRESS),
        "the node's log: {logs}"
    );

    // No plaintext of theirs anywhere in the store.
    let dump = backend.dump();
    assert!(contains(&dump, "$erased"), "the dump holds the store");
    for plaintext in [SECRET, ADDRESS, GUARDIAN, "please keep it safe"] {
        assert!(!contains(&dump, plaintext), "{plaintext} is in the dump");
    }

    // The log still replays: the list rebuilt from it, the task and the subject read from it.
    let rebuilt = backend.run(&["replay", "--all"]);
    assert!(rebuilt.status.success(), "{}", stderr(&rebuilt));
    let shown = backend.run(&["tasks", "show", &task, "--json"]);
    assert!(shown.status.success(), "{}", stderr(&shown));
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["input"], "[erased]");
    let exported = backend.run(&["subjects", "export", &subject]);
    assert!(exported.status.success(), "{}", stderr(&exported));
    let exported: Value = serde_json::from_slice(&exported.stdout).unwrap();
    assert!(exported["erased"].is_object());
    // Each exported event comes with its inclusion proof in a signed checkpoint, which checks
    // with the public key alone (the proofs cover the sealed bytes, so erasure leaves them valid).
    let audit = &exported["audit"];
    assert_eq!(audit["pending"], json!([]), "{audit}");
    let events = exported["events"].as_array().unwrap();
    let proofs = audit["proofs"].as_array().unwrap();
    assert_eq!(proofs.len(), events.len());
    let key = stele_audit::SigningKey::from_text(support::TEST_AUDIT_KEY).unwrap();
    for (proof, event) in proofs.iter().zip(events) {
        let proof: stele_audit::proof::Proof = serde_json::from_value(proof.clone()).unwrap();
        let checked = stele_audit::proof::check(&proof, key.verifier_key()).unwrap();
        assert_eq!(checked.position, event["position"].as_i64());
        assert_eq!(checked.sizes, vec![audit["tree_size"].as_u64().unwrap()]);
    }
    let listed = backend.run(&["subjects", "list", "--json"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains("erased_at"));

    // Another key-encryption key: refused at start, in one line, before anything is written.
    let before = backend.dump().len();
    let other = "00".repeat(32);
    let wrong = match &backend {
        Backend::Embedded(dir) => {
            std::fs::write(dir.path().join("kek"), &other).unwrap();
            backend.run(&["tasks", "show", &task])
        }
        Backend::Postgres(_, _) => {
            let mut command = backend.command();
            command.env("STELE_KEK", &other);
            command
                .args(["tasks", "show", &task])
                .args(backend.args())
                .output()
                .unwrap()
        }
    };
    assert!(!wrong.status.success());
    let message = stderr(&wrong);
    assert!(
        message.contains("key-encryption key is not the one"),
        "{message}"
    );
    assert_eq!(message.trim().lines().count(), 1, "{message}");
    if let Backend::Postgres(..) = backend {
        assert_eq!(backend.dump().len(), before, "nothing was written");
    }
}

#[test]
fn a_persons_lifecycle_leaves_no_plaintext_embedded() {
    lifecycle(embedded());
}

#[test]
fn a_persons_lifecycle_leaves_no_plaintext_on_postgres() {
    let runtime = runtime();
    lifecycle(postgres(&runtime));
}

/// The deployment's policy: a person who has not consented to processing is refused (and the
/// refusal recorded); once a guardian consents for a minor, their task runs.
#[test]
fn the_consent_policy_refuses_what_a_person_has_not_agreed_to() {
    let runtime = runtime();
    let backend = embedded();
    let key = admin_key(&backend);
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        "[privacy.require]\ntasks = [\"processing\"]\n",
    )
    .unwrap();
    let config_path = config.path().display().to_string();
    let (mut node, address, _) = backend.start(&["--config", &config_path]);
    let api = Api {
        base: format!("http://{address}"),
        key,
        client: reqwest::Client::new(),
    };
    let task = |user: &str| json!({ "input": "hi", "workflow": "assistant", "requester": { "user_id": user, "channel": "telegram" } });
    runtime.block_on(async {
        let (status, problem) = api.post("/v1/tasks", task("9")).await;
        assert_eq!(
            (status, problem["code"].as_str()),
            (403, Some("consent_required")),
            "{problem}"
        );
    });
    // A minor: their own consent does not count; their guardian's does.
    let with_config = |args: &[&str]| -> Output {
        backend
            .command()
            .env("STELE_CONFIG", &config_path)
            .args(args)
            .args(backend.args())
            .output()
            .unwrap()
    };
    let register = with_config(&[
        "subjects",
        "register",
        "--identifier",
        "telegram:9",
        "--minor",
    ]);
    assert!(register.status.success(), "{}", stderr(&register));
    let own = with_config(&[
        "subjects",
        "consent",
        "telegram:9",
        "--purpose",
        "processing",
    ]);
    assert!(!own.status.success());
    assert!(stderr(&own).contains("only a guardian"), "{}", stderr(&own));
    let guardian = with_config(&[
        "subjects",
        "consent",
        "telegram:9",
        "--purpose",
        "processing",
        "--guardian",
        "their mother",
    ]);
    assert!(guardian.status.success(), "{}", stderr(&guardian));
    runtime.block_on(async {
        let (status, created) = api.post("/v1/tasks", task("9")).await;
        assert_eq!(status, 201, "{created}");
    });
    let shown = with_config(&["subjects", "show", "telegram:9", "--json"]);
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["minor"], true);
    assert_eq!(shown["consents"][0]["guardian"], "their mother");
    let subject = shown["id"].as_str().unwrap().to_owned();
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("bundle.json");
    let exported = with_config(&[
        "subjects",
        "export",
        &subject,
        "--out",
        &file.display().to_string(),
    ]);
    assert!(exported.status.success(), "{}", stderr(&exported));
    let bundle: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let refused = bundle["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event_type"] == "ProcessingRefused")
        .count();
    assert_eq!(refused, 1, "the refusal is recorded");
    terminate(&mut node);
}
