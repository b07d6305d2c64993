//! The model gateway: a chat call that is no workflow step (`POST /v1/chat/completions`), made
//! through the same router as agents' calls — fallbacks, retries, circuit breakers — and
//! recorded as an event of its own stream (`model_call/<id>`, `ModelCalled`): who called, which
//! role or model, each attempt with its provider, model, tokens, latency and error. The
//! messages and the answer are not recorded: the caller is a program, not a person Stele knows,
//! so they could not be sealed for anyone.

use stele_engine::{AppendRequest, NewEvent};
use stele_models::{CallOverrides, ChatMessage, ModelRoute};

use super::*;

/// The aggregate type of the gateway's calls' streams.
pub const MODEL_CALL_STREAM: &str = "model_call";

/// What a gateway call answered.
#[derive(Clone, Debug)]
pub struct ChatOutcome {
    /// The id of the call's stream (`model_call/<id>`).
    pub call_id: String,
    /// The model that answered, `provider/model`.
    pub model: String,
    pub content: String,
    pub finish_reason: Option<String>,
    pub input_tokens: u32,
    pub output_tokens: u32,
}

impl Runtime {
    /// Calls `model` — an agent role (its route, system prompt and output schema), or one model
    /// `provider/model` — with `messages`; records the call either way.
    pub async fn chat(
        &self,
        model: &str,
        messages: Vec<ChatMessage>,
        temperature: Option<f32>,
        max_tokens: Option<u32>,
        meta: CommandMeta,
    ) -> Result<ChatOutcome, RuntimeError> {
        let Some(router) = self.agents.router() else {
            return Err(RuntimeError::UnknownModel(
                "this server calls no models".into(),
            ));
        };
        let reply = if router.agent(model).is_some() {
            let overrides = CallOverrides {
                temperature,
                max_tokens,
                ..CallOverrides::default()
            };
            router.call(model, messages, &overrides).await
        } else {
            let route = model
                .parse::<ModelRoute>()
                .ok()
                .filter(|route| router.config().providers.contains_key(&route.provider))
                .ok_or_else(|| {
                    let mut roles: Vec<String> = router.agents().map(|r| r.name.clone()).collect();
                    roles.sort();
                    RuntimeError::UnknownModel(format!(
                        "{model:?} is neither an agent role ({}) nor provider/model at a configured provider ({})",
                        roles.join(", "),
                        router.config().providers.keys().cloned().collect::<Vec<_>>().join(", ")
                    ))
                })?;
            router
                .call_route(&[route], messages, temperature, max_tokens)
                .await
        };
        let answered = reply
            .served_by
            .and_then(|_| reply.calls.iter().rev().find(|c| c.error.is_none()));
        let attempts: Vec<Value> = reply
            .calls
            .iter()
            .map(|c| {
                json!({
                    "provider": c.provider,
                    "model": c.model,
                    "fallback_index": c.fallback_index,
                    "attempt": c.attempt,
                    "input_tokens": c.input_tokens,
                    "output_tokens": c.output_tokens,
                    "latency_ms": c.latency_ms,
                    "error": c.error,
                })
            })
            .collect();
        let (input_tokens, output_tokens) = match &reply.result {
            Ok(response) => (response.usage.input_tokens, response.usage.output_tokens),
            Err(_) => (0, 0),
        };
        let call_id = Uuid::now_v7();
        let payload = json!({
            "type": "ModelCalled",
            "data": {
                "asked_for": model,
                "answered_by": answered.map(|c| format!("{}/{}", c.provider, c.model)),
                "attempts": attempts,
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "error": reply.result.as_ref().err().map(ToString::to_string),
            }
        });
        self.log
            .append(AppendRequest {
                command_id: meta.command_id,
                stream: StreamId::new(MODEL_CALL_STREAM, call_id.to_string()),
                expected_sequence: 0,
                events: vec![NewEvent {
                    event_type: "ModelCalled".into(),
                    event_version: "1.0".into(),
                    payload,
                    metadata: meta.for_event(Uuid::now_v7()),
                }],
            })
            .await?;
        match (reply.result, answered) {
            (Ok(response), Some(call)) => Ok(ChatOutcome {
                call_id: call_id.to_string(),
                model: format!("{}/{}", call.provider, call.model),
                content: response.content,
                finish_reason: response.finish_reason,
                input_tokens,
                output_tokens,
            }),
            (Ok(_), None) => Err(RuntimeError::ModelsFailed(
                "the answer names no model".into(),
            )),
            (Err(e), _) => Err(RuntimeError::ModelsFailed(e.to_string())),
        }
    }
}
