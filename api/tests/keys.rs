//! API keys on both backends: issuing, authenticating, revoking, what is stored, the keys view and
//! the throttled recording of uses.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use sha2::{Digest, Sha256};
use stele_aggregates::api_key::{ApiKeyError, Scope};
use stele_api::keys::{
    AuthError, KeyError, KeyService, KeyServiceOptions, KEY_ID_LEN, SECRET_LEN, TOKEN_PREFIX,
};
use stele_engine::for_each_backend;
use stele_engine::projection::{ProjectionRunner, Stepped};
use stele_engine::{CommandMeta, Position, RecordedEvent, Store, StreamId};
use stele_projections::{list_keys, ApiKeysView};

fn meta() -> CommandMeta {
    CommandMeta::new("user:42", "test")
}

fn service(store: &Store, cache_ttl: Duration, use_interval: Duration) -> KeyService {
    KeyService::with_options(
        store.log.clone(),
        KeyServiceOptions {
            cache_ttl,
            use_interval,
            ..KeyServiceOptions::default()
        },
    )
}

const HOUR: Duration = Duration::from_secs(3600);

/// The secret part of a token.
fn secret_of(token: &str) -> &str {
    &token[TOKEN_PREFIX.len() + KEY_ID_LEN + 1..]
}

async fn key_events(store: &Store, id: &str) -> Vec<RecordedEvent> {
    store
        .log
        .read_stream(&StreamId::new("api_key", id), 0)
        .await
        .unwrap()
}

/// Every event in the log.
async fn all_events(store: &Store) -> Vec<RecordedEvent> {
    store.log.read_all(Position::START, 1000).await.unwrap()
}

async fn uses_recorded(store: &Store, id: &str) -> usize {
    key_events(store, id)
        .await
        .iter()
        .filter(|e| e.event_type == "ApiKeyUsed")
        .count()
}

async fn a_created_key_authenticates_with_its_scopes(store: &Store) {
    let keys = KeyService::new(store);
    let created = keys
        .create(
            "CI bot",
            vec![Scope::TasksWrite, Scope::TasksRead, Scope::TasksWrite],
            "user:42",
            meta(),
        )
        .await
        .unwrap();
    assert_eq!(created.scopes, vec![Scope::TasksRead, Scope::TasksWrite]);
    // stele_<12 lowercase alphanumerics>_<32 alphanumerics>
    let rest = created.token.strip_prefix(TOKEN_PREFIX).unwrap();
    let (id, secret) = rest.split_once('_').unwrap();
    assert_eq!(id, created.id);
    assert_eq!(id.len(), KEY_ID_LEN);
    assert!(id
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
    assert_eq!(secret.len(), SECRET_LEN);
    assert!(secret.bytes().all(|b| b.is_ascii_alphanumeric()));
    assert!(!format!("{created:?}").contains(secret), "Debug hides it");

    let principal = keys.authenticate(&created.token).await.unwrap();
    assert_eq!(principal.key_id, created.id);
    assert_eq!(principal.name, "CI bot");
    assert_eq!(principal.scopes, vec![Scope::TasksRead, Scope::TasksWrite]);
    assert!(principal.allows(Scope::TasksRead));
    assert!(principal.allows(Scope::TasksWrite));
    assert!(!principal.allows(Scope::Admin));
    assert_eq!(principal.actor(), format!("api_key:{}", created.id));

    // Another process (no shared cache) accepts it too, from the log.
    let elsewhere = KeyService::new(store);
    assert_eq!(
        elsewhere.authenticate(&created.token).await.unwrap(),
        principal
    );

    let writer = keys
        .create("submitter", vec![Scope::TasksWrite], "user:42", meta())
        .await
        .unwrap();
    let writer = keys.authenticate(&writer.token).await.unwrap();
    assert!(writer.allows(Scope::TasksWrite));
    assert!(
        !writer.allows(Scope::TasksRead),
        "write does not imply read"
    );

    let admin = keys
        .create("ops", vec![Scope::Admin], "user:1", meta())
        .await
        .unwrap();
    let admin = keys.authenticate(&admin.token).await.unwrap();
    for scope in Scope::ALL {
        assert!(admin.allows(scope), "admin grants {scope}");
    }
    keys.flush_usage().await;
    elsewhere.flush_usage().await;
}

async fn bad_tokens_get_the_right_error(store: &Store) {
    let keys = KeyService::new(store);
    let created = keys
        .create("CI bot", vec![Scope::TasksRead], "user:42", meta())
        .await
        .unwrap();
    let secret = secret_of(&created.token);
    let flipped = if secret.starts_with('a') { 'b' } else { 'a' };
    let wrong_secret = format!("{TOKEN_PREFIX}{}_{flipped}{}", created.id, &secret[1..]);
    let unknown_id = format!("{TOKEN_PREFIX}{}_{secret}", "0".repeat(KEY_ID_LEN));
    let cases = [
        ("", AuthError::Missing),
        ("secret", AuthError::Malformed),
        (
            &created.token[..created.token.len() - 1],
            AuthError::Malformed,
        ),
        (&format!("Bearer {}", created.token), AuthError::Malformed),
        (&wrong_secret, AuthError::Unknown),
        (&unknown_id, AuthError::Unknown),
    ];
    for (token, expected) in cases {
        let error = keys.authenticate(token).await.unwrap_err();
        assert_eq!(error, expected, "{token:?}");
        assert!(error.is_unauthenticated());
    }
    // The wrong secret did not poison the cache: the right one still works.
    keys.authenticate(&created.token).await.unwrap();
    keys.flush_usage().await;
    // Nothing was recorded for the refused tokens.
    assert_eq!(uses_recorded(store, &created.id).await, 1);
}

async fn a_revoked_key_is_refused_everywhere_at_once(store: &Store) {
    let revoker = KeyService::new(store);
    let created = revoker
        .create("CI bot", vec![Scope::TasksRead], "user:42", meta())
        .await
        .unwrap();
    // Another process that trusts its cache for an hour, but whose reader of the log (the one
    // that keeps its task views) tells it of key changes.
    let other = Arc::new(service(store, HOUR, HOUR));
    let _reader =
        stele_api::cache::TaskCache::start(store.log.clone(), 10, Some(other.clone())).await;
    revoker.authenticate(&created.token).await.unwrap();
    other.authenticate(&created.token).await.unwrap();

    revoker
        .revoke(&created.id, "leaked in a log", meta())
        .await
        .unwrap();
    // The revoking process refuses it at once, the other as soon as it reads the revocation.
    assert_eq!(
        revoker.authenticate(&created.token).await,
        Err(AuthError::Revoked)
    );
    let revoked = std::time::Instant::now();
    while other.authenticate(&created.token).await.is_ok() {
        assert!(
            revoked.elapsed() < Duration::from_secs(2),
            "the revocation did not reach the other process"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(
        other.authenticate(&created.token).await,
        Err(AuthError::Revoked)
    );
    // Revocation is told only to the key's holder.
    let wrong = format!("{TOKEN_PREFIX}{}_{}", created.id, "Z".repeat(SECRET_LEN));
    assert_eq!(other.authenticate(&wrong).await, Err(AuthError::Unknown));

    assert!(matches!(
        revoker.revoke(&created.id, "again", meta()).await,
        Err(KeyError::Rejected(ApiKeyError::Revoked))
    ));
    assert!(matches!(
        revoker.revoke("nosuchkey000", "x", meta()).await,
        Err(KeyError::Rejected(ApiKeyError::NotCreated))
    ));
    for keys in [&revoker, other.as_ref()] {
        keys.flush_usage().await;
    }
    let events = key_events(store, &created.id).await;
    let revoked = events
        .iter()
        .find(|e| e.event_type == "ApiKeyRevoked")
        .unwrap();
    assert_eq!(revoked.payload["data"]["reason"], "leaked in a log");
    assert_eq!(revoked.metadata.command.actor, "user:42");
}

async fn only_the_hash_of_the_secret_is_stored(store: &Store) {
    let keys = KeyService::new(store);
    let created = keys
        .create("CI bot", vec![Scope::Admin], "user:42", meta())
        .await
        .unwrap();
    keys.authenticate(&created.token).await.unwrap();
    // (The use is recorded in the background; a revocation that came first would refuse it.)
    keys.flush_usage().await;
    keys.revoke(&created.id, "rotated", meta()).await.unwrap();

    let secret = secret_of(&created.token);
    let hash = hex::encode(Sha256::digest(secret.as_bytes()));
    let events = all_events(store).await;
    assert_eq!(events.len(), 3, "created, used, revoked");
    let stored = serde_json::to_string(&events).unwrap();
    assert!(!stored.contains(secret), "the secret is not in the log");
    assert!(!stored.contains(&created.token));
    assert!(stored.contains(&hash), "its SHA-256 is");
    assert_eq!(
        key_events(store, &created.id).await[0].payload["data"]["secret_hash"],
        hash.as_str()
    );
}

async fn creation_is_refused_without_name_or_scopes_and_not_repeated(store: &Store) {
    let keys = KeyService::new(store);
    assert!(matches!(
        keys.create(" ", vec![Scope::Admin], "user:42", meta())
            .await,
        Err(KeyError::Rejected(ApiKeyError::EmptyName))
    ));
    assert!(matches!(
        keys.create("CI bot", vec![], "user:42", meta()).await,
        Err(KeyError::Rejected(ApiKeyError::NoScopes))
    ));
    // A retried request (same command id) creates no second key and shows no new token.
    let once = meta();
    let created = keys
        .create("CI bot", vec![Scope::TasksRead], "user:42", once.clone())
        .await
        .unwrap();
    match keys
        .create("CI bot", vec![Scope::TasksRead], "user:42", once)
        .await
    {
        Err(KeyError::AlreadyIssued { key_id }) => assert_eq!(key_id, created.id),
        other => panic!("expected AlreadyIssued, got {other:?}"),
    }
    assert_eq!(all_events(store).await.len(), 1, "one key created");
}

/// Steps until the projection has read everything committed.
async fn drain(runner: &ProjectionRunner, name: &str) {
    for _ in 0..10_000 {
        match runner.step(name).await.unwrap() {
            Stepped { read: 0 } => return,
            _ => tokio::task::yield_now().await,
        }
    }
    panic!("projection {name} did not settle");
}

async fn the_keys_view_lists_keys_and_shows_revocation(store: &Store) {
    let runner = ProjectionRunner::new(store, vec![Arc::new(ApiKeysView)]).with_batch_size(2);
    runner.setup().await.unwrap();
    let keys = KeyService::new(store);
    let before = Utc::now();
    let first = keys
        .create("CI bot", vec![Scope::TasksRead], "user:42", meta())
        .await
        .unwrap();
    let second = keys
        .create(
            "ops",
            vec![Scope::Admin, Scope::TasksWrite],
            "user:1",
            meta(),
        )
        .await
        .unwrap();
    drain(&runner, "api_keys").await;
    let rows = list_keys(&store.pool).await.unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].key_id, second.id, "newest first");
    assert_eq!(rows[0].name, "ops");
    assert_eq!(rows[0].scopes, vec!["tasks:write", "admin"]);
    assert_eq!(rows[0].created_by, "user:1");
    assert_eq!(rows[1].key_id, first.id);
    assert_eq!(rows[1].scopes, vec!["tasks:read"]);
    assert!(rows[1].created_at >= before - chrono::Duration::seconds(5));
    assert!(rows
        .iter()
        .all(|r| r.revoked_at.is_none() && r.revoke_reason.is_none() && r.last_used_at.is_none()));

    keys.authenticate(&first.token).await.unwrap();
    keys.flush_usage().await;
    keys.revoke(&second.id, "rotated", meta()).await.unwrap();
    drain(&runner, "api_keys").await;
    let rows = list_keys(&store.pool).await.unwrap();
    assert!(rows[0].revoked_at.is_some());
    assert_eq!(rows[0].revoke_reason.as_deref(), Some("rotated"));
    assert!(rows[1].revoked_at.is_none());
    let used = rows[1].last_used_at.expect("use recorded");
    assert!(used >= before);

    // Rebuilt from the log, the view is the same.
    runner.rebuild("api_keys", |_| {}).await.unwrap();
    assert_eq!(list_keys(&store.pool).await.unwrap(), rows);
}

async fn uses_are_recorded_at_most_once_per_interval_per_process(store: &Store) {
    let keys = service(store, HOUR, HOUR);
    let created = keys
        .create("CI bot", vec![Scope::TasksRead], "user:42", meta())
        .await
        .unwrap();
    for _ in 0..20 {
        keys.authenticate(&created.token).await.unwrap();
    }
    keys.flush_usage().await;
    assert_eq!(uses_recorded(store, &created.id).await, 1);

    // Another process records its own first use.
    let other = service(store, HOUR, HOUR);
    for _ in 0..5 {
        other.authenticate(&created.token).await.unwrap();
    }
    other.flush_usage().await;
    assert_eq!(uses_recorded(store, &created.id).await, 2);

    // With no interval, every use is recorded.
    let every = service(store, HOUR, Duration::ZERO);
    for _ in 0..3 {
        every.authenticate(&created.token).await.unwrap();
        every.flush_usage().await;
    }
    assert_eq!(uses_recorded(store, &created.id).await, 5);
    let events = key_events(store, &created.id).await;
    let used = events.last().unwrap();
    assert_eq!(used.event_type, "ApiKeyUsed");
    assert_eq!(
        used.metadata.command.actor,
        format!("api_key:{}", created.id)
    );

    // A revoked key's uses are not recorded (here: one seen by a process that still caches it).
    let stale = service(store, HOUR, Duration::ZERO);
    stale.authenticate(&created.token).await.unwrap();
    stale.flush_usage().await;
    keys.revoke(&created.id, "rotated", meta()).await.unwrap();
    stale.authenticate(&created.token).await.unwrap();
    stale.flush_usage().await;
    assert_eq!(uses_recorded(store, &created.id).await, 6);
}

for_each_backend!(
    a_created_key_authenticates_with_its_scopes,
    bad_tokens_get_the_right_error,
    a_revoked_key_is_refused_everywhere_at_once,
    only_the_hash_of_the_secret_is_stored,
    creation_is_refused_without_name_or_scopes_and_not_repeated,
    the_keys_view_lists_keys_and_shows_revocation,
    uses_are_recorded_at_most_once_per_interval_per_process,
);

/// The HTTP layer awaits these inside handlers that must be `Send`.
#[test]
fn the_service_futures_are_send() {
    fn send<T: Send>(_: &T) {}
    fn check(keys: &KeyService) {
        send(&keys.authenticate("token"));
        send(&keys.revoke("id", "reason", meta()));
        send(&keys.create("name", vec![Scope::Admin], "user:1", meta()));
        send(&keys.flush_usage());
    }
    let _ = check;
}
