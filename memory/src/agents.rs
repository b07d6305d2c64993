//! The memory for agents: the `memory.search` and `memory.store` tools (offered to the roles
//! that list them) and the context a step's prompt receives ([`Recall`]).
//!
//! A step sees only what its run may: a run for a person searches and stores that person's
//! memories (sealed with their key, erased with them); a run for no one sees only memories of
//! no one. A model's arguments cannot widen that.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use stele_aggregates::memory::MemoryScope;
use stele_engine::CommandMeta;
use stele_workflows::recall::{Recall, RecallRequest};
use stele_workflows::tools::{Caller, Tools};

use crate::{ContextRequest, Filter, Memories, Mode, NewMemory, Search};

/// Most memories one `memory.search` returns.
pub const MAX_SEARCH_LIMIT: usize = 20;

/// `memory.search`'s input.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchInput {
    pub query: String,
    /// How many (5 by default, at most [`MAX_SEARCH_LIMIT`]).
    #[serde(default)]
    pub limit: Option<usize>,
    /// Only what this agent role stored itself.
    #[serde(default)]
    pub mine: bool,
}

/// One memory found, as an agent sees it.
#[derive(Debug, Serialize)]
pub struct Found {
    pub memory_id: String,
    pub kind: String,
    pub content: String,
    pub importance: f64,
    pub tags: Vec<String>,
    pub valid_from: DateTime<Utc>,
}

/// `memory.store`'s input.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreInput {
    pub content: String,
    /// 0 (trivia) to 1 (never forget); 0.5 by default.
    #[serde(default)]
    pub importance: Option<f32>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// A later fact with the same key supersedes this one.
    #[serde(default)]
    pub key: Option<String>,
}

/// What `caller` may see: its person's memories, or no one's.
pub fn filter_for(caller: &Caller) -> Filter {
    Filter {
        scope: MemoryScope {
            subject: caller.subject.clone(),
            ..MemoryScope::default()
        },
        no_subject: caller.subject.is_none(),
        at: None,
    }
}

/// `tools` with `memory.search` and `memory.store` on `memories`.
pub fn register(tools: Tools, memories: Arc<Memories>) -> Tools {
    let searching = memories.clone();
    tools
        .register_for_caller("memory.search", move |input: SearchInput, caller: Caller| {
            let memories = searching.clone();
            async move {
                let mut filter = filter_for(&caller);
                if input.mine {
                    filter.scope.agent = caller.agent.clone();
                }
                let hits = memories
                    .search(&Search {
                        query: input.query,
                        filter,
                        limit: input.limit.unwrap_or(5).clamp(1, MAX_SEARCH_LIMIT),
                        mode: Mode::Hybrid,
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(
                    hits.into_iter()
                        .map(|hit| Found {
                            memory_id: hit.memory_id,
                            kind: hit.kind,
                            content: hit.content,
                            importance: hit.importance,
                            tags: hit.tags,
                            valid_from: hit.valid_from,
                        })
                        .collect::<Vec<_>>(),
                )
            }
        })
        .describe(
            "memory.search",
            "Searches what is remembered (facts, past messages and results) by meaning and words; best first.",
            serde_json::json!({
                "type": "object",
                "required": ["query"],
                "additionalProperties": false,
                "properties": {
                    "query": { "type": "string", "description": "What to look for." },
                    "limit": { "type": "integer", "minimum": 1, "maximum": MAX_SEARCH_LIMIT },
                    "mine": { "type": "boolean", "description": "Only what you stored yourself." }
                }
            }),
        )
        .register_for_caller("memory.store", move |input: StoreInput, caller: Caller| {
            let memories = memories.clone();
            async move {
                let actor = format!("agent:{}", caller.agent.as_deref().unwrap_or("tool"));
                let memory = NewMemory {
                    content: input.content,
                    importance: input.importance.unwrap_or(0.5),
                    tags: input.tags,
                    scope: MemoryScope {
                        agent: caller.agent.clone(),
                        subject: caller.subject.clone(),
                        workflow: Some(caller.workflow.clone()),
                        ..MemoryScope::default()
                    },
                    key: input.key,
                    sources: Vec::new(),
                };
                let meta = CommandMeta::new(actor, "workflow");
                let memory_id = memories
                    .store(memory, meta)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(serde_json::json!({ "memory_id": memory_id }))
            }
        })
        .describe(
            "memory.store",
            "Remembers a durable fact (never a secret) for later steps and conversations.",
            serde_json::json!({
                "type": "object",
                "required": ["content"],
                "additionalProperties": false,
                "properties": {
                    "content": { "type": "string", "description": "The fact, in one or two sentences." },
                    "importance": { "type": "number", "minimum": 0, "maximum": 1 },
                    "tags": { "type": "array", "items": { "type": "string" }, "maxItems": 16 },
                    "key": { "type": "string", "description": "A name for the fact: a later fact with the same key replaces it." }
                }
            }),
        )
}

#[async_trait]
impl Recall for Memories {
    async fn recall(&self, request: RecallRequest) -> Result<String, String> {
        let mut filter = filter_for(&request.caller);
        if let Some(scope) = request.agent_scope {
            filter.scope.agent = Some(scope);
        }
        let context = self
            .context(&ContextRequest {
                query: request.query,
                filter,
                tokens: request.tokens,
                now: None,
            })
            .await
            .map_err(|e| e.to_string())?;
        Ok(context.text)
    }
}
