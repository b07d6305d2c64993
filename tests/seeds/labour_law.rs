//! The labour-law assistant, on Telegram and by email for the same person: a question in each is
//! answered from what the memory holds (the article the operators stored), the chat's
//! `/status`, `/models` and `/reset` work, and the person's export holds both conversations.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::mail::{address, mailbox_env, send, user, wait_for};
use crate::support::telegram::{FakeBot, TOKEN};
use crate::support::{stderr, stele, terminate, wait_until_up};

const CHAT: i64 = 4004;
const ARTICLE: &str =
    "Article L1237-1: an employee who resigns owes a notice period, usually one month";

fn cli(data_dir: &str, args: &[&str]) -> std::process::Output {
    stele()
        .args(args)
        .args(["--data-dir", data_dir])
        .output()
        .unwrap()
}

#[test]
fn questions_on_telegram_and_by_email_are_answered_from_memory_and_exported_together() {
    assert!(
        std::env::var_os("STELE_EMBEDDING_MODEL").is_some(),
        "the memory needs the embedding model the test command provides"
    );
    let bot = FakeBot::start();
    let help = user("lawhelp");
    let ana = user("ana");
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data").display().to_string();

    // The person, known by her chat and her address; the article, stored for her.
    let migrated = cli(&data_dir, &["migrate"]);
    assert!(migrated.status.success(), "{}", stderr(&migrated));
    let registered = cli(
        &data_dir,
        &[
            "subjects",
            "register",
            "--identifier",
            &format!("telegram:{CHAT}"),
            "--identifier",
            &format!("email:{}", address(&ana)),
            "--json",
        ],
    );
    assert!(registered.status.success(), "{}", stderr(&registered));
    let person: Value = serde_json::from_slice(&registered.stdout).unwrap();
    let person = person["id"].as_str().unwrap().to_owned();
    let stored = cli(&data_dir, &["memory", "add", ARTICLE, "--subject", &person]);
    assert!(stored.status.success(), "{}", stderr(&stored));
    let created = cli(
        &data_dir,
        &[
            "keys",
            "create",
            "--name",
            "ops",
            "--scope",
            "memory:read",
            "--json",
        ],
    );
    assert!(created.status.success(), "{}", stderr(&created));
    let key: Value = serde_json::from_slice(&created.stdout).unwrap();
    let key = key["key"].as_str().unwrap().to_owned();

    let mut up = stele();
    up.args(["up", "--data-dir", &data_dir, "--listen", "127.0.0.1:0"])
        .env("STELE_TELEGRAM_TOKEN", TOKEN)
        .env("STELE_TELEGRAM_API_URL", &bot.url)
        .env_remove("STELE_TELEGRAM_ALLOW")
        .env_remove("STELE_TELEGRAM_WORKFLOW")
        .env_remove("STELE_EMAIL_WORKFLOW")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (key, value) in mailbox_env(&help) {
        up.env(key, value);
    }
    let mut node = up.spawn().unwrap();
    let address_of_api = wait_until_up(&mut node).expect("the API's address");
    let mut node = scopeguard::guard(node, |mut node| {
        let _ = node.kill();
        let _ = node.wait();
    });
    // The memory has indexed the article.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let search = format!("http://{address_of_api}/v1/memories/search?q=notice%20period");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = rt.block_on(async {
            let response = reqwest::Client::new()
                .get(&search)
                .bearer_auth(&key)
                .send()
                .await
                .unwrap();
            response.text().await.unwrap()
        });
        if found.contains("L1237-1") {
            break;
        }
        assert!(Instant::now() < deadline, "{found}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // On Telegram.
    bot.say(CHAT, CHAT, "How long is my notice if I resign?");
    let answer = bot.wait_for(CHAT, "How long is my notice if I resign?");
    assert!(answer.contains("L1237-1"), "answered from memory: {answer}");
    bot.say(CHAT, CHAT, "/status");
    bot.wait_for(CHAT, "System: up");
    bot.say(CHAT, CHAT, "/models");
    bot.wait_for(CHAT, "The assistants you can use");
    bot.say(CHAT, CHAT, "/reset");
    bot.wait_for(CHAT, "we start afresh");
    // A new session: the earlier question is no longer in the conversation's history.
    bot.say(CHAT, CHAT, "and for a manager?");
    let fresh = bot.wait_for(CHAT, "and for a manager?");
    assert!(!fresh.contains("Earlier in this conversation"), "{fresh}");

    // By email.
    send(
        &format!("Ana Lima <{}>", address(&ana)),
        &address(&help),
        "Resignation",
        "What notice period applies when an employee resigns?",
        &[],
    );
    let mails = wait_for(&ana, 1);
    let text = mails[0]["text"].as_str().unwrap();
    assert!(text.contains("L1237-1"), "answered from memory: {text}");
    terminate(&mut node);

    // One person, both conversations in her export.
    let exported = cli(&data_dir, &["subjects", "export", &person]);
    assert!(exported.status.success(), "{}", stderr(&exported));
    let bundle: Value = serde_json::from_slice(&exported.stdout).unwrap();
    let streams: Vec<&str> = bundle["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["stream"].as_str())
        .collect();
    assert!(
        streams
            .iter()
            .any(|s| s.starts_with("conversation/telegram:")),
        "{streams:?}"
    );
    assert!(
        streams.iter().any(|s| s.starts_with("conversation/email:")),
        "{streams:?}"
    );
    let text = bundle.to_string();
    assert!(text.contains("How long is my notice if I resign?"));
    assert!(text.contains("What notice period applies when an employee resigns?"));
}
