//! Channel adapters: messages in, replies out. Telegram (`telegram`) and email (`email`): each
//! records what comes in as conversation events before it tells its server anything, turns
//! messages into work through a process manager, and delivers replies from the conversation's
//! outbox.

mod conversation;
pub mod email;
pub mod telegram;
