//! Workflow definitions, agents and models, and the decisions that drive workflow runs.

pub mod model;
