//! The event log on PostgreSQL.
//!
//! Writes go through the group committer: one transaction per group, each inserting all the group's
//! command rows and events with one `INSERT … SELECT FROM UNNEST` each.
//!
//! Reads of the global log are gap-safe: `global_position` comes from a sequence at insert time, so
//! concurrent transactions commit out of position order. The log is therefore read in
//! `(tx_id, global_position)` order and only up to the oldest transaction still open
//! (`pg_snapshot_xmin(pg_current_snapshot())`): every transaction that may still commit has a
//! transaction id at or above it, so a reader never passes an event that commits later. Transaction
//! ids are handed out at a transaction's first write, so a write that depends on another committed
//! write also comes later in this order.
//!
//! The cost of that guarantee: a long-open transaction anywhere in the cluster holds readers back
//! (not writers) until it ends.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgListener, PgPool, PgRow};
use sqlx::types::Json;
use sqlx::{PgConnection, Postgres, Row, Transaction};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::group_commit::{GroupCommitter, GroupWriter};
use super::{
    json_text, validate, AppendOutcome, AppendRequest, Backend, CommandOutcome, EventLog, LogBatch, LogError,
    LogTransaction, Position, RecordedEvent, StreamId, Written,
};
use crate::metadata::EventMetadata;

/// The LISTEN/NOTIFY channel the events table's trigger notifies.
const CHANNEL: &str = "stele_events";

const EVENT_COLUMNS: &str = "global_position, aggregate_type, aggregate_id, sequence, event_type, \
                             event_version, recorded_at, metadata, payload";

/// One page of the global log after the event at `$1` (0: from the start), up to `$2` events, in
/// one statement so that the page, the "held back" flag and the position check share a snapshot.
/// Always returns at least one row; an empty page is one row of NULL event columns.
const READ_LOG: &str = "\
    WITH horizon AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin), \
         cursor AS (SELECT tx_id, global_position FROM events WHERE global_position = $1 \
                    UNION ALL SELECT '0'::xid8, 0::int8 WHERE $1 = 0), \
         page AS (SELECT e.tx_id, e.global_position, e.aggregate_type, e.aggregate_id, e.sequence, \
                         e.event_type, e.event_version, e.recorded_at, e.metadata, e.payload \
                  FROM cursor c, horizon h, events e \
                  WHERE (e.tx_id, e.global_position) > (c.tx_id, c.global_position) \
                    AND e.tx_id < h.xmin \
                  ORDER BY e.tx_id, e.global_position LIMIT $2) \
    SELECT page.*, \
           EXISTS (SELECT 1 FROM cursor) AS known, \
           EXISTS (SELECT 1 FROM events e, horizon h WHERE e.tx_id >= h.xmin) AS held_back \
    FROM horizon LEFT JOIN page ON true \
    ORDER BY page.tx_id, page.global_position";

const INSERT_COMMANDS: &str = "\
    INSERT INTO commands (command_id, aggregate_type, aggregate_id, first_sequence, last_sequence) \
    SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::int8[], $5::int8[]) \
    ON CONFLICT (command_id) DO NOTHING \
    RETURNING command_id";

const INSERT_EVENTS: &str = "\
    INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
                        payload, metadata, event_id) \
    SELECT t, i, s, et, ev, p::jsonb, m::jsonb, e \
    FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[], $6::text[], \
                $7::text[], $8::uuid[]) AS u(t, i, s, et, ev, p, m, e) \
    ON CONFLICT (aggregate_type, aggregate_id, sequence) DO NOTHING \
    RETURNING aggregate_type, aggregate_id, sequence, global_position";

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
    /// LISTEN for appends by other processes.
    pub listen: bool,
}

impl Default for PgLogOptions {
    fn default() -> Self {
        Self {
            writers: 4,
            max_group: 512,
            listen: true,
        }
    }
}

/// The event log on PostgreSQL. The schema must be migrated (see [`crate::store`]).
pub struct PgEventLog {
    pool: PgPool,
    writer: Arc<PgWriter>,
    committer: GroupCommitter,
    appends: watch::Sender<u64>,
    listener: std::sync::Mutex<Option<JoinHandle<()>>>,
}

struct PgWriter {
    pool: PgPool,
}

impl PgEventLog {
    pub fn new(pool: PgPool, options: PgLogOptions) -> Self {
        let (appends, _) = watch::channel(0);
        let writer = Arc::new(PgWriter { pool: pool.clone() });
        let committer = GroupCommitter::start(
            writer.clone(),
            options.writers,
            options.max_group,
            appends.clone(),
        );
        let listener = options
            .listen
            .then(|| tokio::spawn(listen(pool.clone(), appends.clone())));
        Self {
            pool,
            writer,
            committer,
            appends,
            listener: std::sync::Mutex::new(listener),
        }
    }

    /// The connection pool (the same database holds other Stele tables).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// Bumps `appends` on every notification from the events table's trigger. On a lost connection it
/// bumps too (notifications may have been missed) and reconnects with a capped backoff.
async fn listen(pool: PgPool, appends: watch::Sender<u64>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(e) => {
                tracing::warn!(error = %e, "event log: cannot LISTEN, retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if let Err(e) = listener.listen(CHANNEL).await {
            tracing::warn!(error = %e, "event log: LISTEN failed, retrying");
            tokio::time::sleep(backoff).await;
            continue;
        }
        backoff = Duration::from_millis(100);
        // Anything appended while we were not listening is found by this read-through bump.
        appends.send_modify(|n| *n = n.wrapping_add(1));
        loop {
            match listener.try_recv().await {
                Ok(Some(_)) => appends.send_modify(|n| *n = n.wrapping_add(1)),
                Ok(None) => {
                    // The connection dropped and sqlx reconnected: notifications may be lost.
                    appends.send_modify(|n| *n = n.wrapping_add(1));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "event log: notification connection lost");
                    appends.send_modify(|n| *n = n.wrapping_add(1));
                    break;
                }
            }
            if appends.is_closed() {
                return;
            }
        }
    }
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

/// Inserts the requests' command rows and events; see [`GroupWriter::write_group`] for the result.
/// Conflicting requests may be partly written: the caller rolls back when any conflicts.
async fn insert_requests(
    conn: &mut PgConnection,
    requests: &[&AppendRequest],
) -> Result<Vec<Written>, LogError> {
    let mut command_ids = Vec::with_capacity(requests.len());
    let (mut types, mut ids, mut firsts, mut lasts) = (vec![], vec![], vec![], vec![]);
    for request in requests {
        command_ids.push(request.command_id);
        types.push(request.stream.aggregate_type.as_str());
        ids.push(request.stream.aggregate_id.as_str());
        firsts.push(request.first_sequence());
        lasts.push(request.last_sequence());
    }
    let accepted: HashSet<Uuid> = sqlx::query_scalar(INSERT_COMMANDS)
        .bind(&command_ids)
        .bind(&types)
        .bind(&ids)
        .bind(&firsts)
        .bind(&lasts)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect();

    let mut events = EventColumns::default();
    // Which request owns each (stream, sequence): the first one that claims it.
    let mut owner: HashMap<(&str, &str, i64), usize> = HashMap::new();
    for (index, request) in requests.iter().enumerate() {
        if !accepted.contains(&request.command_id) {
            continue;
        }
        for (offset, event) in request.events.iter().enumerate() {
            let sequence = request.first_sequence() + offset as i64;
            owner
                .entry((
                    request.stream.aggregate_type.as_str(),
                    request.stream.aggregate_id.as_str(),
                    sequence,
                ))
                .or_insert(index);
            events.push(request, sequence, event)?;
        }
    }
    let mut positions: Vec<Vec<(i64, Position)>> = vec![Vec::new(); requests.len()];
    if !events.event_ids.is_empty() {
        let rows = sqlx::query(INSERT_EVENTS)
            .bind(&events.types)
            .bind(&events.ids)
            .bind(&events.sequences)
            .bind(&events.event_types)
            .bind(&events.event_versions)
            .bind(&events.payloads)
            .bind(&events.metadata)
            .bind(&events.event_ids)
            .fetch_all(&mut *conn)
            .await?;
        for row in rows {
            let aggregate_type: &str = row.try_get("aggregate_type")?;
            let aggregate_id: &str = row.try_get("aggregate_id")?;
            let sequence: i64 = row.try_get("sequence")?;
            if let Some(&index) = owner.get(&(aggregate_type, aggregate_id, sequence)) {
                positions[index].push((sequence, Position(row.try_get("global_position")?)));
            }
        }
    }

    Ok(requests
        .iter()
        .zip(positions)
        .map(|(request, mut written)| {
            if !accepted.contains(&request.command_id) {
                return Written::Duplicate;
            }
            if written.len() < request.events.len() {
                let done: HashSet<i64> = written.iter().map(|(s, _)| *s).collect();
                let sequence = (request.first_sequence()..=request.last_sequence())
                    .find(|s| !done.contains(s))
                    .unwrap_or(request.first_sequence());
                return Written::Conflict(sequence);
            }
            written.sort_unstable_by_key(|(sequence, _)| *sequence);
            Written::Appended(CommandOutcome {
                command_id: request.command_id,
                stream: request.stream.clone(),
                first_sequence: request.first_sequence(),
                last_sequence: request.last_sequence(),
                positions: written.into_iter().map(|(_, p)| p).collect(),
            })
        })
        .collect())
}

/// The events of a group as column arrays, for `UNNEST`.
#[derive(Default)]
struct EventColumns<'a> {
    types: Vec<&'a str>,
    ids: Vec<&'a str>,
    sequences: Vec<i64>,
    event_types: Vec<&'a str>,
    event_versions: Vec<&'a str>,
    payloads: Vec<String>,
    metadata: Vec<String>,
    event_ids: Vec<Uuid>,
}

impl<'a> EventColumns<'a> {
    fn push(
        &mut self,
        request: &'a AppendRequest,
        sequence: i64,
        event: &'a super::NewEvent,
    ) -> Result<(), LogError> {
        self.types.push(&request.stream.aggregate_type);
        self.ids.push(&request.stream.aggregate_id);
        self.sequences.push(sequence);
        self.event_types.push(&event.event_type);
        self.event_versions.push(&event.event_version);
        self.payloads.push(json_text(&event.payload)?);
        self.metadata.push(json_text(&event.metadata)?);
        self.event_ids.push(event.metadata.event_id);
        Ok(())
    }
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

#[async_trait]
impl GroupWriter for PgWriter {
    async fn write_group(&self, requests: &[AppendRequest]) -> Result<Vec<Written>, LogError> {
        let mut results: Vec<Option<Written>> = requests.iter().map(|_| None).collect();
        // A command id twice in one group: the later ones are duplicates of the first.
        let mut seen = HashSet::new();
        for (result, request) in results.iter_mut().zip(requests) {
            if !seen.insert(request.command_id) {
                *result = Some(Written::Duplicate);
            }
        }
        loop {
            let pending: Vec<usize> = (0..requests.len())
                .filter(|&i| results[i].is_none())
                .collect();
            if pending.is_empty() {
                break;
            }
            let batch: Vec<&AppendRequest> = pending.iter().map(|&i| &requests[i]).collect();
            let mut tx = self.pool.begin().await?;
            let written = insert_requests(&mut tx, &batch).await?;
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
            tx.commit().await?;
            for (&i, w) in pending.iter().zip(written) {
                results[i] = Some(w);
            }
        }
        Ok(results.into_iter().map(|r| r.expect("every request has a result")).collect())
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
        validate(&request)?;
        self.committer.append(request).await
    }

    async fn begin(&self) -> Result<Box<dyn LogTransaction>, LogError> {
        Ok(Box::new(PgLogTransaction {
            tx: self.pool.begin().await?,
            appended: false,
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
             WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3 ORDER BY sequence"
        );
        sqlx::query(&sql)
            .bind(&stream.aggregate_type)
            .bind(&stream.aggregate_id)
            .bind(after_sequence)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(event_from_row)
            .collect()
    }

    async fn command_outcome(&self, command_id: Uuid) -> Result<Option<CommandOutcome>, LogError> {
        self.writer.outcome(command_id).await
    }

    async fn read_log(&self, after: Position, limit: usize) -> Result<LogBatch, LogError> {
        let rows = sqlx::query(READ_LOG)
            .bind(after.0)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        let Some(first) = rows.first() else {
            return Ok(LogBatch::default());
        };
        if !first.try_get::<bool, _>("known")? {
            return Err(LogError::UnknownPosition(after));
        }
        let held_back = first.try_get("held_back")?;
        let events = rows
            .iter()
            .filter(|row| matches!(row.try_get::<Option<i64>, _>("global_position"), Ok(Some(_))))
            .map(event_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(LogBatch { events, held_back })
    }

    fn appends(&self) -> watch::Receiver<u64> {
        self.appends.subscribe()
    }

    async fn close(&self) {
        self.committer.close().await;
        if let Some(listener) = self.listener.lock().expect("listener lock").take() {
            listener.abort();
        }
        self.pool.close().await;
    }
}

struct PgLogTransaction {
    tx: Transaction<'static, Postgres>,
    appended: bool,
    appends: watch::Sender<u64>,
}

#[async_trait]
impl LogTransaction for PgLogTransaction {
    async fn append(&mut self, request: AppendRequest) -> Result<AppendOutcome, LogError> {
        validate(&request)?;
        sqlx::query("SAVEPOINT stele_append")
            .execute(&mut *self.tx)
            .await?;
        let written = insert_requests(&mut self.tx, &[&request])
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

    async fn commit(self: Box<Self>) -> Result<(), LogError> {
        self.tx.commit().await?;
        if self.appended {
            self.appends.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(())
    }
}
