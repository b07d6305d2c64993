//! What belongs to a task, and how to follow it: the one answer the API (reads, SSE, WebSocket),
//! the CLI (`tasks history`, `tasks watch`) and the channel adapters use.
//!
//! A task's history is in several streams: the task's own, its workflow run's, and the run's
//! child runs' (and theirs), discovered as the events that start them are read (`TaskRouted`,
//! `ChildrenStarted`). A [`TaskFollower`] reads those streams after a [`Cursor`] (the last
//! sequence delivered of each stream, in discovery order), so a reader that resumes gets exactly
//! what it missed; [`TaskFollower::follow`] then waits for appends (woken by the log's
//! notifications, with a polling fallback) until the task and its run are finished.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use stele_aggregates::task::Task;
use stele_aggregates::workflow_run::WorkflowRun;
use stele_engine::{EventLog, LogError, RecordedEvent, StreamId};

/// The stream type of tasks.
pub const TASK_STREAM: &str = <Task as cqrs_es::Aggregate>::TYPE;
/// The stream type of workflow runs (a task's run and its child runs).
pub const RUN_STREAM: &str = <WorkflowRun as cqrs_es::Aggregate>::TYPE;

/// How long a follower waits for a notification before reading anyway.
const POLL: Duration = Duration::from_secs(1);

/// Where a reader of a task stands: the last sequence delivered of each of the task's streams,
/// in discovery order. Written `3-12-2-2` (`^([0-9]{1,18}(-[0-9]{1,18})*)?$`; empty: from the
/// start).
///
/// ```
/// use stele_workflows::follow::Cursor;
///
/// let cursor: Cursor = "3-12-2".parse().unwrap();
/// assert_eq!(cursor.to_string(), "3-12-2");
/// assert!("3-x".parse::<Cursor>().is_err());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cursor(Vec<i64>);

/// A cursor that no follower gave.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a cursor from this task's stream")]
pub struct InvalidCursor(pub String);

impl FromStr for Cursor {
    type Err = InvalidCursor;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Ok(Cursor::default());
        }
        // Each part is 1 to 18 ASCII digits: no sign, no spaces, never past i64.
        s.split('-')
            .map(|part| {
                ((1..=18).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| part.parse::<i64>().ok())
                    .flatten()
            })
            .collect::<Option<Vec<_>>>()
            .map(Cursor)
            .ok_or_else(|| InvalidCursor(s.to_owned()))
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, n) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("-")?;
            }
            write!(f, "{n}")?;
        }
        Ok(())
    }
}

/// Reads and follows one task's streams.
pub struct TaskFollower {
    log: Arc<dyn EventLog>,
    streams: Vec<StreamId>,
    /// The last sequence read of each stream.
    read: Vec<i64>,
    /// The last sequence delivered of each stream.
    delivered: Vec<i64>,
    task_done: bool,
    run_done: bool,
}

impl TaskFollower {
    /// A follower of task `task_id` that delivers what comes after `after` (everything without).
    pub fn new(log: Arc<dyn EventLog>, task_id: &str, after: Option<Cursor>) -> Self {
        Self {
            log,
            streams: vec![StreamId::new(TASK_STREAM, task_id)],
            read: vec![0],
            delivered: after.unwrap_or_default().0,
            task_done: false,
            run_done: false,
        }
    }

    /// Where this follower stands.
    pub fn cursor(&self) -> Cursor {
        Cursor(
            (0..self.streams.len())
                .map(|i| self.delivered.get(i).copied().unwrap_or(0))
                .collect(),
        )
    }

    /// Events not delivered yet, each with the cursor after it, in the order they were recorded
    /// (each stream's events stay in sequence order). Empty when nothing is new.
    pub async fn next_batch(&mut self) -> Result<Vec<(Cursor, RecordedEvent)>, LogError> {
        let mut fresh = Vec::new();
        let mut i = 0;
        while i < self.streams.len() {
            let events = self.log.read_stream(&self.streams[i], self.read[i]).await?;
            for event in events {
                self.read[i] = event.sequence;
                self.discover(&event);
                if event.sequence > self.delivered.get(i).copied().unwrap_or(0) {
                    fresh.push((i, event));
                }
            }
            i += 1;
        }
        fresh.sort_by_key(|(_, e)| (e.recorded_at, e.position));
        let mut out = Vec::with_capacity(fresh.len());
        for (i, event) in fresh {
            if self.delivered.len() <= i {
                self.delivered.resize(i + 1, 0);
            }
            self.delivered[i] = event.sequence;
            out.push((self.cursor(), event));
        }
        Ok(out)
    }

    /// The task and its run are finished (a task without a run ends with the task).
    pub fn finished(&self) -> bool {
        self.task_done && (self.run_done || self.streams.len() == 1)
    }

    /// The follower's events until the task finishes: what was missed first, then live ones as
    /// they are committed (woken by the log's append notifications, reading anyway every second).
    /// A read error ends the stream after it is yielded.
    pub fn follow(self) -> impl Stream<Item = Result<(Cursor, RecordedEvent), LogError>> {
        struct State {
            appends: tokio::sync::watch::Receiver<u64>,
            follower: TaskFollower,
            pending: VecDeque<(Cursor, RecordedEvent)>,
            read_once: bool,
            ended: bool,
        }
        let state = State {
            appends: self.log.appends(),
            follower: self,
            pending: VecDeque::new(),
            read_once: false,
            ended: false,
        };
        futures::stream::unfold(state, |mut s| async move {
            loop {
                if let Some(item) = s.pending.pop_front() {
                    return Some((Ok(item), s));
                }
                if s.ended {
                    return None;
                }
                if s.read_once {
                    if s.follower.finished() {
                        return None;
                    }
                    // Appends since the last read were marked seen before it: they wake this.
                    let _ = tokio::time::timeout(POLL, s.appends.changed()).await;
                }
                s.appends.borrow_and_update();
                match s.follower.next_batch().await {
                    Ok(batch) => {
                        s.pending.extend(batch);
                        s.read_once = true;
                    }
                    Err(e) => {
                        s.ended = true;
                        return Some((Err(e), s));
                    }
                }
            }
        })
    }

    /// Records what an event tells about the task's streams and its end.
    fn discover(&mut self, event: &RecordedEvent) {
        let data = &event.payload["data"];
        let mut add = |stream: StreamId| {
            if !self.streams.contains(&stream) {
                self.streams.push(stream);
                self.read.push(0);
            }
        };
        match event.event_type.as_str() {
            "TaskRouted" => {
                if let Some(run) = data["run_id"].as_str() {
                    add(StreamId::new(RUN_STREAM, run));
                }
            }
            "ChildrenStarted" => {
                for child in data["children"].as_array().into_iter().flatten() {
                    if let Some(run) = child["run_id"].as_str() {
                        add(StreamId::new(RUN_STREAM, run));
                    }
                }
            }
            _ => {}
        }
        let kind = event.stream.aggregate_type.as_str();
        match event.event_type.as_str() {
            "TaskCompleted" | "TaskFailed" | "TaskCancelled" if kind == TASK_STREAM => {
                self.task_done = true
            }
            "RunCompleted" | "RunFailed" | "RunCancelled"
                if kind == RUN_STREAM && Some(&event.stream) == self.streams.get(1) =>
            {
                self.run_done = true
            }
            _ => {}
        }
    }
}
