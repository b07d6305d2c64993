//! The agents' tools through the tool registry, as agents call them: the workspace (`fs.*`) on
//! both stores, sealed with the run's person and gone with them; `shell.run` in the sandbox
//! (bubblewrap, which the test provisioning installs, and the process fallback); `web.fetch`
//! against a server on loopback.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use stele_aggregates::ids::{RunId, TaskId};
use stele_engine::for_each_backend;
use stele_engine::Store;
use stele_privacy::{private_store, Kek, Policy};
use stele_tools::{
    register, Sandbox, SandboxLimits, SandboxMode, ToolHost, Web, WebSettings, WorkspaceLimits,
    Workspaces,
};
use stele_workflows::tools::{Caller, Tools};

async fn host(workspaces: Workspaces, mode: SandboxMode, allow: Vec<String>) -> Arc<ToolHost> {
    let sandbox = Sandbox::detect(
        mode,
        SandboxLimits {
            timeout: Duration::from_secs(20),
            max_processes: 32,
            memory_bytes: 512 * 1024 * 1024,
            output_bytes: 4096,
            ..SandboxLimits::default()
        },
        workspaces.limits().clone(),
    )
    .await
    .expect("the sandbox works here");
    Arc::new(ToolHost {
        workspaces: Arc::new(workspaces),
        sandbox,
        web: Web::new(WebSettings {
            allow,
            max_bytes: 1000,
            timeout: Duration::from_secs(5),
        }),
    })
}

fn caller(run: &str, subject: Option<&str>) -> Caller {
    Caller {
        run_id: RunId::new(run),
        task_id: Some(TaskId::new(format!("task-of-{run}"))),
        workflow: "dev_pipeline".into(),
        step: "code".into(),
        agent: Some("coder".into()),
        subject: subject.map(str::to_owned),
    }
}

async fn call(tools: &Tools, name: &str, input: Value, caller: &Caller) -> Result<Value, String> {
    tools.call(name, input, caller).await
}

async fn a_workspace_is_confined_sealed_and_erased(store: &Store) {
    let private = private_store(store, &Kek::generate(), Policy::default())
        .await
        .unwrap();
    let workspaces = Workspaces::new(store.pool.clone(), Some(private.subjects.sealer().clone()));
    let host = host(workspaces, SandboxMode::Auto, vec![]).await;
    let tools = register(Tools::builtin(), Some(host.clone()));
    let meta = stele_engine::CommandMeta::new("test", "test");
    let owner = stele_aggregates::subject::Identifier::parse("api:ws-owner").unwrap();
    let subject = private.subjects.resolve(&owner, &meta).await.unwrap();
    let subject = subject.as_str();
    let me = caller("run-1", Some(subject));

    let written = call(
        &tools,
        "fs.write",
        json!({ "path": "src/hello.py", "content": "print('hello, secret world')\n" }),
        &me,
    )
    .await
    .unwrap();
    assert_eq!(written["created"], json!(true));
    call(
        &tools,
        "fs.write",
        json!({ "path": "./README.md", "content": "# hello\n" }),
        &me,
    )
    .await
    .unwrap();
    let listed = call(&tools, "fs.list", json!({}), &me).await.unwrap();
    let paths: Vec<&str> = listed["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["README.md", "src/hello.py"]);
    let under = call(&tools, "fs.list", json!({ "path": "src" }), &me)
        .await
        .unwrap();
    assert_eq!(under["files"].as_array().unwrap().len(), 1);

    let patched = call(
        &tools,
        "fs.patch",
        json!({ "path": "src/hello.py", "old": "secret world", "new": "patched world" }),
        &me,
    )
    .await
    .unwrap();
    assert_eq!(patched["replaced"], json!(1));
    let read = call(&tools, "fs.read", json!({ "path": "src/hello.py" }), &me)
        .await
        .unwrap();
    assert_eq!(read["content"], json!("print('hello, patched world')\n"));
    let part = call(
        &tools,
        "fs.read",
        json!({ "path": "src/hello.py", "offset": 7, "limit": 5 }),
        &me,
    )
    .await
    .unwrap();
    assert_eq!(
        (part["content"].as_str(), part["truncated"].as_bool()),
        (Some("hello"), Some(true))
    );

    // Out of the workspace: refused, with why.
    for (tool, input) in [
        ("fs.read", json!({ "path": "/etc/passwd" })),
        ("fs.read", json!({ "path": "../../etc/passwd" })),
        ("fs.write", json!({ "path": "src/../../x", "content": "x" })),
        ("fs.write", json!({ "path": "/tmp/x", "content": "x" })),
        ("fs.list", json!({ "path": "../" })),
        (
            "fs.patch",
            json!({ "path": "src/hello.py", "old": "not there", "new": "x" }),
        ),
        ("fs.read", json!({ "path": "src" })),
        (
            "fs.write",
            json!({ "path": "src", "content": "a file over a folder" }),
        ),
    ] {
        let refused = call(&tools, tool, input.clone(), &me).await;
        assert!(
            refused.is_err(),
            "{tool} {input} should be refused: {refused:?}"
        );
    }
    assert!(
        call(&tools, "fs.read", json!({ "path": "/etc/passwd" }), &me)
            .await
            .unwrap_err()
            .contains("absolute")
    );

    // Another run's workspace is its own.
    let other = caller("run-2", None);
    assert!(
        call(&tools, "fs.read", json!({ "path": "README.md" }), &other)
            .await
            .is_err()
    );

    // Concurrent writers of one workspace both keep their file.
    let writes = (0..8).map(|i| {
        let tools = tools.clone();
        let me = me.clone();
        async move {
            call(
                &tools,
                "fs.write",
                json!({ "path": format!("many/{i}.txt"), "content": "x" }),
                &me,
            )
            .await
            .unwrap()
        }
    });
    futures::future::join_all(writes).await;
    let listed = call(&tools, "fs.list", json!({ "path": "many" }), &me)
        .await
        .unwrap();
    assert_eq!(listed["files"].as_array().unwrap().len(), 8);

    // The store holds no plaintext of a person's workspace.
    let content: String = {
        let mut db = stele_engine::store::sql::Db::from(&store.pool);
        let row = db
            .fetch_one("SELECT content FROM workspaces WHERE run_id = 'run-1'", &[])
            .await
            .unwrap();
        row.get("content").unwrap()
    };
    assert!(!content.contains("patched"));
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(content)
        .unwrap();
    assert!(!String::from_utf8_lossy(&raw).contains("patched world"));

    // Readable through the task afterwards; gone once the person is erased.
    let workspaces = &host.workspaces;
    assert_eq!(
        workspaces.runs_of_task("task-of-run-1").await.unwrap(),
        ["run-1"]
    );
    let (run, bytes) = workspaces
        .task_file("task-of-run-1", None, "src/hello.py")
        .await
        .unwrap();
    assert_eq!((run.as_str(), bytes.len()), ("run-1", 30));
    private
        .subjects
        .erase(subject, "test", "asked to", meta.clone())
        .await
        .unwrap();
    assert!(matches!(
        workspaces.list("run-1").await,
        Err(stele_tools::WorkspaceError::Erased)
    ));
    assert!(call(&tools, "fs.read", json!({ "path": "README.md" }), &me)
        .await
        .is_err());
    // The node's eraser deletes the rows as it reads the erasure.
    let runner = stele_engine::projection::ProjectionRunner::new(
        &private.store,
        vec![Arc::new(stele_tools::WorkspaceEraser)],
    );
    runner.setup().await.unwrap();
    while runner.step("workspace_erasure").await.unwrap().read > 0 {}
    assert!(workspaces
        .runs_of_task("task-of-run-1")
        .await
        .unwrap()
        .is_empty());
}

async fn limits_hold(store: &Store) {
    let workspaces = Workspaces::new(store.pool.clone(), None).with_limits(WorkspaceLimits {
        max_files: 3,
        max_bytes: 100,
        max_file_bytes: 60,
    });
    let host = host(workspaces, SandboxMode::Auto, vec![]).await;
    let tools = register(Tools::builtin(), Some(host));
    let me = caller("run-limits", None);
    let big = "x".repeat(61);
    let error = call(
        &tools,
        "fs.write",
        json!({ "path": "big", "content": big }),
        &me,
    )
    .await
    .unwrap_err();
    assert!(error.contains("over the limit"), "{error}");
    for name in ["a", "b", "c"] {
        call(
            &tools,
            "fs.write",
            json!({ "path": name, "content": "x" }),
            &me,
        )
        .await
        .unwrap();
    }
    let error = call(
        &tools,
        "fs.write",
        json!({ "path": "d", "content": "x" }),
        &me,
    )
    .await
    .unwrap_err();
    assert!(error.contains("at most 3 files"), "{error}");
}

for_each_backend!(a_workspace_is_confined_sealed_and_erased, limits_hold);

fn runtime() -> tokio::runtime::Runtime {
    stele_engine::testing::runtime()
}

/// The sandbox's guarantees, for one isolation: files in and out, exit codes, output bounds,
/// the timeout, the process limit, links out not kept, and (where it isolates the network) no
/// connection to a port listening on the host's loopback.
async fn sandbox_suite(mode: SandboxMode, expect: &str) {
    let db = stele_engine::testing::TestDb::sqlite();
    let store = db.open().await;
    let host = host(Workspaces::new(store.pool.clone(), None), mode, vec![]).await;
    assert_eq!(host.sandbox.kind(), expect, "{}", host.sandbox.describe());
    let tools = register(Tools::builtin(), Some(host.clone()));
    let me = caller("run-shell", None);
    call(
        &tools,
        "fs.write",
        json!({ "path": "hello.py", "content": "print('hello from the sandbox')\n" }),
        &me,
    )
    .await
    .unwrap();

    let ran = call(
        &tools,
        "shell.run",
        json!({ "command": "python3 hello.py > out.txt && mkdir -p build && echo built > build/log && cat out.txt" }),
        &me,
    )
    .await
    .unwrap();
    assert_eq!(ran["exit_code"], json!(0), "{ran}");
    assert_eq!(ran["stdout"], json!("hello from the sandbox\n"));
    assert_eq!(ran["sandbox"], json!(expect));
    assert_eq!(ran["changed"], json!(["build/log", "out.txt"]));
    let out = call(&tools, "fs.read", json!({ "path": "out.txt" }), &me)
        .await
        .unwrap();
    assert_eq!(out["content"], json!("hello from the sandbox\n"));

    let failed = call(
        &tools,
        "shell.run",
        json!({ "command": "echo oops >&2; exit 3" }),
        &me,
    )
    .await
    .unwrap();
    assert_eq!(
        (failed["exit_code"].clone(), failed["stderr"].clone()),
        (json!(3), json!("oops\n"))
    );

    // Output is bounded (4,096 bytes kept here), and counted.
    let loud = call(
        &tools,
        "shell.run",
        json!({ "command": "head -c 100000 /dev/zero | tr '\\0' a" }),
        &me,
    )
    .await
    .unwrap();
    assert_eq!(loud["stdout"].as_str().unwrap().len(), 4096);
    assert_eq!(
        (loud["truncated"].clone(), loud["output_bytes"].clone()),
        (json!(true), json!(100000))
    );

    // The timeout kills it (and what it started).
    let started = std::time::Instant::now();
    let slow = call(
        &tools,
        "shell.run",
        json!({ "command": "sleep 30 & sleep 30", "timeout_s": 1 }),
        &me,
    )
    .await
    .unwrap();
    assert_eq!(slow["timed_out"], json!(true), "{slow}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // A symbolic link out of the workspace is not kept, and nothing reads through it.
    let linked = call(
        &tools,
        "shell.run",
        json!({ "command": "ln -s /etc/passwd passwd; ln -s /etc secrets" }),
        &me,
    )
    .await
    .unwrap();
    assert_eq!(linked["exit_code"], json!(0), "{linked}");
    assert_eq!(linked["not_kept"].as_array().unwrap().len(), 2, "{linked}");
    assert!(call(&tools, "fs.read", json!({ "path": "passwd" }), &me)
        .await
        .is_err());
    let again = call(&tools, "shell.run", json!({ "command": "ls" }), &me)
        .await
        .unwrap();
    assert!(
        !again["stdout"].as_str().unwrap().contains("passwd"),
        "{again}"
    );

    // Deleting a file deletes it from the workspace.
    call(&tools, "shell.run", json!({ "command": "rm out.txt" }), &me)
        .await
        .unwrap();
    assert!(call(&tools, "fs.read", json!({ "path": "out.txt" }), &me)
        .await
        .is_err());

    // The process limit holds (as root the sandbox runs as nobody, whom it counts).
    if unsafe_is_root() {
        let forks = call(
            &tools,
            "shell.run",
            json!({ "command": "for i in $(seq 100); do sleep 5 & done 2>/dev/null; echo started", "timeout_s": 3 }),
            &me,
        )
        .await
        .unwrap();
        assert_ne!(
            forks["stdout"],
            json!("started\n"),
            "100 processes were let through: {forks}"
        );
    }

    // No network: a port listening on the host's loopback cannot be reached.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let connect = format!(
        "python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), 2); print('connected')\""
    );
    let net = call(&tools, "shell.run", json!({ "command": connect }), &me)
        .await
        .unwrap();
    if host.sandbox.describe().contains("no network") {
        assert_ne!(net["exit_code"], json!(0), "{net}");
        assert!(
            !net["stdout"].as_str().unwrap().contains("connected"),
            "{net}"
        );
    }
    drop(listener);

    // Only the workspace is writable (bubblewrap: the system is mounted read-only).
    if expect == "bubblewrap" {
        let escape = call(
            &tools,
            "shell.run",
            json!({ "command": "touch /usr/escaped; echo x > /etc/escaped; touch /escaped; echo $?" }),
            &me,
        )
        .await
        .unwrap();
        assert!(!std::path::Path::new("/usr/escaped").exists());
        assert!(!std::path::Path::new("/etc/escaped").exists());
        assert!(!std::path::Path::new("/escaped").exists(), "{escape}");
        // The node's environment is not visible.
        let env = call(&tools, "shell.run", json!({ "command": "env" }), &me)
            .await
            .unwrap();
        assert!(
            !env["stdout"].as_str().unwrap().contains("DATABASE_URL"),
            "{env}"
        );
    }
    store.close().await;
}

fn unsafe_is_root() -> bool {
    std::env::var("USER").map(|u| u == "root").unwrap_or(false)
        || std::fs::metadata("/proc/self")
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
            .unwrap_or(false)
}

#[test]
fn bubblewrap_sandboxes_commands() {
    runtime().block_on(sandbox_suite(SandboxMode::Bubblewrap, "bubblewrap"));
}

#[test]
fn the_process_sandbox_sandboxes_commands() {
    runtime().block_on(sandbox_suite(SandboxMode::Process, "process"));
}

#[test]
fn web_fetch_keeps_to_allowed_hosts() {
    runtime().block_on(async {
        use axum::response::Redirect;
        use axum::routing::get;
        let app = axum::Router::new()
            .route("/page", get(|| async { "a page" }))
            .route("/big", get(|| async { "y".repeat(5000) }))
            .route(
                "/away",
                get(|| async { Redirect::temporary("http://localhost:9/") }),
            )
            .route("/here", get(|| async { Redirect::temporary("/page") }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let db = stele_engine::testing::TestDb::sqlite();
        let store = db.open().await;
        let host = host(
            Workspaces::new(store.pool.clone(), None),
            SandboxMode::Auto,
            vec![format!("127.0.0.1:{port}")],
        )
        .await;
        let tools = register(Tools::builtin(), Some(host));
        let me = caller("run-web", None);
        let base = format!("http://127.0.0.1:{port}");

        let page = call(
            &tools,
            "web.fetch",
            json!({ "url": format!("{base}/page") }),
            &me,
        )
        .await
        .unwrap();
        assert_eq!(
            (page["status"].clone(), page["body"].clone()),
            (json!(200), json!("a page"))
        );
        let followed = call(
            &tools,
            "web.fetch",
            json!({ "url": format!("{base}/here") }),
            &me,
        )
        .await
        .unwrap();
        assert_eq!(followed["body"], json!("a page"));
        let big = call(
            &tools,
            "web.fetch",
            json!({ "url": format!("{base}/big") }),
            &me,
        )
        .await
        .unwrap();
        assert_eq!(
            (big["bytes"].clone(), big["truncated"].clone()),
            (json!(1000), json!(true))
        );

        let away = call(
            &tools,
            "web.fetch",
            json!({ "url": format!("{base}/away") }),
            &me,
        )
        .await
        .unwrap_err();
        assert!(away.contains("not an allowed host"), "{away}");
        let other = call(
            &tools,
            "web.fetch",
            json!({ "url": "http://localhost:9/" }),
            &me,
        )
        .await
        .unwrap_err();
        assert!(other.contains("not an allowed host"), "{other}");
        let file = call(
            &tools,
            "web.fetch",
            json!({ "url": "file:///etc/passwd" }),
            &me,
        )
        .await
        .unwrap_err();
        assert!(file.contains("only http and https"), "{file}");
        store.close().await;
    });
}

#[test]
fn tools_without_a_host_are_described_and_refuse() {
    runtime().block_on(async {
        let tools = register(Tools::builtin(), None);
        for name in stele_tools::NAMES {
            assert!(
                tools.spec(name).is_some_and(|s| !s.description.is_empty()),
                "{name}"
            );
        }
        let error = call(&tools, "fs.list", json!({}), &caller("r", None))
            .await
            .unwrap_err();
        assert!(error.contains("no workspace store"), "{error}");
    });
}
