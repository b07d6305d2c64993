//! Templates and expressions over a run's state (minijinja, which is pure: no IO, so decisions
//! that evaluate them stay deterministic).

use std::sync::OnceLock;

use minijinja::{Environment, UndefinedBehavior};
use serde_json::{json, Map, Value};
use stele_aggregates::workflow_run::WorkflowRun;

/// The shared environment: strict, so a reference to a missing value is an error that names it
/// instead of an empty string in a prompt.
pub fn environment() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env
    })
}

/// What templates and expressions of a run see.
pub fn context(run: &WorkflowRun) -> Value {
    let steps: Map<String, Value> = run
        .steps
        .iter()
        .map(|(id, step)| {
            (
                id.to_string(),
                json!({
                    "output": step.output,
                    "status": step.status,
                    "attempt": step.attempt,
                    "error": step.error,
                }),
            )
        })
        .collect();
    json!({
        "input": run.input,
        "steps": steps,
        "run_id": run.run_id,
        "task_id": run.task_id,
        "workflow": run.workflow,
    })
}

/// Renders a template.
pub fn render(template: &str, context: &Value) -> Result<String, String> {
    environment()
        .render_str(
            template,
            minijinja::Value::from(minijinja::value::Serde(context)),
        )
        .map_err(|e| describe(&e))
}

/// Evaluates an expression to a JSON value.
pub fn evaluate(expression: &str, context: &Value) -> Result<Value, String> {
    let compiled = environment()
        .compile_expression(expression)
        .map_err(|e| describe(&e))?;
    let value = compiled
        .eval(minijinja::Value::from(minijinja::value::Serde(context)))
        .map_err(|e| describe(&e))?;
    serde_json::to_value(&value).map_err(|e| e.to_string())
}

/// Renders every string inside a JSON value as a template.
pub fn render_value(value: &Value, context: &Value) -> Result<Value, String> {
    Ok(match value {
        Value::String(s) => Value::String(render(s, context)?),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| render_value(v, context))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), render_value(v, context)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

fn describe(error: &minijinja::Error) -> String {
    match error.detail() {
        Some(detail) => format!("{}: {detail}", error.kind()),
        None => error.to_string(),
    }
}
