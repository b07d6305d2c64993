//! The memory as a step sees it: remembered context put before an agent's prompt (a step's
//! `memory.context`). The memory crate answers; this port keeps the runtime free of it.

use async_trait::async_trait;

use crate::tools::Caller;

/// What a step asks the memory for.
#[derive(Clone, Debug, PartialEq)]
pub struct RecallRequest {
    /// What the context is searched with (the step's `memory.query`, or its prompt).
    pub query: String,
    /// At most this many tokens of context.
    pub tokens: u32,
    /// The step asking: its run's person bounds what it may recall.
    pub caller: Caller,
    /// Only memories of this agent scope, when set (a room's seat remembers in its own).
    pub agent_scope: Option<String>,
}

/// The memory, for steps.
#[async_trait]
pub trait Recall: Send + Sync {
    /// Remembered context for `request`, as text to put before the prompt (empty: nothing
    /// bears on it).
    async fn recall(&self, request: RecallRequest) -> Result<String, String>;
}
