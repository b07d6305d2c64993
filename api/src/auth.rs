//! Who may call: every route but health and the docs needs an API key (`Authorization: Bearer
//! <key>` or `X-Api-Key: <key>`) with the route's scope, within the key's rate limit.

use async_trait::async_trait;
use axum::http::HeaderMap;

use crate::problem::ApiError;

/// What a route needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// `tasks:read`
    Read,
    /// `tasks:write`
    Write,
    /// `subjects:read`
    SubjectsRead,
    /// `subjects:write`
    SubjectsWrite,
    /// `subjects:erase`
    SubjectsErase,
    /// `audit:read`
    AuditRead,
    /// `memory:read`
    MemoryRead,
    /// `memory:write`
    MemoryWrite,
    /// `admin`
    Admin,
}

impl Need {
    pub fn scope(self) -> &'static str {
        self.as_scope().as_str()
    }

    /// The key scope that grants it.
    pub fn as_scope(self) -> stele_aggregates::api_key::Scope {
        use stele_aggregates::api_key::Scope;
        match self {
            Need::Read => Scope::TasksRead,
            Need::Write => Scope::TasksWrite,
            Need::SubjectsRead => Scope::SubjectsRead,
            Need::SubjectsWrite => Scope::SubjectsWrite,
            Need::SubjectsErase => Scope::SubjectsErase,
            Need::AuditRead => Scope::AuditRead,
            Need::MemoryRead => Scope::MemoryRead,
            Need::MemoryWrite => Scope::MemoryWrite,
            Need::Admin => Scope::Admin,
        }
    }
}

/// The key a request was made with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub key_id: String,
    pub name: String,
}

/// Admits requests: authentication (401), authorization (403) and rate limiting (429).
#[async_trait]
pub trait Gate: Send + Sync {
    async fn admit(&self, token: Option<&str>, need: Need) -> Result<Caller, ApiError>;

    /// Who `token` is and every scope it holds (`admin` grants them all): what the console
    /// shows and offers (401 for a key that is not valid).
    async fn scopes(
        &self,
        token: &str,
    ) -> Result<(Caller, Vec<stele_aggregates::api_key::Scope>), ApiError>;
}

/// The key a request presents, if any.
pub fn token(headers: &HeaderMap) -> Option<&str> {
    if let Some(value) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| rest.trim())
            .filter(|t| !t.is_empty());
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
}
