//! `api_keys`: one row per API key (name, scopes, who created it and when, revocation, last
//! recorded use), for listing keys. It never holds a key's secret nor its hash: authentication
//! reads the key's own stream, not this view.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::types::JsonValue;
use stele_engine::log::LogTransaction;
use stele_engine::projection::{Projection, ProjectionError, Tables};
use stele_engine::store::sql::{Db, Dialects, Row};
use stele_engine::store::StorePool;
use stele_engine::RecordedEvent;

/// The API keys view.
pub struct ApiKeysView;

const TABLE: &str = "api_key_view";

/// The aggregate type of API keys (`ApiKey::TYPE` in `stele-aggregates`).
const AGGREGATE_TYPE: &str = "api_key";

/// One API key, as listed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KeyRow {
    /// The key's id: its aggregate id, the `<id>` in `stele_<id>_<secret>`.
    pub key_id: String,
    /// Its label.
    pub name: String,
    /// Scope names (`tasks:read`, `tasks:write`, `admin`).
    pub scopes: Vec<String>,
    /// The actor who created it.
    pub created_by: String,
    /// When it was created (when its creation was recorded).
    pub created_at: DateTime<Utc>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
    /// Why it was revoked, if it was.
    pub revoke_reason: Option<String>,
    /// The last use recorded (uses are recorded at most about once a minute per server process,
    /// so this lags the real last use by up to that much).
    pub last_used_at: Option<DateTime<Utc>>,
}

/// The fields this view reads from the key's events (their payloads as the `ApiKey` aggregate
/// stores them: `{"type": …, "data": {…}}`). Other fields, the secret hash among them, are ignored.
#[derive(Deserialize)]
#[serde(tag = "type", content = "data")]
enum KeyEvent {
    #[serde(rename = "ApiKeyCreated")]
    Created {
        name: String,
        scopes: JsonValue,
        created_by: String,
    },
    #[serde(rename = "ApiKeyRevoked")]
    Revoked { reason: String },
    #[serde(rename = "ApiKeyUsed")]
    Used { at: DateTime<Utc> },
}

/// One event, read, with the key it changes and when it was recorded.
struct Change {
    key_id: String,
    recorded_at: DateTime<Utc>,
    event: KeyEvent,
}

fn read(events: &[RecordedEvent]) -> Result<Vec<Change>, ProjectionError> {
    events
        .iter()
        .filter(|e| e.stream.aggregate_type == AGGREGATE_TYPE)
        .map(|e| {
            let event = KeyEvent::deserialize(&e.payload).map_err(|error| {
                ProjectionError::Apply(format!(
                    "event {} ({}) is unreadable: {error}",
                    e.position, e.event_type
                ))
            })?;
            Ok(Change {
                key_id: e.stream.aggregate_id.clone(),
                recorded_at: e.recorded_at,
                event,
            })
        })
        .collect()
}

/// The view's statements. Only the table differs by dialect; the rest reads alike (`$n` works
/// on SQLite too), and [`Db`] binds the times as each store keeps them. `{table}` is the live
/// table or its rebuild.
const CREATE: Dialects<&str> = Dialects {
    postgres: "CREATE TABLE IF NOT EXISTS {table} ( \
                  key_id text PRIMARY KEY, name text NOT NULL, scopes text NOT NULL, \
                  created_by text NOT NULL, created_at timestamptz NOT NULL, \
                  revoked_at timestamptz, revoke_reason text, last_used_at timestamptz)",
    sqlite: "CREATE TABLE IF NOT EXISTS {table} ( \
                key_id TEXT PRIMARY KEY, name TEXT NOT NULL, scopes TEXT NOT NULL, \
                created_by TEXT NOT NULL, created_at INTEGER NOT NULL, \
                revoked_at INTEGER, revoke_reason TEXT, last_used_at INTEGER) \
             WITHOUT ROWID",
};
const INSERT: &str = "INSERT INTO {table} (key_id, name, scopes, created_by, created_at) \
                      VALUES ($1, $2, $3, $4, $5) ON CONFLICT (key_id) DO NOTHING";
const REVOKE: &str = "UPDATE {table} SET revoked_at = $2, revoke_reason = $3 WHERE key_id = $1";
/// Uses reported by several processes can arrive out of order: keep the latest.
const USED: &str = "UPDATE {table} SET last_used_at = CASE \
                       WHEN last_used_at IS NULL OR last_used_at < $2 THEN $2 \
                       ELSE last_used_at END \
                    WHERE key_id = $1";
const LIST: &str =
    "SELECT key_id, name, scopes, created_by, created_at, revoked_at, revoke_reason, \
                           last_used_at \
                    FROM {table} ORDER BY created_at DESC, key_id";

#[async_trait]
impl Projection for ApiKeysView {
    fn name(&self) -> &'static str {
        "api_keys"
    }

    fn event_types(&self) -> &'static [&'static str] {
        &["ApiKeyCreated", "ApiKeyRevoked", "ApiKeyUsed"]
    }

    fn tables(&self) -> &'static [&'static str] {
        &[TABLE]
    }

    async fn create(
        &self,
        tx: &mut dyn LogTransaction,
        tables: &Tables,
    ) -> Result<(), ProjectionError> {
        let mut db = Db::from(tx.connection());
        let create = db.pick(&CREATE).replace("{table}", &tables.name(TABLE));
        db.execute(&create, &[]).await?;
        Ok(())
    }

    async fn apply(
        &self,
        tx: &mut dyn LogTransaction,
        tables: &Tables,
        events: &[RecordedEvent],
    ) -> Result<(), ProjectionError> {
        let changes = read(events)?;
        let table = tables.name(TABLE);
        let [insert, revoke, used] =
            [INSERT, REVOKE, USED].map(|sql| sql.replace("{table}", &table));
        let mut db = Db::from(tx.connection());
        // Keys change rarely (uses are throttled): one statement per event is plenty.
        for Change {
            key_id,
            recorded_at,
            event,
        } in &changes
        {
            match event {
                KeyEvent::Created {
                    name,
                    scopes,
                    created_by,
                } => {
                    let scopes = scopes.to_string();
                    let values = [
                        key_id.into(),
                        name.into(),
                        scopes.as_str().into(),
                        created_by.into(),
                        (*recorded_at).into(),
                    ];
                    db.execute(&insert, &values).await?
                }
                KeyEvent::Revoked { reason } => {
                    let values = [key_id.into(), (*recorded_at).into(), reason.into()];
                    db.execute(&revoke, &values).await?
                }
                KeyEvent::Used { at } => db.execute(&used, &[key_id.into(), (*at).into()]).await?,
            };
        }
        Ok(())
    }
}

/// The stored scopes (JSON text) as scope names.
fn scope_names(text: &str) -> Result<Vec<String>, sqlx::Error> {
    let value: JsonValue = text.parse().map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    Vec::<String>::deserialize(value).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

fn key_row(row: &Row) -> Result<KeyRow, sqlx::Error> {
    Ok(KeyRow {
        key_id: row.get("key_id")?,
        name: row.get("name")?,
        scopes: scope_names(&row.get::<String>("scopes")?)?,
        created_by: row.get("created_by")?,
        created_at: row.time("created_at")?,
        revoked_at: row.optional_time("revoked_at")?,
        revoke_reason: row.get("revoke_reason")?,
        last_used_at: row.optional_time("last_used_at")?,
    })
}

/// Every API key, newest first.
pub async fn list_keys(pool: &StorePool) -> Result<Vec<KeyRow>, sqlx::Error> {
    let rows = Db::from(pool)
        .fetch_all(&LIST.replace("{table}", TABLE), &[])
        .await?;
    rows.iter().map(key_row).collect()
}
