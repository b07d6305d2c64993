use std::path::Path;

use super::*;

fn known() -> Known<'static> {
    Known {
        agents: &|a| ["planner", "brain", "coder"].contains(&a),
        tools: &|t| ["echo", "noop"].contains(&t),
        workflows: &|w| w == "subtask",
    }
}

fn check(yaml: &str) -> Vec<String> {
    let file = Path::new("flows/test.yaml");
    match Definition::from_yaml(yaml, Some(file)) {
        Ok(definition) => validate(&definition, &known(), Some(file))
            .iter()
            .map(ToString::to_string)
            .collect(),
        Err(e) => e.problems.iter().map(ToString::to_string).collect(),
    }
}

fn assert_problem(yaml: &str, expected: &str) {
    let problems = check(yaml);
    assert!(
        problems.iter().any(|p| p.contains(expected)),
        "expected a problem containing {expected:?}, got {problems:#?}"
    );
}

const VALID: &str = r#"
name: triage
version: 2
description: classify, then answer or split
steps:
  - id: classify
    kind: agent
    agent: brain
    prompt: "Classify: {{ input }}"
    retry: { attempts: 3, backoff: 1s, escalate: [{ agent: planner }] }
    timeout: 30s
  - id: route
    kind: route
    on: steps.classify.output.route
    cases: { simple: answer, decompose: split }
    default: answer
  - id: answer
    kind: reply
    text: "{{ steps.classify.output }}"
    next: end
  - id: split
    kind: fan_out
    items: steps.classify.output.subtasks
    workflow: subtask
  - id: approve
    kind: wait
    signal: approval
    timeout: 1h
    on_timeout: answer
  - id: pause
    kind: sleep
    duration: 5s
  - id: record
    kind: tool
    tool: echo
    input: { text: "{{ input }}" }
"#;

#[test]
fn a_valid_definition_parses_and_validates() {
    assert_eq!(check(VALID), Vec::<String>::new());
    let definition = Definition::from_yaml(VALID, None).unwrap();
    assert_eq!(definition.version, 2);
    assert_eq!(definition.steps.len(), 7);
    let classify = definition.step("classify").unwrap();
    assert_eq!(classify.retry.attempts, 3);
    assert_eq!(classify.timeout, Some(Duration::from_secs(30)));
    assert_eq!(
        classify
            .retry
            .escalation(2)
            .and_then(|e| e.agent.as_deref()),
        Some("planner")
    );
    assert_eq!(definition.next_after(classify), "route");
    assert_eq!(
        definition.next_after(definition.step("record").unwrap()),
        END
    );
}

#[test]
fn the_same_model_is_buildable_in_rust_and_round_trips() {
    let definition = Definition {
        name: "echo".into(),
        version: 1,
        description: String::new(),
        start: None,
        output: None,
        steps: vec![Step {
            id: "say".into(),
            kind: StepKind::Tool {
                tool: "echo".into(),
                input: serde_json::json!("{{ input }}"),
            },
            next: None,
            retry: RetryPolicy::default(),
            timeout: None,
            on_error: None,
            memory: None,
        }],
    };
    assert!(validate(&definition, &known(), None).is_empty());
    let yaml = serde_yaml_ng::to_string(&definition).unwrap();
    assert_eq!(Definition::from_yaml(&yaml, None).unwrap(), definition);
}

#[test]
fn an_unknown_step_kind_names_file_and_step() {
    let problems =
        check("name: x\nversion: 1\nsteps:\n  - id: a\n    kind: teleport\n    to: mars\n");
    assert_eq!(problems.len(), 1);
    assert!(problems[0].starts_with("flows/test.yaml: step a: unknown step kind `teleport`"));
}

#[test]
fn unknown_fields_and_bad_yaml_are_refused() {
    assert_problem(
        "name: x\nversion: 1\nsteps:\n  - id: a\n    kind: reply\n    text: hi\n    colour: red\n",
        "step a: unknown field `colour` for a reply step",
    );
    assert_problem("name: [x\n", "not valid YAML");
}

#[test]
fn unknown_agents_tools_workflows_and_targets_are_refused() {
    assert_problem(
        "name: x\nversion: 1\nsteps:\n  - id: a\n    kind: agent\n    agent: oracle\n    prompt: hi\n",
        "step a: unknown agent `oracle`",
    );
    assert_problem(
        "name: x\nversion: 1\nsteps:\n  - id: a\n    kind: tool\n    tool: hammer\n    input: 1\n",
        "unknown tool `hammer`",
    );
    assert_problem(
        "name: x\nversion: 1\nsteps:\n  - id: a\n    kind: fan_out\n    items: input\n    workflow: nope\n",
        "unknown workflow `nope`",
    );
    assert_problem(
        "name: x\nversion: 1\nsteps:\n  - id: a\n    kind: reply\n    text: hi\n    next: b\n",
        "leads to `b`, which is not a step",
    );
}

#[test]
fn missing_inputs_are_refused() {
    assert_problem(
        "name: x\nversion: 1\nsteps:\n  - id: a\n    kind: agent\n    agent: brain\n    prompt: ''\n",
        "missing input: an agent step needs a `prompt`",
    );
    assert_problem(
        "name: x\nversion: 1\nsteps:\n  - id: a\n    kind: tool\n    tool: echo\n",
        "missing input: a tool step needs an `input`",
    );
    assert_problem(
        "name: x\nversion: 1\nsteps:\n  - id: a\n    kind: reply\n    text: '{{ steps.plan.output }}'\n",
        "`steps.plan.output` refers to step `plan`, which does not exist",
    );
    assert_problem(
        "name: x\nversion: 1\nsteps:\n  - id: a\n    kind: agent\n    agent: brain\n",
        "missing field `prompt`",
    );
}

#[test]
fn unreachable_steps_and_cycles_without_exit_are_refused() {
    assert_problem(
        "name: x\nversion: 1\nsteps:\n  - id: a\n    kind: reply\n    text: hi\n    next: end\n  - id: b\n    kind: reply\n    text: lost\n",
        "step b: unreachable",
    );
    let cycle = r#"
name: x
version: 1
steps:
  - id: a
    kind: reply
    text: hi
  - id: b
    kind: sleep
    duration: 1s
    next: a
"#;
    assert_problem(cycle, "step a: in a cycle without exit");
    let cycle_with_exit = r#"
name: x
version: 1
steps:
  - id: a
    kind: agent
    agent: brain
    prompt: "again?"
  - id: check
    kind: route
    on: steps.a.output
    cases: { again: a, done: end }
"#;
    assert_eq!(check(cycle_with_exit), Vec::<String>::new());
}

#[test]
fn ids_names_versions_and_misplaced_options_are_checked() {
    assert_problem(
        "name: x\nversion: 0\nsteps:\n  - id: a\n    kind: reply\n    text: hi\n",
        "version must be 1 or more",
    );
    assert_problem(
        "name: x\nversion: 1\nsteps:\n  - id: A-1\n    kind: reply\n    text: hi\n",
        "step A-1: a step id must be",
    );
    assert_problem(
        "name: x\nversion: 1\nsteps:\n  - id: a\n    kind: reply\n    text: hi\n  - id: a\n    kind: reply\n    text: again\n",
        "the id is used by another step",
    );
    assert_problem(
        "name: x\nversion: 1\nsteps:\n  - id: a\n    kind: reply\n    text: hi\n    retry: { attempts: 3 }\n",
        "a reply step runs no job",
    );
    assert_problem(
        "name: x\nversion: 1\nsteps:\n  - id: a\n    kind: route\n    cases: { x: end }\n",
        "exactly one of `on`",
    );
    assert_problem(
        "name: x\nversion: 1\nsteps:\n  - id: a\n    kind: reply\n    text: '{{ input'\n",
        "text is not a valid template",
    );
}

#[test]
fn memory_options_are_checked() {
    let step = |kind: &str, memory: &str| {
        format!("name: m\nversion: 1\nsteps:\n  - id: s\n{kind}\n    memory: {memory}\n")
    };
    let agent = "    kind: agent\n    agent: brain\n    prompt: \"{{ input }}\"";
    let tool = "    kind: tool\n    tool: echo\n    input: \"{{ input }}\"";
    let wait = "    kind: wait\n    signal: ok";
    assert!(check(&step(
        agent,
        "{ context: 500, query: \"{{ input }}\", remember: true, importance: 0.9, tags: [a] }"
    ))
    .is_empty());
    assert!(check(&step(tool, "{ remember: true }")).is_empty());
    assert_problem(&step(tool, "{ context: 100 }"), "only agent steps take it");
    assert_problem(
        &step(wait, "{ remember: true }"),
        "agent and tool steps only",
    );
    assert_problem(&step(agent, "{ context: 100000 }"), "at most 32000 tokens");
    assert_problem(&step(agent, "{ importance: 2 }"), "from 0 to 1");
    assert_problem(
        &step(agent, "{ context: 10, query: \"{{ steps.nope.output }}\" }"),
        "memory.query",
    );
    assert_problem(&step(agent, "{ contxt: 10 }"), "unknown field `contxt`");
}
