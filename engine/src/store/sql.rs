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
//! | bytes ([`Value::Bytes`]) | `bytea` | a blob |
//! | a batch of rows ([`Db::execute_rows`]) | one statement, each column an array: `UNNEST($1::text[], …)` | `VALUES (…), (…), …` (up to 500 rows a statement) |
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
    /// A float: `float8` on PostgreSQL, `REAL` on SQLite.
    Float(Option<f64>),
    Time(Option<DateTime<Utc>>),
    /// A length of time: seconds (`float8`) on PostgreSQL, microseconds on SQLite.
    Span(Duration),
    /// Texts: an array on PostgreSQL, one JSON array on SQLite.
    Texts(&'a [String]),
    /// Bytes: `bytea` on PostgreSQL, a blob on SQLite (e.g. a vector's floats for sqlite-vec,
    /// which reads them as they are instead of parsing a JSON array).
    Bytes(&'a [u8]),
}

impl From<f64> for Value<'_> {
    fn from(value: f64) -> Self {
        Value::Float(Some(value))
    }
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
    /// statement reads them with `UNNEST`); on SQLite the statement's one `VALUES (…)` tuple is
    /// repeated for up to 500 rows a statement (a statement without one runs once per row). Rows
    /// are written in order, so an upsert that meets a key twice keeps the later row, as a
    /// statement per row would. Every row has the same kinds of values in the same order. Nothing
    /// is run for no rows.
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
                let width = rows[0].as_ref().len();
                match sqlite_tuple(sql) {
                    Some(tuple) if width > 0 => {
                        let per_statement = (SQLITE_PARAMETERS / width).clamp(1, SQLITE_ROWS);
                        for chunk in rows.chunks(per_statement) {
                            let statement = tuple.repeated(chunk.len(), width);
                            let mut arguments = SqliteArguments::default();
                            for row in chunk {
                                add_sqlite_values(&mut arguments, row.as_ref())?;
                            }
                            arguments
                                .add(micros(Utc::now()))
                                .map_err(sqlx::Error::Encode)?;
                            sqlx::query_with(&statement, arguments)
                                .execute(&mut *conn)
                                .await?;
                        }
                    }
                    _ => {
                        for row in rows {
                            let query = sqlx::query_with(sql, sqlite_arguments(row.as_ref())?);
                            query.execute(&mut *conn).await?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Parameters bound to one SQLite statement at most (SQLite allows 32,766).
const SQLITE_PARAMETERS: usize = 30_000;
/// Rows written by one SQLite statement at most.
const SQLITE_ROWS: usize = 500;

/// An `INSERT … VALUES (…) …` statement cut around its one tuple of values, so that a batch can
/// write many rows in one statement (`VALUES (…), (…), …`): SQLite has no arrays to `UNNEST`, and
/// a statement per row costs a round trip to its connection's thread each.
struct SqliteTuple<'s> {
    before: &'s str,
    tuple: &'s str,
    after: &'s str,
}

/// `sql` cut around its `VALUES (…)` tuple, if it has exactly one.
fn sqlite_tuple(sql: &str) -> Option<SqliteTuple<'_>> {
    let start = sql.find("VALUES (")? + "VALUES ".len();
    if sql[start..].contains("VALUES (") {
        return None;
    }
    let mut depth = 0usize;
    for (i, c) in sql[start..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    let end = start + i + 1;
                    return Some(SqliteTuple {
                        before: &sql[..start],
                        tuple: &sql[start..end],
                        after: &sql[end..],
                    });
                }
            }
            _ => {}
        }
    }
    None
}

impl SqliteTuple<'_> {
    /// The statement with `rows` tuples: row `r`'s `$k` becomes `$(r × width + k)` and the
    /// current time (`$(width + 1)`, see the module doc) the parameter after all rows.
    fn repeated(&self, rows: usize, width: usize) -> String {
        let mut out = String::with_capacity(self.before.len() + self.after.len() + rows * 40);
        out.push_str(self.before);
        let renumber = |out: &mut String, part: &str, row: usize| {
            let mut chars = part.char_indices().peekable();
            while let Some((i, c)) = chars.next() {
                if c != '$' {
                    out.push(c);
                    continue;
                }
                let digits: String = std::iter::from_fn(|| {
                    chars.next_if(|(_, d)| d.is_ascii_digit()).map(|(_, d)| d)
                })
                .collect();
                match digits.parse::<usize>() {
                    Ok(k) if k <= width => out.push_str(&format!("${}", row * width + k)),
                    Ok(_) => out.push_str(&format!("${}", rows * width + 1)),
                    Err(_) => out.push_str(&part[i..i + 1]),
                }
            }
        };
        for row in 0..rows {
            if row > 0 {
                out.push_str(", ");
            }
            renumber(&mut out, self.tuple, row);
        }
        renumber(&mut out, self.after, rows);
        out
    }
}

fn postgres_arguments(values: &[Value<'_>]) -> Result<PgArguments, sqlx::Error> {
    let mut arguments = PgArguments::default();
    for value in values {
        match *value {
            Value::Text(text) => arguments.add(text),
            Value::Int(int) => arguments.add(int),
            Value::Float(float) => arguments.add(float),
            Value::Time(time) => arguments.add(time),
            Value::Span(span) => arguments.add(span.as_secs_f64()),
            Value::Texts(texts) => arguments.add(texts),
            Value::Bytes(bytes) => arguments.add(bytes),
        }
        .map_err(sqlx::Error::Encode)?;
    }
    Ok(arguments)
}

/// `values`, then the current time (see the module doc).
fn sqlite_arguments<'q>(values: &[Value<'q>]) -> Result<SqliteArguments<'q>, sqlx::Error> {
    let mut arguments = SqliteArguments::default();
    add_sqlite_values(&mut arguments, values)?;
    arguments
        .add(micros(Utc::now()))
        .map_err(sqlx::Error::Encode)?;
    Ok(arguments)
}

fn add_sqlite_values<'q>(
    arguments: &mut SqliteArguments<'q>,
    values: &[Value<'q>],
) -> Result<(), sqlx::Error> {
    for value in values {
        match *value {
            Value::Text(text) => arguments.add(text),
            Value::Int(int) => arguments.add(int),
            Value::Float(float) => arguments.add(float),
            Value::Time(time) => arguments.add(time.map(micros)),
            Value::Span(span) => arguments.add(span.as_micros() as i64),
            Value::Texts(texts) => serde_json::to_string(texts)
                .map_err(Into::into)
                .and_then(|json| arguments.add(json)),
            Value::Bytes(bytes) => arguments.add(bytes),
        }
        .map_err(sqlx::Error::Encode)?;
    }
    Ok(())
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
            Value::Float(_) => arguments.add(column(rows, index, |v| match v {
                Value::Float(float) => Some(float),
                _ => None,
            })?),
            Value::Time(_) => arguments.add(column(rows, index, |v| match v {
                Value::Time(time) => Some(time),
                _ => None,
            })?),
            Value::Span(_) | Value::Texts(_) | Value::Bytes(_) => Err(format!(
                "column {} of a batch: spans, lists and bytes are not bound as columns",
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
    fn a_sqlite_batch_repeats_the_tuple_and_binds_the_time_last() {
        let sql = "INSERT INTO t (a, b, at) VALUES ($1, lower($2), $3) \
                   ON CONFLICT (a) DO UPDATE SET b = excluded.b, at = $3";
        let tuple = sqlite_tuple(sql).unwrap();
        assert_eq!(
            tuple.repeated(3, 2),
            "INSERT INTO t (a, b, at) VALUES ($1, lower($2), $7), ($3, lower($4), $7), \
             ($5, lower($6), $7) ON CONFLICT (a) DO UPDATE SET b = excluded.b, at = $7"
        );
        assert!(sqlite_tuple("INSERT INTO t SELECT * FROM json_each($1)").is_none());
    }

    #[test]
    fn sqlite_gets_the_time_after_the_statement_parameters() {
        let arguments = sqlite_arguments(&[Value::from("a"), Value::Span(Duration::ZERO)]).unwrap();
        assert_eq!(arguments.len(), 3);
    }
}
