//! `subjects`: who is in which event. A projection of the stored log (sealed values stay
//! sealed: it reads only the subject ids their envelopes name) with two tables:
//!
//! - `subject_view`: one row per subject (registered, minor, merged into, erased, last seen),
//!   for listing subjects and for retention (how long since the person was last seen);
//! - `subject_event`: one row per (subject, event) whose payload holds the subject's data, or
//!   that belongs to the subject's own stream, for the export.
//!
//! It holds no personal data itself: subject ids are random ids.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use stele_engine::log::{LogTransaction, StreamId};
use stele_engine::projection::{Projection, ProjectionError, Tables};
use stele_engine::store::sql::{Db, Dialects, Row, Value};
use stele_engine::store::StorePool;
use stele_engine::{Position, RecordedEvent};

use crate::seal::subjects_in;

/// The subjects index.
pub struct SubjectIndex;

const VIEW: &str = "subject_view";
const EVENTS: &str = "subject_event";
/// The aggregate type of subjects (`Subject::TYPE`).
pub const SUBJECT_TYPE: &str = "subject";

/// One subject, as listed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SubjectRow {
    pub subject_id: String,
    pub registered_at: Option<DateTime<Utc>>,
    pub minor: bool,
    pub merged_into: Option<String>,
    pub erased_at: Option<DateTime<Utc>>,
    /// When an event last held their data.
    pub last_seen_at: DateTime<Utc>,
    /// How many events hold their data or belong to their stream.
    pub events: i64,
}

/// What a batch changes for one subject.
#[derive(Default)]
struct Change {
    registered_at: Option<DateTime<Utc>>,
    minor: bool,
    merged_into: Option<String>,
    erased_at: Option<DateTime<Utc>>,
    last_seen_at: Option<DateTime<Utc>>,
    events: i64,
}

const CREATE: Dialects<[&str; 3]> = Dialects {
    postgres: [
        "CREATE TABLE IF NOT EXISTS {view} ( \
            subject_id text PRIMARY KEY, registered_at timestamptz, minor boolean NOT NULL, \
            merged_into text, erased_at timestamptz, last_seen_at timestamptz NOT NULL, \
            events bigint NOT NULL)",
        "CREATE TABLE IF NOT EXISTS {events} ( \
            subject_id text NOT NULL, position bigint NOT NULL, stream_type text NOT NULL, \
            stream_id text NOT NULL, PRIMARY KEY (subject_id, position))",
        "SELECT 1",
    ],
    sqlite: [
        "CREATE TABLE IF NOT EXISTS {view} ( \
            subject_id TEXT PRIMARY KEY, registered_at INTEGER, minor INTEGER NOT NULL, \
            merged_into TEXT, erased_at INTEGER, last_seen_at INTEGER NOT NULL, \
            events INTEGER NOT NULL) WITHOUT ROWID",
        "CREATE TABLE IF NOT EXISTS {events} ( \
            subject_id TEXT NOT NULL, position INTEGER NOT NULL, stream_type TEXT NOT NULL, \
            stream_id TEXT NOT NULL, PRIMARY KEY (subject_id, position)) WITHOUT ROWID",
        "SELECT 1",
    ],
};

const UPSERT: Dialects<&str> = Dialects {
    postgres: "INSERT INTO {view} AS v (subject_id, registered_at, minor, merged_into, erased_at, \
                   last_seen_at, events) \
               SELECT s, r, m = 1, mi, e, l, n \
               FROM UNNEST($1::text[], $2::timestamptz[], $3::int8[], $4::text[], \
                           $5::timestamptz[], $6::timestamptz[], $7::int8[]) \
                    AS u(s, r, m, mi, e, l, n) \
               ON CONFLICT (subject_id) DO UPDATE SET \
                   registered_at = COALESCE(v.registered_at, excluded.registered_at), \
                   minor = v.minor OR excluded.minor, \
                   merged_into = COALESCE(excluded.merged_into, v.merged_into), \
                   erased_at = COALESCE(v.erased_at, excluded.erased_at), \
                   last_seen_at = GREATEST(v.last_seen_at, excluded.last_seen_at), \
                   events = v.events + excluded.events",
    sqlite: "INSERT INTO {view} AS v (subject_id, registered_at, minor, merged_into, erased_at, \
                 last_seen_at, events) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (subject_id) DO UPDATE SET \
                 registered_at = COALESCE(v.registered_at, excluded.registered_at), \
                 minor = MAX(v.minor, excluded.minor), \
                 merged_into = COALESCE(excluded.merged_into, v.merged_into), \
                 erased_at = COALESCE(v.erased_at, excluded.erased_at), \
                 last_seen_at = MAX(v.last_seen_at, excluded.last_seen_at), \
                 events = v.events + excluded.events",
};

const INSERT_EVENTS: Dialects<&str> = Dialects {
    postgres: "INSERT INTO {events} (subject_id, position, stream_type, stream_id) \
               SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[]) \
               ON CONFLICT DO NOTHING",
    sqlite: "INSERT INTO {events} (subject_id, position, stream_type, stream_id) \
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
};

/// The subjects an event concerns.
pub fn subjects_of(event: &RecordedEvent) -> BTreeSet<String> {
    let mut subjects = BTreeSet::new();
    subjects_in(&event.payload, &mut subjects);
    if event.stream.aggregate_type == SUBJECT_TYPE {
        subjects.insert(event.stream.aggregate_id.clone());
    }
    subjects
}

#[async_trait]
impl Projection for SubjectIndex {
    fn name(&self) -> &'static str {
        "subjects"
    }

    fn tables(&self) -> &'static [&'static str] {
        &[VIEW, EVENTS]
    }

    fn deferred_flush(&self) -> bool {
        // Derived from the log alone: a batch lost with a crash of the database is indexed again
        // from the checkpoint it left.
        true
    }

    async fn create(
        &self,
        tx: &mut dyn LogTransaction,
        tables: &Tables,
    ) -> Result<(), ProjectionError> {
        let mut db = Db::from(tx.connection());
        for sql in db.pick(&CREATE).to_owned() {
            let sql = sql
                .replace("{view}", &tables.name(VIEW))
                .replace("{events}", &tables.name(EVENTS));
            db.execute(&sql, &[]).await?;
        }
        Ok(())
    }

    async fn apply(
        &self,
        tx: &mut dyn LogTransaction,
        tables: &Tables,
        events: &[RecordedEvent],
    ) -> Result<(), ProjectionError> {
        let mut changes: BTreeMap<String, Change> = BTreeMap::new();
        let mut rows: Vec<(String, i64, String, String)> = Vec::new();
        for event in events {
            for subject in subjects_of(event) {
                let change = changes.entry(subject.clone()).or_default();
                change.events += 1;
                change.last_seen_at = change.last_seen_at.max(Some(event.recorded_at));
                if event.stream.aggregate_type == SUBJECT_TYPE
                    && event.stream.aggregate_id == subject
                {
                    match event.event_type.as_str() {
                        "SubjectRegistered" => {
                            change.registered_at = Some(event.recorded_at);
                            change.minor |= event.payload.pointer("/data/minor")
                                == Some(&serde_json::Value::Bool(true));
                        }
                        "MarkedMinor" => change.minor = true,
                        "SubjectMerged" => {
                            change.merged_into = event
                                .payload
                                .pointer("/data/into")
                                .and_then(|v| v.as_str())
                                .map(str::to_owned);
                        }
                        "SubjectErased" => change.erased_at = Some(event.recorded_at),
                        _ => {}
                    }
                }
                rows.push((
                    subject,
                    event.position.0,
                    event.stream.aggregate_type.clone(),
                    event.stream.aggregate_id.clone(),
                ));
            }
        }
        if rows.is_empty() {
            return Ok(());
        }
        let mut db = Db::from(tx.connection());
        let view = tables.name(VIEW);
        let upsert = db.pick(&UPSERT).replace("{view}", &view);
        // One statement for the batch's subjects (each once: `changes` is keyed by them).
        let values: Vec<[Value<'_>; 7]> = changes
            .iter()
            .map(|(subject, change)| {
                [
                    subject.into(),
                    change.registered_at.into(),
                    i64::from(change.minor).into(),
                    (&change.merged_into).into(),
                    change.erased_at.into(),
                    change.last_seen_at.into(),
                    change.events.into(),
                ]
            })
            .collect();
        db.execute_rows(&upsert, &values).await?;
        let insert = db
            .pick(&INSERT_EVENTS)
            .replace("{events}", &tables.name(EVENTS));
        let rows: Vec<[Value<'_>; 4]> = rows
            .iter()
            .map(|(subject, position, kind, id)| {
                [subject.into(), (*position).into(), kind.into(), id.into()]
            })
            .collect();
        db.execute_rows(&insert, &rows).await?;
        Ok(())
    }
}

fn subject_row(row: &Row) -> Result<SubjectRow, sqlx::Error> {
    Ok(SubjectRow {
        subject_id: row.get("subject_id")?,
        registered_at: row.optional_time("registered_at")?,
        minor: row.get::<i64>("minor")? != 0,
        merged_into: row.get("merged_into")?,
        erased_at: row.optional_time("erased_at")?,
        last_seen_at: row.time("last_seen_at")?,
        events: row.get("events")?,
    })
}

const COLUMNS: Dialects<&str> = Dialects {
    postgres: "subject_id, registered_at, CASE WHEN minor THEN 1::int8 ELSE 0 END AS minor, \
               merged_into, erased_at, last_seen_at, events",
    sqlite: "subject_id, registered_at, minor, merged_into, erased_at, last_seen_at, events",
};

/// Registered subjects, by id, a page at a time (after `after`, at most `limit`).
pub async fn list_subjects(
    pool: &StorePool,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<SubjectRow>, sqlx::Error> {
    let mut db = Db::from(pool);
    let sql = format!(
        "SELECT {} FROM {VIEW} WHERE registered_at IS NOT NULL AND subject_id > $1 \
         ORDER BY subject_id LIMIT {}",
        db.pick(&COLUMNS),
        limit.min(1000)
    );
    db.fetch_all(&sql, &[after.unwrap_or("").into()])
        .await?
        .iter()
        .map(subject_row)
        .collect()
}

/// One subject's row.
pub async fn subject_row_of(
    pool: &StorePool,
    subject: &str,
) -> Result<Option<SubjectRow>, sqlx::Error> {
    let mut db = Db::from(pool);
    let sql = format!(
        "SELECT {} FROM {VIEW} WHERE subject_id = $1",
        db.pick(&COLUMNS)
    );
    db.fetch_optional(&sql, &[subject.into()])
        .await?
        .as_ref()
        .map(subject_row)
        .transpose()
}

/// The streams holding the subjects' data, with the positions concerned, in log order.
pub async fn events_of(
    pool: &StorePool,
    subjects: &[String],
) -> Result<Vec<(Position, StreamId)>, sqlx::Error> {
    let mut db = Db::from(pool);
    let mut found = Vec::new();
    for subject in subjects {
        let rows = db
            .fetch_all(
                &format!(
                    "SELECT position, stream_type, stream_id FROM {EVENTS} WHERE subject_id = $1 \
                     ORDER BY position"
                ),
                &[subject.into()],
            )
            .await?;
        for row in rows {
            found.push((
                Position(row.get("position")?),
                StreamId::new(
                    row.get::<String>("stream_type")?,
                    row.get::<String>("stream_id")?,
                ),
            ));
        }
    }
    found.sort();
    found.dedup();
    Ok(found)
}

/// The ids of the streams of `stream_type` that hold the subjects' data.
pub async fn streams_of(
    pool: &StorePool,
    subjects: &[String],
    stream_type: &str,
) -> Result<Vec<String>, sqlx::Error> {
    let mut db = Db::from(pool);
    let mut found = BTreeSet::new();
    for subject in subjects {
        let rows = db
            .fetch_all(
                &format!(
                    "SELECT DISTINCT stream_id FROM {EVENTS} \
                     WHERE subject_id = $1 AND stream_type = $2"
                ),
                &[subject.into(), stream_type.into()],
            )
            .await?;
        for row in rows {
            found.insert(row.get::<String>("stream_id")?);
        }
    }
    Ok(found.into_iter().collect())
}
