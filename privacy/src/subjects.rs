//! The subjects service: finding the person behind an identifier, their consents against the
//! deployment's policy, merging, erasing and exporting them.
//!
//! **Who holds an identifier.** `subject_identifiers` maps a keyed hash of each identifier
//! (HMAC-SHA-256 under a key derived from the key-encryption key, so the table names no one and
//! cannot be tested against a list of addresses without that key) to its subject. A first contact
//! claims the row (`ON CONFLICT DO NOTHING`, then reads who won), so two processes meeting the
//! same new person at once agree on one subject. Erasure deletes the subject's rows: a person who
//! comes back after being forgotten is someone new.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use stele_aggregates::channel::Channel;
use stele_aggregates::personal::Personal;
use stele_aggregates::subject::{
    ConsentBy, Erasure, Identifier, Purpose, Subject, SubjectCommand, SubjectError,
};
use stele_aggregates::task::Requester;
use stele_engine::command::{CommandBus, CommandError, Executed};
use stele_engine::store::sql::{Db, Dialects};
use stele_engine::store::StorePool;
use stele_engine::{CommandMeta, Store};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::{Kek, PrivacyError, Sealer};

/// The deployment's policy: which purposes each kind of processing needs, and how long data is
/// kept for each purpose.
///
/// ```toml
/// [privacy.require]
/// tasks = ["processing"]
/// memory = ["processing", "memory"]
///
/// [privacy.retention]
/// processing = "365d"
/// memory = "90d"
/// ```
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Purposes a subject must have consented to, per kind of processing (`tasks`, `memory`,
    /// `telegram`, `email`, …). A kind not named needs none.
    #[serde(default)]
    pub require: BTreeMap<String, Vec<Purpose>>,
    /// How long a subject's data is kept after they were last seen, per purpose they consented
    /// to; the longest of their purposes applies. No entry: kept until erased.
    #[serde(default, with = "retention_serde")]
    pub retention: BTreeMap<Purpose, Duration>,
}

mod retention_serde {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        map: &BTreeMap<Purpose, Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let texts: BTreeMap<&Purpose, String> = map
            .iter()
            .map(|(k, v)| (k, humantime::format_duration(*v).to_string()))
            .collect();
        texts.serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<BTreeMap<Purpose, Duration>, D::Error> {
        let texts = BTreeMap::<Purpose, String>::deserialize(deserializer)?;
        texts
            .into_iter()
            .map(|(purpose, text)| {
                humantime::parse_duration(&text)
                    .map(|d| (purpose, d))
                    .map_err(|e| serde::de::Error::custom(format!("retention {text:?}: {e}")))
            })
            .collect()
    }
}

impl Policy {
    /// The purposes `processing` needs that `subject` has not consented to.
    pub fn missing(&self, processing: &str, subject: &Subject) -> Vec<Purpose> {
        self.require
            .get(processing)
            .into_iter()
            .flatten()
            .filter(|purpose| !subject.consents_to(purpose))
            .cloned()
            .collect()
    }

    /// How long `subject`'s data is kept after they were last seen (`None`: until erased).
    pub fn retention_of(&self, subject: &Subject) -> Option<Duration> {
        let held: Vec<Duration> = subject
            .consents
            .iter()
            .filter(|(_, consent)| consent.given)
            .filter_map(|(purpose, _)| self.retention.get(purpose).copied())
            .collect();
        if held.is_empty() {
            // No purpose holds: the shortest retention of any purpose applies.
            self.retention.values().min().copied()
        } else {
            held.into_iter().max()
        }
    }
}

/// Errors of the subjects service.
#[derive(Debug, thiserror::Error)]
pub enum SubjectsError {
    #[error("no subject {0}")]
    NotFound(String),
    #[error("{0}")]
    Refused(#[from] SubjectError),
    #[error("the identifier is held by subject {0}")]
    IdentifierTaken(String),
    #[error("a subject cannot be merged into itself")]
    SelfMerge,
    #[error("{processing} needs consent to {}, which the subject has not given", missing.join(", "))]
    ConsentRequired {
        subject: String,
        processing: String,
        missing: Vec<String>,
    },
    #[error(transparent)]
    Privacy(#[from] PrivacyError),
    #[error("{0}")]
    Store(String),
}

impl From<sqlx::Error> for SubjectsError {
    fn from(e: sqlx::Error) -> Self {
        SubjectsError::Store(e.to_string())
    }
}

impl<E: std::error::Error> From<CommandError<E>> for SubjectsError {
    fn from(e: CommandError<E>) -> Self {
        SubjectsError::Store(e.to_string())
    }
}

struct Statements {
    find: &'static str,
    claim: &'static str,
    forget: &'static str,
    repoint: &'static str,
}

const SQL: Dialects<Statements> = Dialects {
    postgres: Statements {
        find: "SELECT subject_id FROM subject_identifiers WHERE lookup = $1",
        claim: "INSERT INTO subject_identifiers (lookup, subject_id) VALUES ($1, $2) \
                ON CONFLICT (lookup) DO NOTHING",
        forget: "DELETE FROM subject_identifiers WHERE subject_id = $1",
        repoint: "UPDATE subject_identifiers SET subject_id = $2 WHERE subject_id = $1",
    },
    sqlite: Statements {
        find: "SELECT subject_id FROM subject_identifiers WHERE lookup = $1",
        claim: "INSERT INTO subject_identifiers (lookup, subject_id) VALUES ($1, $2) \
                ON CONFLICT (lookup) DO NOTHING",
        forget: "DELETE FROM subject_identifiers WHERE subject_id = $1",
        repoint: "UPDATE subject_identifiers SET subject_id = $2 WHERE subject_id = $1",
    },
};

/// The namespace of the command ids that register a subject (one per identifier's lookup, so
/// that a registration retried after a crash is recognised as the same command).
const REGISTER_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_52a8_2b0e_4d39_9a51_7c3e_0d4b_8e21);

/// The subjects service.
pub struct Subjects {
    pool: StorePool,
    bus: CommandBus<Subject>,
    sealer: Arc<Sealer>,
    lookup_key: Zeroizing<[u8; 32]>,
    pseudonym_key: Zeroizing<[u8; 32]>,
    /// Where people's files are kept: new ones in the first, the others still read.
    blob_stores: Vec<Arc<dyn crate::blobs::BlobStore>>,
    /// Identifier lookups already resolved (lookup → subject), dropped on erasure and merge.
    known: moka::sync::Cache<String, String>,
    policy: Policy,
}

/// The identifier a requester is known by: `telegram:` and `email:` for those channels when
/// the id is one, `api:` otherwise.
pub fn identifier_of(requester: &Requester) -> Result<Identifier, PrivacyError> {
    let id = &requester.user_id;
    let preferred = match requester.channel.as_str() {
        "telegram" => Identifier::parse(&format!("telegram:{id}")).ok(),
        "email" => Identifier::parse(&format!("email:{id}")).ok(),
        _ => None,
    };
    match preferred {
        Some(identifier) => Ok(identifier),
        None => Identifier::parse(&format!("api:{id}")).map_err(|_| {
            PrivacyError::Malformed(
                "the requester's id is not an identifier: 1 to 1024 bytes without NUL".into(),
            )
        }),
    }
}

/// HMAC-SHA256 under `key` of `parts`, one after the other.
fn keyed(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes a key of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

impl Subjects {
    /// The service on `store` (whose log seals with `sealer`).
    pub fn new(store: &Store, sealer: Arc<Sealer>, kek: &Kek, policy: Policy) -> Subjects {
        Subjects {
            pool: store.pool.clone(),
            bus: CommandBus::new(store.log.clone(), ()),
            sealer,
            lookup_key: kek.derive(b"stele identifier lookup"),
            pseudonym_key: kek.derive(b"stele stream pseudonym"),
            blob_stores: vec![Arc::new(crate::blobs::TableBlobs::new(store.pool.clone()))],
            known: moka::sync::Cache::builder().max_capacity(100_000).build(),
            policy,
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Keeps new files in `store`; those kept in the database before stay readable (and are
    /// erased with their person).
    pub fn with_blob_store(mut self, store: Arc<dyn crate::blobs::BlobStore>) -> Subjects {
        self.blob_stores.insert(0, store);
        self
    }

    /// The people's files (sealed with their keys).
    pub fn blobs(&self) -> crate::blobs::Blobs<'_> {
        crate::blobs::Blobs::new(&self.blob_stores, self.sealer.keys())
    }

    /// Where new files are kept.
    pub fn blob_store(&self) -> String {
        self.blob_stores[0].describe()
    }

    pub fn sealer(&self) -> &Arc<Sealer> {
        &self.sealer
    }

    /// The store's pool (for the read models that hold a subject's rows).
    pub fn pool(&self) -> &StorePool {
        &self.pool
    }

    pub(crate) fn log(&self) -> &CommandBus<Subject> {
        &self.bus
    }

    /// A stable stand-in for `value` (a chat id, an address) where a name must not show it: a
    /// stream's or a job's. Keyed, so that the small space of chat ids cannot be searched for the
    /// one that gives a pseudonym; 128 bits of an HMAC-SHA256 over `kind` and `value`.
    pub fn pseudonym(&self, kind: &str, value: &str) -> String {
        let mac = keyed(
            &self.pseudonym_key,
            &[kind.as_bytes(), &[0], value.as_bytes()],
        );
        hex::encode(&mac[..16])
    }

    fn lookup(&self, identifier: &Identifier) -> String {
        hex::encode(keyed(
            &self.lookup_key,
            &[identifier.to_string().as_bytes()],
        ))
    }

    /// The subject `identifier` leads to, if any.
    pub async fn find(&self, identifier: &Identifier) -> Result<Option<String>, SubjectsError> {
        let lookup = self.lookup(identifier);
        if let Some(subject) = self.known.get(&lookup) {
            return Ok(Some(subject));
        }
        let mut db = Db::from(&self.pool);
        let sql = db.pick(&SQL);
        let found = db
            .fetch_optional(sql.find, &[lookup.as_str().into()])
            .await?
            .map(|row| row.get::<String>("subject_id"))
            .transpose()?;
        if let Some(subject) = &found {
            self.known.insert(lookup, subject.clone());
        }
        Ok(found)
    }

    /// The subject `identifier` leads to; a new one (registered, with a data key) on first
    /// contact.
    pub async fn resolve(
        &self,
        identifier: &Identifier,
        meta: &CommandMeta,
    ) -> Result<String, SubjectsError> {
        if let Some(subject) = self.find(identifier).await? {
            return Ok(subject);
        }
        let lookup = self.lookup(identifier);
        let mine = Uuid::now_v7().to_string();
        let winner = {
            let mut db = Db::from(&self.pool);
            let sql = db.pick(&SQL);
            db.execute(sql.claim, &[lookup.as_str().into(), mine.as_str().into()])
                .await?;
            db.fetch_one(sql.find, &[lookup.as_str().into()])
                .await?
                .get::<String>("subject_id")?
        };
        // Whoever claimed the identifier registers the subject; the command id is the claim's
        // (identifier and subject), so a registration that a crash interrupted completes the
        // next time, and a person who comes back after being erased is registered anew.
        let command_id = Uuid::new_v5(&REGISTER_NAMESPACE, format!("{lookup}:{winner}").as_bytes());
        let meta = meta.clone().with_command_id(command_id);
        self.sealer.keys().data_key(&winner).await?;
        let register = SubjectCommand::Register {
            subject: winner.clone(),
            identifiers: vec![identifier.clone()],
            minor: false,
        };
        match self.bus.create(&winner, register, meta).await {
            Ok(_) | Err(CommandError::Rejected(SubjectError::AlreadyRegistered)) => {}
            Err(e) => return Err(e.into()),
        }
        self.known.insert(lookup, winner.clone());
        Ok(winner)
    }

    /// The subject a requester is, resolved on first contact.
    pub async fn of_requester(
        &self,
        requester: &Requester,
        meta: &CommandMeta,
    ) -> Result<String, SubjectsError> {
        self.resolve(&identifier_of(requester)?, meta).await
    }

    /// The subject a requester is, if the policy lets `processing` use their data; otherwise
    /// the refusal is recorded (nothing of the request is stored) and
    /// [`SubjectsError::ConsentRequired`] returned.
    pub async fn admit(
        &self,
        requester: &Requester,
        processing: &str,
        meta: &CommandMeta,
    ) -> Result<String, SubjectsError> {
        let subject = self.of_requester(requester, meta).await?;
        if !self.policy.require.contains_key(processing) {
            return Ok(subject);
        }
        let (state, _) = self.bus.load(&subject).await?;
        if state.erased.is_some() {
            return Err(SubjectError::Erased.into());
        }
        let missing = self.policy.missing(processing, &state);
        if missing.is_empty() {
            return Ok(subject);
        }
        let refusal = SubjectCommand::RefuseProcessing {
            processing: processing.to_owned(),
            missing: missing.clone(),
            channel: requester.channel.clone(),
            at: Utc::now(),
        };
        // (A refusal is recorded under its own command id: the caller's is the task's.)
        let meta = meta.clone().with_command_id(Uuid::now_v7());
        self.bus.execute(&subject, refusal, meta).await?;
        Err(SubjectsError::ConsentRequired {
            subject,
            processing: processing.to_owned(),
            missing: missing.iter().map(|p| p.as_str().to_owned()).collect(),
        })
    }

    /// A subject's state; `None` if there is no such subject.
    pub async fn get(&self, subject: &str) -> Result<Option<Subject>, SubjectsError> {
        let (state, version) = self.bus.load(subject).await?;
        Ok((version > 0 && state.registered).then_some(state))
    }

    async fn existing(&self, subject: &str) -> Result<Subject, SubjectsError> {
        self.get(subject)
            .await?
            .ok_or_else(|| SubjectsError::NotFound(subject.to_owned()))
    }

    async fn run(
        &self,
        subject: &str,
        command: SubjectCommand,
        meta: CommandMeta,
    ) -> Result<Executed, SubjectsError> {
        match self.bus.execute(subject, command, meta).await {
            Ok(executed) => Ok(executed),
            Err(CommandError::Rejected(e)) => Err(e.into()),
            Err(e) => Err(e.into()),
        }
    }

    /// Registers a person by their identifiers (the first leads; the others are linked). An
    /// identifier someone else holds is refused; one the person already holds is the person.
    pub async fn register(
        &self,
        identifiers: &[Identifier],
        minor: bool,
        meta: CommandMeta,
    ) -> Result<String, SubjectsError> {
        let first = identifiers.first().ok_or(SubjectError::NoIdentifier)?;
        let subject = self.resolve(first, &meta).await?;
        for identifier in &identifiers[1..] {
            self.link(
                &subject,
                identifier,
                meta.clone().with_command_id(Uuid::now_v7()),
            )
            .await?;
        }
        if minor {
            self.run(
                &subject,
                SubjectCommand::MarkMinor { at: Utc::now() },
                meta.with_command_id(Uuid::now_v7()),
            )
            .await?;
        }
        Ok(subject)
    }

    /// Links an identifier to a subject.
    pub async fn link(
        &self,
        subject: &str,
        identifier: &Identifier,
        meta: CommandMeta,
    ) -> Result<(), SubjectsError> {
        self.existing(subject).await?;
        let lookup = self.lookup(identifier);
        let holder = {
            let mut db = Db::from(&self.pool);
            let sql = db.pick(&SQL);
            db.execute(sql.claim, &[lookup.as_str().into(), subject.into()])
                .await?;
            db.fetch_one(sql.find, &[lookup.as_str().into()])
                .await?
                .get::<String>("subject_id")?
        };
        if holder != subject {
            return Err(SubjectsError::IdentifierTaken(holder));
        }
        let link = SubjectCommand::Link {
            identifier: identifier.clone(),
        };
        self.run(subject, link, meta).await?;
        Ok(())
    }

    /// Records a consent given (or withdrawn, `given == false`) for `purpose`, by the subject or
    /// their guardian (named).
    pub async fn consent(
        &self,
        subject: &str,
        purpose: Purpose,
        given: bool,
        guardian: Option<String>,
        channel: Channel,
        meta: CommandMeta,
    ) -> Result<Executed, SubjectsError> {
        self.existing(subject).await?;
        let by = match guardian {
            Some(name) => ConsentBy::Guardian {
                name: Personal::of(subject, name),
            },
            None => ConsentBy::Subject,
        };
        let at = Utc::now();
        let command = if given {
            SubjectCommand::GiveConsent {
                purpose,
                by,
                channel,
                at,
            }
        } else {
            SubjectCommand::WithdrawConsent {
                purpose,
                by,
                channel,
                at,
            }
        };
        self.run(subject, command, meta).await
    }

    /// Marks a subject a minor: from now on only a guardian's consent counts.
    pub async fn mark_minor(&self, subject: &str, meta: CommandMeta) -> Result<(), SubjectsError> {
        self.existing(subject).await?;
        self.run(subject, SubjectCommand::MarkMinor { at: Utc::now() }, meta)
            .await?;
        Ok(())
    }

    /// Merges `from` into `into`: `into` takes over its identifiers, and its data key is
    /// destroyed with `into`'s.
    pub async fn merge(
        &self,
        from: &str,
        into: &str,
        meta: CommandMeta,
    ) -> Result<(), SubjectsError> {
        if from == into {
            return Err(SubjectsError::SelfMerge);
        }
        let merged = self.existing(from).await?;
        self.existing(into).await?;
        let at = Utc::now();
        self.run(
            from,
            SubjectCommand::Merge {
                into: into.to_owned(),
                at,
            },
            meta.clone(),
        )
        .await?;
        let absorb = SubjectCommand::Absorb {
            from: from.to_owned(),
            identifiers: merged.identifiers.into_iter().collect(),
            at,
        };
        self.run(into, absorb, meta.with_command_id(Uuid::now_v7()))
            .await?;
        let mut db = Db::from(&self.pool);
        let sql = db.pick(&SQL);
        db.execute(sql.repoint, &[from.into(), into.into()]).await?;
        self.known.invalidate_all();
        Ok(())
    }

    /// Erases a subject (and those merged into it): destroys their data keys, forgets which
    /// identifiers led to them, and records `SubjectErased`. Erasing again is no change; a
    /// subject merged into another is erased through that one.
    pub async fn erase(
        &self,
        subject: &str,
        by: &str,
        reason: &str,
        meta: CommandMeta,
    ) -> Result<Erasure, SubjectsError> {
        let state = self.existing(subject).await?;
        if let Some(into) = &state.merged_into {
            return Err(SubjectError::Merged(into.clone()).into());
        }
        if let Some(done) = state.erased {
            return Ok(done);
        }
        // Keys first: the data is unreadable from this moment, wherever it is. If what follows
        // fails, erasing again completes it.
        for key in state.keys() {
            self.sealer.keys().shred(&key).await?;
            self.sealer.forget(&key);
            {
                // (Its connection goes back before the next: the embedded store has one.)
                let mut db = Db::from(&self.pool);
                let sql = db.pick(&SQL);
                db.execute(sql.forget, &[key.as_str().into()]).await?;
            }
            self.blobs().forget(&key).await?;
        }
        self.known.invalidate_all();
        let command = SubjectCommand::Erase {
            by: by.to_owned(),
            reason: reason.to_owned(),
            at: Utc::now(),
        };
        self.run(subject, command, meta).await?;
        let state = self.existing(subject).await?;
        state
            .erased
            .ok_or_else(|| SubjectsError::Store("the erasure was not recorded".into()))
    }
}

impl Subjects {
    /// When an event last held the subject's data (from the subjects index).
    pub async fn last_seen(&self, subject: &str) -> Result<Option<DateTime<Utc>>, SubjectsError> {
        Ok(crate::index::subject_row_of(&self.pool, subject)
            .await?
            .map(|row| row.last_seen_at))
    }

    /// The tasks that hold the subjects' data (from the subjects index).
    pub async fn tasks_of(&self, subjects: &[String]) -> Result<Vec<String>, SubjectsError> {
        Ok(crate::index::streams_of(&self.pool, subjects, "task").await?)
    }
}

/// When a subject's retention ends, if it does: last seen plus their retention.
pub fn retention_deadline(
    policy: &Policy,
    subject: &Subject,
    last_seen: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let keep = chrono::Duration::from_std(policy.retention_of(subject)?).ok()?;
    last_seen.checked_add_signed(keep)
}
