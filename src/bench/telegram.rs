//! `stele bench telegram`: the Telegram channel end to end — a `stele serve` node (a separate
//! process, on a scratch PostgreSQL database, scripted model) against a Bot API on loopback
//! served here. 100 chats: messages answered per second when they all arrive at once, and the
//! latency from an update's delivery (the `getUpdates` that hands it over) to its answer's
//! `sendMessage` at a steady 100 messages per second. The node's flood limits are off (they
//! are Telegram's to enforce and would cap a bot at 30 messages/s); everything else is as in
//! production: each update recorded before it is confirmed, a task per message, the reply
//! through the outbox.
//!
//! The Bot API is written here rather than reusing the tests' Python fake: a Python server
//! would be the bottleneck at hundreds of calls per second.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router};
use clap::Args;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::Notify;

use super::{CpuClock, Latency, Machine, Scratch};

#[derive(Args)]
pub struct TelegramBenchArgs {
    /// PostgreSQL server to benchmark on (a scratch database is created there).
    #[arg(long, env = "STELE_DATABASE_URL")]
    database_url: String,
    /// Chats writing at once.
    #[arg(long, default_value_t = 100)]
    chats: usize,
    /// Messages per chat in the burst.
    #[arg(long, default_value_t = 10)]
    per_chat: usize,
    /// Messages per second in the latency phase.
    #[arg(long, default_value_t = 100)]
    rate: usize,
    /// Seconds of the latency phase.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
}

#[derive(Serialize)]
pub struct Report {
    scenario: &'static str,
    date: String,
    machine: Machine,
    chats: usize,
    burst: Burst,
    steady: Steady,
}

#[derive(Serialize)]
struct Burst {
    messages: usize,
    seconds: f64,
    answered_per_sec: f64,
    goal_per_sec: f64,
    /// CPU time per message answered, in milliseconds: the whole machine's (the database, the
    /// node, this benchmark's Bot API) and the node's alone (Linux only).
    cpu_ms_per_message: Option<f64>,
    node_cpu_ms_per_message: Option<f64>,
}

#[derive(Serialize)]
struct Steady {
    rate_per_sec: usize,
    messages: usize,
    answered: usize,
    /// From the update's delivery to its answer's sendMessage.
    latency: Latency,
    goal_p95_ms: f64,
}

/// The Bot API: updates waiting for confirmation, when each was first handed over, and what the
/// bot sent. As in Telegram, a chat's message ids are unique whichever side sent them (people's
/// from 1,000,001 here, the bot's from 1).
#[derive(Default)]
struct Api {
    pending: Mutex<VecDeque<(i64, Value)>>,
    delivered: Mutex<HashMap<u64, Instant>>,
    answered: Mutex<HashMap<u64, Instant>>,
    arrived: Notify,
    next_update: AtomicI64,
    next_message: AtomicI64,
}

const MARKER: &str = "bench-";

/// The message number a text ends with (`… bench-17`).
fn number(text: &str) -> Option<u64> {
    text.rsplit_once(MARKER)?.1.trim().parse().ok()
}

impl Api {
    fn say(&self, chat: i64, n: u64) {
        let id = self.next_update.fetch_add(1, Ordering::SeqCst) + 1;
        let update = json!({ "update_id": id, "message": {
            "message_id": 1_000_000 + id, "date": chrono::Utc::now().timestamp(),
            "chat": { "id": chat, "type": "private", "first_name": "B" },
            "from": { "id": chat, "is_bot": false, "first_name": "B" },
            "text": format!("question {MARKER}{n}") } });
        self.pending.lock().unwrap().push_back((id, update));
        self.arrived.notify_waiters();
    }

    async fn get_updates(&self, params: &Value) -> Value {
        let offset = params["offset"].as_i64().unwrap_or(0);
        let timeout = params["timeout"].as_u64().unwrap_or(0).min(5);
        let deadline = Instant::now() + Duration::from_secs(timeout);
        loop {
            let notified = self.arrived.notified();
            {
                let mut pending = self.pending.lock().unwrap();
                while pending.front().is_some_and(|(id, _)| *id < offset) {
                    pending.pop_front();
                }
                if !pending.is_empty() {
                    let batch: Vec<Value> =
                        pending.iter().take(100).map(|(_, u)| u.clone()).collect();
                    let now = Instant::now();
                    let mut delivered = self.delivered.lock().unwrap();
                    for update in &batch {
                        if let Some(n) = update["message"]["text"].as_str().and_then(number) {
                            delivered.entry(n).or_insert(now);
                        }
                    }
                    return Value::Array(batch);
                }
            }
            if tokio::time::timeout_at(deadline.into(), notified)
                .await
                .is_err()
            {
                return json!([]);
            }
        }
    }

    fn send_message(&self, params: &Value) -> Value {
        let text = params["text"].as_str().unwrap_or_default();
        if let Some(n) = number(text) {
            self.answered
                .lock()
                .unwrap()
                .entry(n)
                .or_insert_with(Instant::now);
        }
        let id = self.next_message.fetch_add(1, Ordering::SeqCst) + 1;
        json!({ "message_id": id, "date": chrono::Utc::now().timestamp(),
                "chat": { "id": params["chat_id"], "type": "private", "first_name": "B" },
                "text": text })
    }
}

async fn method(
    State(api): State<Arc<Api>>,
    Path((_bot, name)): Path<(String, String)>,
    body: Bytes,
) -> Json<Value> {
    let params: Value = serde_json::from_slice(&body).unwrap_or(json!({}));
    let result = match name.to_ascii_lowercase().as_str() {
        "getme" => json!({ "id": 1, "is_bot": true, "first_name": "Bench", "username": "bench_bot",
            "can_join_groups": true, "can_read_all_group_messages": false,
            "supports_inline_queries": false, "has_main_web_app": false }),
        "getupdates" => api.get_updates(&params).await,
        "sendmessage" => api.send_message(&params),
        _ => json!(true),
    };
    Json(json!({ "ok": true, "result": result }))
}

pub async fn run(args: TelegramBenchArgs) -> anyhow::Result<Report> {
    let api = Arc::new(Api::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let app = Router::new()
        .route("/{bot}/{method}", post(method))
        .with_state(api.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let scratch = Scratch::postgres(&args.database_url).await?;
    let result = measure(&args, &api, &url, &scratch).await;
    scratch.remove().await;
    server.abort();
    result
}

async fn measure(
    args: &TelegramBenchArgs,
    api: &Arc<Api>,
    url: &str,
    scratch: &Scratch,
) -> anyhow::Result<Report> {
    let dir = tempfile_dir()?;
    let config = dir.join("stele.toml");
    std::fs::write(
        &config,
        "[telegram]\nper_user_per_minute = 0\nflood_limits = false\npoll_timeout = \"5s\"\n",
    )?;
    let kek: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let audit = stele_audit::SigningKey::generate("bench.stele/telegram")?;
    let mut node = tokio::process::Command::new(std::env::current_exe()?)
        .args([
            "serve",
            "--database-url",
            scratch.url().expect("PostgreSQL"),
        ])
        .args(["--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .env("STELE_TELEGRAM_TOKEN", "1:BENCH")
        .env("STELE_TELEGRAM_API_URL", url)
        .env("STELE_KEK", kek)
        .env("STELE_AUDIT_KEY", audit.private_text())
        .env_remove("STELE_EMBEDDING_MODEL")
        .env_remove("STELE_TELEGRAM_ALLOW")
        .env("STELE_LOG", "warn")
        .kill_on_drop(true)
        .spawn()?;
    let result = phases(args, api, node.id()).await;
    let _ = node.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn phases(
    args: &TelegramBenchArgs,
    api: &Arc<Api>,
    node: Option<u32>,
) -> anyhow::Result<Report> {
    let node_cpu = || node.and_then(CpuClock::process);
    let chat = |i: usize| 1000 + (i % args.chats) as i64;
    // Warm up: one message per chat, so subjects and conversations exist.
    let mut n = 0u64;
    for i in 0..args.chats {
        api.say(chat(i), n);
        n += 1;
    }
    wait_answered(api, n, Duration::from_secs(120)).await?;

    // The burst: every chat writes `per_chat` messages at once.
    let first = n;
    let total = args.chats * args.per_chat;
    for i in 0..total {
        api.say(chat(i), n);
        n += 1;
    }
    let started = Instant::now();
    let cpu_before = (CpuClock::machine(), node_cpu());
    wait_answered(api, n, Duration::from_secs(600)).await?;
    let cpu_after = (CpuClock::machine(), node_cpu());
    let per_message =
        |before: Option<f64>, after: Option<f64>| Some((after? - before?) * 1000.0 / total as f64);
    let delivered_at = {
        let delivered = api.delivered.lock().unwrap();
        (first..n).filter_map(|k| delivered.get(&k).copied()).min()
    };
    let end = {
        let answered = api.answered.lock().unwrap();
        (first..n).filter_map(|k| answered.get(&k).copied()).max()
    };
    let seconds = match (delivered_at, end) {
        (Some(a), Some(b)) => (b - a).as_secs_f64(),
        _ => started.elapsed().as_secs_f64(),
    };

    // Steady: `rate` messages per second, round robin over the chats.
    let steady_first = n;
    let count = args.rate * args.seconds as usize;
    let every = Duration::from_secs_f64(1.0 / args.rate as f64);
    let mut tick = tokio::time::interval(every);
    for i in 0..count {
        tick.tick().await;
        api.say(chat(i), n);
        n += 1;
    }
    let _ = wait_answered(api, n, Duration::from_secs(120)).await;
    let samples: Vec<Duration> = {
        let delivered = api.delivered.lock().unwrap();
        let answered = api.answered.lock().unwrap();
        (steady_first..n)
            .filter_map(|k| Some(*answered.get(&k)? - *delivered.get(&k)?))
            .collect()
    };
    Ok(Report {
        scenario: "telegram",
        date: chrono::Utc::now().to_rfc3339(),
        machine: Machine::this(),
        chats: args.chats,
        burst: Burst {
            messages: total,
            seconds,
            answered_per_sec: total as f64 / seconds,
            goal_per_sec: 500.0,
            cpu_ms_per_message: per_message(cpu_before.0, cpu_after.0),
            node_cpu_ms_per_message: per_message(cpu_before.1, cpu_after.1),
        },
        steady: Steady {
            rate_per_sec: args.rate,
            messages: count,
            answered: samples.len(),
            latency: Latency::of(samples),
            goal_p95_ms: 150.0,
        },
    })
}

/// Waits until the messages numbered below `n` are all answered.
async fn wait_answered(api: &Api, n: u64, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let answered = api.answered.lock().unwrap().len() as u64;
        if answered >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("only {answered} of {n} messages were answered in {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir =
        std::env::temp_dir().join(format!("stele-bench-tg-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
