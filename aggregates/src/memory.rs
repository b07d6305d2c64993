//! `Memory`: a fact an agent or a person asked Stele to remember.
//!
//! ```text
//!         Store                  Forget
//!   new ──────────► stored ──────────────► forgotten
//! ```
//!
//! The rules, and why:
//!
//! - **A memory is one fact, stored once.** Its content, importance, tags and scope are fixed when
//!   it is stored: a later fact with the same `key` in the same scope supersedes it in the memory
//!   (from the later fact's time on), so "what was true then" stays answerable from the log.
//! - **The content is personal data** when it is about someone: it is held as a
//!   [`Personal`] value, sealed with that person's key, and erased with them.
//! - **Importance is between 0 and 1**, content is not blank and at most [`MAX_CONTENT_CHARS`]
//!   characters, at most [`MAX_TAGS`] tags: what an agent may write is bounded.
//! - **Forgetting is final** and recorded with its reason; a forgotten memory is never recalled.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::personal::Personal;

/// The longest content a memory holds, in characters.
pub const MAX_CONTENT_CHARS: usize = 8_000;
/// The most tags a memory carries.
pub const MAX_TAGS: usize = 16;

/// Where a memory belongs: searches filter by these. Every field is optional; a memory with no
/// scope at all is global.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MemoryScope {
    /// The agent (role) whose memory it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The conversation it came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation: Option<String>,
    /// The person it is about (their subject id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The workflow it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// The tenant (deployment, team, family) it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// What can be asked of a memory.
// `Forget` is small and rare: boxing `Store`'s fields would cost every store for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum MemoryCommand {
    /// Remember a fact.
    Store {
        content: Personal<String>,
        /// 0 (trivia) to 1 (never forget).
        importance: f32,
        tags: Vec<String>,
        scope: MemoryScope,
        /// Facts with the same key in the same scope supersede each other ("home_city").
        key: Option<String>,
        /// Ids of the events it was drawn from, if any.
        sources: Vec<String>,
    },
    /// Stop recalling it.
    Forget { reason: String },
}

/// What happened to a memory. Stored as `{"type": "<variant>", "data": {…}}`.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum MemoryEvent {
    /// A fact was stored.
    MemoryStored {
        /// The fact: the data of the person in `scope.subject`, if any.
        content: Personal<String>,
        importance: f32,
        tags: Vec<String>,
        scope: MemoryScope,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        sources: Vec<String>,
    },
    /// The memory is no longer recalled.
    MemoryForgotten { reason: String },
}

impl DomainEvent for MemoryEvent {
    fn event_type(&self) -> String {
        match self {
            MemoryEvent::MemoryStored { .. } => "MemoryStored",
            MemoryEvent::MemoryForgotten { .. } => "MemoryForgotten",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

/// Why a memory command was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemoryError {
    #[error("the memory exists already")]
    AlreadyStored,
    #[error("no such memory")]
    NotStored,
    #[error("the memory was forgotten")]
    Forgotten,
    #[error("a memory needs content")]
    EmptyContent,
    #[error("a memory holds at most {MAX_CONTENT_CHARS} characters")]
    TooLong,
    #[error("importance is between 0 and 1")]
    Importance,
    #[error("a memory carries at most {MAX_TAGS} tags, none blank")]
    Tags,
}

/// Where a memory is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryStatus {
    #[default]
    New,
    Stored,
    Forgotten,
}

/// A memory's state, folded from its events.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    pub status: MemoryStatus,
    pub content: Personal<String>,
    pub importance: f32,
    pub tags: Vec<String>,
    pub scope: MemoryScope,
    pub key: Option<String>,
}

impl Aggregate for Memory {
    const TYPE: &'static str = "memory";
    type Command = MemoryCommand;
    type Event = MemoryEvent;
    type Error = MemoryError;
    type Services = ();

    async fn handle(
        &mut self,
        command: MemoryCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), MemoryError> {
        let event = match command {
            MemoryCommand::Store {
                content,
                importance,
                tags,
                scope,
                key,
                sources,
            } => {
                if self.status != MemoryStatus::New {
                    return Err(MemoryError::AlreadyStored);
                }
                if let Some(text) = content.get() {
                    if text.trim().is_empty() {
                        return Err(MemoryError::EmptyContent);
                    }
                    if text.chars().count() > MAX_CONTENT_CHARS {
                        return Err(MemoryError::TooLong);
                    }
                }
                if !(0.0..=1.0).contains(&importance) {
                    return Err(MemoryError::Importance);
                }
                let mut tags: Vec<String> = tags.into_iter().map(|t| t.trim().to_owned()).collect();
                tags.sort();
                tags.dedup();
                if tags.len() > MAX_TAGS || tags.iter().any(String::is_empty) {
                    return Err(MemoryError::Tags);
                }
                MemoryEvent::MemoryStored {
                    content,
                    importance,
                    tags,
                    scope,
                    key: key.map(|k| k.trim().to_owned()).filter(|k| !k.is_empty()),
                    sources,
                }
            }
            MemoryCommand::Forget { reason } => match self.status {
                MemoryStatus::New => return Err(MemoryError::NotStored),
                MemoryStatus::Forgotten => return Ok(()),
                MemoryStatus::Stored => MemoryEvent::MemoryForgotten { reason },
            },
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: MemoryEvent) {
        match event {
            MemoryEvent::MemoryStored {
                content,
                importance,
                tags,
                scope,
                key,
                ..
            } => {
                self.status = MemoryStatus::Stored;
                self.content = content;
                self.importance = importance;
                self.tags = tags;
                self.scope = scope;
                self.key = key;
            }
            MemoryEvent::MemoryForgotten { .. } => self.status = MemoryStatus::Forgotten,
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    fn store(text: &str, importance: f32) -> MemoryCommand {
        MemoryCommand::Store {
            content: Personal::plain(text.to_owned()),
            importance,
            tags: vec![" b ".into(), "a".into(), "a".into()],
            scope: MemoryScope::default(),
            key: Some(" city ".into()),
            sources: vec![],
        }
    }

    #[test]
    fn a_fact_is_stored_with_tidy_tags_and_key() {
        TestFramework::<Memory>::with(())
            .given_no_previous_events()
            .when(store("lives in Lyon", 0.5))
            .then_expect_events(vec![MemoryEvent::MemoryStored {
                content: Personal::plain("lives in Lyon".to_owned()),
                importance: 0.5,
                tags: vec!["a".into(), "b".into()],
                scope: MemoryScope::default(),
                key: Some("city".into()),
                sources: vec![],
            }]);
    }

    #[test]
    fn bad_facts_are_refused() {
        for (command, error) in [
            (store("  ", 0.5), MemoryError::EmptyContent),
            (store("x", 1.5), MemoryError::Importance),
            (
                store(&"x".repeat(MAX_CONTENT_CHARS + 1), 0.5),
                MemoryError::TooLong,
            ),
        ] {
            TestFramework::<Memory>::with(())
                .given_no_previous_events()
                .when(command)
                .then_expect_error(error);
        }
    }

    #[test]
    fn forgetting_is_final_and_once() {
        let stored = MemoryEvent::MemoryStored {
            content: Personal::plain("x".to_owned()),
            importance: 0.1,
            tags: vec![],
            scope: MemoryScope::default(),
            key: None,
            sources: vec![],
        };
        TestFramework::<Memory>::with(())
            .given(vec![
                stored.clone(),
                MemoryEvent::MemoryForgotten { reason: "r".into() },
            ])
            .when(MemoryCommand::Forget {
                reason: "again".into(),
            })
            .then_expect_events(vec![]);
        TestFramework::<Memory>::with(())
            .given(vec![stored])
            .when(store("y", 0.2))
            .then_expect_error(MemoryError::AlreadyStored);
    }
}
