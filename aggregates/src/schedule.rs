//! `Schedule`: a workflow started on a timetable — a cron pattern in a time zone, or a fixed
//! interval — as a durable timer.
//!
//! The aggregate decides which moment fires and records it; the runtime arms one timer job per
//! next moment and starts each fired moment's task (see `workflows/src/runtime/schedules.rs`).
//! The rules, and why:
//!
//! - **A moment fires once.** The state knows the next moment due; a `Fire` for any other moment
//!   (a repeated or stale timer, another node's copy) is no change. So no tick is doubled, across
//!   retries and nodes.
//! - **Nothing is lost while down.** Moments missed while no node ran are handled by the catch-up
//!   policy when the timer finally runs: [`CatchUp::All`] fires each (oldest first, at most
//!   [`MAX_CATCH_UP`] in a row), [`CatchUp::Latest`] (the default) fires the latest and records
//!   the others as skipped, [`CatchUp::Skip`] records them all as skipped. Either way each missed
//!   moment is accounted for in the log.
//! - **Overlap.** With [`Overlap::Skip`] (the default) a moment that comes while the task of the
//!   last fired one is still running is recorded as skipped; [`Overlap::Allow`] starts it anyway.
//! - **Paused schedules do not fire**; resuming counts from the moment of resuming (what was
//!   missed while paused is not caught up: pausing is asking for that).
//! - **Times come in commands** (`now`), so deciding stays pure and replayable.

use chrono::{DateTime, Duration, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

/// The longest schedule name, in bytes.
pub const MAX_NAME_BYTES: usize = 64;
/// The shortest interval: one second.
pub const MIN_INTERVAL_SECONDS: u64 = 1;
/// Missed moments fired one after the other by [`CatchUp::All`] before the rest are skipped.
pub const MAX_CATCH_UP: usize = 100;
/// Missed moments counted one by one (beyond, the count stops there).
pub const MAX_COUNTED: u64 = 1_000_000;
/// How late a moment may fire and still count as on time under [`CatchUp::Skip`].
pub const ON_TIME: Duration = Duration::seconds(60);

/// When a schedule fires.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Timing {
    /// A cron pattern (5 fields, or 6 with seconds first; `@hourly` and the like), in an IANA
    /// time zone (`Europe/Paris`; `UTC` by default).
    Cron { pattern: String, timezone: String },
    /// Every `seconds`, counted from the schedule's creation (or its resumption).
    Every { seconds: u64 },
}

impl Timing {
    /// The timing's first moment after `now`, or why it has none.
    pub fn first_after(&self, now: DateTime<Utc>) -> Result<DateTime<Utc>, ScheduleError> {
        self.next(now, now)
    }

    /// The first moment strictly after `after` (for an interval: after `anchor`, stepping by
    /// the interval).
    fn next(
        &self,
        anchor: DateTime<Utc>,
        after: DateTime<Utc>,
    ) -> Result<DateTime<Utc>, ScheduleError> {
        match self {
            Timing::Every { seconds } => {
                if *seconds < MIN_INTERVAL_SECONDS || *seconds > i64::MAX as u64 / 1_000_000 {
                    return Err(ScheduleError::InvalidTiming(format!(
                        "an interval must be at least {MIN_INTERVAL_SECONDS} second"
                    )));
                }
                let step = *seconds as i64;
                let elapsed = (after - anchor).num_seconds().max(-1);
                let steps = elapsed.div_euclid(step) + 1;
                Ok(anchor + Duration::seconds(steps * step))
            }
            Timing::Cron { .. } => self.next_after(after),
        }
    }

    fn next_after(&self, after: DateTime<Utc>) -> Result<DateTime<Utc>, ScheduleError> {
        match self {
            Timing::Every { .. } => self.next(after, after),
            Timing::Cron { pattern, timezone } => {
                let cron: croner::Cron =
                    pattern.parse().map_err(|e: croner::errors::CronError| {
                        ScheduleError::InvalidTiming(format!(
                            "{pattern:?} is not a cron pattern: {e}"
                        ))
                    })?;
                let zone: chrono_tz::Tz = timezone.parse().map_err(|_| {
                    ScheduleError::InvalidTiming(format!(
                        "{timezone:?} is not a time zone (IANA names, e.g. Europe/Paris or UTC)"
                    ))
                })?;
                let local = after.with_timezone(&zone);
                let next = cron.find_next_occurrence(&local, false).map_err(|e| {
                    ScheduleError::InvalidTiming(format!("{pattern:?} never fires: {e}"))
                })?;
                Ok(next.with_timezone(&Utc))
            }
        }
    }
}

/// What to do with moments missed while no node ran.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// Fire each missed moment, oldest first (at most [`MAX_CATCH_UP`]).
    All,
    /// Fire the latest missed moment; record the others as skipped.
    #[default]
    Latest,
    /// Fire none of them (a moment over [`ON_TIME`] late is skipped).
    Skip,
}

/// What to do when a moment comes while the last fired moment's task is still running.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// Skip the moment (recorded).
    #[default]
    Skip,
    /// Start it anyway.
    Allow,
}

/// What a schedule starts and when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleSpec {
    pub timing: Timing,
    /// The workflow each moment starts.
    pub workflow: String,
    /// The task's input (the same each time; not a person's data).
    pub input: String,
    #[serde(default)]
    pub catch_up: CatchUp,
    #[serde(default)]
    pub overlap: Overlap,
}

/// What can be asked of a schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScheduleCommand {
    /// Creates it (its name is its id); fires first at the timing's first moment after `now`.
    Create {
        name: String,
        spec: ScheduleSpec,
        by: String,
        now: DateTime<Utc>,
    },
    Pause {
        by: String,
    },
    /// Fires next at the first moment after `now`.
    Resume {
        by: String,
        now: DateTime<Utc>,
    },
    /// Stops it for good (the name stays taken: its history is in the log).
    Remove {
        by: String,
    },
    /// The timer for `due` ran at `now`; `running` says whether the task of the last fired moment
    /// is still running.
    Fire {
        due: DateTime<Utc>,
        now: DateTime<Utc>,
        running: bool,
    },
}

/// Why moments were skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// Missed while no node ran, and the catch-up policy did not fire them.
    Missed,
    /// The last fired moment's task was still running.
    Overlap,
}

/// What happened to a schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum ScheduleEvent {
    ScheduleCreated {
        name: String,
        spec: ScheduleSpec,
        by: String,
        next_due: DateTime<Utc>,
    },
    SchedulePaused {
        by: String,
    },
    ScheduleResumed {
        by: String,
        next_due: DateTime<Utc>,
    },
    ScheduleRemoved {
        by: String,
    },
    /// `due` fired (its task is started by the runtime); the timer is set for `next_due`.
    ScheduleFired {
        due: DateTime<Utc>,
        fired_at: DateTime<Utc>,
        next_due: DateTime<Utc>,
    },
    /// `count` moments from `from` to `to` did not fire.
    ScheduleSkipped {
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        count: u64,
        reason: SkipReason,
        /// Where the timer is set now, when this event moves it (else a fire follows).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next_due: Option<DateTime<Utc>>,
    },
}

impl DomainEvent for ScheduleEvent {
    fn event_type(&self) -> String {
        match self {
            ScheduleEvent::ScheduleCreated { .. } => "ScheduleCreated",
            ScheduleEvent::SchedulePaused { .. } => "SchedulePaused",
            ScheduleEvent::ScheduleResumed { .. } => "ScheduleResumed",
            ScheduleEvent::ScheduleRemoved { .. } => "ScheduleRemoved",
            ScheduleEvent::ScheduleFired { .. } => "ScheduleFired",
            ScheduleEvent::ScheduleSkipped { .. } => "ScheduleSkipped",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

/// Why a schedule command was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScheduleError {
    #[error("a schedule's name is 1 to {MAX_NAME_BYTES} lowercase letters, digits, '-' or '_', starting with a letter or digit")]
    InvalidName,
    #[error("{0}")]
    InvalidTiming(String),
    #[error("a schedule needs a workflow")]
    NoWorkflow,
    #[error("the input contains a NUL character or is over 32768 characters")]
    InvalidInput,
    #[error("there is already a schedule of that name")]
    AlreadyExists,
    #[error("there is no such schedule")]
    NotFound,
    #[error("the schedule was removed")]
    Removed,
    #[error("the schedule is paused")]
    Paused,
    #[error("the schedule is not paused")]
    NotPaused,
}

/// Whether a schedule fires.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleStatus {
    #[default]
    New,
    Active,
    Paused,
    Removed,
}

/// A schedule's state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub name: String,
    pub status: ScheduleStatus,
    pub spec: Option<ScheduleSpec>,
    /// The moment the timer is set for (while active).
    pub next_due: Option<DateTime<Utc>>,
    /// The interval's anchor: creation or the last resumption.
    pub anchor: Option<DateTime<Utc>>,
    /// The last moment that fired.
    pub last_fired: Option<DateTime<Utc>>,
    pub fired: u64,
    pub skipped: u64,
}

/// Whether `name` may name a schedule.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl Schedule {
    fn timing(&self) -> &Timing {
        &self
            .spec
            .as_ref()
            .expect("an active schedule has its spec")
            .timing
    }

    fn next(&self, after: DateTime<Utc>) -> Result<DateTime<Utc>, ScheduleError> {
        self.timing().next(self.anchor.unwrap_or(after), after)
    }

    fn require_known(&self) -> Result<(), ScheduleError> {
        match self.status {
            ScheduleStatus::New => Err(ScheduleError::NotFound),
            ScheduleStatus::Removed => Err(ScheduleError::Removed),
            _ => Ok(()),
        }
    }

    fn decide(&self, command: ScheduleCommand) -> Result<Vec<ScheduleEvent>, ScheduleError> {
        use ScheduleEvent as E;
        Ok(match command {
            ScheduleCommand::Create {
                name,
                spec,
                by,
                now,
            } => {
                if self.status != ScheduleStatus::New {
                    return Err(ScheduleError::AlreadyExists);
                }
                if !valid_name(&name) {
                    return Err(ScheduleError::InvalidName);
                }
                if spec.workflow.trim().is_empty() {
                    return Err(ScheduleError::NoWorkflow);
                }
                if spec.input.contains('\0') || spec.input.chars().count() > 32_768 {
                    return Err(ScheduleError::InvalidInput);
                }
                let next_due = spec.timing.next(now, now)?;
                vec![E::ScheduleCreated {
                    name,
                    spec,
                    by,
                    next_due,
                }]
            }
            ScheduleCommand::Pause { by } => {
                self.require_known()?;
                if self.status == ScheduleStatus::Paused {
                    return Ok(Vec::new());
                }
                vec![E::SchedulePaused { by }]
            }
            ScheduleCommand::Resume { by, now } => {
                self.require_known()?;
                if self.status != ScheduleStatus::Paused {
                    return Err(ScheduleError::NotPaused);
                }
                vec![E::ScheduleResumed {
                    by,
                    next_due: self.timing().next(now, now)?,
                }]
            }
            ScheduleCommand::Remove { by } => {
                if self.status == ScheduleStatus::Removed {
                    return Ok(Vec::new());
                }
                self.require_known()?;
                vec![E::ScheduleRemoved { by }]
            }
            ScheduleCommand::Fire { due, now, running } => {
                self.require_known()?;
                if self.status == ScheduleStatus::Paused {
                    return Err(ScheduleError::Paused);
                }
                if self.next_due != Some(due) {
                    // A repeated or stale timer: that moment was decided already.
                    return Ok(Vec::new());
                }
                self.fire(due, now, running)?
            }
        })
    }

    /// The moment `due` came at `now`.
    fn fire(
        &self,
        due: DateTime<Utc>,
        now: DateTime<Utc>,
        running: bool,
    ) -> Result<Vec<ScheduleEvent>, ScheduleError> {
        use ScheduleEvent as E;
        let spec = self.spec.as_ref().expect("an active schedule has its spec");
        // The moments missed after `due`, up to now: all counted (up to MAX_COUNTED), the
        // latest MAX_CATCH_UP kept.
        let mut latest = std::collections::VecDeque::with_capacity(MAX_CATCH_UP);
        let mut count = 0u64;
        let mut at = due;
        while count < MAX_COUNTED {
            let next = self.next(at)?;
            if next > now {
                break;
            }
            if latest.len() == MAX_CATCH_UP {
                latest.pop_front();
            }
            latest.push_back(next);
            count += 1;
            at = next;
        }
        let after_now = self.next(now.max(at))?;
        let fired = |due: DateTime<Utc>, next_due: DateTime<Utc>| E::ScheduleFired {
            due,
            fired_at: now,
            next_due,
        };
        let skipped = |to: DateTime<Utc>, count: u64, reason, next_due| E::ScheduleSkipped {
            from: due,
            to,
            count,
            reason,
            next_due,
        };
        let last = latest.back().copied().unwrap_or(due);
        if running && spec.overlap == Overlap::Skip {
            return Ok(vec![skipped(
                last,
                1 + count,
                SkipReason::Overlap,
                Some(after_now),
            )]);
        }
        Ok(match spec.catch_up {
            CatchUp::All if count as usize <= latest.len() => {
                // Each in turn: the timer is set for the next missed moment, due at once.
                vec![fired(due, latest.front().copied().unwrap_or(after_now))]
            }
            CatchUp::All => {
                // Too many: those before the latest MAX_CATCH_UP are skipped.
                let first_kept = latest[0];
                let dropped = count - latest.len() as u64;
                let to = self.before(first_kept, due)?;
                vec![skipped(
                    to,
                    1 + dropped,
                    SkipReason::Missed,
                    Some(first_kept),
                )]
            }
            CatchUp::Latest if count == 0 => vec![fired(due, after_now)],
            CatchUp::Latest => {
                let to = if latest.len() >= 2 {
                    latest[latest.len() - 2]
                } else {
                    due
                };
                vec![
                    skipped(to, count, SkipReason::Missed, None),
                    fired(last, after_now),
                ]
            }
            CatchUp::Skip if count == 0 && now - due <= ON_TIME => vec![fired(due, after_now)],
            CatchUp::Skip => vec![skipped(
                last,
                1 + count,
                SkipReason::Missed,
                Some(after_now),
            )],
        })
    }

    /// The last moment before `moment`, at or after `from`.
    fn before(
        &self,
        moment: DateTime<Utc>,
        from: DateTime<Utc>,
    ) -> Result<DateTime<Utc>, ScheduleError> {
        let mut at = from;
        loop {
            let next = self.next(at)?;
            if next >= moment {
                return Ok(at);
            }
            at = next;
        }
    }
}

impl Aggregate for Schedule {
    const TYPE: &'static str = "schedule";
    type Command = ScheduleCommand;
    type Event = ScheduleEvent;
    type Error = ScheduleError;
    type Services = ();

    async fn handle(
        &mut self,
        command: ScheduleCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), ScheduleError> {
        for event in self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: ScheduleEvent) {
        match event {
            ScheduleEvent::ScheduleCreated {
                name,
                spec,
                next_due,
                ..
            } => {
                self.name = name;
                self.status = ScheduleStatus::Active;
                self.anchor = Some(match spec.timing {
                    Timing::Every { seconds } => next_due - Duration::seconds(seconds as i64),
                    Timing::Cron { .. } => next_due,
                });
                self.spec = Some(spec);
                self.next_due = Some(next_due);
            }
            ScheduleEvent::SchedulePaused { .. } => {
                self.status = ScheduleStatus::Paused;
                self.next_due = None;
            }
            ScheduleEvent::ScheduleResumed { next_due, .. } => {
                self.status = ScheduleStatus::Active;
                if let Some(Timing::Every { seconds }) = self.spec.as_ref().map(|s| &s.timing) {
                    self.anchor = Some(next_due - Duration::seconds(*seconds as i64));
                }
                self.next_due = Some(next_due);
            }
            ScheduleEvent::ScheduleRemoved { .. } => {
                self.status = ScheduleStatus::Removed;
                self.next_due = None;
            }
            ScheduleEvent::ScheduleFired { due, next_due, .. } => {
                self.last_fired = Some(due);
                self.fired += 1;
                self.next_due = Some(next_due);
            }
            ScheduleEvent::ScheduleSkipped {
                count, next_due, ..
            } => {
                self.skipped += count;
                if let Some(next_due) = next_due {
                    self.next_due = Some(next_due);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    type Given = TestFramework<Schedule>;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn spec(timing: Timing, catch_up: CatchUp) -> ScheduleSpec {
        ScheduleSpec {
            timing,
            workflow: "heartbeat".into(),
            input: "check in".into(),
            catch_up,
            overlap: Overlap::Skip,
        }
    }

    fn hourly(catch_up: CatchUp) -> ScheduleSpec {
        spec(
            Timing::Cron {
                pattern: "0 * * * *".into(),
                timezone: "UTC".into(),
            },
            catch_up,
        )
    }

    fn created(spec: ScheduleSpec, next_due: &str) -> ScheduleEvent {
        ScheduleEvent::ScheduleCreated {
            name: "beat".into(),
            spec,
            by: "ops".into(),
            next_due: at(next_due),
        }
    }

    fn fire(due: &str, now: &str) -> ScheduleCommand {
        ScheduleCommand::Fire {
            due: at(due),
            now: at(now),
            running: false,
        }
    }

    fn fired(due: &str, now: &str, next: &str) -> ScheduleEvent {
        ScheduleEvent::ScheduleFired {
            due: at(due),
            fired_at: at(now),
            next_due: at(next),
        }
    }

    #[test]
    fn created_for_the_first_moment_after_now_and_checked() {
        Given::with(())
            .given_no_previous_events()
            .when(ScheduleCommand::Create {
                name: "beat".into(),
                spec: hourly(CatchUp::Latest),
                by: "ops".into(),
                now: at("2026-01-01T10:20:00Z"),
            })
            .then_expect_events(vec![created(
                hourly(CatchUp::Latest),
                "2026-01-01T11:00:00Z",
            )]);
        let create = |name: &str, spec: ScheduleSpec| ScheduleCommand::Create {
            name: name.into(),
            spec,
            by: "ops".into(),
            now: at("2026-01-01T10:20:00Z"),
        };
        for (name, timing, error) in [
            (
                "Beat",
                Timing::Every { seconds: 5 },
                ScheduleError::InvalidName,
            ),
            (
                "beat",
                Timing::Every { seconds: 0 },
                ScheduleError::InvalidTiming("an interval must be at least 1 second".into()),
            ),
        ] {
            Given::with(())
                .given_no_previous_events()
                .when(create(name, spec(timing, CatchUp::Latest)))
                .then_expect_error(error);
        }
        for (pattern, timezone) in [("61 * * * *", "UTC"), ("0 * * * *", "Mars/Olympus")] {
            let timing = Timing::Cron {
                pattern: pattern.into(),
                timezone: timezone.into(),
            };
            let result = Given::with(())
                .given_no_previous_events()
                .when(create("beat", spec(timing, CatchUp::Latest)))
                .inspect_result();
            assert!(
                matches!(result, Err(ScheduleError::InvalidTiming(_))),
                "{result:?}"
            );
        }
        Given::with(())
            .given(vec![created(
                hourly(CatchUp::Latest),
                "2026-01-01T11:00:00Z",
            )])
            .when(create("beat", hourly(CatchUp::Latest)))
            .then_expect_error(ScheduleError::AlreadyExists);
    }

    #[test]
    fn cron_follows_the_time_zone_across_daylight_saving() {
        let paris = Timing::Cron {
            pattern: "0 9 * * *".into(),
            timezone: "Europe/Paris".into(),
        };
        // 09:00 in Paris is 08:00 UTC in winter and 07:00 UTC in summer.
        assert_eq!(
            paris.first_after(at("2026-03-28T12:00:00Z")).unwrap(),
            at("2026-03-29T07:00:00Z")
        );
        assert_eq!(
            paris.first_after(at("2026-03-27T12:00:00Z")).unwrap(),
            at("2026-03-28T08:00:00Z")
        );
        let every = Timing::Every { seconds: 90 };
        assert_eq!(
            every.first_after(at("2026-01-01T00:00:00Z")).unwrap(),
            at("2026-01-01T00:01:30Z")
        );
    }

    #[test]
    fn a_moment_fires_once_and_stale_timers_are_no_change() {
        let base = vec![created(hourly(CatchUp::Latest), "2026-01-01T11:00:00Z")];
        Given::with(())
            .given(base.clone())
            .when(fire("2026-01-01T11:00:00Z", "2026-01-01T11:00:01Z"))
            .then_expect_events(vec![fired(
                "2026-01-01T11:00:00Z",
                "2026-01-01T11:00:01Z",
                "2026-01-01T12:00:00Z",
            )]);
        let mut after = base.clone();
        after.push(fired(
            "2026-01-01T11:00:00Z",
            "2026-01-01T11:00:01Z",
            "2026-01-01T12:00:00Z",
        ));
        Given::with(())
            .given(after.clone())
            .when(fire("2026-01-01T11:00:00Z", "2026-01-01T11:00:05Z"))
            .then_expect_events(vec![]);
        after.push(ScheduleEvent::SchedulePaused { by: "ops".into() });
        Given::with(())
            .given(after)
            .when(fire("2026-01-01T12:00:00Z", "2026-01-01T12:00:00Z"))
            .then_expect_error(ScheduleError::Paused);
    }

    #[test]
    fn missed_moments_follow_the_catch_up_policy() {
        let down = "2026-01-01T14:30:00Z"; // down from 11:00 to 14:30: 11, 12, 13, 14 missed
        Given::with(())
            .given(vec![created(
                hourly(CatchUp::Latest),
                "2026-01-01T11:00:00Z",
            )])
            .when(fire("2026-01-01T11:00:00Z", down))
            .then_expect_events(vec![
                ScheduleEvent::ScheduleSkipped {
                    from: at("2026-01-01T11:00:00Z"),
                    to: at("2026-01-01T13:00:00Z"),
                    count: 3,
                    reason: SkipReason::Missed,
                    next_due: None,
                },
                fired("2026-01-01T14:00:00Z", down, "2026-01-01T15:00:00Z"),
            ]);
        Given::with(())
            .given(vec![created(hourly(CatchUp::All), "2026-01-01T11:00:00Z")])
            .when(fire("2026-01-01T11:00:00Z", down))
            .then_expect_events(vec![fired(
                "2026-01-01T11:00:00Z",
                down,
                "2026-01-01T12:00:00Z",
            )]);
        Given::with(())
            .given(vec![created(hourly(CatchUp::Skip), "2026-01-01T11:00:00Z")])
            .when(fire("2026-01-01T11:00:00Z", down))
            .then_expect_events(vec![ScheduleEvent::ScheduleSkipped {
                from: at("2026-01-01T11:00:00Z"),
                to: at("2026-01-01T14:00:00Z"),
                count: 4,
                reason: SkipReason::Missed,
                next_due: Some(at("2026-01-01T15:00:00Z")),
            }]);
        // Skip still fires a moment that is only a little late.
        Given::with(())
            .given(vec![created(hourly(CatchUp::Skip), "2026-01-01T11:00:00Z")])
            .when(fire("2026-01-01T11:00:00Z", "2026-01-01T11:00:30Z"))
            .then_expect_events(vec![fired(
                "2026-01-01T11:00:00Z",
                "2026-01-01T11:00:30Z",
                "2026-01-01T12:00:00Z",
            )]);
        // All, with more missed than it catches up: the oldest are skipped.
        let every_second = spec(Timing::Every { seconds: 1 }, CatchUp::All);
        let result = Given::with(())
            .given(vec![created(every_second, "2026-01-01T00:00:01Z")])
            .when(fire("2026-01-01T00:00:01Z", "2026-01-01T00:10:00Z"))
            .inspect_result()
            .unwrap();
        let [ScheduleEvent::ScheduleSkipped {
            count, next_due, ..
        }] = result.as_slice()
        else {
            panic!("{result:?}");
        };
        // 600 moments (00:00:01 … 00:10:00); the latest 100 are caught up.
        assert_eq!(*count, 500);
        assert_eq!(*next_due, Some(at("2026-01-01T00:08:21Z")));
    }

    #[test]
    fn an_overlapping_moment_is_skipped_unless_allowed() {
        let base = vec![created(hourly(CatchUp::Latest), "2026-01-01T11:00:00Z")];
        Given::with(())
            .given(base)
            .when(ScheduleCommand::Fire {
                due: at("2026-01-01T11:00:00Z"),
                now: at("2026-01-01T11:00:00Z"),
                running: true,
            })
            .then_expect_events(vec![ScheduleEvent::ScheduleSkipped {
                from: at("2026-01-01T11:00:00Z"),
                to: at("2026-01-01T11:00:00Z"),
                count: 1,
                reason: SkipReason::Overlap,
                next_due: Some(at("2026-01-01T12:00:00Z")),
            }]);
        let mut allow = hourly(CatchUp::Latest);
        allow.overlap = Overlap::Allow;
        Given::with(())
            .given(vec![created(allow, "2026-01-01T11:00:00Z")])
            .when(ScheduleCommand::Fire {
                due: at("2026-01-01T11:00:00Z"),
                now: at("2026-01-01T11:00:00Z"),
                running: true,
            })
            .then_expect_events(vec![fired(
                "2026-01-01T11:00:00Z",
                "2026-01-01T11:00:00Z",
                "2026-01-01T12:00:00Z",
            )]);
    }

    #[test]
    fn pause_resume_and_remove() {
        let base = vec![created(hourly(CatchUp::Latest), "2026-01-01T11:00:00Z")];
        let pause = || ScheduleCommand::Pause { by: "ops".into() };
        let paused = || ScheduleEvent::SchedulePaused { by: "ops".into() };
        Given::with(())
            .given(base.clone())
            .when(pause())
            .then_expect_events(vec![paused()]);
        let mut was_paused = base.clone();
        was_paused.push(paused());
        Given::with(())
            .given(was_paused.clone())
            .when(pause())
            .then_expect_events(vec![]);
        Given::with(())
            .given(was_paused)
            .when(ScheduleCommand::Resume {
                by: "ops".into(),
                now: at("2026-01-01T15:10:00Z"),
            })
            .then_expect_events(vec![ScheduleEvent::ScheduleResumed {
                by: "ops".into(),
                next_due: at("2026-01-01T16:00:00Z"),
            }]);
        Given::with(())
            .given(base.clone())
            .when(ScheduleCommand::Resume {
                by: "ops".into(),
                now: at("2026-01-01T15:10:00Z"),
            })
            .then_expect_error(ScheduleError::NotPaused);
        let mut removed = base;
        removed.push(ScheduleEvent::ScheduleRemoved { by: "ops".into() });
        Given::with(())
            .given(removed.clone())
            .when(pause())
            .then_expect_error(ScheduleError::Removed);
        Given::with(())
            .given(removed)
            .when(ScheduleCommand::Remove { by: "ops".into() })
            .then_expect_events(vec![]);
        Given::with(())
            .given_no_previous_events()
            .when(pause())
            .then_expect_error(ScheduleError::NotFound);
    }
}
