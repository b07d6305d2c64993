//! The memory over HTTP: remember a fact (`memory:write`), search (`memory:read`), forget a fact
//! (`memory:write`). Searching reads people's data opened: it needs its own scope.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use stele_aggregates::memory::MemoryScope;
use stele_engine::CommandMeta;
use stele_memory::{Filter, Memories, MemoryError, Mode, NewMemory, Search};

use crate::json::{OptionalJson, StrictJson};
use crate::problem::{ApiError, Code, Problem};
use crate::routes::subjects::{existing, service};
use crate::routes::{parse_id, ApiPath, CanReadMemory, CanWriteMemory, NoQuery, StrictQuery};
use crate::state::AppState;
use crate::wire::{
    ForgetMemory, MemoryHit, MemoryHits, MemoryMode, MemoryScopeBody, MemorySearchQuery,
    MemoryStored, StoreMemory,
};

fn memory(state: &AppState) -> Result<&Arc<Memories>, ApiError> {
    state.memory.as_ref().ok_or_else(|| {
        ApiError::new(
            Code::MemoryUnavailable,
            "this server has no memory: start it with an embedding model (--embedding-model or STELE_EMBEDDING_MODEL)",
        )
    })
}

fn refused(e: MemoryError) -> ApiError {
    match e {
        MemoryError::Refused(
            stele_aggregates::memory::MemoryError::NotStored
            | stele_aggregates::memory::MemoryError::Forgotten,
        ) => ApiError::new(Code::MemoryNotFound, e.to_string()),
        MemoryError::Refused(refused) => ApiError::new(Code::InvalidMemory, refused.to_string()),
        MemoryError::Embedding(e) => ApiError::new(
            Code::MemoryUnavailable,
            format!("the embedding model failed: {e}"),
        ),
        other => ApiError::internal(other),
    }
}

fn meta(caller: &crate::auth::Caller) -> CommandMeta {
    CommandMeta::new(format!("key:{}", caller.key_id), "api")
}

/// Remember a fact. With a subject in its scope it is that person's: sealed with their key and
/// erased with them. The memory projection indexes it within moments.
#[utoipa::path(
    post, path = "/v1/memories", tag = "memory",
    request_body = StoreMemory,
    responses(
        (status = 201, description = "Remembered", body = MemoryStored),
        (status = 404, description = "`subject_not_found`: the scope names no known subject", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`subject_state`: the subject is erased", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid_memory`", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`memory_unavailable`: no embedding model", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["memory:write"]))
)]
pub async fn store_memory(
    State(state): State<AppState>,
    CanWriteMemory(caller): CanWriteMemory,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
    StrictJson(request): StrictJson<StoreMemory>,
) -> Result<(StatusCode, Json<MemoryStored>), ApiError> {
    let memories = memory(&state)?;
    let scope = request.scope.unwrap_or_default();
    if let Some(subject) = &scope.subject {
        parse_id("subject", subject)?;
        let found = existing(service(&state)?, subject).await?;
        if found.erased.is_some() || found.merged_into.is_some() {
            return Err(ApiError::new(
                Code::SubjectState,
                format!("subject {subject} is erased or merged: nothing more is kept of them"),
            ));
        }
    }
    let memory_id = memories
        .store(
            NewMemory {
                content: request.content,
                importance: request.importance.unwrap_or(0.5),
                tags: request.tags.into_iter().map(|t| t.0).collect(),
                scope: MemoryScope {
                    agent: scope.agent,
                    conversation: scope.conversation,
                    subject: scope.subject,
                    workflow: scope.workflow,
                    tenant: scope.tenant,
                },
                key: request.key,
                sources: Vec::new(),
            },
            meta(&caller),
        )
        .await
        .map_err(refused)?;
    Ok((StatusCode::CREATED, Json(MemoryStored { memory_id })))
}

/// Search the memory: facts, conversation messages and remembered step outputs, by meaning
/// (vectors) and words (full text), fused by Reciprocal Rank Fusion, within a scope, as it is
/// now or as it was at `at`.
#[utoipa::path(
    get, path = "/v1/memories/search", tag = "memory",
    params(MemorySearchQuery),
    responses(
        (status = 200, description = "The memories found, best first", body = MemoryHits),
        (status = 503, description = "`memory_unavailable`: no embedding model, or it failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["memory:read"]))
)]
pub async fn search_memory(
    State(state): State<AppState>,
    _caller: CanReadMemory,
    StrictQuery(query): StrictQuery<MemorySearchQuery>,
) -> Result<Json<MemoryHits>, ApiError> {
    let memories = memory(&state)?;
    if query.q.trim().is_empty() || query.q.chars().count() > 2000 {
        return Err(ApiError::new(
            Code::InvalidQuery,
            "`q` has 1 to 2,000 characters, not all white space",
        ));
    }
    let limit = crate::routes::ops::bounded(query.limit, 10, 100)?;
    if let Some(subject) = &query.subject {
        parse_id("subject", subject)?;
    }
    let hits = memories
        .search(&Search {
            query: query.q,
            filter: Filter {
                scope: MemoryScope {
                    agent: query.agent,
                    conversation: query.conversation,
                    subject: query.subject,
                    workflow: query.workflow,
                    tenant: query.tenant,
                },
                no_subject: false,
                at: query.at,
            },
            limit,
            mode: match query.mode.unwrap_or_default() {
                MemoryMode::Hybrid => Mode::Hybrid,
                MemoryMode::Dense => Mode::Dense,
                MemoryMode::Text => Mode::Text,
            },
        })
        .await
        .map_err(refused)?;
    Ok(Json(MemoryHits {
        hits: hits
            .into_iter()
            .map(|hit| MemoryHit {
                memory_id: hit.memory_id,
                kind: hit.kind,
                content: hit.content,
                score: hit.score,
                importance: hit.importance,
                tags: hit.tags,
                key: hit.key,
                scope: MemoryScopeBody {
                    agent: hit.agent,
                    conversation: hit.conversation,
                    subject: hit.subject,
                    workflow: hit.workflow,
                    tenant: hit.tenant,
                },
                position: hit.position,
                sources: hit.sources,
                valid_from: hit.valid_from,
                valid_until: hit.valid_until,
            })
            .collect(),
    }))
}

/// Forget a stored fact (`MemoryForgotten`): searches no longer find it, searches `at` an
/// earlier time still do. Forgetting a forgotten fact changes nothing. Messages and step outputs
/// are forgotten with their person.
#[utoipa::path(
    delete, path = "/v1/memories/{id}", tag = "memory",
    params(("id" = Uuid, Path, description = "The fact's id")),
    request_body(content = Option<ForgetMemory>, description = "Optional: a reason. Leave the body out for none (`null` is not a body)"),
    responses(
        (status = 204, description = "Forgotten"),
        (status = 404, description = "`memory_not_found`: no stored fact with that id", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`memory_unavailable`: no embedding model", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["memory:write"]))
)]
pub async fn forget_memory(
    State(state): State<AppState>,
    CanWriteMemory(caller): CanWriteMemory,
    ApiPath(id): ApiPath<String>,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
    OptionalJson(request): OptionalJson<ForgetMemory>,
) -> Result<StatusCode, ApiError> {
    let memories = memory(&state)?;
    parse_id("memory", &id)?;
    let reason = request
        .reason
        .unwrap_or_else(|| "forgotten through the API".into());
    memories
        .forget(&id, &reason, meta(&caller))
        .await
        .map_err(refused)?;
    Ok(StatusCode::NO_CONTENT)
}
