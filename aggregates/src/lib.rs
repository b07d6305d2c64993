//! Stele's aggregates: pure decision logic (cqrs-es `Aggregate`s) for tasks, workflow runs and
//! conversations.
//!
//! **Invariant**: this crate depends on no IO crate (no database, network or file access).
