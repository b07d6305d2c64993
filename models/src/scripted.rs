//! The scripted model: deterministic, offline and instant. It answers from the rules of its
//! configuration, so workflows can run (in tests, demos and benchmarks) without a model server.
//!
//! The first rule whose conditions all hold answers (see [`ScriptRule`]). Without one, an agent
//! with an output schema gets the smallest JSON value that satisfies the schema, and any other
//! call gets `"[{model}] {last user message}"`. Token counts are word counts.

use std::sync::atomic::{AtomicU32, Ordering};

use async_trait::async_trait;
use futures::stream::{self, BoxStream};
use serde_json::{Map, Value};

use crate::config::{ScriptRule, ScriptedConfig};
use crate::{ChatChunk, ChatModel, ChatRequest, ChatResponse, ModelError, ToolCall, Usage};

/// The scripted model of one provider. Rule counters (`times`) are kept per instance, so a
/// router built afresh starts the script over.
#[derive(Debug)]
pub struct ScriptedModel {
    provider: String,
    rules: Vec<ScriptRule>,
    matched: Vec<AtomicU32>,
}

impl ScriptedModel {
    /// A scripted model named `provider` with the rules of `config`.
    pub fn new(provider: impl Into<String>, config: &ScriptedConfig) -> Self {
        Self {
            provider: provider.into(),
            rules: config.rules.clone(),
            matched: config.rules.iter().map(|_| AtomicU32::new(0)).collect(),
        }
    }

    fn matching_rule(&self, request: &ChatRequest) -> Option<&ScriptRule> {
        let input = request.last_user_message();
        self.rules
            .iter()
            .zip(&self.matched)
            .find(|(rule, matched)| {
                let applies = rule
                    .agent
                    .as_ref()
                    .is_none_or(|agent| request.agent.as_ref() == Some(agent))
                    && rule
                        .model
                        .as_ref()
                        .is_none_or(|model| *model == request.model)
                    && rule
                        .contains
                        .as_ref()
                        .is_none_or(|text| input.contains(text.as_str()));
                // Counted only when everything else matched, and atomically, so that
                // concurrent calls share the `times` budget exactly.
                applies
                    && match rule.times {
                        None => true,
                        Some(times) => matched
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                                (n < times).then_some(n + 1)
                            })
                            .is_ok(),
                    }
            })
            .map(|(rule, _)| rule)
    }

    fn answer(&self, request: &ChatRequest) -> Result<ChatResponse, ModelError> {
        let input = request.last_user_message();
        let agent = request.agent.as_deref().unwrap_or("");
        let rule = self.matching_rule(request);
        if let Some(rule) = rule {
            if let Some(message) = &rule.fail {
                return Err(ModelError::Scripted {
                    message: message.clone(),
                    retryable: rule.retryable,
                });
            }
        }
        // `{input}` last, so that braces in the user's text are left alone.
        let fill = |text: &str| {
            text.replace("{agent}", agent)
                .replace("{model}", &request.model)
                .replace("{input}", input)
        };
        let tool_calls: Vec<ToolCall> = rule
            .map(|rule| {
                rule.tool_calls
                    .iter()
                    .enumerate()
                    .map(|(index, call)| ToolCall {
                        id: format!("call_{index}"),
                        name: call.name.clone(),
                        arguments: call.arguments.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let content = match (
            rule.and_then(|rule| rule.reply.as_deref()),
            &request.output_schema,
        ) {
            (Some(reply), _) => fill(reply),
            (None, _) if !tool_calls.is_empty() => String::new(),
            (None, Some(schema)) => example_for_schema(schema).to_string(),
            (None, None) => format!("[{}] {input}", request.model),
        };
        let input_tokens = request
            .messages
            .iter()
            .map(|message| word_count(&message.content))
            .sum();
        Ok(ChatResponse {
            usage: Usage {
                input_tokens,
                output_tokens: word_count(&content),
            },
            finish_reason: Some(
                if tool_calls.is_empty() {
                    "stop"
                } else {
                    "tool_calls"
                }
                .into(),
            ),
            model: request.model.clone(),
            content,
            tool_calls,
        })
    }
}

fn word_count(text: &str) -> u32 {
    u32::try_from(text.split_whitespace().count()).unwrap_or(u32::MAX)
}

#[async_trait]
impl ChatModel for ScriptedModel {
    fn provider(&self) -> &str {
        &self.provider
    }

    async fn complete(&self, request: ChatRequest) -> Result<ChatResponse, ModelError> {
        self.answer(&request)
    }

    /// One delta per word (with its following space), one delta per tool call, then `Done`.
    async fn stream(
        &self,
        request: ChatRequest,
    ) -> Result<BoxStream<'static, Result<ChatChunk, ModelError>>, ModelError> {
        let response = self.answer(&request)?;
        let mut chunks: Vec<ChatChunk> = response
            .content
            .split_inclusive(' ')
            .map(|piece| ChatChunk::Delta(piece.to_owned()))
            .collect();
        chunks.extend(response.tool_calls.iter().enumerate().map(|(index, call)| {
            ChatChunk::ToolCallDelta {
                index,
                id: Some(call.id.clone()),
                name: Some(call.name.clone()),
                arguments: call.arguments.to_string(),
            }
        }));
        chunks.push(ChatChunk::Done(response));
        Ok(Box::pin(stream::iter(chunks.into_iter().map(Ok))))
    }
}

/// The smallest JSON value that satisfies `schema`, as far as a short walk can tell: `const`,
/// else the first `enum` value, else `default`, else by `type` — objects with their required
/// properties, arrays with `minItems` items, strings of `minLength` (at least `"text"`),
/// numbers at their `minimum` (or 0), `false`, `null`. `anyOf` / `oneOf` take their first
/// branch, `allOf` merges object branches. `$ref` is not followed (it gives `null`).
pub fn example_for_schema(schema: &Value) -> Value {
    let Some(schema) = schema.as_object() else {
        // `true` (anything goes) and malformed schemas.
        return Value::Null;
    };
    if let Some(value) = schema.get("const") {
        return value.clone();
    }
    if let Some(first) = schema
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|values| values.first())
    {
        return first.clone();
    }
    if let Some(value) = schema.get("default") {
        return value.clone();
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(first) = schema
            .get(key)
            .and_then(Value::as_array)
            .and_then(|branches| branches.first())
        {
            return example_for_schema(first);
        }
    }
    if let Some(branches) = schema.get("allOf").and_then(Value::as_array) {
        let mut merged = Map::new();
        for branch in branches {
            if let Value::Object(object) = example_for_schema(branch) {
                merged.extend(object);
            }
        }
        return Value::Object(merged);
    }

    let kind = match schema.get("type") {
        Some(Value::String(kind)) => Some(kind.as_str()),
        // `["string", "null"]`: the first type that is not null.
        Some(Value::Array(kinds)) => kinds
            .iter()
            .filter_map(Value::as_str)
            .find(|kind| *kind != "null")
            .or(Some("null")),
        _ if schema.contains_key("properties") => Some("object"),
        _ if schema.contains_key("items") => Some("array"),
        _ => None,
    };
    // `minimum`, or just above `exclusiveMinimum` (by one for integers), or 0.
    let lowest = |step: f64| match (
        schema.get("minimum").and_then(Value::as_f64),
        schema.get("exclusiveMinimum").and_then(Value::as_f64),
    ) {
        (Some(minimum), _) => minimum,
        (None, Some(exclusive)) => exclusive + step,
        (None, None) => 0.0,
    };
    match kind {
        Some("object") => {
            let properties = schema.get("properties").and_then(Value::as_object);
            let required = schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str);
            let object = required
                .map(|name| {
                    let property = properties
                        .and_then(|properties| properties.get(name))
                        .unwrap_or(&Value::Null);
                    (name.to_owned(), example_for_schema(property))
                })
                .collect();
            Value::Object(object)
        }
        Some("array") => {
            let items = schema.get("items").unwrap_or(&Value::Null);
            let count = schema.get("minItems").and_then(Value::as_u64).unwrap_or(0);
            Value::Array((0..count).map(|_| example_for_schema(items)).collect())
        }
        Some("string") => {
            let min = schema.get("minLength").and_then(Value::as_u64).unwrap_or(0);
            let mut text = String::from("text");
            while (text.len() as u64) < min {
                text.push('x');
            }
            Value::String(text)
        }
        Some("integer") => Value::from(lowest(1.0).ceil() as i64),
        Some("number") => {
            serde_json::Number::from_f64(lowest(0.5)).map_or(Value::from(0), Value::Number)
        }
        Some("boolean") => Value::Bool(false),
        _ => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn schema_examples_are_minimal_and_valid() {
        let schema = json!({
            "type": "object",
            "required": ["route", "steps", "confidence", "note"],
            "properties": {
                "route": { "enum": ["simple", "delegate", "decompose"] },
                "steps": { "type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["title"],
                    "properties": { "title": { "type": "string" }, "detail": { "type": "string" } }
                } },
                "confidence": { "type": "number", "minimum": 0.5 },
                "note": { "type": ["string", "null"] },
                "ignored": { "type": "string" }
            }
        });
        assert_eq!(
            example_for_schema(&schema),
            json!({
                "route": "simple",
                "steps": [{ "title": "text" }],
                "confidence": 0.5,
                "note": "text"
            })
        );
        assert_eq!(
            example_for_schema(&json!({"type": "integer", "minimum": 3})),
            json!(3)
        );
        assert_eq!(
            example_for_schema(&json!({"anyOf": [{"type": "boolean"}, {"type": "string"}]})),
            json!(false)
        );
    }
}
