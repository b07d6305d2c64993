//! Running commands against cqrs-es aggregates stored in the event log.
//!
//! A command is handled against the aggregate rebuilt from its stream; its events are appended with
//! the stream version it saw. If another writer appended first, the command is handled again on the
//! reloaded aggregate (bounded). A command id is accepted once: submitting it again appends nothing
//! and returns the first outcome.

use std::collections::HashMap;
use std::sync::Arc;

use cqrs_es::event_sink::EventSink;
use cqrs_es::persist::{EventUpcaster, SerializedEvent};
use cqrs_es::{Aggregate, DomainEvent};
use uuid::Uuid;

use crate::log::{
    AppendOutcome, AppendRequest, CommandOutcome, EventLog, LogError, NewEvent, RecordedEvent,
    StreamId,
};
use crate::metadata::CommandMeta;
use crate::process::{jobs_of, ProcessManager};
use crate::queue::NewJob;

/// Why a command did not go through.
#[derive(Debug, thiserror::Error)]
pub enum CommandError<E: std::error::Error> {
    /// The aggregate refused the command (business rule).
    #[error("{0}")]
    Rejected(E),
    /// Other writers kept winning the race for the stream.
    #[error("command {command_id} lost the race for stream {stream} {attempts} times")]
    Conflict {
        command_id: Uuid,
        stream: StreamId,
        attempts: usize,
    },
    /// A stored event could not be read as the aggregate's event type.
    #[error("event {sequence} of stream {stream} is unreadable: {reason}")]
    Deserialize {
        stream: StreamId,
        sequence: i64,
        reason: String,
    },
    #[error(transparent)]
    Log(#[from] LogError),
}

/// What a command did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Executed {
    /// Events were appended.
    Appended(CommandOutcome),
    /// The command id was accepted before: this is the first outcome; nothing was appended.
    Duplicate(CommandOutcome),
    /// The aggregate accepted the command with no events (nothing to record).
    NoChange,
}

impl Executed {
    /// The outcome, unless the command recorded nothing.
    pub fn outcome(&self) -> Option<&CommandOutcome> {
        match self {
            Executed::Appended(o) | Executed::Duplicate(o) => Some(o),
            Executed::NoChange => None,
        }
    }
}

/// Runs commands of one aggregate type.
pub struct CommandBus<A: Aggregate> {
    log: Arc<dyn EventLog>,
    services: A::Services,
    upcasters: Vec<Box<dyn EventUpcaster>>,
    max_attempts: usize,
    reactor: Option<Arc<dyn ProcessManager>>,
    states: Option<Arc<dyn StateCache<A>>>,
}

/// Recent aggregate states with their versions (see [`CommandBus::with_state_cache`]).
/// Shared: reading one copies nothing.
trait StateCache<A>: Send + Sync {
    fn get(&self, id: &str) -> Option<(Arc<A>, i64)>;
    fn put(&self, id: &str, aggregate: Arc<A>, version: i64);
    fn forget(&self, id: &str);
    /// A copy of its own of a state the cache shares.
    fn owned(&self, aggregate: Arc<A>) -> A;
}

struct Recent<A: Clone + Send + Sync + 'static>(moka::sync::Cache<String, (Arc<A>, i64)>);

impl<A: Clone + Send + Sync + 'static> StateCache<A> for Recent<A> {
    fn owned(&self, aggregate: Arc<A>) -> A {
        Arc::unwrap_or_clone(aggregate)
    }

    fn get(&self, id: &str) -> Option<(Arc<A>, i64)> {
        self.0.get(id)
    }

    fn put(&self, id: &str, aggregate: Arc<A>, version: i64) {
        self.0.insert(id.to_owned(), (aggregate, version));
    }

    fn forget(&self, id: &str) {
        self.0.invalidate(id);
    }
}

impl<A: Aggregate> CommandBus<A> {
    pub fn new(log: Arc<dyn EventLog>, services: A::Services) -> Self {
        Self {
            log,
            services,
            upcasters: Vec::new(),
            max_attempts: 25,
            reactor: None,
            states: None,
        }
    }

    /// Enqueues the jobs `manager` reacts to this bus's events with in the same transaction as
    /// the events (instead of the manager's next checkpoint), and marks the events as reacted to
    /// by it, so that the manager itself passes them by. Each event still leads to its jobs
    /// exactly once, and one hop (the manager reading the log and committing) is saved between
    /// a decision and its job. `react` sees the events as the command made them, before any
    /// sealing of personal data: a manager used here puts only ids in its jobs (as the workflow
    /// runtime's does).
    pub fn with_reactor(mut self, manager: Arc<dyn ProcessManager>) -> Self {
        self.reactor = Some(manager);
        self
    }

    /// Upcasters applied to stored events before they are deserialized.
    pub fn with_upcasters(mut self, upcasters: Vec<Box<dyn EventUpcaster>>) -> Self {
        self.upcasters = upcasters;
        self
    }

    /// How many times a command is tried when it loses the race for its stream.
    pub fn with_max_attempts(mut self, attempts: usize) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    fn stream(aggregate_id: &str) -> StreamId {
        StreamId::new(A::TYPE, aggregate_id)
    }

    /// Appends a command's events, with the reactor's jobs when there is one.
    async fn append(&self, mut request: AppendRequest) -> Result<AppendOutcome, LogError> {
        let Some(manager) = &self.reactor else {
            return self.log.append(request).await;
        };
        let mut jobs: Vec<NewJob> = Vec::new();
        let now = chrono::Utc::now();
        for (offset, event) in request.events.iter_mut().enumerate() {
            event.metadata.reacted = Some(manager.name().to_owned());
            let types = manager.event_types();
            if !types.is_empty() && !types.contains(&event.event_type.as_str()) {
                continue;
            }
            // The event as the manager would read it from the log (no position yet).
            let recorded = RecordedEvent {
                position: crate::Position::START,
                stream: request.stream.clone(),
                sequence: request.expected_sequence + 1 + offset as i64,
                event_type: event.event_type.clone(),
                event_version: event.event_version.clone(),
                recorded_at: now,
                metadata: event.metadata.clone(),
                payload: event.payload.clone(),
            };
            jobs.extend(jobs_of(manager.as_ref(), &recorded));
        }
        self.log.append_with_jobs(request, jobs).await
    }

    /// Rebuilds an aggregate from its stream; returns it with its version (last sequence).
    /// Always from the stored stream, so that what a person's erasure took is gone from it; a
    /// state cache keeps the result for the next command.
    pub async fn load(&self, aggregate_id: &str) -> Result<(A, i64), CommandError<A::Error>> {
        let (aggregate, version) = self.load_stored(aggregate_id).await?;
        Ok((self.owned(aggregate), version))
    }

    /// A state of its own: the one given when nothing else holds it, else a copy.
    fn owned(&self, aggregate: Arc<A>) -> A {
        match (Arc::try_unwrap(aggregate), &self.states) {
            (Ok(aggregate), _) => aggregate,
            (Err(shared), Some(states)) => states.owned(shared),
            (Err(_), None) => unreachable!("a state is shared only with the state cache"),
        }
    }

    /// [`CommandBus::load`], shared with the state cache.
    async fn load_stored(
        &self,
        aggregate_id: &str,
    ) -> Result<(Arc<A>, i64), CommandError<A::Error>> {
        let events = self.log.read_stream(&Self::stream(aggregate_id), 0).await?;
        self.caught_up(aggregate_id, A::default(), 0, events)
    }

    /// `aggregate` at `version` with `events` (those stored after it) applied, kept in the state
    /// cache.
    fn caught_up(
        &self,
        aggregate_id: &str,
        mut aggregate: A,
        mut version: i64,
        events: Vec<RecordedEvent>,
    ) -> Result<(Arc<A>, i64), CommandError<A::Error>> {
        for event in events {
            version = event.sequence;
            aggregate.apply(self.decode(event)?);
        }
        let aggregate = Arc::new(aggregate);
        if let Some(states) = &self.states {
            states.put(aggregate_id, aggregate.clone(), version);
        }
        Ok((aggregate, version))
    }

    /// The state this bus holds for `aggregate_id` (the one its last command there left, or its
    /// last load; see [`CommandBus::with_state_cache`]) when `usable` accepts it, else the
    /// stored one ([`CommandBus::load`]). For the follow-up of a decision made in this process
    /// (a workflow's next step, handed to the worker whose append scheduled it): what another
    /// writer appended since shows when the follow-up's own command appends on this version and
    /// conflicts, and is decided again on the stored stream.
    pub async fn load_recent(
        &self,
        aggregate_id: &str,
        usable: impl Fn(&A) -> bool,
    ) -> Result<(A, i64), CommandError<A::Error>> {
        match self.states.as_ref().and_then(|s| s.get(aggregate_id)) {
            Some((state, version)) if usable(&state) => Ok((self.owned(state), version)),
            _ => self.load(aggregate_id).await,
        }
    }

    /// The stored state of `aggregate_id` as of now, read incrementally: the state this bus holds
    /// (see [`CommandBus::with_state_cache`]) brought up to date with the events stored after
    /// its version, else [`CommandBus::load`]. Every event appended by any writer is in it, as in
    /// a load; what differs is only what the cached prefix decoded to, which an erasure within
    /// the cache's time to live would have changed. For jobs that read a long stream on every
    /// run (a conversation per message) and must see what was recorded since (a delivery).
    /// Shared with the cache: nothing is copied unless newer events change it.
    pub async fn load_latest(
        &self,
        aggregate_id: &str,
    ) -> Result<(Arc<A>, i64), CommandError<A::Error>> {
        let Some((cached, version)) = self.states.as_ref().and_then(|s| s.get(aggregate_id)) else {
            return self.load_stored(aggregate_id).await;
        };
        let newer = self
            .log
            .read_stream(&Self::stream(aggregate_id), version)
            .await?;
        if newer.is_empty() {
            return Ok((cached, version));
        }
        self.caught_up(aggregate_id, self.owned(cached), version, newer)
    }

    /// Reads a stored event as the aggregate's event type, after upcasting.
    pub fn decode(&self, event: RecordedEvent) -> Result<A::Event, CommandError<A::Error>> {
        let sequence = event.sequence;
        let stream = event.stream.clone();
        let serialized = to_serialized(event);
        let upcasted = self.upcasters.iter().fold(serialized, |event, upcaster| {
            if upcaster.can_upcast(&event.event_type, &event.event_version) {
                upcaster.upcast(event)
            } else {
                event
            }
        });
        serde_json::from_value(upcasted.payload).map_err(|e| CommandError::Deserialize {
            stream,
            sequence,
            reason: e.to_string(),
        })
    }

    /// Handles `command` on the aggregate `aggregate_id` and appends its events.
    pub async fn execute(
        &self,
        aggregate_id: &str,
        command: A::Command,
        meta: CommandMeta,
    ) -> Result<Executed, CommandError<A::Error>>
    where
        A::Command: Clone,
    {
        let stream = Self::stream(aggregate_id);
        // First decided on the cached state as is, when there is one: an append on a state
        // another writer has moved past conflicts, and a refusal or no change is checked against
        // the stored stream before it is answered.
        let mut cached = self.states.as_ref().and_then(|s| s.get(aggregate_id));
        let mut conflicts = 0;
        while conflicts < self.max_attempts {
            if conflicts > 0 && cached.is_none() {
                // Spread the retries of writers that keep colliding on one stream.
                let cap_ms = 1u64 << conflicts.min(6);
                let wait = rand::random_range(0..=cap_ms * 1000);
                tokio::time::sleep(std::time::Duration::from_micros(wait)).await;
            }
            let unchecked = cached.is_some();
            let (mut aggregate, version) = match cached.take() {
                Some((state, version)) => (self.owned(state), version),
                None => self.load(aggregate_id).await?,
            };
            let sink = EventSink::default();
            if let Err(rejection) = aggregate
                .handle(command.clone(), &self.services, &sink)
                .await
            {
                if unchecked {
                    continue;
                }
                // A repeated command may be refused by the state its first run created: answer
                // with the first outcome then. The lookup happens only on this rare path.
                if let Some(first) = self.log.command_outcome(meta.command_id).await? {
                    return Ok(Executed::Duplicate(first));
                }
                return Err(CommandError::Rejected(rejection));
            }
            let events = sink.collect().await;
            if events.is_empty() {
                if unchecked {
                    continue;
                }
                return Ok(Executed::NoChange);
            }
            let request = AppendRequest {
                command_id: meta.command_id,
                stream: stream.clone(),
                expected_sequence: version,
                events: events
                    .into_iter()
                    .map(|event| new_event(&event, &meta))
                    .collect::<Result<_, _>>()?,
            };
            match self.append(request).await {
                Ok(AppendOutcome::Appended(outcome)) => {
                    // `handle` applied its events: the state at the new version.
                    if let Some(states) = &self.states {
                        states.put(aggregate_id, Arc::new(aggregate), outcome.last_sequence);
                    }
                    return Ok(Executed::Appended(outcome));
                }
                Ok(AppendOutcome::Duplicate(first)) => return Ok(Executed::Duplicate(first)),
                Err(LogError::Conflict { .. }) => {
                    tracing::debug!(%stream, command_id = %meta.command_id, "conflict, retrying");
                    if !unchecked {
                        conflicts += 1;
                    }
                    continue;
                }
                Err(e) => {
                    if let Some(states) = &self.states {
                        states.forget(aggregate_id);
                    }
                    return Err(e.into());
                }
            }
        }
        Err(CommandError::Conflict {
            command_id: meta.command_id,
            stream,
            attempts: self.max_attempts,
        })
    }
}

impl<A: Aggregate + Clone + 'static> CommandBus<A> {
    /// Keeps the states of up to `capacity` recently loaded or changed aggregates in memory,
    /// each for at most `ttl`, and decides a command first on the cached state without reading
    /// the stream. Always correct: an append on a state another writer has moved past conflicts
    /// and is decided again on the stored stream, and so is a refusal or "no change". Loads
    /// still read the stored stream (what an erasure took is gone from them). States hold
    /// people's data in the clear, so `ttl` stays short.
    pub fn with_state_cache(mut self, capacity: u64, ttl: std::time::Duration) -> Self {
        self.states = Some(Arc::new(Recent(
            moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
        )));
        self
    }
}

impl<A: Aggregate> CommandBus<A>
where
    A::Command: Clone,
{
    /// Handles a command that creates `aggregate_id`, without reading the stream first: the
    /// command is decided on the empty aggregate and appended expecting a new stream. If the
    /// stream exists after all (or the empty aggregate refuses the command), it falls back to
    /// [`CommandBus::execute`], which loads the stream and decides again; a repeated command id
    /// answers its first outcome as usual. For creations this saves the read of a stream that is
    /// known to be empty (a fresh id).
    pub async fn create(
        &self,
        aggregate_id: &str,
        command: A::Command,
        meta: CommandMeta,
    ) -> Result<Executed, CommandError<A::Error>> {
        let mut aggregate = A::default();
        let sink = EventSink::default();
        if aggregate
            .handle(command.clone(), &self.services, &sink)
            .await
            .is_err()
        {
            return self.execute(aggregate_id, command, meta).await;
        }
        let events = sink.collect().await;
        if events.is_empty() {
            return self.execute(aggregate_id, command, meta).await;
        }
        let request = AppendRequest {
            command_id: meta.command_id,
            stream: Self::stream(aggregate_id),
            expected_sequence: 0,
            events: events
                .into_iter()
                .map(|event| new_event(&event, &meta))
                .collect::<Result<_, _>>()?,
        };
        match self.append(request).await {
            Ok(AppendOutcome::Appended(outcome)) => {
                if let Some(states) = &self.states {
                    states.put(aggregate_id, Arc::new(aggregate), outcome.last_sequence);
                }
                Ok(Executed::Appended(outcome))
            }
            Ok(AppendOutcome::Duplicate(first)) => Ok(Executed::Duplicate(first)),
            Err(LogError::Conflict { .. }) => self.execute(aggregate_id, command, meta).await,
            Err(e) => Err(e.into()),
        }
    }
}

/// Serializes a domain event with the command's metadata and a fresh UUIDv7 event id.
pub fn new_event<E: DomainEvent>(event: &E, meta: &CommandMeta) -> Result<NewEvent, LogError> {
    Ok(NewEvent {
        event_type: event.event_type(),
        event_version: event.event_version(),
        payload: serde_json::to_value(event).map_err(|e| LogError::InvalidAppend(e.to_string()))?,
        metadata: meta.for_event(Uuid::now_v7()),
    })
}

/// The cqrs-es form of a stored event (what upcasters take).
pub fn to_serialized(event: RecordedEvent) -> SerializedEvent {
    let metadata: HashMap<String, String> = event.metadata.to_map();
    SerializedEvent {
        aggregate_id: event.stream.aggregate_id,
        sequence: event.sequence as usize,
        aggregate_type: event.stream.aggregate_type,
        event_type: event.event_type,
        event_version: event.event_version,
        payload: event.payload,
        metadata: serde_json::to_value(metadata).unwrap_or_default(),
    }
}
