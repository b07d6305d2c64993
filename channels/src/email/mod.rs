//! The email channel: mail in over IMAP (IDLE, under a hold: one reader per mailbox across all
//! nodes), each mail recorded in its thread's `Conversation` before the server is told anything;
//! machines' mail, bounces and spam told apart before anything answers; replies out over SMTP
//! through the conversation's outbox, with a Message-ID fixed when the reply is queued.
//!
//! ```text
//!  IMAP UID FETCH ──► [reader] parse ──► bounce? MarkBounced on our reply
//!                                   ├─► spam / unreadable? Quarantine (raw kept, sealed)
//!                                   └─► thread ──► Conversation.ReceiveMessage (no_reply set
//!                                                   for machines' mail)
//!                     └► \Seen (or move) ──► Mailbox.Advance (the cursor, an event)
//!  MessageReceived ──► [manager] job email.inbound ──► per-sender cap ──► task on the
//!                     mailbox's workflow (origin = the mail)
//!  ReplyRequested ──► workflow.reply ──► Conversation.QueueReply
//!  ReplyQueued ──► [manager] job email.send ──► SMTP (text + HTML, threading headers,
//!                     Auto-Submitted: auto-replied) ──► ReplyDelivered | ReplyDeliveryFailed
//! ```
//!
//! Threading: a mail belongs to the conversation of the first message it names (`References`,
//! `In-Reply-To`) that one is known for: our own Message-IDs carry their thread's token; other
//! ids are looked up as the mail that started a thread. Then a `[#token]` in the subject. Else it
//! starts a conversation of its own. Conversations are `email:<mailbox>:<token>`, the token a
//! digest of the Message-ID that started the thread (so no address is part of a stream's name).
//!
//! The one window where a reply can go out twice: the SMTP server accepted it and the process died
//! before `ReplyDelivered` was recorded. The retry sends the same message (same Message-ID), which
//! mail clients show once.

mod imap;
mod inbound;
pub mod parse;
mod quota;
mod send;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use stele_aggregates::conversation::Conversation;
use stele_aggregates::mailbox::Mailbox;
use stele_engine::process::ProcessManager;
use stele_engine::queue::worker::Worker;
use stele_engine::queue::NewJob;
use stele_engine::store::StorePool;
use stele_engine::{CommandBus, RecordedEvent, Store};
use stele_privacy::Subjects;
use stele_workflows::runtime::Runtime;
use url::Url;

pub use parse::{parse, Mail, Malformed, Own, Report};
pub use send::tls_config;

/// The process manager's name (its checkpoint).
pub const MANAGER: &str = "email-channel";
/// The queue email jobs run on (shared with the other channels).
pub const QUEUE: &str = crate::telegram::QUEUE;
/// The id the mailbox takes part in conversations under.
pub const AGENT: &str = "stele";

/// The email channel's settings: `[[email.mailboxes]]` in the configuration file, or one mailbox
/// from `STELE_EMAIL_*`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// The mailboxes read and answered.
    #[serde(default)]
    pub mailboxes: Vec<MailboxConfig>,
}

/// What is done to a mail on the server once it is recorded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterRecording {
    /// Flag it `\Seen` (the default).
    #[default]
    Seen,
    /// Move it to the folder `move_to` names.
    Move,
    /// Leave it as it is.
    Nothing,
}

/// One mailbox.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailboxConfig {
    /// A short name, unique among the mailboxes (conversations are `email:<name>:…`); the
    /// IMAP user by default.
    #[serde(default)]
    pub name: String,
    /// `imaps://user:password@host:port/FOLDER`, or `imap://…` with STARTTLS.
    pub imap_url: String,
    /// `smtps://user:password@host:port`, or `smtp://…` with STARTTLS.
    pub smtp_url: String,
    /// The address replies come from, e.g. `Help <help@example.org>`.
    pub from: String,
    /// The workflow a mail starts.
    #[serde(default = "default_workflow")]
    pub workflow: String,
    /// An extra CA certificate (PEM) to trust, for private servers.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// What is done to a recorded mail on the server.
    #[serde(default)]
    pub after: AfterRecording,
    /// The folder recorded mail moves to when `after = "move"`.
    #[serde(default)]
    pub move_to: Option<String>,
    /// How often the folder is read when the server has no IDLE.
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How long one IDLE lasts before it is renewed (servers drop it after 29 minutes; the
    /// reader also renews its hold each time).
    #[serde(default = "default_idle", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Automatic answers one sender gets per hour at most (a guard against loops with
    /// autoresponders that set none of the usual headers), counted in the store by every node.
    #[serde(default = "default_per_sender")]
    pub replies_per_sender_per_hour: u32,
    /// Mail scoring at least this is quarantined as spam, not answered.
    #[serde(default = "default_spam_threshold")]
    pub spam_threshold: f64,
    /// An rspamd worker to score each mail (`http://127.0.0.1:11333`); without one (or when
    /// it does not answer), SpamAssassin's `spamd` if set, else the receiving server's spam
    /// headers, else a built-in guess.
    #[serde(default)]
    pub rspamd_url: Option<String>,
    /// A SpamAssassin `spamd` to score each mail (`127.0.0.1:783`).
    #[serde(default)]
    pub spamd_addr: Option<String>,
    /// A folder of templates (`reply.txt`, `reply.html`) replacing the built-in ones.
    #[serde(default)]
    pub templates: Option<PathBuf>,
    /// Whether replies' subjects carry the thread's `[#token]`, for mail clients that drop
    /// threading headers.
    #[serde(default = "default_true")]
    pub subject_token: bool,
    /// Signs replies with DKIM when set.
    #[serde(default)]
    pub dkim: Option<DkimSettings>,
}

/// DKIM signing of replies (`[email.mailboxes.dkim]`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimSettings {
    /// The selector the public key is published under (`<selector>._domainkey.<domain>`).
    pub selector: String,
    /// The private key: an RSA key in PKCS#1 PEM, or an Ed25519 key as 32 bytes in base64.
    pub key_file: PathBuf,
    /// `rsa` (the default) or `ed25519`.
    #[serde(default)]
    pub algorithm: Option<String>,
    /// The signing domain (the `from` address's by default).
    #[serde(default)]
    pub domain: Option<String>,
}

fn default_true() -> bool {
    true
}

fn default_workflow() -> String {
    "assistant".into()
}

fn default_poll_interval() -> Duration {
    Duration::from_secs(60)
}

fn default_idle() -> Duration {
    Duration::from_secs(20)
}

fn default_per_sender() -> u32 {
    30
}

fn default_spam_threshold() -> f64 {
    5.0
}

impl MailboxConfig {
    /// A mailbox with the defaults.
    pub fn new(
        imap_url: impl Into<String>,
        smtp_url: impl Into<String>,
        from: impl Into<String>,
    ) -> MailboxConfig {
        MailboxConfig {
            name: String::new(),
            imap_url: imap_url.into(),
            smtp_url: smtp_url.into(),
            from: from.into(),
            workflow: default_workflow(),
            ca_file: None,
            after: AfterRecording::Seen,
            move_to: None,
            poll_interval: default_poll_interval(),
            idle_timeout: default_idle(),
            replies_per_sender_per_hour: default_per_sender(),
            spam_threshold: default_spam_threshold(),
            rspamd_url: None,
            spamd_addr: None,
            templates: None,
            subject_token: true,
            dkim: None,
        }
    }
}

/// Where one IMAP folder is and how to log in.
#[derive(Clone)]
pub(crate) struct ImapTarget {
    pub(crate) tls: bool,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) user: String,
    pub(crate) password: String,
    pub(crate) folder: String,
}

fn decoded(text: &str) -> String {
    url::form_urlencoded::parse(format!("x={text}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

impl ImapTarget {
    fn parse(text: &str) -> anyhow::Result<ImapTarget> {
        let url = Url::parse(text).map_err(|e| anyhow::anyhow!("the IMAP URL: {e}"))?;
        let tls = match url.scheme() {
            "imaps" => true,
            "imap" => false,
            other => anyhow::bail!("the IMAP URL's scheme is {other:?}: expected imaps or imap"),
        };
        let host = url
            .host_str()
            .ok_or_else(|| anyhow::anyhow!("the IMAP URL names no host"))?
            .trim_matches(|c| c == '[' || c == ']')
            .to_owned();
        if url.username().is_empty() {
            anyhow::bail!("the IMAP URL names no user (imaps://user:password@host/INBOX)");
        }
        let folder = decoded(url.path().trim_start_matches('/'));
        Ok(ImapTarget {
            tls,
            port: url.port().unwrap_or(if tls { 993 } else { 143 }),
            host,
            user: decoded(url.username()),
            password: decoded(url.password().unwrap_or("")),
            folder: if folder.is_empty() {
                "INBOX".into()
            } else {
                folder
            },
        })
    }
}

/// One configured mailbox, ready.
pub(crate) struct Configured {
    pub(crate) config: MailboxConfig,
    pub(crate) imap: ImapTarget,
    pub(crate) smtp: send::Smtp,
    pub(crate) from: lettre::message::Mailbox,
    pub(crate) templates: send::Templates,
    pub(crate) tls: Arc<tokio_rustls::rustls::ClientConfig>,
    pub(crate) dkim: Option<lettre::message::dkim::DkimConfig>,
}

impl Configured {
    /// A mailbox's settings, checked and made ready (nothing is connected yet).
    pub(crate) fn new(mut mailbox: MailboxConfig) -> anyhow::Result<Configured> {
        let imap = ImapTarget::parse(&mailbox.imap_url)?;
        if mailbox.name.trim().is_empty() {
            mailbox.name = imap.user.clone();
        }
        let name = mailbox.name.trim().to_lowercase();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
        {
            anyhow::bail!("mailbox name {name:?}: use letters, digits, '-', '_', '.' or '@'");
        }
        mailbox.name = name.clone();
        if mailbox.after == AfterRecording::Move && mailbox.move_to.is_none() {
            anyhow::bail!("mailbox {name}: after = \"move\" needs move_to (a folder)");
        }
        let from: lettre::message::Mailbox = mailbox
            .from
            .parse()
            .map_err(|e| anyhow::anyhow!("mailbox {name}: from {:?}: {e}", mailbox.from))?;
        let tls = Arc::new(send::tls_config(mailbox.ca_file.as_deref())?);
        let smtp = send::Smtp::new(&mailbox.smtp_url, mailbox.ca_file.as_deref())
            .map_err(|e| anyhow::anyhow!("mailbox {name}: {e}"))?;
        let templates = send::Templates::load(mailbox.templates.as_deref())
            .map_err(|e| anyhow::anyhow!("mailbox {name}: {e}"))?;
        let dkim = mailbox
            .dkim
            .as_ref()
            .map(|settings| send::dkim_config(settings, &from))
            .transpose()
            .map_err(|e| anyhow::anyhow!("mailbox {name}: DKIM: {e}"))?;
        Ok(Configured {
            config: mailbox,
            imap,
            smtp,
            from,
            templates,
            tls,
            dkim,
        })
    }
}

/// The email channel: every configured mailbox.
pub struct Email {
    boxes: HashMap<String, Arc<Configured>>,
    runtime: Arc<Runtime>,
    subjects: Arc<Subjects>,
    conversations: CommandBus<Conversation>,
    cursors: CommandBus<Mailbox>,
    pool: StorePool,
    own: Own,
    http: reqwest::Client,
}

impl Email {
    /// The channel for `config` on `store` (read and written through its sealing log). Refuses
    /// settings that cannot work (a URL that does not parse, two mailboxes of one name).
    pub fn new(
        config: EmailConfig,
        store: &Store,
        runtime: Arc<Runtime>,
        subjects: Arc<Subjects>,
    ) -> anyhow::Result<Email> {
        let mut boxes = HashMap::new();
        let mut own = Own::default();
        for mailbox in config.mailboxes {
            let ready = Configured::new(mailbox)?;
            let name = ready.config.name.clone();
            if boxes.contains_key(&name) {
                anyhow::bail!("two mailboxes are named {name:?}: give each its own name");
            }
            own.addresses
                .push(ready.from.email.to_string().to_lowercase());
            boxes.insert(name, Arc::new(ready));
        }
        Ok(Email {
            boxes,
            runtime,
            subjects,
            conversations: CommandBus::new(store.log.clone(), ()),
            cursors: CommandBus::new(store.log.clone(), ()),
            pool: store.pool.clone(),
            own,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
        })
    }

    /// Whether any mailbox is configured.
    pub fn is_empty(&self) -> bool {
        self.boxes.is_empty()
    }

    /// The names of the configured mailboxes.
    pub fn mailboxes(&self) -> Vec<String> {
        let mut names: Vec<String> = self.boxes.keys().cloned().collect();
        names.sort();
        names
    }

    /// The conversation id of a thread of `mailbox`.
    pub fn conversation_id(mailbox: &str, token: &str) -> String {
        format!("email:{mailbox}:{token}")
    }

    /// The thread token of a Message-ID: a digest, so no address shows in a stream's name.
    pub fn token_of(message_id: &str) -> String {
        parse::digest(message_id.to_lowercase().as_bytes(), 16)
    }

    /// The mailbox and thread token of one of this channel's conversations.
    fn parts_of(conversation: &str) -> Option<(&str, &str)> {
        conversation.strip_prefix("email:")?.split_once(':')
    }

    fn mailbox_of(&self, conversation: &str) -> Option<(Arc<Configured>, String)> {
        let (name, token) = Self::parts_of(conversation)?;
        Some((self.boxes.get(name)?.clone(), token.to_owned()))
    }

    /// The process manager that turns recorded mail and queued replies into jobs.
    pub fn manager(&self) -> Arc<dyn ProcessManager> {
        Arc::new(EmailManager {
            prefixes: self
                .mailboxes()
                .iter()
                .map(|name| format!("email:{name}:"))
                .collect(),
        })
    }

    /// Adds the channel's job handlers to a worker of [`QUEUE`].
    pub fn register(self: &Arc<Self>, worker: Worker) -> Worker {
        let inbound = self.clone();
        let send = self.clone();
        worker
            .handle("email.inbound", move |job| {
                let email = inbound.clone();
                async move { email.on_inbound(job).await }
            })
            .handle("email.send", move |job| {
                let email = send.clone();
                async move { email.on_send(job).await }
            })
    }
}

/// Turns the mailboxes' recorded mail and queued replies into jobs. Pure.
struct EmailManager {
    prefixes: Vec<String>,
}

impl ProcessManager for EmailManager {
    fn name(&self) -> &'static str {
        MANAGER
    }

    fn event_types(&self) -> &'static [&'static str] {
        &["MessageReceived", "ReplyQueued"]
    }

    fn react(&self, event: &RecordedEvent) -> Vec<NewJob> {
        let conversation = &event.stream.aggregate_id;
        if event.stream.aggregate_type != "conversation"
            || !self.prefixes.iter().any(|p| conversation.starts_with(p))
        {
            return Vec::new();
        }
        let data = &event.payload["data"];
        let Some(message_id) = data["message_id"].as_str() else {
            return Vec::new();
        };
        let payload = serde_json::json!({ "conversation": conversation, "message_id": message_id });
        let job = match event.event_type.as_str() {
            // A machine's mail is recorded, never answered.
            "MessageReceived" if !data["no_reply"].is_null() => return Vec::new(),
            "MessageReceived" => NewJob::new(QUEUE, "email.inbound", payload)
                .ordering_key(format!("in:{conversation}"))
                .idempotency_key(format!("mail-in:{conversation}:{message_id}"))
                .max_attempts(10),
            _ => NewJob::new(QUEUE, "email.send", payload)
                .ordering_key(format!("out:{conversation}"))
                .idempotency_key(format!("mail-out:{conversation}:{message_id}"))
                .max_attempts(30),
        };
        vec![job.timeout(Duration::from_secs(120))]
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};
    use stele_engine::{CommandMeta, Position, StreamId};

    use super::*;

    fn event(id: &str, event_type: &str, data: Value) -> RecordedEvent {
        RecordedEvent {
            position: Position(1),
            stream: StreamId::new("conversation", id),
            sequence: 1,
            event_type: event_type.into(),
            event_version: "1.0".into(),
            recorded_at: chrono::Utc::now(),
            metadata: CommandMeta::new("test", "test").for_event(uuid::Uuid::now_v7()),
            payload: json!({ "type": event_type, "data": data }),
        }
    }

    #[test]
    fn mail_and_replies_of_our_mailboxes_become_jobs_and_machines_mail_does_not() {
        let m = EmailManager {
            prefixes: vec!["email:help:".into()],
        };
        let jobs = m.react(&event(
            "email:help:abc",
            "MessageReceived",
            json!({ "message_id": "mail-1" }),
        ));
        assert_eq!(jobs[0].kind, "email.inbound");
        assert_eq!(jobs[0].ordering_key.as_deref(), Some("in:email:help:abc"));
        let out = m.react(&event(
            "email:help:abc",
            "ReplyQueued",
            json!({ "message_id": "reply-1" }),
        ));
        assert_eq!(out[0].kind, "email.send");
        let automated = event(
            "email:help:abc",
            "MessageReceived",
            json!({ "message_id": "mail-2", "no_reply": "Auto-Submitted: auto-replied" }),
        );
        assert!(m.react(&automated).is_empty());
        for other in ["email:sales:abc", "telegram:1:42"] {
            let e = event(other, "MessageReceived", json!({ "message_id": "m" }));
            assert!(m.react(&e).is_empty(), "{other}");
        }
    }

    #[test]
    fn imap_urls_name_the_server_the_user_and_the_folder() {
        let t = ImapTarget::parse("imaps://help%40x.org:p%40ss@mail.x.org/Support%20Mail").unwrap();
        assert!(t.tls);
        assert_eq!((t.host.as_str(), t.port), ("mail.x.org", 993));
        assert_eq!(t.user, "help@x.org");
        assert_eq!(t.password, "p@ss");
        assert_eq!(t.folder, "Support Mail");
        let t = ImapTarget::parse("imap://a:b@127.0.0.1:11143").unwrap();
        assert!(!t.tls);
        assert_eq!((t.port, t.folder.as_str()), (11143, "INBOX"));
        assert!(ImapTarget::parse("pop3://a@b").is_err());
        assert!(ImapTarget::parse("imaps://host/INBOX").is_err());
    }
}
