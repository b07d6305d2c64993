//! The job queue of the embedded store. SQLite has one writer, so claims need no row locks: a
//! claim is one `UPDATE … RETURNING` on the store's writer connection. Times are stored as
//! microseconds since the epoch. Workers in this process are woken directly; other processes poll.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{SqlitePool, SqliteRow};
use sqlx::{Connection, Row, Sqlite, SqliteConnection};
use tokio::sync::watch;
use uuid::Uuid;

use super::{
    AttemptError, Enqueued, Job, JobFilter, JobQueue, JobState, NewJob, Outcome, QueueError,
};
use crate::log::{LogTransaction, TxConnection};
use crate::notify::bump;

const JOB_COLUMNS: &str = "id, queue, kind, payload, state, priority, run_at, attempt, \
    max_attempts, timeout_ms, lease_expires_at, locked_by, ordering_key, idempotency_key, \
    last_error, errors, created_at, updated_at, finished_at";

/// The job queue on the embedded store's writer connection.
pub struct SqliteJobQueue {
    pool: SqlitePool,
    wakeups: watch::Sender<u64>,
}

impl SqliteJobQueue {
    /// `pool` is the store's single writer connection (see [`crate::store::StorePool`]).
    pub fn new(pool: SqlitePool) -> Self {
        Self {
            pool,
            wakeups: watch::channel(0).0,
        }
    }

    /// Wakes this queue's workers: for jobs another writer enqueued (see
    /// [`crate::EventLog::append_with_jobs`]).
    pub(crate) fn wake_hook(&self) -> crate::log::WakeQueues {
        let wakeups = self.wakeups.clone();
        std::sync::Arc::new(move |_queues: &[String]| bump(&wakeups))
    }
}

/// The writer connection with commits that do not wait for the disk flush, for a worker's
/// claims, lease extensions and outcomes (why that loses no guarantee: `ARCHITECTURE.md`, "Which
/// commits wait for the disk"). In WAL mode a `synchronous = NORMAL` commit is flushed with the
/// next `FULL` one, in order. SQLite changes the setting only outside transactions, per
/// connection: [`Unflushed::done`] sets `FULL` again, and a connection dropped before that (an
/// error, a cancelled call) is closed, never handed to a durable writer with `NORMAL`.
struct Unflushed(Option<PoolConnection<Sqlite>>);

impl Unflushed {
    async fn acquire(pool: &SqlitePool) -> Result<Self, sqlx::Error> {
        let mut conn = Unflushed(Some(pool.acquire().await?));
        sqlx::query("PRAGMA synchronous = NORMAL")
            .execute(conn.connection())
            .await?;
        Ok(conn)
    }

    fn connection(&mut self) -> &mut SqliteConnection {
        self.0.as_mut().expect("held until done")
    }

    async fn done(mut self) -> Result<(), sqlx::Error> {
        sqlx::query("PRAGMA synchronous = FULL")
            .execute(self.connection())
            .await?;
        // Back to the pool as it came.
        drop(self.0.take());
        Ok(())
    }
}

impl Drop for Unflushed {
    fn drop(&mut self) {
        if let Some(conn) = self.0.as_mut() {
            conn.close_on_drop();
        }
    }
}

fn micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

fn job_from_row(row: &SqliteRow) -> Result<Job, QueueError> {
    let id: String = row.try_get("id")?;
    let corrupt = |reason: String| QueueError::Corrupt {
        id: id.clone(),
        reason,
    };
    let payload: String = row.try_get("payload")?;
    let errors: String = row.try_get("errors")?;
    let state: String = row.try_get("state")?;
    let time = |column: &str| -> Result<Option<DateTime<Utc>>, QueueError> {
        Ok(row.try_get::<Option<i64>, _>(column)?.map(from_micros))
    };
    Ok(Job {
        id: Uuid::parse_str(&id).map_err(|e| corrupt(e.to_string()))?,
        queue: row.try_get("queue")?,
        kind: row.try_get("kind")?,
        payload: serde_json::from_str(&payload).map_err(|e| corrupt(format!("payload: {e}")))?,
        state: state.parse().map_err(corrupt)?,
        priority: row.try_get("priority")?,
        run_at: from_micros(row.try_get("run_at")?),
        attempt: row.try_get("attempt")?,
        max_attempts: row.try_get("max_attempts")?,
        timeout_ms: row.try_get("timeout_ms")?,
        lease_expires_at: time("lease_expires_at")?,
        locked_by: row.try_get("locked_by")?,
        ordering_key: row.try_get("ordering_key")?,
        idempotency_key: row.try_get("idempotency_key")?,
        last_error: row.try_get("last_error")?,
        errors: serde_json::from_str::<Vec<AttemptError>>(&errors)
            .map_err(|e| corrupt(format!("errors: {e}")))?,
        created_at: from_micros(row.try_get("created_at")?),
        updated_at: from_micros(row.try_get("updated_at")?),
        finished_at: time("finished_at")?,
    })
}

pub(crate) async fn enqueue_on(
    conn: &mut SqliteConnection,
    jobs: Vec<NewJob>,
) -> Result<Vec<Enqueued>, QueueError> {
    super::validate(&jobs)?;
    let now = micros(Utc::now());
    let insert = format!(
        "INSERT INTO jobs (id, queue, kind, payload, priority, run_at, max_attempts, timeout_ms, \
         ordering_key, idempotency_key, created_at, updated_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
         ON CONFLICT (idempotency_key) \
            WHERE idempotency_key IS NOT NULL AND state IN ('available', 'running') DO NOTHING \
         RETURNING {JOB_COLUMNS}"
    );
    let existing = format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE idempotency_key = ? \
         AND state IN ('available', 'running')"
    );
    let mut results = Vec::with_capacity(jobs.len());
    for job in jobs {
        let payload =
            serde_json::to_string(&job.payload).map_err(|e| QueueError::Invalid(e.to_string()))?;
        let row = sqlx::query(&insert)
            .bind(Uuid::now_v7().to_string())
            .bind(&job.queue)
            .bind(&job.kind)
            .bind(payload)
            .bind(job.priority)
            .bind(job.run_at.map_or(now, micros))
            .bind(job.max_attempts)
            .bind(job.timeout.as_millis().min(i64::MAX as u128) as i64)
            .bind(&job.ordering_key)
            .bind(&job.idempotency_key)
            .bind(now)
            .bind(now)
            .fetch_optional(&mut *conn)
            .await?;
        results.push(match row {
            Some(row) => Enqueued::Inserted(job_from_row(&row)?),
            None => {
                let row = sqlx::query(&existing)
                    .bind(&job.idempotency_key)
                    .fetch_one(&mut *conn)
                    .await?;
                Enqueued::Existing(job_from_row(&row)?)
            }
        });
    }
    Ok(results)
}

/// Claims a job just enqueued in the same transaction for the worker it is handed off to (see
/// [`super::handoff`]).
pub(crate) async fn claim_handed(
    conn: &mut SqliteConnection,
    id: Uuid,
    worker: &str,
    lease: Duration,
) -> Result<Option<Job>, QueueError> {
    let now = micros(Utc::now());
    let sql = format!(
        "UPDATE jobs SET state = 'running', attempt = attempt + 1, locked_by = ?2, \
                lease_expires_at = ?3, updated_at = ?4 \
         WHERE id = ?1 AND state = 'available' RETURNING {JOB_COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(id.to_string())
        .bind(worker)
        .bind(now + lease.as_micros() as i64)
        .bind(now)
        .fetch_optional(&mut *conn)
        .await?;
    row.as_ref().map(job_from_row).transpose()
}

/// Records running jobs completed, each only while its worker holds it, in the caller's
/// transaction (an append's: see [`super::completing`]).
pub(crate) async fn complete_on(
    conn: &mut SqliteConnection,
    jobs: &[&super::handoff::Completes],
) -> Result<(), QueueError> {
    if jobs.is_empty() {
        return Ok(());
    }
    let held: Vec<(String, &str)> = jobs
        .iter()
        .map(|c| (c.job().to_string(), c.worker()))
        .collect();
    // One statement for the group: `[[id, worker], …]`.
    sqlx::query(
        "UPDATE jobs SET state = 'completed', finished_at = ?1, updated_at = ?1, \
         lease_expires_at = NULL, locked_by = NULL \
         WHERE id IN (SELECT value ->> 0 FROM json_each(?2)) AND state = 'running' \
           AND locked_by = (SELECT h.value ->> 1 FROM json_each(?2) AS h \
                            WHERE h.value ->> 0 = jobs.id)",
    )
    .bind(micros(Utc::now()))
    .bind(serde_json::to_string(&held).map_err(|e| QueueError::Invalid(e.to_string()))?)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[async_trait]
impl JobQueue for SqliteJobQueue {
    async fn enqueue(&self, jobs: Vec<NewJob>) -> Result<Vec<Enqueued>, QueueError> {
        let mut tx = crate::store::begin_to_the_end(&self.pool, "BEGIN IMMEDIATE").await?;
        let enqueued = enqueue_on(&mut tx, jobs).await?;
        tx.commit().await?;
        bump(&self.wakeups);
        Ok(enqueued)
    }

    async fn enqueue_in(
        &self,
        tx: &mut dyn LogTransaction,
        jobs: Vec<NewJob>,
    ) -> Result<Vec<Enqueued>, QueueError> {
        let TxConnection::Sqlite(conn) = tx.connection() else {
            return Err(QueueError::ForeignTransaction);
        };
        let enqueued = enqueue_on(conn, jobs).await?;
        let wakeups = self.wakeups.clone();
        tx.after_commit(Box::new(move || bump(&wakeups)));
        Ok(enqueued)
    }

    async fn claim(
        &self,
        queue: &str,
        worker: &str,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<Job>, QueueError> {
        let now = micros(Utc::now());
        let sql = format!(
            "UPDATE jobs SET state = 'running', attempt = attempt + 1, locked_by = ?3, \
                    lease_expires_at = ?4, updated_at = ?5 \
             WHERE seq IN ( \
                SELECT j.seq FROM jobs j \
                WHERE j.state = 'available' AND j.queue = ?1 AND j.run_at <= ?5 \
                  AND (j.ordering_key IS NULL OR NOT EXISTS ( \
                        SELECT 1 FROM jobs o \
                        WHERE o.ordering_key = j.ordering_key AND o.seq < j.seq \
                          AND o.state IN ('available', 'running'))) \
                ORDER BY j.priority DESC, j.run_at, j.seq LIMIT ?2) \
             RETURNING {JOB_COLUMNS}"
        );
        let mut unflushed = Unflushed::acquire(&self.pool).await?;
        let rows = sqlx::query(&sql)
            .bind(queue)
            .bind(limit as i64)
            .bind(worker)
            .bind(now + lease.as_micros() as i64)
            .bind(now)
            .fetch_all(unflushed.connection())
            .await?;
        unflushed.done().await?;
        let mut jobs = rows
            .iter()
            .map(job_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        super::in_claim_order(&mut jobs);
        Ok(jobs)
    }

    async fn extend_leases(
        &self,
        worker: &str,
        ids: &[Uuid],
        lease: Duration,
    ) -> Result<Vec<Uuid>, QueueError> {
        let now = micros(Utc::now());
        let mut lost = Vec::new();
        let mut unflushed = Unflushed::acquire(&self.pool).await?;
        let mut tx = unflushed.connection().begin_with("BEGIN IMMEDIATE").await?;
        for id in ids {
            let extended = sqlx::query(
                "UPDATE jobs SET lease_expires_at = ?, updated_at = ? \
                 WHERE id = ? AND state = 'running' AND locked_by = ?",
            )
            .bind(now + lease.as_micros() as i64)
            .bind(now)
            .bind(id.to_string())
            .bind(worker)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if extended == 0 {
                lost.push(*id);
            }
        }
        tx.commit().await?;
        unflushed.done().await?;
        Ok(lost)
    }

    async fn finish(&self, worker: &str, outcomes: Vec<(Uuid, Outcome)>) -> Result<(), QueueError> {
        let now = micros(Utc::now());
        let at = Utc::now().to_rfc3339();
        let mut wake = false;
        let mut unflushed = Unflushed::acquire(&self.pool).await?;
        let mut tx = unflushed.connection().begin_with("BEGIN IMMEDIATE").await?;
        // Completions, the common case, in one statement.
        let (completed, outcomes): (Vec<_>, Vec<_>) = outcomes
            .into_iter()
            .partition(|(_, outcome)| *outcome == Outcome::Completed);
        if !completed.is_empty() {
            wake = true;
            let ids: Vec<String> = completed.iter().map(|(id, _)| id.to_string()).collect();
            sqlx::query(
                "UPDATE jobs SET state = 'completed', finished_at = ?1, updated_at = ?1, \
                 lease_expires_at = NULL, locked_by = NULL \
                 WHERE id IN (SELECT value FROM json_each(?2)) AND state = 'running' \
                   AND locked_by = ?3",
            )
            .bind(now)
            .bind(serde_json::to_string(&ids).map_err(|e| QueueError::Invalid(e.to_string()))?)
            .bind(worker)
            .execute(&mut *tx)
            .await?;
        }
        for (id, outcome) in outcomes {
            let id = id.to_string();
            let query = match &outcome {
                Outcome::Completed => {
                    wake = true;
                    sqlx::query(
                        "UPDATE jobs SET state = 'completed', finished_at = ?1, updated_at = ?1, \
                         lease_expires_at = NULL, locked_by = NULL \
                         WHERE id = ?2 AND state = 'running' AND locked_by = ?3",
                    )
                    .bind(now)
                }
                Outcome::Failed { .. } => sqlx::query(
                    // Retry after exponential backoff with ±10% jitter (capped at an hour), or
                    // dead after the last allowed attempt; every attempt's error is kept.
                    "UPDATE jobs SET \
                        state = CASE WHEN attempt >= max_attempts THEN 'dead' ELSE 'available' END, \
                        run_at = CASE WHEN attempt >= max_attempts THEN run_at \
                                 ELSE ?1 + CAST(min(1 << min(attempt, 20), 3600) * 1000000.0 \
                                      * (0.9 + (abs(random()) % 1000) / 5000.0) AS INTEGER) END, \
                        finished_at = CASE WHEN attempt >= max_attempts THEN ?1 END, \
                        last_error = ?4, \
                        errors = json_insert(errors, '$[#]', \
                            json_object('attempt', attempt, 'at', ?5, 'error', ?4)), \
                        lease_expires_at = NULL, locked_by = NULL, updated_at = ?1 \
                     WHERE id = ?2 AND state = 'running' AND locked_by = ?3",
                )
                .bind(now),
                Outcome::Snoozed { .. } => sqlx::query(
                    "UPDATE jobs SET state = 'available', run_at = ?4, attempt = attempt - 1, \
                     lease_expires_at = NULL, locked_by = NULL, updated_at = ?1 \
                     WHERE id = ?2 AND state = 'running' AND locked_by = ?3",
                )
                .bind(now),
                Outcome::Cancelled { .. } => {
                    wake = true;
                    sqlx::query(
                        "UPDATE jobs SET state = 'cancelled', finished_at = ?1, last_error = ?4, \
                         lease_expires_at = NULL, locked_by = NULL, updated_at = ?1 \
                         WHERE id = ?2 AND state = 'running' AND locked_by = ?3",
                    )
                    .bind(now)
                }
            };
            let query = query.bind(&id).bind(worker);
            let query = match outcome {
                Outcome::Completed => query,
                Outcome::Failed { error } => query.bind(error).bind(at.clone()),
                Outcome::Snoozed { until } => query.bind(micros(until)),
                Outcome::Cancelled { reason } => query.bind(reason),
            };
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        unflushed.done().await?;
        if wake {
            bump(&self.wakeups);
        }
        Ok(())
    }

    async fn rescue_expired(&self) -> Result<usize, QueueError> {
        let now = micros(Utc::now());
        let rescued = sqlx::query(
            "UPDATE jobs SET \
                state = CASE WHEN attempt >= max_attempts THEN 'dead' ELSE 'available' END, \
                run_at = ?1, \
                finished_at = CASE WHEN attempt >= max_attempts THEN ?1 END, \
                last_error = 'lease expired: the worker running it stopped', \
                errors = json_insert(errors, '$[#]', json_object('attempt', attempt, 'at', ?2, \
                    'error', 'lease expired: the worker running it stopped')), \
                lease_expires_at = NULL, locked_by = NULL, updated_at = ?1 \
             WHERE state = 'running' AND lease_expires_at < ?1",
        )
        .bind(now)
        .bind(Utc::now().to_rfc3339())
        .execute(&self.pool)
        .await?
        .rows_affected() as usize;
        if rescued > 0 {
            bump(&self.wakeups);
        }
        Ok(rescued)
    }

    async fn cancel(&self, id: Uuid) -> Result<Job, QueueError> {
        let sql = format!(
            "UPDATE jobs SET state = 'cancelled', finished_at = ?1, updated_at = ?1, \
             lease_expires_at = NULL, locked_by = NULL, last_error = 'cancelled' \
             WHERE id = ?2 AND state IN ('available', 'running') RETURNING {JOB_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(micros(Utc::now()))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(row) => {
                bump(&self.wakeups);
                job_from_row(&row)
            }
            None => Err(super::refusal(self, id, "cancel").await),
        }
    }

    async fn depth(&self) -> Result<Vec<(String, JobState, i64)>, QueueError> {
        super::depth_of(sqlx::query_as(super::DEPTH).fetch_all(&self.pool).await?)
    }

    async fn cancel_keyed(&self, keys: &[String]) -> Result<Vec<Job>, QueueError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "UPDATE jobs SET state = 'cancelled', finished_at = ?1, updated_at = ?1, \
             lease_expires_at = NULL, locked_by = NULL, last_error = 'cancelled' \
             WHERE idempotency_key IN (SELECT value FROM json_each(?2)) \
             AND state IN ('available', 'running') RETURNING {JOB_COLUMNS}"
        );
        let keys = serde_json::to_string(keys).map_err(|e| QueueError::Invalid(e.to_string()))?;
        let rows = sqlx::query(&sql)
            .bind(micros(Utc::now()))
            .bind(keys)
            .fetch_all(&self.pool)
            .await?;
        if !rows.is_empty() {
            bump(&self.wakeups);
        }
        rows.iter().map(job_from_row).collect()
    }

    async fn retry(&self, id: Uuid) -> Result<Job, QueueError> {
        let sql = format!(
            "UPDATE jobs SET state = 'available', run_at = ?1, attempt = 0, finished_at = NULL, \
             updated_at = ?1 WHERE id = ?2 AND state IN ('dead', 'cancelled') \
             RETURNING {JOB_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(micros(Utc::now()))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await;
        match row {
            Ok(Some(row)) => {
                bump(&self.wakeups);
                job_from_row(&row)
            }
            Ok(None) => Err(super::refusal(self, id, "retry").await),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(QueueError::Invalid(
                format!("job {id}: another job with its idempotency key is unfinished"),
            )),
            Err(e) => Err(e.into()),
        }
    }

    async fn get(&self, id: Uuid) -> Result<Option<Job>, QueueError> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?");
        sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(job_from_row)
            .transpose()
    }

    async fn list(&self, filter: JobFilter) -> Result<Vec<Job>, QueueError> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs \
             WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR queue = ?2) \
               AND (?3 IS NULL OR kind = ?3) \
             ORDER BY seq DESC LIMIT ?4"
        );
        sqlx::query(&sql)
            .bind(filter.state.map(JobState::as_str))
            .bind(filter.queue)
            .bind(filter.kind)
            .bind(filter.limit.max(1) as i64)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(job_from_row)
            .collect()
    }

    async fn prune(&self, before: DateTime<Utc>) -> Result<u64, QueueError> {
        Ok(sqlx::query(
            "DELETE FROM jobs WHERE state IN ('completed', 'cancelled') AND finished_at < ?",
        )
        .bind(micros(before))
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    fn wakeups(&self) -> watch::Receiver<u64> {
        self.wakeups.subscribe()
    }

    async fn close(&self) {}
}
