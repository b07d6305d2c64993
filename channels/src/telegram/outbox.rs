//! Replies out: the `telegram.send` job delivers one queued reply (split at Telegram's length
//! limit), through a throttle that keeps to Telegram's flood limits, and records the outcome.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Deserialize;
use stele_aggregates::conversation::{ConversationCommand, ConversationError};
use stele_engine::queue::worker::{Done, HandlerError, HandlerResult};
use stele_engine::queue::{completing, Job};
use stele_engine::{CommandError, CommandMeta};
use teloxide::payloads::SendMessageSetters;
use teloxide::prelude::Requester;
use teloxide::types::{ChatId, MessageId, ReplyParameters};
use teloxide::{ApiError, RequestError};

use super::Telegram;

/// Telegram's longest message, in UTF-16 code units (as Telegram counts).
pub const MAX_MESSAGE_LEN: usize = 4096;

/// A job's payload: which message of which conversation.
#[derive(Debug, Deserialize)]
pub(super) struct MessageJob {
    pub(super) conversation: String,
    pub(super) message_id: String,
}

/// Splits `text` into messages of at most `max` UTF-16 code units, cutting at the last paragraph
/// break that fits, else the last sentence end, else the last space, else anywhere (on a
/// character boundary). Blank parts are dropped.
pub fn split(text: &str, max: usize) -> Vec<String> {
    let mut parts = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        if rest.encode_utf16().count() <= max {
            parts.push(rest.to_owned());
            break;
        }
        // The longest prefix that fits, on a character boundary.
        let mut units = 0;
        let mut fits = 0;
        for (at, c) in rest.char_indices() {
            units += c.len_utf16();
            if units > max {
                break;
            }
            fits = at + c.len_utf8();
        }
        let window = &rest[..fits];
        // A cut in the first half would leave many short messages: look for one beyond it.
        let half = fits / 2;
        let boundary = |candidates: &[&str]| {
            candidates
                .iter()
                .filter_map(|sep| window.rfind(sep).map(|at| at + sep.len()))
                .filter(|&at| at > half)
                .max()
        };
        let cut = boundary(&["\n\n"])
            .or_else(|| boundary(&[". ", "! ", "? ", ".\n", "!\n", "?\n", "\n"]))
            .or_else(|| boundary(&[" ", "\t"]))
            .unwrap_or(fits);
        let part = rest[..cut].trim();
        if !part.is_empty() {
            parts.push(part.to_owned());
        }
        rest = rest[cut..].trim_start();
    }
    parts
}

/// Telegram's flood limits, kept by every sender of this process: about one message per second
/// per chat, twenty per minute per group, thirty per second for the bot; and a chat Telegram
/// answered 429 for stays frozen for its `retry_after`.
pub struct Throttle {
    on: bool,
    bot: DefaultDirectRateLimiter,
    chats: DefaultKeyedRateLimiter<i64>,
    groups: DefaultKeyedRateLimiter<i64>,
    /// When each chat's next edit may start: two seconds after the last one started and after it
    /// was answered, so that a slow request cannot bring two edits closer at Telegram's end.
    edits: Mutex<HashMap<i64, Instant>>,
    frozen: Mutex<HashMap<i64, Instant>>,
}

/// At most one edit per chat this often.
const EDIT_EVERY: Duration = Duration::from_secs(2);

fn per_second(n: u32) -> Quota {
    Quota::per_second(NonZeroU32::new(n.max(1)).expect("at least one"))
}

impl Throttle {
    /// Telegram's published limits.
    pub fn telegram() -> Throttle {
        Throttle {
            on: true,
            bot: RateLimiter::direct(per_second(30)),
            chats: RateLimiter::keyed(per_second(1)),
            groups: RateLimiter::keyed(Quota::per_minute(NonZeroU32::new(20).expect("20"))),
            edits: Mutex::new(HashMap::new()),
            frozen: Mutex::new(HashMap::new()),
        }
    }

    /// No limits but Telegram's 429s (against a local fake).
    pub fn off() -> Throttle {
        Throttle {
            on: false,
            ..Throttle::telegram()
        }
    }

    /// Waits until a message to `chat` may go (group chats have negative ids).
    pub async fn ready(&self, chat: i64) {
        self.unfrozen(chat).await;
        if !self.on {
            return;
        }
        if chat < 0 {
            self.groups.until_key_ready(&chat).await;
        }
        self.chats.until_key_ready(&chat).await;
        self.bot.until_ready().await;
    }

    /// Waits until a message of `chat` may be edited: at most one edit every two seconds.
    pub async fn edit_ready(&self, chat: i64) {
        self.unfrozen(chat).await;
        if !self.on {
            return;
        }
        loop {
            let wait = {
                let mut edits = self.edits.lock().expect("not poisoned");
                let now = Instant::now();
                match edits.get(&chat) {
                    Some(&next) if next > now => next,
                    _ => {
                        edits.retain(|_, next| *next > now);
                        edits.insert(chat, now + EDIT_EVERY);
                        break;
                    }
                }
            };
            tokio::time::sleep_until(wait.into()).await;
        }
        self.chats.until_key_ready(&chat).await;
        self.bot.until_ready().await;
    }

    /// An edit of `chat` was answered: the next waits two seconds from now.
    pub fn edited(&self, chat: i64) {
        if self.on {
            let next = Instant::now() + EDIT_EVERY;
            let mut edits = self.edits.lock().expect("not poisoned");
            let at = edits.entry(chat).or_insert(next);
            *at = (*at).max(next);
        }
    }

    async fn unfrozen(&self, chat: i64) {
        loop {
            let until = self
                .frozen
                .lock()
                .expect("not poisoned")
                .get(&chat)
                .copied();
            match until {
                Some(until) if until > Instant::now() => {
                    tokio::time::sleep_until(until.into()).await
                }
                _ => break,
            }
        }
    }

    /// Telegram asked to wait `retry_after` before writing to `chat` again.
    pub fn freeze(&self, chat: i64, retry_after: Duration) {
        let until = Instant::now() + retry_after;
        let mut frozen = self.frozen.lock().expect("not poisoned");
        frozen.retain(|_, at| *at > Instant::now());
        frozen.insert(chat, until);
    }
}

/// Messages a person may send per minute.
pub(super) struct UserLimit {
    limiter: Option<DefaultKeyedRateLimiter<String>>,
}

impl UserLimit {
    pub(super) fn new(per_minute: u32) -> UserLimit {
        UserLimit {
            limiter: NonZeroU32::new(per_minute).map(|n| RateLimiter::keyed(Quota::per_minute(n))),
        }
    }

    /// Whether `user` may send one more message now.
    pub(super) fn admit(&self, user: &str) -> bool {
        self.limiter
            .as_ref()
            .is_none_or(|limiter| limiter.check_key(&user.to_owned()).is_ok())
    }
}

/// Errors after which sending again cannot help: the person blocked the bot, left, or the chat
/// is gone.
fn is_final(error: &RequestError) -> bool {
    matches!(
        error,
        RequestError::Api(
            ApiError::BotBlocked
                | ApiError::ChatNotFound
                | ApiError::UserDeactivated
                | ApiError::BotKicked
                | ApiError::BotKickedFromSupergroup
                | ApiError::CantInitiateConversation
                | ApiError::CantTalkWithBots
                | ApiError::MessageTextIsEmpty
        )
    )
}

impl Telegram {
    /// Delivers a queued reply, unless it was delivered already (a repeated job) or failed for
    /// good. A 429 freezes the chat and snoozes the job for `retry_after` (the attempt does not
    /// count, so the answer still goes out); other errors are recorded and retried.
    pub(super) async fn on_send(&self, job: Job) -> HandlerResult {
        let p: MessageJob = serde_json::from_value(job.payload.clone())?;
        let (conversation, _) = self.conversations.load_latest(&p.conversation).await?;
        let Some(message) = conversation.message(&p.message_id) else {
            return Ok(Done::Complete);
        };
        if !message.awaits_delivery() {
            return Ok(Done::Complete);
        }
        let chat = Self::chat_of(&conversation)
            .ok_or_else(|| HandlerError::msg(format!("{} is no chat", p.conversation)))?;
        let parts = split(&message.text, MAX_MESSAGE_LEN);
        let meta = || CommandMeta::new("telegram", "system");
        let (done, mut first) = self
            .progress
            .lock()
            .expect("not poisoned")
            .get(&p.message_id)
            .copied()
            .unwrap_or((0, None));
        for (index, part) in parts.iter().enumerate().skip(done) {
            self.throttle.ready(chat).await;
            let mut request = self.bot.send_message(ChatId(chat), part);
            if index == 0 {
                if let Some(answered) = message
                    .in_reply_to_external
                    .as_deref()
                    .and_then(|id| id.parse().ok())
                {
                    request = request.reply_parameters(
                        ReplyParameters::new(MessageId(answered)).allow_sending_without_reply(),
                    );
                }
            }
            match request.await {
                Ok(sent) => {
                    first.get_or_insert(sent.id.0);
                    self.progress
                        .lock()
                        .expect("not poisoned")
                        .insert(p.message_id.clone(), (index + 1, first));
                }
                Err(RequestError::RetryAfter(wait)) => {
                    tracing::info!(conversation = %p.conversation, retry_after = wait.seconds(), "Telegram asked to wait");
                    self.throttle.freeze(chat, wait.duration());
                    return Ok(Done::Snooze(wait.duration()));
                }
                Err(error) => {
                    let will_retry = !is_final(&error);
                    let failed = ConversationCommand::MarkDeliveryFailed {
                        message_id: p.message_id.clone(),
                        error: error.to_string(),
                        will_retry,
                    };
                    self.conversations
                        .execute(&p.conversation, failed, meta())
                        .await?;
                    if will_retry {
                        return Err(error.into());
                    }
                    self.progress
                        .lock()
                        .expect("not poisoned")
                        .remove(&p.message_id);
                    return Ok(Done::Complete);
                }
            }
        }
        let delivered = ConversationCommand::MarkDelivered {
            message_id: p.message_id.clone(),
            external_id: first.map(|id| id.to_string()).unwrap_or_default(),
        };
        // The delivery's record is the job's last effect: its append completes the job.
        match completing(
            self.conversations
                .execute(&p.conversation, delivered, meta()),
        )
        .await
        {
            Ok(_) | Err(CommandError::Rejected(ConversationError::AlreadyDelivered { .. })) => {}
            Err(e) => return Err(e.into()),
        }
        self.progress
            .lock()
            .expect("not poisoned")
            .remove(&p.message_id);
        Ok(Done::Complete)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_one_message() {
        assert_eq!(split("  hello  ", 4096), vec!["hello"]);
        assert!(split("   ", 4096).is_empty());
    }

    #[test]
    fn long_text_is_cut_at_paragraphs_then_sentences_then_spaces() {
        let paragraph = "word ".repeat(30);
        let text = format!("{paragraph}\n\n{paragraph}");
        let parts = split(&text, 200);
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.encode_utf16().count() <= 200));

        let sentences = "This is one sentence. ".repeat(20);
        let parts = split(&sentences, 100);
        assert!(parts.iter().all(|p| p.ends_with('.')), "{parts:?}");
        assert!(parts.iter().all(|p| p.encode_utf16().count() <= 100));
        assert_eq!(parts.join(" "), sentences.trim());
    }

    #[test]
    fn no_boundary_still_cuts_on_characters_counting_utf16() {
        let text = "😀".repeat(3000); // 2 UTF-16 units each
        let parts = split(&text, 4096);
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].encode_utf16().count(), 4096);
        assert_eq!(parts.concat(), text);
    }
}
