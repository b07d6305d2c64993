//! The conversation's state and its decisions: `handle` runs every check of a command before
//! it writes an event, and `apply` folds the events.

use std::collections::{BTreeMap, BTreeSet};

use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};

use super::types::*;
use super::Channel;
use crate::personal::Personal;

/// The conversation's state, folded from its events.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    /// New, open or closed.
    pub status: ConversationStatus,
    /// The channel, once opened.
    pub channel: Option<Channel>,
    /// The channel's id of the thread, once opened.
    pub external_id: Option<String>,
    /// The email subject, if any (`[erased]` once its person is).
    pub subject: Option<String>,
    /// Where the channel sends to, when the external id does not say (`[erased]` once its
    /// person is).
    #[serde(default)]
    pub address: Option<String>,
    /// The person the conversation is with.
    pub owner: Option<String>,
    /// Everyone who ever joined, by participant id (including those who left).
    pub participants: BTreeMap<String, Member>,
    /// The messages, in `seq` order.
    pub messages: Vec<Message>,
    /// External ids of received messages and delivered replies: a message with one of these is a
    /// redelivery.
    pub seen_external_ids: BTreeSet<String>,
    /// External ids of quarantined messages.
    pub quarantined_external_ids: BTreeSet<String>,
    /// How many messages were quarantined.
    pub quarantined: u64,
    /// The `seq` of the last message (0 before the first).
    pub last_seq: u64,
    /// Why it was closed, while it is closed.
    pub close_reason: Option<String>,
    /// The `seq` of the last message before the current session: messages after it were said
    /// since the conversation was last closed (0 in its first session).
    #[serde(default)]
    pub session_start: u64,
    /// The models chosen for its tasks, by agent role (`provider/model`).
    #[serde(default)]
    pub models: BTreeMap<String, String>,
}

impl Conversation {
    /// The message with our id `message_id`.
    ///
    /// A scan, not an index: a conversation holds hundreds of messages, and its whole stream is
    /// replayed to handle a command anyway, so an index would cost snapshot size for nothing.
    pub fn message(&self, message_id: &str) -> Option<&Message> {
        self.messages.iter().find(|m| m.message_id == message_id)
    }

    /// The message the channel knows as `external_id`.
    pub fn message_by_external_id(&self, external_id: &str) -> Option<&Message> {
        self.messages
            .iter()
            .find(|m| m.external_id.as_deref() == Some(external_id))
    }

    /// Whether `participant_id` is in the conversation now.
    pub fn is_present(&self, participant_id: &str) -> bool {
        self.participants
            .get(participant_id)
            .is_some_and(|member| member.present)
    }

    fn message_mut(&mut self, message_id: &str) -> Option<&mut Message> {
        self.messages
            .iter_mut()
            .find(|m| m.message_id == message_id)
    }

    /// Refuses unless open; `action` names what a closed conversation refuses.
    fn require_open(&self, action: &'static str) -> Result<(), ConversationError> {
        match self.status {
            ConversationStatus::New => Err(ConversationError::NotOpened),
            ConversationStatus::Closed => Err(ConversationError::Closed { action }),
            ConversationStatus::Open => Ok(()),
        }
    }

    /// Refuses only a conversation never opened (closed ones still take delivery reports).
    fn require_opened(&self) -> Result<(), ConversationError> {
        match self.status {
            ConversationStatus::New => Err(ConversationError::NotOpened),
            _ => Ok(()),
        }
    }

    /// The message `reply` answers, if it is in this conversation.
    fn answered_by(&self, reply: &Message) -> Option<&Message> {
        reply
            .in_reply_to
            .as_deref()
            .and_then(|id| self.messages.iter().find(|m| m.message_id == id))
    }

    fn require_present(&self, participant_id: &str) -> Result<&Member, ConversationError> {
        match self.participants.get(participant_id) {
            None => Err(ConversationError::UnknownParticipant {
                participant_id: participant_id.to_owned(),
            }),
            Some(member) if !member.present => Err(ConversationError::ParticipantHasLeft {
                participant_id: participant_id.to_owned(),
            }),
            Some(member) => Ok(member),
        }
    }

    fn require_new_message_id(&self, message_id: &str) -> Result<(), ConversationError> {
        match self.message(message_id) {
            Some(_) => Err(ConversationError::DuplicateMessageId {
                message_id: message_id.to_owned(),
            }),
            None => Ok(()),
        }
    }

    /// Whose data a reply is: the sender of the message it answers, else the conversation's
    /// person, else its first person present.
    fn reader_of(&self, in_reply_to: Option<&Message>) -> Option<String> {
        let subject_of = |participant_id: &str| {
            self.participants
                .get(participant_id)
                .and_then(|member| member.participant.subject.clone())
        };
        in_reply_to
            .and_then(|message| subject_of(&message.from))
            .or_else(|| self.owner.clone())
            .or_else(|| {
                self.participants
                    .values()
                    .filter(|m| m.present && m.participant.kind == ParticipantKind::Person)
                    .find_map(|m| m.participant.subject.clone())
            })
    }

    /// An outbound message, refused if inbound or missing.
    fn reply(&self, message_id: &str) -> Result<&Message, ConversationError> {
        let message =
            self.message(message_id)
                .ok_or_else(|| ConversationError::UnknownMessage {
                    message_id: message_id.to_owned(),
                })?;
        match message.direction {
            MessageDirection::Inbound => Err(ConversationError::NotAReply {
                message_id: message_id.to_owned(),
            }),
            MessageDirection::Outbound => Ok(message),
        }
    }

    /// Decides the events for `command`, all checks first: the events are written (and applied)
    /// only once the whole command is accepted, so a refusal leaves no trace.
    fn decide(
        &self,
        command: ConversationCommand,
    ) -> Result<Vec<ConversationEvent>, ConversationError> {
        use ConversationCommand as C;
        use ConversationEvent as E;
        let event = match command {
            C::Open {
                channel,
                external_id,
                subject,
                address,
                owner,
                participants,
            } => {
                if self.status != ConversationStatus::New {
                    return Err(ConversationError::AlreadyOpened);
                }
                require_id("external_id", &external_id)?;
                let mut ids = BTreeSet::new();
                for participant in &participants {
                    require_id("participant id", &participant.id)?;
                    if !ids.insert(participant.id.as_str()) {
                        return Err(ConversationError::AlreadyJoined {
                            participant_id: participant.id.clone(),
                        });
                    }
                }
                E::ConversationOpened {
                    channel,
                    external_id,
                    subject: subject.map(|text| Personal::owned_by(owner.as_deref(), text)),
                    address: address.map(|text| Personal::owned_by(owner.as_deref(), text)),
                    owner,
                    participants,
                }
            }
            C::Join { participant } => {
                require_id("participant id", &participant.id)?;
                self.require_open("add a participant")?;
                if self.is_present(&participant.id) {
                    return Err(ConversationError::AlreadyJoined {
                        participant_id: participant.id,
                    });
                }
                E::ParticipantJoined { participant }
            }
            C::Leave {
                participant_id,
                reason,
            } => {
                self.require_open("remove a participant")?;
                self.require_present(&participant_id)?;
                E::ParticipantLeft {
                    participant_id,
                    reason,
                }
            }
            C::ReceiveMessage {
                message_id,
                external_id,
                from,
                text,
                attachments,
                in_reply_to,
                sent_at,
                no_reply,
            } => {
                require_id("message_id", &message_id)?;
                require_id("external_id", &external_id)?;
                require_id("participant id", &from.id)?;
                if self.seen_external_ids.contains(&external_id) {
                    return Ok(Vec::new());
                }
                self.require_opened()?;
                self.require_new_message_id(&message_id)?;
                check_content(&text, &attachments)?;
                let mut events = Vec::with_capacity(3);
                if self.status == ConversationStatus::Closed {
                    events.push(E::ConversationReopened {
                        cause: ReopenCause::InboundMessage {
                            message_id: message_id.clone(),
                        },
                    });
                }
                let from_id = from.id.clone();
                let sender = from.subject.clone();
                if !self.is_present(&from.id) {
                    events.push(E::ParticipantJoined { participant: from });
                }
                let parent = in_reply_to
                    .as_deref()
                    .and_then(|external| self.message_by_external_id(external));
                events.push(E::MessageReceived {
                    message_id,
                    seq: self.last_seq + 1,
                    external_id,
                    from: from_id,
                    text: Personal::owned_by(sender.as_deref(), text),
                    attachments: Personal::owned_by(sender.as_deref(), attachments),
                    in_reply_to: parent.map(|m| m.message_id.clone()),
                    in_reply_to_external: in_reply_to,
                    sent_at,
                    no_reply,
                });
                return Ok(events);
            }
            C::QueueReply {
                message_id,
                from,
                text,
                attachments,
                in_reply_to,
                task_id,
            } => {
                require_id("message_id", &message_id)?;
                self.require_open("queue a reply")?;
                self.require_new_message_id(&message_id)?;
                if self.require_present(&from)?.participant.kind != ParticipantKind::Agent {
                    return Err(ConversationError::NotAnAgent {
                        participant_id: from,
                    });
                }
                check_content(&text, &attachments)?;
                let parent = match &in_reply_to {
                    None => None,
                    Some(parent_id) => Some(self.message(parent_id).ok_or_else(|| {
                        ConversationError::UnknownMessage {
                            message_id: parent_id.clone(),
                        }
                    })?),
                };
                let reader = self.reader_of(parent);
                E::ReplyQueued {
                    message_id,
                    seq: self.last_seq + 1,
                    from,
                    text: Personal::owned_by(reader.as_deref(), text),
                    attachments: Personal::owned_by(reader.as_deref(), attachments),
                    in_reply_to_external: parent.and_then(|m| m.external_id.clone()),
                    in_reply_to,
                    task_id,
                }
            }
            C::MarkDelivered {
                message_id,
                external_id,
            } => {
                require_id("message_id", &message_id)?;
                require_id("external_id", &external_id)?;
                self.require_opened()?;
                let reply = self.reply(&message_id)?;
                if reply.delivery == Delivery::Delivered {
                    // The adapter may report twice (it crashed after sending): the same answer
                    // again is no news.
                    if reply.external_id.as_deref() == Some(external_id.as_str()) {
                        return Ok(Vec::new());
                    }
                    return Err(ConversationError::AlreadyDelivered { message_id });
                }
                if self.seen_external_ids.contains(&external_id) {
                    return Err(ConversationError::ExternalIdInUse { external_id });
                }
                E::ReplyDelivered {
                    message_id,
                    external_id,
                }
            }
            C::MarkDeliveryFailed {
                message_id,
                error,
                will_retry,
            } => {
                require_id("message_id", &message_id)?;
                self.require_opened()?;
                let reply = self.reply(&message_id)?;
                if reply.delivery == Delivery::Delivered {
                    return Err(ConversationError::AlreadyDelivered { message_id });
                }
                // A server's error can name the recipient ("550 <bob@…>: no such user"): it is
                // the data of the person the reply answers.
                let reader = self.reader_of(self.answered_by(reply));
                E::ReplyDeliveryFailed {
                    attempt: reply.failed_attempts + 1,
                    message_id,
                    error: Personal::owned_by(reader.as_deref(), error),
                    will_retry,
                }
            }
            C::MarkBounced {
                message_id,
                recipient,
                status,
                diagnostic,
            } => {
                require_id("message_id", &message_id)?;
                self.require_opened()?;
                let reply = self.reply(&message_id)?;
                if matches!(reply.delivery, Delivery::Bounced { .. }) {
                    return Ok(Vec::new());
                }
                // The address, and the diagnostic that names it, are the data of the person the
                // reply answers.
                let reader = self.reader_of(self.answered_by(reply));
                E::ReplyBounced {
                    message_id,
                    recipient: Personal::owned_by(reader.as_deref(), recipient),
                    status,
                    diagnostic: Personal::owned_by(reader.as_deref(), diagnostic),
                }
            }
            C::Quarantine {
                raw,
                subject,
                reason,
                external_id,
            } => {
                let external_id = external_id.filter(|id| !id.trim().is_empty());
                if let Some(id) = &external_id {
                    if self.quarantined_external_ids.contains(id) {
                        return Ok(Vec::new());
                    }
                }
                let raw_len = raw.len();
                E::MessageQuarantined {
                    external_id,
                    reason,
                    raw: Personal::owned_by(subject.as_deref(), cut(raw, MAX_QUARANTINE_RAW_BYTES)),
                    raw_len,
                }
            }
            C::Close { reason } => {
                self.require_open("close")?;
                E::ConversationClosed { reason }
            }
            C::Reopen { reason } => match self.status {
                ConversationStatus::New => return Err(ConversationError::NotOpened),
                ConversationStatus::Open => return Err(ConversationError::NotClosed),
                ConversationStatus::Closed => E::ConversationReopened {
                    cause: ReopenCause::Requested { reason },
                },
            },
            C::ChooseModel { role, model } => {
                require_id("role", &role)?;
                self.require_opened()?;
                let model = model.filter(|m| !m.trim().is_empty());
                if self.models.get(&role) == model.as_ref() {
                    return Ok(Vec::new());
                }
                E::ModelChosen { role, model }
            }
            C::Screen { message, findings } => {
                self.require_opened()?;
                require_id("message", &message)?;
                if findings.is_empty() {
                    return Ok(Vec::new());
                }
                E::MessageScreened { message, findings }
            }
        };
        Ok(vec![event])
    }
}

fn require_id(field: &'static str, value: &str) -> Result<(), ConversationError> {
    if value.trim().is_empty() {
        Err(ConversationError::MissingId { field })
    } else {
        Ok(())
    }
}

fn check_content(text: &str, attachments: &[Attachment]) -> Result<(), ConversationError> {
    if text.len() > MAX_TEXT_BYTES {
        return Err(ConversationError::TooLong {
            len: text.len(),
            max: MAX_TEXT_BYTES,
        });
    }
    if text.trim().is_empty() && attachments.is_empty() {
        return Err(ConversationError::EmptyMessage);
    }
    Ok(())
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let end = text.floor_char_boundary(max);
        text.truncate(end);
    }
    text
}

impl Aggregate for Conversation {
    const TYPE: &'static str = "conversation";
    type Command = ConversationCommand;
    type Event = ConversationEvent;
    type Error = ConversationError;
    type Services = ();

    async fn handle(
        &mut self,
        command: ConversationCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), ConversationError> {
        for event in self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: ConversationEvent) {
        match event {
            ConversationEvent::ConversationOpened {
                channel,
                external_id,
                subject,
                address,
                owner,
                participants,
            } => {
                self.status = ConversationStatus::Open;
                self.channel = Some(channel);
                self.external_id = Some(external_id);
                self.subject = subject.map(|s| s.text().to_owned());
                self.address = address.map(|a| a.text().to_owned());
                self.owner = owner;
                self.participants = participants
                    .into_iter()
                    .map(|participant| {
                        let member = Member {
                            participant,
                            present: true,
                        };
                        (member.participant.id.clone(), member)
                    })
                    .collect();
            }
            ConversationEvent::ParticipantJoined { participant } => {
                let member = Member {
                    participant,
                    present: true,
                };
                self.participants
                    .insert(member.participant.id.clone(), member);
            }
            ConversationEvent::ParticipantLeft { participant_id, .. } => {
                if let Some(member) = self.participants.get_mut(&participant_id) {
                    member.present = false;
                }
            }
            ConversationEvent::MessageReceived {
                message_id,
                seq,
                external_id,
                from,
                text,
                attachments,
                in_reply_to,
                in_reply_to_external,
                sent_at,
                no_reply,
            } => {
                self.last_seq = seq;
                self.seen_external_ids.insert(external_id.clone());
                self.messages.push(Message {
                    message_id,
                    seq,
                    direction: MessageDirection::Inbound,
                    from,
                    external_id: Some(external_id),
                    text: text.text().to_owned(),
                    attachments: attachments.value_or_default(),
                    in_reply_to,
                    in_reply_to_external,
                    sent_at,
                    task_id: None,
                    delivery: Delivery::Received,
                    failed_attempts: 0,
                    no_reply,
                    screened: None,
                });
            }
            ConversationEvent::ReplyQueued {
                message_id,
                seq,
                from,
                text,
                attachments,
                in_reply_to,
                in_reply_to_external,
                task_id,
            } => {
                self.last_seq = seq;
                self.messages.push(Message {
                    message_id,
                    seq,
                    direction: MessageDirection::Outbound,
                    from,
                    external_id: None,
                    text: text.text().to_owned(),
                    attachments: attachments.value_or_default(),
                    in_reply_to,
                    in_reply_to_external,
                    sent_at: None,
                    task_id,
                    delivery: Delivery::Queued,
                    failed_attempts: 0,
                    no_reply: None,
                    screened: None,
                });
            }
            ConversationEvent::ReplyDelivered {
                message_id,
                external_id,
            } => {
                self.seen_external_ids.insert(external_id.clone());
                if let Some(message) = self.message_mut(&message_id) {
                    message.external_id = Some(external_id);
                    message.delivery = Delivery::Delivered;
                }
            }
            ConversationEvent::ReplyDeliveryFailed {
                message_id,
                error,
                will_retry,
                attempt,
            } => {
                if let Some(message) = self.message_mut(&message_id) {
                    message.failed_attempts = attempt;
                    message.delivery = Delivery::Failed {
                        error: error.text().to_owned(),
                        will_retry,
                    };
                }
            }
            ConversationEvent::ReplyBounced {
                message_id,
                status,
                diagnostic,
                ..
            } => {
                if let Some(message) = self.message_mut(&message_id) {
                    message.delivery = Delivery::Bounced {
                        reason: format!("{status} {}", diagnostic.text()).trim().to_owned(),
                    };
                }
            }
            ConversationEvent::MessageQuarantined { external_id, .. } => {
                self.quarantined += 1;
                if let Some(external_id) = external_id {
                    self.quarantined_external_ids.insert(external_id);
                }
            }
            ConversationEvent::ConversationClosed { reason } => {
                self.status = ConversationStatus::Closed;
                self.close_reason = Some(reason);
                self.session_start = self.last_seq;
            }
            ConversationEvent::ConversationReopened { .. } => {
                self.status = ConversationStatus::Open;
                self.close_reason = None;
            }
            ConversationEvent::MessageScreened { message, findings } => {
                let action = findings.iter().map(|f| f.action).max();
                if let Some(message) = self.message_mut(&message) {
                    message.screened = action;
                }
            }
            ConversationEvent::ModelChosen { role, model } => match model {
                Some(model) => {
                    self.models.insert(role, model);
                }
                None => {
                    self.models.remove(&role);
                }
            },
        }
    }
}
