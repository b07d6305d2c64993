//! Sealing and opening the personal values inside JSON documents (event payloads, read-model
//! rows, job payloads), in the forms `stele_aggregates::personal` defines.
//!
//! - [`Sealer::seal`] turns every `{"$personal": {"subject", "value"}}` into
//!   `{"$sealed": {"subject", "data"}}`: the value's JSON text sealed with the subject's data key
//!   (made on first use), base64. A value for a subject already erased becomes
//!   `{"$erased": {"subject"}}` at once: it is never stored. A document that already holds a
//!   sealed or erased form is refused: only the store writes those, so a caller cannot pass
//!   another person's ciphertext off as its own data and have it opened for them.
//! - [`Sealer::open`] turns every sealed form back into the readable one, or into the erased
//!   form when the subject's key was destroyed. Opening never fails on an erased or damaged
//!   value: it reads as erased.
//!
//! Unwrapped data keys are kept in memory for a minute; [`Sealer::forget`] drops one at once (on
//! erasure, in every process that follows the log).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use stele_aggregates::personal::{as_marker, marker};

use crate::{DataKey, KeyState, KeyStore, PrivacyError};

const BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// How long an unwrapped data key stays in memory without being looked up again.
const KEY_TTL: Duration = Duration::from_secs(60);

/// A subject's key as the sealer holds it.
enum Held {
    Live(DataKey),
    Shredded,
}

/// Seals and opens personal values with the subjects' data keys.
pub struct Sealer {
    keys: KeyStore,
    held: moka::sync::Cache<String, Arc<Held>>,
}

impl Sealer {
    pub fn new(keys: KeyStore) -> Sealer {
        Sealer {
            keys,
            held: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(KEY_TTL)
                .build(),
        }
    }

    /// The key store behind the sealer.
    pub fn keys(&self) -> &KeyStore {
        &self.keys
    }

    /// Reads the keys of `subjects` into memory (those not held already), so that opening their
    /// values next needs no store.
    pub async fn hold(&self, subjects: BTreeSet<String>) -> Result<(), PrivacyError> {
        for subject in subjects {
            self.held_key(&subject, false).await?;
        }
        Ok(())
    }

    /// Drops the subject's key from memory (it was destroyed).
    pub fn forget(&self, subject: &str) {
        self.held.invalidate(subject);
    }

    /// Seals every readable personal value in `document` (see the module's documentation).
    pub async fn seal(&self, document: &mut Value) -> Result<(), PrivacyError> {
        let mut subjects = BTreeSet::new();
        collect(document, marker::PERSONAL, &mut subjects)?;
        if subjects.is_empty() {
            return Ok(());
        }
        let mut keys = BTreeMap::new();
        for subject in subjects {
            let held = self.held_key(&subject, true).await?;
            keys.insert(subject, held);
        }
        rewrite(document, marker::PERSONAL, &mut |subject, body| match keys
            .get(subject)
            .map(|held| held.as_ref())
        {
            Some(Held::Live(key)) => {
                let text = body.get("value").map(Value::to_string).unwrap_or_default();
                let data = BASE64.encode(key.seal(text.as_bytes(), &context(subject)));
                json!({ marker::SEALED: { "subject": subject, "data": data } })
            }
            _ => erased(subject),
        });
        Ok(())
    }

    /// Opens every sealed value in `document` (see the module's documentation).
    pub async fn open(&self, document: &mut Value) -> Result<(), PrivacyError> {
        let mut subjects = BTreeSet::new();
        collect(document, marker::SEALED, &mut subjects)?;
        if subjects.is_empty() {
            return Ok(());
        }
        let mut keys = BTreeMap::new();
        for subject in subjects {
            let held = self.held_key(&subject, false).await?;
            keys.insert(subject, held);
        }
        rewrite(document, marker::SEALED, &mut |subject, body| {
            let Some(Held::Live(key)) = keys.get(subject).map(|held| held.as_ref()) else {
                return erased(subject);
            };
            let value = body
                .get("data")
                .and_then(Value::as_str)
                .and_then(|data| BASE64.decode(data).ok())
                .and_then(|sealed| key.open(&sealed, &context(subject)).ok())
                .and_then(|plain| serde_json::from_slice::<Value>(&plain).ok());
            match value {
                Some(value) => json!({ marker::PERSONAL: { "subject": subject, "value": value } }),
                None => {
                    // Altered or damaged: it reads as erased, and the operator hears of it
                    // (the subject id is a random id, not personal data).
                    tracing::warn!(
                        subject,
                        "a sealed value could not be opened; it reads as erased"
                    );
                    erased(subject)
                }
            }
        });
        Ok(())
    }

    async fn held_key(&self, subject: &str, create: bool) -> Result<Arc<Held>, PrivacyError> {
        if let Some(held) = self.held.get(subject) {
            return Ok(held);
        }
        let state = if create {
            self.keys.data_key(subject).await?
        } else {
            self.keys.key(subject).await?
        };
        // Only settled answers are kept: a live or destroyed key stays so (a destroyed one never
        // comes back), while a subject without a key may get one any moment.
        let settled = !matches!(state, KeyState::None);
        let held = Arc::new(match state {
            KeyState::Live(key) => Held::Live(key),
            // A sealed value whose subject has no key row cannot be opened: erased too.
            KeyState::Shredded | KeyState::None => Held::Shredded,
        });
        if settled {
            self.held.insert(subject.to_owned(), held.clone());
        }
        Ok(held)
    }
}

/// The associated data of a subject's sealed values.
fn context(subject: &str) -> Vec<u8> {
    [b"stele personal value\0".as_slice(), subject.as_bytes()].concat()
}

fn erased(subject: &str) -> Value {
    json!({ marker::ERASED: { "subject": subject } })
}

/// The subjects of the `wanted` forms in `value`; an error when `value` holds a form it may not.
fn collect(
    value: &Value,
    wanted: &str,
    subjects: &mut BTreeSet<String>,
) -> Result<(), PrivacyError> {
    if let Some((found, body)) = as_marker(value) {
        let subject = body
            .get("subject")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| PrivacyError::Malformed(format!("{found} without a subject")))?;
        if found == wanted {
            subjects.insert(subject.to_owned());
        } else if wanted == marker::PERSONAL {
            return Err(PrivacyError::Malformed(format!(
                "a document to store holds {found}, which only the store writes"
            )));
        }
        return Ok(());
    }
    match value {
        Value::Array(items) => items.iter().try_for_each(|v| collect(v, wanted, subjects)),
        Value::Object(map) => map.values().try_for_each(|v| collect(v, wanted, subjects)),
        _ => Ok(()),
    }
}

/// Replaces each `wanted` form in `value` by what `f` makes of it (subject, body).
fn rewrite(
    value: &mut Value,
    wanted: &str,
    f: &mut impl FnMut(&str, &serde_json::Map<String, Value>) -> Value,
) {
    if let Some((found, body)) = as_marker(value) {
        if found == wanted {
            let subject = body
                .get("subject")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            *value = f(&subject, body);
        }
        return;
    }
    match value {
        Value::Array(items) => items.iter_mut().for_each(|v| rewrite(v, wanted, f)),
        Value::Object(map) => map.values_mut().for_each(|v| rewrite(v, wanted, f)),
        _ => {}
    }
}

/// The subjects whose data `value` holds, in any form (for the index of who is in which event).
pub fn subjects_in(value: &Value, subjects: &mut BTreeSet<String>) {
    if let Some((_, body)) = as_marker(value) {
        if let Some(subject) = body.get("subject").and_then(Value::as_str) {
            subjects.insert(subject.to_owned());
        }
        return;
    }
    match value {
        Value::Array(items) => items.iter().for_each(|v| subjects_in(v, subjects)),
        Value::Object(map) => map.values().for_each(|v| subjects_in(v, subjects)),
        _ => {}
    }
}
