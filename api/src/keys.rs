//! API keys: issuing, revoking and checking the bearer tokens of the HTTP API.
//!
//! A token is `stele_<id>_<secret>`: `<id>` (12 lowercase letters and digits) names the key's
//! stream `api_key/<id>`; `<secret>` (32 letters and digits, about 190 random bits from a CSPRNG)
//! is shown once, when the key is created. The log keeps only `hex(sha256(secret))`: a fast hash is
//! enough because the secret is long and random (nothing to guess from a dictionary), and it keeps
//! checking a token cheap. Hashes are compared in constant time.
//!
//! Keys, their scopes and their revocation are events of the [`ApiKey`] aggregate, so who created
//! or revoked a key, and when, is part of the log. Uses are recorded too, but throttled (see
//! [`KeyServiceOptions::use_interval`]) so that the log does not grow by one event per request.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use rand::distr::{Alphanumeric, SampleString};
use rand::Rng;
use sha2::{Digest, Sha256};
use stele_aggregates::api_key::{ApiKey, ApiKeyCommand, ApiKeyError, ApiKeyStatus, Scope};
use stele_engine::command::Executed;
use stele_engine::{CommandBus, CommandError, CommandMeta, EventLog, Store};
use subtle::ConstantTimeEq;
use tokio::task::JoinSet;

/// What every token starts with, so that leaked tokens are easy to recognise (secret scanners).
pub const TOKEN_PREFIX: &str = "stele_";
/// Length of a key id.
pub const KEY_ID_LEN: usize = 12;
/// Length of a key's secret.
pub const SECRET_LEN: usize = 32;

const KEY_ID_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// How a [`KeyService`] caches keys and records their use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyServiceOptions {
    /// How long a key read from the log is trusted without reading it again.
    ///
    /// The trade-off: each server process keeps the keys it verified for this long, so
    /// authentication costs a hash and a memory lookup instead of a database read per request
    /// (the API's read path must sustain tens of thousands of requests per second). In exchange a
    /// revocation made through another process takes effect here only when the entry expires:
    /// **a revoked key keeps working for up to this long** on the other processes (at once on the
    /// process that revoked it). A few seconds keeps that window short while still serving almost
    /// every request from memory.
    pub cache_ttl: Duration,
    /// How many keys the cache holds at most (unknown ids are cached too, so a flood of made-up
    /// tokens cannot grow it without bound, nor reach the database more than once per id and TTL).
    pub cache_capacity: u64,
    /// Each process records a key's use (`ApiKeyUsed`) at most once per this interval: usage stays
    /// auditable ("used around 14:02") without an event per request.
    pub use_interval: Duration,
}

impl Default for KeyServiceOptions {
    fn default() -> Self {
        Self {
            cache_ttl: Duration::from_secs(5),
            cache_capacity: 100_000,
            use_interval: Duration::from_secs(60),
        }
    }
}

/// A key just created. Its `token` exists nowhere else: show it once and drop it.
#[derive(Clone, PartialEq, Eq)]
pub struct CreatedKey {
    /// The key's id (its stream is `api_key/<id>`).
    pub id: String,
    /// The bearer token, `stele_<id>_<secret>`.
    pub token: String,
    /// The scopes granted, sorted and without duplicates.
    pub scopes: Vec<Scope>,
}

impl fmt::Debug for CreatedKey {
    // The token must not end up in logs through a stray `{:?}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreatedKey")
            .field("id", &self.id)
            .field("token", &"<redacted>")
            .field("scopes", &self.scopes)
            .finish()
    }
}

/// Who a request acts as: an authenticated, unrevoked key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The key's id.
    pub key_id: String,
    /// The key's label.
    pub name: String,
    /// What the key may do (see [`Principal::allows`]).
    pub scopes: Vec<Scope>,
}

impl Principal {
    /// Whether the key may do what `scope` guards (`admin` grants every scope; see [`Scope`]).
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.iter().any(|held| held.grants(scope))
    }

    /// The actor recorded on the events this key's requests cause: `api_key:<id>`.
    pub fn actor(&self) -> String {
        format!("api_key:{}", self.key_id)
    }
}

/// Why a token was not accepted.
///
/// `Missing`, `Malformed`, `Unknown` and `Revoked` mean "not authenticated" (HTTP 401);
/// `Unavailable` means the key could not be checked (HTTP 500 `internal`, logged with an error
/// id: the server's failure, which the client may retry).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token at all.
    #[error("no API key given")]
    Missing,
    /// Not `stele_<id>_<secret>` with an id and secret of the right length and characters.
    #[error("the API key is not of the form stele_<id>_<secret>")]
    Malformed,
    /// No key has this id, or its secret is not this one (not told apart, on purpose).
    #[error("unknown API key")]
    Unknown,
    /// The right secret of a revoked key.
    #[error("the API key is revoked")]
    Revoked,
    /// The key could not be read from the log (the store failed).
    #[error("the API key cannot be checked now: {0}")]
    Unavailable(String),
}

impl AuthError {
    /// Whether the request is unauthenticated (401), as opposed to the check failing (500).
    pub fn is_unauthenticated(&self) -> bool {
        !matches!(self, AuthError::Unavailable(_))
    }
}

/// Why creating or revoking a key failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key refused the command (a business rule: 4xx).
    #[error(transparent)]
    Rejected(ApiKeyError),
    /// This command id created key `key_id` before. Its token was shown then and cannot be shown
    /// again: revoke that key and create a new one if the token was lost.
    #[error("this command already created API key {key_id}; its token cannot be shown again")]
    AlreadyIssued {
        /// The key that command created.
        key_id: String,
    },
    /// The log failed (5xx).
    #[error(transparent)]
    Store(CommandError<ApiKeyError>),
}

impl From<CommandError<ApiKeyError>> for KeyError {
    fn from(error: CommandError<ApiKeyError>) -> Self {
        match error {
            CommandError::Rejected(rejection) => KeyError::Rejected(rejection),
            other => KeyError::Store(other),
        }
    }
}

/// A key as the cache holds it: what authentication needs, nothing more.
#[derive(Debug)]
struct Known {
    name: String,
    scopes: Vec<Scope>,
    secret_hash: [u8; 32],
    revoked: bool,
}

/// A cache entry: `None` when no key has the id.
type Lookup = Option<Arc<Known>>;

/// Issues, revokes and checks API keys. Cheap to clone (clones share the cache).
#[derive(Clone)]
pub struct KeyService {
    inner: Arc<Inner>,
}

struct Inner {
    bus: CommandBus<ApiKey>,
    cache: moka::future::Cache<String, Lookup>,
    use_interval: Duration,
    /// When this process last recorded each key's use.
    last_recorded: Mutex<HashMap<String, Instant>>,
    /// Use recordings under way.
    recording: Mutex<JoinSet<()>>,
}

impl KeyService {
    /// A service on `store`'s log, with the default options.
    pub fn new(store: &Store) -> Self {
        Self::with_options(store.log.clone(), KeyServiceOptions::default())
    }

    /// A service on `log`.
    pub fn with_options(log: Arc<dyn EventLog>, options: KeyServiceOptions) -> Self {
        let cache = moka::future::Cache::builder()
            .max_capacity(options.cache_capacity)
            .time_to_live(options.cache_ttl)
            .build();
        Self {
            inner: Arc::new(Inner {
                bus: CommandBus::new(log, ()),
                cache,
                use_interval: options.use_interval,
                last_recorded: Mutex::new(HashMap::new()),
                recording: Mutex::new(JoinSet::new()),
            }),
        }
    }

    /// Creates a key and returns its token, which is shown this once.
    ///
    /// Submitting the same `meta.command_id` again does not create a second key: it fails with
    /// [`KeyError::AlreadyIssued`], since the first key's secret is known to nobody any more.
    pub async fn create(
        &self,
        name: &str,
        scopes: Vec<Scope>,
        created_by: &str,
        meta: CommandMeta,
    ) -> Result<CreatedKey, KeyError> {
        // What the key will record (the aggregate normalizes the same way).
        let scopes = Scope::normalize(scopes);
        // Ids are random in a space of 36^12: a collision is all but impossible, but it would only
        // be refused (`AlreadyCreated`), so try another id rather than fail.
        for _ in 0..3 {
            let id = new_key_id();
            let secret = Alphanumeric.sample_string(&mut rand::rng(), SECRET_LEN);
            let command = ApiKeyCommand::Create {
                name: name.to_owned(),
                scopes: scopes.clone(),
                secret_hash: hex::encode(Sha256::digest(secret.as_bytes())),
                created_by: created_by.to_owned(),
            };
            match self.inner.bus.execute(&id, command, meta.clone()).await {
                Ok(Executed::Appended(_)) => {
                    // In case this process looked the id up before it existed.
                    self.inner.cache.invalidate(&id).await;
                    return Ok(CreatedKey {
                        token: format!("{TOKEN_PREFIX}{id}_{secret}"),
                        id,
                        scopes,
                    });
                }
                Ok(Executed::Duplicate(first)) => {
                    return Err(KeyError::AlreadyIssued {
                        key_id: first.stream.aggregate_id,
                    })
                }
                Ok(Executed::NoChange) => unreachable!("creating a key always records an event"),
                Err(CommandError::Rejected(ApiKeyError::AlreadyCreated)) => continue,
                Err(error) => return Err(error.into()),
            }
        }
        Err(KeyError::Rejected(ApiKeyError::AlreadyCreated))
    }

    /// Drops a key from this process's cache when `event` changes it (revoked, changed scopes):
    /// called for every event by the process's reader of the log ([`crate::cache::TaskCache`]),
    /// so a revocation reaches every server process within the log's notification delay and
    /// that reader's linger (tens of milliseconds), not the cache TTL.
    pub async fn observe(&self, event: &stele_engine::RecordedEvent) {
        if event.stream.aggregate_type == <ApiKey as cqrs_es::Aggregate>::TYPE
            && event.event_type != "ApiKeyUsed"
        {
            self.inner
                .cache
                .invalidate(&event.stream.aggregate_id)
                .await;
        }
    }

    /// Forgets every cached key (after changes may have been missed).
    pub fn forget_all(&self) {
        self.inner.cache.invalidate_all();
    }

    /// Revokes key `id`. This process refuses it at once; others as soon as they see the
    /// revocation in the log ([`KeyService::observe`]), or at the latest when their cache
    /// entry expires.
    pub async fn revoke(&self, id: &str, reason: &str, meta: CommandMeta) -> Result<(), KeyError> {
        let revoke = ApiKeyCommand::Revoke {
            reason: reason.to_owned(),
        };
        let result = self.inner.bus.execute(id, revoke, meta).await;
        self.inner.cache.invalidate(id).await;
        result?;
        Ok(())
    }

    /// Checks a bearer token (without the `Bearer ` prefix) and returns the key it belongs to.
    ///
    /// Served from the cache when the key was read within the TTL (see
    /// [`KeyServiceOptions::cache_ttl`]); otherwise the key is loaded from the log, once for all
    /// concurrent requests that need it. An accepted token may record the key's use, in the
    /// background (see [`KeyServiceOptions::use_interval`]).
    pub async fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let (id, secret) = parse_token(token).ok_or(AuthError::Malformed)?;
        let bus = &self.inner.bus;
        let lookup = self
            .inner
            .cache
            .try_get_with_by_ref(id, async move { load(bus, id).await })
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        let key = lookup.ok_or(AuthError::Unknown)?;
        let presented: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        if !bool::from(presented.ct_eq(&key.secret_hash)) {
            return Err(AuthError::Unknown);
        }
        // Checked after the secret: only the key's holder learns that it was revoked.
        if key.revoked {
            return Err(AuthError::Revoked);
        }
        self.note_use(id);
        Ok(Principal {
            key_id: id.to_owned(),
            name: key.name.clone(),
            scopes: key.scopes.clone(),
        })
    }

    /// Waits for the use recordings under way (at shutdown, and in tests). Dropping the service
    /// abandons those not yet written.
    pub async fn flush_usage(&self) {
        let mut recording = std::mem::take(&mut *self.inner.recording.lock().expect("lock"));
        while recording.join_next().await.is_some() {}
    }

    /// Records that key `id` was used now, unless this process did so within the interval.
    fn note_use(&self, id: &str) {
        let now = Instant::now();
        {
            let mut last = self.inner.last_recorded.lock().expect("lock");
            match last.get_mut(id) {
                Some(at) if now.duration_since(*at) < self.inner.use_interval => return,
                Some(at) => *at = now,
                None => {
                    last.insert(id.to_owned(), now);
                }
            }
        }
        let inner = self.inner.clone();
        let id = id.to_owned();
        let record = async move {
            let meta = CommandMeta::new(format!("api_key:{id}"), "api");
            let command = ApiKeyCommand::RecordUse { at: Utc::now() };
            match inner.bus.execute(&id, command, meta).await {
                Ok(_) => {}
                // Revoked meanwhile (through another process, within its cache TTL): no use to add.
                Err(CommandError::Rejected(ApiKeyError::Revoked)) => {
                    tracing::debug!(key_id = %id, "use of a key revoked meanwhile not recorded");
                }
                Err(error) => {
                    tracing::warn!(key_id = %id, %error, "could not record the use of an API key");
                }
            }
        };
        let mut recording = self.inner.recording.lock().expect("lock");
        // Reap finished recordings so the set stays small.
        while recording.try_join_next().is_some() {}
        recording.spawn(record);
    }
}

/// Reads key `id` from the log, as the cache keeps it.
async fn load(bus: &CommandBus<ApiKey>, id: &str) -> Result<Lookup, CommandError<ApiKeyError>> {
    let (key, _) = bus.load(id).await?;
    if key.status == ApiKeyStatus::New {
        return Ok(None);
    }
    let mut secret_hash = [0u8; 32];
    if hex::decode_to_slice(&key.secret_hash, &mut secret_hash).is_err() {
        // The aggregate accepts only well-formed hashes; a key without one can match no token.
        tracing::error!(key_id = %id, "stored API key has an unreadable secret hash");
        return Ok(None);
    }
    Ok(Some(Arc::new(Known {
        revoked: key.status == ApiKeyStatus::Revoked,
        name: key.name,
        scopes: key.scopes,
        secret_hash,
    })))
}

/// A fresh key id: 12 lowercase letters and digits from the thread's CSPRNG.
fn new_key_id() -> String {
    let mut rng = rand::rng();
    (0..KEY_ID_LEN)
        .map(|_| char::from(KEY_ID_ALPHABET[rng.random_range(0..KEY_ID_ALPHABET.len())]))
        .collect()
}

/// Splits `stele_<id>_<secret>` into id and secret, if the token has exactly that form.
fn parse_token(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let id_ok = id.len() == KEY_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let secret_ok = secret.len() == SECRET_LEN && secret.bytes().all(|b| b.is_ascii_alphanumeric());
    (id_ok && secret_ok).then_some((id, secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_only_in_their_exact_form() {
        let secret = "A".repeat(SECRET_LEN);
        let good = format!("stele_abcdefgh1234_{secret}");
        assert_eq!(parse_token(&good), Some(("abcdefgh1234", secret.as_str())));
        for bad in [
            String::new(),
            format!("stel_abcdefgh1234_{secret}"),
            format!("stele_ABCDEFGH1234_{secret}"),
            format!("stele_abcdefgh123_{secret}"),
            format!("stele_abcdefgh1234_{secret}x"),
            format!("stele_abcdefgh1234_{}", &secret[1..]),
            format!("stele_abcdefgh1234_{}-", &secret[1..]),
            format!("stele_abcdefgh1234{secret}"),
            format!("Bearer stele_abcdefgh1234_{secret}"),
        ] {
            assert_eq!(parse_token(&bad), None, "{bad}");
        }
    }

    #[test]
    fn new_ids_are_well_formed_and_differ() {
        let a = new_key_id();
        let secret = "x".repeat(SECRET_LEN);
        assert!(parse_token(&format!("{TOKEN_PREFIX}{a}_{secret}")).is_some());
        assert_ne!(a, new_key_id());
    }
}
