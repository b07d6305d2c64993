//! Checkpoints of projections and process managers: position, status, failure, and the lease that
//! lets one runner at a time (across processes) drive each of them. All checkpoint SQL is here:
//! each statement once per dialect (in `SQL`, or one const where both dialects read alike), and
//! each operation once, run by [`crate::store::sql::Db`], which binds and reads times and lease
//! lengths as each store keeps them.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::log::{Position, TxConnection};
use crate::store::sql::{Db, Dialects, Row};
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

/// The checkpoint statements of one dialect. On SQLite the current time is the parameter after a
/// statement's own (see [`crate::store::sql`]).
struct Statements {
    acquire: &'static str,
    advance: &'static str,
    claim_rebuild: &'static str,
    beat_rebuild: &'static str,
    end_rebuild: &'static str,
    set_status: &'static str,
    reset: &'static str,
}

// The statements that read the same in both dialects.
const ENSURE: &str = "INSERT INTO checkpoints (name) VALUES ($1) ON CONFLICT DO NOTHING";
const LOAD: &str = "SELECT name, position, events_applied, last_event_at, status, error, \
                    failed_position, owner, lease_expires_at, rebuild_owner, rebuild_error \
                    FROM checkpoints WHERE name = $1";
const LIST: &str = "SELECT name, position, events_applied, last_event_at, status, error, \
                    failed_position, owner, lease_expires_at, rebuild_owner, rebuild_error \
                    FROM checkpoints ORDER BY name";
const RELEASE: &str = "UPDATE checkpoints SET owner = NULL, lease_expires_at = NULL \
                       WHERE name = $1 AND owner = $2";

const SQL: Dialects<Statements> = Dialects {
    postgres: Statements {
        acquire: "UPDATE checkpoints SET owner = $2, \
                  lease_expires_at = now() + make_interval(secs => $3), updated_at = now() \
                  WHERE name = $1 AND (owner IS NULL OR owner = $2 OR lease_expires_at < now())",
        advance: "UPDATE checkpoints SET position = $3, events_applied = events_applied + $4, \
                  last_event_at = COALESCE($5, last_event_at), updated_at = now() \
                  WHERE name = $1 AND owner = $2 AND status = 'running' AND position = $6",
        claim_rebuild: "UPDATE checkpoints SET rebuild_owner = $2, rebuild_heartbeat = now(), \
                        rebuild_error = NULL, updated_at = now() \
                        WHERE name = $1 AND (rebuild_owner IS NULL \
                              OR rebuild_heartbeat < now() - make_interval(secs => $3))",
        beat_rebuild: "UPDATE checkpoints SET rebuild_heartbeat = now() \
                       WHERE name = $1 AND rebuild_owner = $2",
        end_rebuild: "UPDATE checkpoints SET rebuild_owner = NULL, rebuild_heartbeat = NULL, \
                      rebuild_error = $3, updated_at = now() \
                      WHERE name = $1 AND rebuild_owner = $2",
        set_status: "UPDATE checkpoints SET status = $2, failed_position = $3, error = $4, \
                     updated_at = now() WHERE name = $1",
        reset: "UPDATE checkpoints SET position = $2, events_applied = $3, last_event_at = $4, \
                status = 'running', error = NULL, failed_position = NULL, updated_at = now() \
                WHERE name = $1",
    },
    sqlite: Statements {
        acquire: "UPDATE checkpoints SET owner = $2, lease_expires_at = $4 + $3, updated_at = $4 \
                  WHERE name = $1 AND (owner IS NULL OR owner = $2 OR lease_expires_at < $4)",
        advance: "UPDATE checkpoints SET position = $3, events_applied = events_applied + $4, \
                  last_event_at = COALESCE($5, last_event_at), updated_at = $7 \
                  WHERE name = $1 AND owner = $2 AND status = 'running' AND position = $6",
        claim_rebuild: "UPDATE checkpoints SET rebuild_owner = $2, rebuild_heartbeat = $4, \
                        rebuild_error = NULL, updated_at = $4 \
                        WHERE name = $1 AND (rebuild_owner IS NULL OR rebuild_heartbeat < $4 - $3)",
        beat_rebuild: "UPDATE checkpoints SET rebuild_heartbeat = $3 \
                       WHERE name = $1 AND rebuild_owner = $2",
        end_rebuild: "UPDATE checkpoints SET rebuild_owner = NULL, rebuild_heartbeat = NULL, \
                      rebuild_error = $3, updated_at = $4 WHERE name = $1 AND rebuild_owner = $2",
        set_status: "UPDATE checkpoints SET status = $2, failed_position = $3, error = $4, \
                     updated_at = $5 WHERE name = $1",
        reset: "UPDATE checkpoints SET position = $2, events_applied = $3, last_event_at = $4, \
                status = 'running', error = NULL, failed_position = NULL, updated_at = $5 \
                WHERE name = $1",
    },
};

// PostgreSQL only: the holds of `hold` and `unhold`.
const HOLD: &str = "SELECT pg_try_advisory_lock($1, hashtext($2))";
const NAME_HOLDER: &str = "UPDATE checkpoints SET owner = $2, lease_expires_at = NULL, \
                           updated_at = now() WHERE name = $1";
const UNNAME_HOLDER: &str = "UPDATE checkpoints SET owner = NULL WHERE name = $1 AND owner = $2";
const UNHOLD: &str = "SELECT pg_advisory_unlock($1, hashtext($2))";

fn checkpoint(row: &Row) -> Result<Checkpoint, sqlx::Error> {
    Ok(Checkpoint {
        name: row.get("name")?,
        position: Position(row.get("position")?),
        events_applied: row.get("events_applied")?,
        last_event_at: row.optional_time("last_event_at")?,
        status: Status::parse(&row.get::<String>("status")?),
        error: row.get("error")?,
        failed_position: row.get::<Option<i64>>("failed_position")?.map(Position),
        owner: row.get("owner")?,
        lease_expires_at: row.optional_time("lease_expires_at")?,
        rebuild_owner: row.get("rebuild_owner")?,
        rebuild_error: row.get("rebuild_error")?,
    })
}

/// Creates the checkpoint if missing.
pub async fn ensure(pool: &StorePool, name: &str) -> Result<(), sqlx::Error> {
    Db::from(pool).execute(ENSURE, &[name.into()]).await?;
    Ok(())
}

pub async fn load(pool: &StorePool, name: &str) -> Result<Option<Checkpoint>, sqlx::Error> {
    let row = Db::from(pool).fetch_optional(LOAD, &[name.into()]).await?;
    row.as_ref().map(checkpoint).transpose()
}

pub async fn list(pool: &StorePool) -> Result<Vec<Checkpoint>, sqlx::Error> {
    let rows = Db::from(pool).fetch_all(LIST, &[]).await?;
    rows.iter().map(checkpoint).collect()
}

/// Takes or renews the lease of `name` for `owner`; false when another live owner holds it.
pub async fn acquire(
    pool: &StorePool,
    name: &str,
    owner: &str,
    lease: Duration,
) -> Result<bool, sqlx::Error> {
    let mut db = Db::from(pool);
    let values = [name.into(), owner.into(), lease.into()];
    Ok(db.execute(db.pick(&SQL).acquire, &values).await? == 1)
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
    let locked: bool = sqlx::query_scalar(HOLD)
        .bind(HOLD_CLASS)
        .bind(name)
        .fetch_one(&mut *conn)
        .await?;
    if locked {
        sqlx::query(NAME_HOLDER)
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
    sqlx::query(UNNAME_HOLDER)
        .bind(name)
        .bind(owner)
        .execute(&mut *conn)
        .await?;
    sqlx::query(UNHOLD)
        .bind(HOLD_CLASS)
        .bind(name)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Gives the lease up.
pub async fn release(pool: &StorePool, name: &str, owner: &str) -> Result<(), sqlx::Error> {
    Db::from(pool)
        .execute(RELEASE, &[name.into(), owner.into()])
        .await?;
    Ok(())
}

/// Moves the checkpoint from `from` to `position` inside the transaction that applied the
/// events, if `owner` still holds it, it is running and still at `from`. Returns false
/// otherwise (the lease was lost, the projection paused, or someone moved it): the caller rolls
/// back and reads the checkpoint again.
pub async fn advance(
    conn: TxConnection<'_>,
    name: &str,
    owner: &str,
    (from, position): (Position, Position),
    applied: i64,
    last_event_at: Option<DateTime<Utc>>,
) -> Result<bool, sqlx::Error> {
    let mut db = Db::from(conn);
    let values = [
        name.into(),
        owner.into(),
        position.0.into(),
        applied.into(),
        last_event_at.into(),
        from.0.into(),
    ];
    Ok(db.execute(db.pick(&SQL).advance, &values).await? == 1)
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
    let mut db = Db::from(pool);
    let values = [name.into(), owner.into(), stale_after.into()];
    Ok(db.execute(db.pick(&SQL).claim_rebuild, &values).await? == 1)
}

/// Tells that the rebuild of `name` by `owner` is still alive.
pub async fn beat_rebuild(pool: &StorePool, name: &str, owner: &str) -> Result<(), sqlx::Error> {
    let mut db = Db::from(pool);
    db.execute(db.pick(&SQL).beat_rebuild, &[name.into(), owner.into()])
        .await?;
    Ok(())
}

/// Ends the rebuild of `name` by `owner`, with its error if it failed.
pub async fn end_rebuild(
    pool: &StorePool,
    name: &str,
    owner: &str,
    error: Option<&str>,
) -> Result<(), sqlx::Error> {
    let mut db = Db::from(pool);
    let values = [name.into(), owner.into(), error.into()];
    db.execute(db.pick(&SQL).end_rebuild, &values).await?;
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
    let mut db = Db::from(pool);
    let values = [
        name.into(),
        status.as_str().into(),
        position.into(),
        error.into(),
    ];
    db.execute(db.pick(&SQL).set_status, &values).await?;
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
    let mut db = Db::from(conn);
    let values = [
        name.into(),
        position.0.into(),
        applied.into(),
        last_event_at.into(),
    ];
    db.execute(db.pick(&SQL).reset, &values).await?;
    Ok(())
}
