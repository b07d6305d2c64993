//! `streams`: one row per stream (aggregate type and id, version, event count, first and last
//! event time). The CLI lists streams from it.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;
use stele_engine::log::{LogTransaction, TxConnection};
use stele_engine::projection::{Projection, ProjectionError, Tables};
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

#[async_trait]
impl Projection for StreamsView {
    fn name(&self) -> &'static str {
        "streams"
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
                        aggregate_type text NOT NULL, aggregate_id text NOT NULL, \
                        version bigint NOT NULL, events bigint NOT NULL, \
                        first_event_at timestamptz NOT NULL, last_event_at timestamptz NOT NULL, \
                        PRIMARY KEY (aggregate_type, aggregate_id))"
                ))
                .execute(conn)
                .await?;
            }
            TxConnection::Sqlite(conn) => {
                sqlx::query(&format!(
                    "CREATE TABLE IF NOT EXISTS {table} ( \
                        aggregate_type TEXT NOT NULL, aggregate_id TEXT NOT NULL, \
                        version INTEGER NOT NULL, events INTEGER NOT NULL, \
                        first_event_at INTEGER NOT NULL, last_event_at INTEGER NOT NULL, \
                        PRIMARY KEY (aggregate_type, aggregate_id)) WITHOUT ROWID"
                ))
                .execute(conn)
                .await?;
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
        let rows: Vec<StreamRow> = fold(events).into_values().collect();
        match tx.connection() {
            TxConnection::Postgres(conn) => {
                let sql = format!(
                    "INSERT INTO {table} AS t (aggregate_type, aggregate_id, version, events, \
                                               first_event_at, last_event_at) \
                     SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[], \
                                          $5::timestamptz[], $6::timestamptz[]) \
                     ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET \
                        version = greatest(t.version, excluded.version), \
                        events = t.events + excluded.events, \
                        first_event_at = least(t.first_event_at, excluded.first_event_at), \
                        last_event_at = greatest(t.last_event_at, excluded.last_event_at)"
                );
                sqlx::query(&sql)
                    .bind(
                        rows.iter()
                            .map(|r| r.aggregate_type.as_str())
                            .collect::<Vec<_>>(),
                    )
                    .bind(
                        rows.iter()
                            .map(|r| r.aggregate_id.as_str())
                            .collect::<Vec<_>>(),
                    )
                    .bind(rows.iter().map(|r| r.version).collect::<Vec<_>>())
                    .bind(rows.iter().map(|r| r.events).collect::<Vec<_>>())
                    .bind(rows.iter().map(|r| r.first_event_at).collect::<Vec<_>>())
                    .bind(rows.iter().map(|r| r.last_event_at).collect::<Vec<_>>())
                    .execute(conn)
                    .await?;
            }
            TxConnection::Sqlite(conn) => {
                let sql = format!(
                    "INSERT INTO {table} AS t (aggregate_type, aggregate_id, version, events, \
                                               first_event_at, last_event_at) \
                     VALUES (?, ?, ?, ?, ?, ?) \
                     ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET \
                        version = max(t.version, excluded.version), \
                        events = t.events + excluded.events, \
                        first_event_at = min(t.first_event_at, excluded.first_event_at), \
                        last_event_at = max(t.last_event_at, excluded.last_event_at)"
                );
                for row in &rows {
                    sqlx::query(&sql)
                        .bind(&row.aggregate_type)
                        .bind(&row.aggregate_id)
                        .bind(row.version)
                        .bind(row.events)
                        .bind(row.first_event_at.timestamp_micros())
                        .bind(row.last_event_at.timestamp_micros())
                        .execute(&mut *conn)
                        .await?;
                }
            }
        }
        Ok(())
    }
}

/// Streams, most recently active first, optionally of one aggregate type.
pub async fn list_streams(
    pool: &StorePool,
    aggregate_type: Option<&str>,
    limit: usize,
) -> Result<Vec<StreamRow>, sqlx::Error> {
    let limit = limit.max(1) as i64;
    match pool {
        StorePool::Postgres(pool) => {
            let sql = format!(
                "SELECT * FROM {TABLE} WHERE ($1::text IS NULL OR aggregate_type = $1) \
                 ORDER BY last_event_at DESC, aggregate_type, aggregate_id LIMIT $2"
            );
            sqlx::query(&sql)
                .bind(aggregate_type)
                .bind(limit)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|row| {
                    Ok(StreamRow {
                        aggregate_type: row.try_get("aggregate_type")?,
                        aggregate_id: row.try_get("aggregate_id")?,
                        version: row.try_get("version")?,
                        events: row.try_get("events")?,
                        first_event_at: row.try_get("first_event_at")?,
                        last_event_at: row.try_get("last_event_at")?,
                    })
                })
                .collect()
        }
        StorePool::Sqlite(pool) => {
            let sql = format!(
                "SELECT * FROM {TABLE} WHERE (?1 IS NULL OR aggregate_type = ?1) \
                 ORDER BY last_event_at DESC, aggregate_type, aggregate_id LIMIT ?2"
            );
            let time = |us: i64| DateTime::from_timestamp_micros(us).unwrap_or_default();
            sqlx::query(&sql)
                .bind(aggregate_type)
                .bind(limit)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|row| {
                    Ok(StreamRow {
                        aggregate_type: row.try_get("aggregate_type")?,
                        aggregate_id: row.try_get("aggregate_id")?,
                        version: row.try_get("version")?,
                        events: row.try_get("events")?,
                        first_event_at: time(row.try_get("first_event_at")?),
                        last_event_at: time(row.try_get("last_event_at")?),
                    })
                })
                .collect()
        }
    }
}
