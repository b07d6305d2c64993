//! The model router as the runtime's [`Agents`]: an agent step's prompt goes to its role, the
//! retry policy's escalation picks another role or model, the role's tools are offered and the
//! calls the model makes are run (a bounded loop), and the final reply becomes the step's output
//! (JSON when the role declares an output schema).

use async_trait::async_trait;
use serde_json::{json, Value};

use crate::model::{CallOverrides, ChatMessage, ModelRoute, ModelRouter};
use crate::runtime::{AgentRequest, AgentResult, Agents};
use crate::tools::Tools;

/// Rounds of tool calls one agent step may make before it is failed.
pub const MAX_TOOL_ROUNDS: usize = 8;

/// Agent roles served by a model router, with the tools they may call.
pub struct ModelAgents {
    router: ModelRouter,
    tools: Tools,
}

impl ModelAgents {
    pub fn new(router: ModelRouter, tools: Tools) -> Self {
        Self { router, tools }
    }

    pub fn router(&self) -> &ModelRouter {
        &self.router
    }
}

#[async_trait]
impl Agents for ModelAgents {
    fn knows(&self, agent: &str) -> bool {
        self.router.agent(agent).is_some()
    }

    async fn run(&self, request: AgentRequest) -> AgentResult {
        let mut calls: Vec<Value> = Vec::new();
        let fail = |error: String, calls: Vec<Value>| AgentResult {
            output: Err(error),
            calls,
        };
        let mut overrides = CallOverrides::default();
        if let Some(escalation) = &request.escalation {
            overrides.agent = escalation.agent.clone();
            if let Some(model) = &escalation.model {
                match model.parse::<ModelRoute>() {
                    Ok(route) => overrides.route = Some(vec![route]),
                    Err(e) => return fail(format!("escalation model {model:?}: {e}"), calls),
                }
            }
        }
        let role_name = overrides
            .agent
            .clone()
            .unwrap_or_else(|| request.agent.clone());
        let Some(role) = self.router.agent(&role_name) else {
            return fail(format!("unknown agent {role_name}"), calls);
        };
        // Tools the role lists but no runtime registered are not offered.
        overrides.tools = role
            .tools
            .iter()
            .filter_map(|name| self.tools.spec(name))
            .collect();
        let structured = role.output_schema.is_some();
        let mut messages = vec![ChatMessage::user(request.prompt)];
        for _ in 0..MAX_TOOL_ROUNDS {
            let reply = self
                .router
                .call(&request.agent, messages.clone(), &overrides)
                .await;
            for call in &reply.calls {
                let outcome = if call.error.is_none() { "ok" } else { "error" };
                metrics::counter!(
                    "stele_model_calls_total",
                    "provider" => call.provider.clone(),
                    "model" => call.model.clone(),
                    "outcome" => outcome
                )
                .increment(1);
                metrics::histogram!("stele_model_call_duration_seconds", "provider" => call.provider.clone())
                    .record(call.latency_ms as f64 / 1000.0);
                metrics::counter!("stele_model_tokens_total", "provider" => call.provider.clone(), "direction" => "in")
                    .increment(u64::from(call.input_tokens));
                metrics::counter!("stele_model_tokens_total", "provider" => call.provider.clone(), "direction" => "out")
                    .increment(u64::from(call.output_tokens));
            }
            calls.extend(
                reply
                    .calls
                    .iter()
                    .filter_map(|call| serde_json::to_value(call).ok()),
            );
            let response = match reply.result {
                Ok(response) => response,
                Err(e) => return fail(e.to_string(), calls),
            };
            if response.tool_calls.is_empty() {
                let output = if structured {
                    serde_json::from_str::<Value>(&response.content).map_err(|e| {
                        format!(
                            "agent {role_name} should answer JSON for its output schema but did not ({e}): {}",
                            truncate(&response.content, 200)
                        )
                    })
                } else {
                    Ok(Value::String(response.content))
                };
                return AgentResult { output, calls };
            }
            messages.push(ChatMessage::assistant_with_tools(
                response.content,
                response.tool_calls.clone(),
            ));
            for call in response.tool_calls {
                let offered = overrides.tools.iter().any(|t| t.name == call.name);
                let result = if offered {
                    self.tools.call(&call.name, call.arguments.clone()).await
                } else {
                    Err(format!(
                        "tool {} is not available to {role_name}",
                        call.name
                    ))
                };
                let text = match &result {
                    Ok(output) => output.to_string(),
                    Err(error) => json!({ "error": error }).to_string(),
                };
                calls.push(json!({
                    "tool": call.name,
                    "tool_call_id": call.id,
                    "arguments": call.arguments,
                    "output": result.as_ref().ok(),
                    "error": result.as_ref().err(),
                }));
                messages.push(ChatMessage::tool(call.id, text));
            }
        }
        fail(
            format!("agent {role_name} was still calling tools after {MAX_TOOL_ROUNDS} rounds"),
            calls,
        )
    }
}

fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}
