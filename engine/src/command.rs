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
}

impl<A: Aggregate> CommandBus<A> {
    pub fn new(log: Arc<dyn EventLog>, services: A::Services) -> Self {
        Self {
            log,
            services,
            upcasters: Vec::new(),
            max_attempts: 25,
        }
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

    /// Rebuilds an aggregate from its stream; returns it with its version (last sequence).
    pub async fn load(&self, aggregate_id: &str) -> Result<(A, i64), CommandError<A::Error>> {
        let events = self.log.read_stream(&Self::stream(aggregate_id), 0).await?;
        let mut aggregate = A::default();
        let mut version = 0;
        for event in events {
            version = event.sequence;
            aggregate.apply(self.decode(event)?);
        }
        Ok((aggregate, version))
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
        for attempt in 0..self.max_attempts {
            if attempt > 0 {
                // Spread the retries of writers that keep colliding on one stream.
                let cap_ms = 1u64 << attempt.min(6);
                let wait = rand::random_range(0..=cap_ms * 1000);
                tokio::time::sleep(std::time::Duration::from_micros(wait)).await;
            }
            let (mut aggregate, version) = self.load(aggregate_id).await?;
            let sink = EventSink::default();
            if let Err(rejection) = aggregate
                .handle(command.clone(), &self.services, &sink)
                .await
            {
                // A repeated command may be refused by the state its first run created: answer
                // with the first outcome then. The lookup happens only on this rare path.
                if let Some(first) = self.log.command_outcome(meta.command_id).await? {
                    return Ok(Executed::Duplicate(first));
                }
                return Err(CommandError::Rejected(rejection));
            }
            let events = sink.collect().await;
            if events.is_empty() {
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
            match self.log.append(request).await {
                Ok(AppendOutcome::Appended(outcome)) => return Ok(Executed::Appended(outcome)),
                Ok(AppendOutcome::Duplicate(first)) => return Ok(Executed::Duplicate(first)),
                Err(LogError::Conflict { .. }) => {
                    tracing::debug!(%stream, command_id = %meta.command_id, "conflict, retrying");
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(CommandError::Conflict {
            command_id: meta.command_id,
            stream,
            attempts: self.max_attempts,
        })
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
        match self.log.append(request).await {
            Ok(AppendOutcome::Appended(outcome)) => Ok(Executed::Appended(outcome)),
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
