//! Workflow definitions, agents and models, and the decisions that drive workflow runs.
//!
//! - [`definition`]: the declarative model of a workflow (YAML or Rust) and its validation;
//! - [`decide`]: the pure `decide(run, event) -> actions` and the [`decide::Catalog`] of
//!   definition versions;
//! - [`expr`]: templates and expressions over a run's state.

pub mod decide;
pub mod definition;
pub mod expr;
