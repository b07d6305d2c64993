//! Live progress of a task asked for in a chat (`telegram.progress`): the typing action while it
//! runs and, for tasks on the pipeline (`/new_task`), one status message edited as its steps
//! finish — at most one edit per chat every two seconds, unchanged text skipped — so that the
//! edits never trip Telegram's flood limits and the answer (a reply of its own) still goes out.
//!
//! The status message is recorded in the conversation (`status-<task>`, delivered with
//! Telegram's id), so a job that runs again after a crash edits it instead of sending another.

use std::time::{Duration, Instant};

use serde::Deserialize;
use stele_aggregates::conversation::{ConversationCommand, ConversationError};
use stele_aggregates::task::TaskStatus;
use stele_aggregates::workflow_run::StepStatus;
use stele_engine::queue::worker::{Done, HandlerError, HandlerResult};
use stele_engine::queue::Job;
use stele_engine::{CommandError, CommandMeta};
use stele_workflows::runtime::TaskView;
use teloxide::payloads::SendMessageSetters;
use teloxide::prelude::Requester;
use teloxide::types::{ChatAction, ChatId, MessageId, ReplyParameters};
use teloxide::{ApiError, RequestError};

use super::poller::AGENT;
use super::Telegram;

/// The typing action lasts five seconds on clients: renewed a little before.
const TYPING_EVERY: Duration = Duration::from_secs(4);

#[derive(Debug, Deserialize)]
pub(super) struct ProgressJob {
    pub(super) conversation: String,
    pub(super) task_id: String,
    /// Whether the task gets a status message (else only the typing action).
    pub(super) status: bool,
}

/// The status message of a task: its workflow, each step entered so far, and where it is.
pub fn status_text(view: &TaskView) -> String {
    let workflow = view.task.workflow.as_deref().unwrap_or("routing");
    let short: String = view.task_id.as_str().chars().take(8).collect();
    let head = match view.task.status {
        TaskStatus::Completed => "✅ Done",
        TaskStatus::Failed => "❌ Failed",
        TaskStatus::Cancelled => "✖️ Cancelled",
        _ => "⏳ Working",
    };
    let mut text = format!("{head} — task {short} ({workflow})");
    if let Some(run) = &view.run {
        let mut seen = std::collections::BTreeSet::new();
        for step in &run.path {
            if !seen.insert(step.clone()) {
                continue;
            }
            let Some(state) = run.steps.get(step) else {
                continue;
            };
            let mark = match state.status {
                StepStatus::Completed => "✓",
                StepStatus::Failed => "✗",
                StepStatus::Skipped => "–",
                _ => "▸",
            };
            let attempt = if state.attempt > 1 && state.status == StepStatus::Scheduled {
                format!(" (attempt {})", state.attempt)
            } else {
                String::new()
            };
            text.push_str(&format!("\n{mark} {step}{attempt}"));
        }
    }
    text
}

impl Telegram {
    pub(super) async fn on_progress(&self, job: Job) -> HandlerResult {
        self.progress_of(job)
            .await
            .map_err(|e| HandlerError::msg(format!("{e:#}")))
    }

    async fn progress_of(&self, job: Job) -> anyhow::Result<Done> {
        let p: ProgressJob = serde_json::from_value(job.payload.clone())?;
        let status_id = format!("status-{}", p.task_id);
        let (conversation, _) = self.conversations.load_latest(&p.conversation).await?;
        let Some(chat) = Self::chat_of(&conversation) else {
            return Ok(Done::Complete);
        };
        let mut shown = conversation.message(&status_id).and_then(|m| {
            Some((
                m.external_id.as_deref()?.parse::<i32>().ok()?,
                m.text.clone(),
            ))
        });
        let mut appends = self.log.appends();
        let mut typed: Option<Instant> = None;
        loop {
            let view = self.runtime.task(&p.task_id).await?;
            let finished = view.task.status.is_finished();
            if p.status {
                let text = status_text(&view);
                match &shown {
                    None => {
                        if let Some(id) =
                            self.send_status(chat, &p, &status_id, &view, &text).await?
                        {
                            shown = Some((id, text));
                        }
                    }
                    Some((id, last)) if *last != text => {
                        let id = *id;
                        self.throttle.edit_ready(chat).await;
                        let edit = self
                            .bot
                            .edit_message_text(ChatId(chat), MessageId(id), &text)
                            .await;
                        self.throttle.edited(chat);
                        match edit {
                            Ok(_) | Err(RequestError::Api(ApiError::MessageNotModified)) => {
                                shown = Some((id, text));
                            }
                            Err(RequestError::RetryAfter(wait)) => {
                                self.throttle.freeze(chat, wait.duration());
                            }
                            // Deleted by the person, or the chat is gone: no more progress.
                            Err(RequestError::Api(_)) => return Ok(Done::Complete),
                            Err(e) => return Err(e.into()),
                        }
                    }
                    Some(_) => {}
                }
            }
            if finished {
                return Ok(Done::Complete);
            }
            if typed.is_none_or(|at| at.elapsed() >= TYPING_EVERY) {
                typed = Some(Instant::now());
                if let Err(e) = self
                    .bot
                    .send_chat_action(ChatId(chat), ChatAction::Typing)
                    .await
                {
                    tracing::debug!(conversation = %p.conversation, error = %e, "the typing action failed");
                }
            }
            // Woken by the log's appends (a step finished), at most once a second.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = tokio::time::timeout(Duration::from_secs(1), appends.changed()).await;
        }
    }

    /// Sends the status message and records it; its Telegram id, or `None` when the
    /// conversation takes no more replies (closed since).
    async fn send_status(
        &self,
        chat: i64,
        p: &ProgressJob,
        status_id: &str,
        view: &TaskView,
        text: &str,
    ) -> anyhow::Result<Option<i32>> {
        self.throttle.ready(chat).await;
        let mut request = self.bot.send_message(ChatId(chat), text);
        let origin = view.task.origin.as_ref();
        let (conversation, _) = self.conversations.load_latest(&p.conversation).await?;
        let asked = origin.and_then(|o| conversation.message(&o.message));
        if let Some(answered) = asked
            .and_then(|m| m.external_id.as_deref())
            .and_then(|id| id.parse().ok())
        {
            request = request.reply_parameters(
                ReplyParameters::new(MessageId(answered)).allow_sending_without_reply(),
            );
        }
        let sent = match request.await {
            Ok(sent) => sent,
            Err(RequestError::RetryAfter(wait)) => {
                self.throttle.freeze(chat, wait.duration());
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let meta = || CommandMeta::new("telegram", "system");
        let queue = ConversationCommand::QueueReply {
            message_id: status_id.to_owned(),
            from: AGENT.to_owned(),
            text: text.to_owned(),
            attachments: Vec::new(),
            in_reply_to: asked.map(|m| m.message_id.clone()),
            task_id: Some(p.task_id.clone()),
        };
        match self
            .conversations
            .execute(&p.conversation, queue, meta())
            .await
        {
            Ok(_) => {}
            Err(CommandError::Rejected(ConversationError::Closed { .. })) => {
                return Ok(Some(sent.id.0))
            }
            Err(e) => return Err(e.into()),
        }
        let delivered = ConversationCommand::MarkDelivered {
            message_id: status_id.to_owned(),
            external_id: sent.id.0.to_string(),
        };
        self.conversations
            .execute(&p.conversation, delivered, meta())
            .await?;
        Ok(Some(sent.id.0))
    }
}
