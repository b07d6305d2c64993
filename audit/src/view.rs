//! The audit view: who did what, when, through which channel, as part of which task or
//! conversation — one row per event, from its metadata — filtered by actor, subject, task,
//! stream and time. A projection of the log as stored (it names people by subject id only);
//! its table is write-once (triggers refuse `UPDATE` and `DELETE`) and changes only by replay.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use stele_engine::log::LogTransaction;
use stele_engine::projection::{Projection, ProjectionError, Tables};
use stele_engine::store::sql::{Db, Dialects, Row, Value as SqlValue};
use stele_engine::store::StorePool;
use stele_engine::RecordedEvent;

/// The audit view.
pub struct AuditView;

/// Its name (and its table's base name).
pub const AUDIT_VIEW: &str = "audit_events";

/// One event, as the audit view holds it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AuditRow {
    pub position: i64,
    pub recorded_at: DateTime<Utc>,
    /// Who caused it (`key:<id>`, `user:<name>`, `workflow-runtime`, `retention`, …).
    pub actor: String,
    pub channel: String,
    /// `type/id`.
    pub stream: String,
    pub event_type: String,
    /// The task it is part of, if any.
    pub task_id: Option<String>,
    /// The conversation it is part of, if any.
    pub conversation_id: Option<String>,
    /// The person whose data it holds, if any (their subject id).
    pub subject: Option<String>,
    pub correlation_id: String,
    pub causation_id: String,
}

/// Which rows.
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    pub actor: Option<String>,
    pub subject: Option<String>,
    pub task: Option<String>,
    /// `type/id`, or `type` for every stream of a type.
    pub stream: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Continue after this position.
    pub after: Option<i64>,
    pub limit: usize,
}

const CREATE: Dialects<&[&str]> = Dialects {
    postgres: &[
        "CREATE TABLE IF NOT EXISTS {table} ( \
            position bigint PRIMARY KEY, recorded_at timestamptz NOT NULL, actor text NOT NULL, \
            channel text NOT NULL, stream_type text NOT NULL, stream_id text NOT NULL, \
            event_type text NOT NULL, task_id text, conversation_id text, subject text, \
            correlation_id text NOT NULL, causation_id text NOT NULL)",
        "CREATE INDEX IF NOT EXISTS {table}_by_actor ON {table} (actor, position)",
        "CREATE INDEX IF NOT EXISTS {table}_by_task ON {table} (task_id, position)",
        "CREATE INDEX IF NOT EXISTS {table}_by_subject ON {table} (subject, position)",
        "CREATE INDEX IF NOT EXISTS {table}_by_stream ON {table} (stream_type, stream_id, position)",
        "CREATE INDEX IF NOT EXISTS {table}_by_time ON {table} (recorded_at, position)",
        "CREATE OR REPLACE FUNCTION stele_audit_view_write_once() RETURNS trigger LANGUAGE plpgsql AS \
            $$ BEGIN RAISE EXCEPTION 'stele: the audit view is write-once: % is not allowed', TG_OP \
            USING ERRCODE = 'restrict_violation'; END $$",
        "DROP TRIGGER IF EXISTS {table}_write_once ON {table}",
        "CREATE TRIGGER {table}_write_once BEFORE UPDATE OR DELETE OR TRUNCATE ON {table} \
            FOR EACH STATEMENT EXECUTE FUNCTION stele_audit_view_write_once()",
    ],
    sqlite: &[
        "CREATE TABLE IF NOT EXISTS {table} ( \
            position INTEGER PRIMARY KEY, recorded_at INTEGER NOT NULL, actor TEXT NOT NULL, \
            channel TEXT NOT NULL, stream_type TEXT NOT NULL, stream_id TEXT NOT NULL, \
            event_type TEXT NOT NULL, task_id TEXT, conversation_id TEXT, subject TEXT, \
            correlation_id TEXT NOT NULL, causation_id TEXT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS {table}_by_actor ON {table} (actor, position)",
        "CREATE INDEX IF NOT EXISTS {table}_by_task ON {table} (task_id, position)",
        "CREATE INDEX IF NOT EXISTS {table}_by_subject ON {table} (subject, position)",
        "CREATE INDEX IF NOT EXISTS {table}_by_stream ON {table} (stream_type, stream_id, position)",
        "CREATE INDEX IF NOT EXISTS {table}_by_time ON {table} (recorded_at, position)",
        "CREATE TRIGGER IF NOT EXISTS {table}_no_update BEFORE UPDATE ON {table} \
            BEGIN SELECT RAISE(ABORT, 'stele: the audit view is write-once: UPDATE is not allowed'); END",
        "CREATE TRIGGER IF NOT EXISTS {table}_no_delete BEFORE DELETE ON {table} \
            BEGIN SELECT RAISE(ABORT, 'stele: the audit view is write-once: DELETE is not allowed'); END",
    ],
};

const INSERT: Dialects<&str> = Dialects {
    postgres:
        "INSERT INTO {table} (position, recorded_at, actor, channel, stream_type, stream_id, \
                 event_type, task_id, conversation_id, subject, correlation_id, causation_id) \
               SELECT * FROM UNNEST($1::int8[], $2::timestamptz[], $3::text[], $4::text[], \
                 $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], \
                 $11::text[], $12::text[]) ON CONFLICT (position) DO NOTHING",
    sqlite: "INSERT INTO {table} (position, recorded_at, actor, channel, stream_type, stream_id, \
               event_type, task_id, conversation_id, subject, correlation_id, causation_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
             ON CONFLICT (position) DO NOTHING",
};

/// The first subject whose data an event holds (their values carry their subject id).
fn subject_of(value: &Value) -> Option<String> {
    match value {
        Value::Object(map) => {
            if map.len() == 1 {
                if let Some((key, body)) = map.iter().next() {
                    if matches!(key.as_str(), "$personal" | "$sealed" | "$erased") {
                        return body
                            .get("subject")
                            .and_then(Value::as_str)
                            .map(str::to_owned);
                    }
                }
            }
            map.values().find_map(subject_of)
        }
        Value::Array(items) => items.iter().find_map(subject_of),
        _ => None,
    }
}

/// The task an event is part of: its own stream, or its run's (a task's run is named after it;
/// a child run `<task>.<step>.<index>` after its parent).
fn task_of(event: &RecordedEvent) -> Option<String> {
    let id = &event.stream.aggregate_id;
    match event.stream.aggregate_type.as_str() {
        "task" => Some(id.clone()),
        "workflow_run" => Some(id.split('.').next().unwrap_or(id).to_owned()),
        _ => None,
    }
}

#[async_trait]
impl Projection for AuditView {
    fn name(&self) -> &'static str {
        AUDIT_VIEW
    }

    fn tables(&self) -> &'static [&'static str] {
        &[AUDIT_VIEW]
    }

    fn deferred_flush(&self) -> bool {
        // Derived from the log alone, row for row: a batch lost with a crash of the database is
        // written again, the same, from the checkpoint it left. (What is shown for good is the
        // sealer's signed checkpoints, which wait for the flush.)
        true
    }

    async fn create(
        &self,
        tx: &mut dyn LogTransaction,
        tables: &Tables,
    ) -> Result<(), ProjectionError> {
        let table = tables.name(AUDIT_VIEW);
        let mut db = Db::from(tx.connection());
        for sql in db.pick(&CREATE).iter() {
            db.execute(&sql.replace("{table}", &table), &[]).await?;
        }
        Ok(())
    }

    async fn apply(
        &self,
        tx: &mut dyn LogTransaction,
        tables: &Tables,
        events: &[RecordedEvent],
    ) -> Result<(), ProjectionError> {
        let table = tables.name(AUDIT_VIEW);
        let texts: Vec<[Option<String>; 5]> = events
            .iter()
            .map(|e| {
                [
                    task_of(e),
                    (e.stream.aggregate_type == "conversation")
                        .then(|| e.stream.aggregate_id.clone()),
                    subject_of(&e.payload),
                    Some(e.metadata.command.correlation_id.to_string()),
                    Some(e.metadata.command.causation_id.to_string()),
                ]
            })
            .collect();
        let rows: Vec<[SqlValue; 12]> = events
            .iter()
            .zip(&texts)
            .map(
                |(e, [task, conversation, subject, correlation, causation])| {
                    [
                        e.position.0.into(),
                        e.recorded_at.into(),
                        (&e.metadata.command.actor).into(),
                        (&e.metadata.command.channel).into(),
                        (&e.stream.aggregate_type).into(),
                        (&e.stream.aggregate_id).into(),
                        (&e.event_type).into(),
                        task.into(),
                        conversation.into(),
                        subject.into(),
                        correlation.into(),
                        causation.into(),
                    ]
                },
            )
            .collect();
        let mut db = Db::from(tx.connection());
        let insert = db.pick(&INSERT).replace("{table}", &table);
        db.execute_rows(&insert, &rows).await?;
        Ok(())
    }
}

fn audit_row(row: &Row) -> Result<AuditRow, sqlx::Error> {
    Ok(AuditRow {
        position: row.get("position")?,
        recorded_at: row.time("recorded_at")?,
        actor: row.get("actor")?,
        channel: row.get("channel")?,
        stream: format!(
            "{}/{}",
            row.get::<String>("stream_type")?,
            row.get::<String>("stream_id")?
        ),
        event_type: row.get("event_type")?,
        task_id: row.get("task_id")?,
        conversation_id: row.get("conversation_id")?,
        subject: row.get("subject")?,
        correlation_id: row.get("correlation_id")?,
        causation_id: row.get("causation_id")?,
    })
}

/// The rows matching `filter`, in log order, a page at a time.
pub async fn list(pool: &StorePool, filter: &AuditFilter) -> Result<Vec<AuditRow>, sqlx::Error> {
    let mut values: Vec<SqlValue<'_>> = Vec::new();
    let mut conditions = Vec::new();
    let (stream_type, stream_id) = match filter.stream.as_deref().map(|s| s.split_once('/')) {
        Some(Some((t, i))) => (Some(t.to_owned()), Some(i.to_owned())),
        Some(None) => (filter.stream.clone(), None),
        None => (None, None),
    };
    let texts = [
        ("actor", &filter.actor),
        ("subject", &filter.subject),
        ("task_id", &filter.task),
        ("stream_type", &stream_type),
        ("stream_id", &stream_id),
    ];
    for (column, value) in texts {
        if let Some(value) = value {
            values.push(value.into());
            conditions.push(format!("{column} = ${}", values.len()));
        }
    }
    if let Some(since) = filter.since {
        values.push(since.into());
        conditions.push(format!("recorded_at >= ${}", values.len()));
    }
    if let Some(until) = filter.until {
        values.push(until.into());
        conditions.push(format!("recorded_at < ${}", values.len()));
    }
    if let Some(after) = filter.after {
        values.push(after.into());
        conditions.push(format!("position > ${}", values.len()));
    }
    let mut sql = format!(
        "SELECT position, recorded_at, actor, channel, stream_type, stream_id, event_type, \
         task_id, conversation_id, subject, correlation_id, causation_id FROM {AUDIT_VIEW}"
    );
    if !conditions.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&conditions.join(" AND "));
    }
    values.push((filter.limit.clamp(1, 1000) as i64).into());
    sql.push_str(&format!(" ORDER BY position LIMIT ${}", values.len()));
    Db::from(pool)
        .fetch_all(&sql, &values)
        .await?
        .iter()
        .map(audit_row)
        .collect()
}
