//! Stele's aggregates: pure decision logic (cqrs-es `Aggregate`s) for tasks, workflow runs,
//! conversations, mailbox cursors, API keys and subjects (people and their consents). Each decides (`handle`:
//! command → events) and folds (`apply`), nothing else.
//!
//! **Invariant**: this crate depends on no IO crate (no database, network or file access).

pub mod access;
pub mod api_key;
pub mod channel;
pub mod conversation;
pub mod ids;
pub mod mailbox;
pub mod memory;
pub mod personal;
pub mod role_models;
pub mod room;
pub mod schedule;
pub mod screening;
pub mod subject;
pub mod task;
pub mod workflow_run;
