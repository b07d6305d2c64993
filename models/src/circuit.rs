//! A circuit breaker per provider: after too many consecutive failures the router stops calling
//! the provider for a cool-down, then lets one trial call through to see whether it recovered.
//!
//! ```text
//!            N consecutive failures                 cool-down elapsed
//!   Closed ─────────────────────────▶ Open ──────────────────────────▶ HalfOpen (one trial call)
//!     ▲                                 ▲                                   │
//!     │                                 └──────────── trial fails ──────────┤
//!     └──────────────────────────────────────────── trial succeeds ─────────┘
//! ```
//!
//! Written here rather than taken from a crate: what the router needs (exactly one trial call
//! while half-open, handed back if the caller is cancelled, and time from the router's injected
//! [`Clock`]) is about a hundred lines, and the crates that exist bring their own time source and
//! failure policies (failsafe) or are young single-maintainer releases.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::clock::Clock;

/// Where a provider's circuit stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    /// Calls go through; consecutive failures are counted.
    Closed,
    /// Calls are refused until the cool-down has passed.
    Open,
    /// The cool-down has passed: the next call is a trial that closes or reopens the circuit.
    HalfOpen,
}

#[derive(Debug, Clone, Copy)]
enum Inner {
    Closed { failures: u32 },
    Open { since: Instant },
    HalfOpen { trial_in_flight: bool },
}

/// One provider's circuit breaker.
#[derive(Debug)]
pub struct CircuitBreaker {
    failure_threshold: u32,
    cooldown: Duration,
    clock: Arc<dyn Clock>,
    inner: Mutex<Inner>,
}

impl CircuitBreaker {
    /// A closed breaker that opens after `failure_threshold` consecutive failures (at least 1)
    /// and stays open for `cooldown`.
    pub fn new(failure_threshold: u32, cooldown: Duration, clock: Arc<dyn Clock>) -> Self {
        Self {
            failure_threshold: failure_threshold.max(1),
            cooldown,
            clock,
            inner: Mutex::new(Inner::Closed { failures: 0 }),
        }
    }

    // A poisoned lock only means another thread panicked between two plain assignments; the
    // state is still one of the three valid ones.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current state. An open circuit whose cool-down has passed reports `HalfOpen`: the
    /// next call will be let through as the trial.
    pub fn state(&self) -> CircuitState {
        match *self.lock() {
            Inner::Closed { .. } => CircuitState::Closed,
            Inner::Open { since } if self.clock.now() >= since + self.cooldown => {
                CircuitState::HalfOpen
            }
            Inner::Open { .. } => CircuitState::Open,
            Inner::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    /// Asks to make a call. `None` when the circuit is open, or half-open with its trial call
    /// already under way. The permit must be given the call's outcome with
    /// [`CircuitPermit::record`]; a permit dropped without one (the caller was cancelled) gives
    /// the trial back so that another caller can make it.
    pub fn try_acquire(&self) -> Option<CircuitPermit<'_>> {
        let mut inner = self.lock();
        let trial = match *inner {
            Inner::Closed { .. } => false,
            Inner::Open { since } => {
                if self.clock.now() < since + self.cooldown {
                    return None;
                }
                true
            }
            Inner::HalfOpen { trial_in_flight } => {
                if trial_in_flight {
                    return None;
                }
                true
            }
        };
        if trial {
            *inner = Inner::HalfOpen {
                trial_in_flight: true,
            };
        }
        Some(CircuitPermit {
            breaker: self,
            trial,
            recorded: false,
        })
    }

    fn record(&self, trial: bool, healthy: bool) {
        let mut inner = self.lock();
        let now = self.clock.now();
        *inner = match (*inner, trial, healthy) {
            (Inner::HalfOpen { .. }, true, true) => Inner::Closed { failures: 0 },
            (Inner::HalfOpen { .. }, true, false) => Inner::Open { since: now },
            (Inner::Closed { .. }, false, true) => Inner::Closed { failures: 0 },
            (Inner::Closed { failures }, false, false) => {
                let failures = failures + 1;
                if failures >= self.failure_threshold {
                    tracing::warn!(failures, "circuit opened");
                    Inner::Open { since: now }
                } else {
                    Inner::Closed { failures }
                }
            }
            // A call let through while the circuit was closed that ends after it opened (or
            // reopened) says nothing about the current period: the state stays as it is.
            (state, _, _) => state,
        };
    }

    fn release_trial(&self) {
        let mut inner = self.lock();
        if let Inner::HalfOpen { .. } = *inner {
            *inner = Inner::HalfOpen {
                trial_in_flight: false,
            };
        }
    }
}

/// Leave to make one call through a [`CircuitBreaker`].
#[derive(Debug)]
pub struct CircuitPermit<'a> {
    breaker: &'a CircuitBreaker,
    trial: bool,
    recorded: bool,
}

impl CircuitPermit<'_> {
    /// Whether this call is the half-open trial.
    pub fn is_trial(&self) -> bool {
        self.trial
    }

    /// Records the call's outcome: `healthy` is false when the error says the provider is at
    /// fault (see [`ModelError::is_provider_fault`](crate::ModelError::is_provider_fault)).
    pub fn record(mut self, healthy: bool) {
        self.recorded = true;
        self.breaker.record(self.trial, healthy);
    }
}

impl Drop for CircuitPermit<'_> {
    fn drop(&mut self) {
        if self.trial && !self.recorded {
            self.breaker.release_trial();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn breaker(clock: &Arc<ManualClock>) -> CircuitBreaker {
        CircuitBreaker::new(3, Duration::from_secs(60), clock.clone())
    }

    fn fail(breaker: &CircuitBreaker) {
        breaker.try_acquire().expect("permitted").record(false);
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let clock = Arc::new(ManualClock::new());
        let breaker = breaker(&clock);
        fail(&breaker);
        fail(&breaker);
        breaker.try_acquire().unwrap().record(true);
        fail(&breaker);
        fail(&breaker);
        assert_eq!(breaker.state(), CircuitState::Closed);
        fail(&breaker);
        assert_eq!(breaker.state(), CircuitState::Open);
        assert!(breaker.try_acquire().is_none());
    }

    #[test]
    fn half_open_admits_one_trial_and_closes_on_success() {
        let clock = Arc::new(ManualClock::new());
        let breaker = breaker(&clock);
        (0..3).for_each(|_| fail(&breaker));
        clock.advance(Duration::from_secs(59));
        assert!(breaker.try_acquire().is_none());
        clock.advance(Duration::from_secs(1));
        assert_eq!(breaker.state(), CircuitState::HalfOpen);
        let trial = breaker.try_acquire().expect("trial");
        assert!(trial.is_trial());
        assert!(breaker.try_acquire().is_none(), "only one trial at a time");
        trial.record(true);
        assert_eq!(breaker.state(), CircuitState::Closed);
        assert!(!breaker.try_acquire().unwrap().is_trial());
    }

    #[test]
    fn failed_trial_reopens_for_a_full_cooldown() {
        let clock = Arc::new(ManualClock::new());
        let breaker = breaker(&clock);
        (0..3).for_each(|_| fail(&breaker));
        clock.advance(Duration::from_secs(61));
        breaker.try_acquire().unwrap().record(false);
        assert_eq!(breaker.state(), CircuitState::Open);
        clock.advance(Duration::from_secs(30));
        assert!(breaker.try_acquire().is_none());
        clock.advance(Duration::from_secs(30));
        assert!(breaker.try_acquire().is_some());
    }

    #[test]
    fn a_cancelled_trial_is_handed_back() {
        let clock = Arc::new(ManualClock::new());
        let breaker = breaker(&clock);
        (0..3).for_each(|_| fail(&breaker));
        clock.advance(Duration::from_secs(60));
        drop(breaker.try_acquire().unwrap());
        assert!(breaker.try_acquire().unwrap().is_trial());
    }
}
