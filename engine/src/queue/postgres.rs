//! The job queue on PostgreSQL: claims take batches with `FOR UPDATE SKIP LOCKED`, outcomes are
//! written in batches, and enqueues wake workers in other processes with `NOTIFY stele_jobs`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgPool, PgRow};
use sqlx::types::Json;
use sqlx::{PgConnection, Postgres, Row};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::{
    AttemptError, Enqueued, Job, JobFilter, JobQueue, JobState, NewJob, Outcome, QueueError,
};
use crate::log::{LogTransaction, TxConnection};
use crate::notify::Waker;

const CHANNEL: &str = "stele_jobs";

const JOB_COLUMNS: &str = "id, queue, kind, payload, state, priority, run_at, attempt, \
    max_attempts, timeout_ms, lease_expires_at, locked_by, ordering_key, idempotency_key, \
    last_error, errors, created_at, updated_at, finished_at";

const ENQUEUE: &str = "\
    INSERT INTO jobs (id, queue, kind, payload, priority, run_at, max_attempts, timeout_ms, \
                      ordering_key, idempotency_key) \
    SELECT u.id, u.queue, u.kind, u.payload::jsonb, u.priority, COALESCE(u.run_at, now()), \
           u.max_attempts, u.timeout_ms, u.ordering_key, u.idempotency_key \
    FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int2[], $6::timestamptz[], \
                $7::int4[], $8::int8[], $9::text[], $10::text[]) \
         AS u(id, queue, kind, payload, priority, run_at, max_attempts, timeout_ms, \
              ordering_key, idempotency_key) \
    ON CONFLICT (idempotency_key) \
        WHERE idempotency_key IS NOT NULL AND state IN ('available', 'running') DO NOTHING \
    RETURNING *";

/// Runnable = available, due, and the oldest unfinished job of its ordering key. A claim looks at
/// the first `$2` + `$5` available jobs not known to be waiting, in claim order, claims the first
/// `$2` runnable ones and marks the others waiting (see [`release_next_sql`]):
/// later claims pass them by through the claim index instead of checking each again, which with
/// a backlog behind a few ordering keys (a chat's messages) cost most of a claim. The picked ids
/// go through `ANY(ARRAY(…))` so the updates find them by primary key (a join with the CTE is
/// planned as a hash join over the whole table). The last columns count the jobs looked at,
/// `seen`, and those marked, `newly_waiting` (one row with the job columns NULL when none was
/// claimed).
///
/// A job is marked waiting only behind an older job of its key that is *available* as committed
/// and not locked (`FOR SHARE SKIP LOCKED`), never behind a running one: that job can then be
/// claimed only after this claim commits, so the statement that ends it, which clears the mark
/// of the job after it (see [`release_next_sql`]), starts after the mark and sees it. (Behind a
/// running job the mark could be missed by its ending statement, whose snapshot may predate
/// the marked job.) So the one job right behind a running one is checked by each claim, the
/// others behind it are passed by. The claim waits for no lock, so it cannot deadlock with
/// ending statements.
///
/// Like [`EXTEND`] and [`COMPLETE`], it commits without waiting for the flush (see
/// [`unflushed`]): `set_config(…, true)` sets `synchronous_commit` for the statement's own
/// transaction, whose commit reads it, in one round trip instead of three (`BEGIN; SET LOCAL`,
/// the statement, `COMMIT`).
const CLAIM: &str = "\
    WITH unflushed AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true)), \
    candidates AS MATERIALIZED ( \
        SELECT j.id, j.priority, j.run_at, j.seq, \
               j.ordering_key IS NULL OR NOT EXISTS ( \
                   SELECT FROM jobs o \
                   WHERE o.ordering_key = j.ordering_key AND o.seq < j.seq \
                     AND o.state IN ('available', 'running')) AS runnable \
        FROM jobs j \
        WHERE EXISTS (SELECT FROM unflushed) AND j.state = 'available' AND NOT j.waiting \
          AND j.queue = $1 AND j.run_at <= now() \
        ORDER BY j.priority DESC, j.run_at, j.seq \
        LIMIT $2 + $5 \
        FOR UPDATE SKIP LOCKED), \
    claimed AS ( \
        UPDATE jobs SET state = 'running', attempt = attempt + 1, locked_by = $3, \
               lease_expires_at = now() + make_interval(secs => $4), updated_at = now() \
        WHERE id = ANY(ARRAY( \
            SELECT id FROM candidates WHERE runnable \
            ORDER BY priority DESC, run_at, seq LIMIT $2)) \
        RETURNING *), \
    marked AS ( \
        UPDATE jobs SET waiting = true \
        WHERE id = ANY(ARRAY(SELECT id FROM candidates WHERE NOT runnable)) \
          AND EXISTS ( \
              SELECT FROM jobs o \
              WHERE o.ordering_key = jobs.ordering_key AND o.seq < jobs.seq \
                AND o.state = 'available' \
              FOR SHARE SKIP LOCKED) \
        RETURNING 1) \
    SELECT claimed.*, m.seen, m.newly_waiting \
    FROM (SELECT (SELECT count(*) FROM candidates) AS seen, \
                 (SELECT count(*) FROM marked) AS newly_waiting) m \
    LEFT JOIN claimed ON true";

/// How many jobs past the ones it may claim a claim looks at when it goes on after coming back
/// short with every job it looked at taken or waiting (see [`CLAIM`]); doubled each time, up to
/// [`CLAIM_WINDOW_MAX`].
const CLAIM_WINDOW: i64 = 32;
const CLAIM_WINDOW_MAX: i64 = 1024;

/// Clears the waiting mark of the job after each finished job of the CTE or subquery
/// `$finished` (columns `ordering_key`, `seq`) that had an ordering key: its next unfinished job,
/// which may now run. Written whether or not marked as seen: a claim may mark it concurrently
/// (behind another available job of the key, see [`CLAIM`]), and PostgreSQL re-reads a row
/// changed since the statement's snapshot before updating it. Returns the next job's queue.
/// One case is left to the lease rescue's [`RELEASE_STRAYS`]: an *available* job cancelled while
/// a claim marks the job behind it, when that job was enqueued after the cancelling statement
/// began (it is not in its snapshot).
macro_rules! release_next_sql {
    ($finished:literal) => {
        concat!(
            "UPDATE jobs SET waiting = false ",
            "WHERE state = 'available' AND id = ANY(ARRAY( ",
            "    SELECT (SELECT n.id FROM jobs n ",
            "            WHERE n.ordering_key = f.ordering_key AND n.seq > f.seq ",
            "              AND n.state IN ('available', 'running') ",
            "            ORDER BY n.seq LIMIT 1) ",
            "    FROM ",
            $finished,
            " f WHERE f.ordering_key IS NOT NULL)) ",
            "RETURNING queue"
        )
    };
}
pub(crate) use release_next_sql;

/// Clears stray waiting marks: those of jobs no unfinished job of their key is ahead of any more
/// (a job finished by a path that does not release its successor, such as an operator's SQL).
/// Run with the lease rescue; the finishing statements release the next job themselves.
const RELEASE_STRAYS: &str = "\
    UPDATE jobs SET waiting = false \
    WHERE waiting AND state = 'available' AND ordering_key IS NOT NULL AND NOT EXISTS ( \
        SELECT FROM jobs o \
        WHERE o.ordering_key = jobs.ordering_key AND o.seq < jobs.seq \
          AND o.state IN ('available', 'running'))";

/// A job whose row another transaction holds (an append completing it, see
/// [`super::completing`]) is passed by rather than waited for: waiting on it while holding others
/// in another order than that transaction deadlocks. Its lease is extended next time if it is still
/// running then. Lost are the jobs no longer running under this worker as committed (the
/// statement's snapshot: what the update does is not in it).
const EXTEND: &str = "\
    WITH unflushed AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true)), \
    extended AS ( \
        UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $3), updated_at = now() \
        WHERE EXISTS (SELECT FROM unflushed) AND id IN ( \
            SELECT id FROM jobs WHERE id = ANY($1) AND state = 'running' AND locked_by = $2 \
            FOR UPDATE SKIP LOCKED)) \
    SELECT u.id FROM UNNEST($1::uuid[]) AS u(id) \
    WHERE NOT EXISTS ( \
        SELECT FROM jobs j WHERE j.id = u.id AND j.state = 'running' AND j.locked_by = $2)";

/// Returns the queues of the jobs that may now run as the completed ones had an ordering key.
const COMPLETE: &str = concat!(
    "WITH unflushed AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true)), ",
    "done AS ( ",
    "    UPDATE jobs SET state = 'completed', finished_at = now(), updated_at = now(), ",
    "           lease_expires_at = NULL, locked_by = NULL ",
    "    WHERE EXISTS (SELECT FROM unflushed) AND id = ANY($1) AND state = 'running' ",
    "      AND locked_by = $2 ",
    "    RETURNING ordering_key, seq), ",
    "released AS (",
    release_next_sql!("done"),
    ") SELECT COALESCE(array_agg(DISTINCT queue), '{}') FROM released"
);

/// Completes the jobs of the parameter `$ids` (uuid[]), each while the worker of the parameter
/// `$workers` (text[]) holds it: an append's own jobs (see [`super::completing`]). Two CTEs,
/// `completed` and `released` (see [`release_next_sql`]), to go into a `WITH`.
macro_rules! complete_held_sql {
    ($ids:literal, $workers:literal) => {
        concat!(
            "completed AS (",
            "UPDATE jobs SET state = 'completed', finished_at = now(), updated_at = now(), ",
            "       lease_expires_at = NULL, locked_by = NULL ",
            "FROM UNNEST(",
            $ids,
            "::uuid[], ",
            $workers,
            "::text[]) AS d(id, worker) ",
            "WHERE jobs.id = d.id AND jobs.state = 'running' AND jobs.locked_by = d.worker ",
            "RETURNING jobs.ordering_key, jobs.seq), ",
            "released AS (",
            crate::queue::postgres::release_next_sql!("completed"),
            ")"
        )
    };
}
pub(crate) use complete_held_sql;

const COMPLETE_HELD: &str = concat!(
    "WITH ",
    complete_held_sql!("$1", "$2"),
    " SELECT count(*) FROM released"
);

/// A failed attempt: retry after exponential backoff with ±10% jitter (capped at an hour), or
/// dead when it was the last allowed attempt. Every attempt's error is kept.
const FAIL: &str = concat!(
    "WITH failed AS ( ",
    "UPDATE jobs SET ",
    "    state = CASE WHEN jobs.attempt >= jobs.max_attempts THEN 'dead' ELSE 'available' END, ",
    "    run_at = CASE WHEN jobs.attempt >= jobs.max_attempts THEN jobs.run_at ",
    "                  ELSE now() + make_interval(secs => ",
    "                       least(power(2, least(jobs.attempt, 20)), 3600) * (0.9 + random() * 0.2)) ",
    "             END, ",
    "    finished_at = CASE WHEN jobs.attempt >= jobs.max_attempts THEN now() END, ",
    "    last_error = u.error, ",
    "    errors = jobs.errors || jsonb_build_array(jsonb_build_object( ",
    "        'attempt', jobs.attempt, 'at', now(), 'error', u.error)), ",
    "    lease_expires_at = NULL, locked_by = NULL, updated_at = now() ",
    "FROM UNNEST($1::uuid[], $2::text[]) AS u(id, error) ",
    "WHERE jobs.id = u.id AND jobs.state = 'running' AND jobs.locked_by = $3 ",
    "RETURNING jobs.state, jobs.ordering_key, jobs.seq), ",
    "released AS (",
    release_next_sql!("(SELECT * FROM failed WHERE state = 'dead')"),
    ") SELECT COALESCE(array_agg(DISTINCT queue), '{}') FROM released"
);

const SNOOZE: &str = "\
    UPDATE jobs SET state = 'available', run_at = u.until, attempt = jobs.attempt - 1, \
           lease_expires_at = NULL, locked_by = NULL, updated_at = now() \
    FROM UNNEST($1::uuid[], $2::timestamptz[]) AS u(id, until) \
    WHERE jobs.id = u.id AND jobs.state = 'running' AND jobs.locked_by = $3";

const GIVE_UP: &str = concat!(
    "WITH given_up AS ( ",
    "UPDATE jobs SET state = 'cancelled', finished_at = now(), last_error = u.reason, ",
    "       lease_expires_at = NULL, locked_by = NULL, updated_at = now() ",
    "FROM UNNEST($1::uuid[], $2::text[]) AS u(id, reason) ",
    "WHERE jobs.id = u.id AND jobs.state = 'running' AND jobs.locked_by = $3 ",
    "RETURNING jobs.ordering_key, jobs.seq), ",
    "released AS (",
    release_next_sql!("given_up"),
    ") SELECT COALESCE(array_agg(DISTINCT queue), '{}') FROM released"
);

/// Returns how many jobs it rescued (made runnable again or, at their last attempt, dead).
const RESCUE: &str = concat!(
    "WITH rescued AS ( ",
    "UPDATE jobs SET ",
    "    state = CASE WHEN attempt >= max_attempts THEN 'dead' ELSE 'available' END, ",
    "    run_at = now(), ",
    "    finished_at = CASE WHEN attempt >= max_attempts THEN now() END, ",
    "    last_error = 'lease expired: the worker running it stopped', ",
    "    errors = errors || jsonb_build_array(jsonb_build_object( ",
    "        'attempt', attempt, 'at', now(), ",
    "        'error', 'lease expired: the worker running it stopped')), ",
    "    lease_expires_at = NULL, locked_by = NULL, updated_at = now() ",
    "WHERE state = 'running' AND lease_expires_at < now() ",
    "RETURNING state, ordering_key, seq), ",
    "released AS (",
    release_next_sql!("(SELECT * FROM rescued WHERE state = 'dead')"),
    ") SELECT count(*) FROM rescued"
);

/// Cancels the unfinished jobs `condition` selects, releasing the job after each (see
/// [`release_next_sql`]); returns them.
fn cancelling(condition: &str) -> String {
    format!(
        "WITH cancelled AS ( \
             UPDATE jobs SET state = 'cancelled', finished_at = now(), updated_at = now(), \
                    lease_expires_at = NULL, locked_by = NULL, last_error = 'cancelled' \
             WHERE {condition} AND state IN ('available', 'running') \
             RETURNING {JOB_COLUMNS}, seq), \
         released AS ({}) \
         SELECT {JOB_COLUMNS} FROM cancelled",
        release_next_sql!("cancelled")
    )
}

/// The connections of the queue's hot statements (claims, outcomes, leases, enqueues): `pool`'s
/// settings, at most [`QUEUE_CONNECTIONS`], with sequential scans off.
///
/// Each of them finds the jobs it changes by a key with an index (`ANY(ARRAY(…))` of ids, see
/// [`CLAIM`] and [`release_next_sql`]), but the planner costs `jobs` as it is when a statement
/// is planned, and PostgreSQL keeps a statement's generic plan for the connection's life (until
/// the table's statistics change): planned while the table is small (a new database), the plan
/// scanned the whole table, and went on doing so on every claim and completion once it held
/// thousands of finished jobs. The statements that do read the whole table (depth, listing,
/// pruning) run on `pool`.
fn queue_pool(pool: &PgPool) -> PgPool {
    crate::store::own_connections(pool, QUEUE_CONNECTIONS, &[("enable_seqscan", "off")])
}

/// Connections kept between claims (see [`crate::store::Kept`]): one per worker of a node's
/// usual few (workflows, channels, progress), the rest of the queue's pool for the others.
const CLAIMS_KEPT: usize = 4;

/// Connections of the queue's own pool: claims, outcomes and lease extensions are short and
/// batched, so a few serve a node's workers.
const QUEUE_CONNECTIONS: u32 = 8;

/// The job queue on PostgreSQL. The schema must be migrated (see [`crate::store`]).
pub struct PgJobQueue {
    /// The hot statements' connections (see [`queue_pool`]).
    pool: PgPool,
    /// The claims' connections between claims (see [`crate::store::Kept`]).
    claiming: crate::store::Kept,
    /// The store's pool: statements that read the whole table, and listening.
    scans: PgPool,
    wakeups: Waker,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl PgJobQueue {
    /// `listen`: wake local workers on enqueues by other processes. The hot statements run on
    /// connections of their own (see [`queue_pool`]).
    pub fn new(pool: PgPool, listen: bool) -> Self {
        let wakeups = Waker::new();
        let tasks = wakeups.start(&pool, CHANNEL, true, listen);
        let hot = queue_pool(&pool);
        Self {
            // A claim at a time per worker: a node runs a few.
            claiming: crate::store::Kept::new(hot.clone(), CLAIMS_KEPT),
            pool: hot,
            scans: pool,
            wakeups,
            tasks: std::sync::Mutex::new(tasks),
        }
    }

    /// Wakes this queue's workers (here and, by `NOTIFY`, elsewhere): for jobs another writer
    /// enqueued (see [`crate::EventLog::append_with_jobs`]).
    pub(crate) fn wake_hook(&self) -> crate::log::WakeQueues {
        let wake = self.wakeups.sender();
        Arc::new(move |queues| wake.wake_queues(queues.iter().map(String::as_str)))
    }
}

fn job_from_row(row: &PgRow) -> Result<Job, QueueError> {
    let id: Uuid = row.try_get("id")?;
    let corrupt = |reason: String| QueueError::Corrupt {
        id: id.to_string(),
        reason,
    };
    let state: String = row.try_get("state")?;
    let errors: Json<Vec<AttemptError>> = row
        .try_get("errors")
        .map_err(|e| corrupt(format!("errors: {e}")))?;
    Ok(Job {
        id,
        queue: row.try_get("queue")?,
        kind: row.try_get("kind")?,
        payload: row.try_get("payload")?,
        state: state.parse().map_err(corrupt)?,
        priority: row.try_get("priority")?,
        run_at: row.try_get("run_at")?,
        attempt: row.try_get("attempt")?,
        max_attempts: row.try_get("max_attempts")?,
        timeout_ms: row.try_get("timeout_ms")?,
        lease_expires_at: row.try_get("lease_expires_at")?,
        locked_by: row.try_get("locked_by")?,
        ordering_key: row.try_get("ordering_key")?,
        idempotency_key: row.try_get("idempotency_key")?,
        last_error: row.try_get("last_error")?,
        errors: errors.0,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

/// Enqueues on `conn` (a pool connection or an open transaction).
pub(crate) async fn enqueue_on(
    conn: &mut PgConnection,
    jobs: Vec<NewJob>,
) -> Result<Vec<Enqueued>, QueueError> {
    super::validate(&jobs)?;
    let ids: Vec<Uuid> = jobs.iter().map(|_| Uuid::now_v7()).collect();
    let payloads = jobs
        .iter()
        .map(|j| serde_json::to_string(&j.payload))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| QueueError::Invalid(e.to_string()))?;
    let rows = sqlx::query(ENQUEUE)
        .bind(&ids)
        .bind(jobs.iter().map(|j| j.queue.as_str()).collect::<Vec<_>>())
        .bind(jobs.iter().map(|j| j.kind.as_str()).collect::<Vec<_>>())
        .bind(&payloads)
        .bind(jobs.iter().map(|j| j.priority).collect::<Vec<_>>())
        .bind(jobs.iter().map(|j| j.run_at).collect::<Vec<_>>())
        .bind(jobs.iter().map(|j| j.max_attempts).collect::<Vec<_>>())
        .bind(
            jobs.iter()
                .map(|j| j.timeout.as_millis().min(i64::MAX as u128) as i64)
                .collect::<Vec<_>>(),
        )
        .bind(
            jobs.iter()
                .map(|j| j.ordering_key.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            jobs.iter()
                .map(|j| j.idempotency_key.as_deref())
                .collect::<Vec<_>>(),
        )
        .fetch_all(&mut *conn)
        .await?;
    let mut inserted: HashMap<Uuid, Job> = HashMap::with_capacity(rows.len());
    for row in &rows {
        let job = job_from_row(row)?;
        inserted.insert(job.id, job);
    }
    let existing_sql = format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE idempotency_key = $1 \
         AND state IN ('available', 'running')"
    );
    let mut results = Vec::with_capacity(jobs.len());
    for (id, job) in ids.iter().zip(&jobs) {
        // Not inserted: its idempotency key belongs to an unfinished job.
        results.push(match inserted.remove(id) {
            Some(stored) => Enqueued::Inserted(stored),
            None => {
                let row = sqlx::query(&existing_sql)
                    .bind(job.idempotency_key.as_deref())
                    .fetch_optional(&mut *conn)
                    .await?;
                match row {
                    Some(row) => Enqueued::Existing(job_from_row(&row)?),
                    // The unfinished job finished in between: the key is free, enqueue again.
                    None => Box::pin(enqueue_on(conn, vec![job.clone()]))
                        .await?
                        .pop()
                        .expect("one job, one result"),
                }
            }
        });
    }
    Ok(results)
}

/// Claims a job just enqueued in the same transaction for the worker it is handed off to (see
/// [`super::handoff`]).
pub(crate) async fn claim_handed(
    conn: &mut PgConnection,
    id: Uuid,
    worker: &str,
    lease: Duration,
) -> Result<Option<Job>, QueueError> {
    let row = sqlx::query(
        "UPDATE jobs SET state = 'running', attempt = attempt + 1, locked_by = $2, \
                lease_expires_at = now() + make_interval(secs => $3), updated_at = now() \
         WHERE id = $1 AND state = 'available' RETURNING *",
    )
    .bind(id)
    .bind(worker)
    .bind(lease.as_secs_f64())
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(job_from_row).transpose()
}

/// Records running jobs completed, each only while its worker holds it, in the caller's
/// transaction (an append's: see [`super::completing`]).
pub(crate) async fn complete_on(
    conn: &mut PgConnection,
    jobs: &[&super::handoff::Completes],
) -> Result<(), QueueError> {
    if jobs.is_empty() {
        return Ok(());
    }
    let (ids, workers): (Vec<Uuid>, Vec<&str>) = jobs.iter().map(|c| (c.job(), c.worker())).unzip();
    sqlx::query(COMPLETE_HELD)
        .bind(&ids)
        .bind(&workers)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// A transaction whose commit does not wait for the disk flush, for a worker's outcomes other
/// than completions (claims, lease extensions and completions do the same in one statement each:
/// see [`CLAIM`]). A crash of the database may lose such a commit, and then the job is
/// runnable again (a lost claim), or running on an expired lease and rescued (a lost outcome):
/// it runs again, as after a worker's crash, which jobs are built for. Anything durable a job
/// did after its claim (an append) flushed the claim first, the write-ahead log being flushed
/// in order. Saves a disk flush per job on the path from one step to the next.
async fn unflushed(pool: &PgPool) -> Result<sqlx::Transaction<'static, Postgres>, sqlx::Error> {
    crate::store::begin_to_the_end(pool, "BEGIN; SET LOCAL synchronous_commit = off").await
}

#[async_trait]
impl JobQueue for PgJobQueue {
    async fn enqueue(&self, jobs: Vec<NewJob>) -> Result<Vec<Enqueued>, QueueError> {
        // One INSERT is atomic on its own: no transaction round trips around it.
        let mut conn = self.pool.acquire().await?;
        let queues = super::queues_of(jobs.iter().map(|job| job.queue.as_str()));
        let enqueued = enqueue_on(&mut conn, jobs).await?;
        self.wakeups.wake_queues(queues.iter().map(String::as_str));
        Ok(enqueued)
    }

    async fn enqueue_in(
        &self,
        tx: &mut dyn LogTransaction,
        jobs: Vec<NewJob>,
    ) -> Result<Vec<Enqueued>, QueueError> {
        let TxConnection::Postgres(conn) = tx.connection() else {
            return Err(QueueError::ForeignTransaction);
        };
        let queues = super::queues_of(jobs.iter().map(|job| job.queue.as_str()));
        let enqueued = enqueue_on(conn, jobs).await?;
        let wake = self.wakeups.sender();
        tx.after_commit(Box::new(move || {
            wake.wake_queues(queues.iter().map(String::as_str))
        }));
        Ok(enqueued)
    }

    async fn claim(
        &self,
        queue: &str,
        worker: &str,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<Job>, QueueError> {
        let mut jobs = Vec::new();
        // Looking past the jobs it may claim costs a row lock each (WAL): only once the claim
        // came back short with every job it looked at taken or waiting, where more are likely.
        let mut window = 0;
        loop {
            let asked = limit - jobs.len();
            let query = sqlx::query(CLAIM)
                .bind(queue)
                .bind(asked as i64)
                .bind(worker)
                .bind(lease.as_secs_f64())
                .bind(window);
            let rows = self.claiming.fetch_all(query).await;
            let rows = match rows {
                Ok(rows) => rows,
                // What earlier rounds claimed is this worker's: hand it over.
                Err(e) if !jobs.is_empty() => {
                    tracing::warn!(error = %e, queue, "claiming more failed");
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            let mut seen = 0;
            let mut claimed = 0;
            for row in &rows {
                seen = row.try_get::<i64, _>("seen")?;
                if row.try_get::<Option<Uuid>, _>("id")?.is_some() {
                    jobs.push(job_from_row(row)?);
                    claimed += 1;
                }
            }
            // Short with its window full: the others it looked at wait (marked now, or right
            // behind a running job of their key); runnable ones may lie further on.
            let window_full = seen == (asked as i64) + window;
            if claimed >= asked || !window_full || window >= CLAIM_WINDOW_MAX {
                break;
            }
            window = (window * 2).clamp(CLAIM_WINDOW, CLAIM_WINDOW_MAX);
        }
        super::in_claim_order(&mut jobs);
        Ok(jobs)
    }

    async fn extend_leases(
        &self,
        worker: &str,
        ids: &[Uuid],
        lease: Duration,
    ) -> Result<Vec<Uuid>, QueueError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(sqlx::query_scalar(EXTEND)
            .bind(ids)
            .bind(worker)
            .bind(lease.as_secs_f64())
            .fetch_all(&self.pool)
            .await?)
    }

    async fn finish(&self, worker: &str, outcomes: Vec<(Uuid, Outcome)>) -> Result<(), QueueError> {
        let mut completed = Vec::new();
        let (mut failed, mut errors) = (Vec::new(), Vec::new());
        let (mut snoozed, mut untils) = (Vec::new(), Vec::<DateTime<Utc>>::new());
        let (mut cancelled, mut reasons) = (Vec::new(), Vec::new());
        for (id, outcome) in outcomes {
            match outcome {
                Outcome::Completed => completed.push(id),
                Outcome::Failed { error } => {
                    failed.push(id);
                    errors.push(error);
                }
                Outcome::Snoozed { until } => {
                    snoozed.push(id);
                    untils.push(until);
                }
                Outcome::Cancelled { reason } => {
                    cancelled.push(id);
                    reasons.push(reason);
                }
            }
        }
        if failed.is_empty() && snoozed.is_empty() && cancelled.is_empty() {
            // The common case: completions only, one statement.
            if !completed.is_empty() {
                let ordered: Vec<String> = sqlx::query_scalar(COMPLETE)
                    .bind(&completed)
                    .bind(worker)
                    .fetch_one(&self.pool)
                    .await?;
                if !ordered.is_empty() {
                    self.wakeups.wake_queues(ordered.iter().map(String::as_str));
                }
            }
            return Ok(());
        }
        let mut conn = unflushed(&self.pool).await?;
        // The queues of jobs the ones ending let run (the next of their ordering key).
        let mut ordered: Vec<String> = Vec::new();
        if !completed.is_empty() {
            ordered = sqlx::query_scalar(COMPLETE)
                .bind(&completed)
                .bind(worker)
                .fetch_one(&mut *conn)
                .await?;
        }
        if !failed.is_empty() {
            let released: Vec<String> = sqlx::query_scalar(FAIL)
                .bind(&failed)
                .bind(&errors)
                .bind(worker)
                .fetch_one(&mut *conn)
                .await?;
            ordered.extend(released);
        }
        if !snoozed.is_empty() {
            sqlx::query(SNOOZE)
                .bind(&snoozed)
                .bind(&untils)
                .bind(worker)
                .execute(&mut *conn)
                .await?;
        }
        if !cancelled.is_empty() {
            let released: Vec<String> = sqlx::query_scalar(GIVE_UP)
                .bind(&cancelled)
                .bind(&reasons)
                .bind(worker)
                .fetch_one(&mut *conn)
                .await?;
            ordered.extend(released);
        }
        conn.commit().await?;
        if !ordered.is_empty() {
            self.wakeups.wake_queues(ordered.iter().map(String::as_str));
        }
        Ok(())
    }

    async fn rescue_expired(&self) -> Result<usize, QueueError> {
        let rescued: i64 = sqlx::query_scalar(RESCUE).fetch_one(&self.pool).await?;
        let released = sqlx::query(RELEASE_STRAYS)
            .execute(&self.pool)
            .await?
            .rows_affected();
        if released > 0 {
            tracing::warn!(
                jobs = released,
                "released jobs marked waiting behind finished jobs"
            );
        }
        if rescued > 0 || released > 0 {
            self.wakeups.wake();
        }
        Ok(rescued as usize)
    }

    async fn cancel(&self, id: Uuid) -> Result<Job, QueueError> {
        let sql = cancelling("id = $1");
        match sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
        {
            Some(row) => {
                self.wakeups.wake();
                job_from_row(&row)
            }
            None => Err(super::refusal(self, id, "cancel").await),
        }
    }

    async fn depth(&self) -> Result<Vec<(String, JobState, i64)>, QueueError> {
        super::depth_of(sqlx::query_as(super::DEPTH).fetch_all(&self.scans).await?)
    }

    async fn cancel_keyed(&self, keys: &[String]) -> Result<Vec<Job>, QueueError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let sql = cancelling("idempotency_key = ANY($1)");
        let rows = sqlx::query(&sql).bind(keys).fetch_all(&self.pool).await?;
        if !rows.is_empty() {
            self.wakeups.wake();
        }
        rows.iter().map(job_from_row).collect()
    }

    async fn retry(&self, id: Uuid) -> Result<Job, QueueError> {
        let sql = format!(
            "UPDATE jobs SET state = 'available', run_at = now(), attempt = 0, finished_at = NULL, \
             waiting = false, updated_at = now() \
             WHERE id = $1 AND state IN ('dead', 'cancelled') RETURNING {JOB_COLUMNS}"
        );
        match sqlx::query(&sql).bind(id).fetch_optional(&self.pool).await {
            Ok(Some(row)) => {
                self.wakeups.wake();
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
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
        sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(job_from_row)
            .transpose()
    }

    async fn list(&self, filter: JobFilter) -> Result<Vec<Job>, QueueError> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs \
             WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR queue = $2) \
               AND ($3::text IS NULL OR kind = $3) \
             ORDER BY seq DESC LIMIT $4"
        );
        sqlx::query(&sql)
            .bind(filter.state.map(JobState::as_str))
            .bind(filter.queue)
            .bind(filter.kind)
            .bind(filter.limit.max(1) as i64)
            .fetch_all(&self.scans)
            .await?
            .iter()
            .map(job_from_row)
            .collect()
    }

    async fn prune(&self, before: DateTime<Utc>) -> Result<u64, QueueError> {
        Ok(sqlx::query(
            "DELETE FROM jobs WHERE state IN ('completed', 'cancelled') AND finished_at < $1",
        )
        .bind(before)
        .execute(&self.scans)
        .await?
        .rows_affected())
    }

    fn wakeups(&self) -> watch::Receiver<u64> {
        self.wakeups.subscribe()
    }

    fn wakeups_of(&self, queue: &str) -> watch::Receiver<u64> {
        self.wakeups.subscribe_queue(queue)
    }

    async fn close(&self) {
        for task in std::mem::take(&mut *self.tasks.lock().expect("tasks lock")) {
            task.abort();
        }
        self.claiming.clear();
        self.pool.close().await;
    }
}
