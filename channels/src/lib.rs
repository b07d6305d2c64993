//! Channel adapters: messages in, replies out. Telegram (`telegram`) for now; email to come.

pub mod telegram;
