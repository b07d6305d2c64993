//! Stele's engine: the append-only event log and the command runner on top of it.
//!
//! - [`log`]: the event-log port ([`log::EventLog`]) with its PostgreSQL and SQLite adapters, the
//!   global gap-safe read ([`log::EventLog::read_all`]) and live subscriptions ([`log::subscribe`]).
//! - [`command`]: runs cqrs-es aggregates against the log with optimistic concurrency, bounded
//!   retries and idempotent command ids.
//! - [`repository`]: the same log behind cqrs-es's `PersistedEventRepository`, for code that wants
//!   cqrs-es's own `CqrsFramework`.
//! - [`store`]: opens a store from a URL or a data directory and applies the migrations.
//! - [`trace`]: the distributed trace a command, its events and the jobs they lead to belong to.
//!
//! **Invariant**: only this crate writes SQL for the event log.

pub mod command;
pub mod log;
pub mod metadata;
mod notify;
pub mod process;
pub mod projection;
pub mod queue;

pub mod repository;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod trace;

pub use command::{CommandBus, CommandError};
pub use log::{
    AppendOutcome, AppendRequest, CommandOutcome, EventLog, LogError, NewEvent, Position,
    RecordedEvent, StreamId,
};
pub use metadata::{CommandMeta, EventMetadata};
pub use store::{Store, StoreError, StoreLocation};
