//! The test mail server (`scripts/mail-env.sh`) from the tests' side: users of a test's own, a
//! mail client (`mail_client.py`) that sends and fetches, a mailbox's settings for a node.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn base() -> String {
    std::env::var("STELE_MAIL_BASE")
        .expect("STELE_MAIL_BASE is not set: run the test suite with scripts/test (see README)")
}

/// Runs the mail client; its JSON answer.
pub fn mail(args: &[&str]) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/mail_client.py");
    let output = Command::new("python3")
        .arg(script)
        .args(args)
        .env("STELE_MAIL_BASE", base())
        .output()
        .expect("python3 runs the mail client");
    assert!(
        output.status.success(),
        "mail_client {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// A new mail user of this test's own (password `secret`).
pub fn user(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    // The mail server outlives test runs and process ids come round again: the time too.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let name = format!(
        "{prefix}{}t{now}n{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    mail(&["adduser", &name]);
    name
}

pub fn address(user: &str) -> String {
    format!("{user}@localhost")
}

/// Sends a mail; its Message-ID.
pub fn send(from: &str, to: &str, subject: &str, body: &str, extra: &[&str]) -> String {
    let mut args = vec!["send", from, to, subject, body];
    args.extend_from_slice(extra);
    mail(&args)["message_id"].as_str().unwrap().to_owned()
}

pub fn inbox(user: &str) -> Vec<Value> {
    mail(&["fetch", user]).as_array().unwrap().clone()
}

/// The inbox of `user` once it holds at least `count` mails.
pub fn wait_for(user: &str, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mails = inbox(user);
        if mails.len() >= count {
            return mails;
        }
        assert!(
            Instant::now() < deadline,
            "{user} got {} of {count} mails: {mails:#?}",
            mails.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The settings of a mailbox read as `user` (IMAPS) and answered through SMTP with STARTTLS.
pub fn mailbox_env(user: &str) -> Vec<(String, String)> {
    vec![
        (
            "STELE_EMAIL_IMAP_URL".into(),
            format!("imaps://{user}:secret@localhost:11993/INBOX"),
        ),
        (
            "STELE_EMAIL_SMTP_URL".into(),
            format!("smtp://{user}:secret@localhost:11025"),
        ),
        (
            "STELE_EMAIL_FROM".into(),
            format!("Help <{user}@localhost>"),
        ),
        (
            "STELE_EMAIL_CA_FILE".into(),
            format!("{}/certs/ca.pem", base()),
        ),
    ]
}
