//! Checkpoints of projections and process managers: position, status, failure, and the lease that
//! lets one runner at a time (across processes) drive each of them. All checkpoint SQL is here.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;

use crate::log::{Position, TxConnection};
use crate::store::StorePool;

/// Whether a projection follows the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Running,
    /// Stopped at `failed_position` until an operator retries or skips.
    Failed,
    /// Paused while a rebuild swaps its tables.
    Rebuilding,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Failed => "failed",
            Status::Rebuilding => "rebuilding",
        }
    }

    fn parse(s: &str) -> Status {
        match s {
            "failed" => Status::Failed,
            "rebuilding" => Status::Rebuilding,
            _ => Status::Running,
        }
    }
}

/// A stored checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Checkpoint {
    pub name: String,
    pub position: Position,
    pub events_applied: i64,
    pub last_event_at: Option<DateTime<Utc>>,
    pub status: Status,
    pub error: Option<String>,
    pub failed_position: Option<Position>,
    pub owner: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// Who is rebuilding it now, if anyone (see [`claim_rebuild`]).
    pub rebuild_owner: Option<String>,
    /// Why the last rebuild failed, until the next one starts.
    pub rebuild_error: Option<String>,
}

fn micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

fn from_micros(us: Option<i64>) -> Option<DateTime<Utc>> {
    us.and_then(DateTime::from_timestamp_micros)
}

const COLUMNS: &str = "name, position, events_applied, last_event_at, status, error, \
                       failed_position, owner, lease_expires_at, rebuild_owner, rebuild_error";

fn from_pg(row: &sqlx::postgres::PgRow) -> Result<Checkpoint, sqlx::Error> {
    Ok(Checkpoint {
        name: row.try_get("name")?,
        position: Position(row.try_get("position")?),
        events_applied: row.try_get("events_applied")?,
        last_event_at: row.try_get("last_event_at")?,
        status: Status::parse(row.try_get("status")?),
        error: row.try_get("error")?,
        failed_position: row
            .try_get::<Option<i64>, _>("failed_position")?
            .map(Position),
        owner: row.try_get("owner")?,
        lease_expires_at: row.try_get("lease_expires_at")?,
        rebuild_owner: row.try_get("rebuild_owner")?,
        rebuild_error: row.try_get("rebuild_error")?,
    })
}

fn from_sqlite(row: &sqlx::sqlite::SqliteRow) -> Result<Checkpoint, sqlx::Error> {
    Ok(Checkpoint {
        name: row.try_get("name")?,
        position: Position(row.try_get("position")?),
        events_applied: row.try_get("events_applied")?,
        last_event_at: from_micros(row.try_get("last_event_at")?),
        status: Status::parse(row.try_get("status")?),
        error: row.try_get("error")?,
        failed_position: row
            .try_get::<Option<i64>, _>("failed_position")?
            .map(Position),
        owner: row.try_get("owner")?,
        lease_expires_at: from_micros(row.try_get("lease_expires_at")?),
        rebuild_owner: row.try_get("rebuild_owner")?,
        rebuild_error: row.try_get("rebuild_error")?,
    })
}

/// Creates the checkpoint if missing.
pub async fn ensure(pool: &StorePool, name: &str) -> Result<(), sqlx::Error> {
    match pool {
        StorePool::Postgres(pool) => {
            sqlx::query("INSERT INTO checkpoints (name) VALUES ($1) ON CONFLICT DO NOTHING")
                .bind(name)
                .execute(pool)
                .await?;
        }
        StorePool::Sqlite(pool) => {
            sqlx::query("INSERT INTO checkpoints (name) VALUES (?) ON CONFLICT DO NOTHING")
                .bind(name)
                .execute(pool)
                .await?;
        }
    }
    Ok(())
}

pub async fn load(pool: &StorePool, name: &str) -> Result<Option<Checkpoint>, sqlx::Error> {
    match pool {
        StorePool::Postgres(pool) => {
            let sql = format!("SELECT {COLUMNS} FROM checkpoints WHERE name = $1");
            sqlx::query(&sql)
                .bind(name)
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(from_pg)
                .transpose()
        }
        StorePool::Sqlite(pool) => {
            let sql = format!("SELECT {COLUMNS} FROM checkpoints WHERE name = ?");
            sqlx::query(&sql)
                .bind(name)
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(from_sqlite)
                .transpose()
        }
    }
}

pub async fn list(pool: &StorePool) -> Result<Vec<Checkpoint>, sqlx::Error> {
    let sql = format!("SELECT {COLUMNS} FROM checkpoints ORDER BY name");
    match pool {
        StorePool::Postgres(pool) => sqlx::query(&sql)
            .fetch_all(pool)
            .await?
            .iter()
            .map(from_pg)
            .collect(),
        StorePool::Sqlite(pool) => sqlx::query(&sql)
            .fetch_all(pool)
            .await?
            .iter()
            .map(from_sqlite)
            .collect(),
    }
}

/// Takes or renews the lease of `name` for `owner`; false when another live owner holds it.
pub async fn acquire(
    pool: &StorePool,
    name: &str,
    owner: &str,
    lease: Duration,
) -> Result<bool, sqlx::Error> {
    let taken = match pool {
        StorePool::Postgres(pool) => sqlx::query(
            "UPDATE checkpoints SET owner = $2, lease_expires_at = now() + make_interval(secs => $3), \
             updated_at = now() \
             WHERE name = $1 AND (owner IS NULL OR owner = $2 OR lease_expires_at < now())",
        )
        .bind(name)
        .bind(owner)
        .bind(lease.as_secs_f64())
        .execute(pool)
        .await?
        .rows_affected(),
        StorePool::Sqlite(pool) => {
            let now = micros(Utc::now());
            sqlx::query(
                "UPDATE checkpoints SET owner = ?2, lease_expires_at = ?3, updated_at = ?4 \
                 WHERE name = ?1 AND (owner IS NULL OR owner = ?2 OR lease_expires_at < ?4)",
            )
            .bind(name)
            .bind(owner)
            .bind(now + lease.as_micros() as i64)
            .bind(now)
            .execute(pool)
            .await?
            .rows_affected()
        }
    };
    Ok(taken == 1)
}

/// The class of the session advisory locks that hold projections (`'SPrj'` as an int4); the
/// second key is `hashtext(name)`.
const HOLD_CLASS: i32 = 0x5350_726a;

/// PostgreSQL: takes the session advisory lock of `name` on `conn` (the runner's own connection,
/// which keeps it until released or until the connection ends) and names `owner` as the holder.
/// False when another session holds it.
pub async fn hold(
    conn: &mut sqlx::PgConnection,
    name: &str,
    owner: &str,
) -> Result<bool, sqlx::Error> {
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
        .bind(HOLD_CLASS)
        .bind(name)
        .fetch_one(&mut *conn)
        .await?;
    if locked {
        sqlx::query(
            "UPDATE checkpoints SET owner = $2, lease_expires_at = NULL, updated_at = now() \
             WHERE name = $1",
        )
        .bind(name)
        .bind(owner)
        .execute(&mut *conn)
        .await?;
    }
    Ok(locked)
}

/// PostgreSQL: gives up what [`hold`] took.
pub async fn unhold(
    conn: &mut sqlx::PgConnection,
    name: &str,
    owner: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE checkpoints SET owner = NULL WHERE name = $1 AND owner = $2")
        .bind(name)
        .bind(owner)
        .execute(&mut *conn)
        .await?;
    sqlx::query("SELECT pg_advisory_unlock($1, hashtext($2))")
        .bind(HOLD_CLASS)
        .bind(name)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Gives the lease up.
pub async fn release(pool: &StorePool, name: &str, owner: &str) -> Result<(), sqlx::Error> {
    match pool {
        StorePool::Postgres(pool) => {
            sqlx::query("UPDATE checkpoints SET owner = NULL, lease_expires_at = NULL WHERE name = $1 AND owner = $2")
                .bind(name)
                .bind(owner)
                .execute(pool)
                .await?;
        }
        StorePool::Sqlite(pool) => {
            sqlx::query("UPDATE checkpoints SET owner = NULL, lease_expires_at = NULL WHERE name = ? AND owner = ?")
                .bind(name)
                .bind(owner)
                .execute(pool)
                .await?;
        }
    }
    Ok(())
}

/// Moves the checkpoint inside the transaction that applied the events, if `owner` still holds
/// it. Returns false when the lease was lost (the caller rolls back).
pub async fn advance(
    conn: TxConnection<'_>,
    name: &str,
    owner: &str,
    position: Position,
    applied: i64,
    last_event_at: Option<DateTime<Utc>>,
) -> Result<bool, sqlx::Error> {
    let moved = match conn {
        TxConnection::Postgres(conn) => sqlx::query(
            "UPDATE checkpoints SET position = $3, events_applied = events_applied + $4, \
             last_event_at = COALESCE($5, last_event_at), updated_at = now() \
             WHERE name = $1 AND owner = $2 AND status = 'running'",
        )
        .bind(name)
        .bind(owner)
        .bind(position.0)
        .bind(applied)
        .bind(last_event_at)
        .execute(conn)
        .await?
        .rows_affected(),
        TxConnection::Sqlite(conn) => sqlx::query(
            "UPDATE checkpoints SET position = ?3, events_applied = events_applied + ?4, \
             last_event_at = COALESCE(?5, last_event_at), updated_at = ?6 \
             WHERE name = ?1 AND owner = ?2 AND status = 'running'",
        )
        .bind(name)
        .bind(owner)
        .bind(position.0)
        .bind(applied)
        .bind(last_event_at.map(micros))
        .bind(micros(Utc::now()))
        .execute(conn)
        .await?
        .rows_affected(),
    };
    Ok(moved == 1)
}

/// Claims the rebuild of `name` for `owner`: false when another rebuild is under way, that is,
/// its owner beat its heartbeat within `stale_after` (a rebuild whose process died is taken over
/// after that).
pub async fn claim_rebuild(
    pool: &StorePool,
    name: &str,
    owner: &str,
    stale_after: Duration,
) -> Result<bool, sqlx::Error> {
    let claimed = match pool {
        StorePool::Postgres(pool) => sqlx::query(
            "UPDATE checkpoints SET rebuild_owner = $2, rebuild_heartbeat = now(), \
             rebuild_error = NULL, updated_at = now() \
             WHERE name = $1 AND (rebuild_owner IS NULL \
                   OR rebuild_heartbeat < now() - make_interval(secs => $3))",
        )
        .bind(name)
        .bind(owner)
        .bind(stale_after.as_secs_f64())
        .execute(pool)
        .await?
        .rows_affected(),
        StorePool::Sqlite(pool) => {
            let now = micros(Utc::now());
            sqlx::query(
                "UPDATE checkpoints SET rebuild_owner = ?2, rebuild_heartbeat = ?3, \
                 rebuild_error = NULL, updated_at = ?3 \
                 WHERE name = ?1 AND (rebuild_owner IS NULL OR rebuild_heartbeat < ?4)",
            )
            .bind(name)
            .bind(owner)
            .bind(now)
            .bind(now - stale_after.as_micros() as i64)
            .execute(pool)
            .await?
            .rows_affected()
        }
    };
    Ok(claimed == 1)
}

/// Tells that the rebuild of `name` by `owner` is still alive.
pub async fn beat_rebuild(pool: &StorePool, name: &str, owner: &str) -> Result<(), sqlx::Error> {
    match pool {
        StorePool::Postgres(pool) => {
            sqlx::query(
                "UPDATE checkpoints SET rebuild_heartbeat = now() \
                 WHERE name = $1 AND rebuild_owner = $2",
            )
            .bind(name)
            .bind(owner)
            .execute(pool)
            .await?;
        }
        StorePool::Sqlite(pool) => {
            sqlx::query(
                "UPDATE checkpoints SET rebuild_heartbeat = ?3 \
                 WHERE name = ?1 AND rebuild_owner = ?2",
            )
            .bind(name)
            .bind(owner)
            .bind(micros(Utc::now()))
            .execute(pool)
            .await?;
        }
    }
    Ok(())
}

/// Ends the rebuild of `name` by `owner`, with its error if it failed.
pub async fn end_rebuild(
    pool: &StorePool,
    name: &str,
    owner: &str,
    error: Option<&str>,
) -> Result<(), sqlx::Error> {
    match pool {
        StorePool::Postgres(pool) => {
            sqlx::query(
                "UPDATE checkpoints SET rebuild_owner = NULL, rebuild_heartbeat = NULL, \
                 rebuild_error = $3, updated_at = now() WHERE name = $1 AND rebuild_owner = $2",
            )
            .bind(name)
            .bind(owner)
            .bind(error)
            .execute(pool)
            .await?;
        }
        StorePool::Sqlite(pool) => {
            sqlx::query(
                "UPDATE checkpoints SET rebuild_owner = NULL, rebuild_heartbeat = NULL, \
                 rebuild_error = ?3, updated_at = ?4 WHERE name = ?1 AND rebuild_owner = ?2",
            )
            .bind(name)
            .bind(owner)
            .bind(error)
            .bind(micros(Utc::now()))
            .execute(pool)
            .await?;
        }
    }
    Ok(())
}

/// Sets the status (and failure details, or clears them).
pub async fn set_status(
    pool: &StorePool,
    name: &str,
    status: Status,
    failure: Option<(Position, &str)>,
) -> Result<(), sqlx::Error> {
    let (position, error) = match failure {
        Some((p, e)) => (Some(p.0), Some(e)),
        None => (None, None),
    };
    match pool {
        StorePool::Postgres(pool) => {
            sqlx::query(
                "UPDATE checkpoints SET status = $2, failed_position = $3, error = $4, updated_at = now() \
                 WHERE name = $1",
            )
            .bind(name)
            .bind(status.as_str())
            .bind(position)
            .bind(error)
            .execute(pool)
            .await?;
        }
        StorePool::Sqlite(pool) => {
            sqlx::query(
                "UPDATE checkpoints SET status = ?2, failed_position = ?3, error = ?4, updated_at = ?5 \
                 WHERE name = ?1",
            )
            .bind(name)
            .bind(status.as_str())
            .bind(position)
            .bind(error)
            .bind(micros(Utc::now()))
            .execute(pool)
            .await?;
        }
    }
    Ok(())
}

/// Replaces the checkpoint after a rebuild (in the swapping transaction).
pub async fn reset(
    conn: TxConnection<'_>,
    name: &str,
    position: Position,
    applied: i64,
    last_event_at: Option<DateTime<Utc>>,
) -> Result<(), sqlx::Error> {
    match conn {
        TxConnection::Postgres(conn) => {
            sqlx::query(
                "UPDATE checkpoints SET position = $2, events_applied = $3, last_event_at = $4, \
                 status = 'running', error = NULL, failed_position = NULL, updated_at = now() \
                 WHERE name = $1",
            )
            .bind(name)
            .bind(position.0)
            .bind(applied)
            .bind(last_event_at)
            .execute(conn)
            .await?;
        }
        TxConnection::Sqlite(conn) => {
            sqlx::query(
                "UPDATE checkpoints SET position = ?2, events_applied = ?3, last_event_at = ?4, \
                 status = 'running', error = NULL, failed_position = NULL, updated_at = ?5 \
                 WHERE name = ?1",
            )
            .bind(name)
            .bind(position.0)
            .bind(applied)
            .bind(last_event_at.map(micros))
            .bind(micros(Utc::now()))
            .execute(conn)
            .await?;
        }
    }
    Ok(())
}
