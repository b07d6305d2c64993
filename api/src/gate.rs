//! The gate of a running server: API keys from the log, scopes, and per-key rate limits.

use std::sync::Arc;

use async_trait::async_trait;

use crate::auth::{Caller, Gate, Need};
use stele_aggregates::api_key::Scope;

use crate::keys::{AuthError, KeyService, Principal};
use crate::problem::{ApiError, Code};
use crate::ratelimit::RateLimiter;

/// Authenticates with [`KeyService`], authorizes by scope, then rate-limits per key.
pub struct KeyGate {
    pub keys: Arc<KeyService>,
    pub limiter: Arc<RateLimiter>,
}

impl KeyGate {
    async fn principal(&self, token: &str) -> Result<Principal, ApiError> {
        self.keys.authenticate(token).await.map_err(|e| match e {
            AuthError::Revoked => ApiError::new(Code::Unauthorized, "this API key was revoked"),
            // The key could not be checked: the server's failure, not the caller's.
            e @ AuthError::Unavailable(_) => ApiError::internal(e),
            AuthError::Missing | AuthError::Malformed | AuthError::Unknown => {
                ApiError::new(Code::Unauthorized, "this API key is not valid")
            }
        })
    }
}

#[async_trait]
impl Gate for KeyGate {
    async fn scopes(&self, token: &str) -> Result<(Caller, Vec<Scope>), ApiError> {
        let principal = self.principal(token).await?;
        let scopes = Scope::ALL
            .into_iter()
            .filter(|scope| principal.allows(*scope))
            .collect();
        Ok((
            Caller {
                key_id: principal.key_id,
                name: principal.name,
            },
            scopes,
        ))
    }

    async fn admit(&self, token: Option<&str>, need: Need) -> Result<Caller, ApiError> {
        let Some(token) = token else {
            return Err(ApiError::new(
                Code::Unauthorized,
                "an API key is required: `Authorization: Bearer <key>` or `X-Api-Key: <key>`",
            ));
        };
        let principal = self.principal(token).await?;
        let scope = need.as_scope();
        if !principal.allows(scope) {
            return Err(ApiError::new(
                Code::Forbidden,
                format!("this key lacks the scope {}", need.scope()),
            ));
        }
        if let Err(limited) = self.limiter.check(&principal.key_id).await {
            return Err(ApiError::rate_limited(
                limited.retry_after.as_secs_f64().ceil().max(1.0) as u64,
            ));
        }
        Ok(Caller {
            key_id: principal.key_id,
            name: principal.name,
        })
    }
}
