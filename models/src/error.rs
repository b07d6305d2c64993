//! Errors of the model layer, and which of them are worth another try.

use std::time::Duration;

/// What went wrong calling a model.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    /// The provider did not answer within the configured timeout.
    #[error("the provider did not answer within {} ms", after.as_millis())]
    Timeout {
        /// The timeout that expired.
        after: Duration,
    },
    /// Could not connect, or the connection failed before the reply was complete.
    #[error("connection failed: {0}")]
    Connect(String),
    /// The provider answered with a non-success HTTP status (other than 429).
    #[error("HTTP {status}: {body}")]
    Status {
        /// The HTTP status code.
        status: u16,
        /// The response body, truncated.
        body: String,
    },
    /// The provider answered 429 Too Many Requests.
    #[error("rate limited{}", retry_after.map(|d| format!(" (retry after {} ms)", d.as_millis())).unwrap_or_default())]
    RateLimited {
        /// How long the provider asked us to wait (`Retry-After`), when it said.
        retry_after: Option<Duration>,
    },
    /// The provider reported an error inside a successful (streamed) response.
    #[error("provider error: {0}")]
    Provider(String),
    /// The reply could not be understood (malformed JSON, unexpected shape).
    #[error("could not decode the reply: {0}")]
    Decode(String),
    /// The provider's circuit breaker is open: it failed too often recently and is not called.
    #[error("circuit open for provider `{provider}`")]
    CircuitOpen {
        /// The provider's name.
        provider: String,
    },
    /// No agent role has this name.
    #[error("unknown agent `{0}`")]
    UnknownAgent(String),
    /// No provider has this name.
    #[error("unknown provider `{0}`")]
    UnknownProvider(String),
    /// The agent's route (or the overriding route) has no entry.
    #[error("agent `{0}` has an empty route")]
    EmptyRoute(String),
    /// A scripted model rule asked for this failure.
    #[error("scripted failure: {message}")]
    Scripted {
        /// The rule's message.
        message: String,
        /// Whether the router should retry it (as it would a 5xx).
        retryable: bool,
    },
    /// Every entry of the agent's route failed (or was skipped); `last` is the final error.
    #[error(
        "agent `{agent}`: every provider failed after {attempts} attempt(s); last error: {last}"
    )]
    Exhausted {
        /// The agent role called.
        agent: String,
        /// Attempts made, skips included.
        attempts: usize,
        /// The last error seen.
        last: Box<ModelError>,
    },
    /// The configuration cannot be turned into adapters (e.g. the HTTP client cannot be built).
    #[error("configuration: {0}")]
    Config(String),
}

impl ModelError {
    /// A short, stable name of the kind of error (a trace's `error.type`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Timeout { .. } => "timeout",
            Self::Connect(_) => "connect",
            Self::Status { .. } => "status",
            Self::RateLimited { .. } => "rate_limited",
            Self::Provider(_) => "provider",
            Self::Decode(_) => "decode",
            Self::CircuitOpen { .. } => "circuit_open",
            Self::UnknownAgent(_) => "unknown_agent",
            Self::UnknownProvider(_) => "unknown_provider",
            Self::EmptyRoute(_) => "empty_route",
            Self::Scripted { .. } => "scripted",
            Self::Exhausted { .. } => "exhausted",
            Self::Config(_) => "config",
        }
    }

    /// Whether trying again later may succeed: server errors (5xx, 408), rate limiting,
    /// timeouts, connection failures, an open circuit, and scripted failures marked retryable.
    /// Client errors (4xx) and undecodable replies are not: the same request would fail the same
    /// way. `Exhausted` is retryable when its last error is.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Timeout { .. }
            | Self::Connect(_)
            | Self::RateLimited { .. }
            | Self::Provider(_)
            | Self::CircuitOpen { .. } => true,
            Self::Status { status, .. } => *status >= 500 || *status == 408,
            Self::Scripted { retryable, .. } => *retryable,
            Self::Exhausted { last, .. } => last.is_retryable(),
            Self::Decode(_)
            | Self::UnknownAgent(_)
            | Self::UnknownProvider(_)
            | Self::EmptyRoute(_)
            | Self::Config(_) => false,
        }
    }

    /// Whether the error says the provider is unhealthy, which counts against its circuit
    /// breaker. A 4xx says the request was wrong, not the provider, so it does not count; a
    /// malformed reply does.
    pub fn is_provider_fault(&self) -> bool {
        match self {
            Self::Decode(_) => true,
            Self::CircuitOpen { .. } | Self::Exhausted { .. } => false,
            other => other.is_retryable(),
        }
    }

    /// The error at the bottom: the last error of an `Exhausted`, or `self`.
    pub fn root(&self) -> &ModelError {
        match self {
            Self::Exhausted { last, .. } => last.root(),
            other => other,
        }
    }

    /// How long the provider asked us to wait before the next request, when it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after } => *retry_after,
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_are_retried_and_client_errors_are_not() {
        let status = |status| ModelError::Status {
            status,
            body: String::new(),
        };
        assert!(status(500).is_retryable());
        assert!(status(503).is_retryable());
        assert!(status(408).is_retryable());
        assert!(!status(400).is_retryable());
        assert!(!status(404).is_retryable());
        assert!(ModelError::RateLimited { retry_after: None }.is_retryable());
        assert!(ModelError::Timeout {
            after: Duration::from_millis(1)
        }
        .is_retryable());
        assert!(ModelError::Connect("refused".into()).is_retryable());
        assert!(!ModelError::Decode("eof".into()).is_retryable());
        assert!(ModelError::Decode("eof".into()).is_provider_fault());
        assert!(!status(400).is_provider_fault());
    }

    #[test]
    fn exhausted_follows_its_last_error() {
        let exhausted = |last| ModelError::Exhausted {
            agent: "coder".into(),
            attempts: 3,
            last: Box::new(last),
        };
        assert!(exhausted(ModelError::Connect("x".into())).is_retryable());
        let client = ModelError::Status {
            status: 401,
            body: "no".into(),
        };
        assert!(!exhausted(client.clone()).is_retryable());
        assert_eq!(exhausted(client.clone()).root(), &client);
    }
}
