//! Tools: registered Rust functions that `tool` steps and agents call, with typed input and
//! output. A tool is told who calls it ([`Caller`]: the run, its step, the agent and the person
//! the run is for), so that tools like `memory.search` keep to that person's data.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use stele_aggregates::ids::{RunId, StepId, TaskId};
use stele_models::ToolSpec;

type ToolFuture = Pin<Box<dyn Future<Output = Result<Value, String>> + Send>>;
type ToolFn = Arc<dyn Fn(Value, Caller) -> ToolFuture + Send + Sync>;

/// Who calls a tool: a step of a run, as an agent role (for agents' tool calls), on behalf of
/// the run's person (its subject) when it has one.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Caller {
    pub run_id: RunId,
    pub task_id: Option<TaskId>,
    pub workflow: String,
    pub step: StepId,
    /// The agent role calling (none for a `tool` step).
    pub agent: Option<String>,
    /// The person the run is for.
    pub subject: Option<String>,
}

/// The tools steps may call, by name.
#[derive(Clone, Default)]
pub struct Tools {
    tools: BTreeMap<String, ToolFn>,
    specs: BTreeMap<String, ToolSpec>,
}

impl Tools {
    /// The tools every runtime has: `echo` (returns its input) and `noop` (returns null).
    pub fn builtin() -> Self {
        Tools::default()
            .register("echo", |input: Value| async move { Ok::<_, String>(input) })
            .describe(
                "echo",
                "Returns its input unchanged.",
                json!({ "type": "object" }),
            )
            .register(
                "noop",
                |_: Value| async move { Ok::<_, String>(Value::Null) },
            )
            .describe(
                "noop",
                "Does nothing and returns null.",
                json!({ "type": "object" }),
            )
    }

    /// Describes `name` to models (what agent roles that list it are offered): what it does and
    /// the JSON schema of its input.
    pub fn describe(mut self, name: &str, description: &str, parameters: Value) -> Self {
        self.specs.insert(
            name.to_owned(),
            ToolSpec {
                name: name.to_owned(),
                description: description.to_owned(),
                parameters,
            },
        );
        self
    }

    /// How `name` is described to models (a registered tool without a description gets an
    /// open object schema).
    pub fn spec(&self, name: &str) -> Option<ToolSpec> {
        if !self.contains(name) {
            return None;
        }
        Some(self.specs.get(name).cloned().unwrap_or_else(|| ToolSpec {
            name: name.to_owned(),
            description: String::new(),
            parameters: json!({ "type": "object" }),
        }))
    }

    /// Registers `tool`: its input is deserialized from the step's rendered `input` (a mismatch
    /// fails the step with serde's message), its output serialized as the step's output.
    pub fn register<I, O, F, Fut>(self, name: impl Into<String>, tool: F) -> Self
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + 'static,
        F: Fn(I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, String>> + Send + 'static,
    {
        self.register_for_caller(name, move |input: I, _: Caller| tool(input))
    }

    /// Registers `tool`, which is also told who calls it.
    pub fn register_for_caller<I, O, F, Fut>(mut self, name: impl Into<String>, tool: F) -> Self
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + 'static,
        F: Fn(I, Caller) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, String>> + Send + 'static,
    {
        let tool = Arc::new(tool);
        self.tools.insert(
            name.into(),
            Arc::new(move |input: Value, caller: Caller| {
                let tool = tool.clone();
                Box::pin(async move {
                    let input: I = serde_json::from_value(input)
                        .map_err(|e| format!("the tool's input does not fit: {e}"))?;
                    let output = tool(input, caller).await?;
                    serde_json::to_value(output).map_err(|e| e.to_string())
                })
            }),
        );
        self
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tools.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tools.keys().map(String::as_str)
    }

    /// Calls `name` with `input` for `caller`.
    pub async fn call(&self, name: &str, input: Value, caller: &Caller) -> Result<Value, String> {
        let tool = self
            .tools
            .get(name)
            .ok_or_else(|| format!("unknown tool {name}"))?;
        tool(input, caller.clone()).await
    }
}
