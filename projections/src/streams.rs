//! `streams`: one row per stream (aggregate type and id, version, event count, first and last
//! event time). The CLI lists streams from it.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use stele_engine::log::LogTransaction;
use stele_engine::projection::{Projection, ProjectionError, Tables};
use stele_engine::store::sql::{Db, Dialects, Row, Value};
use stele_engine::store::StorePool;
use stele_engine::RecordedEvent;

/// The streams view.
pub struct StreamsView;

const TABLE: &str = "stream_view";

/// One row of the view.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StreamRow {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub version: i64,
    pub events: i64,
    pub first_event_at: DateTime<Utc>,
    pub last_event_at: DateTime<Utc>,
}

/// The batch folded per stream, so each stream is written once per batch.
fn fold(events: &[RecordedEvent]) -> BTreeMap<(&str, &str), StreamRow> {
    let mut rows: BTreeMap<(&str, &str), StreamRow> = BTreeMap::new();
    for event in events {
        let key = (
            event.stream.aggregate_type.as_str(),
            event.stream.aggregate_id.as_str(),
        );
        let row = rows.entry(key).or_insert_with(|| StreamRow {
            aggregate_type: event.stream.aggregate_type.clone(),
            aggregate_id: event.stream.aggregate_id.clone(),
            version: 0,
            events: 0,
            first_event_at: event.recorded_at,
            last_event_at: event.recorded_at,
        });
        row.version = row.version.max(event.sequence);
        row.events += 1;
        row.first_event_at = row.first_event_at.min(event.recorded_at);
        row.last_event_at = row.last_event_at.max(event.recorded_at);
    }
    rows
}

/// The view's statements in one dialect; `{table}` is the live table or its rebuild.
struct Statements {
    create: &'static str,
    /// Adds a batch of folded rows (see [`Db::execute_rows`]).
    upsert: &'static str,
    list: &'static str,
}

const SQL: Dialects<Statements> = Dialects {
    postgres: Statements {
        create: "CREATE TABLE IF NOT EXISTS {table} ( \
                    aggregate_type text NOT NULL, aggregate_id text NOT NULL, \
                    version bigint NOT NULL, events bigint NOT NULL, \
                    first_event_at timestamptz NOT NULL, last_event_at timestamptz NOT NULL, \
                    PRIMARY KEY (aggregate_type, aggregate_id))",
        upsert: "INSERT INTO {table} AS t (aggregate_type, aggregate_id, version, events, \
                                           first_event_at, last_event_at) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[], \
                                      $5::timestamptz[], $6::timestamptz[]) \
                 ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET \
                    version = greatest(t.version, excluded.version), \
                    events = t.events + excluded.events, \
                    first_event_at = least(t.first_event_at, excluded.first_event_at), \
                    last_event_at = greatest(t.last_event_at, excluded.last_event_at)",
        list: "SELECT * FROM {table} WHERE ($1::text IS NULL OR aggregate_type = $1) \
               ORDER BY last_event_at DESC, aggregate_type, aggregate_id LIMIT $2",
    },
    sqlite: Statements {
        create: "CREATE TABLE IF NOT EXISTS {table} ( \
                    aggregate_type TEXT NOT NULL, aggregate_id TEXT NOT NULL, \
                    version INTEGER NOT NULL, events INTEGER NOT NULL, \
                    first_event_at INTEGER NOT NULL, last_event_at INTEGER NOT NULL, \
                    PRIMARY KEY (aggregate_type, aggregate_id)) WITHOUT ROWID",
        upsert: "INSERT INTO {table} AS t (aggregate_type, aggregate_id, version, events, \
                                           first_event_at, last_event_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET \
                    version = max(t.version, excluded.version), \
                    events = t.events + excluded.events, \
                    first_event_at = min(t.first_event_at, excluded.first_event_at), \
                    last_event_at = max(t.last_event_at, excluded.last_event_at)",
        list: "SELECT * FROM {table} WHERE ($1 IS NULL OR aggregate_type = $1) \
               ORDER BY last_event_at DESC, aggregate_type, aggregate_id LIMIT $2",
    },
};

#[async_trait]
impl Projection for StreamsView {
    fn name(&self) -> &'static str {
        "streams"
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
        let mut db = Db::from(tx.connection());
        let create = db.pick(&SQL).create.replace("{table}", &tables.name(TABLE));
        db.execute(&create, &[]).await?;
        Ok(())
    }

    async fn apply(
        &self,
        tx: &mut dyn LogTransaction,
        tables: &Tables,
        events: &[RecordedEvent],
    ) -> Result<(), ProjectionError> {
        let folded = fold(events);
        let rows: Vec<[Value; 6]> = folded
            .values()
            .map(|row| {
                [
                    row.aggregate_type.as_str().into(),
                    row.aggregate_id.as_str().into(),
                    row.version.into(),
                    row.events.into(),
                    row.first_event_at.into(),
                    row.last_event_at.into(),
                ]
            })
            .collect();
        let mut db = Db::from(tx.connection());
        let upsert = db.pick(&SQL).upsert.replace("{table}", &tables.name(TABLE));
        db.execute_rows(&upsert, &rows).await?;
        Ok(())
    }
}

fn stream_row(row: &Row) -> Result<StreamRow, sqlx::Error> {
    Ok(StreamRow {
        aggregate_type: row.get("aggregate_type")?,
        aggregate_id: row.get("aggregate_id")?,
        version: row.get("version")?,
        events: row.get("events")?,
        first_event_at: row.time("first_event_at")?,
        last_event_at: row.time("last_event_at")?,
    })
}

/// Streams, most recently active first, optionally of one aggregate type.
pub async fn list_streams(
    pool: &StorePool,
    aggregate_type: Option<&str>,
    limit: usize,
) -> Result<Vec<StreamRow>, sqlx::Error> {
    let mut db = Db::from(pool);
    let list = db.pick(&SQL).list.replace("{table}", TABLE);
    let values = [aggregate_type.into(), (limit.max(1) as i64).into()];
    let rows = db.fetch_all(&list, &values).await?;
    rows.iter().map(stream_row).collect()
}
