//! `tasks`: one row per task (status, workflow, run, requester, input, current step, result or
//! error), so the HTTP API can list tasks by filter, newest first, a page at a time, without
//! replaying each task's streams.
//!
//! It reads the `task` streams, and the events of each task's top-level run (the `workflow_run`
//! stream named after the task) to follow the step the task is at. Child runs and runs of no known
//! task are ignored.
//!
//! Pages are keyset-paginated on (`created_position`, `task_id`) descending: a page starts after
//! the last row of the previous one, so rows neither repeat nor go missing while tasks are created.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{Postgres, QueryBuilder, Row, Sqlite};
use stele_engine::log::{LogTransaction, TxConnection};
use stele_engine::projection::{Projection, ProjectionError, Tables};
use stele_engine::store::StorePool;
use stele_engine::RecordedEvent;

/// The tasks view.
pub struct TasksView;

const TABLE: &str = "task_view";

/// The aggregate type of tasks' streams.
const TASK_STREAM: &str = "task";
/// The aggregate type of workflow runs' streams; a task's top-level run has the task's id.
const RUN_STREAM: &str = "workflow_run";

/// The run events that put the task at a step (their payload's `data.step`).
const STEP_EVENTS: [&str; 4] = [
    "StepScheduled",
    "WaitStarted",
    "TimerArmed",
    "ChildrenStarted",
];
/// The run events after which the task is at no step.
const RUN_END_EVENTS: [&str; 3] = ["RunCompleted", "RunFailed", "RunCancelled"];

/// The largest page [`list_tasks`] returns.
pub const MAX_LIMIT: usize = 500;

/// The columns, in [`TaskRow`]'s order.
const COLUMNS: &str = "task_id, status, workflow, run_id, requester_user, requester_channel, \
                       input, current_step, result, error, created_at, updated_at, \
                       created_position";

/// The view's secondary indexes: a name part (unique to the index) and its columns. Each filter
/// is an equality on the leading column, and each index then holds the rows in page order.
const INDEXES: [(&str, &str); 5] = [
    ("by_position", "created_position, task_id"),
    ("by_status", "status, created_position, task_id"),
    ("by_workflow", "workflow, created_position, task_id"),
    ("by_requester", "requester_user, created_position, task_id"),
    ("by_channel", "requester_channel, created_position, task_id"),
];

/// One task as the view holds it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TaskRow {
    pub task_id: String,
    /// `pending`, `routing`, `executing`, `completed`, `failed` or `cancelled`.
    pub status: String,
    /// The workflow asked for at creation, then the one the task was routed to.
    pub workflow: Option<String>,
    /// The task's workflow run, once routed.
    pub run_id: Option<String>,
    /// The requester's user id.
    pub requester_user: String,
    /// The channel the task came through (`api`, `telegram`, `email`, …).
    pub requester_channel: String,
    /// The task's input, in full.
    pub input: String,
    /// The step the task's run is at; none before the run starts and once it ends.
    pub current_step: Option<String>,
    /// What the task produced, once completed.
    pub result: Option<Value>,
    /// Why the task failed, or the reason it was cancelled.
    pub error: Option<String>,
    /// When the task was created (its `TaskCreated` was recorded).
    pub created_at: DateTime<Utc>,
    /// When the last event that changed this row was recorded.
    pub updated_at: DateTime<Utc>,
    /// The global position of the task's `TaskCreated`: the listing order.
    pub created_position: i64,
}

impl TaskRow {
    fn is_finished(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "failed" | "cancelled")
    }
}

/// Which tasks to list, and where to start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskQuery {
    /// Only tasks with this status.
    pub status: Option<String>,
    /// Only tasks of this workflow.
    pub workflow: Option<String>,
    /// Only tasks of this requester (user id).
    pub requester: Option<String>,
    /// Only tasks that came through this channel.
    pub channel: Option<String>,
    /// Where to continue: a [`TaskPage::next_cursor`] from the same filters; none for the first
    /// page.
    pub cursor: Option<String>,
    /// Tasks per page, clamped to `1..=`[`MAX_LIMIT`].
    pub limit: usize,
}

/// One page of tasks, newest first.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TaskPage {
    pub tasks: Vec<TaskRow>,
    /// The cursor of the next page; none when this page is the last.
    pub next_cursor: Option<String>,
}

/// Errors of reading the tasks view.
#[derive(Debug, thiserror::Error)]
pub enum TaskViewError {
    /// The cursor is not one a listing returned (a client error).
    #[error("invalid cursor: it is not one a task listing returned")]
    InvalidCursor,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// A task event as stored (`{"type": …, "data": …}`, see `stele_aggregates::task::TaskEvent`).
/// The view reads the wire form rather than the aggregate's type: it depends on the log only.
#[derive(Deserialize)]
#[serde(tag = "type", content = "data")]
enum TaskEvent {
    #[serde(rename = "TaskCreated")]
    Created {
        input: String,
        requester: Requester,
        workflow: Option<String>,
    },
    #[serde(rename = "TaskRoutingStarted")]
    RoutingStarted,
    #[serde(rename = "TaskRouted")]
    Routed { workflow: String, run_id: String },
    #[serde(rename = "TaskCompleted")]
    Completed { result: Value },
    #[serde(rename = "TaskFailed")]
    Failed { error: String },
    #[serde(rename = "TaskCancelled")]
    Cancelled { reason: String },
}

#[derive(Deserialize)]
struct Requester {
    user_id: String,
    channel: String,
}

/// The part of a run event that names its step.
#[derive(Deserialize)]
struct AtStep {
    data: Step,
}

#[derive(Deserialize)]
struct Step {
    step: String,
}

fn unreadable(event: &RecordedEvent, error: serde_json::Error) -> ProjectionError {
    ProjectionError::Apply(format!(
        "{} at {} of {} is unreadable: {error}",
        event.event_type, event.position, event.stream
    ))
}

/// The tasks an event is about, if any: task events, and events of a run named like a task.
fn task_of(event: &RecordedEvent) -> Option<&str> {
    match event.stream.aggregate_type.as_str() {
        TASK_STREAM | RUN_STREAM => Some(event.stream.aggregate_id.as_str()),
        _ => None,
    }
}

/// The tasks whose rows a batch changes but does not create: their rows are read first.
fn tasks_to_load(events: &[RecordedEvent]) -> Vec<String> {
    let created: BTreeSet<&str> = events
        .iter()
        .filter(|e| e.stream.aggregate_type == TASK_STREAM && e.event_type == "TaskCreated")
        .map(|e| e.stream.aggregate_id.as_str())
        .collect();
    events
        .iter()
        .filter_map(task_of)
        .filter(|id| !created.contains(id))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(str::to_owned)
        .collect()
}

/// Folds a batch into the rows it changes, starting from the rows it does not create (`known`),
/// so each row is written once per batch.
fn fold(
    mut known: BTreeMap<String, TaskRow>,
    events: &[RecordedEvent],
) -> Result<Vec<TaskRow>, ProjectionError> {
    let mut changed = BTreeSet::new();
    for event in events {
        let Some(id) = task_of(event) else { continue };
        let at = event.recorded_at;
        if event.stream.aggregate_type == TASK_STREAM {
            let change =
                TaskEvent::deserialize(&event.payload).map_err(|e| unreadable(event, e))?;
            let mut created = None;
            match (change, known.get_mut(id)) {
                (
                    TaskEvent::Created {
                        input,
                        requester,
                        workflow,
                    },
                    _,
                ) => {
                    created = Some(TaskRow {
                        task_id: id.to_owned(),
                        status: "pending".into(),
                        workflow,
                        run_id: None,
                        requester_user: requester.user_id,
                        requester_channel: requester.channel,
                        input,
                        current_step: None,
                        result: None,
                        error: None,
                        created_at: at,
                        updated_at: at,
                        created_position: event.position.0,
                    });
                }
                // A task event without its TaskCreated (skipped by an operator) has no row.
                (_, None) => continue,
                (TaskEvent::RoutingStarted, Some(row)) => row.status = "routing".into(),
                (TaskEvent::Routed { workflow, run_id }, Some(row)) => {
                    row.status = "executing".into();
                    row.workflow = Some(workflow);
                    row.run_id = Some(run_id);
                }
                (TaskEvent::Completed { result }, Some(row)) => {
                    row.status = "completed".into();
                    row.result = Some(result);
                    row.current_step = None;
                }
                (TaskEvent::Failed { error }, Some(row)) => {
                    row.status = "failed".into();
                    row.error = Some(error);
                    row.current_step = None;
                }
                (TaskEvent::Cancelled { reason }, Some(row)) => {
                    row.status = "cancelled".into();
                    row.error = Some(reason);
                    row.current_step = None;
                }
            }
            match created {
                Some(row) => {
                    known.insert(id.to_owned(), row);
                }
                None => {
                    if let Some(row) = known.get_mut(id) {
                        row.updated_at = row.updated_at.max(at);
                    }
                }
            }
        } else {
            // A run of no known task (a child run, a run started on its own) is not a task's; a
            // finished task's run has nothing more to show.
            let Some(row) = known.get_mut(id).filter(|row| !row.is_finished()) else {
                continue;
            };
            let event_type = event.event_type.as_str();
            if STEP_EVENTS.contains(&event_type) {
                let at_step =
                    AtStep::deserialize(&event.payload).map_err(|e| unreadable(event, e))?;
                row.current_step = Some(at_step.data.step);
            } else if RUN_END_EVENTS.contains(&event_type) {
                row.current_step = None;
            } else {
                continue;
            }
            row.updated_at = row.updated_at.max(at);
        }
        changed.insert(id.to_owned());
    }
    Ok(changed
        .into_iter()
        .filter_map(|id| known.remove(&id))
        .collect())
}

#[async_trait]
impl Projection for TasksView {
    fn name(&self) -> &'static str {
        "tasks"
    }

    fn event_types(&self) -> &'static [&'static str] {
        &[
            "TaskCreated",
            "TaskRoutingStarted",
            "TaskRouted",
            "TaskCompleted",
            "TaskFailed",
            "TaskCancelled",
            "StepScheduled",
            "WaitStarted",
            "TimerArmed",
            "ChildrenStarted",
            "RunCompleted",
            "RunFailed",
            "RunCancelled",
        ]
    }

    fn tables(&self) -> &'static [&'static str] {
        &[TABLE]
    }

    async fn create(
        &self,
        tx: &mut dyn LogTransaction,
        tables: &Tables,
    ) -> Result<(), ProjectionError> {
        let table = tables.name(TABLE);
        match tx.connection() {
            TxConnection::Postgres(conn) => {
                sqlx::query(&format!(
                    "CREATE TABLE IF NOT EXISTS {table} ( \
                        task_id text PRIMARY KEY, status text NOT NULL, workflow text, \
                        run_id text, requester_user text NOT NULL, \
                        requester_channel text NOT NULL, input text NOT NULL, \
                        current_step text, result text, error text, \
                        created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL, \
                        created_position bigint NOT NULL)"
                ))
                .execute(&mut *conn)
                .await?;
                let existing: Vec<String> = sqlx::query_scalar(
                    "SELECT indexname::text FROM pg_indexes \
                     WHERE schemaname = current_schema() AND tablename = $1",
                )
                .bind(&table)
                .fetch_all(&mut *conn)
                .await?;
                for (part, columns) in missing_indexes(&existing) {
                    let mut name = String::new();
                    for attempt in 0.. {
                        name = index_name(&table, part, attempt);
                        let taken: bool = sqlx::query_scalar(
                            "SELECT EXISTS (SELECT 1 FROM pg_class c \
                             JOIN pg_namespace n ON n.oid = c.relnamespace \
                             WHERE n.nspname = current_schema() AND c.relname = $1)",
                        )
                        .bind(&name)
                        .fetch_one(&mut *conn)
                        .await?;
                        if !taken {
                            break;
                        }
                    }
                    sqlx::query(&format!("CREATE INDEX {name} ON {table} ({columns})"))
                        .execute(&mut *conn)
                        .await?;
                }
            }
            TxConnection::Sqlite(conn) => {
                // A rowid table, not WITHOUT ROWID: rows hold the task's full input, and SQLite
                // advises WITHOUT ROWID only for small rows.
                sqlx::query(&format!(
                    "CREATE TABLE IF NOT EXISTS {table} ( \
                        task_id TEXT PRIMARY KEY NOT NULL, status TEXT NOT NULL, workflow TEXT, \
                        run_id TEXT, requester_user TEXT NOT NULL, \
                        requester_channel TEXT NOT NULL, input TEXT NOT NULL, \
                        current_step TEXT, result TEXT, error TEXT, \
                        created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL, \
                        created_position INTEGER NOT NULL)"
                ))
                .execute(&mut *conn)
                .await?;
                let existing: Vec<String> = sqlx::query_scalar(
                    "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?",
                )
                .bind(&table)
                .fetch_all(&mut *conn)
                .await?;
                for (part, columns) in missing_indexes(&existing) {
                    let mut name = String::new();
                    for attempt in 0.. {
                        name = index_name(&table, part, attempt);
                        let taken: bool = sqlx::query_scalar(
                            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = ?)",
                        )
                        .bind(&name)
                        .fetch_one(&mut *conn)
                        .await?;
                        if !taken {
                            break;
                        }
                    }
                    sqlx::query(&format!("CREATE INDEX {name} ON {table} ({columns})"))
                        .execute(&mut *conn)
                        .await?;
                }
            }
        }
        Ok(())
    }

    async fn apply(
        &self,
        tx: &mut dyn LogTransaction,
        tables: &Tables,
        events: &[RecordedEvent],
    ) -> Result<(), ProjectionError> {
        let table = tables.name(TABLE);
        let ids = tasks_to_load(events);
        let known: BTreeMap<String, TaskRow> = if ids.is_empty() {
            BTreeMap::new()
        } else {
            let rows = match tx.connection() {
                TxConnection::Postgres(conn) => {
                    let sql = format!("SELECT {COLUMNS} FROM {table} WHERE task_id = ANY($1)");
                    sqlx::query(&sql)
                        .bind(&ids)
                        .fetch_all(conn)
                        .await?
                        .iter()
                        .map(pg_row)
                        .collect::<Result<Vec<_>, _>>()?
                }
                TxConnection::Sqlite(conn) => {
                    // SQLite binds no arrays: the ids go in as one JSON array.
                    let sql = format!(
                        "SELECT {COLUMNS} FROM {table} \
                         WHERE task_id IN (SELECT value FROM json_each(?))"
                    );
                    let ids = serde_json::to_string(&ids)
                        .map_err(|e| ProjectionError::Apply(e.to_string()))?;
                    sqlx::query(&sql)
                        .bind(ids)
                        .fetch_all(conn)
                        .await?
                        .iter()
                        .map(sqlite_row)
                        .collect::<Result<Vec<_>, _>>()?
                }
            };
            rows.into_iter().map(|r| (r.task_id.clone(), r)).collect()
        };
        let rows = fold(known, events)?;
        if rows.is_empty() {
            return Ok(());
        }
        let results: Vec<Option<String>> = rows
            .iter()
            .map(|r| r.result.as_ref().map(Value::to_string))
            .collect();
        match tx.connection() {
            TxConnection::Postgres(conn) => {
                let sql = format!(
                    "INSERT INTO {table} ({COLUMNS}) \
                     SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], \
                                          $5::text[], $6::text[], $7::text[], $8::text[], \
                                          $9::text[], $10::text[], $11::timestamptz[], \
                                          $12::timestamptz[], $13::int8[]) \
                     ON CONFLICT (task_id) DO UPDATE SET {UPSERT}"
                );
                let text = |f: fn(&TaskRow) -> &str| rows.iter().map(f).collect::<Vec<_>>();
                let optional =
                    |f: fn(&TaskRow) -> Option<&str>| rows.iter().map(f).collect::<Vec<_>>();
                sqlx::query(&sql)
                    .bind(text(|r| &r.task_id))
                    .bind(text(|r| &r.status))
                    .bind(optional(|r| r.workflow.as_deref()))
                    .bind(optional(|r| r.run_id.as_deref()))
                    .bind(text(|r| &r.requester_user))
                    .bind(text(|r| &r.requester_channel))
                    .bind(text(|r| &r.input))
                    .bind(optional(|r| r.current_step.as_deref()))
                    .bind(&results)
                    .bind(optional(|r| r.error.as_deref()))
                    .bind(rows.iter().map(|r| r.created_at).collect::<Vec<_>>())
                    .bind(rows.iter().map(|r| r.updated_at).collect::<Vec<_>>())
                    .bind(rows.iter().map(|r| r.created_position).collect::<Vec<_>>())
                    .execute(conn)
                    .await?;
            }
            TxConnection::Sqlite(conn) => {
                let sql = format!(
                    "INSERT INTO {table} ({COLUMNS}) \
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
                     ON CONFLICT (task_id) DO UPDATE SET {UPSERT}"
                );
                for (row, result) in rows.iter().zip(&results) {
                    sqlx::query(&sql)
                        .bind(&row.task_id)
                        .bind(&row.status)
                        .bind(&row.workflow)
                        .bind(&row.run_id)
                        .bind(&row.requester_user)
                        .bind(&row.requester_channel)
                        .bind(&row.input)
                        .bind(&row.current_step)
                        .bind(result)
                        .bind(&row.error)
                        .bind(row.created_at.timestamp_micros())
                        .bind(row.updated_at.timestamp_micros())
                        .bind(row.created_position)
                        .execute(&mut *conn)
                        .await?;
                }
            }
        }
        Ok(())
    }
}

/// The upsert's update: the folded row replaces the stored one (it was folded from it).
const UPSERT: &str = "status = excluded.status, workflow = excluded.workflow, \
                      run_id = excluded.run_id, requester_user = excluded.requester_user, \
                      requester_channel = excluded.requester_channel, input = excluded.input, \
                      current_step = excluded.current_step, result = excluded.result, \
                      error = excluded.error, created_at = excluded.created_at, \
                      updated_at = excluded.updated_at, created_position = excluded.created_position";

/// The indexes of [`INDEXES`] that `existing` (the names of the table's indexes) lacks.
///
/// Indexes are found by name part, not full name: a rebuild renames its table to the live name
/// but its indexes keep the names they were created with, so the live table's indexes may be named
/// after the rebuild table.
fn missing_indexes(existing: &[String]) -> Vec<(&'static str, &'static str)> {
    INDEXES
        .into_iter()
        .filter(|(part, _)| {
            let end = format!("_{part}");
            let middle = format!("_{part}_");
            !existing
                .iter()
                .any(|name| name.ends_with(&end) || name.contains(&middle))
        })
        .collect()
}

/// The name to try for an index of `table`; a later attempt is needed when the name is taken (by
/// the live table's index that was created for a rebuild table of the same name).
fn index_name(table: &str, part: &str, attempt: u32) -> String {
    if attempt == 0 {
        format!("{table}_{part}")
    } else {
        format!("{table}_{part}_{attempt}")
    }
}

fn result_of(text: Option<String>) -> Result<Option<Value>, sqlx::Error> {
    text.map(|t| serde_json::from_str(&t))
        .transpose()
        .map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

fn pg_row(row: &sqlx::postgres::PgRow) -> Result<TaskRow, sqlx::Error> {
    Ok(TaskRow {
        task_id: row.try_get("task_id")?,
        status: row.try_get("status")?,
        workflow: row.try_get("workflow")?,
        run_id: row.try_get("run_id")?,
        requester_user: row.try_get("requester_user")?,
        requester_channel: row.try_get("requester_channel")?,
        input: row.try_get("input")?,
        current_step: row.try_get("current_step")?,
        result: result_of(row.try_get("result")?)?,
        error: row.try_get("error")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        created_position: row.try_get("created_position")?,
    })
}

fn sqlite_row(row: &sqlx::sqlite::SqliteRow) -> Result<TaskRow, sqlx::Error> {
    let time = |column: &str| -> Result<DateTime<Utc>, sqlx::Error> {
        Ok(DateTime::from_timestamp_micros(row.try_get(column)?).unwrap_or_default())
    };
    Ok(TaskRow {
        task_id: row.try_get("task_id")?,
        status: row.try_get("status")?,
        workflow: row.try_get("workflow")?,
        run_id: row.try_get("run_id")?,
        requester_user: row.try_get("requester_user")?,
        requester_channel: row.try_get("requester_channel")?,
        input: row.try_get("input")?,
        current_step: row.try_get("current_step")?,
        result: result_of(row.try_get("result")?)?,
        error: row.try_get("error")?,
        created_at: time("created_at")?,
        updated_at: time("updated_at")?,
        created_position: row.try_get("created_position")?,
    })
}

/// A cursor: the page continues after the row at (`created_position`, `task_id`).
///
/// Written `<created_position>.<task_id as lowercase hex>`: URL-safe whatever the task id holds.
fn encode_cursor(row: &TaskRow) -> String {
    let mut cursor = format!("{}.", row.created_position);
    for byte in row.task_id.bytes() {
        let _ = write!(cursor, "{byte:02x}");
    }
    cursor
}

fn decode_cursor(cursor: &str) -> Result<(i64, String), TaskViewError> {
    let (position, hex) = cursor.split_once('.').ok_or(TaskViewError::InvalidCursor)?;
    if position.is_empty()
        || !position.bytes().all(|b| b.is_ascii_digit())
        || hex.is_empty()
        || hex.len() % 2 != 0
        || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(TaskViewError::InvalidCursor);
    }
    let position = position
        .parse::<i64>()
        .map_err(|_| TaskViewError::InvalidCursor)?;
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| TaskViewError::InvalidCursor)?;
    let task_id = String::from_utf8(bytes).map_err(|_| TaskViewError::InvalidCursor)?;
    Ok((position, task_id))
}

/// Adds the query's filters, its cursor, the order and the limit (`limit` rows) to `sql`; every
/// value is bound.
fn push_query<'a, DB>(
    sql: &mut QueryBuilder<'a, DB>,
    query: &'a TaskQuery,
    after: Option<&'a (i64, String)>,
    limit: i64,
) where
    DB: sqlx::Database,
    &'a String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let filters = [
        ("status", &query.status),
        ("workflow", &query.workflow),
        ("requester_user", &query.requester),
        ("requester_channel", &query.channel),
    ];
    let mut first = true;
    let mut and = |sql: &mut QueryBuilder<'a, DB>| {
        sql.push(if first { " WHERE " } else { " AND " });
        first = false;
    };
    for (column, value) in filters {
        if let Some(value) = value {
            and(sql);
            sql.push(column).push(" = ").push_bind(value);
        }
    }
    if let Some((position, task_id)) = after {
        and(sql);
        sql.push("(created_position, task_id) < (")
            .push_bind(*position)
            .push(", ")
            .push_bind(task_id)
            .push(")");
    }
    sql.push(" ORDER BY created_position DESC, task_id DESC LIMIT ")
        .push_bind(limit);
}

/// Tasks matching `query`, newest first (by the position of their creation), one page at a time.
///
/// An invalid `query.cursor` is [`TaskViewError::InvalidCursor`]. A cursor stays valid while tasks
/// are created: the next page starts after the last row of the previous one.
pub async fn list_tasks(pool: &StorePool, query: &TaskQuery) -> Result<TaskPage, TaskViewError> {
    let limit = query.limit.clamp(1, MAX_LIMIT);
    let after = query.cursor.as_deref().map(decode_cursor).transpose()?;
    // One row more than the page tells whether another page follows.
    let fetch = limit as i64 + 1;
    let select = format!("SELECT {COLUMNS} FROM {TABLE}");
    let mut tasks = match pool {
        StorePool::Postgres(pool) => {
            let mut sql = QueryBuilder::<Postgres>::new(select);
            push_query(&mut sql, query, after.as_ref(), fetch);
            sql.build()
                .fetch_all(pool)
                .await?
                .iter()
                .map(pg_row)
                .collect::<Result<Vec<_>, _>>()?
        }
        StorePool::Sqlite(pool) => {
            let mut sql = QueryBuilder::<Sqlite>::new(select);
            push_query(&mut sql, query, after.as_ref(), fetch);
            sql.build()
                .fetch_all(pool)
                .await?
                .iter()
                .map(sqlite_row)
                .collect::<Result<Vec<_>, _>>()?
        }
    };
    let next_cursor = if tasks.len() > limit {
        tasks.truncate(limit);
        tasks.last().map(encode_cursor)
    } else {
        None
    };
    Ok(TaskPage { tasks, next_cursor })
}

/// One task's row, if the view has it.
pub async fn get_task_row(
    pool: &StorePool,
    task_id: &str,
) -> Result<Option<TaskRow>, TaskViewError> {
    let row = match pool {
        StorePool::Postgres(pool) => {
            let sql = format!("SELECT {COLUMNS} FROM {TABLE} WHERE task_id = $1");
            sqlx::query(&sql)
                .bind(task_id)
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(pg_row)
                .transpose()?
        }
        StorePool::Sqlite(pool) => {
            let sql = format!("SELECT {COLUMNS} FROM {TABLE} WHERE task_id = ?");
            sqlx::query(&sql)
                .bind(task_id)
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(sqlite_row)
                .transpose()?
        }
    };
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_anything_else() {
        let row = TaskRow {
            task_id: "t.1/ü?".into(),
            status: "pending".into(),
            workflow: None,
            run_id: None,
            requester_user: "u".into(),
            requester_channel: "api".into(),
            input: "x".into(),
            current_step: None,
            result: None,
            error: None,
            created_at: DateTime::default(),
            updated_at: DateTime::default(),
            created_position: 42,
        };
        let cursor = encode_cursor(&row);
        assert!(cursor
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.'));
        assert_eq!(decode_cursor(&cursor).unwrap(), (42, "t.1/ü?".to_owned()));
        for bad in [
            "",
            ".",
            "42",
            "42.",
            ".74",
            "-1.74",
            "+1.74",
            "x.74",
            "42.7",
            "42.7g",
            "42.C3",
            "42.ff",
            "99999999999999999999.74",
        ] {
            assert!(
                matches!(decode_cursor(bad), Err(TaskViewError::InvalidCursor)),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn index_parts_are_found_under_any_table_name() {
        let existing = vec![
            "task_view__rebuild_by_status".to_owned(),
            "task_view_by_workflow_1".to_owned(),
            "task_view_pkey".to_owned(),
        ];
        let missing: Vec<_> = missing_indexes(&existing)
            .into_iter()
            .map(|(part, _)| part)
            .collect();
        assert_eq!(missing, ["by_position", "by_requester", "by_channel"]);
    }

    #[test]
    fn the_view_reads_the_run_events_it_folds_under_their_recorded_names() {
        let read = TasksView.event_types();
        for run_type in STEP_EVENTS.iter().chain(&RUN_END_EVENTS) {
            assert!(read.contains(run_type), "{run_type}");
            assert!(
                stele_aggregates::workflow_run::RunEvent::TYPES.contains(run_type),
                "{run_type}"
            );
        }
        let task_types = read
            .iter()
            .filter(|t| !STEP_EVENTS.contains(t) && !RUN_END_EVENTS.contains(t));
        assert_eq!(task_types.count(), 6, "the six task events");
    }
}
