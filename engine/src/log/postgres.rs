//! The event log on PostgreSQL.
//!
//! Writes go through the group committer: one transaction per group, each inserting all the group's
//! command rows and events with one `INSERT … SELECT FROM UNNEST` each.
//!
//! Reads of the global log are gap-safe without any server-wide horizon: every insert into
//! `events` first takes the log's transaction-scoped append lock (a statement trigger, see
//! `migrations/postgres/0004_commit_order.sql`), and draws its positions under it, so positions
//! become visible in increasing order. A reader reads `global_position > after`, and only Stele's
//! own appends that are committing right now can hold it back; transactions of other programs
//! never do. A group commit takes the lock once for its whole group.
//!
//! A command whose own data the database refuses (a value it cannot store) fails alone: the group
//! is split and written again without it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::types::Json;
use sqlx::{Acquire, PgConnection, Postgres, Row, Transaction};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::batch::{BatchHandler, Batcher, GroupCommit, GroupWriter};
use super::{
    completions_committed, inserted_handoffs, json_text, queues_to_wake, validate, validate_jobs,
    written_completions, written_jobs, Append, AppendOutcome, AppendRequest, Backend,
    CommandOutcome, EventLog, JobsHook, LogError, LogTransaction, Position, RecordedEvent,
    StreamId, TxConnection, Written,
};
use crate::metadata::EventMetadata;
use crate::notify::{WakeHandle, Waker};
use crate::queue::handoff::{Completes, Handoff};
use crate::queue::{Job, NewJob};

/// The LISTEN/NOTIFY channel the events table's trigger notifies.
const CHANNEL: &str = "stele_events";

/// One page of the global log after position `$1` (0: from the start), up to `$2` events, with
/// whether `$1` names an event, in one statement. Always returns at least one row; an empty page is
/// one row of NULL event columns.
const READ_LOG: &str = "\
    WITH page AS ( \
        SELECT e.global_position, e.aggregate_type, e.aggregate_id, e.sequence, \
               e.event_type, e.event_version, e.recorded_at, e.metadata, e.payload \
        FROM events e WHERE e.global_position > $1 \
        ORDER BY e.global_position LIMIT $2) \
    SELECT page.*, \
           ($1 = 0 OR EXISTS (SELECT 1 FROM events WHERE global_position = $1)) AS known \
    FROM (SELECT 1) AS one LEFT JOIN page ON true \
    ORDER BY page.global_position";

/// The statement that writes a group of commands: their command rows (a command id already accepted
/// is skipped: a duplicate) and the events of the commands accepted here. The result rows are the
/// accepted command ids (`kind` 'c') and the written events (`kind` 'e'). `$on_conflict` decides
/// what a taken event sequence does.
macro_rules! write_group_sql {
    ($commands_on_conflict:literal, $on_conflict:literal) => {
        write_group_sql!($commands_on_conflict, $on_conflict, ""; "")
    };
    ($commands_on_conflict:literal, $on_conflict:literal, $($more:expr),+ ; $more_rows:literal) => {
        concat!(
            "WITH accepted AS (",
            "  INSERT INTO commands (command_id, aggregate_type, aggregate_id, first_sequence,",
            "                        last_sequence)",
            "  SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::int8[], $5::int8[]) ",
            $commands_on_conflict,
            "  RETURNING command_id),",
            " inserted AS (",
            "  INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,",
            "                      payload, metadata, event_id)",
            "  SELECT u.t, u.i, u.s, u.et, u.ev, u.p::jsonb, u.m::json, u.e",
            "  FROM UNNEST($6::uuid[], $7::text[], $8::text[], $9::int8[], $10::text[], $11::text[],",
            "              $12::text[], $13::text[], $14::uuid[]) AS u(c, t, i, s, et, ev, p, m, e)",
            "  WHERE u.c IN (SELECT command_id FROM accepted) ",
            $on_conflict,
            "  RETURNING aggregate_type, aggregate_id, sequence, global_position)",
            $($more,)+
            " SELECT 'c' AS kind, command_id, NULL::text AS aggregate_type, NULL::text AS aggregate_id,",
            "        NULL::int8 AS sequence, NULL::int8 AS global_position FROM accepted",
            " UNION ALL",
            " SELECT 'e', NULL, aggregate_type, aggregate_id, sequence, global_position FROM inserted",
            $more_rows
        )
    };
}

/// Writes a group in one statement. A stale or repeated command fails the whole statement with a
/// unique violation, and the group is then written again with [`WRITE_GROUP_TOLERANT`]. (Plain
/// inserts: `ON CONFLICT` costs a speculative insertion per row, paid on every append.)
const WRITE_GROUP: &str = write_group_sql!("", "");

/// [`WRITE_GROUP`] with the jobs of the group's commands (`$15` the command each job comes
/// with, `$16`… as in the queue's `ENQUEUE`), inserted in the same statement: one round trip and
/// one commit for a step's events and its next job. A job whose idempotency key an unfinished job
/// holds is skipped, as an enqueue would. A job with a worker in `$26` is inserted claimed by it
/// for `$27` seconds (a hand-off, see [`crate::queue::handoff`]); those inserted are returned as
/// rows of `kind` 'j' (the job id in `command_id`). The running jobs `$28`, each while its worker
/// `$29` holds it, are recorded completed (the appends' own jobs: see
/// [`crate::queue::completing`]).
const WRITE_GROUP_WITH_JOBS: &str = write_group_sql!(
    "",
    "",
    ", jobs_in AS (\
      INSERT INTO jobs (id, queue, kind, payload, priority, run_at, max_attempts, timeout_ms, \
                        ordering_key, idempotency_key, state, attempt, locked_by, \
                        lease_expires_at) \
      SELECT j.id, j.queue, j.kind, j.payload::jsonb, j.priority, COALESCE(j.run_at, now()), \
             j.max_attempts, j.timeout_ms, j.ordering_key, j.idempotency_key, \
             CASE WHEN j.worker IS NULL THEN 'available' ELSE 'running' END, \
             CASE WHEN j.worker IS NULL THEN 0 ELSE 1 END, j.worker, \
             CASE WHEN j.worker IS NOT NULL THEN now() + make_interval(secs => j.lease) END \
      FROM UNNEST($15::uuid[], $16::uuid[], $17::text[], $18::text[], $19::text[], $20::int2[], \
                  $21::timestamptz[], $22::int4[], $23::int8[], $24::text[], $25::text[], \
                  $26::text[], $27::float8[]) \
           AS j(c, id, queue, kind, payload, priority, run_at, max_attempts, timeout_ms, \
                ordering_key, idempotency_key, worker, lease) \
      WHERE j.c IN (SELECT command_id FROM accepted) \
      ON CONFLICT (idempotency_key) \
          WHERE idempotency_key IS NOT NULL AND state IN ('available', 'running') DO NOTHING \
      RETURNING id, locked_by), ",
    crate::queue::postgres::complete_held_sql!("$28", "$29");
    " UNION ALL SELECT 'j', id, NULL, NULL, NULL, NULL FROM jobs_in WHERE locked_by IS NOT NULL"
);

/// Skips events whose sequence is taken instead of failing; the caller finds the conflicting
/// commands by their missing events and rolls back.
const WRITE_GROUP_TOLERANT: &str = write_group_sql!(
    "ON CONFLICT (command_id) DO NOTHING",
    "ON CONFLICT (aggregate_type, aggregate_id, sequence) DO NOTHING"
);

/// The streams of many commands in one query: `$1`/`$2` the streams, `$3` the sequence to read
/// after; `n` says which request a row answers.
const READ_STREAMS: &str = concat!(
    "SELECT q.n, e.global_position, e.aggregate_type, e.aggregate_id, e.sequence, e.event_type,",
    "       e.event_version, e.recorded_at, e.metadata, e.payload",
    " FROM UNNEST($1::text[], $2::text[], $3::int8[]) WITH ORDINALITY AS q(t, i, after, n)",
    " CROSS JOIN LATERAL (SELECT * FROM events",
    "   WHERE aggregate_type = q.t AND aggregate_id = q.i AND sequence > q.after",
    "   ORDER BY sequence) e",
    " ORDER BY q.n, e.sequence"
);

const COMMAND_OUTCOME: &str = "\
    SELECT c.aggregate_type, c.aggregate_id, c.first_sequence, c.last_sequence, \
           ARRAY(SELECT e.global_position FROM events e \
                 WHERE e.aggregate_type = c.aggregate_type AND e.aggregate_id = c.aggregate_id \
                   AND e.sequence BETWEEN c.first_sequence AND c.last_sequence \
                 ORDER BY e.sequence) AS positions \
    FROM commands c WHERE c.command_id = $1";

/// Tuning of the PostgreSQL adapter.
#[derive(Clone, Debug)]
pub struct PgLogOptions {
    /// Group-commit writers (transactions in flight at once).
    pub writers: usize,
    /// Most commands in one group.
    pub max_group: usize,
    /// Stream loads in flight at once (concurrent loads are batched into one query each).
    pub readers: usize,
    /// LISTEN for appends by other processes.
    pub listen: bool,
}

impl Default for PgLogOptions {
    fn default() -> Self {
        Self {
            // Measured (bench/RESULTS.md): one writer building large groups beats several
            // writers building small ones, since each commit has a fixed cost.
            writers: 1,
            max_group: 512,
            readers: 1,
            listen: true,
        }
    }
}

/// The event log on PostgreSQL. The schema must be migrated (see [`crate::store`]).
pub struct PgEventLog {
    pool: PgPool,
    writer: Arc<PgWriter>,
    committer: Batcher<GroupCommit<PgWriter>>,
    loader: Batcher<PgLoader>,
    /// The loader's kept connections, handed back on close.
    loading: Arc<crate::store::Kept>,
    appends: Waker,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

struct PgWriter {
    pool: PgPool,
    /// The writers' connections between groups (see [`crate::store::Kept`]).
    kept: crate::store::Kept,
    jobs: JobsHook,
}

impl PgWriter {
    /// After a commit that enqueued jobs on `queues`.
    fn jobs_enqueued(&self, queues: &[String]) {
        if queues.is_empty() {
            return;
        }
        if let Some(hook) = self.jobs.get() {
            hook(queues);
        }
    }
}

/// Loads the streams of concurrent commands with one query per batch.
struct PgLoader {
    /// The loaders' connections between batches (see [`crate::store::Kept`]).
    kept: Arc<crate::store::Kept>,
}

#[async_trait]
impl BatchHandler for PgLoader {
    type Request = (StreamId, i64);
    type Response = Result<Vec<RecordedEvent>, LogError>;

    async fn handle(&self, requests: Vec<(StreamId, i64)>) -> Vec<Self::Response> {
        let types: Vec<&str> = requests
            .iter()
            .map(|(s, _)| s.aggregate_type.as_str())
            .collect();
        let ids: Vec<&str> = requests
            .iter()
            .map(|(s, _)| s.aggregate_id.as_str())
            .collect();
        let after: Vec<i64> = requests.iter().map(|(_, a)| *a).collect();
        let query = sqlx::query(READ_STREAMS)
            .bind(&types)
            .bind(&ids)
            .bind(&after);
        let rows = self.kept.fetch_all(query).await;
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                let message = e.to_string();
                return requests
                    .iter()
                    .map(|_| Err(LogError::Storage(message.clone())))
                    .collect();
            }
        };
        let mut responses: Vec<Self::Response> = requests.iter().map(|_| Ok(Vec::new())).collect();
        for row in rows {
            let index = match row.try_get::<i64, _>("n") {
                Ok(n) => (n - 1) as usize,
                Err(e) => {
                    return requests
                        .iter()
                        .map(|_| Err(LogError::Storage(e.to_string())))
                        .collect()
                }
            };
            let event = event_from_row(&row);
            if let Some(Ok(events)) = responses.get_mut(index) {
                match event {
                    Ok(event) => events.push(event),
                    Err(e) => responses[index] = Err(e),
                }
            }
        }
        responses
    }
}

impl PgEventLog {
    pub fn new(pool: PgPool, options: PgLogOptions) -> Self {
        let appends = Waker::new();
        let writers = writer_pool(&pool, options.writers);
        let writer = Arc::new(PgWriter {
            kept: crate::store::Kept::new(writers.clone(), options.writers.max(1)),
            pool: writers,
            jobs: JobsHook::new(),
        });
        let on_commit = {
            let appends = appends.sender();
            Arc::new(move || appends.wake())
        };
        let committer = Batcher::start(
            Arc::new(GroupCommit {
                writer: writer.clone(),
                on_commit,
            }),
            options.writers,
            options.max_group,
        );
        let loading = Arc::new(crate::store::Kept::new(
            pool.clone(),
            options.readers.max(1),
        ));
        let loader = Batcher::start(
            Arc::new(PgLoader {
                kept: loading.clone(),
            }),
            options.readers,
            options.max_group,
        );
        // Appending transactions notify other processes themselves (the append-lock trigger
        // sends `NOTIFY stele_events`): no forwarder.
        let tasks = appends.start(&pool, CHANNEL, false, options.listen);
        Self {
            pool,
            writer,
            committer,
            loader,
            loading,
            appends,
            tasks: std::sync::Mutex::new(tasks),
        }
    }

    /// Calls `hook` after each commit that enqueued jobs with an append (the store wakes its
    /// workers with it). Set once.
    pub(crate) fn on_jobs(&self, hook: crate::log::WakeQueues) {
        let _ = self.writer.jobs.set(hook);
    }

    /// The connection pool (the same database holds other Stele tables).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// The group writers' own connections (the pool's settings, the same application name), planning
/// with generic plans. Planning the group statement for its parameters took longer than running
/// it (0.6 ms against 0.4 ms for a group of two commands, measured with `EXPLAIN ANALYZE`), every
/// time, on the one path all appends take in turn; its plan is the same whatever the
/// parameters (each array is scanned whole, rows are found by their keys). Only these
/// statements: others (the claims') depend on their parameters.
///
/// Sequential scans are off on them: a generic plan is made once per connection, usually while
/// the tables are small (a new database), and was then kept with a scan of the whole `jobs`
/// table for the jobs an append completes (cheapest on a few pages, and the cause of a third of
/// the group statement's time once the table held a few thousand finished jobs). Every row the
/// statement touches is found by a key that has an index.
fn writer_pool(pool: &PgPool, writers: usize) -> PgPool {
    // The writers, and the lookup of a duplicate's first outcome.
    crate::store::own_connections(
        pool,
        writers.max(1) as u32 + 1,
        &[
            ("plan_cache_mode", "force_generic_plan"),
            ("enable_seqscan", "off"),
        ],
    )
}

fn event_from_row(row: &PgRow) -> Result<RecordedEvent, LogError> {
    let position = Position(row.try_get("global_position")?);
    let corrupt = |reason: String| LogError::Corrupt { position, reason };
    let metadata: Json<EventMetadata> = row
        .try_get("metadata")
        .map_err(|e| corrupt(format!("metadata: {e}")))?;
    Ok(RecordedEvent {
        position,
        stream: StreamId {
            aggregate_type: row.try_get("aggregate_type")?,
            aggregate_id: row.try_get("aggregate_id")?,
        },
        sequence: row.try_get("sequence")?,
        event_type: row.try_get("event_type")?,
        event_version: row.try_get("event_version")?,
        recorded_at: row.try_get("recorded_at")?,
        metadata: metadata.0,
        payload: row.try_get("payload")?,
    })
}

/// A group's commands and events as column arrays, for `UNNEST`.
#[derive(Default)]
struct GroupColumns<'a> {
    command_ids: Vec<Uuid>,
    types: Vec<&'a str>,
    ids: Vec<&'a str>,
    firsts: Vec<i64>,
    lasts: Vec<i64>,
    event_commands: Vec<Uuid>,
    event_types_of_stream: Vec<&'a str>,
    event_ids_of_stream: Vec<&'a str>,
    sequences: Vec<i64>,
    event_types: Vec<&'a str>,
    event_versions: Vec<&'a str>,
    payloads: Vec<String>,
    metadata: Vec<String>,
    event_ids: Vec<Uuid>,
}

impl<'a> GroupColumns<'a> {
    fn new(requests: &[&'a AppendRequest]) -> Result<Self, LogError> {
        let mut columns = GroupColumns::default();
        for request in requests {
            columns.command_ids.push(request.command_id);
            columns.types.push(&request.stream.aggregate_type);
            columns.ids.push(&request.stream.aggregate_id);
            columns.firsts.push(request.first_sequence());
            columns.lasts.push(request.last_sequence());
            for (offset, event) in request.events.iter().enumerate() {
                columns.event_commands.push(request.command_id);
                columns
                    .event_types_of_stream
                    .push(&request.stream.aggregate_type);
                columns
                    .event_ids_of_stream
                    .push(&request.stream.aggregate_id);
                columns
                    .sequences
                    .push(request.first_sequence() + offset as i64);
                columns.event_types.push(&event.event_type);
                columns.event_versions.push(&event.event_version);
                columns.payloads.push(json_text(&event.payload)?);
                columns.metadata.push(json_text(&event.metadata)?);
                columns.event_ids.push(event.metadata.event_id);
            }
        }
        Ok(columns)
    }
}

/// Runs [`WRITE_GROUP`] or [`WRITE_GROUP_TOLERANT`] for `requests`; one result per request.
/// With the tolerant statement, conflicting requests may be partly written: the caller rolls back
/// when any conflicts.
async fn write_with(
    conn: &mut PgConnection,
    sql: &'static str,
    requests: &[&AppendRequest],
) -> Result<Vec<Written>, LogError> {
    Ok(write_with_jobs(conn, sql, requests, None).await?.0)
}

/// The jobs of a group as the columns of [`WRITE_GROUP_WITH_JOBS`].
#[derive(Default)]
struct JobColumns {
    commands: Vec<Uuid>,
    ids: Vec<Uuid>,
    queues: Vec<String>,
    kinds: Vec<String>,
    payloads: Vec<String>,
    priorities: Vec<i16>,
    run_ats: Vec<Option<chrono::DateTime<chrono::Utc>>>,
    max_attempts: Vec<i32>,
    timeouts: Vec<i64>,
    ordering_keys: Vec<Option<String>>,
    idempotency_keys: Vec<Option<String>>,
    workers: Vec<Option<String>>,
    leases: Vec<f64>,
    /// The hand-offs: which append (of those given), and the id of its job.
    handoffs: Vec<(usize, Uuid)>,
    /// The running jobs the appends record completed, and their workers.
    completed: Vec<Uuid>,
    completed_by: Vec<String>,
}

impl JobColumns {
    fn new(appends: &[&Append]) -> Result<Self, LogError> {
        let mut c = JobColumns::default();
        for completes in appends.iter().filter_map(|a| a.completes.as_ref()) {
            c.completed.push(completes.job());
            c.completed_by.push(completes.worker().to_owned());
        }
        for (position, append) in appends.iter().enumerate() {
            for (index, job) in append.jobs.iter().enumerate() {
                let id = Uuid::now_v7();
                let handoff = append.handoff.as_ref().filter(|h| h.index == index);
                if handoff.is_some() {
                    c.handoffs.push((position, id));
                }
                c.workers.push(handoff.map(|h| h.worker().to_owned()));
                c.leases
                    .push(handoff.map_or(0.0, |h| h.lease().as_secs_f64()));
                c.commands.push(append.request.command_id);
                c.ids.push(id);
                c.queues.push(job.queue.clone());
                c.kinds.push(job.kind.clone());
                c.payloads.push(json_text(&job.payload)?);
                c.priorities.push(job.priority);
                c.run_ats.push(job.run_at);
                c.max_attempts.push(job.max_attempts);
                c.timeouts
                    .push(job.timeout.as_millis().min(i64::MAX as u128) as i64);
                c.ordering_keys.push(job.ordering_key.clone());
                c.idempotency_keys.push(job.idempotency_key.clone());
            }
        }
        Ok(c)
    }
}

/// [`write_with`], with the group's jobs bound too (for [`WRITE_GROUP_WITH_JOBS`]); also returns
/// the ids of the jobs inserted claimed (hand-offs).
async fn write_with_jobs(
    conn: &mut PgConnection,
    sql: &'static str,
    requests: &[&AppendRequest],
    jobs: Option<&JobColumns>,
) -> Result<(Vec<Written>, HashSet<Uuid>), LogError> {
    let c = GroupColumns::new(requests)?;
    let mut query = sqlx::query(sql)
        .bind(&c.command_ids)
        .bind(&c.types)
        .bind(&c.ids)
        .bind(&c.firsts)
        .bind(&c.lasts)
        .bind(&c.event_commands)
        .bind(&c.event_types_of_stream)
        .bind(&c.event_ids_of_stream)
        .bind(&c.sequences)
        .bind(&c.event_types)
        .bind(&c.event_versions)
        .bind(&c.payloads)
        .bind(&c.metadata)
        .bind(&c.event_ids);
    if let Some(j) = jobs {
        query = query
            .bind(&j.commands)
            .bind(&j.ids)
            .bind(&j.queues)
            .bind(&j.kinds)
            .bind(&j.payloads)
            .bind(&j.priorities)
            .bind(&j.run_ats)
            .bind(&j.max_attempts)
            .bind(&j.timeouts)
            .bind(&j.ordering_keys)
            .bind(&j.idempotency_keys)
            .bind(&j.workers)
            .bind(&j.leases)
            .bind(&j.completed)
            .bind(&j.completed_by);
    }
    let rows = query.fetch_all(&mut *conn).await?;

    let mut accepted = HashSet::new();
    let mut handed = HashSet::new();
    let mut written: HashMap<(String, String, i64), Position> = HashMap::new();
    for row in rows {
        let kind = row.try_get::<&str, _>("kind")?;
        if kind == "c" {
            accepted.insert(row.try_get::<Uuid, _>("command_id")?);
        } else if kind == "j" {
            handed.insert(row.try_get::<Uuid, _>("command_id")?);
        } else {
            written.insert(
                (
                    row.try_get("aggregate_type")?,
                    row.try_get("aggregate_id")?,
                    row.try_get("sequence")?,
                ),
                Position(row.try_get("global_position")?),
            );
        }
    }
    // A (stream, sequence) claimed by two requests of the group belongs to the first.
    let mut claimed = HashSet::new();
    let written = requests
        .iter()
        .map(|request| {
            if !accepted.contains(&request.command_id) {
                return Written::Duplicate;
            }
            let mut positions = Vec::with_capacity(request.events.len());
            for sequence in request.first_sequence()..=request.last_sequence() {
                let key = (
                    request.stream.aggregate_type.clone(),
                    request.stream.aggregate_id.clone(),
                    sequence,
                );
                match written.get(&key) {
                    Some(&position) if claimed.insert(key) => positions.push(position),
                    _ => return Written::Conflict(sequence),
                }
            }
            Written::Appended(CommandOutcome {
                command_id: request.command_id,
                stream: request.stream.clone(),
                first_sequence: request.first_sequence(),
                last_sequence: request.last_sequence(),
                positions,
            })
        })
        .collect();
    Ok((written, handed))
}

fn is_unique_violation(error: &LogError) -> bool {
    matches!(error, LogError::Database(sqlx::Error::Database(e)) if e.is_unique_violation())
}

async fn command_outcome(
    conn: &mut PgConnection,
    command_id: Uuid,
) -> Result<Option<CommandOutcome>, LogError> {
    let Some(row) = sqlx::query(COMMAND_OUTCOME)
        .bind(command_id)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(None);
    };
    let positions: Vec<i64> = row.try_get("positions")?;
    Ok(Some(CommandOutcome {
        command_id,
        stream: StreamId {
            aggregate_type: row.try_get("aggregate_type")?,
            aggregate_id: row.try_get("aggregate_id")?,
        },
        first_sequence: row.try_get("first_sequence")?,
        last_sequence: row.try_get("last_sequence")?,
        positions: positions.into_iter().map(Position).collect(),
    }))
}

/// Enqueues the jobs of the appends that were written, in their transaction, hand-offs claimed,
/// and records those appends' own jobs completed; returns the queues to wake, the hand-offs to
/// deliver and the completions to report after the commit.
async fn enqueue_written<'a>(
    conn: &mut PgConnection,
    appends: &'a [&Append],
    written: &[Written],
) -> Result<(Vec<String>, Vec<(Handoff, Job)>, Vec<&'a Completes>), LogError> {
    let completes = written_completions(appends.iter().copied(), written);
    crate::queue::postgres::complete_on(conn, &completes)
        .await
        .map_err(LogError::from_queue)?;
    let (jobs, handoffs) = written_jobs(appends.iter().copied(), written);
    if jobs.is_empty() {
        return Ok((Vec::new(), Vec::new(), completes));
    }
    let enqueued = crate::queue::postgres::enqueue_on(conn, jobs)
        .await
        .map_err(LogError::from_queue)?;
    let mut handed = Vec::new();
    for (handoff, id) in inserted_handoffs(&enqueued, handoffs) {
        let claimed =
            crate::queue::postgres::claim_handed(conn, id, handoff.worker(), handoff.lease())
                .await
                .map_err(LogError::from_queue)?;
        handed.extend(claimed.map(|job| (handoff, job)));
    }
    Ok((queues_to_wake(&enqueued, &handed), handed, completes))
}

#[async_trait]
impl GroupWriter for PgWriter {
    async fn write_group(&self, appends: &[Append]) -> Result<Vec<Written>, LogError> {
        let mut results: Vec<Option<Written>> = appends.iter().map(|_| None).collect();
        // A command id twice in one group: the later ones are duplicates of the first.
        let mut seen = HashSet::new();
        for (result, append) in results.iter_mut().zip(appends) {
            if !seen.insert(append.request.command_id) {
                *result = Some(Written::Duplicate);
            }
        }
        let pending: Vec<&Append> = appends
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_none())
            .map(|(append, _)| append)
            .collect();
        let requests: Vec<&AppendRequest> = pending.iter().map(|a| &a.request).collect();
        let mut enqueued: Vec<String> = Vec::new();

        // Fast path: one statement, committed on its own (one round trip, one flush), with the
        // jobs to enqueue and the running jobs to complete.
        let mut conn = self.kept.take().await?;
        let fast = if pending
            .iter()
            .all(|a| a.jobs.is_empty() && a.completes.is_none())
        {
            write_with(&mut conn, WRITE_GROUP, &requests).await
        } else {
            let jobs = JobColumns::new(&pending)?;
            let written =
                write_with_jobs(&mut conn, WRITE_GROUP_WITH_JOBS, &requests, Some(&jobs)).await;
            written.map(|(written, handed)| {
                // Committed: handed-off jobs go to their workers, the others wake their queues.
                for &(position, id) in &jobs.handoffs {
                    if handed.contains(&id) {
                        let append = pending[position];
                        if let Some(handoff) = &append.handoff {
                            handoff.deliver(id, &append.jobs[handoff.index]);
                        }
                    }
                }
                enqueued = jobs
                    .queues
                    .iter()
                    .zip(&jobs.ids)
                    .filter(|(_, id)| !handed.contains(id))
                    .map(|(queue, _)| queue.clone())
                    .collect();
                let completes: Vec<_> = pending
                    .iter()
                    .filter_map(|a| a.completes.as_ref())
                    .collect();
                enqueued.extend(completions_committed(&completes));
                written
            })
        };
        match fast {
            Ok(written) => {
                self.kept.keep(conn);
                self.jobs_enqueued(&enqueued);
                let mut written = written.into_iter();
                for result in results.iter_mut().filter(|r| r.is_none()) {
                    *result = written.next();
                }
                return Ok(results
                    .into_iter()
                    .map(|r| r.expect("one result each"))
                    .collect());
            }
            Err(e) if is_unique_violation(&e) => {}
            Err(e) => return Err(e),
        }

        // Some command is stale. Find which, in a transaction, and write the others.
        loop {
            let pending: Vec<usize> = (0..appends.len())
                .filter(|&i| results[i].is_none())
                .collect();
            if pending.is_empty() {
                break;
            }
            let batch: Vec<&Append> = pending.iter().map(|&i| &appends[i]).collect();
            let requests: Vec<&AppendRequest> = batch.iter().map(|a| &a.request).collect();
            let mut tx = conn.begin().await?;
            let written = write_with(&mut tx, WRITE_GROUP_TOLERANT, &requests).await?;
            if written.iter().any(|w| matches!(w, Written::Conflict(_))) {
                // Roll back the partial writes and write the rest again without the losers.
                tx.rollback().await?;
                for (&i, w) in pending.iter().zip(written) {
                    if let Written::Conflict(_) = w {
                        results[i] = Some(w);
                    }
                }
                continue;
            }
            let (queues, handed, completes) = enqueue_written(&mut tx, &batch, &written).await?;
            tx.commit().await?;
            enqueued.extend(queues);
            enqueued.extend(completions_committed(&completes));
            for (handoff, job) in handed {
                handoff.deliver_stored(job);
            }
            for (&i, w) in pending.iter().zip(written) {
                results[i] = Some(w);
            }
        }
        self.kept.keep(conn);
        self.jobs_enqueued(&enqueued);
        Ok(results
            .into_iter()
            .map(|r| r.expect("one result each"))
            .collect())
    }

    async fn outcome(&self, command_id: Uuid) -> Result<Option<CommandOutcome>, LogError> {
        let mut conn = self.pool.acquire().await?;
        command_outcome(&mut conn, command_id).await
    }
}

#[async_trait]
impl EventLog for PgEventLog {
    fn backend(&self) -> Backend {
        Backend::Postgres
    }

    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, LogError> {
        self.append_with_jobs(request, Vec::new()).await
    }

    async fn append_with_jobs(
        &self,
        request: AppendRequest,
        jobs: Vec<NewJob>,
    ) -> Result<AppendOutcome, LogError> {
        validate(&request)?;
        validate_jobs(&jobs)?;
        self.committer.call(Append::new(request, jobs)).await?
    }

    async fn begin(&self) -> Result<Box<dyn LogTransaction>, LogError> {
        Ok(Box::new(PgLogTransaction {
            tx: crate::store::begin_to_the_end(&self.pool, "BEGIN").await?,
            appended: false,
            deferred: false,
            hooks: Vec::new(),
            appends: self.appends.sender(),
        }))
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        after_sequence: i64,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        self.loader.call((stream.clone(), after_sequence)).await?
    }

    async fn command_outcome(&self, command_id: Uuid) -> Result<Option<CommandOutcome>, LogError> {
        self.writer.outcome(command_id).await
    }

    async fn read_all(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        let rows = sqlx::query(READ_LOG)
            .bind(after.0)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        let Some(first) = rows.first() else {
            return Ok(Vec::new());
        };
        if !first.try_get::<bool, _>("known")? {
            return Err(LogError::UnknownPosition(after));
        }
        rows.iter()
            .filter(|row| {
                matches!(
                    row.try_get::<Option<i64>, _>("global_position"),
                    Ok(Some(_))
                )
            })
            .map(event_from_row)
            .collect()
    }

    async fn head(&self) -> Result<Position, LogError> {
        let head: Option<i64> = sqlx::query_scalar("SELECT max(global_position) FROM events")
            .fetch_one(&self.pool)
            .await?;
        Ok(Position(head.unwrap_or(0)))
    }

    fn appends(&self) -> watch::Receiver<u64> {
        self.appends.subscribe()
    }

    async fn close(&self) {
        self.committer.close().await;
        self.loader.close().await;
        for task in std::mem::take(&mut *self.tasks.lock().expect("tasks lock")) {
            task.abort();
        }
        self.writer.kept.clear();
        self.loading.clear();
        self.writer.pool.close().await;
        self.pool.close().await;
    }
}

struct PgLogTransaction {
    hooks: Vec<Box<dyn FnOnce() + Send>>,
    tx: Transaction<'static, Postgres>,
    appended: bool,
    deferred: bool,
    appends: WakeHandle,
}

#[async_trait]
impl LogTransaction for PgLogTransaction {
    async fn append(&mut self, request: AppendRequest) -> Result<AppendOutcome, LogError> {
        validate(&request)?;
        sqlx::query("SAVEPOINT stele_append")
            .execute(&mut *self.tx)
            .await?;
        let written = write_with(&mut self.tx, WRITE_GROUP_TOLERANT, &[&request])
            .await?
            .pop()
            .expect("one result per request");
        if let Written::Appended(outcome) = written {
            sqlx::query("RELEASE SAVEPOINT stele_append")
                .execute(&mut *self.tx)
                .await?;
            self.appended = true;
            return Ok(AppendOutcome::Appended(outcome));
        }
        sqlx::query("ROLLBACK TO SAVEPOINT stele_append")
            .execute(&mut *self.tx)
            .await?;
        if let Some(error) = written.conflict_error(&request) {
            return Err(error);
        }
        match command_outcome(&mut self.tx, request.command_id).await? {
            Some(first) => Ok(AppendOutcome::Duplicate(first)),
            None => Err(LogError::Conflict {
                stream: request.stream.clone(),
                sequence: request.first_sequence(),
            }),
        }
    }

    async fn commit(mut self: Box<Self>) -> Result<(), LogError> {
        if self.appended && self.deferred {
            // Events are durable when their append returns: flush this commit after all.
            sqlx::query("SET LOCAL synchronous_commit = on")
                .execute(&mut *self.tx)
                .await?;
        }
        self.tx.commit().await?;
        if self.appended {
            self.appends.wake();
        }
        for hook in self.hooks {
            hook();
        }
        Ok(())
    }

    fn connection(&mut self) -> TxConnection<'_> {
        TxConnection::Postgres(&mut self.tx)
    }

    fn after_commit(&mut self, hook: Box<dyn FnOnce() + Send>) {
        self.hooks.push(hook);
    }

    async fn defer_flush(&mut self) -> Result<(), LogError> {
        sqlx::query("SET LOCAL synchronous_commit = off")
            .execute(&mut *self.tx)
            .await?;
        self.deferred = true;
        Ok(())
    }
}
