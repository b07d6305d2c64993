//! Operators' routes: workflows, the global log, jobs and projections.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use stele_engine::queue::JobFilter;
use stele_engine::Position;

use super::{parse_id, ApiPath, CanRead, CanWrite, IsAdmin, NoQuery, StrictQuery};
use crate::problem::{ApiError, Code, Problem};
use crate::state::AppState;
use crate::wire::*;

/// The models the agents run on: each provider with how it is reached, the models routes name
/// there and its circuit breaker's state (`closed` is healthy; `open`: calls are refused until
/// its cool-down passed; `half_open`: the next call is a trial), and each agent role with its
/// route (primary first, then fallbacks) and tools. Circuits are this server's own.
#[utoipa::path(
    get, path = "/v1/models", tag = "operators",
    responses(
        (status = 200, description = "Providers and roles", body = ModelsBody),
    ),
    security(("api_key" = ["tasks:read"]))
)]
pub async fn models(
    State(state): State<AppState>,
    _caller: CanRead,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
) -> Result<Json<ModelsBody>, ApiError> {
    let Some(overview) = state.runtime.models() else {
        return Ok(Json(ModelsBody {
            providers: Vec::new(),
            roles: Vec::new(),
        }));
    };
    let chosen = state.runtime.role_models().await?;
    Ok(Json(ModelsBody {
        providers: overview
            .providers
            .into_iter()
            .map(|p| ProviderBody {
                name: p.name,
                kind: p.kind,
                base_url: p.base_url,
                models: p.models,
                circuit: match p.circuit {
                    stele_models::CircuitState::Closed => CircuitBody::Closed,
                    stele_models::CircuitState::Open => CircuitBody::Open,
                    stele_models::CircuitState::HalfOpen => CircuitBody::HalfOpen,
                },
            })
            .collect(),
        roles: overview
            .roles
            .into_iter()
            .map(|r| role_body(r, &chosen))
            .collect(),
    }))
}

/// Choose the model an agent role tries first in every task from now on (one of its route; the
/// rest of the route stays its fallbacks), or (`"model": null`) its own route again. Recorded as
/// `RoleModelChosen`; a chat's own choice (`/models` on Telegram) goes over it.
#[utoipa::path(
    put, path = "/v1/models/roles/{role}", tag = "operators",
    params(RoleName),
    request_body = ChooseRoleModel,
    responses(
        (status = 200, description = "The role, with its choice", body = RoleBody),
        (status = 422, description = "`unknown_model`: no such role, or a model outside its route", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["admin"]))
)]
pub async fn choose_role_model(
    State(state): State<AppState>,
    IsAdmin(caller): IsAdmin,
    ApiPath(RoleName { role }): ApiPath<RoleName>,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
    crate::json::StrictJson(body): crate::json::StrictJson<ChooseRoleModel>,
) -> Result<Json<RoleBody>, ApiError> {
    let meta = stele_engine::CommandMeta::new(format!("key:{}", caller.key_id), "api");
    state
        .runtime
        .choose_role_model(&role, body.model, meta)
        .await?;
    let chosen = state.runtime.role_models().await?;
    let role = state
        .runtime
        .models()
        .into_iter()
        .flat_map(|overview| overview.roles)
        .into_iter()
        .find(|r| r.name == role)
        .ok_or_else(|| ApiError::new(Code::UnknownModel, format!("no agent role {role:?}")))?;
    Ok(Json(role_body(role, &chosen)))
}

/// A role as the API shows it, with the model chosen for it at run time.
fn role_body(
    role: stele_models::RoleOverview,
    chosen: &std::collections::BTreeMap<String, String>,
) -> RoleBody {
    RoleBody {
        chosen: chosen.get(&role.name).cloned(),
        name: role.name,
        description: role.description,
        route: role.route,
        tools: role.tools,
    }
}

/// An OpenAI-compatible chat call through Stele's model router: `model` is an agent role (its
/// route with fallbacks, retries and circuit breakers, its system prompt and output schema) or
/// one model `provider/model`. Every call is recorded as an event (`ModelCalled` on
/// `model_call/<id>`: the key, each attempt's model, tokens, latency and error; not the
/// messages). The key's rate limit applies. No streaming.
#[utoipa::path(
    post, path = "/v1/chat/completions", tag = "operators",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "The answer", body = ChatCompletion),
        (status = 422, description = "`unknown_model`: neither a role nor a configured provider's model", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "`model_unavailable`: no model of the route answered (the attempts are recorded)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["tasks:write"]))
)]
pub async fn chat_completions(
    State(state): State<AppState>,
    CanWrite(caller): CanWrite,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
    crate::json::StrictJson(request): crate::json::StrictJson<ChatCompletionRequest>,
) -> Result<Json<ChatCompletion>, ApiError> {
    let messages = request
        .messages
        .into_iter()
        .map(|m| match m.role {
            ChatRoleBody::System => stele_models::ChatMessage::system(m.content),
            ChatRoleBody::User => stele_models::ChatMessage::user(m.content),
            ChatRoleBody::Assistant => stele_models::ChatMessage::assistant(m.content),
        })
        .collect();
    let meta = stele_engine::CommandMeta::new(format!("key:{}", caller.key_id), "api");
    let outcome = state
        .runtime
        .chat(
            &request.model,
            messages,
            request.temperature,
            request.max_tokens,
            meta,
        )
        .await
        .map_err(|e| match e {
            stele_workflows::runtime::RuntimeError::ModelsFailed(why) => {
                ApiError::new(Code::ModelUnavailable, why)
            }
            other => other.into(),
        })?;
    Ok(Json(ChatCompletion {
        id: outcome.call_id,
        object: "chat.completion".into(),
        created: chrono::Utc::now().timestamp(),
        model: outcome.model,
        choices: vec![ChatChoice {
            index: 0,
            message: ChatMessageBody {
                role: ChatRoleBody::Assistant,
                content: outcome.content,
            },
            finish_reason: outcome.finish_reason,
        }],
        usage: ChatUsage {
            prompt_tokens: outcome.input_tokens,
            completion_tokens: outcome.output_tokens,
            total_tokens: outcome.input_tokens + outcome.output_tokens,
        },
    }))
}

/// The workflow definitions (newest version of each).
#[utoipa::path(
    get, path = "/v1/workflows", tag = "operators",
    responses(
        (status = 200, description = "Definitions", body = Vec<WorkflowBody>),
    ),
    security(("api_key" = ["tasks:read"]))
)]
pub async fn workflows(
    State(state): State<AppState>,
    _caller: CanRead,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
) -> Json<Vec<WorkflowBody>> {
    Json(
        state
            .runtime
            .catalog()
            .latest_all()
            .map(|d| WorkflowBody {
                name: d.name.clone(),
                version: d.version,
                description: d.description.clone(),
                steps: d
                    .steps
                    .iter()
                    .map(|s| WorkflowStepBody {
                        id: s.id.clone(),
                        kind: s.kind.name().to_owned(),
                    })
                    .collect(),
            })
            .collect(),
    )
}

/// The global log, in commit order, a page at a time.
#[utoipa::path(
    get, path = "/v1/events", tag = "operators",
    params(LogQuery),
    responses(
        (status = 200, description = "A page of the log", body = LogPage),
        (status = 400, description = "`unknown_position`: `after` holds no event; `invalid_query`: an unknown parameter, a wrong type or a value out of range; `invalid_character`", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["admin"]))
)]
pub async fn events(
    State(state): State<AppState>,
    _caller: IsAdmin,
    StrictQuery(query): StrictQuery<LogQuery>,
) -> Result<Json<LogPage>, ApiError> {
    let limit = bounded(query.limit, 100, 1000)?;
    let after = query.after.unwrap_or(0);
    if after < 0 {
        return Err(ApiError::new(
            Code::InvalidQuery,
            "`after` must be 0 or more",
        ));
    }
    let events = state.log.read_all(Position(after), limit).await?;
    Ok(Json(LogPage {
        next_after: events.last().map_or(after, |e| e.position.0),
        events: events.iter().map(EventBody::from).collect(),
    }))
}

pub(crate) fn bounded(limit: Option<usize>, default: usize, max: usize) -> Result<usize, ApiError> {
    match limit {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::new(
            Code::InvalidQuery,
            format!("`limit` is {n}; it must be 1 to {max}"),
        )),
    }
}

/// Jobs, newest first (e.g. `?state=dead` for the dead letters).
#[utoipa::path(
    get, path = "/v1/jobs", tag = "operators",
    params(JobQuery),
    responses(
        (status = 200, description = "Jobs", body = JobList,
         links(("RetryJob" = (operation_id = "retry_job", parameters(("id" = "$response.body#/jobs/0/id")), description = "Retry the first job")))),
        (status = 400, description = "`invalid_query`: an unknown parameter or state, a wrong type or a value out of range; `invalid_character`", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["admin"]))
)]
pub async fn jobs(
    State(state): State<AppState>,
    _caller: IsAdmin,
    StrictQuery(query): StrictQuery<JobQuery>,
) -> Result<Json<JobList>, ApiError> {
    let jobs = state
        .queue
        .list(JobFilter {
            state: query.state.map(Into::into),
            queue: query.queue,
            kind: query.kind,
            limit: bounded(query.limit, 50, 500)?,
        })
        .await?;
    Ok(Json(JobList {
        jobs: jobs.into_iter().map(JobBody::from).collect(),
    }))
}

/// Run a dead or cancelled job again, with a fresh set of attempts.
#[utoipa::path(
    post, path = "/v1/jobs/{id}/retry", tag = "operators",
    params(("id" = uuid::Uuid, Path, description = "The job's id")),
    responses(
        (status = 200, description = "The job, available again", body = JobBody),
        (status = 400, description = "`invalid_id`: not a job id (a UUID); `invalid_query`, `invalid_character`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`job_not_found`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`job_state`: the job is neither dead nor cancelled", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["admin"]))
)]
pub async fn retry_job(
    State(state): State<AppState>,
    _caller: IsAdmin,
    ApiPath(id): ApiPath<String>,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
) -> Result<Json<JobBody>, ApiError> {
    let id = parse_id("job", &id)?;
    Ok(Json(state.queue.retry(id).await?.into()))
}

/// Projections (read models and process managers): position, lag, failures.
#[utoipa::path(
    get, path = "/v1/projections", tag = "operators",
    responses(
        (status = 200, description = "Projections", body = ProjectionList,
         links(("Rebuild" = (operation_id = "rebuild", parameters(("name" = "$response.body#/projections/0/name")), description = "Rebuild the first projection")))),
    ),
    security(("api_key" = ["admin"]))
)]
pub async fn projections(
    State(state): State<AppState>,
    _caller: IsAdmin,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
) -> Result<Json<ProjectionList>, ApiError> {
    let statuses = state.runner.status().await?;
    Ok(Json(ProjectionList {
        projections: statuses
            .into_iter()
            .map(|s| ProjectionBody {
                name: s.checkpoint.name.clone(),
                status: serde_json::to_value(s.checkpoint.status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                position: s.checkpoint.position.0,
                lag_events: s.lag_events,
                lag_seconds: s.lag_seconds,
                error: s.checkpoint.error.clone(),
                rebuilding: s.checkpoint.rebuild_owner.is_some(),
                rebuild_error: s.checkpoint.rebuild_error.clone(),
            })
            .collect(),
    }))
}

/// Rebuild a projection from the start of the log (in the background; its status shows progress).
#[utoipa::path(
    post, path = "/v1/projections/{name}/rebuild", tag = "operators",
    params(("name" = String, Path, description = "The projection's name")),
    responses(
        (status = 202, description = "Rebuilding", body = Accepted),
        (status = 404, description = "`projection_not_found`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The projection cannot be rebuilt (a process manager: `not_rebuildable`), or a rebuild of it is under way (`projection_busy`)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["admin"]))
)]
pub async fn rebuild(
    State(state): State<AppState>,
    _caller: IsAdmin,
    ApiPath(name): ApiPath<String>,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    if !state.runner.names().contains(&name.as_str()) {
        return Err(ApiError::new(
            Code::ProjectionNotFound,
            format!("no projection {name}"),
        ));
    }
    // Claimed before answering, so that a second rebuild meanwhile answers 409.
    let claim = state.runner.claim_rebuild(&name).await?;
    let runner = state.runner.clone();
    tokio::spawn(async move {
        match runner.run_rebuild(claim, |_| {}).await {
            Ok(_) => tracing::info!(projection = %name, "rebuilt"),
            Err(e) => tracing::warn!(projection = %name, error = %e, "rebuild failed"),
        }
    });
    Ok((
        StatusCode::ACCEPTED,
        Json(Accepted {
            status: "rebuilding".into(),
        }),
    ))
}
