//! Recorded mail becomes work: the `email.inbound` job starts a task on the mailbox's workflow
//! with the thread's recent history, once per mail, within the per-sender cap on automatic
//! answers.

use stele_aggregates::conversation::Channel;
use stele_aggregates::conversation::{
    Conversation, ConversationCommand, ConversationError, Message, MessageDirection,
};
use stele_aggregates::screening::ScreenAction;
use stele_aggregates::task::{Origin, Requester, TaskInput};
use stele_engine::queue::worker::{Done, HandlerError, HandlerResult};
use stele_engine::queue::Job;
use stele_engine::{CommandError, CommandMeta};
use stele_privacy::SubjectsError;
use stele_workflows::runtime::RuntimeError;
use uuid::Uuid;

use super::send::MessageJob;
use super::Email;

/// Names the task a mail starts, so a repeated job starts none twice.
const TASK_NAMESPACE: Uuid = Uuid::from_u128(0x7f1e_22c4_9a0b_4d6e_8c5a_3b1f_0e2d_4c6a);

/// Messages of the thread given to the workflow before the new one, at most.
const HISTORY_MESSAGES: usize = 6;
/// And characters of them, at most.
const HISTORY_CHARS: usize = 6_000;

impl Email {
    pub(super) async fn on_inbound(&self, job: Job) -> HandlerResult {
        self.inbound(job)
            .await
            .map_err(|e| HandlerError::msg(format!("{e:#}")))
    }

    async fn inbound(&self, job: Job) -> anyhow::Result<Done> {
        let p: MessageJob = serde_json::from_value(job.payload.clone())?;
        let Some((mailbox, _)) = self.mailbox_of(&p.conversation) else {
            return Ok(Done::Complete);
        };
        let (conversation, _) = self.conversations.load(&p.conversation).await?;
        let Some(message) = conversation.message(&p.message_id).cloned() else {
            return Ok(Done::Complete);
        };
        if message.direction != MessageDirection::Inbound || message.no_reply.is_some() {
            return Ok(Done::Complete);
        }
        let member = conversation.participants.get(&message.from).cloned();
        let subject = member
            .as_ref()
            .and_then(|m| m.participant.subject.clone())
            .unwrap_or_default();
        // Loops with autoresponders that set none of the usual headers end here.
        let per_hour = mailbox.config.replies_per_sender_per_hour;
        let name = &mailbox.config.name;
        if !super::quota::admit(&self.pool, name, &subject, &p.message_id, per_hour).await? {
            tracing::warn!(
                mailbox = %mailbox.config.name,
                conversation = %p.conversation,
                "a sender reached the cap on automatic answers: this mail is recorded, not answered"
            );
            return Ok(Done::Complete);
        }
        // The sender's address, as the task's requester (sealed with them in the task): it
        // leads to the same subject the mail was recorded under.
        let address = member
            .as_ref()
            .and_then(|m| m.participant.address.as_ref())
            .and_then(|a| a.get().cloned());
        let Some(address) = address else {
            tracing::info!(conversation = %p.conversation, "a mail without a readable sender is recorded, not answered");
            return Ok(Done::Complete);
        };
        let requester = Requester {
            user_id: address,
            channel: Channel::EMAIL,
        };
        let origin = Origin {
            conversation: p.conversation.clone(),
            message: p.message_id.clone(),
        };
        let meta = CommandMeta::new("email", &subject).with_command_id(Uuid::new_v5(
            &TASK_NAMESPACE,
            format!("{}:{}", p.conversation, p.message_id).as_bytes(),
        ));
        // The mail alone is screened (its history was, when it came).
        let (text, screening) = self.runtime.sanitizer().screen(
            &message.text,
            Channel::EMAIL.as_str(),
            Some(&mailbox.config.workflow),
        );
        if !screening.findings.is_empty() {
            let record = ConversationCommand::Screen {
                message: p.message_id.clone(),
                findings: screening.findings.clone(),
            };
            let command_id = Uuid::new_v5(
                &TASK_NAMESPACE,
                format!("{}:{}:screen", p.conversation, p.message_id).as_bytes(),
            );
            let screen_meta = CommandMeta::new("email", &subject).with_command_id(command_id);
            self.conversations
                .execute(&p.conversation, record, screen_meta)
                .await?;
        }
        if screening.blocked() {
            // Answered once, in the thread, through the outbox like any reply.
            let answer = ConversationCommand::QueueReply {
                message_id: format!("{}-blocked", p.message_id),
                from: super::AGENT.to_owned(),
                text: format!(
                    "Your message was not acted on: it looks like {}. If this is a mistake, please rephrase it.",
                    screening.summary()
                ),
                attachments: Vec::new(),
                in_reply_to: Some(p.message_id.clone()),
                task_id: None,
            };
            let command_id = Uuid::new_v5(
                &TASK_NAMESPACE,
                format!("{}:{}:blocked", p.conversation, p.message_id).as_bytes(),
            );
            let answer_meta = CommandMeta::new("email", "system").with_command_id(command_id);
            match self
                .conversations
                .execute(&p.conversation, answer, answer_meta)
                .await
            {
                Ok(_)
                | Err(CommandError::Rejected(ConversationError::DuplicateMessageId { .. })) => {}
                Err(e) => return Err(e.into()),
            }
            tracing::info!(conversation = %p.conversation, "a mail was blocked by the input sanitiser");
            return Ok(Done::Complete);
        }
        let input = match TaskInput::parse(with_history(&conversation, &message, &text)) {
            Ok(input) => input,
            Err(e) => {
                tracing::info!(conversation = %p.conversation, error = %e, "a mail cannot become a task");
                return Ok(Done::Complete);
            }
        };
        let workflow = Some(mailbox.config.workflow.clone());
        match self
            .runtime
            .create_task_from(
                input,
                requester,
                workflow,
                Some(origin),
                Default::default(),
                meta,
            )
            .await
        {
            Ok(_) => Ok(Done::Complete),
            // Without consent nothing is done with their mail; it stays recorded.
            Err(RuntimeError::Subject(SubjectsError::ConsentRequired { .. })) => {
                tracing::info!(conversation = %p.conversation, "no consent: a mail is recorded, not answered");
                Ok(Done::Complete)
            }
            Err(RuntimeError::UnknownWorkflow { name, .. }) => {
                tracing::warn!(mailbox = %mailbox.config.name, workflow = %name, "the mailbox's workflow does not exist");
                Ok(Done::Complete)
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// A mail with the thread's last few messages before it, so the workflow sees what was said.
fn with_history(conversation: &Conversation, message: &Message, text: &str) -> String {
    let mut history: Vec<String> = Vec::new();
    let mut size = 0;
    for earlier in conversation
        .messages
        .iter()
        .filter(|m| m.seq < message.seq && m.seq > conversation.session_start)
        .filter(|m| m.no_reply.is_none())
        // What the sanitiser blocked or changed does not come back through the history.
        .filter(|m| m.screened.is_none_or(|action| action == ScreenAction::Flag))
        .rev()
        .take(HISTORY_MESSAGES)
    {
        let who = match earlier.direction {
            MessageDirection::Inbound => "Person",
            MessageDirection::Outbound => "Assistant",
        };
        let line = format!("{who}: {}", earlier.text);
        size += line.chars().count();
        if size > HISTORY_CHARS {
            break;
        }
        history.push(line);
    }
    history.reverse();
    let subject = conversation
        .subject
        .as_deref()
        .filter(|s| !s.trim().is_empty())
        .map(|s| format!("Subject: {s}\n\n"))
        .unwrap_or_default();
    if history.is_empty() {
        return format!("{subject}{text}");
    }
    format!(
        "{subject}Earlier in this thread:\n{}\n\nMessage: {}",
        history.join("\n"),
        text
    )
}
