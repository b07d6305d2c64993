//! `task_list`: one row per task (status, workflow, run, subject, requester, input, current
//! step, result or error), so the HTTP API can list tasks by filter, newest first, a page at a
//! time, without replaying each task's streams.
//!
//! The view reads the log as stored: a person's input, requester, result and error stay in it
//! as they are in the log, sealed with the person's key (the API opens them when it answers),
//! and when a person is erased (`SubjectErased`) their rows are rewritten to the erased form.
//!
//! It reads the `task` streams, and the events of each task's top-level run (the `workflow_run`
//! stream named after the task) to follow the step the task is at. Child runs and runs of no known
//! task are ignored.
//!
//! How events change rows is the pure fold in [`fold`]; this module reads and writes the rows
//! (its statements once per dialect in `SQL`, run by [`Db`]) and pages through them.
//!
//! Pages are keyset-paginated on (`created_position`, `task_id`) descending: a page starts after
//! the last row of the previous one, so rows neither repeat nor go missing while tasks are created.

mod fold;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use stele_engine::log::LogTransaction;
use stele_engine::projection::{Projection, ProjectionError, Tables};
use stele_engine::store::sql::{Db, Dialects, Row, Value as SqlValue};
use stele_engine::store::StorePool;
use stele_engine::RecordedEvent;

/// The tasks view.
pub struct TasksView;

const TABLE: &str = "task_list";

/// The largest page [`list_tasks`] returns.
pub const MAX_LIMIT: usize = 500;

/// The columns, in [`TaskRow`]'s order.
const COLUMNS: &str = "task_id, status, workflow, run_id, subject_id, requester, \
                       requester_channel, input, current_step, result, error, created_at, \
                       updated_at, created_position";

/// The view's secondary indexes: a name part (unique to the index) and its columns. Each
/// equality filter is on the leading column, and its index then holds the rows in page order.
const INDEXES: [(&str, &str); 6] = [
    ("by_position", "created_position, task_id"),
    // The time filters' range, for a window far from the newest tasks.
    ("by_created", "created_at, created_position"),
    ("by_status", "status, created_position, task_id"),
    ("by_workflow", "workflow, created_position, task_id"),
    ("by_subject", "subject_id, created_position, task_id"),
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
    /// The person who asked (none for tasks recorded before subjects).
    pub subject: Option<String>,
    /// The requester (`user_id`, `channel`), as stored: sealed with the subject's key.
    pub requester: Value,
    /// The channel the task came through (`api`, `telegram`, `email`, …).
    pub requester_channel: String,
    /// The task's input, in full, as stored: sealed with the subject's key.
    pub input: Value,
    /// The step the task's run is at; none before the run starts and once it ends.
    pub current_step: Option<String>,
    /// What the task produced, once completed (as stored).
    pub result: Option<Value>,
    /// Why the task failed, or the reason it was cancelled (as stored).
    pub error: Option<Value>,
    /// When the task was created (its `TaskCreated` was recorded).
    pub created_at: DateTime<Utc>,
    /// When the last event that changed this row was recorded.
    pub updated_at: DateTime<Utc>,
    /// The global position of the task's `TaskCreated`: the listing order.
    pub created_position: i64,
}

/// Which tasks to list, and where to start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskQuery {
    /// Only tasks with this status.
    pub status: Option<String>,
    /// Only tasks of this workflow.
    pub workflow: Option<String>,
    /// Only tasks of this subject.
    pub subject: Option<String>,
    /// Only tasks that came through this channel.
    pub channel: Option<String>,
    /// Only tasks created at or after this time.
    pub created_after: Option<DateTime<Utc>>,
    /// Only tasks created before this time.
    pub created_before: Option<DateTime<Utc>>,
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

/// The view's statements in one dialect. In every statement `{table}` is the live table or its
/// rebuild and `{columns}` is [`COLUMNS`]; an upsert's update is `{update}`, [`UPDATE`].
struct Statements {
    create: &'static str,
    /// The names of a table's indexes (`$1`: the table), as `name`.
    indexes: &'static str,
    /// Whether a relation named `$1` exists, as `taken`.
    taken: &'static str,
    /// The rows of the tasks `$1` (a list).
    load: &'static str,
    /// Writes a batch of folded rows (see [`Db::execute_rows`]).
    upsert: &'static str,
    /// Rewrites the rows of an erased subject (`$1`) to the erased form (`$2`).
    forget: &'static str,
}

const SQL: Dialects<Statements> = Dialects {
    postgres: Statements {
        create: "CREATE TABLE IF NOT EXISTS {table} ( \
                    task_id text PRIMARY KEY, status text NOT NULL, workflow text, \
                    run_id text, subject_id text, requester text NOT NULL, \
                    requester_channel text NOT NULL, input text NOT NULL, \
                    current_step text, result text, error text, \
                    created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL, \
                    created_position bigint NOT NULL)",
        indexes: "SELECT indexname::text AS name FROM pg_indexes \
                  WHERE schemaname = current_schema() AND tablename = $1",
        taken: "SELECT EXISTS (SELECT 1 FROM pg_class c \
                JOIN pg_namespace n ON n.oid = c.relnamespace \
                WHERE n.nspname = current_schema() AND c.relname = $1) AS taken",
        load: "SELECT {columns} FROM {table} WHERE task_id = ANY($1)",
        upsert: "INSERT INTO {table} ({columns}) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], \
                                      $5::text[], $6::text[], $7::text[], $8::text[], \
                                      $9::text[], $10::text[], $11::text[], \
                                      $12::timestamptz[], $13::timestamptz[], $14::int8[]) \
                 ON CONFLICT (task_id) DO UPDATE SET {update}",
        forget: FORGET,
    },
    sqlite: Statements {
        // A rowid table, not WITHOUT ROWID: rows hold the task's full input, and SQLite advises
        // WITHOUT ROWID only for small rows.
        create: "CREATE TABLE IF NOT EXISTS {table} ( \
                    task_id TEXT PRIMARY KEY NOT NULL, status TEXT NOT NULL, workflow TEXT, \
                    run_id TEXT, subject_id TEXT, requester TEXT NOT NULL, \
                    requester_channel TEXT NOT NULL, input TEXT NOT NULL, \
                    current_step TEXT, result TEXT, error TEXT, \
                    created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL, \
                    created_position INTEGER NOT NULL)",
        indexes: "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = $1",
        taken: "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = $1) AS taken",
        load: "SELECT {columns} FROM {table} WHERE task_id IN (SELECT value FROM json_each($1))",
        upsert: "INSERT INTO {table} ({columns}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
                 ON CONFLICT (task_id) DO UPDATE SET {update}",
        forget: FORGET,
    },
};

const FORGET: &str = "UPDATE {table} SET requester = $2, input = $2, \
                      result = CASE WHEN result IS NULL THEN NULL ELSE $2 END, \
                      error = CASE WHEN error IS NULL THEN NULL ELSE $2 END \
                      WHERE subject_id = $1";

/// The upsert's update: the folded row replaces the stored one (it was folded from it).
const UPDATE: &str = "status = excluded.status, workflow = excluded.workflow, \
                      run_id = excluded.run_id, subject_id = excluded.subject_id, \
                      requester = excluded.requester, \
                      requester_channel = excluded.requester_channel, input = excluded.input, \
                      current_step = excluded.current_step, result = excluded.result, \
                      error = excluded.error, created_at = excluded.created_at, \
                      updated_at = excluded.updated_at, created_position = excluded.created_position";

/// The row of one task, the same in both dialects.
const GET: &str = "SELECT {columns} FROM {table} WHERE task_id = $1";

/// `statement` for `table` (see [`Statements`]).
fn fill(statement: &str, table: &str) -> String {
    statement
        .replace("{table}", table)
        .replace("{columns}", COLUMNS)
        .replace("{update}", UPDATE)
}

#[async_trait]
impl Projection for TasksView {
    fn name(&self) -> &'static str {
        "task_list"
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
            "SubjectErased",
        ]
    }

    /// Derived from the log alone: a batch lost with the database is applied again.
    fn deferred_flush(&self) -> bool {
        true
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
        let mut db = Db::from(tx.connection());
        let sql = db.pick(&SQL);
        db.execute(&fill(sql.create, &table), &[]).await?;
        let existing = db.fetch_all(sql.indexes, &[table.as_str().into()]).await?;
        let existing = existing
            .iter()
            .map(|row| row.get("name"))
            .collect::<Result<Vec<String>, _>>()?;
        for (part, columns) in missing_indexes(&existing) {
            let mut name = String::new();
            for attempt in 0.. {
                name = index_name(&table, part, attempt);
                let taken = db.fetch_one(sql.taken, &[name.as_str().into()]).await?;
                if !taken.get::<bool>("taken")? {
                    break;
                }
            }
            let create = format!("CREATE INDEX {name} ON {table} ({columns})");
            db.execute(&create, &[]).await?;
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
        let mut db = Db::from(tx.connection());
        let sql = db.pick(&SQL);
        let ids = fold::tasks_to_load(events);
        let known: BTreeMap<String, TaskRow> = if ids.is_empty() {
            BTreeMap::new()
        } else {
            let rows = db
                .fetch_all(&fill(sql.load, &table), &[ids.as_slice().into()])
                .await?;
            rows.iter()
                .map(|row| task_row(row).map(|row| (row.task_id.clone(), row)))
                .collect::<Result<_, _>>()?
        };
        let rows = fold::fold(known, events)?;
        let texts: Vec<[String; 2]> = rows
            .iter()
            .map(|r| [r.requester.to_string(), r.input.to_string()])
            .collect();
        let optional: Vec<[Option<String>; 2]> = rows
            .iter()
            .map(|r| {
                [
                    r.result.as_ref().map(Value::to_string),
                    r.error.as_ref().map(Value::to_string),
                ]
            })
            .collect();
        let values: Vec<[SqlValue; 14]> = rows
            .iter()
            .zip(texts.iter().zip(&optional))
            .map(|(row, ([requester, input], [result, error]))| {
                [
                    (&row.task_id).into(),
                    (&row.status).into(),
                    (&row.workflow).into(),
                    (&row.run_id).into(),
                    (&row.subject).into(),
                    requester.into(),
                    (&row.requester_channel).into(),
                    input.into(),
                    (&row.current_step).into(),
                    result.into(),
                    error.into(),
                    row.created_at.into(),
                    row.updated_at.into(),
                    row.created_position.into(),
                ]
            })
            .collect();
        db.execute_rows(&fill(sql.upsert, &table), &values).await?;
        // An erased person's rows keep no sealed copy either.
        for subject in fold::erased_subjects(events) {
            let erased = serde_json::json!({ "$erased": { "subject": subject } }).to_string();
            db.execute(
                &fill(sql.forget, &table),
                &[subject.as_str().into(), erased.as_str().into()],
            )
            .await?;
        }
        Ok(())
    }
}

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

fn json_of(text: Option<String>) -> Result<Option<Value>, sqlx::Error> {
    text.map(|t| serde_json::from_str(&t))
        .transpose()
        .map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

fn task_row(row: &Row) -> Result<TaskRow, sqlx::Error> {
    Ok(TaskRow {
        task_id: row.get("task_id")?,
        status: row.get("status")?,
        workflow: row.get("workflow")?,
        run_id: row.get("run_id")?,
        subject: row.get("subject_id")?,
        requester: json_of(row.get("requester")?)?.unwrap_or_default(),
        requester_channel: row.get("requester_channel")?,
        input: json_of(row.get("input")?)?.unwrap_or_default(),
        current_step: row.get("current_step")?,
        result: json_of(row.get("result")?)?,
        error: json_of(row.get("error")?)?,
        created_at: row.time("created_at")?,
        updated_at: row.time("updated_at")?,
        created_position: row.get("created_position")?,
    })
}

/// A cursor: the page continues after the row at (`created_position`, `task_id`).
///
/// Written `<created_position>.<task_id as lowercase hex>`: URL-safe whatever the task id holds.
/// Public for readers that stop inside a page (a search that keeps some rows of each).
pub fn encode_cursor(row: &TaskRow) -> String {
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

/// The statement of a page: the query's filters, its cursor (continue after `after`), the order
/// and the limit (`limit` rows), with every value bound.
fn page<'a>(
    query: &'a TaskQuery,
    after: Option<&'a (i64, String)>,
    limit: i64,
) -> (String, Vec<SqlValue<'a>>) {
    let filters = [
        ("status", &query.status),
        ("workflow", &query.workflow),
        ("subject_id", &query.subject),
        ("requester_channel", &query.channel),
    ];
    let mut values: Vec<SqlValue<'a>> = Vec::new();
    let mut conditions = Vec::new();
    for (column, value) in filters {
        if let Some(value) = value {
            values.push(value.into());
            conditions.push(format!("{column} = ${}", values.len()));
        }
    }
    for (bound, operator) in [(&query.created_after, ">="), (&query.created_before, "<")] {
        if let Some(time) = bound {
            values.push((*time).into());
            conditions.push(format!("created_at {operator} ${}", values.len()));
        }
    }
    if let Some((position, task_id)) = after {
        values.push((*position).into());
        values.push(task_id.into());
        let n = values.len();
        conditions.push(format!("(created_position, task_id) < (${}, ${n})", n - 1));
    }
    let mut sql = fill("SELECT {columns} FROM {table}", TABLE);
    if !conditions.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&conditions.join(" AND "));
    }
    values.push(limit.into());
    let _ = write!(
        sql,
        " ORDER BY created_position DESC, task_id DESC LIMIT ${}",
        values.len()
    );
    (sql, values)
}

/// Tasks matching `query`, newest first (by the position of their creation), one page at a time.
///
/// An invalid `query.cursor` is [`TaskViewError::InvalidCursor`]. A cursor stays valid while tasks
/// are created: the next page starts after the last row of the previous one.
pub async fn list_tasks(pool: &StorePool, query: &TaskQuery) -> Result<TaskPage, TaskViewError> {
    let limit = query.limit.clamp(1, MAX_LIMIT);
    let after = query.cursor.as_deref().map(decode_cursor).transpose()?;
    // One row more than the page tells whether another page follows.
    let (sql, values) = page(query, after.as_ref(), limit as i64 + 1);
    let rows = Db::from(pool).fetch_all(&sql, &values).await?;
    let mut tasks = rows.iter().map(task_row).collect::<Result<Vec<_>, _>>()?;
    let next_cursor = if tasks.len() > limit {
        tasks.truncate(limit);
        tasks.last().map(encode_cursor)
    } else {
        None
    };
    Ok(TaskPage { tasks, next_cursor })
}

/// Which of `task_ids` the view holds as finished (completed, failed or cancelled).
pub async fn finished_tasks(
    pool: &StorePool,
    task_ids: &[String],
) -> Result<std::collections::BTreeSet<String>, TaskViewError> {
    let mut db = Db::from(pool);
    let sql = db.pick(&SQL);
    let mut finished = std::collections::BTreeSet::new();
    for chunk in task_ids.chunks(1000) {
        let rows = db
            .fetch_all(&fill(sql.load, TABLE), &[chunk.into()])
            .await?;
        for row in rows {
            let row = task_row(&row)?;
            if matches!(row.status.as_str(), "completed" | "failed" | "cancelled") {
                finished.insert(row.task_id);
            }
        }
    }
    Ok(finished)
}

/// One task's row, if the view has it.
pub async fn get_task_row(
    pool: &StorePool,
    task_id: &str,
) -> Result<Option<TaskRow>, TaskViewError> {
    let row = Db::from(pool)
        .fetch_optional(&fill(GET, TABLE), &[task_id.into()])
        .await?;
    Ok(row.as_ref().map(task_row).transpose()?)
}

#[cfg(test)]
mod tests {
    use super::fold::{RUN_END_EVENTS, STEP_EVENTS};
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_anything_else() {
        let row = TaskRow {
            task_id: "t.1/ü?".into(),
            status: "pending".into(),
            workflow: None,
            run_id: None,
            subject: None,
            requester: serde_json::json!({ "user_id": "u", "channel": "api" }),
            requester_channel: "api".into(),
            input: serde_json::json!("x"),
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
        assert_eq!(
            missing,
            ["by_position", "by_created", "by_subject", "by_channel"]
        );
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
        let task_types = read.iter().filter(|t| {
            !STEP_EVENTS.contains(t) && !RUN_END_EVENTS.contains(t) && **t != "SubjectErased"
        });
        assert_eq!(task_types.count(), 6, "the six task events");
    }
}
