//! Channel adapters: Telegram and email in, replies out.
