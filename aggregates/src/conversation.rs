//! `Conversation`: one chat or email thread. Who takes part (people and agents), and every message
//! received or sent, each recorded as an event with its place in the thread (`seq`). Channel
//! adapters (Telegram, email in and out) and the workflows that reply drive it.
//!
//! ```text
//!          Open                             Close
//!   new ─────────► open ───────────────────────────────────► closed
//!    │             │  ▲                                         │
//!    │             │  └─── Reopen, or ReceiveMessage ───────────┤
//!    │             │       (ConversationReopened, then message) │
//!    │             │                                            │
//!    │             └ stays open: Join, Leave, ReceiveMessage,   └ stays closed: MarkDelivered,
//!    │               QueueReply, MarkDelivered,                   MarkDeliveryFailed, and a
//!    │               MarkDeliveryFailed                           redelivered message (no-op)
//!    │
//!    └── Quarantine, in every state (new, open, closed): changes no status
//! ```
//!
//! An outbound reply has its own small life:
//!
//! ```text
//!   QueueReply ──► queued ──MarkDelivered──► delivered
//!                    │                           ▲
//!  MarkDeliveryFailed│                           │ MarkDelivered
//!                    ▼                           │
//!                  failed ───────────────────────┘
//!                   │  ▲
//!                   └──┘ MarkDeliveryFailed again (attempt + 1)
//! ```
//!
//! The rules, and why:
//!
//! - **Redelivery is a no-op.** Channels deliver at least once, so an inbound message whose external
//!   id was seen before (received, or given to one of our delivered replies, as when an email comes
//!   back to us on CC) yields no event and no error. This is checked first: a redelivery never
//!   reopens a closed conversation.
//! - **An unknown sender joins.** On email anyone copied can answer, and Telegram groups gain
//!   members; refusing their message would lose it. `ReceiveMessage` carries the sender's
//!   [`Participant`], and a sender who is not present (never joined, or left) gets a
//!   `ParticipantJoined` before the message.
//! - **Closed refuses what we start, not what comes in.** A closed conversation refuses `Join`,
//!   `Leave`, `QueueReply` and `Close`. An inbound message reopens it (`ConversationReopened`, then
//!   the message), because the other side spoke again; a workflow that wants to follow up sends
//!   `Reopen`. Delivery reports keep working when closed: a reply queued before closing is already
//!   on its way.
//! - **Order is explicit.** Every message, inbound or outbound, takes the next `seq` (1, 2, 3…) when
//!   it is recorded, and the event carries it.
//! - **Only agents reply.** An outbound message comes from a present participant of kind
//!   [`ParticipantKind::Agent`]: the channel adapter sends it as the bot or mailbox.
//! - **Quarantine is never refused.** A malformed inbound message is recorded in every state, even
//!   before the conversation is opened. Its raw form is kept up to [`MAX_QUARANTINE_RAW_BYTES`]
//!   (`raw_len` keeps the original size). It takes no `seq` (it is not part of the thread) and does
//!   not mark its external id as seen, so a later, well-formed delivery of it is recorded; a second
//!   quarantine of the same external id is a no-op. An adapter quarantines any inbound message this
//!   aggregate refuses for its content (`EmptyMessage`, `TooLong`, `MissingId`): nothing is dropped.
//! - **Text** may not be blank unless the message has attachments, nor longer than
//!   [`MAX_TEXT_BYTES`].
//!
//! The commands, events, errors and the parts of the state are in `types.rs`; the state itself,
//! with `handle` (every check, then the events) and `apply`, in `aggregate.rs`.

mod aggregate;
mod types;

#[cfg(test)]
mod tests;

pub use crate::channel::{Channel, InvalidChannel};
pub use aggregate::Conversation;
pub use types::{
    Attachment, ConversationCommand, ConversationError, ConversationEvent, ConversationStatus,
    Delivery, Member, Message, MessageDirection, Participant, ParticipantKind, ReopenCause,
    MAX_QUARANTINE_RAW_BYTES, MAX_TEXT_BYTES,
};
