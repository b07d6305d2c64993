//! `AccessList`: who may use a channel (a Telegram bot, a mailbox): ids allowed and ids denied,
//! changed at run time by operators and recorded, so who could talk to Stele when stays
//! answerable from the log.
//!
//! The rules, and why:
//!
//! - **Deny by default once anyone is allowed.** With no id allowed (here or in the deployment's
//!   configuration) the channel is open to all; once one is, only allowed ids get through.
//! - **Denied wins.** A denied id is refused even when its chat or the configuration allows it,
//!   so an operator can shut one person out of an open bot or a configured list.
//! - **Allowing or denying again is no change** (no event): commands can be repeated safely.
//! - **Ids are the channel's own** (Telegram user or chat ids, email addresses), not blank, at
//!   most [`MAX_ID_BYTES`] bytes.

use std::collections::BTreeSet;

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

/// The longest id, in bytes.
pub const MAX_ID_BYTES: usize = 256;

/// What can be asked of an access list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessCommand {
    /// Lets `id` in (and lifts a denial).
    Allow { id: String, by: String },
    /// Shuts `id` out (and withdraws an allowance).
    Deny { id: String, by: String },
}

/// What happened to an access list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum AccessEvent {
    AccessAllowed { id: String, by: String },
    AccessDenied { id: String, by: String },
}

impl DomainEvent for AccessEvent {
    fn event_type(&self) -> String {
        match self {
            AccessEvent::AccessAllowed { .. } => "AccessAllowed",
            AccessEvent::AccessDenied { .. } => "AccessDenied",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

/// Why an access command was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AccessError {
    #[error("an id must not be blank nor longer than {MAX_ID_BYTES} bytes")]
    InvalidId,
}

/// The access list's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessList {
    pub allowed: BTreeSet<String>,
    pub denied: BTreeSet<String>,
}

impl AccessList {
    /// Whether someone known by `ids` (their user id, their chat's id…) gets through, given the
    /// ids the deployment's configuration allows.
    pub fn admits<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a str> + Clone,
        configured: &BTreeSet<String>,
    ) -> bool {
        if ids.clone().into_iter().any(|id| self.denied.contains(id)) {
            return false;
        }
        if self.allowed.is_empty() && configured.is_empty() {
            return true;
        }
        ids.into_iter()
            .any(|id| self.allowed.contains(id) || configured.contains(id))
    }
}

impl Aggregate for AccessList {
    const TYPE: &'static str = "access_list";
    type Command = AccessCommand;
    type Event = AccessEvent;
    type Error = AccessError;
    type Services = ();

    async fn handle(
        &mut self,
        command: AccessCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), AccessError> {
        let valid = |id: &str| !id.trim().is_empty() && id.len() <= MAX_ID_BYTES;
        let event = match command {
            AccessCommand::Allow { id, .. } | AccessCommand::Deny { id, .. } if !valid(&id) => {
                return Err(AccessError::InvalidId)
            }
            AccessCommand::Allow { id, .. }
                if self.allowed.contains(&id) && !self.denied.contains(&id) =>
            {
                return Ok(())
            }
            AccessCommand::Deny { id, .. } if self.denied.contains(&id) => return Ok(()),
            AccessCommand::Allow { id, by } => AccessEvent::AccessAllowed { id, by },
            AccessCommand::Deny { id, by } => AccessEvent::AccessDenied { id, by },
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: AccessEvent) {
        match event {
            AccessEvent::AccessAllowed { id, .. } => {
                self.denied.remove(&id);
                self.allowed.insert(id);
            }
            AccessEvent::AccessDenied { id, .. } => {
                self.allowed.remove(&id);
                self.denied.insert(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    type Given = TestFramework<AccessList>;

    fn allow(id: &str) -> AccessCommand {
        AccessCommand::Allow {
            id: id.into(),
            by: "ops".into(),
        }
    }

    fn allowed(id: &str) -> AccessEvent {
        AccessEvent::AccessAllowed {
            id: id.into(),
            by: "ops".into(),
        }
    }

    fn denied(id: &str) -> AccessEvent {
        AccessEvent::AccessDenied {
            id: id.into(),
            by: "ops".into(),
        }
    }

    #[test]
    fn allowing_twice_is_no_change_and_a_denial_is_lifted() {
        Given::with(())
            .given(vec![allowed("42")])
            .when(allow("42"))
            .then_expect_events(vec![]);
        Given::with(())
            .given(vec![allowed("42"), denied("42")])
            .when(allow("42"))
            .then_expect_events(vec![allowed("42")]);
        Given::with(())
            .given_no_previous_events()
            .when(allow(" "))
            .then_expect_error(AccessError::InvalidId);
    }

    #[test]
    fn open_until_someone_is_allowed_and_denied_wins() {
        let none = BTreeSet::new();
        let configured: BTreeSet<String> = ["7".to_owned()].into();
        let mut list = AccessList::default();
        assert!(list.admits(["1"], &none));
        assert!(!list.admits(["1"], &configured));
        assert!(list.admits(["1", "7"], &configured), "the chat is allowed");
        list.apply(allowed("1"));
        assert!(list.admits(["1"], &none));
        assert!(!list.admits(["2"], &none));
        list.apply(denied("7"));
        assert!(
            !list.admits(["7"], &configured),
            "denied wins over configured"
        );
    }
}
