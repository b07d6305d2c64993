//! Errors as `application/problem+json` (RFC 9457) with a stable `code`: clients branch on the
//! code, people read the detail. Every code is listed in `docs/api-errors.md`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The body of every error response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// `urn:stele:problem:<code>`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short, fixed summary of the code.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong in this case.
    pub detail: String,
    /// The stable error code.
    pub code: String,
}

/// An error answered as a problem.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub title: &'static str,
    pub detail: String,
    /// Seconds, for `Retry-After` (429).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        code: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            status,
            code,
            title,
            detail: detail.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, "Bad request", detail)
    }

    pub fn unprocessable(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            code,
            "Unprocessable request",
            detail,
        )
    }

    pub fn not_found(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, "Not found", detail)
    }

    pub fn conflict(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, "Conflict", detail)
    }

    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Unauthorized",
            detail,
        )
    }

    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail)
    }

    pub fn rate_limited(retry_after_secs: u64) -> Self {
        let mut error = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "Too many requests",
            format!("this key's rate limit is exhausted; retry in {retry_after_secs} s"),
        );
        error.retry_after = Some(retry_after_secs);
        error
    }

    pub fn unavailable(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            code,
            "Service unavailable",
            detail,
        )
    }

    /// An unexpected failure: logged in full, answered without internals.
    pub fn internal(error: impl std::fmt::Display) -> Self {
        let id = uuid::Uuid::now_v7();
        tracing::error!(error_id = %id, error = %error, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            format!("the request failed; the server log has the details under error id {id}"),
        )
    }

    pub fn problem(&self) -> Problem {
        Problem {
            kind: format!("urn:stele:problem:{}", self.code),
            title: self.title.to_owned(),
            status: self.status.as_u16(),
            detail: self.detail.clone(),
            code: self.code.to_owned(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.problem()).unwrap_or_default();
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<stele_workflows::runtime::RuntimeError> for ApiError {
    fn from(e: stele_workflows::runtime::RuntimeError) -> Self {
        use stele_workflows::runtime::RuntimeError as E;
        match e {
            E::UnknownTask(id) => ApiError::not_found("task_not_found", format!("no task {id}")),
            e @ E::UnknownWorkflow { .. } => {
                ApiError::unprocessable("unknown_workflow", e.to_string())
            }
            E::Task(e) => ApiError::conflict("task_state", e.to_string()),
            E::Run(e) => ApiError::conflict("run_state", e.to_string()),
            E::NotStarted(id) => ApiError::conflict(
                "run_not_started",
                format!("task {id} has no workflow run yet"),
            ),
            E::Log(e) => e.into(),
            other => ApiError::internal(other),
        }
    }
}

impl From<stele_engine::queue::QueueError> for ApiError {
    fn from(e: stele_engine::queue::QueueError) -> Self {
        use stele_engine::queue::QueueError as E;
        match e {
            E::NotFound(id) => ApiError::not_found("job_not_found", format!("no job {id}")),
            e @ E::WrongState { .. } => ApiError::conflict("job_state", e.to_string()),
            other => ApiError::internal(other),
        }
    }
}

impl From<stele_engine::LogError> for ApiError {
    fn from(e: stele_engine::LogError) -> Self {
        match e {
            e @ stele_engine::LogError::UnknownPosition(_) => {
                ApiError::bad_request("unknown_position", e.to_string())
            }
            // What the log refuses to store (its rules are the same on both stores): the
            // request's own data, never a server fault.
            stele_engine::LogError::InvalidAppend(why) => {
                ApiError::unprocessable("unstorable_input", why)
            }
            other => ApiError::internal(other),
        }
    }
}

impl From<stele_engine::projection::ProjectionError> for ApiError {
    fn from(e: stele_engine::projection::ProjectionError) -> Self {
        use stele_engine::projection::ProjectionError as E;
        match e {
            e @ E::Unknown(_) => ApiError::not_found("projection_not_found", e.to_string()),
            e @ E::NotRebuildable(_) => ApiError::conflict("not_rebuildable", e.to_string()),
            e @ E::Busy(_) => ApiError::conflict("projection_busy", e.to_string()),
            other => ApiError::internal(other),
        }
    }
}
