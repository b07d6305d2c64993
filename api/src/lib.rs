//! The HTTP API (axum), described by OpenAPI.
