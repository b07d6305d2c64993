//! The model router as the runtime's [`Agents`]: an agent step's prompt goes to its role, the
//! retry policy's escalation picks another role or model, and the reply becomes the step's
//! output (JSON when the role declares an output schema).

use async_trait::async_trait;
use serde_json::Value;

use crate::model::{CallOverrides, ChatMessage, ModelRoute, ModelRouter};
use crate::runtime::{AgentRequest, AgentResult, Agents};

#[async_trait]
impl Agents for ModelRouter {
    fn knows(&self, agent: &str) -> bool {
        self.agent(agent).is_some()
    }

    async fn run(&self, request: AgentRequest) -> AgentResult {
        let mut overrides = CallOverrides::default();
        if let Some(escalation) = &request.escalation {
            overrides.agent = escalation.agent.clone();
            if let Some(model) = &escalation.model {
                match model.parse::<ModelRoute>() {
                    Ok(route) => overrides.route = Some(vec![route]),
                    Err(e) => {
                        return AgentResult {
                            output: Err(format!("escalation model {model:?}: {e}")),
                            calls: Vec::new(),
                        }
                    }
                }
            }
        }
        let role = overrides
            .agent
            .as_deref()
            .unwrap_or(&request.agent)
            .to_owned();
        let reply = self
            .call(
                &request.agent,
                vec![ChatMessage::user(request.prompt)],
                &overrides,
            )
            .await;
        let calls = reply
            .calls
            .iter()
            .filter_map(|call| serde_json::to_value(call).ok())
            .collect();
        let structured = self.agent(&role).is_some_and(|r| r.output_schema.is_some());
        let output = match reply.result {
            Ok(response) if structured => serde_json::from_str::<Value>(&response.content)
                .map_err(|e| {
                    format!(
                        "agent {role} should answer JSON for its output schema but did not ({e}): {}",
                        truncate(&response.content, 200)
                    )
                }),
            Ok(response) => Ok(Value::String(response.content)),
            Err(e) => Err(e.to_string()),
        };
        AgentResult { output, calls }
    }
}

fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}
