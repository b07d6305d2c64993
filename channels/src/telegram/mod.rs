//! The Telegram channel: updates in (long polling under a hold, one poller per bot across all
//! nodes), each recorded in its chat's `Conversation` before its offset is confirmed; messages
//! turned into work (commands, or a task on the chat's workflow); replies out through the
//! conversation's outbox, throttled to Telegram's limits.
//!
//! ```text
//!  getUpdates ──► [poller] record: Conversation.ReceiveMessage / Join / Quarantine
//!                     └► next getUpdates with offset = last + 1 (confirms only what is recorded)
//!  MessageReceived ──► [manager] job telegram.inbound ──► access list, per-user limit,
//!                     command (answer queued as a reply) or task on the workflow (origin = message)
//!  ReplyRequested (a task's reply step) ──► workflow.reply ──► Conversation.QueueReply (on
//!                     this channel's bus: the send job is enqueued in the same commit)
//!  ReplyQueued ──► [manager] job telegram.send (one at a time per chat) ──► throttle ──►
//!                     sendMessage (split at 4096) ──► ReplyDelivered | ReplyDeliveryFailed
//! ```
//!
//! The one window where a reply can go out twice: Telegram accepted `sendMessage` and the process
//! died before `ReplyDelivered` was recorded; the job runs again after its lease and sends again.
//! Telegram offers no idempotency key to close it. It lasts one append (milliseconds).

mod inbound;
mod outbox;
mod poller;
mod progress;
mod text;
mod webhook;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::Deserialize;
use stele_aggregates::access::{AccessCommand, AccessList};
use stele_aggregates::conversation::Conversation;
use stele_engine::process::ProcessManager;
use stele_engine::queue::worker::Worker;
use stele_engine::queue::{JobQueue, NewJob};
use stele_engine::store::StorePool;
use stele_engine::{CommandBus, CommandMeta, EventLog, RecordedEvent, Store};
use stele_privacy::Subjects;
use stele_workflows::runtime::Runtime;
use teloxide::prelude::Requester;
use teloxide::Bot;

pub use outbox::{split, Throttle};
pub use poller::Incoming;
pub use progress::status_text;
pub use text::{command_of, Command};

/// The queue channel jobs run on.
pub const QUEUE: &str = "channels";
/// The queue of the jobs that follow pipeline tasks to their end (long, mostly idle): apart, so
/// they never hold up messages and replies.
pub const PROGRESS_QUEUE: &str = "channels-progress";
/// The process manager's name (its checkpoint).
pub const MANAGER: &str = "telegram-channel";

/// Chats whose state is kept between commands, and for how long: states hold people's data in
/// the clear, so not for long.
const STATES: u64 = 10_000;
const STATES_TTL: Duration = Duration::from_secs(5);
/// The access list's stream id for Telegram.
pub const ACCESS_LIST: &str = "telegram";

/// The Telegram channel's settings (`[telegram]` in the configuration file, `STELE_TELEGRAM_*`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelegramConfig {
    /// The bot's token, from @BotFather (or `STELE_TELEGRAM_TOKEN`).
    #[serde(default)]
    pub token: String,
    /// The Bot API's base URL (Telegram's by default; a local Bot API server, or a fake in tests).
    #[serde(default)]
    pub api_url: Option<String>,
    /// The workflow plain messages go to.
    #[serde(default = "default_workflow")]
    pub workflow: String,
    /// The workflow `/new_task` starts.
    #[serde(default = "default_pipeline")]
    pub pipeline: String,
    /// User and chat ids allowed (deny-by-default once any is); more with `stele telegram allow`.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Messages a person may send per minute before being asked to slow down.
    #[serde(default = "default_user_limit")]
    pub per_user_per_minute: u32,
    /// How long one getUpdates waits for news (Telegram allows up to 50 s).
    #[serde(default = "default_poll_timeout", with = "humantime_serde")]
    pub poll_timeout: Duration,
    /// What `/start` and a refusal for want of consent say about giving it.
    #[serde(default)]
    pub consent_text: Option<String>,
    /// Whether sends keep to Telegram's flood limits (on by default; off only against a local
    /// fake, as benchmarks do: Telegram itself enforces them).
    #[serde(default = "default_true")]
    pub flood_limits: bool,
    /// The public URL Telegram posts updates to (webhooks); polling without one.
    #[serde(default)]
    pub webhook_url: Option<String>,
    /// The secret Telegram sends with each webhook post (derived from the token without one).
    #[serde(default)]
    pub webhook_secret: Option<String>,
}

fn default_true() -> bool {
    true
}

fn default_workflow() -> String {
    "assistant".into()
}

fn default_pipeline() -> String {
    "dev_pipeline".into()
}

fn default_user_limit() -> u32 {
    20
}

fn default_poll_timeout() -> Duration {
    Duration::from_secs(25)
}

impl TelegramConfig {
    /// Settings with the defaults for a bot `token`.
    pub fn new(token: impl Into<String>) -> Self {
        TelegramConfig {
            token: token.into(),
            api_url: None,
            workflow: default_workflow(),
            pipeline: default_pipeline(),
            allow: Vec::new(),
            per_user_per_minute: default_user_limit(),
            poll_timeout: default_poll_timeout(),
            consent_text: None,
            flood_limits: true,
            webhook_url: None,
            webhook_secret: None,
        }
    }

    /// The bot client these settings describe.
    pub fn bot(&self) -> anyhow::Result<Bot> {
        // A long poll holds its request for `poll_timeout`: the client waits longer than that
        // (teloxide's default client gives up after 17 s).
        let client = teloxide::net::default_reqwest_settings()
            .timeout(self.poll_timeout.min(Duration::from_secs(50)) + Duration::from_secs(15))
            .build()
            .map_err(|e| anyhow::anyhow!("the Telegram client: {e}"))?;
        let bot = Bot::with_client(&self.token, client);
        Ok(match &self.api_url {
            None => bot,
            Some(url) => bot.set_api_url(
                url.trim_end_matches('/')
                    .parse()
                    .map_err(|e| anyhow::anyhow!("STELE_TELEGRAM_API_URL {url:?}: {e}"))?,
            ),
        })
    }
}

/// What `/models` lists: the roles a chat may use and the models each goes through.
#[derive(Clone, Debug, Default)]
pub struct RoleSummary {
    pub role: String,
    pub description: String,
    pub models: Vec<String>,
}

/// The Telegram channel of one bot.
pub struct Telegram {
    config: TelegramConfig,
    bot: Bot,
    /// The bot's own id: conversations are `telegram:<bot id>:<chat id>`.
    bot_id: String,
    runtime: Arc<Runtime>,
    subjects: Arc<Subjects>,
    conversations: Arc<CommandBus<Conversation>>,
    access: CommandBus<AccessList>,
    configured: BTreeSet<String>,
    pool: StorePool,
    log: Arc<dyn EventLog>,
    queue: Arc<dyn JobQueue>,
    throttle: Throttle,
    users: outbox::UserLimit,
    roles: Vec<RoleSummary>,
    /// The bot's username, once known (commands addressed `/help@name`).
    username: OnceLock<String>,
    /// Parts of split replies sent so far (and the first part's message id), so a reply
    /// interrupted by a 429 goes on where it stopped.
    progress: Mutex<HashMap<String, (usize, Option<i32>)>>,
}

impl Telegram {
    /// The channel for `config` on `store` (read and written through its sealing log). The bot's
    /// id is the token's first part, as Telegram issues tokens (`<bot id>:<secret>`).
    pub fn new(
        config: TelegramConfig,
        store: &Store,
        runtime: Arc<Runtime>,
        subjects: Arc<Subjects>,
        roles: Vec<RoleSummary>,
    ) -> anyhow::Result<Telegram> {
        let bot = config.bot()?;
        let bot_id = config
            .token
            .split_once(':')
            .map(|(id, _)| id.to_owned())
            .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| {
                anyhow::anyhow!("the Telegram token is not a bot token (<bot id>:<secret>)")
            })?;
        let manager = Arc::new(ChannelManager::new(&bot_id, &config.pipeline));
        // What the channel records becomes its jobs in the same commit (the manager passes
        // those events by), the replies the runtime queues on its chats too; recent chats'
        // states spare a replay of their streams per command.
        let conversations = Arc::new(
            CommandBus::new(store.log.clone(), ())
                .with_reactor(manager.clone())
                .with_state_cache(STATES, STATES_TTL),
        );
        runtime.route_conversations(&manager.prefix, conversations.clone());
        Ok(Telegram {
            configured: config.allow.iter().map(|id| id.trim().to_owned()).collect(),
            users: outbox::UserLimit::new(config.per_user_per_minute),
            bot,
            bot_id,
            runtime,
            subjects,
            conversations,
            access: CommandBus::new(store.log.clone(), ()).with_state_cache(1, STATES_TTL),
            pool: store.pool.clone(),
            log: store.log.clone(),
            queue: store.queue.clone(),
            throttle: if config.flood_limits {
                Throttle::telegram()
            } else {
                Throttle::off()
            },
            roles,
            config,
            username: OnceLock::new(),
            progress: Mutex::new(HashMap::new()),
        })
    }

    /// The conversation id of a chat: a keyed pseudonym of the chat's id, so that no stream's
    /// or job's name holds the id (a private chat's id is its person's Telegram user id). The
    /// chat id itself is kept sealed in the conversation (`address`).
    pub fn conversation_id(&self, chat_id: i64) -> String {
        let chat = self
            .subjects
            .pseudonym("telegram-chat", &format!("{}:{chat_id}", self.bot_id));
        format!("telegram:{}:{chat}", self.bot_id)
    }

    /// The chat of one of this bot's conversations: its sealed address (none once its person is
    /// erased), or the external id of a conversation opened before chats had an address.
    fn chat_of(conversation: &Conversation) -> Option<i64> {
        conversation
            .address
            .as_deref()
            .or(conversation.external_id.as_deref())?
            .parse()
            .ok()
    }

    /// The process manager that turns this bot's messages and replies into jobs.
    pub fn manager(self: &Arc<Self>) -> Arc<dyn ProcessManager> {
        Arc::new(ChannelManager::new(&self.bot_id, &self.config.pipeline))
    }

    /// Adds the channel's job handlers to a worker of [`QUEUE`].
    pub fn register(self: &Arc<Self>, worker: Worker) -> Worker {
        let inbound = self.clone();
        let send = self.clone();
        worker
            .handle("telegram.inbound", move |job| {
                let telegram = inbound.clone();
                async move { telegram.on_inbound(job).await }
            })
            .handle("telegram.send", move |job| {
                let telegram = send.clone();
                async move { telegram.on_send(job).await }
            })
    }

    /// Adds the progress handler to a worker of [`PROGRESS_QUEUE`].
    pub fn register_progress(self: &Arc<Self>, worker: Worker) -> Worker {
        let progress = self.clone();
        worker.handle("telegram.progress", move |job| {
            let telegram = progress.clone();
            async move { telegram.on_progress(job).await }
        })
    }

    /// Lets `id` (a Telegram user or chat id) use the bot; recorded.
    pub async fn allow(store: &Store, id: &str, by: &str) -> anyhow::Result<()> {
        access_command(
            store,
            AccessCommand::Allow {
                id: id.into(),
                by: by.into(),
            },
        )
        .await
    }

    /// Shuts `id` out; recorded.
    pub async fn deny(store: &Store, id: &str, by: &str) -> anyhow::Result<()> {
        access_command(
            store,
            AccessCommand::Deny {
                id: id.into(),
                by: by.into(),
            },
        )
        .await
    }

    /// The recorded access list.
    pub async fn access_list(store: &Store) -> anyhow::Result<AccessList> {
        let bus: CommandBus<AccessList> = CommandBus::new(store.log.clone(), ());
        Ok(bus.load(ACCESS_LIST).await?.0)
    }

    /// Registers the bot's commands with Telegram (`setMyCommands`), so clients offer them.
    pub async fn register_commands(&self) -> Result<(), teloxide::RequestError> {
        let commands = text::COMMANDS
            .iter()
            .map(|(name, about)| teloxide::types::BotCommand::new(*name, *about))
            .collect::<Vec<_>>();
        self.bot.set_my_commands(commands).await?;
        Ok(())
    }
}

async fn access_command(store: &Store, command: AccessCommand) -> anyhow::Result<()> {
    let bus: CommandBus<AccessList> = CommandBus::new(store.log.clone(), ());
    bus.execute(
        ACCESS_LIST,
        command,
        CommandMeta::new("stele telegram", "operator"),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// Turns a bot's recorded messages and queued replies into jobs. Pure.
struct ChannelManager {
    prefix: String,
    /// Tasks on this workflow get a status message.
    pipeline: String,
}

impl ChannelManager {
    fn new(bot_id: &str, pipeline: &str) -> Self {
        ChannelManager {
            prefix: format!("telegram:{bot_id}:"),
            pipeline: pipeline.to_owned(),
        }
    }
}

impl ProcessManager for ChannelManager {
    fn name(&self) -> &'static str {
        MANAGER
    }

    fn event_types(&self) -> &'static [&'static str] {
        &["MessageReceived", "ReplyQueued", "TaskCreated"]
    }

    fn react(&self, event: &RecordedEvent) -> Vec<NewJob> {
        if event.event_type == "TaskCreated" {
            let data = &event.payload["data"];
            let Some(conversation) = data
                .pointer("/origin/conversation")
                .and_then(|c| c.as_str())
                .filter(|c| c.starts_with(&self.prefix))
            else {
                return Vec::new();
            };
            // Pipeline tasks get a status message; a chat answer, only the typing action its
            // message was met with.
            if data["workflow"].as_str() != Some(self.pipeline.as_str()) {
                return Vec::new();
            }
            let task = &event.stream.aggregate_id;
            let payload = serde_json::json!({
                "conversation": conversation, "task_id": task, "status": true,
            });
            // It follows the task to its end: as long as a task may take.
            return vec![NewJob::new(PROGRESS_QUEUE, "telegram.progress", payload)
                .idempotency_key(format!("tg-progress:{task}"))
                .max_attempts(20)
                .timeout(Duration::from_secs(24 * 3600))];
        }
        let conversation = &event.stream.aggregate_id;
        if event.stream.aggregate_type != "conversation" || !conversation.starts_with(&self.prefix)
        {
            return Vec::new();
        }
        let Some(message_id) = event
            .payload
            .pointer("/data/message_id")
            .and_then(|id| id.as_str())
        else {
            return Vec::new();
        };
        // Status messages are sent (and edited) by the progress job itself.
        if message_id.starts_with("status-") {
            return Vec::new();
        }
        let payload = serde_json::json!({ "conversation": conversation, "message_id": message_id });
        // One message at a time per chat each way, in the order they were recorded.
        let job = match event.event_type.as_str() {
            "MessageReceived" => NewJob::new(QUEUE, "telegram.inbound", payload)
                .ordering_key(format!("in:{conversation}"))
                .idempotency_key(format!("tg-in:{conversation}:{message_id}"))
                .max_attempts(10),
            _ => NewJob::new(QUEUE, "telegram.send", payload)
                .ordering_key(format!("out:{conversation}"))
                .idempotency_key(format!("tg-out:{conversation}:{message_id}"))
                .max_attempts(50),
        };
        vec![job.timeout(Duration::from_secs(120))]
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};
    use stele_engine::{Position, StreamId};

    use super::*;

    fn event(kind: &str, id: &str, event_type: &str, data: Value) -> RecordedEvent {
        RecordedEvent {
            position: Position(1),
            stream: StreamId::new(kind, id),
            sequence: 1,
            event_type: event_type.into(),
            event_version: "1.0".into(),
            recorded_at: chrono::Utc::now(),
            metadata: CommandMeta::new("test", "test").for_event(uuid::Uuid::now_v7()),
            payload: json!({ "type": event_type, "data": data }),
        }
    }

    fn manager() -> ChannelManager {
        ChannelManager {
            prefix: "telegram:1:".into(),
            pipeline: "dev_pipeline".into(),
        }
    }

    #[test]
    fn messages_and_replies_of_this_bot_become_jobs_ordered_per_chat() {
        let m = manager();
        let inbound = m.react(&event(
            "conversation",
            "telegram:1:42",
            "MessageReceived",
            json!({ "message_id": "tg-7" }),
        ));
        assert_eq!(inbound.len(), 1);
        assert_eq!(inbound[0].kind, "telegram.inbound");
        assert_eq!(inbound[0].ordering_key.as_deref(), Some("in:telegram:1:42"));
        let out = m.react(&event(
            "conversation",
            "telegram:1:42",
            "ReplyQueued",
            json!({ "message_id": "reply-1" }),
        ));
        assert_eq!(out[0].kind, "telegram.send");
        assert_eq!(out[0].ordering_key.as_deref(), Some("out:telegram:1:42"));
        // Another bot's chat, an email thread, and status messages (sent by the progress job).
        for (id, message) in [
            ("telegram:2:42", "tg-7"),
            ("email:<a@b>", "m-1"),
            ("telegram:1:42", "status-t1"),
        ] {
            let reply = event(
                "conversation",
                id,
                "ReplyQueued",
                json!({ "message_id": message }),
            );
            assert!(m.react(&reply).is_empty(), "{id} {message}");
        }
    }

    #[test]
    fn only_pipeline_tasks_from_this_bot_get_a_progress_job() {
        let m = manager();
        let task = |workflow: &str, conversation: &str| {
            event(
                "task",
                "t-1",
                "TaskCreated",
                json!({ "workflow": workflow, "origin": { "conversation": conversation, "message": "tg-7" } }),
            )
        };
        let jobs = m.react(&task("dev_pipeline", "telegram:1:42"));
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].queue, PROGRESS_QUEUE);
        assert_eq!(jobs[0].payload["task_id"], "t-1");
        assert!(m.react(&task("assistant", "telegram:1:42")).is_empty());
        assert!(m.react(&task("dev_pipeline", "telegram:2:42")).is_empty());
        let no_origin = event(
            "task",
            "t-2",
            "TaskCreated",
            json!({ "workflow": "dev_pipeline" }),
        );
        assert!(m.react(&no_origin).is_empty());
    }
}
