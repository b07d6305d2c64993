//! Updates in: long polling under a hold (Telegram serves one poller per bot), each update
//! recorded in its chat's conversation before the next `getUpdates` confirms it.
//!
//! Telegram keeps an update until a `getUpdates` asks for a higher offset, and the poller asks
//! for one only once every update before it is recorded. A process that dies (`kill -9`) between
//! recording and confirming gets the same updates again from whoever polls next: recording them
//! again is a no-op (a message's Telegram id is seen already, a quarantine's too). So nothing is
//! lost and nothing recorded twice. Updates of different chats are recorded concurrently; those
//! of one chat in order.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use futures::StreamExt;
use serde_json::Value;
use stele_aggregates::conversation::{
    Attachment, Channel, ConversationCommand, ConversationError, Participant,
};
use stele_aggregates::subject::Identifier;
use stele_engine::projection::Hold;
use stele_engine::{CommandError, CommandMeta};
use stele_privacy::PrivacyError;
use teloxide::net::Download;
use teloxide::payloads::GetUpdatesSetters;
use teloxide::prelude::Requester;
use teloxide::types::{FileMeta, Message, Update, UpdateKind, User};
use teloxide::RequestError;
use tracing::Instrument;
use uuid::Uuid;

use super::Telegram;

/// The id the bot takes part in conversations under.
pub(super) const AGENT: &str = "stele";

/// Names the commands an update leads to, so a redelivered update repeats the same ids.
const UPDATE_NAMESPACE: Uuid = Uuid::from_u128(0x5d8e_4c1a_7b2f_4e6a_9c3d_1f0b_2a4e_6c8d);

/// The largest file a bot may fetch from Telegram: 20 MB.
pub(super) const MAX_DOWNLOAD: u64 = 20 * 1024 * 1024;

fn too_big() -> String {
    "over Telegram's limit of 20 MB for the files a bot may fetch".into()
}

/// How long a poller waits before trying again after an error, at most.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What fetching a file gave.
enum Fetched {
    Bytes(Vec<u8>),
    TooBig,
    /// Telegram would not give it (why).
    Refused(String),
}

/// An update as it came: read, or (its id and raw form) when Telegram's types do not read it.
pub type Incoming = Result<Update, (i64, Value)>;

/// What an update is, once read.
enum Read {
    Message(Box<Message>),
    /// Not understood, or of a kind the channel does not take: kept aside, with why.
    Quarantine {
        chat: Option<i64>,
        user: Option<u64>,
        reason: String,
        external_id: Option<String>,
    },
}

impl Telegram {
    /// Receives updates until `stopped`: sets the webhook when one is configured (the API
    /// server's route receives them), else polls.
    pub async fn receive(&self, stopped: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        match self.config.webhook_url.clone() {
            Some(url) => {
                tokio::pin!(stopped);
                tokio::select! {
                    _ = &mut stopped => return Ok(()),
                    set = self.set_webhook(&url) => set?,
                }
                stopped.await;
                Ok(())
            }
            None => self.poll(stopped).await,
        }
    }

    /// Polls for updates until `stopped`: only while this process holds the bot's hold, so only
    /// one node polls a bot at a time; the others wait and take over when it dies.
    pub async fn poll(&self, stopped: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let owner = format!("poller-{}", Uuid::now_v7().simple());
        let name = format!("telegram-poller:{}", self.bot_id);
        let hold = Hold::new(&self.pool, &name, &owner, Duration::from_secs(30)).await?;
        tokio::pin!(stopped);
        let mut prepared = false;
        let mut offset: Option<i32> = None;
        let mut backoff = Duration::from_millis(500);
        loop {
            let step = async {
                match hold.acquire().await {
                    Ok(true) => {}
                    Ok(false) => {
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        return Ok(false);
                    }
                    Err(e) => return Err(anyhow::anyhow!("taking the poller's hold: {e}")),
                }
                if !prepared {
                    self.prepare().await?;
                    prepared = true;
                }
                self.poll_once(&mut offset).await?;
                Ok(true)
            };
            tokio::select! {
                _ = &mut stopped => break,
                result = step => match result {
                    Ok(_) => backoff = Duration::from_millis(500),
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "Telegram polling failed");
                        tokio::select! {
                            _ = &mut stopped => break,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }
        if let Err(e) = hold.release().await {
            tracing::warn!(error = %e, "giving the Telegram poller's hold up failed");
        }
        Ok(())
    }

    /// Once per hold: polling needs no webhook set; the bot's commands are registered.
    async fn prepare(&self) -> anyhow::Result<()> {
        let me = self.bot.get_me().await?;
        let _ = self
            .username
            .set(me.user.username.clone().unwrap_or_default());
        self.bot.delete_webhook().await?;
        if let Err(e) = self.register_commands().await {
            tracing::warn!(error = %e, "registering the bot's commands failed");
        }
        tracing::info!(bot = %self.bot_id, username = ?me.user.username, "Telegram polling");
        Ok(())
    }

    /// One `getUpdates`: records what came, then moves the offset past it.
    async fn poll_once(&self, offset: &mut Option<i32>) -> anyhow::Result<()> {
        let mut request = self
            .bot
            .get_updates()
            .timeout(self.config.poll_timeout.as_secs().min(50) as u32);
        if let Some(offset) = *offset {
            request = request.offset(offset);
        }
        let updates = match request.await {
            Ok(updates) => updates.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(RequestError::RetryAfter(wait)) => {
                tokio::time::sleep(wait.duration()).await;
                return Ok(());
            }
            // One malformed update must not stop the others: read them one by one.
            Err(RequestError::InvalidJson { raw, .. }) => one_by_one(&raw)?,
            Err(e) => return Err(e.into()),
        };
        if updates.is_empty() {
            return Ok(());
        }
        let last = updates
            .iter()
            .map(|update| match update {
                Ok(update) => update.id.0 as i64,
                Err((id, _)) => *id,
            })
            .max()
            .unwrap_or(0);
        self.record_all(updates).await?;
        *offset = Some((last + 1) as i32);
        Ok(())
    }

    /// Records updates (from polling or a webhook): per chat in order, chats concurrently.
    pub async fn record_all(&self, updates: Vec<Incoming>) -> anyhow::Result<()> {
        let mut by_chat: BTreeMap<Option<i64>, Vec<Incoming>> = BTreeMap::new();
        for update in updates {
            let chat = match &update {
                Ok(update) => update.chat().map(|chat| chat.id.0),
                Err((_, raw)) => chat_in(raw),
            };
            by_chat.entry(chat).or_default().push(update);
        }
        let results = join_all(by_chat.into_values().map(|updates| async move {
            for update in updates {
                match update {
                    Ok(update) => {
                        let span = update_span(update.id.0 as i64);
                        self.record(update).instrument(span).await?
                    }
                    Err((id, raw)) => {
                        let read = Read::Quarantine {
                            chat: chat_in(&raw),
                            user: user_in(&raw),
                            reason: "a malformed update".into(),
                            external_id: Some(format!("update-{id}")),
                        };
                        self.record_read(id, read, &raw)
                            .instrument(update_span(id))
                            .await?
                    }
                }
            }
            anyhow::Ok(())
        }))
        .await;
        results.into_iter().collect()
    }

    /// Records one update in its chat's conversation.
    pub async fn record(&self, update: Update) -> anyhow::Result<()> {
        let id = update.id.0 as i64;
        let raw = match &update.kind {
            // What teloxide could not read, with its id put back.
            UpdateKind::Error(unread) => {
                let mut raw = unread.clone();
                if let Some(fields) = raw.as_object_mut() {
                    fields.insert("update_id".into(), id.into());
                }
                raw
            }
            _ => serde_json::to_value(&update).unwrap_or(Value::Null),
        };
        let read = match update.kind {
            UpdateKind::Message(message) => Read::Message(Box::new(message)),
            UpdateKind::Error(raw) => Read::Quarantine {
                chat: chat_in(&raw),
                user: user_in(&raw),
                reason: "an update Telegram's types do not describe".into(),
                external_id: Some(format!("update-{id}")),
            },
            other => {
                let kind = serde_json::to_value(&Update {
                    id: update.id,
                    kind: other.clone(),
                })
                .ok()
                .and_then(|v| {
                    v.as_object()
                        .and_then(|o| o.keys().find(|k| *k != "update_id").cloned())
                })
                .unwrap_or_else(|| "unknown".into());
                let probe = Update {
                    id: update.id,
                    kind: other,
                };
                Read::Quarantine {
                    chat: probe.chat().map(|chat| chat.id.0),
                    user: probe.from().map(|user| user.id.0),
                    reason: format!("updates of kind {kind} are not taken"),
                    external_id: Some(format!("update-{id}")),
                }
            }
        };
        self.record_read(id, read, &raw).await
    }

    async fn record_read(&self, update_id: i64, read: Read, raw: &Value) -> anyhow::Result<()> {
        let meta = |what: &str| {
            CommandMeta::new("telegram", "system").with_command_id(Uuid::new_v5(
                &UPDATE_NAMESPACE,
                format!("{}:{update_id}:{what}", self.bot_id).as_bytes(),
            ))
        };
        match read {
            Read::Quarantine {
                chat,
                user,
                reason,
                external_id,
            } => {
                let conversation = match chat {
                    Some(chat) => self.conversation_id(chat),
                    None => format!("telegram:{}:unknown", self.bot_id),
                };
                let subject = self
                    .subject_of_user(user, update_id, &meta("subject"))
                    .await?;
                let command = ConversationCommand::Quarantine {
                    raw: raw.to_string(),
                    subject: Some(subject),
                    reason,
                    external_id,
                };
                self.conversations
                    .execute(&conversation, command, meta("quarantine"))
                    .await?;
                Ok(())
            }
            Read::Message(message) => self.record_message(update_id, &message, raw, meta).await,
        }
    }

    async fn record_message(
        &self,
        update_id: i64,
        message: &Message,
        raw: &Value,
        meta: impl Fn(&str) -> CommandMeta,
    ) -> anyhow::Result<()> {
        let chat = message.chat.id.0;
        let conversation = self.conversation_id(chat);
        let sender = message.from.as_ref().filter(|user| !user.is_bot);
        let subject = self
            .subject_of_user(sender.map(|u| u.id.0), update_id, &meta("subject"))
            .await?;
        let open = ConversationCommand::Open {
            channel: Channel::TELEGRAM,
            external_id: conversation
                .rsplit(':')
                .next()
                .unwrap_or_default()
                .to_owned(),
            subject: None,
            address: Some(chat.to_string()),
            owner: message.chat.is_private().then(|| subject.clone()),
            participants: vec![Participant::agent(AGENT)],
        };
        for member in message.new_chat_members().unwrap_or_default() {
            if member.is_bot {
                continue;
            }
            let who = self
                .subject_of_user(Some(member.id.0), update_id, &meta("member"))
                .await?;
            let join = ConversationCommand::Join {
                participant: participant(&who, member),
            };
            let join_meta = meta(&format!("join:{}", member.id.0));
            match crate::conversation::opened(
                &self.conversations,
                &conversation,
                join,
                &open,
                join_meta,
                meta("open"),
            )
            .await
            {
                Ok(_) | Err(CommandError::Rejected(ConversationError::AlreadyJoined { .. })) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if message.new_chat_members().is_some() || message.left_chat_member().is_some() {
            return Ok(());
        }
        let Some(from) = sender else {
            return self
                .quarantine(
                    &conversation,
                    raw,
                    &subject,
                    "a message from no person",
                    message,
                    meta,
                )
                .await;
        };
        let text = message
            .text()
            .or_else(|| message.caption())
            .unwrap_or_default()
            .to_owned();
        let receive = ConversationCommand::ReceiveMessage {
            message_id: format!("tg-{}", message.id.0),
            external_id: message.id.0.to_string(),
            from: participant(&subject, from),
            text,
            attachments: self.fetch_files(message, &subject).await?,
            in_reply_to: message.reply_to_message().map(|m| m.id.0.to_string()),
            sent_at: Some(message.date),
            no_reply: None,
        };
        match crate::conversation::opened(
            &self.conversations,
            &conversation,
            receive,
            &open,
            meta("receive"),
            meta("open"),
        )
        .await
        {
            Ok(()) => Ok(()),
            // Refused for its content (empty, too long, no id): kept aside, never dropped.
            Err(CommandError::Rejected(refused)) => {
                let reason = refused.to_string();
                self.quarantine(&conversation, raw, &subject, &reason, message, meta)
                    .await
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A message's files, each fetched and kept sealed with the sender's key (its digest
    /// recorded), or recorded with why it was not: over Telegram's 20 MB limit for bots, refused
    /// by Telegram, or not to be kept for that person. A network or server failure fails the
    /// update, which is then read again.
    async fn fetch_files(
        &self,
        message: &Message,
        subject: &str,
    ) -> anyhow::Result<Vec<Attachment>> {
        let mut kept = Vec::new();
        for (mut attachment, file) in files_of(message) {
            let fetched = if attachment.size > MAX_DOWNLOAD {
                Fetched::TooBig
            } else {
                self.download(&file)
                    .await
                    .map_err(|e| anyhow::anyhow!("fetching a file from Telegram: {e}"))?
            };
            match fetched {
                Fetched::Bytes(bytes) => {
                    attachment.size = bytes.len() as u64;
                    let blobs = self.subjects.blobs();
                    match blobs.put(subject, &bytes, &attachment.content_type).await {
                        Ok(digest) => attachment.digest = Some(digest),
                        Err(PrivacyError::Malformed(why)) => attachment.not_kept = Some(why),
                        Err(e) => return Err(e.into()),
                    }
                }
                Fetched::TooBig => attachment.not_kept = Some(too_big()),
                Fetched::Refused(why) => {
                    attachment.not_kept = Some(format!("Telegram did not give it: {why}"))
                }
            }
            kept.push(attachment);
        }
        Ok(kept)
    }

    /// A file's bytes, read up to [`MAX_DOWNLOAD`].
    async fn download(&self, file: &FileMeta) -> Result<Fetched, RequestError> {
        let found = match self.bot.get_file(file.id.clone()).await {
            Ok(found) => found,
            Err(RequestError::Api(refused)) => return Ok(Fetched::Refused(refused.to_string())),
            Err(e) => return Err(e),
        };
        if u64::from(found.size) > MAX_DOWNLOAD {
            return Ok(Fetched::TooBig);
        }
        let mut chunks = self.bot.download_file_stream(&found.path);
        let mut bytes = Vec::with_capacity(found.size as usize);
        while let Some(chunk) = chunks.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(e) => match e.status().filter(|s| s.is_client_error()) {
                    Some(status) => {
                        return Ok(Fetched::Refused(format!("the download answered {status}")))
                    }
                    None => return Err(RequestError::Network(Arc::new(e))),
                },
            };
            bytes.extend_from_slice(&chunk);
            if bytes.len() as u64 > MAX_DOWNLOAD {
                return Ok(Fetched::TooBig);
            }
        }
        Ok(Fetched::Bytes(bytes))
    }

    async fn quarantine(
        &self,
        conversation: &str,
        raw: &Value,
        subject: &str,
        reason: &str,
        message: &Message,
        meta: impl Fn(&str) -> CommandMeta,
    ) -> anyhow::Result<()> {
        let command = ConversationCommand::Quarantine {
            raw: raw.to_string(),
            subject: Some(subject.to_owned()),
            reason: reason.to_owned(),
            external_id: Some(message.id.0.to_string()),
        };
        self.conversations
            .execute(conversation, command, meta("quarantine"))
            .await?;
        Ok(())
    }

    /// The subject a Telegram user is (a new one on first contact); for an update with no user,
    /// one made for that update, so its raw form is a person's data that can be erased.
    async fn subject_of_user(
        &self,
        user: Option<u64>,
        update_id: i64,
        meta: &CommandMeta,
    ) -> anyhow::Result<String> {
        let identifier = match user {
            Some(user) => format!("telegram:{user}"),
            None => format!("api:telegram-update-{}-{update_id}", self.bot_id),
        };
        let identifier = Identifier::parse(&identifier).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(self.subjects.resolve(&identifier, meta).await?)
    }
}

/// A person as a participant: their subject id, name and Telegram user id (as their address).
fn participant(subject: &str, user: &User) -> Participant {
    let name = match &user.last_name {
        Some(last) => format!("{} {last}", user.first_name),
        None => user.first_name.clone(),
    };
    Participant::subject(subject, subject, Some(name), Some(user.id.0.to_string()))
}

/// What is known of a message's files, each with the id to fetch it by.
fn files_of(message: &Message) -> Vec<(Attachment, FileMeta)> {
    let file = |name: String, content_type: Option<String>, default: &str, meta: &FileMeta| {
        let attachment = Attachment {
            name,
            content_type: content_type.unwrap_or_else(|| default.to_owned()),
            size: u64::from(meta.size),
            digest: None,
            not_kept: None,
        };
        (attachment, meta.clone())
    };
    let mut files = Vec::new();
    if let Some(d) = message.document() {
        let name = d.file_name.clone().unwrap_or_else(|| "document".into());
        let kind = mime_of(d.mime_type.as_ref());
        files.push(file(name, kind, "application/octet-stream", &d.file));
    }
    // The largest size of a photo.
    if let Some(p) = message.photo().and_then(|sizes| sizes.last()) {
        files.push(file("photo.jpg".into(), None, "image/jpeg", &p.file));
    }
    if let Some(v) = message.voice() {
        let kind = mime_of(v.mime_type.as_ref());
        files.push(file("voice.ogg".into(), kind, "audio/ogg", &v.file));
    }
    if let Some(a) = message.audio() {
        let name = a.file_name.clone().unwrap_or_else(|| "audio".into());
        let kind = mime_of(a.mime_type.as_ref());
        files.push(file(name, kind, "audio/mpeg", &a.file));
    }
    if let Some(v) = message.video() {
        let name = v.file_name.clone().unwrap_or_else(|| "video.mp4".into());
        let kind = mime_of(v.mime_type.as_ref());
        files.push(file(name, kind, "video/mp4", &v.file));
    }
    files
}

fn mime_of(mime: Option<&impl ToString>) -> Option<String> {
    mime.map(ToString::to_string)
}

/// A `getUpdates` answer teloxide could not read as a whole, read update by update: those that
/// read are recorded, the others quarantined with their raw form.
fn one_by_one(raw: &str) -> anyhow::Result<Vec<Incoming>> {
    let body: Value = serde_json::from_str(raw)
        .map_err(|e| anyhow::anyhow!("getUpdates answered something that is not JSON: {e}"))?;
    let Some(items) = body.get("result").and_then(Value::as_array) else {
        anyhow::bail!("getUpdates answered without a result list");
    };
    Ok(items
        .iter()
        .filter_map(|item| {
            let id = item.get("update_id").and_then(Value::as_i64)?;
            // From text: teloxide reads an update's kind by borrowing its key, which a `Value`
            // cannot lend.
            let read = serde_json::from_str::<Update>(&item.to_string());
            Some(read.map_err(|_| (id, item.clone())))
        })
        .collect())
}

fn chat_in(raw: &Value) -> Option<i64> {
    raw.as_object()?.values().find_map(|v| {
        v.get("chat")
            .and_then(|c| c.get("id"))
            .and_then(Value::as_i64)
    })
}

fn user_in(raw: &Value) -> Option<u64> {
    raw.as_object()?.values().find_map(|v| {
        v.get("from")
            .and_then(|c| c.get("id"))
            .and_then(Value::as_u64)
    })
}

/// The span an update is recorded in: the root of the trace of what it causes (the task, its
/// steps, the reply), or a child of the webhook's request.
fn update_span(update_id: i64) -> tracing::Span {
    tracing::info_span!(
        "telegram.update",
        otel.name = "telegram update",
        otel.kind = "consumer",
        telegram.update_id = update_id,
    )
}
