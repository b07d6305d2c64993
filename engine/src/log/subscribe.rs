//! Following the global log: catch up from a position, then wait for appends (woken by the
//! adapter's notifications, with a polling fallback), never busy-polling.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::watch;

use super::{EventLog, LogError, Position, RecordedEvent};

/// How a subscription reads.
#[derive(Clone, Debug)]
pub struct SubscriptionOptions {
    /// Events per `read_all`.
    pub batch_size: usize,
    /// How long to wait for a notification before reading anyway (appends by processes that do
    /// not notify, a lost notification connection).
    pub poll_interval: Duration,
    /// After a read that reached the head, the next read comes no sooner than this: under a
    /// stream of appends each read then takes what came meanwhile instead of one read per
    /// append (a notification that comes before is kept, not lost). Zero reads at once.
    pub linger: Duration,
}

impl Default for SubscriptionOptions {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            poll_interval: Duration::from_secs(1),
            linger: Duration::ZERO,
        }
    }
}

/// A live reader of the global log. Each committed event is returned once, in log order.
pub struct Subscription {
    log: Arc<dyn EventLog>,
    position: Position,
    buffer: VecDeque<RecordedEvent>,
    appends: watch::Receiver<u64>,
    options: SubscriptionOptions,
    /// The last read returned less than a page: the next waits for a notification first.
    caught_up: bool,
    /// When the last read that reached the head was made (see [`SubscriptionOptions::linger`]).
    read_at: Option<tokio::time::Instant>,
}

/// Follows the log from after `after`.
pub fn subscribe(
    log: Arc<dyn EventLog>,
    after: Position,
    options: SubscriptionOptions,
) -> Subscription {
    let appends = log.appends();
    Subscription {
        log,
        position: after,
        buffer: VecDeque::new(),
        appends,
        options,
        caught_up: false,
        read_at: None,
    }
}

impl Subscription {
    /// The position of the last event returned (or the starting position).
    pub fn position(&self) -> Position {
        self.position
    }

    /// The next event, waiting for one to be committed if need be.
    pub async fn next(&mut self) -> Result<RecordedEvent, LogError> {
        loop {
            if let Some(event) = self.buffer.pop_front() {
                self.position = event.position;
                return Ok(event);
            }
            if !self.caught_up {
                if let Some(read_at) = self.read_at.take() {
                    tokio::time::sleep_until(read_at + self.options.linger).await;
                }
                // Mark the notifications seen *before* reading, so an append that lands after
                // this read wakes the wait below.
                self.appends.borrow_and_update();
                let events = self
                    .log
                    .read_all(self.position, self.options.batch_size)
                    .await?;
                // A short page held every event committed before the read: reading again at
                // once would find only what a notification since then announces.
                self.caught_up = events.len() < self.options.batch_size;
                if self.caught_up && !self.options.linger.is_zero() {
                    self.read_at = Some(tokio::time::Instant::now());
                }
                if !events.is_empty() {
                    self.buffer.extend(events);
                    continue;
                }
            }
            self.caught_up = false;
            // Wake on a notification or after the polling interval, whichever comes first. A
            // closed notification channel must not turn this into a busy loop, hence the sleep
            // when `changed` fails at once.
            let wait = self.options.poll_interval;
            let appends = &mut self.appends;
            if let Ok(Err(_)) = tokio::time::timeout(wait, appends.changed()).await {
                tokio::time::sleep(wait).await;
            }
        }
    }

    /// The next event if one is committed now, without waiting.
    pub async fn try_next(&mut self) -> Result<Option<RecordedEvent>, LogError> {
        if self.buffer.is_empty() {
            self.caught_up = false;
            let batch = self
                .log
                .read_all(self.position, self.options.batch_size)
                .await?;
            self.buffer.extend(batch);
        }
        Ok(self.buffer.pop_front().inspect(|event| {
            self.position = event.position;
        }))
    }

    /// The subscription as a stream (it ends only after an error).
    pub fn into_stream(self) -> impl Stream<Item = Result<RecordedEvent, LogError>> {
        futures::stream::unfold(Some(self), |state| async move {
            let mut subscription = state?;
            match subscription.next().await {
                Ok(event) => Some((Ok(event), Some(subscription))),
                Err(e) => Some((Err(e), None)),
            }
        })
    }
}
