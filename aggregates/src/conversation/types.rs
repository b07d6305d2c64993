//! The conversation's vocabulary: its commands, events and errors, and the parts of its state
//! (members, messages and where each message is).

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

use super::Channel;
use crate::personal::Personal;

/// The longest message text accepted, in bytes of UTF-8: 64 KiB. Telegram's own limit is 4096
/// characters; an email body beyond this is almost always quoted history or a pasted log, which
/// belongs in an attachment.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;

/// How much of a quarantined message's raw form its event keeps, in bytes: 256 KiB. Enough to see
/// why it was malformed without letting one bad email bloat the log.
pub const MAX_QUARANTINE_RAW_BYTES: usize = 256 * 1024;

/// Whether a participant is a person or one of our agents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParticipantKind {
    /// Someone writing through the channel.
    Person,
    /// One of Stele's agents: the only kind that sends replies.
    Agent,
}

/// Someone taking part in a conversation.
///
/// A person's name, address and words are their personal data: they are recorded as
/// [`Personal`] values of `subject`, so erasing the person makes them unreadable. Their `id`
/// names them without saying who they are: the channel adapter uses their subject id (never an
/// address or a Telegram user id, which go in `address`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Participant {
    /// Stable id within the conversation (a person's subject id, an agent's name).
    pub id: String,
    /// Person or agent.
    pub kind: ParticipantKind,
    /// The person this is (their subject id); none for agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The name to show, if the channel gives one.
    pub display_name: Option<Personal<String>>,
    /// Where the channel reaches them: a Telegram chat id, an email address.
    pub address: Option<Personal<String>>,
}

impl Participant {
    /// A person with only an id.
    pub fn person(id: impl Into<String>) -> Participant {
        Participant {
            id: id.into(),
            kind: ParticipantKind::Person,
            subject: None,
            display_name: None,
            address: None,
        }
    }

    /// A person who is `subject`, with their name and address as the channel gives them.
    pub fn subject(
        id: impl Into<String>,
        subject: &str,
        display_name: Option<String>,
        address: Option<String>,
    ) -> Participant {
        Participant {
            subject: Some(subject.to_owned()),
            display_name: display_name.map(|name| Personal::of(subject, name)),
            address: address.map(|address| Personal::of(subject, address)),
            ..Participant::person(id)
        }
    }

    /// An agent with only an id.
    pub fn agent(id: impl Into<String>) -> Participant {
        Participant {
            id: id.into(),
            kind: ParticipantKind::Agent,
            subject: None,
            display_name: None,
            address: None,
        }
    }
}

/// Whether a message came in through the channel or goes out from us.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageDirection {
    /// Received from the channel.
    Inbound,
    /// A reply of ours, sent through the channel.
    Outbound,
}

/// What is known of an attached file. The bytes live elsewhere; the digest names them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The file name.
    pub name: String,
    /// The MIME type, for example `application/pdf`.
    pub content_type: String,
    /// Size in bytes.
    pub size: u64,
    /// A content digest such as `sha256:…`, when the adapter computed one.
    pub digest: Option<String>,
    /// Why the file's bytes were not kept (over a size limit, could not be fetched), when so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_kept: Option<String>,
}

/// Why a closed conversation was reopened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum ReopenCause {
    /// An inbound message arrived; it is recorded right after.
    InboundMessage {
        /// Our id of that message.
        message_id: String,
    },
    /// Someone asked for it (`Reopen`).
    Requested {
        /// Why.
        reason: String,
    },
}

/// Where a conversation is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConversationStatus {
    /// Not opened yet (no events, or only quarantined messages).
    #[default]
    New,
    /// Open: messages come and go.
    Open,
    /// Closed: no replies until it is reopened.
    Closed,
}

/// What can be asked of a conversation.
#[derive(Clone, Debug, PartialEq)]
pub enum ConversationCommand {
    /// Starts the conversation.
    Open {
        /// The channel it happens on.
        channel: Channel,
        /// The channel's id of the thread: a Telegram chat id, the root email's Message-ID.
        external_id: String,
        /// The email subject, if any: the personal data of `owner`.
        subject: Option<String>,
        /// Where the channel sends to, when `external_id` does not say (a Telegram chat id, kept
        /// out of the stream's name): the personal data of `owner`.
        address: Option<String>,
        /// The person the conversation is with (their subject id), when the channel knows.
        owner: Option<String>,
        /// Who takes part from the start (may be empty: senders join as they write).
        participants: Vec<Participant>,
    },
    /// Adds a participant, or brings back one who left (with their details as given now).
    Join {
        /// Who joins.
        participant: Participant,
    },
    /// Removes a present participant.
    Leave {
        /// Who leaves.
        participant_id: String,
        /// Why, if known.
        reason: Option<String>,
    },
    /// Records a message that came in through the channel.
    ReceiveMessage {
        /// Our id for the message.
        message_id: String,
        /// The channel's id of the message (Telegram message id, email Message-ID).
        external_id: String,
        /// The sender, in full: if they are not present, they join.
        from: Participant,
        /// The text (may be blank if there are attachments).
        text: String,
        /// Attached files.
        attachments: Vec<Attachment>,
        /// The channel's id of the message this answers, if any.
        in_reply_to: Option<String>,
        /// When the channel says it was sent.
        sent_at: Option<DateTime<Utc>>,
        /// Why no automatic answer may go to this message, if none may: it was itself sent by a
        /// machine (an auto-reply, a mailing list, a bounce), or the sender is us. It is recorded
        /// like any other message; only the channel's answering is held back.
        no_reply: Option<String>,
    },
    /// Records a reply for the channel adapter to deliver.
    QueueReply {
        /// Our id for the reply.
        message_id: String,
        /// The agent that replies (a present participant).
        from: String,
        /// The text (may be blank if there are attachments).
        text: String,
        /// Attached files.
        attachments: Vec<Attachment>,
        /// Our id of the message this answers, if any.
        in_reply_to: Option<String>,
        /// The task the reply belongs to, if any.
        task_id: Option<String>,
    },
    /// The channel accepted a reply.
    MarkDelivered {
        /// Our id of the reply.
        message_id: String,
        /// The channel's id it got.
        external_id: String,
    },
    /// An attempt to deliver a reply failed.
    MarkDeliveryFailed {
        /// Our id of the reply.
        message_id: String,
        /// What went wrong: the data of the person the reply answers (a server's answer can
        /// name them).
        error: String,
        /// Whether the adapter will try again.
        will_retry: bool,
    },
    /// A reply the channel accepted came back undeliverable (an email bounce). A second report
    /// for the same reply and recipient is a no-op.
    MarkBounced {
        /// Our id of the reply.
        message_id: String,
        /// The recipient it could not reach: the data of the person the reply answers.
        recipient: String,
        /// The delivery status code, for example `5.1.1`.
        status: String,
        /// What the receiving server said (it names the recipient): the data of the person
        /// the reply answers.
        diagnostic: String,
    },
    /// Records an inbound message that could not be understood. Never refused.
    Quarantine {
        /// The message as received (text, or bytes in base64).
        raw: String,
        /// Whose data the raw form is: the sender's subject (the channel adapter makes one for a
        /// sender it cannot tell, so the raw form can be erased with them).
        subject: Option<String>,
        /// Why it could not be understood.
        reason: String,
        /// The channel's id of the message, if it could be read.
        external_id: Option<String>,
    },
    /// Closes the conversation.
    Close {
        /// Why.
        reason: String,
    },
    /// Reopens a closed conversation, for a workflow that wants to follow up.
    Reopen {
        /// Why.
        reason: String,
    },
    /// The model the conversation's tasks try first for an agent role (`provider/model`), or
    /// (`None`) the role's own route again. Choosing what is chosen already is a no-op.
    ChooseModel {
        /// The agent role.
        role: String,
        /// The model, `provider/model`.
        model: Option<String>,
    },
    /// Records what the input sanitiser found in a received message (and did: flagged, filtered,
    /// cut or blocked it). Without findings it changes nothing.
    Screen {
        /// Our id of the message.
        message: String,
        findings: Vec<crate::screening::Finding>,
    },
}

/// What happened to a conversation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum ConversationEvent {
    /// The conversation started.
    ConversationOpened {
        /// The channel it happens on.
        channel: Channel,
        /// The channel's id of the thread.
        external_id: String,
        /// The email subject, if any (the conversation's person's data).
        subject: Option<Personal<String>>,
        /// Where the channel sends to, when `external_id` does not say (the person's data).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        address: Option<Personal<String>>,
        /// The person the conversation is with (their subject id).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
        /// Who took part from the start.
        participants: Vec<Participant>,
    },
    /// Someone joined (or came back).
    ParticipantJoined {
        /// Who, with their details.
        participant: Participant,
    },
    /// Someone left.
    ParticipantLeft {
        /// Who.
        participant_id: String,
        /// Why, if known.
        reason: Option<String>,
    },
    /// A message came in through the channel.
    MessageReceived {
        /// Our id for it.
        message_id: String,
        /// Its place in the conversation.
        seq: u64,
        /// The channel's id of it.
        external_id: String,
        /// The sender's participant id.
        from: String,
        /// The text: the sender's data.
        text: Personal<String>,
        /// Attached files: the sender's data.
        attachments: Personal<Vec<Attachment>>,
        /// Our id of the message it answers, when that one is in the conversation.
        in_reply_to: Option<String>,
        /// The channel's id of the message it answers, as the channel gave it.
        in_reply_to_external: Option<String>,
        /// When the channel says it was sent.
        sent_at: Option<DateTime<Utc>>,
        /// Why no automatic answer may go to it, if none may.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        no_reply: Option<String>,
    },
    /// A reply was recorded, for the channel adapter to deliver.
    ReplyQueued {
        /// Our id for it.
        message_id: String,
        /// Its place in the conversation.
        seq: u64,
        /// The agent's participant id.
        from: String,
        /// The text: the data of the person it answers.
        text: Personal<String>,
        /// Attached files: the data of the person it answers.
        attachments: Personal<Vec<Attachment>>,
        /// Our id of the message it answers.
        in_reply_to: Option<String>,
        /// The channel's id of that message, if it has one yet (for email's `In-Reply-To`).
        in_reply_to_external: Option<String>,
        /// The task it belongs to.
        task_id: Option<String>,
    },
    /// The channel accepted a reply.
    ReplyDelivered {
        /// Our id of the reply.
        message_id: String,
        /// The channel's id it got.
        external_id: String,
    },
    /// An attempt to deliver a reply failed.
    ReplyDeliveryFailed {
        /// Our id of the reply.
        message_id: String,
        /// What went wrong: the data of the person the reply answers (a server's answer can
        /// name them).
        error: Personal<String>,
        /// Whether the adapter will try again.
        will_retry: bool,
        /// Which failed attempt this is (1, 2, …).
        attempt: u32,
    },
    /// A delivered reply came back undeliverable.
    ReplyBounced {
        /// Our id of the reply.
        message_id: String,
        /// The recipient it could not reach: the data of the person the reply answers.
        recipient: Personal<String>,
        /// The delivery status code.
        status: String,
        /// What the receiving server said (it names the recipient): the data of the person
        /// the reply answers.
        diagnostic: Personal<String>,
    },
    /// An inbound message that could not be understood was kept aside.
    MessageQuarantined {
        /// The channel's id of it, if it could be read.
        external_id: Option<String>,
        /// Why it could not be understood.
        reason: String,
        /// Its raw form, cut to at most [`MAX_QUARANTINE_RAW_BYTES`] on a character boundary:
        /// the sender's data.
        raw: Personal<String>,
        /// The raw form's length before cutting, in bytes.
        raw_len: usize,
    },
    /// The conversation was closed.
    ConversationClosed {
        /// Why.
        reason: String,
    },
    /// A closed conversation was opened again.
    ConversationReopened {
        /// What reopened it.
        cause: ReopenCause,
    },
    /// A model was chosen for an agent role (or, `None`, the role's own route again).
    ModelChosen {
        /// The agent role.
        role: String,
        /// The model, `provider/model`.
        model: Option<String>,
    },
    /// The input sanitiser's findings in a received message (rules and places, not the text).
    MessageScreened {
        /// Our id of the message.
        message: String,
        findings: Vec<crate::screening::Finding>,
    },
}

impl DomainEvent for ConversationEvent {
    fn event_type(&self) -> String {
        match self {
            ConversationEvent::ConversationOpened { .. } => "ConversationOpened",
            ConversationEvent::ParticipantJoined { .. } => "ParticipantJoined",
            ConversationEvent::ParticipantLeft { .. } => "ParticipantLeft",
            ConversationEvent::MessageReceived { .. } => "MessageReceived",
            ConversationEvent::ReplyQueued { .. } => "ReplyQueued",
            ConversationEvent::ReplyDelivered { .. } => "ReplyDelivered",
            ConversationEvent::ReplyDeliveryFailed { .. } => "ReplyDeliveryFailed",
            ConversationEvent::ReplyBounced { .. } => "ReplyBounced",
            ConversationEvent::MessageQuarantined { .. } => "MessageQuarantined",
            ConversationEvent::ConversationClosed { .. } => "ConversationClosed",
            ConversationEvent::ConversationReopened { .. } => "ConversationReopened",
            ConversationEvent::ModelChosen { .. } => "ModelChosen",
            ConversationEvent::MessageScreened { .. } => "MessageScreened",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

/// Why a conversation command was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConversationError {
    /// `Open` on a conversation that was opened before (open or closed).
    #[error("the conversation was opened already")]
    AlreadyOpened,
    /// The conversation has not been opened.
    #[error("the conversation is not open yet")]
    NotOpened,
    /// The conversation is closed.
    #[error("the conversation is closed: it cannot {action}")]
    Closed {
        /// What was refused.
        action: &'static str,
    },
    /// `Reopen` on a conversation that is not closed.
    #[error("the conversation is not closed")]
    NotClosed,
    /// A required id is blank.
    #[error("{field} must not be blank")]
    MissingId {
        /// Which id.
        field: &'static str,
    },
    /// The participant is present already (or listed twice in `Open`).
    #[error("participant {participant_id:?} is in the conversation already")]
    AlreadyJoined {
        /// Who.
        participant_id: String,
    },
    /// The participant never joined.
    #[error("no participant {participant_id:?} in the conversation")]
    UnknownParticipant {
        /// Who.
        participant_id: String,
    },
    /// The participant joined, then left.
    #[error("participant {participant_id:?} has left the conversation")]
    ParticipantHasLeft {
        /// Who.
        participant_id: String,
    },
    /// A reply from a participant who is not an agent.
    #[error("participant {participant_id:?} is not an agent: only agents send replies")]
    NotAnAgent {
        /// Who.
        participant_id: String,
    },
    /// No message with that id.
    #[error("no message {message_id:?} in the conversation")]
    UnknownMessage {
        /// The id asked for.
        message_id: String,
    },
    /// Another message has that id already.
    #[error("message id {message_id:?} is taken already")]
    DuplicateMessageId {
        /// The id.
        message_id: String,
    },
    /// A delivery report for an inbound message.
    #[error("message {message_id:?} is inbound, not a reply")]
    NotAReply {
        /// The message.
        message_id: String,
    },
    /// The reply was delivered already (under another external id, for `MarkDelivered`).
    #[error("reply {message_id:?} was delivered already")]
    AlreadyDelivered {
        /// The reply.
        message_id: String,
    },
    /// Another message of the conversation has that external id.
    #[error("external id {external_id:?} belongs to another message")]
    ExternalIdInUse {
        /// The external id.
        external_id: String,
    },
    /// Blank text and no attachment.
    #[error("a message needs text or an attachment")]
    EmptyMessage,
    /// The text is longer than [`MAX_TEXT_BYTES`].
    #[error("the text is {len} bytes long, more than the {max} allowed")]
    TooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// A participant and whether they are still in the conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Who, with the details they last joined with.
    pub participant: Participant,
    /// False once they left (until they join again).
    pub present: bool,
}

/// Where a message is: received, or on its way out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Delivery {
    /// An inbound message.
    Received,
    /// A reply waiting for the channel adapter.
    Queued,
    /// A reply the channel accepted.
    Delivered,
    /// A reply whose last delivery attempt failed.
    Failed {
        /// What went wrong: the data of the person the reply answers (a server's answer can
        /// name them).
        error: String,
        /// Whether the adapter will try again.
        will_retry: bool,
    },
    /// A reply the channel accepted that came back undeliverable.
    Bounced {
        /// The delivery status code and what the receiving server said.
        reason: String,
    },
}

impl Message {
    /// Whether this is a reply the channel should (still) deliver: queued, or failed with a
    /// retry to come.
    pub fn awaits_delivery(&self) -> bool {
        self.direction == MessageDirection::Outbound
            && match &self.delivery {
                Delivery::Queued => true,
                Delivery::Failed { will_retry, .. } => *will_retry,
                Delivery::Received | Delivery::Delivered | Delivery::Bounced { .. } => false,
            }
    }
}

/// One message of the conversation, inbound or outbound.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Our id.
    pub message_id: String,
    /// Its place in the conversation (1, 2, …).
    pub seq: u64,
    /// Inbound or outbound.
    pub direction: MessageDirection,
    /// The sender's participant id.
    pub from: String,
    /// The channel's id: always set for inbound messages, set on delivery for replies.
    pub external_id: Option<String>,
    /// The text.
    pub text: String,
    /// Attached files.
    pub attachments: Vec<Attachment>,
    /// Our id of the message it answers, when that one is in the conversation.
    pub in_reply_to: Option<String>,
    /// The channel's id of the message it answers, when known.
    pub in_reply_to_external: Option<String>,
    /// When the channel says it was sent (inbound messages).
    pub sent_at: Option<DateTime<Utc>>,
    /// The task a reply belongs to.
    pub task_id: Option<String>,
    /// Received, queued, delivered or failed.
    pub delivery: Delivery,
    /// How many delivery attempts failed.
    pub failed_attempts: u32,
    /// Why no automatic answer may go to this (inbound) message, if none may.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_reply: Option<String>,
    /// What the input sanitiser did to this (inbound) message, when it found something: the
    /// conversation's history leaves out what it blocked or changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub screened: Option<crate::screening::ScreenAction>,
}
