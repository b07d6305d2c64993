//! Health and metrics.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::{IsAdmin, NoQuery, StrictQuery};
use crate::state::AppState;
use crate::wire::{Check, Liveness, Readiness};

/// The process is up (no dependency is checked).
#[utoipa::path(
    get, path = "/health/live", tag = "health",
    responses((status = 200, description = "Alive", body = Liveness))
)]
pub async fn live(StrictQuery(NoQuery {}): StrictQuery<NoQuery>) -> Json<Liveness> {
    Json(Liveness {
        status: "ok".into(),
    })
}

/// The process can serve: the database answers, Redis answers (when configured), projections
/// keep up.
#[utoipa::path(
    get, path = "/health/ready", tag = "health",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "Not ready; the body says why", body = Readiness),
    )
)]
pub async fn ready(
    State(state): State<AppState>,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
) -> (StatusCode, Json<Readiness>) {
    let database = match state.log.head().await {
        Ok(head) => Check {
            ok: true,
            detail: format!("log head at {head}"),
        },
        Err(e) => Check {
            ok: false,
            detail: e.to_string(),
        },
    };
    let redis = match &state.probe {
        None => None,
        Some(probe) => Some(match probe.check().await {
            Ok(()) => Check {
                ok: true,
                detail: format!("{} answers", probe.name()),
            },
            Err(e) => Check {
                ok: false,
                detail: e,
            },
        }),
    };
    let projections = match state.runner.status().await {
        Ok(statuses) => {
            let behind: Vec<String> = statuses
                .iter()
                .filter(|s| s.lag_seconds > state.max_lag_seconds || s.checkpoint.error.is_some())
                .map(|s| s.checkpoint.name.clone())
                .collect();
            Check {
                ok: behind.is_empty(),
                detail: if behind.is_empty() {
                    "every projection keeps up".into()
                } else {
                    format!("behind or failed: {}", behind.join(", "))
                },
            }
        }
        Err(e) => Check {
            ok: false,
            detail: e.to_string(),
        },
    };
    let ready = database.ok && projections.ok && redis.as_ref().is_none_or(|r| r.ok);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Readiness {
            ready,
            database,
            redis,
            projections,
        }),
    )
}

/// Metrics in the Prometheus text format: HTTP latency, queue depth, job outcomes, projection
/// lag, model calls.
#[utoipa::path(
    get, path = "/metrics", tag = "health",
    responses(
        (status = 200, description = "Prometheus text format", content_type = "text/plain", body = String),
    ),
    security(("api_key" = ["admin"]))
)]
pub async fn metrics(
    State(state): State<AppState>,
    _caller: IsAdmin,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
) -> Response {
    let text = state
        .metrics
        .as_ref()
        .map(|handle| handle.render())
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
