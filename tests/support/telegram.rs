//! The fake Telegram Bot API (`fake_telegram.py`) from the tests' side: start it, say things as
//! a person, read what the bot sent.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::free_port;

/// The bot token the tests' nodes use.
pub const TOKEN: &str = "123456:TEST-TOKEN";

/// The fake Bot API, on a port of its own.
pub struct FakeBot {
    child: Child,
    pub url: String,
    pub http: reqwest::Client,
    pub rt: tokio::runtime::Runtime,
}

impl FakeBot {
    pub fn start() -> FakeBot {
        let port = free_port();
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/support/fake_telegram.py"
        );
        let mut child = Command::new("python3")
            .args([script, &port.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs the fake Bot API");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        FakeBot {
            child,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    }

    pub fn post(&self, path: &str, body: Value) -> Value {
        self.rt.block_on(async {
            self.http
                .post(format!("{}{path}", self.url))
                .json(&body)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap()
        })
    }

    pub fn get(&self, path: &str) -> Value {
        self.rt.block_on(async {
            self.http
                .get(format!("{}{path}", self.url))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap()
        })
    }

    /// A text message from `user` in `chat`.
    pub fn say(&self, chat: i64, user: i64, text: &str) {
        self.post(
            "/_test/update",
            json!({ "chat_id": chat, "user_id": user, "text": text,
                    "chat_type": if chat < 0 { "group" } else { "private" } }),
        );
    }

    pub fn calls(&self, method: &str) -> Vec<Value> {
        self.get("/_test/calls")
            .as_array()
            .unwrap()
            .iter()
            .filter(|call| {
                call["method"]
                    .as_str()
                    .unwrap()
                    .eq_ignore_ascii_case(method)
            })
            .cloned()
            .collect()
    }

    /// The texts sent to `chat`, in order.
    pub fn sent(&self, chat: i64) -> Vec<String> {
        self.calls("sendMessage")
            .iter()
            .filter(|call| call["params"]["chat_id"].as_i64() == Some(chat))
            .map(|call| call["params"]["text"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Waits until some text sent to `chat` contains `needle`; returns it.
    pub fn wait_for(&self, chat: i64, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(text) = self.sent(chat).into_iter().find(|t| t.contains(needle)) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "nothing with {needle:?} was sent to {chat}; sent: {:?}",
                self.sent(chat)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for FakeBot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
