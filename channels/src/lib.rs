//! Channel adapters (Telegram, email): messages in, replies out. Not written yet: this crate
//! holds their place in the workspace.
