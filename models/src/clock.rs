//! Time as a port: the one clock the model router's circuit breakers and the workflow runtime
//! read, so that tests move time instead of waiting (a breaker's cool-down, a timer that is due).

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

/// A source of time: monotonic for measuring, wall-clock for what is recorded.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current instant.
    fn now(&self) -> Instant;

    /// The current wall-clock time (what commands and events record).
    fn utc(&self) -> DateTime<Utc>;
}

/// The machine's clocks.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn utc(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that moves only when told to: for tests and simulations.
#[derive(Debug)]
pub struct ManualClock {
    start: Instant,
    start_utc: DateTime<Utc>,
    elapsed: Mutex<Duration>,
}

impl ManualClock {
    /// A clock standing at an arbitrary instant (its wall-clock time: now).
    pub fn new() -> Self {
        Self::at(Utc::now())
    }

    /// A clock whose wall-clock time stands at `utc`.
    pub fn at(utc: DateTime<Utc>) -> Self {
        Self {
            start: Instant::now(),
            start_utc: utc,
            elapsed: Mutex::new(Duration::ZERO),
        }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        *self.elapsed.lock().unwrap_or_else(|e| e.into_inner()) += by;
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl ManualClock {
    fn elapsed(&self) -> Duration {
        *self.elapsed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + self.elapsed()
    }

    fn utc(&self) -> DateTime<Utc> {
        self.start_utc + self.elapsed()
    }
}
