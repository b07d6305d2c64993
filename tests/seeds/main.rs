//! The systems built on Stele, each driven end to end through its real interfaces (the binary,
//! its HTTP API, a Telegram Bot API that speaks Telegram's JSON, the mail server, the CLI), one
//! scenario per system.

#[path = "../support/mod.rs"]
mod support;

mod assistant;
mod dev_platform;
mod family;
mod labour_law;
mod rooms;
