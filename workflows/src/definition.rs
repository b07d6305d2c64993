//! Workflow definitions: the declarative model, its YAML form, and validation.
//!
//! A definition is a list of steps; each step says what it does (its kind) and where the run
//! goes next. Definitions are written as YAML files (see `workflows/definitions/`) or built in
//! Rust with the same types, and are validated before use: errors name the file, the step and
//! the problem.
//!
//! ```yaml
//! name: triage
//! version: 1
//! steps:
//!   - id: classify
//!     kind: agent
//!     agent: brain
//!     prompt: "Classify: {{ input }}"
//!   - id: route
//!     kind: route
//!     on: steps.classify.output.route
//!     cases: { simple: answer, decompose: split }
//!   - id: answer
//!     kind: reply
//!     text: "{{ steps.classify.output.answer }}"
//!     next: end
//!   - id: split
//!     kind: fan_out
//!     items: steps.classify.output.subtasks
//!     workflow: subtask
//! ```
//!
//! Templates (`prompt`, `text`, strings inside a tool's `input`) use minijinja syntax;
//! expressions (`on`, `items`, `output`) are minijinja expressions. Both see `input` (the run's
//! input), `steps.<id>.output`, `run_id`, `task_id` and `workflow`.
//!
//! One file on purpose (about 700 lines, its tests in `definition/tests.rs`): the step kinds and
//! the validation that checks them against each other are one schema, read together.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The target that ends a run.
pub const END: &str = "end";

/// A workflow definition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    pub name: String,
    /// Runs keep the version they started with; new runs take the highest.
    pub version: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// The first step (the first in the list when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    /// An expression for the run's output (the last completed step's output when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    pub steps: Vec<Step>,
}

/// One step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub id: String,
    #[serde(flatten)]
    pub kind: StepKind,
    /// Where the run goes after this step: a step id or `end` (the next step in the list, or the
    /// end after the last, when absent). Not used by `route`, which goes by its cases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    #[serde(default, skip_serializing_if = "RetryPolicy::is_default")]
    pub retry: RetryPolicy,
    /// How long one attempt of a job step (agent, tool, route by agent) may take, or how long a
    /// `wait` step waits.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// Where the run goes when the step fails for good (the run fails when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_error: Option<String>,
    /// What the step takes from the memory and gives to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<StepMemory>,
}

/// A step and the memory: remembered context put before an agent's prompt, and the step's
/// output remembered.
///
/// ```yaml
/// memory:
///   context: 600          # tokens of context: relevant, important and recent memories
///   query: "{{ input }}"  # what the context is searched with (the prompt when absent)
///   remember: true        # the step's output becomes a memory
///   importance: 0.7
///   tags: [decision]
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepMemory {
    /// At most this many tokens of remembered context go before the prompt (0: none).
    #[serde(default)]
    pub context: u32,
    /// A template for the search the context comes from (the rendered prompt when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// The step's output, when it completes, becomes a memory of the run's person, agent and
    /// workflow.
    #[serde(default)]
    pub remember: bool,
    /// 0 (trivia) to 1 (never forget), of the remembered output.
    #[serde(default = "StepMemory::default_importance")]
    pub importance: f32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

impl StepMemory {
    /// Most context a step may ask for.
    pub const MAX_CONTEXT: u32 = 32_000;

    fn default_importance() -> f32 {
        0.5
    }
}

/// What a step does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StepKind {
    /// Calls a model as a named agent role.
    Agent { agent: String, prompt: String },
    /// Runs a registered Rust function. Strings in `input` are templates.
    Tool {
        tool: String,
        #[serde(default)]
        input: Value,
    },
    /// Branches: on the value of an expression, or on an agent's classification of a prompt.
    Route {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        on: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        agent: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prompt: Option<String>,
        cases: BTreeMap<String, String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        default: Option<String>,
    },
    /// Starts a child run of `workflow` per item of the `items` expression and joins them.
    FanOut {
        items: String,
        workflow: String,
        /// Complete (with each child's status) even when children failed.
        #[serde(default)]
        allow_failures: bool,
    },
    /// Waits for a named signal (an approval, a reply).
    /// The step's `timeout` is how long it waits.
    Wait {
        signal: String,
        /// Where the run goes on timeout (the run fails when absent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        on_timeout: Option<String>,
    },
    /// A durable timer.
    Sleep {
        #[serde(with = "humantime_serde")]
        duration: Duration,
    },
    /// Records that a message must be sent on the task's channel.
    Reply { text: String },
}

impl StepKind {
    /// The agent role the step calls, if it calls one.
    pub fn agent(&self) -> Option<&str> {
        match self {
            StepKind::Agent { agent, .. } => Some(agent),
            StepKind::Route { agent, .. } => agent.as_deref(),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            StepKind::Agent { .. } => "agent",
            StepKind::Tool { .. } => "tool",
            StepKind::Route { .. } => "route",
            StepKind::FanOut { .. } => "fan_out",
            StepKind::Wait { .. } => "wait",
            StepKind::Sleep { .. } => "sleep",
            StepKind::Reply { .. } => "reply",
        }
    }

    /// Whether the step runs as a job (the others are decided inline or wait for something).
    pub fn is_job(&self) -> bool {
        match self {
            StepKind::Agent { .. } | StepKind::Tool { .. } => true,
            StepKind::Route { agent, .. } => agent.is_some(),
            _ => false,
        }
    }
}

/// Retries of a failed step, and how each retry may change the attempt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all (1: no retry).
    #[serde(default = "RetryPolicy::default_attempts")]
    pub attempts: u32,
    /// Wait before the first retry; doubled for each further one.
    #[serde(default = "RetryPolicy::default_backoff", with = "humantime_serde")]
    pub backoff: Duration,
    #[serde(default = "RetryPolicy::default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// For retry n (1-based), `escalate[n-1]` (or the last entry) changes the attempt: another
    /// agent or model, a simpler prompt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub escalate: Vec<Escalation>,
}

impl RetryPolicy {
    fn default_attempts() -> u32 {
        1
    }
    fn default_backoff() -> Duration {
        Duration::from_secs(1)
    }
    fn default_max_backoff() -> Duration {
        Duration::from_secs(300)
    }
    fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The escalation for attempt `attempt` (1-based; the first attempt has none).
    pub fn escalation(&self, attempt: u32) -> Option<&Escalation> {
        let retry = attempt.checked_sub(2)? as usize;
        self.escalate.get(retry).or(self.escalate.last())
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: Self::default_attempts(),
            backoff: Self::default_backoff(),
            max_backoff: Self::default_max_backoff(),
            escalate: Vec::new(),
        }
    }
}

/// What changes on a retry (seed 004's "improve strategy": another worker, then a simpler one).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Escalation {
    /// Another agent role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Another model, as `provider/model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Another prompt (a template).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
}

/// One problem found in a definition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub file: Option<PathBuf>,
    pub workflow: Option<String>,
    pub step: Option<String>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        if let Some(workflow) = &self.workflow {
            write!(f, "workflow {workflow}: ")?;
        }
        if let Some(step) = &self.step {
            write!(f, "step {step}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Why definitions could not be loaded: every problem found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct DefinitionError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for DefinitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.problems.iter().map(ToString::to_string).collect();
        f.write_str(&lines.join("; "))
    }
}

impl DefinitionError {
    fn one(file: Option<&Path>, message: impl Into<String>) -> Self {
        Self {
            problems: vec![Problem {
                file: file.map(Path::to_path_buf),
                workflow: None,
                step: None,
                message: message.into(),
            }],
        }
    }
}

/// Fields every step may have.
const COMMON_FIELDS: [&str; 7] = [
    "id", "kind", "next", "retry", "timeout", "on_error", "memory",
];

/// The fields of each step kind, besides the common ones (serde cannot refuse unknown fields
/// of a flattened enum, so they are checked here).
fn allowed_fields(kind: &str) -> &'static [&'static str] {
    match kind {
        "agent" => &["agent", "prompt"],
        "tool" => &["tool", "input"],
        "route" => &["on", "agent", "prompt", "cases", "default"],
        "fan_out" => &["items", "workflow", "allow_failures"],
        "wait" => &["signal", "on_timeout"],
        "sleep" => &["duration"],
        "reply" => &["text"],
        _ => &[],
    }
}

/// The step kinds a definition may use.
pub const STEP_KINDS: [&str; 7] = [
    "agent", "tool", "route", "fan_out", "wait", "sleep", "reply",
];

impl Definition {
    /// Parses one definition from YAML; `file` names it in errors.
    pub fn from_yaml(text: &str, file: Option<&Path>) -> Result<Definition, DefinitionError> {
        // Read as a tree first so that an unknown step kind is reported as such, with its step,
        // rather than as serde's "unknown variant" somewhere in the document.
        let tree: Value = serde_yaml_ng::from_str(text)
            .map_err(|e| DefinitionError::one(file, format!("not valid YAML: {e}")))?;
        let mut problems = Vec::new();
        if let Some(steps) = tree.get("steps").and_then(Value::as_array) {
            for (index, step) in steps.iter().enumerate() {
                let id = step
                    .get("id")
                    .and_then(Value::as_str)
                    .map_or_else(|| format!("#{}", index + 1), str::to_owned);
                match step.get("kind").and_then(Value::as_str) {
                    None => problems.push(problem(file, None, Some(&id), "has no `kind`")),
                    Some(kind) if !STEP_KINDS.contains(&kind) => problems.push(problem(
                        file,
                        None,
                        Some(&id),
                        format!(
                            "unknown step kind `{kind}` (expected one of: {})",
                            STEP_KINDS.join(", ")
                        ),
                    )),
                    Some(kind) => {
                        let allowed = allowed_fields(kind);
                        let unknown: Vec<&str> = step
                            .as_object()
                            .into_iter()
                            .flat_map(|o| o.keys())
                            .map(String::as_str)
                            .filter(|k| !COMMON_FIELDS.contains(k) && !allowed.contains(k))
                            .collect();
                        if !unknown.is_empty() {
                            let mut expected: Vec<&str> = COMMON_FIELDS.to_vec();
                            expected.extend(allowed);
                            problems.push(problem(
                                file,
                                None,
                                Some(&id),
                                format!(
                                    "unknown field `{}` for a {kind} step (expected: {})",
                                    unknown.join("`, `"),
                                    expected.join(", ")
                                ),
                            ));
                        } else if let Err(e) = serde_json::from_value::<Step>(step.clone()) {
                            problems.push(problem(file, None, Some(&id), e.to_string()));
                        }
                    }
                }
            }
        }
        if !problems.is_empty() {
            return Err(DefinitionError { problems });
        }
        serde_json::from_value(tree).map_err(|e| DefinitionError::one(file, e.to_string()))
    }

    /// The step with this id.
    pub fn step(&self, id: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.id == id)
    }

    /// The first step.
    pub fn start_step(&self) -> Option<&str> {
        self.start
            .as_deref()
            .or_else(|| self.steps.first().map(|s| s.id.as_str()))
    }

    /// Where the run goes after `step` completes normally (`None` for a route: by its cases).
    pub fn next_after(&self, step: &Step) -> String {
        if let Some(next) = &step.next {
            return next.clone();
        }
        let index = self.steps.iter().position(|s| s.id == step.id);
        index
            .and_then(|i| self.steps.get(i + 1))
            .map_or_else(|| END.to_owned(), |s| s.id.clone())
    }

    /// Every target `step` may lead to.
    fn targets(&self, step: &Step) -> Vec<String> {
        let mut targets = Vec::new();
        match &step.kind {
            StepKind::Route { cases, default, .. } => {
                targets.extend(cases.values().cloned());
                targets.extend(default.iter().cloned());
            }
            StepKind::Wait { on_timeout, .. } => {
                targets.push(self.next_after(step));
                targets.extend(on_timeout.iter().cloned());
            }
            _ => targets.push(self.next_after(step)),
        }
        targets.extend(step.on_error.iter().cloned());
        targets
    }
}

fn problem(
    file: Option<&Path>,
    workflow: Option<&str>,
    step: Option<&str>,
    message: impl Into<String>,
) -> Problem {
    Problem {
        file: file.map(Path::to_path_buf),
        workflow: workflow.map(str::to_owned),
        step: step.map(str::to_owned),
        message: message.into(),
    }
}

/// What a definition may refer to, besides its own steps.
pub struct Known<'a> {
    pub agents: &'a dyn Fn(&str) -> bool,
    pub tools: &'a dyn Fn(&str) -> bool,
    pub workflows: &'a dyn Fn(&str) -> bool,
}

fn is_identifier(id: &str) -> bool {
    let mut chars = id.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Checks a definition; returns every problem found (empty: valid).
pub fn validate(definition: &Definition, known: &Known<'_>, file: Option<&Path>) -> Vec<Problem> {
    let name = Some(definition.name.as_str());
    let mut problems = Vec::new();
    let mut report = |step: Option<&str>, message: String| {
        problems.push(problem(file, name, step, message));
    };
    if definition.name.is_empty()
        || !definition
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        report(
            None,
            format!(
                "name {:?} must be letters, digits, `_` or `-`",
                definition.name
            ),
        );
    }
    if definition.version == 0 {
        report(None, "version must be 1 or more".into());
    }
    if definition.steps.is_empty() {
        report(None, "has no steps".into());
        return problems;
    }
    let mut ids = HashSet::new();
    for step in &definition.steps {
        if !is_identifier(&step.id) || step.id == END {
            report(
                Some(&step.id),
                "a step id must be lower-case letters, digits and `_`, not starting with a digit, and not `end`".into(),
            );
        }
        if !ids.insert(step.id.as_str()) {
            report(Some(&step.id), "the id is used by another step".into());
        }
    }
    let exists = |target: &str| target == END || ids.contains(target);
    if let Some(start) = &definition.start {
        if !ids.contains(start.as_str()) {
            report(None, format!("start step `{start}` does not exist"));
        }
    }
    for step in &definition.steps {
        let id = Some(step.id.as_str());
        for target in definition.targets(step) {
            if !exists(&target) {
                report(id, format!("leads to `{target}`, which is not a step"));
            }
        }
        if step.retry.attempts == 0 {
            report(id, "retry attempts must be 1 or more".into());
        }
        let mut templates: Vec<(&str, &str)> = Vec::new();
        let mut expressions: Vec<(&str, &str)> = Vec::new();
        match &step.kind {
            StepKind::Agent { agent, prompt } => {
                if !(known.agents)(agent) {
                    report(id, format!("unknown agent `{agent}`"));
                }
                if prompt.trim().is_empty() {
                    report(id, "missing input: an agent step needs a `prompt`".into());
                }
                templates.push(("prompt", prompt));
            }
            StepKind::Tool { tool, input } => {
                if !(known.tools)(tool) {
                    report(id, format!("unknown tool `{tool}`"));
                }
                if input.is_null() {
                    report(id, "missing input: a tool step needs an `input`".into());
                }
                collect_strings(input, &mut |s| templates.push(("input", s)));
            }
            StepKind::Route {
                on,
                agent,
                prompt,
                cases,
                ..
            } => {
                match (on, agent) {
                    (Some(on), None) => expressions.push(("on", on)),
                    (None, Some(agent)) => {
                        if !(known.agents)(agent) {
                            report(id, format!("unknown agent `{agent}`"));
                        }
                        match prompt {
                            Some(prompt) => templates.push(("prompt", prompt)),
                            None => report(
                                id,
                                "missing input: a route by agent needs a `prompt`".into(),
                            ),
                        }
                    }
                    _ => report(
                        id,
                        "a route needs exactly one of `on` (an expression) or `agent`".into(),
                    ),
                }
                if cases.is_empty() {
                    report(id, "a route needs at least one case".into());
                }
                if step.next.is_some() {
                    report(
                        id,
                        "a route goes by its `cases` and `default`, not `next`".into(),
                    );
                }
            }
            StepKind::FanOut {
                items, workflow, ..
            } => {
                expressions.push(("items", items));
                if workflow == &definition.name {
                    report(id, "a fan-out may not start its own workflow".into());
                } else if !(known.workflows)(workflow) {
                    report(id, format!("unknown workflow `{workflow}`"));
                }
                if step.retry.attempts > 1 {
                    report(id, "a fan-out step cannot be retried".into());
                }
            }
            StepKind::Wait { signal, .. } => {
                if signal.trim().is_empty() {
                    report(id, "a wait needs a `signal` name".into());
                }
            }
            StepKind::Sleep { duration } => {
                if duration.is_zero() {
                    report(id, "a sleep needs a positive `duration`".into());
                }
            }
            StepKind::Reply { text } => templates.push(("text", text)),
        }
        if let Some(memory) = &step.memory {
            let agent = matches!(
                step.kind,
                StepKind::Agent { .. } | StepKind::Route { agent: Some(_), .. }
            );
            if (memory.context > 0 || memory.query.is_some()) && !agent {
                report(
                    id,
                    "memory context goes before an agent's prompt: only agent steps take it".into(),
                );
            }
            if memory.remember && !step.kind.is_job() {
                report(
                    id,
                    "memory.remember keeps a job step's output: agent and tool steps only".into(),
                );
            }
            if memory.context > StepMemory::MAX_CONTEXT {
                report(
                    id,
                    format!(
                        "memory.context is at most {} tokens",
                        StepMemory::MAX_CONTEXT
                    ),
                );
            }
            if !(0.0..=1.0).contains(&memory.importance) {
                report(id, "memory.importance is from 0 to 1".into());
            }
            if let Some(query) = &memory.query {
                templates.push(("memory.query", query));
            }
        }
        let waits = matches!(step.kind, StepKind::Wait { .. });
        let fans_out = matches!(step.kind, StepKind::FanOut { .. });
        if !step.kind.is_job()
            && !fans_out
            && (step.retry.attempts > 1 || (step.timeout.is_some() && !waits))
        {
            report(
                id,
                format!(
                    "a {} step runs no job: `retry` and `timeout` do not apply",
                    step.kind.name()
                ),
            );
        }
        let env = crate::expr::environment();
        for (field, text) in templates {
            match env.template_from_str(text) {
                Ok(template) => {
                    for var in template.undeclared_variables(true) {
                        check_reference(&var, &ids, &mut |m| report(id, format!("{field}: {m}")));
                    }
                }
                Err(e) => report(id, format!("{field} is not a valid template: {e}")),
            }
        }
        for (field, text) in expressions {
            match env.compile_expression(text) {
                Ok(expression) => {
                    for var in expression.undeclared_variables(true) {
                        check_reference(&var, &ids, &mut |m| report(id, format!("{field}: {m}")));
                    }
                }
                Err(e) => report(id, format!("{field} is not a valid expression: {e}")),
            }
        }
        for escalation in &step.retry.escalate {
            if let Some(agent) = &escalation.agent {
                if !(known.agents)(agent) {
                    report(id, format!("retry escalates to unknown agent `{agent}`"));
                }
            }
        }
    }
    if let Some(output) = &definition.output {
        if let Err(e) = crate::expr::environment().compile_expression(output) {
            report(None, format!("output is not a valid expression: {e}"));
        }
    }
    // `report` borrows `problems` mutably; its last use ends that borrow here.
    if problems.is_empty() {
        graph_problems(definition, &mut |step, message| {
            problems.push(problem(file, name, step, message))
        });
    }
    problems
}

/// `steps.<id>` must name a step; other variables must be ones a run provides.
fn check_reference(var: &str, ids: &HashSet<&str>, report: &mut dyn FnMut(String)) {
    let mut parts = var.split('.');
    match parts.next() {
        Some("steps") => {
            if let Some(step) = parts.next() {
                if !ids.contains(step) {
                    report(format!(
                        "missing input: `{var}` refers to step `{step}`, which does not exist"
                    ));
                }
            }
        }
        Some("input" | "run_id" | "task_id" | "workflow" | "item") => {}
        Some(other) => report(format!(
            "missing input: `{other}` is not known (use input, steps.<id>.output, run_id, task_id or workflow)"
        )),
        None => {}
    }
}

fn collect_strings<'a>(value: &'a Value, f: &mut dyn FnMut(&'a str)) {
    match value {
        Value::String(s) => f(s),
        Value::Array(items) => items.iter().for_each(|v| collect_strings(v, f)),
        Value::Object(map) => map.values().for_each(|v| collect_strings(v, f)),
        _ => {}
    }
}

/// Unreachable steps, and steps from which the run can never end (a cycle without exit).
fn graph_problems(definition: &Definition, report: &mut dyn FnMut(Option<&str>, String)) {
    let edges: BTreeMap<&str, Vec<String>> = definition
        .steps
        .iter()
        .map(|s| (s.id.as_str(), definition.targets(s)))
        .collect();
    let Some(start) = definition.start_step() else {
        return;
    };
    let mut reachable = BTreeSet::new();
    let mut stack = vec![start.to_owned()];
    while let Some(id) = stack.pop() {
        if id == END || !reachable.insert(id.clone()) {
            continue;
        }
        stack.extend(edges.get(id.as_str()).into_iter().flatten().cloned());
    }
    // Steps that can reach the end: grow from the end backwards until nothing changes.
    let mut ending: BTreeSet<&str> = BTreeSet::new();
    loop {
        let before = ending.len();
        for (id, targets) in &edges {
            if targets
                .iter()
                .any(|t| t == END || ending.contains(t.as_str()))
            {
                ending.insert(id);
            }
        }
        if ending.len() == before {
            break;
        }
    }
    for step in &definition.steps {
        let id = step.id.as_str();
        if !reachable.contains(id) {
            report(
                Some(id),
                "unreachable: no path from the start leads here".into(),
            );
        } else if !ending.contains(id) {
            report(
                Some(id),
                "in a cycle without exit: no path from here reaches the end".into(),
            );
        }
    }
}

#[cfg(test)]
mod tests;
