//! `Mailbox`: how far the email channel has read one IMAP folder. The cursor is the folder's
//! UIDVALIDITY and the highest UID whose message is recorded; the channel records it only after
//! the messages up to it are in their conversations, so a crash re-reads (never skips) mail.
//!
//! The rules, and why:
//!
//! - **The cursor only moves forward** within one UIDVALIDITY: an older or equal UID is no change
//!   (no event), so a node that lost a race or re-read a batch records nothing.
//! - **A new UIDVALIDITY starts over.** The server renumbered the folder (restored, recreated,
//!   moved between servers): UIDs seen before mean nothing. `UidValidityChanged` records the old
//!   and new values and puts the cursor at zero, so every message is read again; the
//!   conversations skip those already recorded (by Message-ID). No mail is silently skipped.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

/// What can be asked of a mailbox cursor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MailboxCommand {
    /// Messages up to `last_uid` of the folder with `uid_validity` are recorded.
    Advance { uid_validity: u32, last_uid: u32 },
    /// The folder now has `uid_validity` (no change if it had it already).
    Validate { uid_validity: u32 },
}

/// What happened to a mailbox cursor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum MailboxEvent {
    /// The folder's messages up to `last_uid` are recorded.
    MailboxCursorAdvanced { uid_validity: u32, last_uid: u32 },
    /// The server renumbered the folder: reading starts over.
    UidValidityChanged { from: Option<u32>, to: u32 },
}

impl DomainEvent for MailboxEvent {
    fn event_type(&self) -> String {
        match self {
            MailboxEvent::MailboxCursorAdvanced { .. } => "MailboxCursorAdvanced",
            MailboxEvent::UidValidityChanged { .. } => "UidValidityChanged",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

/// Mailbox commands are never refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unreachable")]
pub enum MailboxError {}

/// The cursor.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mailbox {
    /// The folder's UIDVALIDITY, once seen.
    pub uid_validity: Option<u32>,
    /// The highest UID recorded (0: none yet).
    pub last_uid: u32,
}

impl Aggregate for Mailbox {
    const TYPE: &'static str = "mailbox";
    type Command = MailboxCommand;
    type Event = MailboxEvent;
    type Error = MailboxError;
    type Services = ();

    async fn handle(
        &mut self,
        command: MailboxCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), MailboxError> {
        let validity = match command {
            MailboxCommand::Advance { uid_validity, .. }
            | MailboxCommand::Validate { uid_validity } => uid_validity,
        };
        if self.uid_validity != Some(validity) {
            let changed = MailboxEvent::UidValidityChanged {
                from: self.uid_validity,
                to: validity,
            };
            sink.write(changed, self).await;
        }
        if let MailboxCommand::Advance {
            uid_validity,
            last_uid,
        } = command
        {
            if last_uid > self.last_uid {
                let advanced = MailboxEvent::MailboxCursorAdvanced {
                    uid_validity,
                    last_uid,
                };
                sink.write(advanced, self).await;
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: MailboxEvent) {
        match event {
            MailboxEvent::MailboxCursorAdvanced { last_uid, .. } => self.last_uid = last_uid,
            MailboxEvent::UidValidityChanged { to, .. } => {
                self.uid_validity = Some(to);
                self.last_uid = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    type Given = TestFramework<Mailbox>;

    fn advanced(uid_validity: u32, last_uid: u32) -> MailboxEvent {
        MailboxEvent::MailboxCursorAdvanced {
            uid_validity,
            last_uid,
        }
    }

    #[test]
    fn the_first_batch_records_the_validity_then_the_cursor() {
        Given::with(())
            .given_no_previous_events()
            .when(MailboxCommand::Advance {
                uid_validity: 7,
                last_uid: 3,
            })
            .then_expect_events(vec![
                MailboxEvent::UidValidityChanged { from: None, to: 7 },
                advanced(7, 3),
            ]);
    }

    #[test]
    fn the_cursor_never_moves_back() {
        Given::with(())
            .given(vec![
                MailboxEvent::UidValidityChanged { from: None, to: 7 },
                advanced(7, 3),
            ])
            .when(MailboxCommand::Advance {
                uid_validity: 7,
                last_uid: 3,
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn a_new_validity_starts_over() {
        let given = vec![
            MailboxEvent::UidValidityChanged { from: None, to: 7 },
            advanced(7, 30),
        ];
        Given::with(())
            .given(given.clone())
            .when(MailboxCommand::Validate { uid_validity: 9 })
            .then_expect_events(vec![MailboxEvent::UidValidityChanged {
                from: Some(7),
                to: 9,
            }]);
        let mut mailbox = Mailbox::default();
        for event in given {
            mailbox.apply(event);
        }
        mailbox.apply(MailboxEvent::UidValidityChanged {
            from: Some(7),
            to: 9,
        });
        assert_eq!(mailbox.last_uid, 0);
        Given::with(())
            .given(vec![MailboxEvent::UidValidityChanged { from: None, to: 9 }])
            .when(MailboxCommand::Validate { uid_validity: 9 })
            .then_expect_events(vec![]);
    }
}
