//! `Personal<T>`: a value that belongs to a person, declared as such in the event types.
//!
//! Every field of an event that holds a person's data (message text, names, addresses, a task's
//! input, model prompts and outputs built from them) has the type `Personal<T>`, so a field cannot
//! be stored in the clear by forgetting to encrypt it: building one needs the subject it belongs
//! to ([`Personal::of`]), or an explicit [`Personal::plain`] for data no person gave.
//!
//! The aggregates stay pure: they see readable values. Sealing and opening happen at the store's
//! edge (`stele-privacy`), on the JSON forms below, which this module defines once:
//!
//! | state | JSON |
//! |---|---|
//! | readable, of a subject | `{"$personal": {"subject": "<id>", "value": <T>}}` (never stored) |
//! | sealed with the subject's data key | `{"$sealed": {"subject": "<id>", "data": "<base64>"}}` |
//! | erased (the key was destroyed) | `{"$erased": {"subject": "<id>"}}` |
//! | not a person's | `<T>` as it is (also what events written before encryption hold) |
//!
//! ```
//! use stele_aggregates::personal::Personal;
//!
//! let text = Personal::of("s-1", "hello".to_owned());
//! let json = serde_json::to_value(&text).unwrap();
//! assert_eq!(json, serde_json::json!({"$personal": {"subject": "s-1", "value": "hello"}}));
//! assert_eq!(serde_json::from_value::<Personal<String>>(json).unwrap(), text);
//!
//! let erased: Personal<String> =
//!     serde_json::from_value(serde_json::json!({"$erased": {"subject": "s-1"}})).unwrap();
//! assert_eq!(erased.text(), "[erased]");
//! ```

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{json, Map, Value};

/// What an erased value reads as.
pub const ERASED: &str = "[erased]";
/// What a value reads as where it is still sealed (read without the key store).
pub const SEALED: &str = "[sealed]";

/// The JSON keys of the forms in the module's table.
pub mod marker {
    pub const PERSONAL: &str = "$personal";
    pub const SEALED: &str = "$sealed";
    pub const ERASED: &str = "$erased";
}

/// A value that belongs to a person (see the module's documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Personal<T> {
    /// Readable. `subject` is the person it belongs to; `None` for data no person gave.
    Open { subject: Option<String>, value: T },
    /// As stored: sealed with the subject's data key.
    Sealed { subject: String, data: String },
    /// The subject was erased: the value is gone for good.
    Erased { subject: String },
}

impl<T> Personal<T> {
    /// `value`, belonging to `subject`.
    pub fn of(subject: impl Into<String>, value: T) -> Personal<T> {
        Personal::Open {
            subject: Some(subject.into()),
            value,
        }
    }

    /// `value`, belonging to `subject` if there is one (a run started by a person's task, or by
    /// the system).
    pub fn owned_by(subject: Option<&str>, value: T) -> Personal<T> {
        Personal::Open {
            subject: subject.map(str::to_owned),
            value,
        }
    }

    /// A value no person gave (stored as it is).
    pub fn plain(value: T) -> Personal<T> {
        Personal::Open {
            subject: None,
            value,
        }
    }

    /// The value, if it can be read.
    pub fn get(&self) -> Option<&T> {
        match self {
            Personal::Open { value, .. } => Some(value),
            _ => None,
        }
    }

    /// The value, if it can be read.
    pub fn into_value(self) -> Option<T> {
        match self {
            Personal::Open { value, .. } => Some(value),
            _ => None,
        }
    }

    /// Whom the value belongs to.
    pub fn subject(&self) -> Option<&str> {
        match self {
            Personal::Open { subject, .. } => subject.as_deref(),
            Personal::Sealed { subject, .. } | Personal::Erased { subject } => Some(subject),
        }
    }

    /// What the value reads as where it cannot be read: `[erased]` or `[sealed]`.
    fn placeholder(&self) -> &'static str {
        match self {
            Personal::Sealed { .. } => SEALED,
            _ => ERASED,
        }
    }
}

impl Personal<String> {
    /// The text, or `[erased]` / `[sealed]`.
    pub fn text(&self) -> &str {
        self.get()
            .map_or_else(|| self.placeholder(), String::as_str)
    }
}

impl Personal<Value> {
    /// The value, or the string `[erased]` / `[sealed]`.
    pub fn json(&self) -> Value {
        self.get()
            .cloned()
            .unwrap_or_else(|| Value::String(self.placeholder().to_owned()))
    }
}

impl<T: Default> Personal<T> {
    /// The value, or `T`'s default where it cannot be read (its type preserved).
    pub fn value_or_default(&self) -> T
    where
        T: Clone,
    {
        self.get().cloned().unwrap_or_default()
    }
}

impl<T: Default> Default for Personal<T> {
    fn default() -> Self {
        Personal::plain(T::default())
    }
}

impl<T: Serialize> Serialize for Personal<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Personal::Open {
                subject: None,
                value,
            } => value.serialize(serializer),
            Personal::Open {
                subject: Some(subject),
                value,
            } => {
                let value = serde_json::to_value(value).map_err(serde::ser::Error::custom)?;
                json!({ marker::PERSONAL: { "subject": subject, "value": value } })
                    .serialize(serializer)
            }
            Personal::Sealed { subject, data } => {
                json!({ marker::SEALED: { "subject": subject, "data": data } })
                    .serialize(serializer)
            }
            Personal::Erased { subject } => {
                json!({ marker::ERASED: { "subject": subject } }).serialize(serializer)
            }
        }
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Personal<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        let Some((marker, body)) = as_marker(&value) else {
            return T::deserialize(value)
                .map(Personal::plain)
                .map_err(D::Error::custom);
        };
        let field = |name: &str| {
            body.get(name)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| D::Error::custom(format!("{marker} needs a string {name:?}")))
        };
        let subject = field("subject")?;
        match marker {
            marker::PERSONAL => {
                let value = body
                    .get("value")
                    .cloned()
                    .ok_or_else(|| D::Error::custom("$personal needs a value"))?;
                Ok(Personal::Open {
                    subject: Some(subject),
                    value: T::deserialize(value).map_err(D::Error::custom)?,
                })
            }
            marker::SEALED => Ok(Personal::Sealed {
                subject,
                data: field("data")?,
            }),
            _ => Ok(Personal::Erased { subject }),
        }
    }
}

/// The marker and its body, when `value` is one of the marked forms (an object with exactly one
/// key, a marker, whose value is an object).
pub fn as_marker(value: &Value) -> Option<(&'static str, &Map<String, Value>)> {
    let Value::Object(map) = value else {
        return None;
    };
    if map.len() != 1 {
        return None;
    }
    let (key, body) = map.iter().next()?;
    let marker = [marker::PERSONAL, marker::SEALED, marker::ERASED]
        .into_iter()
        .find(|m| m == key)?;
    Some((marker, body.as_object()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_values_are_stored_as_they_are_and_old_events_read_as_plain() {
        let plain = Personal::plain("hi".to_owned());
        assert_eq!(serde_json::to_value(&plain).unwrap(), json!("hi"));
        let read: Personal<String> = serde_json::from_value(json!("hi")).unwrap();
        assert_eq!(read, plain);
    }

    #[test]
    fn every_form_round_trips() {
        for personal in [
            Personal::of("s", json!({"a": [1, 2]})),
            Personal::Sealed {
                subject: "s".into(),
                data: "AAAA".into(),
            },
            Personal::Erased {
                subject: "s".into(),
            },
            Personal::plain(json!({"$other": {}})),
        ] {
            let json = serde_json::to_value(&personal).unwrap();
            assert_eq!(
                serde_json::from_value::<Personal<Value>>(json).unwrap(),
                personal
            );
        }
    }

    #[test]
    fn unreadable_values_keep_their_type() {
        let erased: Personal<String> = Personal::Erased {
            subject: "s".into(),
        };
        assert_eq!(erased.text(), ERASED);
        let sealed: Personal<Value> = Personal::Sealed {
            subject: "s".into(),
            data: "x".into(),
        };
        assert_eq!(sealed.json(), json!(SEALED));
        let count: Personal<u32> = Personal::Erased {
            subject: "s".into(),
        };
        assert_eq!(count.value_or_default(), 0);
    }

    #[test]
    fn a_malformed_marker_is_an_error() {
        assert!(serde_json::from_value::<Personal<String>>(json!({"$sealed": {}})).is_err());
    }
}
