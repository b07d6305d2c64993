//! Projections: read models built from the log.
//!
//! A projection has a name, the event types it reads and an `apply` that writes its read model.
//! The runner applies each batch of events and moves the projection's checkpoint in one
//! transaction, so a crash at any point neither loses nor applies an event twice. It catches up
//! from the checkpoint, then follows the log live. One runner at a time drives a projection,
//! across processes; another takes over as soon as its process dies (see [`lease`]).
//!
//! A projection that fails on an event stops there with the error in its status; an operator
//! retries it or skips that one event (the skip is recorded as an event). `rebuild` replays the
//! log from the start into fresh tables and swaps them in when caught up, so readers keep a
//! consistent view meanwhile.

pub mod checkpoint;
mod lease;
pub use lease::Hold;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

pub use checkpoint::{Checkpoint, Status};

use crate::log::{
    AppendRequest, EventLog, LogError, LogTransaction, NewEvent, Position, RecordedEvent, StreamId,
};
use crate::metadata::CommandMeta;
use crate::store::sql::Db;
use crate::store::{Store, StorePool};

/// The table names a projection writes to: its base names, or fresh copies during a rebuild.
#[derive(Clone, Debug)]
pub struct Tables {
    suffix: std::borrow::Cow<'static, str>,
}

impl Tables {
    const LIVE: Tables = Tables {
        suffix: std::borrow::Cow::Borrowed(""),
    };
    const REBUILD: Tables = Tables {
        suffix: std::borrow::Cow::Borrowed("__rebuild"),
    };

    /// Scratch tables for an inspection (`<base>__<into>`): `into` is 1 to 32 of `a-z`, `0-9`
    /// and `_`, and not `rebuild`.
    pub fn scratch(into: &str) -> Option<Tables> {
        let well_formed = (1..=32).contains(&into.len())
            && into
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && into != "rebuild";
        well_formed.then(|| Tables {
            suffix: format!("__{into}").into(),
        })
    }

    /// The table to use for `base`.
    pub fn name(&self, base: &str) -> String {
        format!("{base}{}", self.suffix)
    }
}

/// Errors of projections.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("{0}")]
    Apply(String),
    #[error("no projection named {0:?}")]
    Unknown(String),
    #[error("projection {name} is {status:?}: {action} is not possible")]
    WrongStatus {
        name: String,
        status: Status,
        action: &'static str,
    },
    #[error("{0} is a process manager: replaying it would repeat its commands")]
    NotRebuildable(String),
    #[error("another runner holds projection {0}")]
    Busy(String),
    #[error("{0:?} cannot name scratch tables: 1 to 32 of a-z, 0-9 and _, and not \"rebuild\"")]
    BadScratchName(String),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// A read model built from the log.
#[async_trait]
pub trait Projection: Send + Sync + 'static {
    /// Unique, stable: the checkpoint's name.
    fn name(&self) -> &'static str;

    /// The event types it reads; empty means all.
    fn event_types(&self) -> &'static [&'static str] {
        &[]
    }

    /// Whether it has anything to do with `event` (by default: one of [`Self::event_types`]).
    /// A batch with no such event moves only the checkpoint, which is then written lazily.
    fn wants(&self, event: &RecordedEvent) -> bool {
        of_types(self.event_types(), event)
    }

    /// The base names of its tables.
    fn tables(&self) -> &'static [&'static str];

    /// Whether `rebuild` may replay it from the start (false for process managers: replaying
    /// would repeat their commands).
    fn rebuildable(&self) -> bool {
        true
    }

    /// Whether its batches may commit without waiting for the disk flush (see
    /// [`LogTransaction::defer_flush`]): true when all it writes can be derived from the log
    /// again, so a batch lost with a crash of the database is simply applied again. False for
    /// records others may have been shown for good (the audit's seals).
    fn deferred_flush(&self) -> bool {
        false
    }

    /// Creates its tables, named by `tables`, if missing.
    async fn create(
        &self,
        tx: &mut dyn LogTransaction,
        tables: &Tables,
    ) -> Result<(), ProjectionError>;

    /// Work on a batch before its transaction begins, outside it: reading what `apply` will need
    /// from the store (the embedded store has one connection, which the transaction holds).
    async fn prepare(&self, _events: &[RecordedEvent]) -> Result<(), ProjectionError> {
        Ok(())
    }

    /// Applies events (in log order) to its tables, inside the runner's transaction (which also
    /// moves its checkpoint).
    async fn apply(
        &self,
        tx: &mut dyn LogTransaction,
        tables: &Tables,
        events: &[RecordedEvent],
    ) -> Result<(), ProjectionError>;
}

/// A projection's status with its lag.
#[derive(Clone, Debug, Serialize)]
pub struct ProjectionStatus {
    #[serde(flatten)]
    pub checkpoint: Checkpoint,
    /// Events committed after the checkpoint (approximate on PostgreSQL, where positions may have
    /// gaps).
    pub lag_events: i64,
    /// How long ago the oldest unapplied event was recorded (0 when caught up).
    pub lag_seconds: f64,
}

/// A rebuild after a heartbeat this old is taken for dead (its process died) and may be claimed
/// again.
const REBUILD_STALE_AFTER: Duration = Duration::from_secs(30);

/// The right to rebuild one projection (see [`ProjectionRunner::claim_rebuild`]).
#[derive(Debug)]
pub struct RebuildClaim {
    name: String,
    owner: String,
}

/// Progress of a rebuild.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Progress {
    pub events_read: u64,
    pub position: Position,
    pub head: Position,
}

/// Runs projections.
pub struct ProjectionRunner {
    log: Arc<dyn EventLog>,
    pool: StorePool,
    projections: Vec<Arc<dyn Projection>>,
    leases: lease::Leases,
    batch_size: usize,
    poll_interval: Duration,
    linger: Duration,
    /// Where each projection this runner holds stands, so a step need not read its checkpoint.
    known: std::sync::Mutex<std::collections::HashMap<String, Known>>,
    /// The last page read from the log, shared by the followers (see [`Self::read_after`]).
    tail: tokio::sync::Mutex<Option<Page>>,
    /// The runner's clock for busy followers (see [`Self::next_read`]).
    epoch: tokio::time::Instant,
}

/// Events read from the log after `from`, when the appends' wake-up counter stood at `seen`
/// (taken before the read: every append woken for up to then is in it).
struct Page {
    from: Position,
    seen: u64,
    read_at: std::time::Instant,
    events: Arc<[RecordedEvent]>,
}

/// Events read after a position: a shared page from `start` on, not copied for each follower
/// (each event's payload is a tree of its own: copying every page read once per follower, and
/// freeing the copies, stood out in a profile of a busy node).
struct After {
    events: Arc<[RecordedEvent]>,
    start: usize,
}

impl std::ops::Deref for After {
    type Target = [RecordedEvent];

    fn deref(&self) -> &[RecordedEvent] {
        &self.events[self.start..]
    }
}

/// A page is shared for this long at most: appends of processes that do not notify (the
/// embedded store's) bump no wake-up counter, and a follower that polls must see them.
const PAGE_SHARED_FOR: Duration = Duration::from_millis(10);

/// A held projection's place: read up to `position`; the stored checkpoint says `written`
/// (behind `position` while the events read since were none of its business).
#[derive(Clone, Copy, Debug)]
struct Known {
    position: Position,
    written: Position,
    written_at: std::time::Instant,
}

/// A checkpoint that only moved past events a projection does not read is written at most this
/// often (or with its next batch that does): reading them again after a crash costs nothing.
const WRITE_PASSED_EVERY: Duration = Duration::from_secs(1);

/// After a batch that read up to the head, a follower reads again no sooner than this: under
/// a stream of appends each read then takes what came meanwhile, instead of one read (and one
/// commit) per append for every projection and process manager. The first append after a quiet
/// moment is read at once.
pub const DEFAULT_LINGER: Duration = Duration::from_millis(20);

/// What one step did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stepped {
    /// Events read from the log (relevant or not).
    pub read: usize,
}

impl ProjectionRunner {
    pub fn new(store: &Store, projections: Vec<Arc<dyn Projection>>) -> Self {
        Self {
            log: store.stored.clone(),
            pool: store.pool.clone(),
            projections,
            leases: lease::Leases::new(
                store.pool.clone(),
                format!("runner-{}", Uuid::now_v7().simple()),
                // The embedded store's lease: renewed on every step (at least once per poll
                // interval), so a restarted process takes over within seconds.
                Duration::from_secs(5),
            ),
            batch_size: 1000,
            poll_interval: Duration::from_secs(1),
            linger: DEFAULT_LINGER,
            known: Default::default(),
            tail: Default::default(),
            epoch: tokio::time::Instant::now(),
        }
    }

    /// The events after `position` (at most a batch): from the page another follower read when
    /// that read saw every append its caller was woken for (`seen`, the caller's wake-up count
    /// before its step) and reached the head, else from the log. Followers woken by the same
    /// appends thus read the log once between them instead of once each. On PostgreSQL positions are handed out in
    /// commit order, so a page read after `from` holds every event up to its last.
    async fn read_after(&self, position: Position, seen: Option<u64>) -> Result<After, LogError> {
        let mut tail = self.tail.lock().await;
        if let (Some(page), Some(seen)) = (tail.as_ref(), seen) {
            // A full page may have stopped short of the head: only a shorter one is reused.
            if page.seen >= seen
                && page.from <= position
                && page.events.len() < self.batch_size
                && page.read_at.elapsed() < PAGE_SHARED_FOR
            {
                return Ok(After {
                    events: page.events.clone(),
                    start: page.events.partition_point(|e| e.position <= position),
                });
            }
        }
        let now = *self.log.appends().borrow();
        let read_at = std::time::Instant::now();
        let events: Arc<[RecordedEvent]> =
            self.log.read_all(position, self.batch_size).await?.into();
        *tail = Some(Page {
            from: position,
            seen: now,
            read_at,
            events: events.clone(),
        });
        Ok(After { events, start: 0 })
    }

    /// The least time between two reads of a follower that is caught up (see [`DEFAULT_LINGER`]).
    pub fn with_linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    fn known(&self, name: &str) -> Option<Known> {
        self.known.lock().expect("not poisoned").get(name).copied()
    }

    fn set_known(&self, name: &str, known: Option<Known>) {
        let mut all = self.known.lock().expect("not poisoned");
        match known {
            Some(known) => all.insert(name.to_owned(), known),
            None => all.remove(name),
        };
    }

    /// Events per transaction.
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// How long a runner's hold on a projection lasts without renewal on the embedded store
    /// (on PostgreSQL a hold lasts as long as the runner's connection).
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.leases.set_lease(lease);
        self
    }

    fn find(&self, name: &str) -> Result<&Arc<dyn Projection>, ProjectionError> {
        self.projections
            .iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| ProjectionError::Unknown(name.to_owned()))
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.projections.iter().map(|p| p.name()).collect()
    }

    /// The names of the projections that can be rebuilt.
    pub fn rebuildable(&self) -> Vec<&'static str> {
        self.projections
            .iter()
            .filter(|p| p.rebuildable())
            .map(|p| p.name())
            .collect()
    }

    /// Creates the projections' tables and checkpoints if missing.
    pub async fn setup(&self) -> Result<(), ProjectionError> {
        for projection in &self.projections {
            checkpoint::ensure(&self.pool, projection.name()).await?;
            let mut tx = self.log.begin().await?;
            projection.create(tx.as_mut(), &Tables::LIVE).await?;
            tx.commit().await?;
        }
        Ok(())
    }

    /// Applies the next batch of events to projection `name`, if this runner holds it and it is
    /// running. On a failing event the projection applies the events before it and stops there.
    pub async fn step(&self, name: &str) -> Result<Stepped, ProjectionError> {
        self.step_seen(name, None).await
    }

    /// [`Self::step`] for a follower woken when the appends' counter was `seen`.
    async fn step_seen(&self, name: &str, seen: Option<u64>) -> Result<Stepped, ProjectionError> {
        let result = self.step_held(name, seen).await;
        if result.is_err() {
            self.set_known(name, None);
        }
        result
    }

    async fn step_held(&self, name: &str, seen: Option<u64>) -> Result<Stepped, ProjectionError> {
        let projection = self.find(name)?.clone();
        if !self.leases.acquire(name).await? {
            self.set_known(name, None);
            return Ok(Stepped::default());
        }
        let known = match self.known(name) {
            Some(known) => known,
            None => {
                // Loaded under the hold: a previous holder can no longer move it.
                let Some(cp) = checkpoint::load(&self.pool, name).await? else {
                    return Ok(Stepped::default());
                };
                if cp.status != Status::Running {
                    self.leases.release(name).await?;
                    return Ok(Stepped::default());
                }
                Known {
                    position: cp.position,
                    written: cp.position,
                    written_at: std::time::Instant::now(),
                }
            }
        };
        let written = |position| Known {
            position,
            written: position,
            written_at: std::time::Instant::now(),
        };
        let batch = self.read_after(known.position, seen).await?;
        let Some(last) = batch.last() else {
            // Caught up: a checkpoint moved only in memory is written now, so that other
            // processes (a command waiting for this projection) see where it stands.
            if known.position != known.written {
                self.apply_batch(projection.as_ref(), &[], (known.written, known.position))
                    .await?;
                self.set_known(name, Some(written(known.position)));
            } else {
                self.set_known(name, Some(known));
            }
            return Ok(Stepped::default());
        };
        let last_position = last.position;
        let events = relevant(projection.as_ref(), &batch);
        if events.is_empty() && known.written_at.elapsed() < WRITE_PASSED_EVERY {
            self.set_known(
                name,
                Some(Known {
                    position: last_position,
                    ..known
                }),
            );
            return Ok(Stepped { read: batch.len() });
        }
        match self
            .apply_batch(projection.as_ref(), &events, (known.written, last_position))
            .await
        {
            Ok(()) => self.set_known(name, Some(written(last_position))),
            Err(ProjectionError::Apply(_)) => {
                // Find the failing event: apply one at a time up to it, then stop there.
                let mut from = known.written;
                for (applied, event) in batch.iter().enumerate() {
                    let one = relevant(projection.as_ref(), std::slice::from_ref(event));
                    match self
                        .apply_batch(projection.as_ref(), &one, (from, event.position))
                        .await
                    {
                        Ok(()) => from = event.position,
                        Err(ProjectionError::Apply(error)) => {
                            tracing::error!(projection = name, position = %event.position, %error, "projection stopped");
                            self.set_known(name, None);
                            checkpoint::set_status(
                                &self.pool,
                                name,
                                Status::Failed,
                                Some((event.position, &error)),
                            )
                            .await?;
                            return Ok(Stepped { read: applied });
                        }
                        Err(e) => return Err(e),
                    }
                }
                self.set_known(name, Some(written(from)));
            }
            Err(e) => return Err(e),
        }
        Ok(Stepped { read: batch.len() })
    }

    /// Applies `events` and moves the checkpoint from `from` to `through` in one transaction.
    async fn apply_batch(
        &self,
        projection: &dyn Projection,
        events: &[RecordedEvent],
        (from, through): (Position, Position),
    ) -> Result<(), ProjectionError> {
        if !events.is_empty() {
            projection.prepare(events).await?;
        }
        let mut tx = self.log.begin().await?;
        if projection.deferred_flush() {
            tx.defer_flush().await?;
        }
        if !events.is_empty() {
            projection.apply(tx.as_mut(), &Tables::LIVE, events).await?;
        }
        let last_at = events.last().map(|e| e.recorded_at);
        let moved = checkpoint::advance(
            tx.connection(),
            projection.name(),
            self.leases.owner(),
            (from, through),
            events.len() as i64,
            last_at,
        )
        .await?;
        if !moved {
            // The hold was lost, the projection paused or moved by someone else: leave it to its
            // holder, or read it again.
            self.leases.doubt().await;
            return Err(ProjectionError::Busy(projection.name().to_owned()));
        }
        tx.commit().await?;
        Ok(())
    }

    /// Catches up every projection, then follows the log until `shutdown` resolves.
    pub async fn run(
        self: Arc<Self>,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), ProjectionError> {
        self.setup().await?;
        // Each loop stops between its steps: a step cancelled in the middle would hand its
        // connection back to the pool inside an open transaction, holding what it had locked
        // (the log's append lock among them) until the connection is next used.
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        for name in self.names() {
            let (runner, stopped) = (self.clone(), stopped.clone());
            tasks.spawn(async move { runner.follow(name, stopped).await });
        }
        let runner = self.clone();
        tasks.spawn(async move { runner.report_lag(stopped).await });
        shutdown.await;
        let _ = stop.send(true);
        let finished = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(30), finished)
            .await
            .is_err()
        {
            tracing::warn!("projections did not stop within 30 s: stopping them where they are");
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        self.release_all().await
    }

    async fn follow(&self, name: &'static str, mut stopped: tokio::sync::watch::Receiver<bool>) {
        let mut appends = self.log.appends();
        loop {
            if *stopped.borrow_and_update() {
                return;
            }
            let seen = *appends.borrow_and_update();
            let read_at = tokio::time::Instant::now();
            match self.step_seen(name, Some(seen)).await {
                // A full batch: there may be more. A shorter one read up to the head as it was
                // (an append since then has changed `appends`, so the wait below returns at once).
                Ok(Stepped { read }) if read >= self.batch_size => continue,
                Ok(_) => {}
                Err(ProjectionError::Busy(_)) => {}
                Err(e) => tracing::warn!(projection = name, error = %e, "projection step failed"),
            }
            // Appends came while it stepped: the log is busy.
            let busy = appends.has_changed().unwrap_or(false);
            let wait = async {
                let wait = tokio::time::timeout(self.poll_interval, appends.changed()).await;
                if let Ok(Err(_)) = wait {
                    tokio::time::sleep(self.poll_interval).await;
                }
                tokio::time::sleep_until(self.next_read(read_at, busy)).await;
            };
            tokio::select! {
                _ = stopped.changed() => return,
                () = wait => {}
            }
        }
    }

    /// When a follower that read at `read_at` may read again. Not before `read_at + linger`; and
    /// while the log is busy (appends came while it stepped, or that moment is still ahead), at
    /// the runner's next multiple of `linger`, the same moment for every busy follower: they step
    /// together, and the first to read shares its page with the others (see
    /// [`Self::read_after`]). Each on its own clock, their reads drift apart, a newer append
    /// comes in between, and every follower reads the log for itself: a page read per follower
    /// per batch, each decoded, where one serves them all. The first append after a quiet moment
    /// is read at once.
    fn next_read(&self, read_at: tokio::time::Instant, busy: bool) -> tokio::time::Instant {
        let due = read_at + self.linger;
        let now = tokio::time::Instant::now();
        if (due <= now && !busy) || self.linger.is_zero() {
            return due;
        }
        let linger = self.linger.as_nanos();
        let since = (due.max(now) - self.epoch).as_nanos();
        let ticks = since.div_ceil(linger);
        self.epoch + Duration::from_nanos((ticks * linger).min(u64::MAX as u128) as u64)
    }

    /// Publishes each projection's lag as the gauges `stele_projection_lag_events` and
    /// `stele_projection_lag_seconds` (label `projection`), every few seconds.
    async fn report_lag(&self, mut stopped: tokio::sync::watch::Receiver<bool>) {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = stopped.changed() => return,
                _ = every.tick() => {}
            }
            match self.status().await {
                Ok(statuses) => {
                    for status in statuses {
                        let name = status.checkpoint.name.clone();
                        metrics::gauge!("stele_projection_lag_events", "projection" => name.clone())
                            .set(status.lag_events as f64);
                        metrics::gauge!("stele_projection_lag_seconds", "projection" => name)
                            .set(status.lag_seconds);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "reading projection lag failed"),
            }
        }
    }

    /// Gives up this runner's hold on every projection (so another process need not wait for the
    /// leases to expire).
    pub async fn release_all(&self) -> Result<(), ProjectionError> {
        // Checkpoints moved past events only in memory are written first.
        let known: Vec<(String, Known)> =
            self.known.lock().expect("not poisoned").drain().collect();
        for (name, known) in known {
            if known.position == known.written {
                continue;
            }
            let projection = self.find(&name)?.clone();
            let moved = (known.written, known.position);
            match self.apply_batch(projection.as_ref(), &[], moved).await {
                // Moved by someone else meanwhile: theirs stands.
                Ok(()) | Err(ProjectionError::Busy(_)) => {}
                Err(e) => return Err(e),
            }
        }
        self.leases.release_all(&self.names()).await?;
        Ok(())
    }

    /// Every projection's checkpoint and lag.
    pub async fn status(&self) -> Result<Vec<ProjectionStatus>, ProjectionError> {
        let head = self.log.head().await?;
        let mut statuses = Vec::new();
        for mut cp in checkpoint::list(&self.pool).await? {
            if !self.projections.iter().any(|p| p.name() == cp.name) {
                continue;
            }
            // Held here: where it has read to, written or not yet.
            if let Some(known) = self.known(&cp.name) {
                if known.written == cp.position && cp.status == Status::Running {
                    cp.position = known.position;
                }
            }
            let next = match self.log.read_all(cp.position, 1).await {
                Ok(next) => next,
                Err(LogError::UnknownPosition(_)) => Vec::new(),
                Err(e) => return Err(e.into()),
            };
            let lag_seconds = next.first().map_or(0.0, |e| {
                (Utc::now() - e.recorded_at).num_milliseconds().max(0) as f64 / 1000.0
            });
            let lag_events = if next.is_empty() {
                0
            } else {
                (head.0 - cp.position.0).max(1)
            };
            statuses.push(ProjectionStatus {
                checkpoint: cp,
                lag_events,
                lag_seconds,
            });
        }
        Ok(statuses)
    }

    /// Lets a failed projection try its failing event again.
    pub async fn retry(&self, name: &str) -> Result<(), ProjectionError> {
        self.find(name)?;
        self.set_known(name, None);
        let cp = self.checkpoint(name).await?;
        if cp.status != Status::Failed {
            return Err(ProjectionError::WrongStatus {
                name: name.to_owned(),
                status: cp.status,
                action: "retry",
            });
        }
        checkpoint::set_status(&self.pool, name, Status::Running, None).await?;
        Ok(())
    }

    /// Skips the event a failed projection stopped at, recording the skip as an event; returns the
    /// skipped position.
    pub async fn skip(&self, name: &str, actor: &str) -> Result<Position, ProjectionError> {
        self.find(name)?;
        self.set_known(name, None);
        let cp = self.checkpoint(name).await?;
        let (Status::Failed, Some(failed)) = (cp.status, cp.failed_position) else {
            return Err(ProjectionError::WrongStatus {
                name: name.to_owned(),
                status: cp.status,
                action: "skip",
            });
        };
        let stream = StreamId::new("projection", name);
        let version = self
            .log
            .read_stream(&stream, 0)
            .await?
            .last()
            .map_or(0, |e| e.sequence);
        let meta = CommandMeta::new(actor, "cli");
        let mut tx = self.log.begin().await?;
        tx.append(AppendRequest {
            command_id: meta.command_id,
            stream,
            expected_sequence: version,
            events: vec![NewEvent {
                event_type: "ProjectionEventSkipped".into(),
                event_version: "1.0".into(),
                payload: json!({
                    "projection": name,
                    "position": failed,
                    "error": cp.error,
                }),
                metadata: meta.for_event(Uuid::now_v7()),
            }],
        })
        .await?;
        checkpoint::reset(
            tx.connection(),
            name,
            failed,
            cp.events_applied,
            cp.last_event_at,
        )
        .await?;
        tx.commit().await?;
        Ok(failed)
    }

    async fn checkpoint(&self, name: &str) -> Result<Checkpoint, ProjectionError> {
        checkpoint::load(&self.pool, name)
            .await?
            .ok_or_else(|| ProjectionError::Unknown(name.to_owned()))
    }

    /// Rebuilds `name` from the start of the log into fresh tables and swaps them in when caught
    /// up. Readers see the old tables until the swap; the live runner pauses only for the swap.
    /// One rebuild of a projection at a time, across processes: another fails with
    /// [`ProjectionError::Busy`]; a failed one leaves its error in the checkpoint.
    pub async fn rebuild(
        &self,
        name: &str,
        progress: impl FnMut(Progress) + Send,
    ) -> Result<Checkpoint, ProjectionError> {
        let claim = self.claim_rebuild(name).await?;
        self.run_rebuild(claim, progress).await
    }

    /// Claims the rebuild of `name` (for a caller that answers before the rebuild is done, like
    /// the HTTP API): [`ProjectionError::Busy`] while another rebuild of it is under way.
    pub async fn claim_rebuild(&self, name: &str) -> Result<RebuildClaim, ProjectionError> {
        let projection = self.find(name)?;
        if !projection.rebuildable() {
            return Err(ProjectionError::NotRebuildable(name.to_owned()));
        }
        checkpoint::ensure(&self.pool, name).await?;
        let owner = format!("rebuild-{}", Uuid::now_v7().simple());
        if !checkpoint::claim_rebuild(&self.pool, name, &owner, REBUILD_STALE_AFTER).await? {
            return Err(ProjectionError::Busy(name.to_owned()));
        }
        Ok(RebuildClaim {
            name: name.to_owned(),
            owner,
        })
    }

    /// Runs a claimed rebuild to its end, and records how it ended.
    pub async fn run_rebuild(
        &self,
        claim: RebuildClaim,
        progress: impl FnMut(Progress) + Send,
    ) -> Result<Checkpoint, ProjectionError> {
        let result = self.rebuild_claimed(&claim, progress).await;
        let error = result.as_ref().err().map(ToString::to_string);
        checkpoint::end_rebuild(&self.pool, &claim.name, &claim.owner, error.as_deref()).await?;
        let rebuilt = result?;
        self.checkpoint(&rebuilt.name).await
    }

    async fn rebuild_claimed(
        &self,
        claim: &RebuildClaim,
        mut progress: impl FnMut(Progress) + Send,
    ) -> Result<Checkpoint, ProjectionError> {
        let name = claim.name.as_str();
        let projection = self.find(name)?.clone();
        {
            let mut tx = self.log.begin().await?;
            drop_tables(tx.as_mut(), projection.tables(), &Tables::REBUILD).await?;
            projection.create(tx.as_mut(), &Tables::REBUILD).await?;
            tx.commit().await?;
        }
        let mut position = Position::START;
        let mut read = 0u64;
        let mut applied = 0i64;
        let mut last_at: Option<DateTime<Utc>> = None;
        // Catch up while the live projection keeps running.
        loop {
            let caught_up = self
                .replay_into(
                    projection.as_ref(),
                    &mut position,
                    &mut read,
                    &mut applied,
                    &mut last_at,
                    &mut progress,
                )
                .await?;
            checkpoint::beat_rebuild(&self.pool, name, &claim.owner).await?;
            if caught_up {
                break;
            }
        }
        // Pause the live projection, take it over, finish, swap.
        checkpoint::set_status(&self.pool, name, Status::Rebuilding, None).await?;
        let deadline = tokio::time::Instant::now() + self.leases.lease() + Duration::from_secs(1);
        while !self.leases.acquire(name).await? {
            if tokio::time::Instant::now() > deadline {
                checkpoint::set_status(&self.pool, name, Status::Running, None).await?;
                return Err(ProjectionError::Busy(name.to_owned()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let swapped = async {
            while !self
                .replay_into(
                    projection.as_ref(),
                    &mut position,
                    &mut read,
                    &mut applied,
                    &mut last_at,
                    &mut progress,
                )
                .await?
            {}
            let mut tx = self.log.begin().await?;
            drop_tables(tx.as_mut(), projection.tables(), &Tables::LIVE).await?;
            for base in projection.tables() {
                let sql = format!(
                    "ALTER TABLE {} RENAME TO {}",
                    Tables::REBUILD.name(base),
                    Tables::LIVE.name(base)
                );
                execute(tx.as_mut(), &sql).await?;
                rename_shadow_tables(tx.as_mut(), base).await?;
            }
            checkpoint::reset(tx.connection(), name, position, applied, last_at).await?;
            tx.commit().await?;
            Ok::<_, ProjectionError>(())
        }
        .await;
        if swapped.is_err() {
            checkpoint::set_status(&self.pool, name, Status::Running, None).await?;
        }
        self.set_known(name, None);
        self.leases.release(name).await?;
        swapped?;
        self.checkpoint(name).await
    }

    /// Applies events after `position` into the rebuild tables; true when caught up.
    #[allow(clippy::too_many_arguments)]
    /// Replays `name` from the start of the log up to `until` (inclusive) into scratch tables
    /// (`<base>__<into>`, made anew), for inspection: the live projection, its checkpoint and
    /// its holder are not touched. Returns the tables and the events applied.
    pub async fn replay_until(
        &self,
        name: &str,
        until: Position,
        into: &str,
    ) -> Result<(Vec<String>, i64), ProjectionError> {
        let projection = self.find(name)?.clone();
        if !projection.rebuildable() {
            return Err(ProjectionError::NotRebuildable(name.to_owned()));
        }
        let tables = Tables::scratch(into)
            .ok_or_else(|| ProjectionError::BadScratchName(into.to_owned()))?;
        {
            let mut tx = self.log.begin().await?;
            drop_tables(tx.as_mut(), projection.tables(), &tables).await?;
            projection.create(tx.as_mut(), &tables).await?;
            tx.commit().await?;
        }
        let mut position = Position::START;
        let mut applied = 0i64;
        'read: loop {
            let batch = self.log.read_all(position, self.batch_size).await?;
            let Some(last) = batch.last() else { break };
            position = last.position;
            let upto: Vec<RecordedEvent> = batch
                .iter()
                .take_while(|e| e.position <= until)
                .cloned()
                .collect();
            let done = upto.len() < batch.len();
            let relevant = relevant(projection.as_ref(), &upto);
            if !relevant.is_empty() {
                projection.prepare(&relevant).await?;
                let mut tx = self.log.begin().await?;
                projection.apply(tx.as_mut(), &tables, &relevant).await?;
                tx.commit().await?;
                applied += relevant.len() as i64;
            }
            if done || position >= until {
                break 'read;
            }
        }
        let names = projection.tables().iter().map(|t| tables.name(t)).collect();
        Ok((names, applied))
    }

    async fn replay_into(
        &self,
        projection: &dyn Projection,
        position: &mut Position,
        read: &mut u64,
        applied: &mut i64,
        last_at: &mut Option<DateTime<Utc>>,
        progress: &mut (impl FnMut(Progress) + Send),
    ) -> Result<bool, ProjectionError> {
        let batch = self.log.read_all(*position, self.batch_size).await?;
        let Some(last) = batch.last() else {
            return Ok(true);
        };
        let through = last.position;
        let relevant = relevant(projection, &batch);
        if !relevant.is_empty() {
            projection.prepare(&relevant).await?;
            let mut tx = self.log.begin().await?;
            projection
                .apply(tx.as_mut(), &Tables::REBUILD, &relevant)
                .await?;
            tx.commit().await?;
            *applied += relevant.len() as i64;
            *last_at = relevant.last().map(|e| e.recorded_at).or(*last_at);
        }
        *position = through;
        *read += batch.len() as u64;
        progress(Progress {
            events_read: *read,
            position: through,
            head: self.log.head().await?,
        });
        Ok(false)
    }
}

/// Whether `event` is of one of `types` (any, when empty).
pub(crate) fn of_types(types: &[&str], event: &RecordedEvent) -> bool {
    types.is_empty() || types.contains(&event.event_type.as_str())
}

/// The events `projection` wants: `events` themselves when it wants them all (the audit trail,
/// the stream and subject indexes), else copies of those it wants.
fn relevant<'e>(
    projection: &dyn Projection,
    events: &'e [RecordedEvent],
) -> std::borrow::Cow<'e, [RecordedEvent]> {
    if events.iter().all(|e| projection.wants(e)) {
        return std::borrow::Cow::Borrowed(events);
    }
    events
        .iter()
        .filter(|e| projection.wants(e))
        .cloned()
        .collect()
}

async fn execute(tx: &mut dyn LogTransaction, sql: &str) -> Result<(), sqlx::Error> {
    Db::from(tx.connection())
        .execute(sql, &[])
        .await
        .map(|_| ())
}

/// On SQLite, the shadow tables of a virtual table (`<name>_chunks`, … of sqlite-vec's `vec0`)
/// that its module does not rename itself follow it from the rebuild name to the live one, so
/// that it finds them again.
async fn rename_shadow_tables(tx: &mut dyn LogTransaction, base: &str) -> Result<(), sqlx::Error> {
    let mut db = Db::from(tx.connection());
    if db.dialect() != crate::store::sql::Dialect::Sqlite {
        return Ok(());
    }
    let from = format!("{}_", Tables::REBUILD.name(base));
    let shadows = db
        .fetch_all(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND substr(name, 1, length($1)) = $1",
            &[from.as_str().into()],
        )
        .await?;
    for shadow in shadows {
        let name: String = shadow.get("name")?;
        let to = format!("{}_{}", Tables::LIVE.name(base), &name[from.len()..]);
        db.execute(&format!("ALTER TABLE \"{name}\" RENAME TO \"{to}\""), &[])
            .await?;
    }
    Ok(())
}

async fn drop_tables(
    tx: &mut dyn LogTransaction,
    bases: &[&str],
    tables: &Tables,
) -> Result<(), sqlx::Error> {
    for base in bases {
        execute(tx, &format!("DROP TABLE IF EXISTS {}", tables.name(base))).await?;
    }
    Ok(())
}
