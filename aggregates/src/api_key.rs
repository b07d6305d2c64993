//! `ApiKey`: a credential for the HTTP API, with the scopes it grants.
//!
//! ```text
//!         Create                 Revoke
//!   new ──────────► active ──────────────► revoked
//!                    │  ▲
//!                    └──┘ RecordUse (ApiKeyUsed)
//! ```
//!
//! The rules, and why:
//!
//! - **Only a hash of the secret is recorded.** `Create` carries `hex(sha256(secret))`, checked to
//!   look like one (64 lowercase hex digits), so a plaintext secret passed by mistake is refused
//!   instead of being written to an append-only log that cannot forget it.
//! - **Scopes are exact, except [`Scope::Admin`].** `admin` grants every scope; `tasks:write` does
//!   *not* imply `tasks:read`. A key that writes but must not read (a webhook that only submits
//!   tasks) is then possible, and a key's scopes say exactly what it may do. A key needs at least
//!   one scope; duplicates are dropped and the scopes recorded in a stable order.
//! - **Revocation is final.** A revoked key refuses every further command, including `RecordUse`:
//!   a use that another process saw before the revocation reached it is not recorded afterwards.
//! - **Uses only move forward.** Several processes record uses, each throttled on its own, so their
//!   reports can arrive out of order: a use no later than the last one recorded adds nothing.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

/// What a key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Scope {
    /// Read tasks (`tasks:read`).
    #[serde(rename = "tasks:read")]
    TasksRead,
    /// Create and change tasks (`tasks:write`). Does not imply `tasks:read`.
    #[serde(rename = "tasks:write")]
    TasksWrite,
    /// Read subjects: list, show, export (`subjects:read`).
    #[serde(rename = "subjects:read")]
    SubjectsRead,
    /// Register subjects, record consents, merge (`subjects:write`).
    #[serde(rename = "subjects:write")]
    SubjectsWrite,
    /// Erase subjects (`subjects:erase`).
    #[serde(rename = "subjects:erase")]
    SubjectsErase,
    /// Read the audit log and its proofs (`audit:read`).
    #[serde(rename = "audit:read")]
    AuditRead,
    /// Search the memory, which opens people's data (`memory:read`).
    #[serde(rename = "memory:read")]
    MemoryRead,
    /// Remember and forget facts (`memory:write`).
    #[serde(rename = "memory:write")]
    MemoryWrite,
    /// Everything, including managing keys (`admin`).
    #[serde(rename = "admin")]
    Admin,
}

impl Scope {
    /// Every scope, in their stable order.
    pub const ALL: [Scope; 9] = [
        Scope::TasksRead,
        Scope::TasksWrite,
        Scope::SubjectsRead,
        Scope::SubjectsWrite,
        Scope::SubjectsErase,
        Scope::AuditRead,
        Scope::MemoryRead,
        Scope::MemoryWrite,
        Scope::Admin,
    ];

    /// The scope's name, as written in events and shown by the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::TasksRead => "tasks:read",
            Scope::TasksWrite => "tasks:write",
            Scope::SubjectsRead => "subjects:read",
            Scope::SubjectsWrite => "subjects:write",
            Scope::SubjectsErase => "subjects:erase",
            Scope::AuditRead => "audit:read",
            Scope::MemoryRead => "memory:read",
            Scope::MemoryWrite => "memory:write",
            Scope::Admin => "admin",
        }
    }

    /// Whether holding `self` permits what `wanted` guards: `admin` grants everything, any other
    /// scope only itself.
    pub fn grants(self, wanted: Scope) -> bool {
        self == Scope::Admin || self == wanted
    }

    /// `scopes` sorted and without duplicates: the form in which a key records them.
    pub fn normalize(mut scopes: Vec<Scope>) -> Vec<Scope> {
        scopes.sort();
        scopes.dedup();
        scopes
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A scope name that is not one of [`Scope::ALL`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope {0:?} (expected tasks:read, tasks:write, subjects:read, subjects:write, subjects:erase, audit:read, memory:read, memory:write or admin)")]
pub struct UnknownScope(pub String);

impl FromStr for Scope {
    type Err = UnknownScope;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s)
            .ok_or_else(|| UnknownScope(s.to_owned()))
    }
}

/// What can be asked of a key.
#[derive(Clone, Debug, PartialEq)]
pub enum ApiKeyCommand {
    /// Issues the key (the caller generated its id and secret).
    Create {
        /// A human label ("CI deploy bot").
        name: String,
        /// What the key may do; at least one.
        scopes: Vec<Scope>,
        /// `hex(sha256(secret))`, lowercase; never the secret itself.
        secret_hash: String,
        /// Who created it (an actor such as `user:42` or `api_key:<id>`).
        created_by: String,
    },
    /// Withdraws the key for good.
    Revoke {
        /// Why, for the audit trail ("leaked in a CI log").
        reason: String,
    },
    /// The key authenticated a request at `at` (throttled by the caller: not once per request).
    RecordUse {
        /// When the use was seen.
        at: DateTime<Utc>,
    },
}

/// What happened to a key. Stored as `{"type": "<variant>", "data": {…}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum ApiKeyEvent {
    /// The key was issued.
    ApiKeyCreated {
        /// Its label, trimmed.
        name: String,
        /// Sorted, without duplicates.
        scopes: Vec<Scope>,
        /// `hex(sha256(secret))`: the secret itself is never recorded.
        secret_hash: String,
        /// The actor who created it.
        created_by: String,
    },
    /// The key was withdrawn.
    ApiKeyRevoked {
        /// Why.
        reason: String,
    },
    /// The key was used (recorded at most about once a minute per server process).
    ApiKeyUsed {
        /// When the use was seen.
        at: DateTime<Utc>,
    },
}

impl DomainEvent for ApiKeyEvent {
    fn event_type(&self) -> String {
        match self {
            ApiKeyEvent::ApiKeyCreated { .. } => "ApiKeyCreated",
            ApiKeyEvent::ApiKeyRevoked { .. } => "ApiKeyRevoked",
            ApiKeyEvent::ApiKeyUsed { .. } => "ApiKeyUsed",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

/// Why an API key command was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApiKeyError {
    /// `Create` on a key that exists (or existed).
    #[error("the API key exists already")]
    AlreadyCreated,
    /// A command other than `Create` on a key that does not exist.
    #[error("no such API key")]
    NotCreated,
    /// A command other than `Create` on a revoked key.
    #[error("the API key is revoked")]
    Revoked,
    /// `Create` without scopes.
    #[error("an API key needs at least one scope")]
    NoScopes,
    /// `Create` with a blank name.
    #[error("an API key needs a name")]
    EmptyName,
    /// `Create` with something that is not a hex SHA-256 digest (a plaintext secret, say).
    #[error("the secret hash must be a hex SHA-256 digest (64 lowercase hex digits)")]
    InvalidSecretHash,
}

/// Where a key is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiKeyStatus {
    /// Not created yet (no events).
    #[default]
    New,
    /// Created and usable.
    Active,
    /// Revoked: refused for good.
    Revoked,
}

/// The key's state, folded from its events.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiKey {
    /// Where it is in its life.
    pub status: ApiKeyStatus,
    /// Its label.
    pub name: String,
    /// What it may do (see [`ApiKey::allows`]).
    pub scopes: Vec<Scope>,
    /// `hex(sha256(secret))`.
    pub secret_hash: String,
    /// The actor who created it.
    pub created_by: String,
    /// Why it was revoked, once it is.
    pub revoke_reason: Option<String>,
    /// The last use recorded.
    pub last_used_at: Option<DateTime<Utc>>,
}

impl ApiKey {
    /// Whether holding this key permits what `wanted` guards (false unless active).
    pub fn allows(&self, wanted: Scope) -> bool {
        self.status == ApiKeyStatus::Active && self.scopes.iter().any(|s| s.grants(wanted))
    }

    fn require_active(&self) -> Result<(), ApiKeyError> {
        match self.status {
            ApiKeyStatus::New => Err(ApiKeyError::NotCreated),
            ApiKeyStatus::Revoked => Err(ApiKeyError::Revoked),
            ApiKeyStatus::Active => Ok(()),
        }
    }
}

fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl Aggregate for ApiKey {
    const TYPE: &'static str = "api_key";
    type Command = ApiKeyCommand;
    type Event = ApiKeyEvent;
    type Error = ApiKeyError;
    type Services = ();

    async fn handle(
        &mut self,
        command: ApiKeyCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), ApiKeyError> {
        let event = match command {
            ApiKeyCommand::Create {
                name,
                scopes,
                secret_hash,
                created_by,
            } => {
                if self.status != ApiKeyStatus::New {
                    return Err(ApiKeyError::AlreadyCreated);
                }
                let name = name.trim();
                if name.is_empty() {
                    return Err(ApiKeyError::EmptyName);
                }
                if scopes.is_empty() {
                    return Err(ApiKeyError::NoScopes);
                }
                if !is_sha256_hex(&secret_hash) {
                    return Err(ApiKeyError::InvalidSecretHash);
                }
                ApiKeyEvent::ApiKeyCreated {
                    name: name.to_owned(),
                    scopes: Scope::normalize(scopes),
                    secret_hash,
                    created_by,
                }
            }
            ApiKeyCommand::Revoke { reason } => {
                self.require_active()?;
                ApiKeyEvent::ApiKeyRevoked { reason }
            }
            ApiKeyCommand::RecordUse { at } => {
                self.require_active()?;
                if self.last_used_at.is_some_and(|last| at <= last) {
                    return Ok(());
                }
                ApiKeyEvent::ApiKeyUsed { at }
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: ApiKeyEvent) {
        match event {
            ApiKeyEvent::ApiKeyCreated {
                name,
                scopes,
                secret_hash,
                created_by,
            } => {
                self.status = ApiKeyStatus::Active;
                self.name = name;
                self.scopes = scopes;
                self.secret_hash = secret_hash;
                self.created_by = created_by;
            }
            ApiKeyEvent::ApiKeyRevoked { reason } => {
                self.status = ApiKeyStatus::Revoked;
                self.revoke_reason = Some(reason);
            }
            ApiKeyEvent::ApiKeyUsed { at } => self.last_used_at = Some(at),
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use cqrs_es::test::TestFramework;

    use super::*;

    type Given = TestFramework<ApiKey>;

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn create(scopes: Vec<Scope>) -> ApiKeyCommand {
        ApiKeyCommand::Create {
            name: "CI bot".into(),
            scopes,
            secret_hash: HASH.into(),
            created_by: "user:42".into(),
        }
    }

    fn created() -> ApiKeyEvent {
        ApiKeyEvent::ApiKeyCreated {
            name: "CI bot".into(),
            scopes: vec![Scope::TasksRead, Scope::TasksWrite],
            secret_hash: HASH.into(),
            created_by: "user:42".into(),
        }
    }

    fn revoked() -> ApiKeyEvent {
        ApiKeyEvent::ApiKeyRevoked {
            reason: "leaked".into(),
        }
    }

    fn at(minute: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 1, 2, 3, minute, 0).unwrap()
    }

    #[test]
    fn scopes_read_and_print_as_their_names() {
        for scope in Scope::ALL {
            assert_eq!(scope.to_string().parse::<Scope>(), Ok(scope));
            assert_eq!(
                serde_json::to_value(scope).unwrap(),
                serde_json::Value::String(scope.as_str().into())
            );
        }
        assert_eq!("tasks:read".parse(), Ok(Scope::TasksRead));
        assert_eq!("tasks".parse::<Scope>(), Err(UnknownScope("tasks".into())));
        let scopes: Vec<Scope> = serde_json::from_str(r#"["admin","tasks:write"]"#).unwrap();
        assert_eq!(scopes, vec![Scope::Admin, Scope::TasksWrite]);
    }

    #[test]
    fn admin_grants_everything_other_scopes_only_themselves() {
        for wanted in Scope::ALL {
            assert!(Scope::Admin.grants(wanted));
        }
        assert!(Scope::TasksRead.grants(Scope::TasksRead));
        assert!(!Scope::TasksWrite.grants(Scope::TasksRead));
        assert!(!Scope::TasksRead.grants(Scope::TasksWrite));
        assert!(!Scope::TasksWrite.grants(Scope::Admin));
    }

    #[test]
    fn a_key_is_created_with_sorted_distinct_scopes() {
        Given::with(())
            .given_no_previous_events()
            .when(create(vec![
                Scope::TasksWrite,
                Scope::TasksRead,
                Scope::TasksWrite,
            ]))
            .then_expect_events(vec![created()]);
    }

    #[test]
    fn creation_needs_a_name_a_scope_and_a_hash() {
        Given::with(())
            .given_no_previous_events()
            .when(ApiKeyCommand::Create {
                name: "  ".into(),
                scopes: vec![Scope::Admin],
                secret_hash: HASH.into(),
                created_by: "user:42".into(),
            })
            .then_expect_error(ApiKeyError::EmptyName);
        Given::with(())
            .given_no_previous_events()
            .when(create(vec![]))
            .then_expect_error(ApiKeyError::NoScopes);
        for not_a_hash in ["", "abc", &HASH.to_uppercase(), &format!("{HASH}00")] {
            Given::with(())
                .given_no_previous_events()
                .when(ApiKeyCommand::Create {
                    name: "CI bot".into(),
                    scopes: vec![Scope::Admin],
                    secret_hash: not_a_hash.into(),
                    created_by: "user:42".into(),
                })
                .then_expect_error(ApiKeyError::InvalidSecretHash);
        }
    }

    #[test]
    fn a_key_is_created_once() {
        Given::with(())
            .given(vec![created()])
            .when(create(vec![Scope::Admin]))
            .then_expect_error(ApiKeyError::AlreadyCreated);
        Given::with(())
            .given(vec![created(), revoked()])
            .when(create(vec![Scope::Admin]))
            .then_expect_error(ApiKeyError::AlreadyCreated);
    }

    #[test]
    fn an_active_key_is_revoked_once() {
        Given::with(())
            .given(vec![created()])
            .when(ApiKeyCommand::Revoke {
                reason: "leaked".into(),
            })
            .then_expect_events(vec![revoked()]);
        Given::with(())
            .given(vec![created(), revoked()])
            .when(ApiKeyCommand::Revoke {
                reason: "again".into(),
            })
            .then_expect_error(ApiKeyError::Revoked);
    }

    #[test]
    fn commands_on_a_missing_key_are_refused() {
        Given::with(())
            .given_no_previous_events()
            .when(ApiKeyCommand::Revoke { reason: "x".into() })
            .then_expect_error(ApiKeyError::NotCreated);
        Given::with(())
            .given_no_previous_events()
            .when(ApiKeyCommand::RecordUse { at: at(1) })
            .then_expect_error(ApiKeyError::NotCreated);
    }

    #[test]
    fn uses_are_recorded_moving_forward_only() {
        Given::with(())
            .given(vec![created()])
            .when(ApiKeyCommand::RecordUse { at: at(1) })
            .then_expect_events(vec![ApiKeyEvent::ApiKeyUsed { at: at(1) }]);
        Given::with(())
            .given(vec![created(), ApiKeyEvent::ApiKeyUsed { at: at(5) }])
            .when(ApiKeyCommand::RecordUse { at: at(6) })
            .then_expect_events(vec![ApiKeyEvent::ApiKeyUsed { at: at(6) }]);
        for earlier in [at(4), at(5)] {
            Given::with(())
                .given(vec![created(), ApiKeyEvent::ApiKeyUsed { at: at(5) }])
                .when(ApiKeyCommand::RecordUse { at: earlier })
                .then_expect_events(vec![]);
        }
    }

    #[test]
    fn a_revoked_key_records_no_use() {
        Given::with(())
            .given(vec![created(), revoked()])
            .when(ApiKeyCommand::RecordUse { at: at(1) })
            .then_expect_error(ApiKeyError::Revoked);
    }

    #[test]
    fn the_state_folds_from_events() {
        let mut key = ApiKey::default();
        assert!(!key.allows(Scope::TasksRead));
        key.apply(created());
        key.apply(ApiKeyEvent::ApiKeyUsed { at: at(3) });
        assert_eq!(key.status, ApiKeyStatus::Active);
        assert_eq!(key.last_used_at, Some(at(3)));
        assert!(key.allows(Scope::TasksRead));
        assert!(!key.allows(Scope::Admin));
        key.apply(revoked());
        assert_eq!(key.status, ApiKeyStatus::Revoked);
        assert_eq!(key.revoke_reason.as_deref(), Some("leaked"));
        assert!(!key.allows(Scope::TasksRead));
    }

    #[test]
    fn events_are_stored_tagged_with_their_type() {
        let json = serde_json::to_value(created()).unwrap();
        assert_eq!(json["type"], "ApiKeyCreated");
        assert_eq!(
            json["data"]["scopes"],
            serde_json::json!(["tasks:read", "tasks:write"])
        );
        assert_eq!(created().event_type(), "ApiKeyCreated");
    }
}
