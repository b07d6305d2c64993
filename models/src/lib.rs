//! The model layer: how Stele talks to language models.
//!
//! - [`ChatModel`] is the port: one chat completion, plain or streamed.
//! - [`EmbeddingModel`] is the embedding port; [`embed`] has its adapters (local models on
//!   candle or libtorch, OpenAI-compatible servers) and [`load_embedding_model`].
//! - [`openai`] adapts any OpenAI-compatible server; [`scripted`] is a deterministic offline
//!   model for tests, demos and benchmarks.
//! - [`config`] reads providers and agent roles from TOML (`agents.toml`) and the environment.
//! - [`router`] calls an agent role through its fallback chain, with retries and a
//!   [`circuit`] breaker per provider, and returns every attempt as a [`ModelCall`] for the
//!   event log.
//! - [`clock`] lets tests move time instead of waiting.

// Enforced by `cargo clippy -- -D warnings`: this is a port other crates build on.
#![warn(missing_docs)]

pub mod circuit;
pub mod clock;
pub mod config;
pub mod embed;
mod error;
pub mod openai;
pub mod router;
pub mod scripted;
mod types;

use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};

pub use circuit::CircuitState;
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{
    AgentRole, CircuitConfig, ConfigError, ModelRoute, ModelsConfig, OpenAiConfig, ProviderConfig,
    RetryConfig, ScriptRule, ScriptedConfig,
};
#[cfg(any(feature = "candle", feature = "tch"))]
pub use embed::LocalEmbeddingModel;
pub use embed::{load_embedding_model, EmbeddingError, EmbeddingModel, OpenAiEmbeddingModel};
pub use error::ModelError;
pub use openai::OpenAiModel;
pub use router::{
    AgentReply, CallOverrides, ModelRouter, ModelRouterBuilder, Overview, ProviderOverview,
    RoleOverview,
};
pub use scripted::ScriptedModel;
pub use types::{
    ChatChunk, ChatMessage, ChatRequest, ChatResponse, ModelCall, Role, ToolCall, ToolSpec, Usage,
};

/// A chat model: the port every provider adapter implements.
#[async_trait]
pub trait ChatModel: Send + Sync {
    /// The provider's name in the configuration (for logs and [`ModelCall`]s).
    fn provider(&self) -> &str;

    /// Sends `request` and waits for the whole reply.
    async fn complete(&self, request: ChatRequest) -> Result<ChatResponse, ModelError>;

    /// Sends `request` and streams the reply. Errors before the first chunk (connection,
    /// status) come as `Err` here; later ones as an `Err` item, which ends the stream. The last
    /// item of a successful stream is [`ChatChunk::Done`] with the assembled response (content,
    /// tool calls, usage).
    async fn stream(
        &self,
        request: ChatRequest,
    ) -> Result<BoxStream<'static, Result<ChatChunk, ModelError>>, ModelError>;
}

/// Drains a stream from [`ChatModel::stream`] and returns its final response.
pub async fn collect_stream(
    mut stream: BoxStream<'static, Result<ChatChunk, ModelError>>,
) -> Result<ChatResponse, ModelError> {
    while let Some(chunk) = stream.next().await {
        if let ChatChunk::Done(response) = chunk? {
            return Ok(response);
        }
    }
    Err(ModelError::Connect(
        "the stream ended without a final response".to_owned(),
    ))
}
