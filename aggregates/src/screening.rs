//! What the input sanitiser found in a text, as recorded in tasks' and conversations' events.
//! A finding names the rule and where it matched, never the text itself (which is the person's
//! and stays sealed in its own event).

use serde::{Deserialize, Serialize};

/// A kind of threat in input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Threat {
    /// Text that tries to override the agents' instructions ("ignore previous instructions").
    PromptInjection,
    /// SQL meant to change a query (`' OR 1=1`, `; DROP TABLE`).
    SqlInjection,
    /// Script or markup meant to run where the text is shown (`<script>`, `javascript:`, `onerror=`).
    MarkupInjection,
    /// A path that climbs out of where it should stay (`../`, `/etc/passwd`).
    PathTraversal,
    /// Longer than the policy allows.
    TooLong,
}

impl Threat {
    pub fn as_str(self) -> &'static str {
        match self {
            Threat::PromptInjection => "prompt_injection",
            Threat::SqlInjection => "sql_injection",
            Threat::MarkupInjection => "markup_injection",
            Threat::PathTraversal => "path_traversal",
            Threat::TooLong => "too_long",
        }
    }

    /// In words, for answers to people.
    pub fn describe(self) -> &'static str {
        match self {
            Threat::PromptInjection => "an attempt to override the assistant's instructions",
            Threat::SqlInjection => "an SQL injection",
            Threat::MarkupInjection => "script or markup injection",
            Threat::PathTraversal => "a path traversal",
            Threat::TooLong => "a message over the length limit",
        }
    }
}

/// How serious a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Low,
    Medium,
    High,
}

/// What is done about a finding (the strongest one decides for the input).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScreenAction {
    /// Recorded, the input kept as it is.
    Flag,
    /// The matched text replaced by `[filtered]` (an over-long input cut at the limit).
    Filter,
    /// The input cut before the first finding (an over-long input at the limit).
    Truncate,
    /// The input refused: no task is made of it.
    Block,
}

/// One thing the sanitiser found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub threat: Threat,
    pub severity: Severity,
    /// The rule that matched (e.g. `ignore_instructions`).
    pub rule: String,
    /// Where it matched, in characters from the start, and for how many.
    pub at: usize,
    pub len: usize,
    /// What was done about it.
    pub action: ScreenAction,
}

/// What screening an input found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Screening {
    pub findings: Vec<Finding>,
}

impl Screening {
    /// The strongest action taken (none without findings).
    pub fn action(&self) -> Option<ScreenAction> {
        self.findings.iter().map(|f| f.action).max()
    }

    pub fn blocked(&self) -> bool {
        self.action() == Some(ScreenAction::Block)
    }

    /// The threats found, each once, most serious first, in words.
    pub fn summary(&self) -> String {
        let mut threats: Vec<(Severity, Threat)> = self
            .findings
            .iter()
            .map(|f| (f.severity, f.threat))
            .collect();
        threats.sort_by(|a, b| b.cmp(a));
        threats.dedup();
        threats
            .iter()
            .map(|(severity, threat)| {
                format!(
                    "{} ({})",
                    threat.describe(),
                    format!("{severity:?}").to_lowercase()
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}
