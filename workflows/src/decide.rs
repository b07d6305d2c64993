//! `decide(run, event) -> actions`: what a workflow definition says follows an event of a run.
//!
//! Pure: the same definition, run state, event and time give the same actions (backoff jitter is
//! derived from the run, step and attempt, not drawn at random), so a run replayed from its
//! events makes the same decisions. The `WorkflowRun` aggregate records the actions as events in
//! the command that recorded the event; the runtime's process manager performs them.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use stele_aggregates::workflow_run::{
    Action, ChildSpec, Decider, RunEvent, RunStatus, StepStatus, WorkflowRun,
};

use crate::definition::{Definition, DefinitionError, Problem, Step, StepKind, END};
use crate::expr;

/// Default time an attempt of a job step may take.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(300);

/// Every version of every known definition.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    definitions: BTreeMap<String, BTreeMap<u32, Arc<Definition>>>,
}

impl Catalog {
    /// Adds a definition. The same name and version with other content is refused: a changed
    /// definition needs a new version, so that running runs keep theirs.
    pub fn insert(&mut self, definition: Definition) -> Result<(), DefinitionError> {
        let versions = self.definitions.entry(definition.name.clone()).or_default();
        if let Some(existing) = versions.get(&definition.version) {
            if **existing != definition {
                return Err(DefinitionError {
                    problems: vec![Problem {
                        file: None,
                        workflow: Some(definition.name.clone()),
                        step: None,
                        message: format!(
                            "version {} exists with other content: give the changed definition a new version",
                            definition.version
                        ),
                    }],
                });
            }
            return Ok(());
        }
        versions.insert(definition.version, Arc::new(definition));
        Ok(())
    }

    pub fn get(&self, name: &str, version: u32) -> Option<&Arc<Definition>> {
        self.definitions.get(name)?.get(&version)
    }

    /// The newest version of `name`.
    pub fn latest(&self, name: &str) -> Option<&Arc<Definition>> {
        self.definitions.get(name)?.values().next_back()
    }

    /// The newest version of each definition, by name.
    pub fn latest_all(&self) -> impl Iterator<Item = &Arc<Definition>> {
        self.definitions
            .values()
            .filter_map(|v| v.values().next_back())
    }

    /// Every version of every definition.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Definition>> {
        self.definitions.values().flat_map(BTreeMap::values)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.definitions.contains_key(name)
    }
}

/// The catalog as the `WorkflowRun` aggregate's decider.
pub struct CatalogDecider(pub Arc<Catalog>);

impl Decider for CatalogDecider {
    fn decide(
        &self,
        run: &WorkflowRun,
        event: &RunEvent,
        now: DateTime<Utc>,
    ) -> Result<Vec<Action>, String> {
        let definition = self.0.get(&run.workflow, run.version).ok_or_else(|| {
            format!(
                "workflow {} version {} is not known",
                run.workflow, run.version
            )
        })?;
        decide(definition, &self.0, run, event, now)
    }
}

/// What follows `event` (already applied to `run`) according to `definition`.
pub fn decide(
    definition: &Definition,
    catalog: &Catalog,
    run: &WorkflowRun,
    event: &RunEvent,
    now: DateTime<Utc>,
) -> Result<Vec<Action>, String> {
    let d = Decision {
        definition,
        catalog,
        run,
        now,
    };
    match event {
        RunEvent::RunStarted { .. } => {
            let start = definition.start_step().ok_or("the workflow has no steps")?;
            d.enter(start)
        }
        RunEvent::StepCompleted { step, output, .. } => d.advance(step, &output.json()),
        RunEvent::TimerFired { step } => d.advance(step, &Value::Null),
        RunEvent::StepFailed {
            step,
            attempt,
            error,
            ..
        } => d.retry_or_fail(step, *attempt, error.text()),
        RunEvent::WaitStarted { step, signal, .. } => Ok(d.resume_wait(step, signal)),
        RunEvent::SignalReceived { name, .. } => {
            let waiting = run.current.as_deref().and_then(|id| {
                let state = run.step(id)?;
                (state.status == StepStatus::Waiting && state.signal.as_deref() == Some(name))
                    .then_some(id)
            });
            Ok(waiting.map_or_else(Vec::new, |step| d.resume_wait(step, name)))
        }
        RunEvent::WaitTimedOut { step } => {
            let on_timeout = match &d.step(step)?.kind {
                StepKind::Wait { on_timeout, .. } => on_timeout.clone(),
                _ => None,
            };
            match on_timeout {
                Some(target) => d.go(&target, &Value::Null),
                None => d.fail(
                    step,
                    format!("step {step} timed out waiting for its signal"),
                ),
            }
        }
        RunEvent::ChildrenStarted { step, children } if children.is_empty() => {
            Ok(vec![Action::CompleteStep {
                step: step.clone(),
                output: json!([]),
                consumed_signal: None,
            }])
        }
        RunEvent::ChildRunFinished { step, .. } => d.join(step),
        RunEvent::ReplyRequested { step, text } => Ok(vec![Action::CompleteStep {
            step: step.clone(),
            output: Value::String(text.text().to_owned()),
            consumed_signal: None,
        }]),
        _ => Ok(Vec::new()),
    }
}

struct Decision<'a> {
    definition: &'a Definition,
    catalog: &'a Catalog,
    run: &'a WorkflowRun,
    now: DateTime<Utc>,
}

impl Decision<'_> {
    fn step(&self, id: &str) -> Result<&Step, String> {
        self.definition.step(id).ok_or_else(|| {
            format!(
                "step {id} is not in workflow {} version {}",
                self.definition.name, self.definition.version
            )
        })
    }

    /// The actions that start `id`.
    fn enter(&self, id: &str) -> Result<Vec<Action>, String> {
        let step = self.step(id)?;
        let id = step.id.clone();
        let context = || expr::context(self.run);
        Ok(match &step.kind {
            kind if kind.is_job() => vec![Action::ScheduleStep {
                step: id.into(),
                attempt: 1,
                not_before: None,
                escalation: 0,
                timeout_ms: timeout_ms(step),
            }],
            StepKind::Route { on: Some(on), .. } => {
                let value = expr::evaluate(on, &context())
                    .map_err(|e| format!("step {id}: `on` could not be evaluated: {e}"))?;
                vec![Action::CompleteStep {
                    step: id.into(),
                    output: value,
                    consumed_signal: None,
                }]
            }
            StepKind::FanOut {
                items, workflow, ..
            } => {
                let items = expr::evaluate(items, &context())
                    .map_err(|e| format!("step {id}: `items` could not be evaluated: {e}"))?;
                let Value::Array(items) = items else {
                    return Err(format!("step {id}: `items` is not a list but {items}"));
                };
                let child = self
                    .catalog
                    .latest(workflow)
                    .ok_or_else(|| format!("step {id}: workflow {workflow} is not known"))?;
                // A step entered again (by a loop) starts children with other ids.
                let entries = self.run.path.iter().filter(|s| **s == id).count();
                let round = if entries > 1 {
                    format!("-{entries}")
                } else {
                    String::new()
                };
                let children = items
                    .into_iter()
                    .enumerate()
                    .map(|(index, item)| ChildSpec {
                        run_id: format!("{}.{id}{round}.{index}", self.run.run_id).into(),
                        workflow: child.name.clone(),
                        version: child.version,
                        input: self.run.personal(item),
                    })
                    .collect();
                vec![Action::StartChildren {
                    step: id.into(),
                    children,
                }]
            }
            StepKind::Wait { signal, .. } => vec![Action::AwaitSignal {
                step: id.into(),
                signal: signal.clone(),
                timeout_at: step.timeout.map(|t| self.after(t)),
            }],
            StepKind::Sleep { duration } => vec![Action::ArmTimer {
                step: id.into(),
                fire_at: self.after(*duration),
            }],
            StepKind::Reply { text } => {
                let text = expr::render(text, &context())
                    .map_err(|e| format!("step {id}: `text` could not be rendered: {e}"))?;
                vec![Action::RequestReply {
                    step: id.into(),
                    text,
                }]
            }
            kind => {
                return Err(format!(
                    "step {id}: a {} step is misconfigured",
                    kind.name()
                ))
            }
        })
    }

    fn after(&self, duration: Duration) -> DateTime<Utc> {
        self.now + chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX)
    }

    /// A step completed with `output`: go where the definition says.
    fn advance(&self, id: &str, output: &Value) -> Result<Vec<Action>, String> {
        if self.run.current.as_deref() != Some(id) {
            return Ok(Vec::new());
        }
        let step = self.step(id)?;
        let target = match &step.kind {
            StepKind::Route { cases, default, .. } => {
                let key = case_key(output);
                match cases.get(&key).or(default.as_ref()) {
                    Some(target) => target.clone(),
                    None => {
                        return self.fail(
                            id,
                            format!(
                                "route {id} has no case for {key:?} and no default (cases: {})",
                                cases.keys().cloned().collect::<Vec<_>>().join(", ")
                            ),
                        )
                    }
                }
            }
            _ => self.definition.next_after(step),
        };
        self.go(&target, output)
    }

    /// Enters `target`, or completes the run when it is the end.
    fn go(&self, target: &str, last_output: &Value) -> Result<Vec<Action>, String> {
        if target != END {
            return self.enter(target);
        }
        let output = match &self.definition.output {
            Some(expression) => expr::evaluate(expression, &expr::context(self.run))
                .map_err(|e| format!("the workflow's `output` could not be evaluated: {e}"))?,
            None => last_output.clone(),
        };
        Ok(vec![Action::CompleteRun { output }])
    }

    fn retry_or_fail(&self, id: &str, attempt: u32, error: &str) -> Result<Vec<Action>, String> {
        let step = self.step(id)?;
        let policy = &step.retry;
        if attempt < policy.attempts {
            let wait = backoff(
                policy.backoff,
                policy.max_backoff,
                attempt,
                &self.run.run_id,
                id,
            );
            return Ok(vec![Action::ScheduleStep {
                step: id.into(),
                attempt: attempt + 1,
                not_before: Some(self.after(wait)),
                escalation: attempt.min(policy.escalate.len() as u32),
                timeout_ms: timeout_ms(step),
            }]);
        }
        self.fail(
            id,
            format!("step {id} failed after {attempt} attempt(s): {error}"),
        )
    }

    /// A step failed for good: its `on_error` step, or the run fails.
    fn fail(&self, id: &str, error: String) -> Result<Vec<Action>, String> {
        match &self.step(id)?.on_error {
            Some(target) => self.go(target, &json!({ "error": error })),
            None => Ok(vec![Action::FailRun {
                error,
                step: Some(id.into()),
            }]),
        }
    }

    fn resume_wait(&self, id: &str, signal: &str) -> Vec<Action> {
        let buffered = self.run.signals.iter().find(|(name, _)| name == signal);
        match buffered {
            Some((_, payload)) => vec![Action::CompleteStep {
                step: id.into(),
                output: payload.clone(),
                consumed_signal: Some(signal.to_owned()),
            }],
            None => Vec::new(),
        }
    }

    /// A child finished: when all have, the fan-out step completes (or fails).
    fn join(&self, id: &str) -> Result<Vec<Action>, String> {
        let state = self.run.step(id).ok_or("join of an unknown step")?;
        if state.status != StepStatus::Joining || state.results.iter().any(Option::is_none) {
            return Ok(Vec::new());
        }
        let allow_failures = matches!(
            self.step(id)?.kind,
            StepKind::FanOut {
                allow_failures: true,
                ..
            }
        );
        let results: Vec<_> = state.results.iter().flatten().collect();
        let failed: Vec<_> = results
            .iter()
            .filter(|r| r.status != RunStatus::Completed)
            .collect();
        if !failed.is_empty() && !allow_failures {
            let first = failed[0];
            return self.fail(
                id,
                format!(
                    "{} of {} child runs did not complete; {} {}: {}",
                    failed.len(),
                    results.len(),
                    first.run_id,
                    first.status.as_str(),
                    first.error.as_deref().unwrap_or("no error given")
                ),
            );
        }
        let output = results
            .iter()
            .map(|r| {
                json!({
                    "run_id": r.run_id,
                    "status": r.status,
                    "output": r.output,
                    "error": r.error,
                })
            })
            .collect();
        Ok(vec![Action::CompleteStep {
            step: id.into(),
            output: Value::Array(output),
            consumed_signal: None,
        }])
    }
}

/// The key a route's cases are matched against: a string as is, anything else as JSON text; an
/// object with a `route` field (an agent's classification) by that field.
pub fn case_key(value: &Value) -> String {
    match value {
        Value::String(s) => s.trim().to_owned(),
        Value::Object(map) => map.get("route").map_or_else(|| value.to_string(), case_key),
        other => other.to_string(),
    }
}

fn timeout_ms(step: &Step) -> u64 {
    step.timeout.unwrap_or(DEFAULT_STEP_TIMEOUT).as_millis() as u64
}

/// Backoff before attempt `attempt + 1`: doubling from `base`, capped, with ±10% jitter derived
/// from the run, step and attempt (deterministic, yet spread across runs).
pub fn backoff(base: Duration, max: Duration, attempt: u32, run_id: &str, step: &str) -> Duration {
    let doubled = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let capped = doubled.min(max);
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (run_id, step, attempt).hash(&mut hasher);
    let unit = (hasher.finish() % 2001) as f64 / 1000.0 - 1.0;
    capped.mul_f64(1.0 + unit * 0.1)
}

#[cfg(test)]
mod tests;
