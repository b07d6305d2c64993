//! Workflow definitions, agents, and the decisions that drive workflow runs (the models they call
//! are in `stele-models`).
//!
//! - [`definition`]: the declarative model of a workflow (YAML or Rust) and its validation;
//! - [`catalog`]: the shipped definitions, loading more from a folder, and publishing them in the
//!   log;
//! - [`agents`]: agent roles as the runtime calls them, through the model router and the tools;
//! - [`decide`]: the pure `decide(run, event) -> actions` and the [`decide::Catalog`] of
//!   definition versions;
//! - [`expr`]: templates and expressions over a run's state;
//! - [`follow`]: which streams make up a task, and following them from a cursor;
//! - [`runtime`]: the process manager and step workers that perform what runs decide;
//! - [`sanitize`]: the input sanitiser (prompt, SQL and markup injection, path traversal, length);
//! - [`tools`]: Rust functions that `tool` steps call.

pub mod agents;
pub mod catalog;
pub mod decide;
pub mod definition;
pub mod expr;
pub mod follow;
pub mod recall;
pub mod runtime;
pub mod sanitize;
pub mod tools;
