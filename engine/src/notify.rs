//! Cross-process wake-ups on PostgreSQL: LISTEN/NOTIFY, with local wake-ups first.
//!
//! Each waker has two counters: `local` (bumped by this process's commits; a task forwards them
//! to other processes with `NOTIFY`) and `all` (bumped by local commits and by notifications from
//! other processes; waiters wait on it). A queue's waker also keeps one counter per queue, so
//! that a worker wakes for its own queue's jobs, not for every queue's (a notification from
//! another process, which does not say which queue, bumps them all).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// One counter per queue name, made on first use.
#[derive(Clone, Default)]
pub(crate) struct PerQueue(Arc<Mutex<HashMap<String, watch::Sender<u64>>>>);

impl PerQueue {
    pub(crate) fn subscribe(&self, queue: &str) -> watch::Receiver<u64> {
        let mut queues = self.0.lock().expect("not poisoned");
        queues
            .entry(queue.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Bumps the named queues' counters (those someone waits on).
    pub(crate) fn wake<'q>(&self, names: impl IntoIterator<Item = &'q str>) {
        let queues = self.0.lock().expect("not poisoned");
        for name in names {
            if let Some(counter) = queues.get(name) {
                bump(counter);
            }
        }
    }

    pub(crate) fn wake_all(&self) {
        for counter in self.0.lock().expect("not poisoned").values() {
            bump(counter);
        }
    }
}

/// Wake-ups for one channel.
pub(crate) struct Waker {
    all: watch::Sender<u64>,
    local: watch::Sender<u64>,
    queues: PerQueue,
}

impl Waker {
    pub(crate) fn new() -> Self {
        Self {
            all: watch::channel(0).0,
            local: watch::channel(0).0,
            queues: PerQueue::default(),
        }
    }

    /// After a local commit: wake local waiters and tell other processes.
    pub(crate) fn wake(&self) {
        self.sender().wake();
    }

    /// After a local commit that concerns only `queues`: wake their local waiters (and every
    /// waiter on `all`), and tell other processes.
    pub(crate) fn wake_queues<'q>(&self, queues: impl IntoIterator<Item = &'q str>) {
        self.sender().wake_queues(queues);
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.all.subscribe()
    }

    pub(crate) fn subscribe_queue(&self, queue: &str) -> watch::Receiver<u64> {
        self.queues.subscribe(queue)
    }

    pub(crate) fn sender(&self) -> WakeHandle {
        WakeHandle {
            all: self.all.clone(),
            local: self.local.clone(),
            queues: self.queues.clone(),
        }
    }

    /// Starts, if `forward`, the NOTIFY forwarder (for channels whose writers do not notify in
    /// their own transactions) and, if `listen`, the listener for `channel`.
    pub(crate) fn start(
        &self,
        pool: &PgPool,
        channel: &'static str,
        forward: bool,
        listen: bool,
    ) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::new();
        if forward {
            tasks.push(tokio::spawn(notify(
                pool.clone(),
                channel,
                self.local.subscribe(),
            )));
        }
        if listen {
            tasks.push(tokio::spawn(listen_for(
                pool.clone(),
                channel,
                self.all.clone(),
                self.queues.clone(),
            )));
        }
        tasks
    }
}

/// A cloneable [`Waker::wake`].
#[derive(Clone)]
pub(crate) struct WakeHandle {
    all: watch::Sender<u64>,
    local: watch::Sender<u64>,
    queues: PerQueue,
}

impl WakeHandle {
    pub(crate) fn wake(&self) {
        bump(&self.all);
        bump(&self.local);
        self.queues.wake_all();
    }

    pub(crate) fn wake_queues<'q>(&self, queues: impl IntoIterator<Item = &'q str>) {
        bump(&self.all);
        bump(&self.local);
        self.queues.wake(queues);
    }
}

pub(crate) fn bump(counter: &watch::Sender<u64>) {
    counter.send_modify(|n| *n = n.wrapping_add(1));
}

/// Tells other processes about local commits: `NOTIFY` outside the committing transactions, once
/// for however many commits happened while the previous one was being sent.
///
/// Why not in the committing transaction (or a trigger): PostgreSQL serialises the commits of
/// transactions that notify (they hold one lock until their commit is flushed), which would undo
/// group commit across concurrent writers.
async fn notify(pool: PgPool, channel: &'static str, mut local: watch::Receiver<u64>) {
    while local.changed().await.is_ok() {
        // Named by the sender (the pool's unique `application_name`), as the appends' trigger
        // does, so that this process skips its own notifications.
        if let Err(e) = sqlx::query("SELECT pg_notify($1, current_setting('application_name'))")
            .bind(channel)
            .execute(&pool)
            .await
        {
            if pool.is_closed() {
                return;
            }
            tracing::warn!(error = %e, channel, "NOTIFY failed; other processes will poll");
        }
    }
}

/// Bumps `all` on every notification on `channel` sent by another process (this process woke
/// its own waiters when it committed: a notification whose payload is this pool's
/// `application_name` is its own). On a lost connection it bumps too (notifications may have
/// been missed) and reconnects with a capped backoff.
async fn listen_for(
    pool: PgPool,
    channel: &'static str,
    all: watch::Sender<u64>,
    queues: PerQueue,
) {
    let bump = |all: &watch::Sender<u64>| {
        bump(all);
        queues.wake_all();
    };
    let own = pool
        .connect_options()
        .get_application_name()
        .map(str::to_owned);
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            // Closing down: nothing to listen for, nothing to warn about.
            Err(_) if pool.is_closed() => return,
            Err(e) => {
                tracing::warn!(error = %e, channel, "cannot LISTEN, retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if let Err(e) = listener.listen(channel).await {
            tracing::warn!(error = %e, channel, "LISTEN failed, retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            continue;
        }
        backoff = Duration::from_millis(100);
        // Whatever happened while we were not listening is found by this read-through wake-up.
        bump(&all);
        loop {
            match listener.try_recv().await {
                Ok(Some(notification))
                    if own.is_some() && Some(notification.payload()) == own.as_deref() => {}
                // Ok(None): the connection dropped and sqlx reconnected; notifications may be lost.
                Ok(_) => bump(&all),
                Err(_) if pool.is_closed() => return,
                Err(e) => {
                    tracing::warn!(error = %e, channel, "notification connection lost; reconnecting");
                    bump(&all);
                    break;
                }
            }
            if all.is_closed() {
                return;
            }
        }
    }
}
