//! Opening a store: PostgreSQL by URL, or the embedded SQLite file in a data directory; applying
//! the migrations in `migrations/`. [`sql`] runs the statements that both stores share.

pub mod sql;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::SqlitePool;
use sqlx::ConnectOptions;

use crate::log::postgres::{PgEventLog, PgLogOptions};
use crate::log::sqlite::{self, SqliteEventLog, SqliteLogOptions};
use crate::log::EventLog;
use crate::queue::postgres::PgJobQueue;
use crate::queue::sqlite::SqliteJobQueue;
use crate::queue::JobQueue;

static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/postgres");
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/sqlite");

/// The file name of the embedded store inside its data directory.
pub const SQLITE_FILE: &str = "stele.db";

/// Where a store lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreLocation {
    /// A PostgreSQL database URL (`postgres://…`).
    Postgres(String),
    /// The embedded store in a data directory.
    Embedded(PathBuf),
}

impl StoreLocation {
    /// A database URL if one is given, else the embedded store in `data_dir`.
    pub fn from_args(database_url: Option<&str>, data_dir: &Path) -> Result<Self, StoreError> {
        match database_url {
            None => Ok(Self::Embedded(data_dir.to_path_buf())),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                PgConnectOptions::from_str(url).map_err(|e| StoreError::InvalidUrl {
                    url: redact(url),
                    reason: e.to_string(),
                })?;
                Ok(Self::Postgres(url.to_owned()))
            }
            Some(url) => Err(StoreError::InvalidUrl {
                url: redact(url),
                reason: "expected postgres://… (or no URL for the embedded store)".into(),
            }),
        }
    }

    /// Human-readable, without a password.
    pub fn describe(&self) -> String {
        match self {
            Self::Postgres(url) => redact(url),
            Self::Embedded(dir) => format!("embedded store in {}", dir.display()),
        }
    }
}

/// `url` with its database replaced by `database` (other parts and parameters kept as given).
pub fn with_database(url: &str, database: &str) -> Result<String, StoreError> {
    let mut parsed = url::Url::parse(url).map_err(|e| StoreError::InvalidUrl {
        url: redact(url),
        reason: e.to_string(),
    })?;
    parsed.set_path(&format!("/{database}"));
    Ok(parsed.to_string())
}

/// A URL with its password masked, for messages.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}

/// Errors opening or migrating a store. Each displays as one readable line.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid database URL {url}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("cannot reach PostgreSQL at {target}: {reason}")]
    Unreachable { target: String, reason: String },
    #[error("no embedded store in {0} (run `stele up` or `stele migrate` first)")]
    NoEmbeddedStore(PathBuf),
    #[error("cannot open the embedded store in {path}: {reason}")]
    Embedded { path: PathBuf, reason: String },
    #[error("the database at {0} is not migrated to this version of Stele (run `stele migrate`)")]
    NotMigrated(String),
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Log(#[from] crate::log::LogError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// Whether opening applies pending migrations or requires them applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Migrate {
    Apply,
    Require,
}

/// An open store: the event log, the job queue and the pool behind them.
pub struct Store {
    pub location: StoreLocation,
    /// The log as the application reads and writes it: where personal data is sealed (see
    /// [`Store::with_log`]), values are sealed on the way in and opened on the way out.
    pub log: Arc<dyn EventLog>,
    /// The log as stored: what projections and process managers read, so that read models and
    /// job payloads keep sealed values sealed. The same as `log` unless [`Store::with_log`] put
    /// a layer in front.
    pub stored: Arc<dyn EventLog>,
    pub queue: Arc<dyn JobQueue>,
    pub pool: StorePool,
    /// Connections for reads outside the log that need not see uncommitted writes (searches,
    /// read models): on SQLite read-only connections beside the single writer, so that a long
    /// read does not hold up the writes (WAL readers see the last commit); on PostgreSQL the
    /// same pool as [`Store::pool`].
    pub reads: StorePool,
}

/// The connection pool of a store, for the tables outside the event log.
#[derive(Clone, Debug)]
pub enum StorePool {
    Postgres(PgPool),
    /// The single writer connection of the embedded store.
    Sqlite(SqlitePool),
}

impl Store {
    /// Opens the store, applying or requiring the migrations.
    pub async fn open(location: StoreLocation, migrate: Migrate) -> Result<Self, StoreError> {
        Self::open_with(
            location,
            migrate,
            PgLogOptions::default(),
            SqliteLogOptions::default(),
        )
        .await
    }

    /// [`Store::open`] with adapter options.
    pub async fn open_with(
        location: StoreLocation,
        migrate: Migrate,
        pg: PgLogOptions,
        sqlite_options: SqliteLogOptions,
    ) -> Result<Self, StoreError> {
        match &location {
            StoreLocation::Postgres(url) => {
                let pool = connect_postgres(url, 24).await?;
                run_migrations(&POSTGRES_MIGRATIONS, &pool, migrate, &location).await?;
                let listen = pg.listen;
                let queue = Arc::new(PgJobQueue::new(pool.clone(), listen));
                let log = PgEventLog::new(pool.clone(), pg);
                log.on_jobs(queue.wake_hook());
                let log: Arc<dyn EventLog> = Arc::new(log);
                Ok(Self {
                    location,
                    stored: log.clone(),
                    log,
                    queue,
                    reads: StorePool::Postgres(pool.clone()),
                    pool: StorePool::Postgres(pool),
                })
            }
            StoreLocation::Embedded(dir) => {
                let file = dir.join(SQLITE_FILE);
                if !file.exists() {
                    if migrate == Migrate::Require {
                        return Err(StoreError::NoEmbeddedStore(dir.clone()));
                    }
                    std::fs::create_dir_all(dir).map_err(|e| StoreError::Embedded {
                        path: dir.clone(),
                        reason: e.to_string(),
                    })?;
                }
                let embedded = |e: sqlx::Error| StoreError::Embedded {
                    path: file.clone(),
                    reason: e.to_string(),
                };
                let writer = sqlite::writer_pool(&file).await.map_err(embedded)?;
                run_migrations(&SQLITE_MIGRATIONS, &writer, migrate, &location).await?;
                let queue = Arc::new(SqliteJobQueue::new(writer.clone()));
                let log = SqliteEventLog::new(&file, writer.clone(), sqlite_options).await?;
                log.on_jobs(queue.wake_hook());
                let reads = StorePool::Sqlite(log.readers());
                let log: Arc<dyn EventLog> = Arc::new(log);
                Ok(Self {
                    location,
                    stored: log.clone(),
                    log,
                    queue,
                    pool: StorePool::Sqlite(writer),
                    reads,
                })
            }
        }
    }

    /// Puts `layer` in front of the stored log for the application (e.g. sealing personal data);
    /// projections and process managers keep reading [`Store::stored`].
    pub fn with_log(mut self, layer: impl FnOnce(Arc<dyn EventLog>) -> Arc<dyn EventLog>) -> Self {
        self.log = layer(self.stored.clone());
        self
    }

    /// Closes the log and its connections.
    pub async fn close(&self) {
        self.queue.close().await;
        self.log.close().await;
    }
}

/// How long connecting to PostgreSQL may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects a pool to PostgreSQL, turning connection failures into one readable line.
pub async fn connect_postgres(url: &str, max_connections: u32) -> Result<PgPool, StoreError> {
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| StoreError::InvalidUrl {
            url: redact(url),
            reason: e.to_string(),
        })?
        // Every statement at debug level costs time on the hot path; slow ones still warn.
        .log_statements(tracing::log::LevelFilter::Trace);
    // A name of its own for each pool (the one the URL gives, if any, with an id): its
    // notifications carry it, so that it skips its own (`notify.rs`).
    // (PostgreSQL keeps 63 bytes of a name: the given part is cut to leave room for the id.)
    let given: String = options
        .get_application_name()
        .unwrap_or("stele")
        .chars()
        .filter(char::is_ascii_graphic)
        .take(40)
        .collect();
    let name = format!(
        "{given}#{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let options = options.application_name(&name);
    let target = format!("{}:{}", options.get_host(), options.get_port());
    let unreachable = |reason: String| StoreError::Unreachable {
        target: target.clone(),
        reason,
    };
    // One connection first, so that a refused port or a wrong password is said at once and as
    // it is (a pool would retry until its acquire timeout and report only that it timed out).
    let first = tokio::time::timeout(
        CONNECT_TIMEOUT,
        <sqlx::PgConnection as sqlx::Connection>::connect_with(&options),
    )
    .await
    .map_err(|_| unreachable(format!("no answer within {CONNECT_TIMEOUT:?}")))?
    .map_err(|e: sqlx::Error| unreachable(e.to_string()))?;
    sqlx::Connection::close(first)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(CONNECT_TIMEOUT)
        // A ping per checkout would double the round trips of every query; broken connections
        // surface as query errors and are replaced by the pool.
        .test_before_acquire(false)
        .connect_lazy_with(options))
}

/// A pool of `pool`'s database with connections of its own: the same connect options (and so
/// the same application name: its notifications are skipped as the pool's own) plus the
/// server `settings` given, at most `max_connections`, opened when first needed.
pub(crate) fn own_connections(
    pool: &PgPool,
    max_connections: u32,
    settings: &[(&str, &str)],
) -> PgPool {
    let options = (*pool.connect_options())
        .clone()
        .options(settings.iter().copied());
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(pool.options().get_acquire_timeout())
        .test_before_acquire(false)
        .connect_lazy_with(options)
}

/// Connections of a pool kept checked out between the uses of a busy loop (the group writers,
/// the stream loader, the claims), at most `most` of them.
///
/// Written by hand because sqlx 0.8 tests every connection it takes back into its pool with a
/// round trip to the server (a ping on release, with no setting to skip it): at a thousand
/// checkouts a second, the pings and their wake-ups took about a twelfth of a busy node's CPU,
/// and the server answered each. A connection is kept only after a use that completed
/// ([`Kept::keep`]); one whose use failed or was dropped half way goes back to the pool, which
/// tests it as before. [`Kept::clear`] hands them all back (before the pool closes, which waits
/// for checked-out connections).
pub(crate) struct Kept {
    pool: PgPool,
    /// The kept connections; `None` once [`Kept::clear`] ran (nothing is kept after).
    idle: std::sync::Mutex<Option<Vec<sqlx::pool::PoolConnection<sqlx::Postgres>>>>,
    most: usize,
}

impl Kept {
    pub(crate) fn new(pool: PgPool, most: usize) -> Self {
        Kept {
            pool,
            idle: std::sync::Mutex::new(Some(Vec::new())),
            most,
        }
    }

    /// Runs `query` on a kept connection (or one from the pool), and keeps it if the query
    /// completed.
    pub(crate) async fn fetch_all(
        &self,
        query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<Vec<sqlx::postgres::PgRow>, sqlx::Error> {
        let mut conn = self.take().await?;
        let rows = query.fetch_all(&mut *conn).await?;
        self.keep(conn);
        Ok(rows)
    }

    /// A kept connection, or one from the pool.
    pub(crate) async fn take(
        &self,
    ) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>, sqlx::Error> {
        let kept = self
            .idle
            .lock()
            .expect("kept connections lock")
            .as_mut()
            .and_then(Vec::pop);
        match kept {
            Some(conn) => Ok(conn),
            None => self.pool.acquire().await,
        }
    }

    /// Keeps `conn`, whose use completed, for the next [`Kept::take`] (or hands it back to the
    /// pool when `most` are kept already, or after [`Kept::clear`]).
    pub(crate) fn keep(&self, conn: sqlx::pool::PoolConnection<sqlx::Postgres>) {
        let mut idle = self.idle.lock().expect("kept connections lock");
        if let Some(idle) = idle.as_mut().filter(|idle| idle.len() < self.most) {
            idle.push(conn);
        }
    }

    /// Hands every kept connection back to the pool, and keeps none from now on: called before
    /// the pool closes, whose close waits for every checked-out connection.
    pub(crate) fn clear(&self) {
        let kept = self.idle.lock().expect("kept connections lock").take();
        drop(kept);
    }
}

async fn run_migrations<'a, A>(
    migrator: &Migrator,
    pool: A,
    migrate: Migrate,
    location: &StoreLocation,
) -> Result<(), StoreError>
where
    A: sqlx::Acquire<'a>,
    <A::Connection as std::ops::Deref>::Target: sqlx::migrate::Migrate,
{
    match migrate {
        Migrate::Apply => Ok(migrator.run(pool).await?),
        Migrate::Require => {
            let mut conn = pool.acquire().await?;
            let applied = sqlx::migrate::Migrate::list_applied_migrations(&mut *conn)
                .await
                .unwrap_or_default();
            let missing = migrator
                .iter()
                .any(|m| !applied.iter().any(|a| a.version == m.version));
            if missing {
                return Err(StoreError::NotMigrated(location.describe()));
            }
            Ok(())
        }
    }
}

/// Applies the migrations of `location`'s kind, creating the embedded store if missing. Returns
/// the versions newly applied.
pub async fn migrate(location: StoreLocation) -> Result<Vec<i64>, StoreError> {
    let before = applied_versions(&location).await.unwrap_or_default();
    let store = Store::open(location.clone(), Migrate::Apply).await?;
    store.close().await;
    // Opening applied every migration of this kind: the new ones are those not applied before.
    let migrator = match location {
        StoreLocation::Postgres(_) => &POSTGRES_MIGRATIONS,
        StoreLocation::Embedded(_) => &SQLITE_MIGRATIONS,
    };
    Ok(migrator
        .iter()
        .map(|m| m.version)
        .filter(|v| !before.contains(v))
        .collect())
}

async fn applied_versions(location: &StoreLocation) -> Result<Vec<i64>, StoreError> {
    use sqlx::migrate::Migrate as _;
    let versions = match location {
        StoreLocation::Postgres(url) => {
            let pool = connect_postgres(url, 1).await?;
            let mut conn = pool.acquire().await?;
            let applied = conn.list_applied_migrations().await;
            drop(conn);
            pool.close().await;
            applied?
        }
        StoreLocation::Embedded(dir) => {
            let file = dir.join(SQLITE_FILE);
            if !file.exists() {
                return Ok(vec![]);
            }
            let pool = sqlite::writer_pool(&file).await?;
            let mut conn = pool.acquire().await?;
            let applied = conn.list_applied_migrations().await;
            drop(conn);
            pool.close().await;
            applied?
        }
    };
    Ok(versions.into_iter().map(|m| m.version).collect())
}

/// Begins a transaction with `statement` (e.g. `BEGIN IMMEDIATE`) on a task of its own, run to
/// its end. sqlx counts a connection as inside a transaction before BEGIN has answered, so a
/// begin given up half-way (a timeout, a cancelled call) would hand the connection back to the
/// pool in a transaction no one will end, and every later begin on it fails. Finished on its
/// own task, a transaction no one waits for any more is dropped, and so rolled back.
pub(crate) async fn begin_to_the_end<DB: sqlx::Database>(
    pool: &sqlx::Pool<DB>,
    statement: &'static str,
) -> Result<sqlx::Transaction<'static, DB>, sqlx::Error> {
    let pool = pool.clone();
    tokio::spawn(async move { pool.begin_with(statement).await })
        .await
        .map_err(|e| {
            sqlx::Error::Io(std::io::Error::other(format!(
                "beginning a transaction: {e}"
            )))
        })?
}
