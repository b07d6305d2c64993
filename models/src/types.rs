//! The values that cross the model port: messages, tool specifications and calls, requests,
//! responses, stream chunks, and the [`ModelCall`] record of one attempt.
//!
//! These are domain types, not wire types: each adapter maps them to its provider's format
//! (see `openai.rs` for the OpenAI-compatible JSON).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Who wrote a message of a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions for the model (an agent role's system prompt).
    System,
    /// The person (or the workflow acting for them).
    User,
    /// The model.
    Assistant,
    /// The result of a tool call, answering the assistant message that asked for it.
    Tool,
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who wrote it.
    pub role: Role,
    /// Its text (may be empty for an assistant message that only calls tools).
    pub content: String,
    /// Tools the assistant asked to call (assistant messages only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// The id of the tool call this message answers (tool messages only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }

    /// A system message (instructions).
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    /// An assistant message with text only.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }

    /// An assistant message that calls tools (what a model returned, fed back into the conversation).
    pub fn assistant_with_tools(content: impl Into<String>, tool_calls: Vec<ToolCall>) -> Self {
        Self {
            tool_calls,
            ..Self::new(Role::Assistant, content)
        }
    }

    /// The result of the tool call `tool_call_id`.
    pub fn tool(tool_call_id: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            tool_call_id: Some(tool_call_id.into()),
            ..Self::new(Role::Tool, content)
        }
    }
}

/// A tool the model may call: its name, what it does, and a JSON schema of its arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    /// The name the model uses to call it.
    pub name: String,
    /// What it does, for the model.
    pub description: String,
    /// JSON schema of the arguments object.
    pub parameters: Value,
}

/// A tool call the model asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The provider's id for this call; a tool message answers it with the same id.
    pub id: String,
    /// The tool's name.
    pub name: String,
    /// The arguments. A JSON value when the model produced valid JSON; otherwise the raw text as
    /// a JSON string, so that the tool layer can reject it and tell the model (models do emit
    /// broken JSON, and failing the whole call for it would waste the rest of the reply).
    pub arguments: Value,
}

/// One request to a chat model.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ChatRequest {
    /// The provider's model name (e.g. `gpt-4o-mini`, `llama3.1:8b`).
    pub model: String,
    /// The conversation, system prompt first.
    pub messages: Vec<ChatMessage>,
    /// Tools offered to the model.
    #[serde(default)]
    pub tools: Vec<ToolSpec>,
    /// Sampling temperature; the provider's default when `None`.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Upper bound on generated tokens; the provider's default when `None`.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// A JSON schema the reply's content must follow (structured output).
    #[serde(default)]
    pub output_schema: Option<Value>,
    /// The agent role making the call. Not sent to HTTP providers; the scripted model matches
    /// its rules on it, and adapters may log it.
    #[serde(default)]
    pub agent: Option<String>,
}

impl ChatRequest {
    /// A request for `model` with `messages` and nothing else set.
    pub fn new(model: impl Into<String>, messages: Vec<ChatMessage>) -> Self {
        Self {
            model: model.into(),
            messages,
            ..Self::default()
        }
    }

    /// The content of the last user message, or `""` when there is none.
    pub fn last_user_message(&self) -> &str {
        self.messages
            .iter()
            .rev()
            .find(|message| message.role == Role::User)
            .map_or("", |message| message.content.as_str())
    }
}

/// Tokens counted by the provider for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens.
    pub input_tokens: u32,
    /// Generated tokens.
    pub output_tokens: u32,
}

/// A model's complete reply.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ChatResponse {
    /// The text of the reply (the JSON document when an output schema was requested).
    pub content: String,
    /// Tools the model asked to call.
    #[serde(default)]
    pub tool_calls: Vec<ToolCall>,
    /// Token counts (zero when the provider did not report them).
    #[serde(default)]
    pub usage: Usage,
    /// Why generation stopped (`stop`, `length`, `tool_calls`, …), as reported by the provider.
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// The model that answered, as reported by the provider (or the requested one).
    pub model: String,
}

/// One item of a streamed reply.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatChunk {
    /// A fragment of the reply's text.
    Delta(String),
    /// A fragment of a tool call. Fragments with the same `index` belong to the same call; `id`
    /// and `name` come once, `arguments` is a piece of the JSON text. The assembled calls are in
    /// the final [`ChatChunk::Done`].
    ToolCallDelta {
        /// Position of the call in the reply.
        index: usize,
        /// The call's id, on the fragment that carries it.
        id: Option<String>,
        /// The tool's name, on the fragment that carries it.
        name: Option<String>,
        /// A piece of the arguments' JSON text.
        arguments: String,
    },
    /// The last item: the assembled reply (content, tool calls, usage).
    Done(ChatResponse),
}

/// One attempt at one provider, as the workflow runtime records it in the event log.
///
/// The router returns one per attempt, failed ones and circuit-open skips included, so a run's
/// history shows every call that was made (or not made) on its behalf.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCall {
    /// The agent role that made the call (the escalated role when the call was escalated).
    pub agent: String,
    /// The provider's name in the configuration.
    pub provider: String,
    /// The model asked for.
    pub model: String,
    /// The messages sent, system prompt included.
    pub messages: Vec<ChatMessage>,
    /// The reply's text, when the attempt succeeded.
    pub output: Option<String>,
    /// The tool calls of the reply, when the attempt succeeded.
    #[serde(default)]
    pub tool_calls: Vec<ToolCall>,
    /// Prompt tokens reported.
    pub input_tokens: u32,
    /// Generated tokens reported.
    pub output_tokens: u32,
    /// Wall time of the attempt (zero for a skip).
    pub latency_ms: u64,
    /// Why the attempt failed or was skipped.
    pub error: Option<String>,
    /// Position of the provider in the route: 0 is the primary, 1 the first fallback, …
    pub fallback_index: usize,
    /// Attempt number at this provider, from 1.
    pub attempt: u32,
}

impl ModelCall {
    /// Whether this attempt produced the reply.
    pub fn succeeded(&self) -> bool {
        self.error.is_none()
    }
}
