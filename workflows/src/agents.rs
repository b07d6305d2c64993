//! The model router as the runtime's [`Agents`]: an agent step's prompt goes to its role, the
//! retry policy's escalation picks another role or model, the role's tools are offered and the
//! calls the model makes are run (a bounded loop), and the final reply becomes the step's output
//! (JSON checked against the role's output schema, when it declares one).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde_json::{json, Value};

use crate::runtime::{AgentRequest, AgentResult, Agents};
use crate::tools::Tools;
use stele_models::{CallOverrides, ChatMessage, ModelRoute, ModelRouter};

/// Rounds of tool calls one agent step may make before it is failed.
pub const MAX_TOOL_ROUNDS: usize = 8;

/// Agent roles served by a model router, with the tools they may call.
pub struct ModelAgents {
    router: ModelRouter,
    tools: Tools,
    /// Compiled output schemas, by role.
    schemas: Mutex<HashMap<String, Arc<jsonschema::Validator>>>,
}

impl ModelAgents {
    pub fn new(router: ModelRouter, tools: Tools) -> Self {
        Self {
            router,
            tools,
            schemas: Mutex::default(),
        }
    }

    /// Checks a structured answer against the role's output schema.
    fn check(&self, role: &str, schema: &Value, output: &Value) -> Result<(), String> {
        let validator = {
            let mut schemas = self.schemas.lock().expect("schemas lock");
            match schemas.get(role) {
                Some(validator) => validator.clone(),
                None => {
                    let validator =
                        Arc::new(jsonschema::validator_for(schema).map_err(|e| {
                            format!("agent {role} has an invalid output schema: {e}")
                        })?);
                    schemas.insert(role.to_owned(), validator.clone());
                    validator
                }
            }
        };
        let problems: Vec<String> = validator
            .iter_errors(output)
            .take(5)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "agent {role} answered JSON that does not fit its output schema: {}",
                problems.join("; ")
            ))
        }
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

    fn models_of(&self, agent: &str) -> Option<Vec<String>> {
        let role = self.router.agent(agent)?;
        Some(role.route.iter().map(ToString::to_string).collect())
    }

    fn router(&self) -> Option<&ModelRouter> {
        Some(&self.router)
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
        if overrides.route.is_none() {
            if let Some(chosen) = request.models.get(&role_name) {
                overrides.route = chosen_first(&role.route, chosen);
            }
        }
        // Tools the role lists but no runtime registered are not offered.
        overrides.tools = role
            .tools
            .iter()
            .filter_map(|name| self.tools.spec(name))
            .collect();
        let schema = role.output_schema.clone();
        let mut messages = vec![ChatMessage::user(request.prompt.clone())];
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
                let output = if let Some(schema) = &schema {
                    serde_json::from_str::<Value>(&response.content)
                        .map_err(|e| {
                            format!(
                                "agent {role_name} should answer JSON for its output schema but did not ({e}): {}",
                                truncate(&response.content, 200)
                            )
                        })
                        .and_then(|output| {
                            self.check(&role_name, schema, &output).map(|()| output)
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
                    self.tools
                        .call(&call.name, call.arguments.clone(), &request.caller)
                        .await
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
/// The role's route with the model its requester chose first, the others after it as fallbacks;
/// `None` (the route as configured) when the choice is not one of the route's models.
pub(crate) fn chosen_first(route: &[ModelRoute], chosen: &str) -> Option<Vec<ModelRoute>> {
    let at = route.iter().position(|entry| entry.to_string() == chosen);
    if at.is_none() {
        tracing::warn!(
            chosen,
            "a chosen model is not in its role's route: not used"
        );
    }
    let mut route = route.to_vec();
    let entry = route.remove(at?);
    route.insert(0, entry);
    Some(route)
}
