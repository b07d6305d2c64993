//! The adapter for OpenAI-compatible chat servers (OpenAI, Ollama, vLLM, llama.cpp server, …):
//! `POST {base_url}/chat/completions`, plain or streamed as server-sent events.
//!
//! The wire structs here are private: they follow the provider's JSON, and map to and from the
//! port's types at this edge only.

use std::collections::VecDeque;
use std::error::Error as _;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures::stream::{self, BoxStream, Stream, StreamExt};
use reqwest::header::{HeaderMap, ACCEPT, RETRY_AFTER};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::{ApiKey, OpenAiConfig};
use crate::{
    ChatChunk, ChatMessage, ChatModel, ChatRequest, ChatResponse, ModelError, Role, ToolCall, Usage,
};

/// How much of an error body is kept in [`ModelError::Status`]: enough to read the provider's
/// message, not so much that one bad reply bloats the event log.
const ERROR_BODY_LIMIT: usize = 2_000;

/// A client of one OpenAI-compatible server.
#[derive(Debug, Clone)]
pub struct OpenAiModel {
    provider: String,
    endpoint: String,
    api_key: Option<ApiKey>,
    timeout: Duration,
    client: reqwest::Client,
}

impl OpenAiModel {
    /// A client for the provider `provider` configured by `config`.
    pub fn new(provider: impl Into<String>, config: &OpenAiConfig) -> Result<Self, ModelError> {
        let timeout = config.timeout();
        let client = reqwest::Client::builder()
            .connect_timeout(timeout)
            .build()
            .map_err(|error| ModelError::Config(format!("HTTP client: {}", chain(&error))))?;
        Ok(Self {
            provider: provider.into(),
            endpoint: format!("{}/chat/completions", config.base_url.trim_end_matches('/')),
            api_key: config.api_key.clone(),
            timeout,
            client,
        })
    }

    fn post(&self, body: &WireRequest<'_>) -> reqwest::RequestBuilder {
        let builder = self.client.post(&self.endpoint).json(body);
        match &self.api_key {
            Some(key) => builder.bearer_auth(key.expose()),
            None => builder,
        }
    }
}

#[async_trait]
impl ChatModel for OpenAiModel {
    fn provider(&self) -> &str {
        &self.provider
    }

    async fn complete(&self, request: ChatRequest) -> Result<ChatResponse, ModelError> {
        let body = WireRequest::new(&request, false);
        // reqwest's request timeout runs until the body is read, so it bounds the whole call.
        let response = self
            .post(&body)
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|error| transport_error(&error, self.timeout))?;
        if !response.status().is_success() {
            return Err(status_error(response).await);
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|error| transport_error(&error, self.timeout))?;
        let reply: WireResponse = serde_json::from_slice(&bytes).map_err(|error| {
            ModelError::Decode(format!(
                "{error} in {}",
                truncate(String::from_utf8_lossy(&bytes).into_owned())
            ))
        })?;
        reply.into_response(&request.model)
    }

    async fn stream(
        &self,
        request: ChatRequest,
    ) -> Result<BoxStream<'static, Result<ChatChunk, ModelError>>, ModelError> {
        let body = WireRequest::new(&request, true);
        // No request timeout here: it would cut long generations. The timeout bounds the wait
        // for the headers, then each wait for the next event.
        let send = self.post(&body).header(ACCEPT, "text/event-stream").send();
        let response = tokio::time::timeout(self.timeout, send)
            .await
            .map_err(|_| ModelError::Timeout {
                after: self.timeout,
            })?
            .map_err(|error| transport_error(&error, self.timeout))?;
        if !response.status().is_success() {
            return Err(status_error(response).await);
        }
        let state = StreamState {
            events: Box::pin(response.bytes_stream().eventsource()),
            assembler: Assembler::new(request.model),
            pending: VecDeque::new(),
            finished: false,
            idle_timeout: self.timeout,
        };
        Ok(Box::pin(stream::unfold(state, StreamState::next)))
    }
}

type EventStream =
    Pin<Box<dyn Stream<Item = Result<Event, EventStreamError<reqwest::Error>>> + Send>>;

struct StreamState {
    events: EventStream,
    assembler: Assembler,
    /// Chunks decoded from one event and not yet handed out.
    pending: VecDeque<ChatChunk>,
    finished: bool,
    idle_timeout: Duration,
}

impl StreamState {
    /// The next chunk, for `stream::unfold`. After an error or `Done`, the stream ends.
    async fn next(mut self) -> Option<(Result<ChatChunk, ModelError>, Self)> {
        loop {
            if let Some(chunk) = self.pending.pop_front() {
                return Some((Ok(chunk), self));
            }
            if self.finished {
                return None;
            }
            let event = match tokio::time::timeout(self.idle_timeout, self.events.next()).await {
                Err(_) => Err(ModelError::Timeout {
                    after: self.idle_timeout,
                }),
                Ok(None) if self.assembler.finish_reason.is_some() => {
                    // Some servers close the stream after the last choice without `[DONE]`;
                    // the finish reason says the reply was complete.
                    self.finish();
                    continue;
                }
                Ok(None) => Err(ModelError::Connect(
                    "the stream ended before [DONE]".to_owned(),
                )),
                Ok(Some(Err(EventStreamError::Transport(error)))) => {
                    Err(ModelError::Connect(chain(&error)))
                }
                Ok(Some(Err(error))) => Err(ModelError::Decode(error.to_string())),
                Ok(Some(Ok(event))) => Ok(event),
            };
            let outcome = event.and_then(|event| self.take(&event.data));
            if let Err(error) = outcome {
                self.finished = true;
                return Some((Err(error), self));
            }
        }
    }

    /// Decodes one event's data into pending chunks.
    fn take(&mut self, data: &str) -> Result<(), ModelError> {
        let data = data.trim();
        if data.is_empty() {
            return Ok(());
        }
        if data == "[DONE]" {
            self.finish();
            return Ok(());
        }
        let chunk: WireChunk = serde_json::from_str(data)
            .map_err(|error| ModelError::Decode(format!("{error} in {}", truncate(data.into()))))?;
        if let Some(error) = chunk.error {
            return Err(ModelError::Provider(truncate(error.to_string())));
        }
        self.pending.extend(self.assembler.apply(chunk));
        Ok(())
    }

    fn finish(&mut self) {
        self.finished = true;
        let assembler = std::mem::replace(&mut self.assembler, Assembler::new(String::new()));
        self.pending.push_back(ChatChunk::Done(assembler.finish()));
    }
}

/// Builds the reply from stream chunks: content in order, tool calls by index with their
/// argument fragments concatenated and parsed once complete.
struct Assembler {
    model: String,
    content: String,
    tool_calls: Vec<PartialToolCall>,
    usage: Usage,
    finish_reason: Option<String>,
}

#[derive(Default)]
struct PartialToolCall {
    id: Option<String>,
    name: String,
    arguments: String,
}

impl Assembler {
    fn new(model: String) -> Self {
        Self {
            model,
            content: String::new(),
            tool_calls: Vec::new(),
            usage: Usage::default(),
            finish_reason: None,
        }
    }

    fn apply(&mut self, chunk: WireChunk) -> Vec<ChatChunk> {
        let mut out = Vec::new();
        if let Some(model) = chunk.model.filter(|model| !model.is_empty()) {
            self.model = model;
        }
        if let Some(usage) = chunk.usage {
            self.usage = usage.into();
        }
        // Only the first choice is used: requests never ask for more than one (`n`).
        if let Some(choice) = chunk.choices.into_iter().next() {
            if let Some(text) = choice.delta.content.filter(|text| !text.is_empty()) {
                self.content.push_str(&text);
                out.push(ChatChunk::Delta(text));
            }
            for delta in choice.delta.tool_calls {
                let index = self.index_of(&delta);
                if self.tool_calls.len() <= index {
                    self.tool_calls
                        .resize_with(index + 1, PartialToolCall::default);
                }
                let call = &mut self.tool_calls[index];
                let function = delta.function.unwrap_or_default();
                if delta.id.is_some() {
                    call.id.clone_from(&delta.id);
                }
                // OpenAI sends the name once; some servers repeat it on every fragment.
                if let Some(name) = function.name.as_ref().filter(|name| **name != call.name) {
                    call.name.push_str(name);
                }
                let arguments = function.arguments.unwrap_or_default();
                call.arguments.push_str(&arguments);
                out.push(ChatChunk::ToolCallDelta {
                    index,
                    id: delta.id,
                    name: function.name,
                    arguments,
                });
            }
            if choice.finish_reason.is_some() {
                self.finish_reason = choice.finish_reason;
            }
        }
        out
    }

    /// The call a fragment belongs to. Servers that omit `index` send each call whole, or
    /// continue the last one without an id.
    fn index_of(&self, delta: &WireToolCallDelta) -> usize {
        match (delta.index, &delta.id) {
            (Some(index), _) => index,
            (None, Some(id)) if self.tool_calls.iter().all(|c| c.id.as_ref() != Some(id)) => {
                self.tool_calls.len()
            }
            (None, _) => self.tool_calls.len().saturating_sub(1),
        }
    }

    fn finish(self) -> ChatResponse {
        ChatResponse {
            content: self.content,
            tool_calls: self
                .tool_calls
                .into_iter()
                .enumerate()
                .map(|(index, call)| ToolCall {
                    id: call.id.unwrap_or_else(|| format!("call_{index}")),
                    name: call.name,
                    arguments: parse_arguments(Value::String(call.arguments)),
                })
                .collect(),
            usage: self.usage,
            finish_reason: self.finish_reason,
            model: self.model,
        }
    }
}

/// Arguments arrive as JSON text (some servers send an object). Empty text means no arguments;
/// text that does not parse is kept as a string (see [`ToolCall::arguments`]).
fn parse_arguments(arguments: Value) -> Value {
    match arguments {
        Value::String(text) if text.trim().is_empty() => json!({}),
        Value::String(text) => serde_json::from_str(&text).unwrap_or(Value::String(text)),
        Value::Null => json!({}),
        other => other,
    }
}

/// `Retry-After` in seconds (whole or fractional). The HTTP-date form is rare from model APIs
/// and is treated as absent: the backoff applies instead.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds: f64 = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Duration::try_from_secs_f64(seconds).ok()
}

pub(crate) fn truncate(mut text: String) -> String {
    if text.len() > ERROR_BODY_LIMIT {
        let mut end = ERROR_BODY_LIMIT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// A failed send or body read: a timeout when reqwest's timeout expired, else a connection
/// failure.
pub(crate) fn transport_error(error: &reqwest::Error, timeout: Duration) -> ModelError {
    if error.is_timeout() {
        ModelError::Timeout { after: timeout }
    } else {
        ModelError::Connect(chain(error))
    }
}

/// Turns a non-success response into the error it stands for.
pub(crate) async fn status_error(response: reqwest::Response) -> ModelError {
    let status = response.status().as_u16();
    if status == 429 {
        return ModelError::RateLimited {
            retry_after: retry_after(response.headers()),
        };
    }
    let body = match response.text().await {
        Ok(body) => truncate(body),
        Err(error) => format!("(body unreadable: {})", chain(&error)),
    };
    ModelError::Status { status, body }
}

/// An error and its sources on one line: reqwest's own message ("error sending request") says
/// little without them.
pub(crate) fn chain(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

// ---- wire types (OpenAI chat completions JSON) ----

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: Vec<WireMessage<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<Value>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<Value>,
}

impl<'a> WireRequest<'a> {
    fn new(request: &'a ChatRequest, stream: bool) -> Self {
        Self {
            model: &request.model,
            messages: request.messages.iter().map(WireMessage::from).collect(),
            tools: request
                .tools
                .iter()
                .map(|tool| {
                    json!({
                        "type": "function",
                        "function": {
                            "name": tool.name,
                            "description": tool.description,
                            "parameters": tool.parameters,
                        }
                    })
                })
                .collect(),
            temperature: request.temperature,
            max_tokens: request.max_tokens,
            response_format: request.output_schema.as_ref().map(|schema| {
                json!({
                    "type": "json_schema",
                    "json_schema": { "name": "output", "schema": schema }
                })
            }),
            stream,
            stream_options: stream.then(|| json!({ "include_usage": true })),
        }
    }
}

#[derive(Serialize)]
struct WireMessage<'a> {
    role: Role,
    /// `null` for an assistant message that only calls tools, as the API expects.
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<&'a str>,
}

impl<'a> From<&'a ChatMessage> for WireMessage<'a> {
    fn from(message: &'a ChatMessage) -> Self {
        let only_tools = message.role == Role::Assistant
            && message.content.is_empty()
            && !message.tool_calls.is_empty();
        Self {
            role: message.role,
            content: (!only_tools).then_some(message.content.as_str()),
            tool_calls: message
                .tool_calls
                .iter()
                .map(|call| {
                    // Arguments that were not valid JSON are sent back as the model wrote them.
                    let arguments = match &call.arguments {
                        Value::String(raw) => raw.clone(),
                        other => other.to_string(),
                    };
                    json!({
                        "id": call.id,
                        "type": "function",
                        "function": { "name": call.name, "arguments": arguments }
                    })
                })
                .collect(),
            tool_call_id: message.tool_call_id.as_deref(),
        }
    }
}

#[derive(Deserialize)]
struct WireResponse {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Vec<WireChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

impl WireResponse {
    fn into_response(self, requested_model: &str) -> Result<ChatResponse, ModelError> {
        let choice = self
            .choices
            .into_iter()
            .next()
            .ok_or_else(|| ModelError::Decode("the reply has no choices".to_owned()))?;
        Ok(ChatResponse {
            content: choice.message.content.unwrap_or_default(),
            tool_calls: choice
                .message
                .tool_calls
                .into_iter()
                .enumerate()
                .map(|(index, call)| ToolCall {
                    id: call.id.unwrap_or_else(|| format!("call_{index}")),
                    name: call.function.name,
                    arguments: parse_arguments(call.function.arguments.unwrap_or(Value::Null)),
                })
                .collect(),
            usage: self.usage.map(Usage::from).unwrap_or_default(),
            finish_reason: choice.finish_reason,
            model: self
                .model
                .filter(|model| !model.is_empty())
                .unwrap_or_else(|| requested_model.to_owned()),
        })
    }
}

#[derive(Deserialize)]
struct WireChoice {
    message: WireReplyMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireReplyMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Vec<WireToolCall>,
}

#[derive(Deserialize)]
struct WireToolCall {
    #[serde(default)]
    id: Option<String>,
    function: WireFunction,
}

#[derive(Deserialize)]
struct WireFunction {
    name: String,
    #[serde(default)]
    arguments: Option<Value>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
}

impl From<WireUsage> for Usage {
    fn from(usage: WireUsage) -> Self {
        Self {
            input_tokens: usage.prompt_tokens,
            output_tokens: usage.completion_tokens,
        }
    }
}

#[derive(Deserialize)]
struct WireChunk {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Vec<WireChunkChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct WireChunkChoice {
    #[serde(default)]
    delta: WireDelta,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct WireDelta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Vec<WireToolCallDelta>,
}

#[derive(Deserialize)]
struct WireToolCallDelta {
    #[serde(default)]
    index: Option<usize>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<WireFunctionDelta>,
}

#[derive(Deserialize, Default)]
struct WireFunctionDelta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(value: Value) -> WireChunk {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn tool_call_fragments_assemble_by_index() {
        let mut assembler = Assembler::new("m".into());
        assembler.apply(chunk(json!({"choices": [{"delta": {"tool_calls": [
            {"index": 0, "id": "a", "function": {"name": "search", "arguments": "{\"q\":"}},
            {"index": 1, "id": "b", "function": {"name": "open", "arguments": ""}}
        ]}}]})));
        assembler.apply(chunk(json!({"choices": [{"delta": {"tool_calls": [
            {"index": 1, "function": {"arguments": "{\"path\":\"/x\"}"}},
            {"index": 0, "function": {"arguments": "\"rust\"}"}}
        ]}, "finish_reason": "tool_calls"}]})));
        assembler.apply(chunk(
            json!({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}),
        ));
        let response = assembler.finish();
        assert_eq!(response.tool_calls[0].arguments, json!({"q": "rust"}));
        assert_eq!(response.tool_calls[1].arguments, json!({"path": "/x"}));
        assert_eq!(response.tool_calls[1].id, "b");
        assert_eq!(response.usage.output_tokens, 4);
        assert_eq!(response.finish_reason.as_deref(), Some("tool_calls"));
    }

    #[test]
    fn broken_arguments_are_kept_as_text() {
        assert_eq!(parse_arguments(json!("{oops")), json!("{oops"));
        assert_eq!(parse_arguments(json!("")), json!({}));
        assert_eq!(parse_arguments(json!({"a": 1})), json!({"a": 1}));
    }
}
