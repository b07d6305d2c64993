//! The API's routes, each documented with `#[utoipa::path]`, and the extractors they share: each
//! refuses what it cannot take with a problem (never axum's plain-text rejections).

pub mod audit;
pub mod channels;
pub mod conversations;
pub mod health;
mod list;
pub mod memory;
pub mod ops;
pub mod rooms;
pub mod schedules;
pub mod stream;
pub mod subjects;
pub mod tasks;
pub mod workspace;

use axum::extract::path::ErrorKind;
use axum::extract::rejection::PathRejection;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::auth::{token, Caller, Need};
use crate::problem::{ApiError, Code};
use crate::state::AppState;

/// Admits the request for `need` (401, 403, 429 otherwise).
pub async fn admit(state: &AppState, parts: &Parts, need: Need) -> Result<Caller, ApiError> {
    state.gate.admit(token(&parts.headers), need).await
}

macro_rules! guard {
    ($name:ident, $need:expr) => {
        /// Extracting it admits the request (or answers 401 / 403 / 429).
        pub struct $name(pub Caller);

        impl FromRequestParts<AppState> for $name {
            type Rejection = ApiError;

            async fn from_request_parts(
                parts: &mut Parts,
                state: &AppState,
            ) -> Result<Self, ApiError> {
                admit(state, parts, $need).await.map($name)
            }
        }
    };
}

guard!(CanRead, Need::Read);
guard!(CanWrite, Need::Write);
guard!(IsAdmin, Need::Admin);
guard!(CanReadSubjects, Need::SubjectsRead);
guard!(CanWriteSubjects, Need::SubjectsWrite);
guard!(CanEraseSubjects, Need::SubjectsErase);
guard!(CanReadAudit, Need::AuditRead);
guard!(CanReadMemory, Need::MemoryRead);
guard!(CanWriteMemory, Need::MemoryWrite);

/// Query strings refuse unknown parameters and wrong types with a problem.
pub struct StrictQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for StrictQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        serde_urlencoded::from_str(query)
            .map(StrictQuery)
            .map_err(|e| ApiError::new(Code::InvalidQuery, e.to_string()))
    }
}

/// The query of a route that takes no parameter: any parameter is unknown (400), so that a
/// misspelt or misplaced one is never silently ignored.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoQuery {}

/// Path parameters, with every refusal a problem: a segment that is not UTF-8 once
/// percent-decoded is `invalid_path`.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(ApiPath(value)),
            Err(PathRejection::FailedToDeserializePathParams(e)) => Err(match e.kind() {
                ErrorKind::InvalidUtf8InPathParam { key } => ApiError::new(
                    Code::InvalidPath,
                    format!("the path parameter `{key}` is not UTF-8 once percent-decoded"),
                ),
                _ => ApiError::new(Code::InvalidPath, e.body_text()),
            }),
            Err(other) => Err(ApiError::internal(other.body_text())),
        }
    }
}

/// A task or job id: a UUID in its hyphenated form (the one the document's `uuid` format names).
/// Task ids are stored in its lower case: `to_string` gives that form back.
pub fn parse_id(what: &str, id: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::try_parse(id)
        .ok()
        .filter(|_| id.len() == 36)
        .ok_or_else(|| {
            ApiError::new(
                Code::InvalidId,
                format!("{id:?} is not a {what} id (a UUID)"),
            )
        })
}
