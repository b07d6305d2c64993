//! The HTTP API (axum), described by OpenAPI (utoipa).
//!
//! - [`server`]: the router, the OpenAPI document, serving with graceful shutdown;
//! - [`routes`]: tasks (create, list, read, events, cancel, signals, live progress over SSE and
//!   WebSocket), operators' routes, health and metrics;
//! - [`wire`]: the request and response types the document describes;
//! - [`auth`]: API keys and scopes, and the [`auth::Gate`] every route but health passes;
//! - [`problem`]: errors as `application/problem+json` with stable codes;
//! - [`json`]: strict JSON bodies (content type, depth, unknown fields, types).

pub mod auth;
pub mod json;
pub mod problem;
pub mod routes;
pub mod server;
pub mod state;
pub mod wire;
