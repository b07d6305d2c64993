//! The audit log through the binary: a node seals what it records and signs checkpoints; the
//! CLI verifies the log, proves an event's inclusion, and the proof checks offline with the
//! public key alone; a payload changed behind the triggers' back is named by `stele audit verify`.

use std::process::{Command, Output, Stdio};

use serde_json::Value;

mod support;
use support::{stderr, stele, terminate, wait_until_up};

fn audit(data_dir: &str, args: &[&str]) -> Output {
    command()
        .arg("audit")
        .args(args)
        .args(["--data-dir", data_dir])
        .output()
        .unwrap()
}

/// `stele` with the data directory's own audit key (made there on first start).
fn command() -> Command {
    let mut command = stele();
    command.env_remove("STELE_AUDIT_KEY");
    command
}

#[test]
fn a_node_seals_its_log_and_proofs_check_offline() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().display().to_string();
    let config = dir.path().join("stele.toml");
    std::fs::write(&config, "[audit]\nevery = 3\ninterval = \"200ms\"\n").unwrap();
    let mut up = command()
        .args(["up", "--data-dir", &data_dir, "--listen", "127.0.0.1:0"])
        .args(["--config", &config.display().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until_up(&mut up);
    let mut tasks = Vec::new();
    for input in ["one", "two", "three"] {
        let created = command()
            .args([
                "tasks",
                "create",
                "--workflow",
                "assistant",
                "--input",
                input,
            ])
            .args(["--data-dir", &data_dir])
            .output()
            .unwrap();
        assert!(created.status.success(), "{}", stderr(&created));
        tasks.push(String::from_utf8(created.stdout).unwrap().trim().to_owned());
    }
    // The timer signs the tail within its interval.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    terminate(&mut up);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("audit.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    let key = audit(&data_dir, &["key"]);
    assert!(key.status.success(), "{}", stderr(&key));
    let vkey = String::from_utf8(key.stdout).unwrap().trim().to_owned();
    assert!(vkey.starts_with("stele.local/audit+"), "{vkey}");

    let verified = audit(&data_dir, &["verify", "--json"]);
    assert!(verified.status.success(), "{}", stderr(&verified));
    let report: Value = serde_json::from_slice(&verified.stdout).unwrap();
    assert!(report["events"].as_u64().unwrap() >= 3, "{report}");
    assert!(report["checkpoints"].as_u64().unwrap() >= 1, "{report}");

    let listed = audit(&data_dir, &["checkpoints", "--json"]);
    let last: Value = serde_json::from_str(
        String::from_utf8(listed.stdout)
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert!(last["note"]
        .as_str()
        .unwrap()
        .starts_with("stele.local/audit\n"));

    let proof_file = dir.path().join("proof.json");
    let proved = audit(
        &data_dir,
        &[
            "prove",
            "--position",
            "2",
            "--out",
            &proof_file.display().to_string(),
        ],
    );
    assert!(proved.status.success(), "{}", stderr(&proved));
    // Offline: no store, only the key.
    let checked = stele()
        .args([
            "audit",
            "check-proof",
            &proof_file.display().to_string(),
            "--key",
            &vkey,
        ])
        .output()
        .unwrap();
    assert!(checked.status.success(), "{}", stderr(&checked));
    assert!(String::from_utf8_lossy(&checked.stdout).contains("position 2"));
    let stranger = stele()
        .args(["audit", "keygen", "--name", "x.test/log"])
        .output()
        .unwrap();
    let stranger = String::from_utf8(stranger.stderr)
        .unwrap()
        .trim()
        .to_owned();
    let refused = stele()
        .args([
            "audit",
            "check-proof",
            &proof_file.display().to_string(),
            "--key",
            &stranger,
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());

    // Who did what: the audit view.
    let log = audit(&data_dir, &["log", "--task", &tasks[0], "--json"]);
    assert!(log.status.success(), "{}", stderr(&log));
    let rows: Vec<Value> = String::from_utf8(log.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows[0]["event_type"], "TaskCreated");
    assert_eq!(rows[0]["channel"], "cli");
    let created_at = rows[0]["position"].as_i64().unwrap();

    // The task as it was when created, and the task list as it was then, beside the live one.
    let then = audit(
        &data_dir,
        &[
            "at",
            &created_at.to_string(),
            "--stream",
            &format!("task/{}", tasks[0]),
        ],
    );
    assert!(then.status.success(), "{}", stderr(&then));
    let then: Value = serde_json::from_slice(&then.stdout).unwrap();
    assert_eq!(then["state"]["status"], "pending", "{then}");
    assert_eq!(then["state"]["input"], "one");
    assert_eq!(then["events"], 1);
    let replayed = command()
        .args([
            "replay",
            "--projection",
            "task_list",
            "--until",
            &created_at.to_string(),
        ])
        .args(["--into", "inspect", "--data-dir", &data_dir])
        .output()
        .unwrap();
    assert!(replayed.status.success(), "{}", stderr(&replayed));
    let replayed: Value = serde_json::from_slice(&replayed.stdout).unwrap();
    assert_eq!(
        replayed["tables"],
        serde_json::json!(["task_list__inspect"])
    );
    assert_eq!(replayed["events_applied"], 1);

    // A superuser's edit, behind the triggers' back.
    let runtime = stele_engine::testing::runtime();
    runtime.block_on(async {
        let pool = sqlx::SqlitePool::connect(&format!(
            "sqlite://{}",
            dir.path().join("stele.db").display()
        ))
        .await
        .unwrap();
        for sql in [
            "DROP TRIGGER events_no_update",
            "UPDATE events SET payload = '{\"type\":\"Forged\"}' WHERE global_position = 2",
        ] {
            sqlx::query(sql).execute(&pool).await.unwrap();
        }
        pool.close().await;
    });
    let tampered = audit(&data_dir, &["verify"]);
    assert!(!tampered.status.success());
    let message = stderr(&tampered);
    assert!(message.contains("at position 2"), "{message}");
    assert_eq!(message.trim().lines().count(), 1, "{message}");
}
