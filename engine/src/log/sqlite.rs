//! The event log of the embedded mode, on SQLite (WAL).
//!
//! SQLite has one writer at a time, so every write goes through one connection: the group committer
//! gathers concurrent appends into one `BEGIN IMMEDIATE … COMMIT` (one fsync for many commands), and
//! a [`LogTransaction`] holds that connection while it is open. Because commits are serial, the
//! `global_position` order is the commit order and the global log is read by position alone.
//! Reads use a separate pool of read-only connections, which WAL lets run beside the writer.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, SqliteConnection, Transaction};
use tokio::sync::watch;
use uuid::Uuid;

use super::batch::{Batcher, GroupCommit, GroupWriter};
use super::{
    completions_committed, inserted_handoffs, json_text, queues_to_wake, validate, validate_jobs,
    written_completions, written_jobs, Append, AppendOutcome, AppendRequest, Backend,
    CommandOutcome, EventLog, JobsHook, LogError, LogTransaction, Position, RecordedEvent,
    StreamId, TxConnection, Written,
};
use crate::queue::handoff::{Completes, Handoff};
use crate::queue::{Job, NewJob};

const EVENT_COLUMNS: &str = "global_position, aggregate_type, aggregate_id, sequence, event_type, \
                             event_version, recorded_at, metadata, payload";

/// Tuning of the SQLite adapter.
#[derive(Clone, Debug)]
pub struct SqliteLogOptions {
    /// Most commands in one group (one transaction, one fsync).
    pub max_group: usize,
    /// Read-only connections.
    pub readers: u32,
}

impl Default for SqliteLogOptions {
    fn default() -> Self {
        Self {
            max_group: 1024,
            readers: 4,
        }
    }
}

/// The event log on an SQLite file. The schema must be migrated (see [`crate::store`]).
pub struct SqliteEventLog {
    writer: Arc<SqliteWriter>,
    readers: SqlitePool,
    committer: Batcher<GroupCommit<SqliteWriter>>,
    appends: watch::Sender<u64>,
}

struct SqliteWriter {
    pool: SqlitePool,
    jobs: JobsHook,
}

/// Makes sqlite-vec (vector search: the memory's index on the embedded store) part of every
/// SQLite connection opened from now on.
pub fn register_extensions() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        type Init = unsafe extern "C" fn(
            *mut libsqlite3_sys::sqlite3,
            *mut *mut std::os::raw::c_char,
            *const libsqlite3_sys::sqlite3_api_routines,
        ) -> std::os::raw::c_int;
        // SAFETY: `sqlite3_vec_init` is an SQLite extension entry point, which has exactly the
        // signature `sqlite3_auto_extension` expects of its argument (its binding declares it
        // without parameters); the SQLite it registers with is the one sqlx links.
        unsafe {
            let init: Init = std::mem::transmute(sqlite_vec::sqlite3_vec_init as *const ());
            libsqlite3_sys::sqlite3_auto_extension(Some(init));
        }
    });
}

/// Options shared by the writer and the readers: WAL, and a commit is durable when it returns
/// (`synchronous = FULL` syncs the WAL on every commit).
fn connect_options(path: &Path) -> SqliteConnectOptions {
    register_extensions();
    SqliteConnectOptions::new()
        .filename(path)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(30))
        .foreign_keys(true)
        // Pages read through a memory map rather than a read call each: scans over large
        // tables (the memory's vector search reads every vector) stay in the operating
        // system's page cache, shared by the connections. SQLite caps the size at its
        // compile-time maximum (2 GiB); the rest of a larger file is read as before.
        .pragma("mmap_size", "8589934592")
}

/// The single writer connection of an SQLite store (created if missing).
pub async fn writer_pool(path: &Path) -> Result<SqlitePool, sqlx::Error> {
    SqlitePoolOptions::new()
        .max_connections(1)
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(60))
        .connect_with(connect_options(path).create_if_missing(true))
        .await
}

impl SqliteEventLog {
    /// The read-only connections (a clone of the pool: the same connections).
    pub fn readers(&self) -> SqlitePool {
        self.readers.clone()
    }

    /// Opens the log on `writer` (see [`writer_pool`]), with read-only connections to `path`.
    pub async fn new(
        path: &Path,
        writer: SqlitePool,
        options: SqliteLogOptions,
    ) -> Result<Self, LogError> {
        let readers = SqlitePoolOptions::new()
            .max_connections(options.readers.max(1))
            .connect_with(connect_options(path).read_only(true))
            .await?;
        let (appends, _) = watch::channel(0);
        let writer = Arc::new(SqliteWriter {
            pool: writer,
            jobs: JobsHook::new(),
        });
        let bump = appends.clone();
        let committer = Batcher::start(
            Arc::new(GroupCommit {
                writer: writer.clone(),
                on_commit: Arc::new(move || bump.send_modify(|n: &mut u64| *n = n.wrapping_add(1))),
            }),
            1,
            options.max_group,
        );
        Ok(Self {
            writer,
            readers,
            committer,
            appends,
        })
    }

    /// Calls `hook` after each commit that enqueued jobs with an append (the store wakes its
    /// workers with it). Set once.
    pub(crate) fn on_jobs(&self, hook: crate::log::WakeQueues) {
        let _ = self.writer.jobs.set(hook);
    }

    /// The writer pool (one connection), for other tables of the embedded store.
    pub fn writer(&self) -> &SqlitePool {
        &self.writer.pool
    }
}

fn event_from_row(row: &SqliteRow) -> Result<RecordedEvent, LogError> {
    let position = Position(row.try_get("global_position")?);
    let corrupt = |reason: String| LogError::Corrupt { position, reason };
    let metadata: String = row.try_get("metadata")?;
    let payload: String = row.try_get("payload")?;
    let recorded_at: String = row.try_get("recorded_at")?;
    Ok(RecordedEvent {
        position,
        stream: StreamId {
            aggregate_type: row.try_get("aggregate_type")?,
            aggregate_id: row.try_get("aggregate_id")?,
        },
        sequence: row.try_get("sequence")?,
        event_type: row.try_get("event_type")?,
        event_version: row.try_get("event_version")?,
        recorded_at: DateTime::<Utc>::from_str(&recorded_at)
            .map_err(|e| corrupt(format!("recorded_at: {e}")))?,
        metadata: serde_json::from_str(&metadata).map_err(|e| corrupt(format!("metadata: {e}")))?,
        payload: serde_json::from_str(&payload).map_err(|e| corrupt(format!("payload: {e}")))?,
    })
}

/// Writes one request; on conflict its writes are rolled back (savepoint) and the rest of the
/// transaction stands.
async fn insert_request(
    conn: &mut SqliteConnection,
    request: &AppendRequest,
) -> Result<Written, LogError> {
    sqlx::query("SAVEPOINT stele_append")
        .execute(&mut *conn)
        .await?;
    let accepted = sqlx::query(
        "INSERT INTO commands (command_id, aggregate_type, aggregate_id, first_sequence, \
         last_sequence) VALUES (?, ?, ?, ?, ?) ON CONFLICT (command_id) DO NOTHING",
    )
    .bind(request.command_id.to_string())
    .bind(&request.stream.aggregate_type)
    .bind(&request.stream.aggregate_id)
    .bind(request.first_sequence())
    .bind(request.last_sequence())
    .execute(&mut *conn)
    .await?
    .rows_affected()
        == 1;
    let written = if accepted {
        let mut positions = Vec::with_capacity(request.events.len());
        let mut conflict = None;
        for (offset, event) in request.events.iter().enumerate() {
            let sequence = request.first_sequence() + offset as i64;
            let position: Option<i64> = sqlx::query_scalar(
                "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
                 event_version, payload, metadata, event_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (aggregate_type, aggregate_id, sequence) DO NOTHING \
                 RETURNING global_position",
            )
            .bind(&request.stream.aggregate_type)
            .bind(&request.stream.aggregate_id)
            .bind(sequence)
            .bind(&event.event_type)
            .bind(&event.event_version)
            .bind(json_text(&event.payload)?)
            .bind(json_text(&event.metadata)?)
            .bind(event.metadata.event_id.to_string())
            .fetch_optional(&mut *conn)
            .await?;
            match position {
                Some(position) => positions.push(Position(position)),
                None => {
                    conflict = Some(sequence);
                    break;
                }
            }
        }
        match conflict {
            Some(sequence) => Written::Conflict(sequence),
            None => Written::Appended(CommandOutcome {
                command_id: request.command_id,
                stream: request.stream.clone(),
                first_sequence: request.first_sequence(),
                last_sequence: request.last_sequence(),
                positions,
            }),
        }
    } else {
        Written::Duplicate
    };
    if matches!(written, Written::Conflict(_)) {
        sqlx::query("ROLLBACK TO SAVEPOINT stele_append")
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query("RELEASE SAVEPOINT stele_append")
        .execute(&mut *conn)
        .await?;
    Ok(written)
}

async fn command_outcome(
    conn: &mut SqliteConnection,
    command_id: Uuid,
) -> Result<Option<CommandOutcome>, LogError> {
    let Some(row) = sqlx::query(
        "SELECT aggregate_type, aggregate_id, first_sequence, last_sequence \
         FROM commands WHERE command_id = ?",
    )
    .bind(command_id.to_string())
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let stream = StreamId {
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
    };
    let (first_sequence, last_sequence): (i64, i64) = (
        row.try_get("first_sequence")?,
        row.try_get("last_sequence")?,
    );
    let positions: Vec<i64> = sqlx::query_scalar(
        "SELECT global_position FROM events WHERE aggregate_type = ? AND aggregate_id = ? \
         AND sequence BETWEEN ? AND ? ORDER BY sequence",
    )
    .bind(&stream.aggregate_type)
    .bind(&stream.aggregate_id)
    .bind(first_sequence)
    .bind(last_sequence)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Some(CommandOutcome {
        command_id,
        stream,
        first_sequence,
        last_sequence,
        positions: positions.into_iter().map(Position).collect(),
    }))
}

impl SqliteWriter {
    async fn begin(&self) -> Result<Transaction<'static, Sqlite>, LogError> {
        // IMMEDIATE takes the write lock now rather than at the first write, so a transaction
        // never fails half-way because another process started writing.
        Ok(crate::store::begin_to_the_end(&self.pool, "BEGIN IMMEDIATE").await?)
    }
}

/// The group's command rows as one JSON array (one statement instead of one per command).
#[derive(Serialize)]
struct CommandRow<'a> {
    c: String,
    t: &'a str,
    i: &'a str,
    f: i64,
    l: i64,
}

/// The group's events as one JSON array; payload and metadata are embedded as JSON values.
#[derive(Serialize)]
struct EventRow<'a> {
    t: &'a str,
    i: &'a str,
    s: i64,
    et: &'a str,
    ev: &'a str,
    p: &'a serde_json::Value,
    m: &'a crate::metadata::EventMetadata,
    e: String,
}

const INSERT_COMMANDS: &str = "\
    INSERT INTO commands (command_id, aggregate_type, aggregate_id, first_sequence, last_sequence) \
    SELECT value ->> 'c', value ->> 't', value ->> 'i', value ->> 'f', value ->> 'l' \
    FROM json_each(?1) WHERE true \
    ON CONFLICT (command_id) DO NOTHING \
    RETURNING command_id";

/// No `ON CONFLICT`: a stale command fails the statement, and the group is written again one
/// command at a time.
const INSERT_EVENTS: &str = "\
    INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
                        payload, metadata, event_id) \
    SELECT value ->> 't', value ->> 'i', value ->> 's', value ->> 'et', value ->> 'ev', \
           value -> 'p', value -> 'm', value ->> 'e' \
    FROM json_each(?1) ORDER BY key \
    RETURNING aggregate_type, aggregate_id, sequence, global_position";

/// Writes the whole group with two statements. `Ok(None)`: some command is stale (nothing of the
/// group is kept; the caller rolls back).
async fn write_fast(
    conn: &mut SqliteConnection,
    requests: &[&AppendRequest],
) -> Result<Option<Vec<Written>>, LogError> {
    let mut seen = HashSet::new();
    let commands: Vec<CommandRow> = requests
        .iter()
        .filter(|r| seen.insert(r.command_id))
        .map(|r| CommandRow {
            c: r.command_id.to_string(),
            t: &r.stream.aggregate_type,
            i: &r.stream.aggregate_id,
            f: r.first_sequence(),
            l: r.last_sequence(),
        })
        .collect();
    let accepted: HashSet<String> = sqlx::query_scalar(INSERT_COMMANDS)
        .bind(json_text(&commands)?)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect();
    // Requests whose command row went in here (the first of equal ids).
    let mut taken = HashSet::new();
    let writes: Vec<bool> = requests
        .iter()
        .map(|r| {
            let id = r.command_id.to_string();
            accepted.contains(&id) && taken.insert(id)
        })
        .collect();
    let mut events = Vec::new();
    for (request, _) in requests.iter().zip(&writes).filter(|(_, w)| **w) {
        for (offset, event) in request.events.iter().enumerate() {
            events.push(EventRow {
                t: &request.stream.aggregate_type,
                i: &request.stream.aggregate_id,
                s: request.first_sequence() + offset as i64,
                et: &event.event_type,
                ev: &event.event_version,
                p: &event.payload,
                m: &event.metadata,
                e: event.metadata.event_id.to_string(),
            });
        }
    }
    let mut positions: HashMap<(String, String, i64), i64> = HashMap::new();
    if !events.is_empty() {
        let rows = match sqlx::query(INSERT_EVENTS)
            .bind(json_text(&events)?)
            .fetch_all(&mut *conn)
            .await
        {
            Ok(rows) => rows,
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        for row in rows {
            positions.insert(
                (
                    row.try_get("aggregate_type")?,
                    row.try_get("aggregate_id")?,
                    row.try_get("sequence")?,
                ),
                row.try_get("global_position")?,
            );
        }
    }
    let mut written = Vec::with_capacity(requests.len());
    for (request, writes) in requests.iter().zip(writes) {
        if !writes {
            written.push(Written::Duplicate);
            continue;
        }
        let mut outcome = Vec::with_capacity(request.events.len());
        for sequence in request.first_sequence()..=request.last_sequence() {
            let key = (
                request.stream.aggregate_type.clone(),
                request.stream.aggregate_id.clone(),
                sequence,
            );
            match positions.get(&key) {
                Some(&position) => outcome.push(Position(position)),
                None => return Ok(None),
            }
        }
        written.push(Written::Appended(CommandOutcome {
            command_id: request.command_id,
            stream: request.stream.clone(),
            first_sequence: request.first_sequence(),
            last_sequence: request.last_sequence(),
            positions: outcome,
        }));
    }
    Ok(Some(written))
}

/// Enqueues the jobs of the appends that were written, in their transaction, hand-offs claimed,
/// and records those appends' own jobs completed; returns the queues to wake, the hand-offs to
/// deliver and the completions to report after the commit.
async fn enqueue_written<'a>(
    conn: &mut SqliteConnection,
    appends: &'a [Append],
    written: &[Written],
) -> Result<(Vec<String>, Vec<(Handoff, Job)>, Vec<&'a Completes>), LogError> {
    let completes = written_completions(appends, written);
    crate::queue::sqlite::complete_on(conn, &completes)
        .await
        .map_err(LogError::from_queue)?;
    let (jobs, handoffs) = written_jobs(appends, written);
    if jobs.is_empty() {
        return Ok((Vec::new(), Vec::new(), completes));
    }
    let enqueued = crate::queue::sqlite::enqueue_on(conn, jobs)
        .await
        .map_err(LogError::from_queue)?;
    let mut handed = Vec::new();
    for (handoff, id) in inserted_handoffs(&enqueued, handoffs) {
        let claimed =
            crate::queue::sqlite::claim_handed(conn, id, handoff.worker(), handoff.lease())
                .await
                .map_err(LogError::from_queue)?;
        handed.extend(claimed.map(|job| (handoff, job)));
    }
    Ok((queues_to_wake(&enqueued, &handed), handed, completes))
}

#[async_trait]
impl GroupWriter for SqliteWriter {
    async fn write_group(&self, appends: &[Append]) -> Result<Vec<Written>, LogError> {
        let requests: Vec<&AppendRequest> = appends.iter().map(|a| &a.request).collect();
        let mut tx = self.begin().await?;
        let written = match write_fast(&mut tx, &requests).await? {
            Some(written) => written,
            None => {
                // Some command is stale: write them one by one, each in a savepoint.
                tx.rollback().await?;
                tx = self.begin().await?;
                let mut written = Vec::with_capacity(requests.len());
                for request in &requests {
                    written.push(insert_request(&mut tx, request).await?);
                }
                written
            }
        };
        let (mut enqueued, handed, completes) = enqueue_written(&mut tx, appends, &written).await?;
        tx.commit().await?;
        for (handoff, job) in handed {
            handoff.deliver_stored(job);
        }
        enqueued.extend(completions_committed(&completes));
        if !enqueued.is_empty() {
            if let Some(hook) = self.jobs.get() {
                hook(&enqueued);
            }
        }
        Ok(written)
    }

    async fn outcome(&self, command_id: Uuid) -> Result<Option<CommandOutcome>, LogError> {
        let mut conn: PoolConnection<Sqlite> = self.pool.acquire().await?;
        command_outcome(&mut conn, command_id).await
    }
}

#[async_trait]
impl EventLog for SqliteEventLog {
    fn backend(&self) -> Backend {
        Backend::Sqlite
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
        Ok(Box::new(SqliteLogTransaction {
            tx: self.writer.begin().await?,
            appended: false,
            hooks: Vec::new(),
            appends: self.appends.clone(),
        }))
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        after_sequence: i64,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events \
             WHERE aggregate_type = ? AND aggregate_id = ? AND sequence > ? ORDER BY sequence"
        );
        sqlx::query(&sql)
            .bind(&stream.aggregate_type)
            .bind(&stream.aggregate_id)
            .bind(after_sequence)
            .fetch_all(&self.readers)
            .await?
            .iter()
            .map(event_from_row)
            .collect()
    }

    async fn command_outcome(&self, command_id: Uuid) -> Result<Option<CommandOutcome>, LogError> {
        let mut conn = self.readers.acquire().await?;
        command_outcome(&mut conn, command_id).await
    }

    async fn read_all(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE global_position > ? \
             ORDER BY global_position LIMIT ?"
        );
        let rows = sqlx::query(&sql)
            .bind(after.0)
            .bind(limit as i64)
            .fetch_all(&self.readers)
            .await?;
        if rows.is_empty() && after != Position::START {
            let known: Option<i64> =
                sqlx::query_scalar("SELECT 1 FROM events WHERE global_position = ?")
                    .bind(after.0)
                    .fetch_optional(&self.readers)
                    .await?;
            if known.is_none() {
                return Err(LogError::UnknownPosition(after));
            }
        }
        // One writer: commits in position order.
        rows.iter().map(event_from_row).collect()
    }

    async fn head(&self) -> Result<Position, LogError> {
        let head: Option<i64> = sqlx::query_scalar("SELECT max(global_position) FROM events")
            .fetch_one(&self.readers)
            .await?;
        Ok(Position(head.unwrap_or(0)))
    }

    fn appends(&self) -> watch::Receiver<u64> {
        self.appends.subscribe()
    }

    async fn close(&self) {
        self.committer.close().await;
        self.readers.close().await;
        self.writer.pool.close().await;
    }
}

struct SqliteLogTransaction {
    hooks: Vec<Box<dyn FnOnce() + Send>>,
    tx: Transaction<'static, Sqlite>,
    appended: bool,
    appends: watch::Sender<u64>,
}

#[async_trait]
impl LogTransaction for SqliteLogTransaction {
    async fn append(&mut self, request: AppendRequest) -> Result<AppendOutcome, LogError> {
        validate(&request)?;
        match insert_request(&mut self.tx, &request).await? {
            Written::Appended(outcome) => {
                self.appended = true;
                Ok(AppendOutcome::Appended(outcome))
            }
            Written::Conflict(sequence) => Err(LogError::Conflict {
                stream: request.stream,
                sequence,
            }),
            Written::Duplicate => match command_outcome(&mut self.tx, request.command_id).await? {
                Some(first) => Ok(AppendOutcome::Duplicate(first)),
                None => Err(LogError::Conflict {
                    sequence: request.first_sequence(),
                    stream: request.stream,
                }),
            },
        }
    }

    async fn commit(self: Box<Self>) -> Result<(), LogError> {
        self.tx.commit().await?;
        if self.appended {
            self.appends.send_modify(|n| *n = n.wrapping_add(1));
        }
        for hook in self.hooks {
            hook();
        }
        Ok(())
    }

    fn connection(&mut self) -> TxConnection<'_> {
        TxConnection::Sqlite(&mut self.tx)
    }

    fn after_commit(&mut self, hook: Box<dyn FnOnce() + Send>) {
        self.hooks.push(hook);
    }

    async fn defer_flush(&mut self) -> Result<(), LogError> {
        // SQLite sets how commits are flushed per connection, outside transactions: every
        // commit of the single writer stays flushed.
        Ok(())
    }
}
