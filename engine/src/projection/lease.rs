//! Who runs which projection: one runner at a time, across processes, and a fast takeover when
//! the runner's process dies.
//!
//! On PostgreSQL a runner holds a session advisory lock per projection, on a connection of its
//! own. The database ends those locks the moment that connection ends, so when a process dies
//! (`kill -9`, a lost machine) another runner takes its projections over on its next step, within
//! its polling interval, instead of waiting for a lease to expire. The checkpoint row names the
//! holder, and only the named holder can move the checkpoint, so a runner that lost its
//! connection (and with it its locks) can write nothing more even before it notices.
//!
//! The embedded store has one process and no sessions to tie a hold to: there the hold is a lease
//! with an expiry in the checkpoint row, renewed on every step.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};

use super::checkpoint;
use crate::store::StorePool;

/// How often a runner checks that the connection holding its locks is still alive.
const CHECK_EVERY: Duration = Duration::from_secs(1);

pub(crate) struct Leases {
    pool: StorePool,
    owner: String,
    /// The lease on the embedded store.
    lease: Duration,
    holds: tokio::sync::Mutex<Holds>,
}

/// PostgreSQL: the connection whose session holds the locks, and which projections they cover.
#[derive(Default)]
struct Holds {
    conn: Option<PgConnection>,
    held: HashSet<String>,
    checked: Option<Instant>,
}

impl Holds {
    /// The connection ended (or cannot be trusted): so did every lock on it.
    fn lost(&mut self) {
        self.conn = None;
        self.held.clear();
        self.checked = None;
    }
}

impl Leases {
    pub(crate) fn new(pool: StorePool, owner: String, lease: Duration) -> Self {
        Self {
            pool,
            owner,
            lease,
            holds: tokio::sync::Mutex::new(Holds::default()),
        }
    }

    pub(crate) fn owner(&self) -> &str {
        &self.owner
    }

    pub(crate) fn set_lease(&mut self, lease: Duration) {
        self.lease = lease;
    }

    pub(crate) fn lease(&self) -> Duration {
        self.lease
    }

    /// Takes or keeps the hold on `name`; false when another live runner has it.
    pub(crate) async fn acquire(&self, name: &str) -> Result<bool, sqlx::Error> {
        let StorePool::Postgres(pool) = &self.pool else {
            return checkpoint::acquire(&self.pool, name, &self.owner, self.lease).await;
        };
        let mut holds = self.holds.lock().await;
        let result = async {
            if holds.conn.is_none() {
                let options = pool.connect_options().as_ref().clone();
                holds.conn = Some(PgConnection::connect_with(&options).await?);
                holds.held.clear();
                holds.checked = Some(Instant::now());
            }
            let due = holds.checked.is_none_or(|at| at.elapsed() >= CHECK_EVERY);
            let Holds {
                conn,
                held,
                checked,
            } = &mut *holds;
            let conn = conn.as_mut().expect("connected above");
            if held.contains(name) {
                if due {
                    conn.ping().await?;
                    *checked = Some(Instant::now());
                }
                return Ok(true);
            }
            let taken = checkpoint::hold(conn, name, &self.owner).await?;
            if taken {
                held.insert(name.to_owned());
            }
            Ok(taken)
        }
        .await;
        if result.is_err() {
            holds.lost();
        }
        result
    }

    /// Gives the hold on `name` up, if this runner has it.
    pub(crate) async fn release(&self, name: &str) -> Result<(), sqlx::Error> {
        if !matches!(self.pool, StorePool::Postgres(_)) {
            return checkpoint::release(&self.pool, name, &self.owner).await;
        }
        let mut holds = self.holds.lock().await;
        if !holds.held.remove(name) {
            return Ok(());
        }
        let Some(conn) = holds.conn.as_mut() else {
            return Ok(());
        };
        if let Err(e) = checkpoint::unhold(conn, name, &self.owner).await {
            holds.lost();
            return Err(e);
        }
        Ok(())
    }

    /// After a checkpoint refused to move for this runner: whatever it thinks it holds is checked
    /// again on the next step.
    pub(crate) async fn doubt(&self) {
        self.holds.lock().await.checked = None;
    }

    /// Gives every hold up and closes the connection that held them.
    pub(crate) async fn release_all(&self, names: &[&str]) -> Result<(), sqlx::Error> {
        for name in names {
            self.release(name).await?;
        }
        let mut holds = self.holds.lock().await;
        if let Some(conn) = holds.conn.take() {
            let _ = conn.close().await;
        }
        holds.lost();
        Ok(())
    }
}

/// One holder at a time across processes for a named piece of work that must run on a single
/// node, such as a channel's poller (Telegram serves one poller per bot), held as projections
/// are: a session advisory lock on PostgreSQL, a renewed lease on the embedded store.
pub struct Hold {
    leases: Leases,
    name: String,
}

impl Hold {
    /// A hold on `name` for `owner` (not yet taken: see [`Hold::acquire`]).
    pub async fn new(
        pool: &StorePool,
        name: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<Hold, sqlx::Error> {
        checkpoint::ensure(pool, name).await?;
        Ok(Hold {
            leases: Leases::new(pool.clone(), owner.to_owned(), lease),
            name: name.to_owned(),
        })
    }

    /// Takes or keeps the hold (call it at least once per lease); false while another live
    /// process has it.
    pub async fn acquire(&self) -> Result<bool, sqlx::Error> {
        self.leases.acquire(&self.name).await
    }

    /// Gives the hold up, so another process takes over at once.
    pub async fn release(&self) -> Result<(), sqlx::Error> {
        self.leases.release_all(&[&self.name]).await
    }
}
