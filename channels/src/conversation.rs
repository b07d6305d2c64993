//! What every channel does with a conversation.

use stele_aggregates::conversation::{Conversation, ConversationCommand, ConversationError};
use stele_engine::{CommandBus, CommandError, CommandMeta};

/// Runs `command` on the conversation, opening it first (with `open`) when it is not yet:
/// trying the command first spares every later message a second load of the whole stream.
pub(crate) async fn opened(
    bus: &CommandBus<Conversation>,
    conversation: &str,
    command: ConversationCommand,
    open: &ConversationCommand,
    meta: CommandMeta,
    open_meta: CommandMeta,
) -> Result<(), CommandError<ConversationError>> {
    match bus
        .execute(conversation, command.clone(), meta.clone())
        .await
    {
        Err(CommandError::Rejected(ConversationError::NotOpened)) => {}
        other => return other.map(|_| ()),
    }
    match bus.execute(conversation, open.clone(), open_meta).await {
        Ok(_) | Err(CommandError::Rejected(ConversationError::AlreadyOpened)) => {}
        Err(e) => return Err(e),
    }
    // The refused attempt recorded nothing: its command id is free for this one.
    bus.execute(conversation, command, meta).await.map(|_| ())
}
