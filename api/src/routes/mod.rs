//! The API's routes, each documented with `#[utoipa::path]`.

pub mod health;
mod list;
pub mod ops;
pub mod stream;
pub mod tasks;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use crate::auth::{token, Caller, Need};
use crate::problem::ApiError;
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

/// Query strings refuse unknown parameters and wrong types with a problem.
pub struct StrictQuery<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequestParts<S> for StrictQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        serde_urlencoded::from_str(query)
            .map(StrictQuery)
            .map_err(|e| ApiError::bad_request("invalid_query", e.to_string()))
    }
}
