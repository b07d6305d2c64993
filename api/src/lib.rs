//! The HTTP API (axum), described by OpenAPI (utoipa).
//!
//! - [`server`]: the router, the OpenAPI document, serving with graceful shutdown;
//! - [`routes`]: tasks (create, list, read, events, cancel, signals, live progress over SSE and
//!   WebSocket), operators' routes, health and metrics;
//! - [`wire`]: the request and response types the document describes;
//! - [`cache`]: task views in memory for reads, kept current by following the log;
//! - [`auth`], [`gate`], [`keys`], [`ratelimit`]: API keys with scopes (recorded as events, only
//!   their hash stored) and per-key rate limits (shared through Redis when configured), which
//!   every route but health passes;
//! - [`problem`]: errors as `application/problem+json` with stable codes;
//! - [`json`]: strict JSON bodies (content type, depth, unknown fields, types);
//! - [`console`]: the operators' web page at `/console/`, which calls this API with a session
//!   cookie.

pub mod auth;
pub mod cache;
pub mod console;
pub mod gate;
pub mod json;
pub mod keys;
pub mod problem;
pub mod ratelimit;
pub mod routes;
pub mod server;
pub mod state;
pub mod wire;
