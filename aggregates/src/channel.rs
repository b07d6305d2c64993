//! The channel something came through (`telegram`, `email`, `api`, `cli`, …): for conversations,
//! and for who asked for a task.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The channel a conversation happens on: `telegram`, `email`, `api`, …
///
/// A string newtype rather than an enum with an `Other(String)` variant: the set of channels is open
/// (a new adapter must not need a change here, nor a migration of stored events), and an enum with
/// `Other` has two spellings of one channel (`Telegram` and `Other("telegram")`) that compare
/// unequal. [`Channel::parse`] is the only way in, so each channel has one spelling: lowercase
/// ASCII letters, digits, `-` and `_`, starting with a letter, at most 32 bytes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Channel(Cow<'static, str>);

impl Channel {
    /// Telegram chats.
    pub const TELEGRAM: Channel = Channel(Cow::Borrowed("telegram"));
    /// Email threads.
    pub const EMAIL: Channel = Channel(Cow::Borrowed("email"));
    /// Stele's own HTTP API.
    pub const API: Channel = Channel(Cow::Borrowed("api"));
    /// Stele's command line.
    pub const CLI: Channel = Channel(Cow::Borrowed("cli"));
    /// The longest channel name, in bytes.
    pub const MAX_LEN: usize = 32;

    /// Parses a channel name, trimmed and lowercased: `" Telegram "` is [`Channel::TELEGRAM`].
    pub fn parse(name: &str) -> Result<Channel, InvalidChannel> {
        let normalized = name.trim().to_ascii_lowercase();
        let well_formed = normalized.len() <= Self::MAX_LEN
            && normalized.starts_with(|c: char| c.is_ascii_lowercase())
            && normalized
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if well_formed {
            Ok(Channel(Cow::Owned(normalized)))
        } else {
            Err(InvalidChannel(name.to_owned()))
        }
    }

    /// The channel's name, as stored.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Channel {
    type Error = InvalidChannel;

    fn try_from(name: String) -> Result<Self, Self::Error> {
        Channel::parse(&name)
    }
}

impl From<Channel> for String {
    fn from(channel: Channel) -> String {
        channel.0.into_owned()
    }
}

/// A string that is not a channel name (see [`Channel`]).
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a channel name: 1 to 32 of a-z, 0-9, '-' and '_', starting with a letter")]
pub struct InvalidChannel(pub String);
