//! A recorded message becomes work (`telegram.inbound`): the access list and the per-user limit
//! first, then a command answered in the conversation, or a task on the chat's workflow whose
//! replies come back here. Every answer is a queued reply (recorded, delivered by the outbox);
//! every id is derived from the message, so a repeated job does nothing twice.

use std::collections::BTreeMap;
use stele_aggregates::channel::Channel;

use stele_aggregates::conversation::{
    Conversation, ConversationCommand, ConversationError, MessageDirection,
};
use stele_aggregates::screening::ScreenAction;
use stele_aggregates::task::{Origin, Requester, TaskInput};
use stele_engine::queue::worker::{Done, HandlerError, HandlerResult};
use stele_engine::queue::{Job, JobState};
use stele_engine::{CommandError, CommandMeta};
use stele_privacy::SubjectsError;
use stele_workflows::runtime::RuntimeError;
use teloxide::prelude::Requester as _;
use teloxide::types::{ChatId, InputFile};
use uuid::Uuid;

use super::outbox::MessageJob;
use super::poller::AGENT;
use super::text::{command_of, help, Command};
use super::{Telegram, ACCESS_LIST};

/// Names the tasks messages start, so a repeated job starts none twice.
const TASK_NAMESPACE: Uuid = Uuid::from_u128(0x7a41_0e5c_93b8_4d2f_a6e1_58c4_0d9b_3f72);

/// How many earlier messages of the session go with a plain message to its workflow.
const HISTORY_MESSAGES: usize = 6;
/// At most this many characters of them.
const HISTORY_CHARS: usize = 2_000;
/// At most this many characters of a message's text files go with it to its workflow.
const FILE_TEXT_CHARS: usize = 8_000;

impl Telegram {
    pub(super) async fn on_inbound(&self, job: Job) -> HandlerResult {
        self.inbound(job)
            .await
            .map_err(|e| HandlerError::msg(format!("{e:#}")))
    }

    async fn inbound(&self, job: Job) -> anyhow::Result<Done> {
        let p: MessageJob = serde_json::from_value(job.payload.clone())?;
        let (conversation, _) = self.conversations.load_latest(&p.conversation).await?;
        let Some(message) = conversation.message(&p.message_id).cloned() else {
            return Ok(Done::Complete);
        };
        if message.direction != MessageDirection::Inbound {
            return Ok(Done::Complete);
        }
        let Some(chat) = Self::chat_of(&conversation) else {
            return Ok(Done::Complete);
        };
        let member = conversation.participants.get(&message.from).cloned();
        let subject = member
            .as_ref()
            .and_then(|m| m.participant.subject.clone())
            .unwrap_or_default();
        let user = member
            .as_ref()
            .and_then(|m| m.participant.address.as_ref())
            .and_then(|a| a.get().cloned())
            .unwrap_or_default();
        // Commands are recorded as the person's subject id, never their Telegram id (which is
        // theirs to erase, and event metadata is not sealed).
        let actor = if subject.is_empty() {
            "telegram"
        } else {
            subject.as_str()
        };
        let reply = |text: String| Answer {
            telegram: self,
            conversation: &p.conversation,
            message_id: &p.message_id,
            kind: "answer",
            text,
        };
        let access = self.access.load_latest(ACCESS_LIST).await?.0;
        let chat_id = chat.to_string();
        if !access.admits([user.as_str(), chat_id.as_str()], &self.configured) {
            reply(format!(
                "Sorry, this bot is private. Ask its operator to let you in (your id is {user})."
            ))
            .send()
            .await?;
            return Ok(Done::Complete);
        }
        if !self.users.admit(&user) {
            reply(format!(
                "You are writing faster than I can follow (at most {} messages a minute). \
                 Please wait a moment and send it again.",
                self.config.per_user_per_minute
            ))
            .send()
            .await?;
            return Ok(Done::Complete);
        }
        let not_kept: Vec<String> = message
            .attachments
            .iter()
            .filter_map(|a| Some(format!("{}: {}", a.name, a.not_kept.as_ref()?)))
            .collect();
        if !not_kept.is_empty() {
            let text = format!("I could not keep what you sent:\n{}", not_kept.join("\n"));
            Answer {
                kind: "files",
                ..reply(text)
            }
            .send()
            .await?;
        }
        let username = self.username.get().map(String::as_str);
        let requester = Requester {
            user_id: user.clone(),
            channel: Channel::TELEGRAM,
        };
        let origin = Origin {
            conversation: p.conversation.clone(),
            message: p.message_id.clone(),
        };
        let task_meta = CommandMeta::new("telegram", actor).with_command_id(Uuid::new_v5(
            &TASK_NAMESPACE,
            format!("{}:{}", p.conversation, p.message_id).as_bytes(),
        ));
        let answer = match command_of(&message.text, username) {
            None if message.text.trim().is_empty() && message.attachments.is_empty() => {
                "I can only read text for now: please write your message.".to_owned()
            }
            None if message.text.trim().is_empty() && not_kept.len() == message.attachments.len() => {
                return Ok(Done::Complete);
            }
            None => {
                // Typing while the answer is prepared (it shows for five seconds). Not waited
                // for: a cosmetic call to Telegram holds up nothing of the answer.
                let bot = self.bot.clone();
                tokio::spawn(async move {
                    let _ = bot
                        .send_chat_action(ChatId(chat), teloxide::types::ChatAction::Typing)
                        .await;
                });
                let text = format!("{}{}", message.text, self.files_text(&subject, &message).await);
                let Some(text) = self.screen(&p, actor, &text, None).await? else {
                    return Ok(Done::Complete);
                };
                let input = with_history(&conversation, &message, &text);
                let models = conversation.models.clone();
                return self
                    .start_task(input, requester, None, origin, models, task_meta)
                    .await;
            }
            Some(Command::NewTask(what)) if what.trim().is_empty() => {
                "Tell me what to do: /new_task followed by the task.".to_owned()
            }
            Some(Command::NewTask(what)) => {
                let pipeline = Some(self.config.pipeline.clone());
                let Some(what) = self.screen(&p, actor, &what, pipeline.as_deref()).await? else {
                    return Ok(Done::Complete);
                };
                let models = conversation.models.clone();
                return self
                    .start_task(what, requester, pipeline, origin, models, task_meta)
                    .await;
            }
            Some(Command::Start) => {
                let mut text = "Hello! I am Stele's assistant. Write to me and I answer; \
                                /help lists what else I can do."
                    .to_owned();
                if let Some(consent) = &self.config.consent_text {
                    text.push_str("\n\n");
                    text.push_str(consent);
                }
                text
            }
            Some(Command::Help) => help(),
            Some(Command::WhoAmI) => format!(
                "Telegram user id: {user}\nChat id: {chat}\nYour id here: {subject}\nConversation: {}",
                p.conversation
            ),
            Some(Command::Status) => self.status(&subject, &p.conversation).await?,
            Some(Command::Cancel) => self.cancel_latest(&subject, &p.conversation, actor).await?,
            Some(Command::Models(arguments)) => {
                self.models(&conversation, &p.conversation, &p.message_id, &arguments, actor)
                    .await?
            }
            Some(Command::Reset) => {
                reply("Done: we start afresh. What can I do for you?".into())
                    .send()
                    .await?;
                let close = ConversationCommand::Close {
                    reason: "/reset by the person".into(),
                };
                let meta = CommandMeta::new("telegram", actor)
                    .with_command_id(derived(&p.conversation, &p.message_id, "reset"));
                match self.conversations.execute(&p.conversation, close, meta).await {
                    Ok(_) | Err(CommandError::Rejected(ConversationError::Closed { .. })) => {}
                    Err(e) => return Err(e.into()),
                }
                return Ok(Done::Complete);
            }
            Some(Command::Export) => {
                self.export(chat, &subject, actor).await?;
                "Here is everything I hold about you (the file above).".to_owned()
            }
            Some(Command::Forget { confirmed: false }) => {
                "This erases everything I hold about you: our conversations, your tasks and what \
                 I remember. It cannot be undone. To go ahead, send: /forget yes"
                    .to_owned()
            }
            Some(Command::Forget { confirmed: true }) => {
                // Said before the erasure, and not through the outbox: once the person's key is
                // gone, a queued reply could no longer be read to be sent.
                self.throttle.ready(chat).await;
                self.bot
                    .send_message(ChatId(chat), "Erasing everything I hold about you. Goodbye.")
                    .await?;
                let meta = CommandMeta::new("telegram", actor)
                    .with_command_id(derived(&p.conversation, &p.message_id, "forget"));
                self.runtime
                    .erase_subject(&subject, actor, "asked for with /forget on Telegram", meta)
                    .await?;
                return Ok(Done::Complete);
            }
            Some(Command::Unknown(name)) => {
                format!("I do not know /{name}. /help lists what I understand.")
            }
        };
        reply(answer).send().await?;
        Ok(Done::Complete)
    }

    /// Screens a message's text with the input sanitiser, for `workflow` (the chat's when
    /// `None`): its findings are recorded on the conversation; blocked, the person is told why
    /// and `None` comes back; otherwise the text to act on (filtered or cut as the policy says).
    async fn screen(
        &self,
        p: &MessageJob,
        actor: &str,
        text: &str,
        workflow: Option<&str>,
    ) -> anyhow::Result<Option<String>> {
        let workflow = workflow.unwrap_or(&self.config.workflow);
        let (screened, screening) =
            self.runtime
                .sanitizer()
                .screen(text, Channel::TELEGRAM.as_str(), Some(workflow));
        if screening.findings.is_empty() {
            return Ok(Some(screened));
        }
        let record = ConversationCommand::Screen {
            message: p.message_id.clone(),
            findings: screening.findings.clone(),
        };
        let meta = CommandMeta::new("telegram", actor).with_command_id(derived(
            &p.conversation,
            &p.message_id,
            "screen",
        ));
        self.conversations
            .execute(&p.conversation, record, meta)
            .await?;
        if !screening.blocked() {
            return Ok(Some(screened));
        }
        Answer {
            telegram: self,
            conversation: &p.conversation,
            message_id: &p.message_id,
            kind: "blocked",
            text: format!(
                "I cannot act on this message: it looks like {}. If this is a mistake, please rephrase it.",
                screening.summary()
            ),
        }
        .send()
        .await?;
        Ok(None)
    }

    async fn start_task(
        &self,
        input: String,
        requester: Requester,
        workflow: Option<String>,
        origin: Origin,
        models: BTreeMap<String, String>,
        meta: CommandMeta,
    ) -> anyhow::Result<Done> {
        let reply = |text: String| Answer {
            telegram: self,
            conversation: &origin.conversation,
            message_id: &origin.message,
            kind: "answer",
            text,
        };
        let input = match TaskInput::parse(&input) {
            Ok(input) => input,
            Err(e) => {
                reply(format!("I cannot take this message: {e}."))
                    .send()
                    .await?;
                return Ok(Done::Complete);
            }
        };
        let workflow = workflow.or_else(|| Some(self.config.workflow.clone()));
        match self
            .runtime
            .create_task_from(
                input,
                requester,
                workflow,
                Some(origin.clone()),
                models,
                meta,
            )
            .await
        {
            Ok(_) => Ok(Done::Complete),
            Err(RuntimeError::Subject(SubjectsError::ConsentRequired { missing, .. })) => {
                let text = format!(
                    "Before I can help, I need your consent to: {}. {}",
                    missing.join(", "),
                    self.config
                        .consent_text
                        .clone()
                        .unwrap_or_else(|| "Please ask the operator how to give it.".into())
                );
                reply(text).send().await?;
                Ok(Done::Complete)
            }
            Err(RuntimeError::UnknownWorkflow { name, .. }) => {
                reply(format!(
                    "This bot is not set up for that (no workflow {name})."
                ))
                .send()
                .await?;
                Ok(Done::Complete)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The chat's tasks in progress, newest first, and how the node is.
    async fn in_flight(
        &self,
        subject: &str,
        conversation: &str,
    ) -> anyhow::Result<Vec<stele_workflows::runtime::TaskView>> {
        let mut tasks = Vec::new();
        for id in self.subjects.tasks_of(&[subject.to_owned()]).await? {
            let Ok(view) = self.runtime.task(&id).await else {
                continue;
            };
            let here = view
                .task
                .origin
                .as_ref()
                .is_some_and(|o| o.conversation == conversation);
            if here && !view.task.status.is_finished() {
                tasks.push(view);
            }
        }
        tasks.sort_by(|a, b| b.task_id.as_str().cmp(a.task_id.as_str()));
        Ok(tasks)
    }

    async fn status(&self, subject: &str, conversation: &str) -> anyhow::Result<String> {
        let tasks = self.in_flight(subject, conversation).await?;
        let mut text = if tasks.is_empty() {
            "No task of yours is in progress.".to_owned()
        } else {
            let mut text = format!("{} task(s) in progress:\n", tasks.len());
            for view in &tasks {
                let step = view
                    .run
                    .as_ref()
                    .and_then(|run| run.scheduled_steps().next().map(|(s, _)| s.to_owned()))
                    .unwrap_or_else(|| "starting".into());
                text.push_str(&format!(
                    "• {} ({}, {})\n",
                    view.task_id,
                    view.task.workflow.as_deref().unwrap_or("routing"),
                    step
                ));
            }
            text
        };
        let waiting = self
            .queue
            .depth()
            .await
            .map(|depth| {
                depth
                    .iter()
                    .filter(|(_, state, _)| *state == JobState::Available)
                    .map(|(_, _, n)| *n)
                    .sum::<i64>()
            })
            .unwrap_or(-1);
        text.push_str(&format!("\nSystem: up; {waiting} job(s) waiting."));
        Ok(text)
    }

    async fn cancel_latest(
        &self,
        subject: &str,
        conversation: &str,
        actor: &str,
    ) -> anyhow::Result<String> {
        let tasks = self.in_flight(subject, conversation).await?;
        let Some(latest) = tasks.first() else {
            return Ok("You have no task in progress to cancel.".into());
        };
        let meta = CommandMeta::new("telegram", actor);
        match self
            .runtime
            .cancel_task(
                latest.task_id.as_str(),
                "cancelled with /cancel".into(),
                meta,
            )
            .await
        {
            Ok(()) => Ok(format!("Cancelled task {}.", latest.task_id)),
            Err(RuntimeError::Task(e)) => Ok(format!(
                "Task {} could not be cancelled: {e}.",
                latest.task_id
            )),
            Err(e) => Err(e.into()),
        }
    }

    /// `/models`: the roles this chat may use with their models (the chosen one marked); with
    /// `ROLE MODEL`, that model first for the role in this chat's tasks from now on (recorded);
    /// with `ROLE default`, the role's own order again.
    async fn models(
        &self,
        conversation: &Conversation,
        conversation_id: &str,
        message_id: &str,
        arguments: &str,
        actor: &str,
    ) -> anyhow::Result<String> {
        if self.roles.is_empty() {
            return Ok("No assistant is configured.".into());
        }
        let words: Vec<&str> = arguments.split_whitespace().collect();
        let (role, model) = match words[..] {
            [] => {
                let mut text = String::from("The assistants you can use, and their models:\n");
                for role in &self.roles {
                    let chosen = conversation.models.get(&role.role);
                    let models: Vec<String> = role
                        .models
                        .iter()
                        .map(|m| match chosen {
                            Some(c) if c == m => format!("{m} (chosen)"),
                            _ => m.clone(),
                        })
                        .collect();
                    text.push_str(&format!(
                        "• {} — {} ({})\n",
                        role.role,
                        role.description,
                        models.join(" → ")
                    ));
                }
                text.push_str("\nTo switch: /models ROLE MODEL (back with /models ROLE default).");
                return Ok(text);
            }
            [role, model] => (role, model),
            _ => {
                return Ok("Write /models ROLE MODEL, for example /models vox local/small.".into())
            }
        };
        let Some(known) = self.roles.iter().find(|r| r.role == role) else {
            let names: Vec<&str> = self.roles.iter().map(|r| r.role.as_str()).collect();
            return Ok(format!(
                "There is no assistant {role}. The assistants: {}.",
                names.join(", ")
            ));
        };
        let model = if model.eq_ignore_ascii_case("default") {
            None
        } else if known.models.iter().any(|m| m == model) {
            Some(model.to_owned())
        } else {
            return Ok(format!(
                "{role} cannot use {model}. Its models: {}.",
                known.models.join(", ")
            ));
        };
        let answer = match &model {
            Some(model) => format!("From now on {role} answers you with {model} first."),
            None => format!(
                "{role} is back to its own models ({}).",
                known.models.join(" → ")
            ),
        };
        let choose = ConversationCommand::ChooseModel {
            role: role.to_owned(),
            model,
        };
        let meta = CommandMeta::new("telegram", actor).with_command_id(derived(
            conversation_id,
            message_id,
            "models",
        ));
        self.conversations
            .execute(conversation_id, choose, meta)
            .await?;
        Ok(answer)
    }

    /// What the task learns of a message's files: each one's name, type and size, and the
    /// content of text files (at most [`FILE_TEXT_CHARS`] characters in all).
    async fn files_text(
        &self,
        subject: &str,
        message: &stele_aggregates::conversation::Message,
    ) -> String {
        let mut text = String::new();
        let mut budget = FILE_TEXT_CHARS;
        for file in &message.attachments {
            text.push_str(&format!(
                "\n\nAttached: {} ({}, {} bytes)",
                file.name, file.content_type, file.size
            ));
            let readable =
                file.content_type.starts_with("text/") || file.content_type == "application/json";
            let Some(digest) = file.digest.as_deref().filter(|_| readable && budget > 0) else {
                continue;
            };
            match self.subjects.blobs().get(subject, digest).await {
                Ok(Some((_, bytes))) => {
                    let content: String = String::from_utf8_lossy(&bytes)
                        .chars()
                        .take(budget)
                        .collect();
                    budget -= content.chars().count();
                    text.push_str(":\n");
                    text.push_str(&content);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "an attached file could not be read"),
            }
        }
        text
    }

    /// Sends the person their export bundle as a JSON document.
    async fn export(&self, chat: i64, subject: &str, actor: &str) -> anyhow::Result<()> {
        let head = self.log.head().await?;
        let meta = CommandMeta::new("telegram", actor);
        let bundle = self
            .subjects
            .export(self.log.as_ref(), subject, head, actor, meta)
            .await?;
        let bytes = serde_json::to_vec_pretty(&bundle)?;
        self.throttle.ready(chat).await;
        self.bot
            .send_document(
                ChatId(chat),
                InputFile::memory(bytes).file_name("stele-export.json"),
            )
            .await?;
        Ok(())
    }
}

/// A plain message with the session's last few messages before it, so the workflow sees what
/// was said (the memory adds what bears on it from further back).
fn with_history(
    conversation: &stele_aggregates::conversation::Conversation,
    message: &stele_aggregates::conversation::Message,
    text: &str,
) -> String {
    let earlier: Vec<String> = conversation
        .messages
        .iter()
        .filter(|m| m.seq < message.seq && m.seq > conversation.session_start)
        // What the sanitiser blocked or changed does not come back through the history.
        .filter(|m| m.screened.is_none_or(|action| action == ScreenAction::Flag))
        .rev()
        .take(HISTORY_MESSAGES)
        .map(|m| {
            let who = match m.direction {
                MessageDirection::Inbound => "Person",
                MessageDirection::Outbound => "Assistant",
            };
            format!("{who}: {}", m.text)
        })
        .collect();
    if earlier.is_empty() {
        return text.to_owned();
    }
    let mut history: Vec<String> = Vec::new();
    let mut size = 0;
    for line in earlier {
        size += line.chars().count();
        if size > HISTORY_CHARS {
            break;
        }
        history.push(line);
    }
    history.reverse();
    if history.is_empty() {
        return text.to_owned();
    }
    format!(
        "Earlier in this conversation:\n{}\n\nMessage: {}",
        history.join("\n"),
        text
    )
}

fn derived(conversation: &str, message: &str, what: &str) -> Uuid {
    Uuid::new_v5(
        &TASK_NAMESPACE,
        format!("{conversation}:{message}:{what}").as_bytes(),
    )
}

/// An answer to one inbound message, queued as a reply with an id derived from it and its kind
/// (one of each kind per message).
struct Answer<'a> {
    telegram: &'a Telegram,
    conversation: &'a str,
    message_id: &'a str,
    kind: &'static str,
    text: String,
}

impl Answer<'_> {
    async fn send(self) -> anyhow::Result<()> {
        let command = ConversationCommand::QueueReply {
            message_id: format!("{}-{}", self.message_id, self.kind),
            from: AGENT.to_owned(),
            text: self.text,
            attachments: Vec::new(),
            in_reply_to: Some(self.message_id.to_owned()),
            task_id: None,
        };
        let meta = CommandMeta::new("telegram", "system").with_command_id(derived(
            self.conversation,
            self.message_id,
            self.kind,
        ));
        match self
            .telegram
            .conversations
            .execute(self.conversation, command, meta)
            .await
        {
            Ok(_) | Err(CommandError::Rejected(ConversationError::DuplicateMessageId { .. })) => {
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }
}
