//! The HTTP API (axum), described by OpenAPI.

pub mod keys;
pub mod ratelimit;
