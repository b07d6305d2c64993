//! Metadata carried by every event: who asked, through which channel, as part of what.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What a caller says about a command: its identity and provenance. Every event the command
/// appends carries it, plus its own event id (see [`EventMetadata`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandMeta {
    /// Identifies the command; a command id is accepted once (idempotency).
    pub command_id: Uuid,
    /// Groups everything that happened because of one outside request.
    pub correlation_id: Uuid,
    /// The command or event that directly caused this command.
    pub causation_id: Uuid,
    /// Who issued it, e.g. `user:42`, `agent:planner`, `system`.
    pub actor: String,
    /// Where it came from, e.g. `api`, `cli`, `telegram`, `email`, `system`.
    pub channel: String,
    /// The distributed trace it belongs to, when there is one: the W3C `traceparent` of the span
    /// that issued it (see [`crate::trace`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

impl CommandMeta {
    /// A new command (fresh UUIDv7 id) that starts its own correlation, in the trace of the
    /// current span if it belongs to one.
    pub fn new(actor: impl Into<String>, channel: impl Into<String>) -> Self {
        let command_id = Uuid::now_v7();
        Self {
            command_id,
            correlation_id: command_id,
            causation_id: command_id,
            actor: actor.into(),
            channel: channel.into(),
            trace_id: crate::trace::current(),
        }
    }

    /// Uses `command_id` as the command's id (a client-chosen idempotency key).
    pub fn with_command_id(mut self, command_id: Uuid) -> Self {
        if self.correlation_id == self.command_id {
            self.correlation_id = command_id;
        }
        if self.causation_id == self.command_id {
            self.causation_id = command_id;
        }
        self.command_id = command_id;
        self
    }

    /// Marks the command as caused by `cause` (an event or command id) within `correlation_id`.
    pub fn caused_by(mut self, cause: Uuid, correlation_id: Uuid) -> Self {
        self.causation_id = cause;
        self.correlation_id = correlation_id;
        self
    }

    /// Attaches a trace id.
    pub fn with_trace_id(mut self, trace_id: impl Into<String>) -> Self {
        self.trace_id = Some(trace_id.into());
        self
    }

    /// The metadata of one event appended by this command.
    pub fn for_event(&self, event_id: Uuid) -> EventMetadata {
        EventMetadata {
            event_id,
            command: self.clone(),
            reacted: None,
        }
    }
}

/// The metadata stored with each event: its own id and the metadata of the command that appended it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "FlatEventMetadata")]
pub struct EventMetadata {
    /// UUIDv7, unique across the log.
    pub event_id: Uuid,
    #[serde(flatten)]
    pub command: CommandMeta,
    /// The process manager whose jobs for this event were enqueued with it, in its append's
    /// transaction (see [`crate::command::CommandBus::with_reactor`]): that manager passes it by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reacted: Option<String>,
}

/// The stored form of [`EventMetadata`], read field by field: every event read decodes one, and
/// `#[serde(flatten)]` would buffer each into an intermediate map first.
#[derive(Deserialize)]
struct FlatEventMetadata {
    event_id: Uuid,
    command_id: Uuid,
    correlation_id: Uuid,
    causation_id: Uuid,
    actor: String,
    channel: String,
    #[serde(default)]
    trace_id: Option<String>,
    #[serde(default)]
    reacted: Option<String>,
}

impl From<FlatEventMetadata> for EventMetadata {
    fn from(flat: FlatEventMetadata) -> Self {
        EventMetadata {
            event_id: flat.event_id,
            command: CommandMeta {
                command_id: flat.command_id,
                correlation_id: flat.correlation_id,
                causation_id: flat.causation_id,
                actor: flat.actor,
                channel: flat.channel,
                trace_id: flat.trace_id,
            },
            reacted: flat.reacted,
        }
    }
}

impl EventMetadata {
    /// The flat string map that cqrs-es uses for metadata.
    pub fn to_map(&self) -> HashMap<String, String> {
        let mut map = HashMap::from([
            ("event_id".to_owned(), self.event_id.to_string()),
            ("command_id".to_owned(), self.command.command_id.to_string()),
            (
                "correlation_id".to_owned(),
                self.command.correlation_id.to_string(),
            ),
            (
                "causation_id".to_owned(),
                self.command.causation_id.to_string(),
            ),
            ("actor".to_owned(), self.command.actor.clone()),
            ("channel".to_owned(), self.command.channel.clone()),
        ]);
        if let Some(trace_id) = &self.command.trace_id {
            map.insert("trace_id".to_owned(), trace_id.clone());
        }
        if let Some(reacted) = &self.reacted {
            map.insert("reacted".to_owned(), reacted.clone());
        }
        map
    }
}

impl CommandMeta {
    /// Reads command metadata from cqrs-es's string map; missing ids are generated, a missing actor
    /// or channel becomes `unknown`.
    pub fn from_map(map: &HashMap<String, String>) -> Self {
        let id = |key: &str| map.get(key).and_then(|v| Uuid::parse_str(v).ok());
        let command_id = id("command_id").unwrap_or_else(Uuid::now_v7);
        let text = |key: &str| {
            map.get(key)
                .cloned()
                .unwrap_or_else(|| "unknown".to_owned())
        };
        Self {
            command_id,
            correlation_id: id("correlation_id").unwrap_or(command_id),
            causation_id: id("causation_id").unwrap_or(command_id),
            actor: text("actor"),
            channel: text("channel"),
            trace_id: map.get("trace_id").cloned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips_through_the_cqrs_map() {
        let meta = CommandMeta::new("user:7", "telegram").with_trace_id("abc");
        let event = meta.for_event(Uuid::now_v7());
        let back = CommandMeta::from_map(&event.to_map());
        assert_eq!(back, meta);
    }

    #[test]
    fn event_metadata_serializes_flat() {
        let meta = CommandMeta::new("system", "cli").for_event(Uuid::nil());
        let json = serde_json::to_value(&meta).unwrap();
        assert_eq!(json["actor"], "system");
        assert_eq!(json["event_id"], Uuid::nil().to_string());
        assert!(json.get("trace_id").is_none());
        let back: EventMetadata = serde_json::from_value(json).unwrap();
        assert_eq!(back, meta);
    }
}
