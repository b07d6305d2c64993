//! `Subject`: a person known to Stele, the identifiers that lead to them, and their consents.
//!
//! ```text
//!          Register                 Merge (into another subject)
//!   new ─────────────► known ──────────────────────────────────► merged
//!                      │  ▲
//!                      └──┘ Link · GiveConsent · WithdrawConsent · MarkMinor
//! ```
//!
//! The rules, and why:
//!
//! - **Identifiers lead to one person.** `telegram:<user id>`, `email:<address>`, `api:<requester
//!   id>`: [`Identifier::parse`] is the only way in, so `Email:Ana@Example.org` and
//!   `email:ana@example.org` are one identifier. Linking an identifier the subject has already is
//!   no change; which subject *else* holds an identifier is for the caller to check (an index of
//!   the log), not for one aggregate.
//! - **Consent is per purpose, and recorded as it was given.** Each `ConsentGiven` and
//!   `ConsentWithdrawn` says who gave it (the person, or their guardian), when and through which
//!   channel, so "did they agree to this, then?" is answerable from the log. Giving a consent that
//!   holds is no change; withdrawing one that does not hold is refused (nothing to withdraw).
//! - **A minor's consent is their guardian's.** Once a subject is marked a minor, only a guardian
//!   can give consent (COPPA); consents the minor gave themselves before being marked no longer
//!   count, and the guardian must give them again.
//! - **A merged subject takes no more commands.** Merging records where its identifiers and
//!   consents went; the surviving subject links them itself (its own command), so each stream
//!   only ever records what its own aggregate decided.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::channel::Channel;
use crate::personal::Personal;

/// How a person is reached or named on one channel: `kind:value`, e.g. `telegram:42`,
/// `email:ana@example.org`, `api:crm-7`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Identifier {
    kind: IdentifierKind,
    value: String,
}

/// The kinds of identifier Stele knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IdentifierKind {
    /// A Telegram user id (digits).
    Telegram,
    /// An email address (stored in lowercase).
    Email,
    /// A requester id given through the HTTP API.
    Api,
}

impl IdentifierKind {
    fn as_str(self) -> &'static str {
        match self {
            IdentifierKind::Telegram => "telegram",
            IdentifierKind::Email => "email",
            IdentifierKind::Api => "api",
        }
    }
}

/// A text that is not an identifier (see [`Identifier::parse`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an identifier: expected telegram:<digits>, email:<address> or api:<id>")]
pub struct InvalidIdentifier(pub String);

impl Identifier {
    /// The longest value, in bytes (a requester id of 256 characters fits).
    pub const MAX_VALUE: usize = 1024;

    /// Parses `kind:value`: the kind case-insensitively; a Telegram id is digits; an email address
    /// has one `@` with text on both sides and is lowercased; an API id is any text without NUL
    /// (a requester id as the API takes it). A value has at most 1024 bytes.
    ///
    /// ```
    /// use stele_aggregates::subject::Identifier;
    ///
    /// let email = Identifier::parse(" Email:Ana@Example.org ").unwrap();
    /// assert_eq!(email.to_string(), "email:ana@example.org");
    /// assert!(Identifier::parse("telegram:ana").is_err());
    /// ```
    pub fn parse(text: &str) -> Result<Identifier, InvalidIdentifier> {
        let invalid = || InvalidIdentifier(text.to_owned());
        let (kind, value) = text.trim().split_once(':').ok_or_else(invalid)?;
        let value = value.trim();
        if value.is_empty() || value.len() > Self::MAX_VALUE {
            return Err(invalid());
        }
        let (kind, value) = match kind.trim().to_ascii_lowercase().as_str() {
            "telegram" if value.bytes().all(|b| b.is_ascii_digit()) => {
                (IdentifierKind::Telegram, value.to_owned())
            }
            "email" => {
                let (local, domain) = value.split_once('@').ok_or_else(invalid)?;
                let well_formed = !local.is_empty()
                    && !domain.is_empty()
                    && !domain.contains('@')
                    && !value.chars().any(|c| c.is_whitespace() || c.is_control());
                if !well_formed {
                    return Err(invalid());
                }
                (IdentifierKind::Email, value.to_lowercase())
            }
            "api" if !value.contains('\0') => (IdentifierKind::Api, value.to_owned()),
            _ => return Err(invalid()),
        };
        Ok(Identifier { kind, value })
    }

    pub fn kind(&self) -> IdentifierKind {
        self.kind
    }

    pub fn value(&self) -> &str {
        &self.value
    }
}

impl fmt::Display for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.as_str(), self.value)
    }
}

impl TryFrom<String> for Identifier {
    type Error = InvalidIdentifier;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        Identifier::parse(&text)
    }
}

impl From<Identifier> for String {
    fn from(identifier: Identifier) -> String {
        identifier.to_string()
    }
}

/// What data is used for: `processing`, `memory`, `analytics`, … (an open set, named by the
/// deployment's policy): lowercase letters, digits, `-` and `_`, starting with a letter.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Purpose(String);

/// A text that is not a purpose name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a purpose: 1 to 64 of a-z, 0-9, '-' and '_', starting with a letter")]
pub struct InvalidPurpose(pub String);

impl Purpose {
    pub fn parse(name: &str) -> Result<Purpose, InvalidPurpose> {
        let name = name.trim().to_ascii_lowercase();
        let well_formed = (1..=64).contains(&name.len())
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if well_formed {
            Ok(Purpose(name))
        } else {
            Err(InvalidPurpose(name))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Purpose {
    type Error = InvalidPurpose;

    fn try_from(name: String) -> Result<Self, Self::Error> {
        Purpose::parse(&name)
    }
}

impl From<Purpose> for String {
    fn from(purpose: Purpose) -> String {
        purpose.0
    }
}

/// Who gave or withdrew a consent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum ConsentBy {
    /// The person themself.
    Subject,
    /// A parent or guardian, named as the operator recorded them (the name is the subject's
    /// personal data: it is erased with them).
    Guardian { name: Personal<String> },
}

impl ConsentBy {
    /// Whether two consents were given by the same party (names compared where readable).
    fn same_party(&self, other: &ConsentBy) -> bool {
        match (self, other) {
            (ConsentBy::Subject, ConsentBy::Subject) => true,
            (ConsentBy::Guardian { name: a }, ConsentBy::Guardian { name: b }) => {
                a.get() == b.get()
            }
            _ => false,
        }
    }
}

/// A consent as recorded: given or withdrawn, by whom, when, through which channel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Consent {
    pub given: bool,
    #[serde(flatten)]
    pub by: ConsentBy,
    pub at: DateTime<Utc>,
    pub channel: Channel,
}

/// A subject's erasure, as recorded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Erasure {
    /// The subjects whose data keys were destroyed: this one and those merged into it.
    pub keys: Vec<String>,
    /// Who erased (an operator's key, or `retention`).
    pub by: String,
    pub reason: String,
    pub at: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum SubjectCommand {
    Register {
        /// The subject's own id (its stream's id): its data key's name.
        subject: String,
        identifiers: Vec<Identifier>,
        minor: bool,
    },
    Link {
        identifier: Identifier,
    },
    GiveConsent {
        purpose: Purpose,
        by: ConsentBy,
        channel: Channel,
        at: DateTime<Utc>,
    },
    WithdrawConsent {
        purpose: Purpose,
        by: ConsentBy,
        channel: Channel,
        at: DateTime<Utc>,
    },
    MarkMinor {
        at: DateTime<Utc>,
    },
    /// Merge this subject into `into`, which takes over its identifiers and consents. (The
    /// caller refuses a merge into itself.)
    Merge {
        into: String,
        at: DateTime<Utc>,
    },
    /// Take over a subject merged into this one: its identifiers, and its data key, which is
    /// destroyed with this subject's.
    Absorb {
        from: String,
        identifiers: Vec<Identifier>,
        at: DateTime<Utc>,
    },
    /// Record that `processing` was refused for want of consent to `missing`.
    RefuseProcessing {
        processing: String,
        missing: Vec<Purpose>,
        channel: Channel,
        at: DateTime<Utc>,
    },
    /// Record an export of the subject's data.
    RecordExport {
        by: String,
        events: u64,
        at: DateTime<Utc>,
    },
    /// Erase the subject: their data keys were destroyed.
    Erase {
        by: String,
        reason: String,
        at: DateTime<Utc>,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum SubjectEvent {
    SubjectRegistered {
        subject: String,
        identifiers: Vec<Personal<Identifier>>,
        minor: bool,
    },
    IdentifierLinked {
        identifier: Personal<Identifier>,
    },
    ConsentGiven {
        purpose: Purpose,
        #[serde(flatten)]
        by: ConsentBy,
        channel: Channel,
        at: DateTime<Utc>,
    },
    ConsentWithdrawn {
        purpose: Purpose,
        #[serde(flatten)]
        by: ConsentBy,
        channel: Channel,
        at: DateTime<Utc>,
    },
    MarkedMinor {
        at: DateTime<Utc>,
    },
    SubjectMerged {
        into: String,
        identifiers: Vec<Personal<Identifier>>,
        at: DateTime<Utc>,
    },
    SubjectAbsorbed {
        from: String,
        identifiers: Vec<Personal<Identifier>>,
        at: DateTime<Utc>,
    },
    ProcessingRefused {
        processing: String,
        missing: Vec<Purpose>,
        channel: Channel,
        at: DateTime<Utc>,
    },
    SubjectExported {
        by: String,
        events: u64,
        at: DateTime<Utc>,
    },
    SubjectErased(Erasure),
}

impl DomainEvent for SubjectEvent {
    fn event_type(&self) -> String {
        match self {
            SubjectEvent::SubjectRegistered { .. } => "SubjectRegistered",
            SubjectEvent::IdentifierLinked { .. } => "IdentifierLinked",
            SubjectEvent::ConsentGiven { .. } => "ConsentGiven",
            SubjectEvent::ConsentWithdrawn { .. } => "ConsentWithdrawn",
            SubjectEvent::MarkedMinor { .. } => "MarkedMinor",
            SubjectEvent::SubjectMerged { .. } => "SubjectMerged",
            SubjectEvent::SubjectAbsorbed { .. } => "SubjectAbsorbed",
            SubjectEvent::ProcessingRefused { .. } => "ProcessingRefused",
            SubjectEvent::SubjectExported { .. } => "SubjectExported",
            SubjectEvent::SubjectErased(_) => "SubjectErased",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

/// Why a subject command was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubjectError {
    #[error("the subject exists already")]
    AlreadyRegistered,
    #[error("no such subject")]
    NotRegistered,
    #[error("a subject needs at least one identifier")]
    NoIdentifier,
    #[error("the subject was merged into {0}: use that subject")]
    Merged(String),
    #[error("the subject was erased")]
    Erased,
    #[error("the subject is a minor: only a guardian can give consent")]
    NeedsGuardian,
    #[error("no consent to {0} holds: nothing to withdraw")]
    NoConsent(String),
}

/// The subject's state, folded from its events.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subject {
    pub id: String,
    pub registered: bool,
    /// The identifiers that can still be read (none after erasure).
    pub identifiers: BTreeSet<Identifier>,
    pub minor: bool,
    /// The latest consent recorded for each purpose.
    pub consents: BTreeMap<Purpose, Consent>,
    pub merged_into: Option<String>,
    /// Subjects merged into this one: their keys are destroyed with this one's.
    pub absorbed: BTreeSet<String>,
    pub erased: Option<Erasure>,
}

impl Subject {
    /// Whether the subject's data may be used for `purpose` now: a consent holds, and for a minor
    /// it was given by a guardian.
    pub fn consents_to(&self, purpose: &Purpose) -> bool {
        self.erased.is_none()
            && self.consents.get(purpose).is_some_and(|consent| {
                consent.given && (!self.minor || matches!(consent.by, ConsentBy::Guardian { .. }))
            })
    }

    /// The subjects whose data keys belong to this one: itself and those merged into it.
    pub fn keys(&self) -> Vec<String> {
        std::iter::once(self.id.clone())
            .chain(self.absorbed.iter().cloned())
            .collect()
    }

    fn check_live(&self) -> Result<(), SubjectError> {
        if !self.registered {
            return Err(SubjectError::NotRegistered);
        }
        if self.erased.is_some() {
            return Err(SubjectError::Erased);
        }
        match &self.merged_into {
            Some(into) => Err(SubjectError::Merged(into.clone())),
            None => Ok(()),
        }
    }

    fn personal(
        &self,
        identifiers: impl IntoIterator<Item = Identifier>,
    ) -> Vec<Personal<Identifier>> {
        identifiers
            .into_iter()
            .map(|identifier| Personal::of(self.id.clone(), identifier))
            .collect()
    }
}

impl Aggregate for Subject {
    const TYPE: &'static str = "subject";
    type Command = SubjectCommand;
    type Event = SubjectEvent;
    type Error = SubjectError;
    type Services = ();

    async fn handle(
        &mut self,
        command: SubjectCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), SubjectError> {
        let event = match command {
            SubjectCommand::Register { .. } if self.registered => {
                return Err(SubjectError::AlreadyRegistered)
            }
            SubjectCommand::Register {
                subject,
                identifiers,
                minor,
            } => {
                let identifiers: BTreeSet<Identifier> = identifiers.into_iter().collect();
                if identifiers.is_empty() {
                    return Err(SubjectError::NoIdentifier);
                }
                SubjectEvent::SubjectRegistered {
                    identifiers: identifiers
                        .into_iter()
                        .map(|identifier| Personal::of(subject.clone(), identifier))
                        .collect(),
                    subject,
                    minor,
                }
            }
            SubjectCommand::Erase { .. } if self.erased.is_some() => return Ok(()),
            SubjectCommand::Erase { by, reason, at } => {
                if !self.registered {
                    return Err(SubjectError::NotRegistered);
                }
                SubjectEvent::SubjectErased(Erasure {
                    keys: self.keys(),
                    by,
                    reason,
                    at,
                })
            }
            SubjectCommand::RecordExport { by, events, at } => {
                if !self.registered {
                    return Err(SubjectError::NotRegistered);
                }
                SubjectEvent::SubjectExported { by, events, at }
            }
            command => {
                self.check_live()?;
                match command {
                    SubjectCommand::Register { .. }
                    | SubjectCommand::Erase { .. }
                    | SubjectCommand::RecordExport { .. } => unreachable!("handled above"),
                    SubjectCommand::Link { identifier } => {
                        if self.identifiers.contains(&identifier) {
                            return Ok(());
                        }
                        SubjectEvent::IdentifierLinked {
                            identifier: Personal::of(self.id.clone(), identifier),
                        }
                    }
                    SubjectCommand::GiveConsent {
                        purpose,
                        by,
                        channel,
                        at,
                    } => {
                        if self.minor && by == ConsentBy::Subject {
                            return Err(SubjectError::NeedsGuardian);
                        }
                        let same = self
                            .consents
                            .get(&purpose)
                            .is_some_and(|c| c.given && c.by.same_party(&by));
                        if same {
                            return Ok(());
                        }
                        SubjectEvent::ConsentGiven {
                            purpose,
                            by,
                            channel,
                            at,
                        }
                    }
                    SubjectCommand::WithdrawConsent {
                        purpose,
                        by,
                        channel,
                        at,
                    } => {
                        if !self.consents.get(&purpose).is_some_and(|c| c.given) {
                            return Err(SubjectError::NoConsent(purpose.as_str().to_owned()));
                        }
                        SubjectEvent::ConsentWithdrawn {
                            purpose,
                            by,
                            channel,
                            at,
                        }
                    }
                    SubjectCommand::MarkMinor { at } => {
                        if self.minor {
                            return Ok(());
                        }
                        SubjectEvent::MarkedMinor { at }
                    }
                    SubjectCommand::Merge { into, at } => SubjectEvent::SubjectMerged {
                        identifiers: self.personal(self.identifiers.iter().cloned()),
                        into,
                        at,
                    },
                    SubjectCommand::Absorb {
                        from,
                        identifiers,
                        at,
                    } => {
                        if self.absorbed.contains(&from) {
                            return Ok(());
                        }
                        SubjectEvent::SubjectAbsorbed {
                            identifiers: self.personal(identifiers),
                            from,
                            at,
                        }
                    }
                    SubjectCommand::RefuseProcessing {
                        processing,
                        missing,
                        channel,
                        at,
                    } => SubjectEvent::ProcessingRefused {
                        processing,
                        missing,
                        channel,
                        at,
                    },
                }
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: SubjectEvent) {
        let readable = |identifiers: Vec<Personal<Identifier>>| {
            identifiers
                .into_iter()
                .filter_map(Personal::into_value)
                .collect::<Vec<_>>()
        };
        match event {
            SubjectEvent::SubjectRegistered {
                subject,
                identifiers,
                minor,
            } => {
                self.id = subject;
                self.registered = true;
                self.identifiers = readable(identifiers).into_iter().collect();
                self.minor = minor;
            }
            SubjectEvent::IdentifierLinked { identifier } => {
                self.identifiers.extend(identifier.into_value());
            }
            SubjectEvent::ConsentGiven {
                purpose,
                by,
                channel,
                at,
            } => {
                self.consents.insert(
                    purpose,
                    Consent {
                        given: true,
                        by,
                        at,
                        channel,
                    },
                );
            }
            SubjectEvent::ConsentWithdrawn {
                purpose,
                by,
                channel,
                at,
            } => {
                self.consents.insert(
                    purpose,
                    Consent {
                        given: false,
                        by,
                        at,
                        channel,
                    },
                );
            }
            SubjectEvent::MarkedMinor { .. } => self.minor = true,
            SubjectEvent::SubjectMerged { into, .. } => self.merged_into = Some(into),
            SubjectEvent::SubjectAbsorbed {
                from, identifiers, ..
            } => {
                self.absorbed.insert(from);
                self.identifiers.extend(readable(identifiers));
            }
            SubjectEvent::ProcessingRefused { .. } | SubjectEvent::SubjectExported { .. } => {}
            SubjectEvent::SubjectErased(erasure) => {
                self.identifiers.clear();
                self.erased = Some(erasure);
            }
        }
    }
}

#[cfg(test)]
mod tests;
