//! One executor for the tables that both stores keep alike: checkpoints and read models.
//!
//! The event log and the job queue are two adapters each (`log/{postgres,sqlite}.rs`,
//! `queue/{postgres,sqlite}.rs`): their algorithms differ by store (group commit, `SKIP LOCKED`).
//! Checkpoints and read models do the same work on both; only the SQL text and the
//! representation of some values differ. So a concern writes its statements once per dialect, all
//! of one dialect in one place (a [`Dialects`] value, usually of consts), and each operation once:
//! it picks its statement with [`Db::pick`], binds [`Value`]s and reads [`Row`]s, and [`Db`]
//! turns those into each store's types:
//!
//! | value | PostgreSQL | SQLite |
//! |---|---|---|
//! | a time ([`Value::Time`], [`Row::time`]) | `timestamptz` | microseconds since the epoch |
//! | a span ([`Value::Span`]: a lease, a staleness limit) | seconds, for `make_interval(secs => $n)` | microseconds |
//! | a list of texts ([`Value::Texts`]) | an array: `= ANY($n)` | one JSON array: `IN (SELECT value FROM json_each($n))` |
//! | a batch of rows ([`Db::execute_rows`]) | one statement, each column an array: `UNNEST($1::text[], …)` | the statement once per row |
//! | the current time | the statement's `now()` (the transaction's start) | bound by the executor, see below |
//!
//! **The time on SQLite.** SQLite's own clock functions give milliseconds at best, while the
//! stored times are microseconds written from Rust; so on SQLite the executor binds the current
//! time (microseconds) after a statement's own parameters: in a statement of three parameters it
//! is `$4`. PostgreSQL statements say `now()` instead and get no such parameter.
//!
//! Placeholders are `$n` in both dialects: sqlx numbers SQLite's `$n` as PostgreSQL does, so a
//! statement that needs no dialect of its own is one const used by both.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::sqlite::{SqliteArguments, SqliteRow};
use sqlx::{Arguments, Database, Pool, Postgres, Row as _, Sqlite};

use super::StorePool;
use crate::log::TxConnection;

/// The two SQL dialects Stele speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Sqlite,
}

/// Something (usually a struct of statements) in each dialect.
#[derive(Clone, Copy, Debug)]
pub struct Dialects<T> {
    pub postgres: T,
    pub sqlite: T,
}

impl<T> Dialects<T> {
    /// The one for `dialect`.
    pub fn of(&self, dialect: Dialect) -> &T {
        match dialect {
            Dialect::Postgres => &self.postgres,
            Dialect::Sqlite => &self.sqlite,
        }
    }
}

/// A value to bind, in no store's representation yet.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value<'a> {
    Text(Option<&'a str>),
    Int(Option<i64>),
    Time(Option<DateTime<Utc>>),
    /// A length of time: seconds (`float8`) on PostgreSQL, microseconds on SQLite.
    Span(Duration),
    /// Texts: an array on PostgreSQL, one JSON array on SQLite.
    Texts(&'a [String]),
}

impl<'a> From<&'a str> for Value<'a> {
    fn from(value: &'a str) -> Self {
        Value::Text(Some(value))
    }
}

impl<'a> From<&'a String> for Value<'a> {
    fn from(value: &'a String) -> Self {
        Value::Text(Some(value))
    }
}

impl<'a> From<Option<&'a str>> for Value<'a> {
    fn from(value: Option<&'a str>) -> Self {
        Value::Text(value)
    }
}

impl<'a> From<&'a Option<String>> for Value<'a> {
    fn from(value: &'a Option<String>) -> Self {
        Value::Text(value.as_deref())
    }
}

impl From<i64> for Value<'_> {
    fn from(value: i64) -> Self {
        Value::Int(Some(value))
    }
}

impl From<Option<i64>> for Value<'_> {
    fn from(value: Option<i64>) -> Self {
        Value::Int(value)
    }
}

impl From<DateTime<Utc>> for Value<'_> {
    fn from(value: DateTime<Utc>) -> Self {
        Value::Time(Some(value))
    }
}

impl From<Option<DateTime<Utc>>> for Value<'_> {
    fn from(value: Option<DateTime<Utc>>) -> Self {
        Value::Time(value)
    }
}

impl From<Duration> for Value<'_> {
    fn from(value: Duration) -> Self {
        Value::Span(value)
    }
}

impl<'a> From<&'a [String]> for Value<'a> {
    fn from(value: &'a [String]) -> Self {
        Value::Texts(value)
    }
}

fn micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

/// A column type both stores decode the same way (text, integers, booleans, and their options).
pub trait Column:
    for<'r> sqlx::Decode<'r, Postgres>
    + sqlx::Type<Postgres>
    + for<'r> sqlx::Decode<'r, Sqlite>
    + sqlx::Type<Sqlite>
{
}

impl<T> Column for T where
    T: for<'r> sqlx::Decode<'r, Postgres>
        + sqlx::Type<Postgres>
        + for<'r> sqlx::Decode<'r, Sqlite>
        + sqlx::Type<Sqlite>
{
}

/// A row read from either store.
pub enum Row {
    Postgres(PgRow),
    Sqlite(SqliteRow),
}

impl Row {
    /// The value of `column`.
    pub fn get<T: Column>(&self, column: &str) -> Result<T, sqlx::Error> {
        match self {
            Row::Postgres(row) => row.try_get(column),
            Row::Sqlite(row) => row.try_get(column),
        }
    }

    /// The time in `column`.
    pub fn time(&self, column: &str) -> Result<DateTime<Utc>, sqlx::Error> {
        match self {
            Row::Postgres(row) => row.try_get(column),
            Row::Sqlite(row) => Ok(from_micros(row.try_get(column)?)),
        }
    }

    /// The time in `column`, which may be null.
    pub fn optional_time(&self, column: &str) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        match self {
            Row::Postgres(row) => row.try_get(column),
            Row::Sqlite(row) => Ok(row.try_get::<Option<i64>, _>(column)?.map(from_micros)),
        }
    }
}

/// A connection: borrowed (a transaction's), or taken from a pool at the first statement and
/// kept until dropped.
enum Conn<'c, DB: Database> {
    Pool(&'c Pool<DB>, Option<PoolConnection<DB>>),
    Borrowed(&'c mut DB::Connection),
}

impl<DB: Database> Conn<'_, DB> {
    async fn get(&mut self) -> Result<&mut DB::Connection, sqlx::Error> {
        match self {
            Conn::Borrowed(conn) => Ok(conn),
            Conn::Pool(pool, held) => {
                if held.is_none() {
                    *held = Some(pool.acquire().await?);
                }
                Ok(held.as_mut().expect("acquired above"))
            }
        }
    }
}

/// Runs statements on either store: a store's pool, or a transaction's connection.
pub struct Db<'c>(Target<'c>);

enum Target<'c> {
    Postgres(Conn<'c, Postgres>),
    Sqlite(Conn<'c, Sqlite>),
}

impl<'c> From<&'c StorePool> for Db<'c> {
    fn from(pool: &'c StorePool) -> Self {
        Db(match pool {
            StorePool::Postgres(pool) => Target::Postgres(Conn::Pool(pool, None)),
            StorePool::Sqlite(pool) => Target::Sqlite(Conn::Pool(pool, None)),
        })
    }
}

impl<'c> From<TxConnection<'c>> for Db<'c> {
    fn from(conn: TxConnection<'c>) -> Self {
        Db(match conn {
            TxConnection::Postgres(conn) => Target::Postgres(Conn::Borrowed(conn)),
            TxConnection::Sqlite(conn) => Target::Sqlite(Conn::Borrowed(conn)),
        })
    }
}

impl Db<'_> {
    /// Which store it runs on.
    pub fn dialect(&self) -> Dialect {
        match self.0 {
            Target::Postgres(_) => Dialect::Postgres,
            Target::Sqlite(_) => Dialect::Sqlite,
        }
    }

    /// This store's statements of `statements`.
    pub fn pick<'s, T>(&self, statements: &'s Dialects<T>) -> &'s T {
        statements.of(self.dialect())
    }

    /// Runs `sql`; returns how many rows it changed.
    pub async fn execute(&mut self, sql: &str, values: &[Value<'_>]) -> Result<u64, sqlx::Error> {
        Ok(match &mut self.0 {
            Target::Postgres(conn) => {
                let query = sqlx::query_with(sql, postgres_arguments(values)?);
                query.execute(conn.get().await?).await?.rows_affected()
            }
            Target::Sqlite(conn) => {
                let query = sqlx::query_with(sql, sqlite_arguments(values)?);
                query.execute(conn.get().await?).await?.rows_affected()
            }
        })
    }

    /// The rows `sql` returns.
    pub async fn fetch_all(
        &mut self,
        sql: &str,
        values: &[Value<'_>],
    ) -> Result<Vec<Row>, sqlx::Error> {
        Ok(match &mut self.0 {
            Target::Postgres(conn) => {
                let query = sqlx::query_with(sql, postgres_arguments(values)?);
                let rows = query.fetch_all(conn.get().await?).await?;
                rows.into_iter().map(Row::Postgres).collect()
            }
            Target::Sqlite(conn) => {
                let query = sqlx::query_with(sql, sqlite_arguments(values)?);
                let rows = query.fetch_all(conn.get().await?).await?;
                rows.into_iter().map(Row::Sqlite).collect()
            }
        })
    }

    /// The first row `sql` returns, if any.
    pub async fn fetch_optional(
        &mut self,
        sql: &str,
        values: &[Value<'_>],
    ) -> Result<Option<Row>, sqlx::Error> {
        Ok(match &mut self.0 {
            Target::Postgres(conn) => {
                let query = sqlx::query_with(sql, postgres_arguments(values)?);
                let row = query.fetch_optional(conn.get().await?).await?;
                row.map(Row::Postgres)
            }
            Target::Sqlite(conn) => {
                let query = sqlx::query_with(sql, sqlite_arguments(values)?);
                let row = query.fetch_optional(conn.get().await?).await?;
                row.map(Row::Sqlite)
            }
        })
    }

    /// The first row `sql` returns; [`sqlx::Error::RowNotFound`] when there is none.
    pub async fn fetch_one(&mut self, sql: &str, values: &[Value<'_>]) -> Result<Row, sqlx::Error> {
        self.fetch_optional(sql, values)
            .await?
            .ok_or(sqlx::Error::RowNotFound)
    }

    /// Writes a batch of rows with `sql`: on PostgreSQL once, each column bound as an array (the
    /// statement reads them with `UNNEST`); on SQLite once per row. Every row has the same kinds
    /// of values in the same order. Nothing is run for no rows.
    pub async fn execute_rows<'v, R>(&mut self, sql: &str, rows: &[R]) -> Result<(), sqlx::Error>
    where
        R: AsRef<[Value<'v>]> + Sync,
    {
        if rows.is_empty() {
            return Ok(());
        }
        match &mut self.0 {
            Target::Postgres(conn) => {
                let query = sqlx::query_with(sql, postgres_columns(rows)?);
                query.execute(conn.get().await?).await?;
            }
            Target::Sqlite(conn) => {
                let conn = conn.get().await?;
                for row in rows {
                    let query = sqlx::query_with(sql, sqlite_arguments(row.as_ref())?);
                    query.execute(&mut *conn).await?;
                }
            }
        }
        Ok(())
    }
}

fn postgres_arguments(values: &[Value<'_>]) -> Result<PgArguments, sqlx::Error> {
    let mut arguments = PgArguments::default();
    for value in values {
        match *value {
            Value::Text(text) => arguments.add(text),
            Value::Int(int) => arguments.add(int),
            Value::Time(time) => arguments.add(time),
            Value::Span(span) => arguments.add(span.as_secs_f64()),
            Value::Texts(texts) => arguments.add(texts),
        }
        .map_err(sqlx::Error::Encode)?;
    }
    Ok(arguments)
}

/// `values`, then the current time (see the module doc).
fn sqlite_arguments<'q>(values: &[Value<'q>]) -> Result<SqliteArguments<'q>, sqlx::Error> {
    let mut arguments = SqliteArguments::default();
    for value in values {
        match *value {
            Value::Text(text) => arguments.add(text),
            Value::Int(int) => arguments.add(int),
            Value::Time(time) => arguments.add(time.map(micros)),
            Value::Span(span) => arguments.add(span.as_micros() as i64),
            Value::Texts(texts) => serde_json::to_string(texts)
                .map_err(Into::into)
                .and_then(|json| arguments.add(json)),
        }
        .map_err(sqlx::Error::Encode)?;
    }
    arguments
        .add(micros(Utc::now()))
        .map_err(sqlx::Error::Encode)?;
    Ok(arguments)
}

/// The rows' columns, each bound as one array.
fn postgres_columns<'v, R: AsRef<[Value<'v>]>>(rows: &[R]) -> Result<PgArguments, sqlx::Error> {
    fn column<'v, T, R: AsRef<[Value<'v>]>>(
        rows: &[R],
        index: usize,
        cell: impl Fn(Value<'v>) -> Option<T>,
    ) -> Result<Vec<T>, sqlx::Error> {
        rows.iter()
            .map(|row| row.as_ref().get(index).copied().and_then(&cell))
            .collect::<Option<Vec<T>>>()
            .ok_or_else(|| {
                sqlx::Error::Encode(
                    format!(
                        "column {} of a batch holds different kinds of values",
                        index + 1
                    )
                    .into(),
                )
            })
    }
    let mut arguments = PgArguments::default();
    for (index, first) in rows[0].as_ref().iter().enumerate() {
        let added = match first {
            Value::Text(_) => arguments.add(column(rows, index, |v| match v {
                Value::Text(text) => Some(text),
                _ => None,
            })?),
            Value::Int(_) => arguments.add(column(rows, index, |v| match v {
                Value::Int(int) => Some(int),
                _ => None,
            })?),
            Value::Time(_) => arguments.add(column(rows, index, |v| match v {
                Value::Time(time) => Some(time),
                _ => None,
            })?),
            Value::Span(_) | Value::Texts(_) => Err(format!(
                "column {} of a batch: spans and lists are not bound as columns",
                index + 1
            )
            .into()),
        };
        added.map_err(sqlx::Error::Encode)?;
    }
    Ok(arguments)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_binds_one_array_per_column() {
        let at = DateTime::from_timestamp_micros(1).unwrap();
        let rows = [
            [Value::from("a"), Value::from(1), Value::from(at)],
            [Value::Text(None), Value::Int(None), Value::Time(None)],
        ];
        assert_eq!(postgres_columns(&rows).unwrap().len(), 3);
    }

    #[test]
    fn a_batch_column_keeps_one_kind() {
        let rows = [[Value::from("a")], [Value::from(1)]];
        let error = postgres_columns(&rows).unwrap_err().to_string();
        assert!(error.contains("column 1"), "{error}");
    }

    #[test]
    fn sqlite_gets_the_time_after_the_statement_parameters() {
        let arguments = sqlite_arguments(&[Value::from("a"), Value::Span(Duration::ZERO)]).unwrap();
        assert_eq!(arguments.len(), 3);
    }
}
