//! The family's assistant on Telegram, with a child among its users: the child's messages are
//! refused until a guardian consents (the child's own consent does not count); later the family
//! exports the child's data — the export's proofs check against the signed audit checkpoint with
//! the log's public key alone — and then erases it from the chat; nothing readable remains in any
//! file of the node, and the audit log still verifies.

use std::process::Stdio;

use serde_json::Value;

use crate::support::telegram::{FakeBot, TOKEN};
use crate::support::{files_holding, stderr, stele, terminate, wait_until_up};

const CHILD: i64 = 3003;

fn cli(data_dir: &str, args: &[&str]) -> std::process::Output {
    let mut command = stele();
    command.env_remove("STELE_AUDIT_KEY");
    command
        .args(args)
        .args(["--data-dir", data_dir])
        .output()
        .unwrap()
}

#[test]
fn a_child_is_served_only_with_a_guardians_consent_then_exported_and_forgotten() {
    let bot = FakeBot::start();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data").display().to_string();
    let config = dir.path().join("stele.toml");
    std::fs::write(
        &config,
        "[privacy.require]\ntasks = [\"processing\"]\n\n[audit]\nevery = 5\ninterval = \"300ms\"\n\n\
         [telegram]\nconsent_text = \"A parent can give it for you.\"\n",
    )
    .unwrap();
    let mut up = stele();
    up.env_remove("STELE_AUDIT_KEY")
        .args(["up", "--data-dir", &data_dir, "--listen", "127.0.0.1:0"])
        .args(["--config", &config.display().to_string()])
        .env("STELE_TELEGRAM_TOKEN", TOKEN)
        .env("STELE_TELEGRAM_API_URL", &bot.url)
        .env_remove("STELE_TELEGRAM_ALLOW")
        .env_remove("STELE_TELEGRAM_WORKFLOW")
        .env_remove("STELE_EMBEDDING_MODEL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut node = up.spawn().unwrap();
    wait_until_up(&mut node);
    let mut node = scopeguard::guard(node, |mut node| {
        let _ = node.kill();
        let _ = node.wait();
    });

    // The family registers the child as a minor.
    let registered = cli(
        &data_dir,
        &[
            "subjects",
            "register",
            "--identifier",
            &format!("telegram:{CHILD}"),
            "--minor",
            "--json",
        ],
    );
    assert!(registered.status.success(), "{}", stderr(&registered));
    let child: Value = serde_json::from_slice(&registered.stdout).unwrap();
    let child = child["id"].as_str().unwrap().to_owned();

    bot.say(
        CHILD,
        CHILD,
        "can you help with my homework about volcanoes?",
    );
    let refused = bot.wait_for(CHILD, "I need your consent");
    assert!(
        refused.contains("A parent can give it for you."),
        "{refused}"
    );
    // The child's own consent does not count.
    let own = cli(
        &data_dir,
        &["subjects", "consent", &child, "--purpose", "processing"],
    );
    assert!(!own.status.success(), "a minor's own consent was taken");
    // A guardian's does.
    let given = cli(
        &data_dir,
        &[
            "subjects",
            "consent",
            &child,
            "--purpose",
            "processing",
            "--guardian",
            "Marie Dupont",
        ],
    );
    assert!(given.status.success(), "{}", stderr(&given));
    bot.say(
        CHILD,
        CHILD,
        "now can you help with my homework about volcanoes?",
    );
    let answer = bot.wait_for(CHILD, "now can you help with my homework about volcanoes?");
    assert!(answer.starts_with("[vox]"), "{answer}");

    // The family exports the child's data: both messages, the consents, the refusal.
    let bundle_file = dir.path().join("export.json");
    let exported = cli(
        &data_dir,
        &[
            "subjects",
            "export",
            &child,
            "--out",
            &bundle_file.display().to_string(),
        ],
    );
    assert!(exported.status.success(), "{}", stderr(&exported));
    let bundle: Value = serde_json::from_slice(&std::fs::read(&bundle_file).unwrap()).unwrap();
    let text = bundle.to_string();
    assert!(
        text.contains("homework about volcanoes") && text.contains("Marie Dupont"),
        "{text}"
    );
    // Each event of the export is proved against the signed checkpoint, checkable offline.
    let key = cli(&data_dir, &["audit", "key"]);
    let key = String::from_utf8(key.stdout).unwrap().trim().to_owned();
    let proofs = bundle["audit"]["proofs"].as_array().unwrap();
    assert!(!proofs.is_empty(), "{}", bundle["audit"]);
    assert!(bundle["audit"]["pending"]
        .as_array()
        .is_none_or(Vec::is_empty));
    for (i, proof) in proofs.iter().enumerate().take(5) {
        let file = dir.path().join(format!("proof-{i}.json"));
        std::fs::write(&file, proof.to_string()).unwrap();
        let checked = stele()
            .args([
                "audit",
                "check-proof",
                &file.display().to_string(),
                "--key",
                &key,
            ])
            .output()
            .unwrap();
        assert!(checked.status.success(), "{}", stderr(&checked));
    }

    // Then erases it, from the chat.
    bot.say(CHILD, CHILD, "/forget");
    bot.wait_for(CHILD, "To go ahead, send: /forget yes");
    bot.say(CHILD, CHILD, "/forget yes");
    bot.wait_for(CHILD, "Erasing everything I hold about you");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let shown = cli(&data_dir, &["subjects", "show", &child, "--json"]);
        let shown: Value = serde_json::from_slice(&shown.stdout).unwrap_or_default();
        if !shown["erased"].is_null() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not erased: {shown}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    terminate(&mut node);

    // Nothing readable remains, and the log still verifies.
    for words in ["homework about volcanoes", "Marie Dupont"] {
        assert_eq!(
            files_holding(std::path::Path::new(&data_dir), words.as_bytes()),
            Vec::<String>::new(),
            "{words:?} is still readable"
        );
    }
    let verified = cli(&data_dir, &["audit", "verify"]);
    assert!(verified.status.success(), "{}", stderr(&verified));
}
